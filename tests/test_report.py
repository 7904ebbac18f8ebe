"""`taskprune report`: pinned numbers of a hand-made study, a self-contained HTML, graceful gaps,
and the pure functions of report/tables.py on hand cases."""

from __future__ import annotations

import copy
import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest

from taskprune.report import write_report
from taskprune.report import tables as T
from taskprune.report.render import sentence

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "study"
SIM = ("squad-sim", "dialogue-sim")


def _builder():
    spec = importlib.util.spec_from_file_location("study_fixture_build", FIXTURE / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


BUILD = _builder()


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    run = BUILD.build(tmp_path_factory.mktemp("study"))
    out = tmp_path_factory.mktemp("report")
    md, html = write_report(run, out)
    return run, out, md.read_text(), html.read_text()


def _two_scorers() -> dict:
    """The fixture plus a `wanda-sp` twin of each selective humaneval row, 15 points lower."""
    data = copy.deepcopy(BUILD.load())
    cols = data["columns"]
    extra = []
    for values in data["rows"]:
        row = dict(zip(cols, values))
        if row["strategy"] == "selective" and row["task"] == "humaneval" and not row["recovered"]:
            row.update(variant=row["variant"].replace("selectivity", "wanda-sp"), scorer="wanda-sp",
                       accuracy=round(row["accuracy"] - 0.15, 2))
            extra.append([row[c] for c in cols])
    data["rows"] += extra
    return data


@pytest.fixture(scope="module")
def partial(tmp_path_factory):
    """No recovery, no similarity, no layers.json, no config.yaml, no items; two scorers."""
    data = _two_scorers()
    data["items"] = {}
    run = BUILD.build(tmp_path_factory.mktemp("partial"), data, layers=False, config=False,
                      drop=lambda r: bool(r["recovered"]) or r["task"] in SIM)
    md, html = write_report(run)  # default out_dir: the study directory
    return run, md.read_text(), html.read_text()


def _row(md: str, label: str, after: str = "") -> str:
    """The first Markdown table row starting with `| label |` after the text `after`."""
    start = md.index(after) if after else 0
    m = re.search(r"^\| " + re.escape(label) + r" \|.*$", md[start:], re.M)
    assert m, f"no row {label!r} after {after!r}"
    return m.group(0)


# ---------------------------------------------------------------------------------------------
# The full fixture


def test_header_and_baseline(full):
    _, _, md, _ = full
    assert "Qwen/Qwen2.5-Coder-0.5B-Instruct" in md
    assert "**Target:** mbpp" in md and "squad,chitchat" in md
    assert "**Tasks:** humaneval, gsm8k, squad-sim, dialogue-sim" in md
    assert "33 rows (11 model variants x task)" in md
    assert "| humaneval | accuracy | 60.0% |" in md
    assert "| gsm8k | accuracy | 50.0% |" in md


def test_accuracy_table(full):
    md = full[2]
    sec = "humaneval: accuracy (%)"
    assert "| Strategy | 5% | 10% |" in md
    assert _row(md, "selective", sec) == "| selective | 55.0 | 45.0 |"
    assert _row(md, "reverse", sec) == "| reverse | 30.0 | 10.0 |"
    # random: seeds 42 and 33 at 5%: 50% and 65% -> mean 57.5; at 10%: 40% and 25% -> 32.5
    mean05, mean10 = (50.0 + 65.0) / 2, (40.0 + 25.0) / 2
    assert _row(md, "random (mean of seeds 42, 33) [min–max]", sec) == (
        f"| random (mean of seeds 42, 33) [min–max] | {mean05:.1f} [50.0–65.0] | {mean10:.1f} [25.0–40.0] |")
    # gsm8k has no 5% reverse row: a dash, not a crash
    assert _row(md, "reverse", "gsm8k: accuracy (%)") == "| reverse | – | 0.0 |"


def test_trap_table(full):
    md = full[2]
    sec = "humaneval: trap % (Type 1 / Type 2)"
    assert _row(md, "selective", sec) == "| selective | 10.0 (5.0 / 5.0) | 20.0 (10.0 / 10.0) |"
    assert _row(md, "random (mean of seeds 42, 33) [min–max]", sec) == (
        "| random (mean of seeds 42, 33) [min–max] | 10.0 [5.0–15.0] (7.5 / 2.5) | 30.0 [25.0–35.0] (17.5 / 12.5) |")
    assert "squad-sim: trap %" not in md  # similarity tasks without any trap are left out


def test_recovery_eq4(full):
    md = full[2]
    gain = (55.0 - 45.0) / 45.0 * 100  # eq. 4 by hand: 22.22...
    assert _row(md, "selective", "humaneval: accuracy after recovery").startswith(
        f"| selective | 10% | 45.0 | 55.0 | +{gain:.1f}% | +10.0 | [")  # then its interval and verdict
    # pruned accuracy 0 -> n/a, not a division error; gsm8k has no per-item scores here: no interval
    assert _row(md, "reverse", "gsm8k: accuracy after recovery") == "| reverse | 10% | 0.0 | 10.0 | n/a | +10.0 | n/a | n/a |"


def test_relative_loss_eq3(full):
    md = full[2]
    sec = "humaneval: relative accuracy loss"
    loss = lambda acc: (60.0 - acc) / 60.0 * 100  # noqa: E731  eq. 3 by hand
    assert _row(md, "selective", sec) == f"| selective | {loss(55):.1f} | {loss(45):.1f} |"  # 8.3, 25.0
    assert _row(md, "reverse", sec) == f"| reverse | {loss(30):.1f} | {loss(10):.1f} |"  # 50.0, 83.3
    m05 = (loss(50) + loss(65)) / 2  # 4.2, range -8.3..16.7
    assert _row(md, "random (mean of seeds 42, 33) [min–max]", sec).startswith(
        f"| random (mean of seeds 42, 33) [min–max] | {m05:.1f} [{loss(65):.1f}–{loss(50):.1f}] |")


def _independent_ci(a: str, b: str) -> tuple[float, float]:
    """The documented bootstrap, re-implemented: 2000 resamples of item ids, numpy seed 0."""
    diff = (np.array([int(c) for c in a]) - np.array([int(c) for c in b])) * 100.0
    idx = np.random.default_rng(0).integers(0, len(diff), size=(2000, len(diff)))
    return tuple(np.percentile(diff[idx].mean(axis=1), [2.5, 97.5]))


def test_delta_eq5_with_bootstrap(full):
    md = full[2]
    items = BUILD.load()["items"]["humaneval"]
    # eq. 5 by hand: selective 55% - random seed 42 50% = +5.0 points at 5%; 45 - 25 = +20.0 (seed 33) at 10%
    lo, hi = _independent_ci(items["selective-selectivity-r0.05"], items["random-r0.05-s42"])
    assert (round(lo, 1), round(hi, 1)) == (-10.0, 20.0)
    assert ("At 5%, selective is not distinguishable from random (seed 42: +5.0 points, 95% CI [-10.0, +20.0])"
            in md)
    lo, hi = _independent_ci(items["selective-selectivity-r0.1"], items["random-r0.1-s33"])
    assert (round(lo, 1), round(hi, 1)) == (5.0, 40.0)
    assert "At 10%, selective is better than random (seed 33: +20.0 points, 95% CI [+5.0, +40.0])" in md
    assert "At 5%, selective is not distinguishable from random (seed 33: -10.0 points, 95% CI [-30.0, +10.0])" in md
    # selective vs reverse
    assert "At 5%, selective is better than reverse (+25.0 points, 95% CI [+5.0, +50.0])" in md
    assert "| 10% | selective − random (seed 33) | +20.0 | [+5.0, +40.0] | 20 | better |" in md
    # gsm8k has no items: the delta without an interval
    assert "gsm8k has no per-item scores: the deltas are shown without confidence intervals." in md
    assert "| 10% | selective − reverse | +30.0 | n/a | – | n/a |" in md


def test_similarity_and_resources_and_layers(full):
    md = full[2]
    assert _row(md, "selective", "squad-sim: similarity") == "| selective | 0.910 | 0.850 |"
    mean = (0.91 + 0.87) / 2
    assert _row(md, "selective", "semantic similarity (mean): similarity") == f"| selective | {mean:.3f} | 0.820 |"
    assert _row(md, "random (mean of seeds 42, 33) [min–max]", "semantic similarity (mean): similarity") == (
        "| random (mean of seeds 42, 33) [min–max] | 0.790 [0.780–0.800] | 0.655 [0.640–0.670] |")
    # resources: baseline first, then the selective variants; GiB = bytes / 2**30
    assert _row(md, "baseline", "## Resources") == (
        f"| baseline | 0% | 494,032,768 | 100.0% | {1183632589 / 2**30:.2f} | {1288490189 / 2**30:.2f} | 41.5 | 320.0 |")
    assert _row(md, "selective", "## Resources") == (
        f"| selective | 5% (4.78%) | 478,224,384 | {100 * 478224384 / 494032768:.1f}% | 1.06 | 1.16 | 43.0 | 330.0 |")
    # layers.json: 4 layers, per-layer share of target-leaning neurons
    assert "| 2 | 150 | 40 | 78.9% |" in md
    assert "| all | 420 | 370 | 53.2% |" in md
    assert "One scorer in this study" in md


def test_html_self_contained(full):
    run, out, md, html = full
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["report-accuracy.png", "report-layers.png", "report-recovery.png", "report-similarity.png",
                    "report-traps.png"]
    for name in pngs:  # Markdown references the PNGs beside it
        assert f"]({name})" in md
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert html.count('<img src="data:image/png;base64,') == len(pngs)
    stripped = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", html)
    assert "http" not in stripped
    assert "<link" not in stripped and "<script" not in stripped and "url(" not in stripped
    assert re.findall(r'src="([^"]*)"', stripped) == [""] * len(pngs)
    assert "<table>" in html and "<style>" in html
    assert "not distinguishable from random" in html
    assert not (run / "report.md").exists()  # out_dir given: nothing written into the study


# ---------------------------------------------------------------------------------------------
# A study without recovery, similarity, layers or items, with two scorers


def test_partial_study_renders_with_notes(partial):
    run, md, html = partial
    assert (run / "report.md").is_file() and (run / "report.html").is_file()
    assert "No recovered variants in this study" in md
    assert "No similarity results" in md
    assert "No layers.json" in md
    assert "no per-item scores" in md  # comparisons without items: deltas, no interval
    assert not (run / "report-recovery.png").exists() and not (run / "report-layers.png").exists()
    # two scorers: strategy rows name their scorer, and the scorer x ratio table appears
    assert _row(md, "selective (selectivity)", "humaneval: accuracy (%)") == "| selective (selectivity) | 55.0 | 45.0 |"
    assert _row(md, "selective (wanda-sp)", "humaneval: accuracy (%)") == "| selective (wanda-sp) | 40.0 | 30.0 |"
    sec = "humaneval: accuracy (%) per scorer"
    assert _row(md, "wanda-sp", sec) == "| wanda-sp | 40.0 | 30.0 |"
    assert _row(md, "random (mean of seeds 42, 33) [min–max]", sec).endswith("| 32.5 [25.0–40.0] |")
    assert "](report-scorers.png)" in md and (run / "report-scorers.png").is_file()
    assert "![Selective accuracy per scorer vs pruning ratio (random: mean of seeds, band" in md  # two ratios: lines
    assert html.count('<img src="data:image/png;base64,') == len(list(run.glob("report-*.png")))


def test_scorer_summary_puts_every_metric_side_by_side(tmp_path):
    run = BUILD.build(tmp_path / "run", _two_scorers())
    md, _ = write_report(run)
    text = md.read_text()
    sec = "All metrics per scorer at 10%"
    assert _row(text, "Scorer", sec) == ("| Scorer | humaneval acc (%) | humaneval trap (%) | gsm8k acc (%) | "
                                         "gsm8k trap (%) | squad-sim | dialogue-sim | semantic similarity (mean) |")
    assert _row(text, "unpruned", sec) == "| unpruned | 60.0 | 5.0 | 50.0 | 0.0 | 1.000 | 1.000 | 1.000 |"
    assert _row(text, "selectivity", sec) == "| selectivity | 45.0 | 20.0 | 30.0 | 10.0 | 0.850 | 0.790 | 0.820 |"
    assert _row(text, "wanda-sp", sec) == "| wanda-sp | 30.0 | 20.0 | – | – | – | – | – |"
    assert _row(text, "random (mean of seeds 42, 33) [min–max]", sec) == (
        "| random (mean of seeds 42, 33) [min–max] | 32.5 [25.0–40.0] | 30.0 [25.0–35.0] | – | – | "
        "0.690 [0.680–0.700] | 0.620 [0.600–0.640] | 0.655 [0.640–0.670] |")
    # one scorer: no summary
    assert "All metrics per scorer" not in write_report(BUILD.build(tmp_path / "one"))[0].read_text()


def test_missing_database(tmp_path):
    with pytest.raises(FileNotFoundError, match="results"):
        write_report(tmp_path)


# ---------------------------------------------------------------------------------------------
# Pure functions


def test_bootstrap_identical_variants():
    a = {f"i{k}": float(k % 2) for k in range(30)}
    delta, lo, hi, n = T.paired_bootstrap(a, dict(a))
    assert (delta, lo, hi, n) == (0.0, 0.0, 0.0, 30)


def test_bootstrap_better_everywhere():
    a = {f"i{k}": 1.0 for k in range(20)}
    b = {f"i{k}": 0.0 for k in range(20)}
    delta, lo, hi, _ = T.paired_bootstrap(a, b)
    assert delta == 100.0 and lo > 0 and hi > 0
    # better on 8 items, equal on the rest: still entirely above 0
    b = {f"i{k}": (0.0 if k < 8 else 1.0) for k in range(20)}
    delta, lo, hi, _ = T.paired_bootstrap(a, b)
    assert delta == pytest.approx(40.0) and 0 < lo < 40 < hi


def test_bootstrap_pairs_on_common_items_only_and_is_deterministic():
    a = {"x": 1.0, "y": 0.0, "z": 1.0, "only-a": 1.0}
    b = {"x": 0.0, "y": 0.0, "z": 1.0, "only-b": 0.0}
    r1, r2 = T.paired_bootstrap(a, b), T.paired_bootstrap(a, b)
    assert r1 == r2 and r1[3] == 3 and r1[0] == pytest.approx(100 / 3)
    assert T.paired_bootstrap({"x": 1.0}, {"y": 1.0}) is None


def test_equations():
    assert T.relative_loss(0.6, 0.45) == pytest.approx(25.0)
    assert T.relative_loss(0.0, 0.1) is None
    assert T.relative_gain(45.0, 55.0) == pytest.approx(22.2222, abs=1e-3)
    assert T.relative_gain(0.0, 10.0) is None
    assert T.relative_gain(None, 10.0) is None


def test_verdicts_and_sentence():
    c = T.Comparison("humaneval", 0.05, "selective", "random", 42, 1.2, (-3.0, 5.5), 20)
    assert c.verdict == "not distinguishable"
    assert sentence(c) == ("At 5%, selective is not distinguishable from random "
                           "(seed 42: +1.2 points, 95% CI [-3.0, +5.5])")
    assert T.Comparison("t", 0.1, "selective", "random", 33, 9.0, (2.0, 15.0)).verdict == "better"
    worse = T.Comparison("t", 0.2, "selective", "reverse", None, -9.0, (-15.0, -0.5))
    assert worse.verdict == "worse"
    assert sentence(worse) == "At 20%, selective is worse than reverse (-9.0 points, 95% CI [-15.0, -0.5])"
    assert T.Comparison("t", 0.2, "selective", "random", 42, 0.0, (0.0, 0.0)).verdict == "not distinguishable"


def _r(variant, strategy, ratio, acc, seed=None, scorer="selectivity", recovered=0, task="humaneval"):
    return {"variant": variant, "task": task, "strategy": strategy, "scorer": None if strategy == "random" else scorer,
            "seed": seed, "ratio_nominal": ratio, "ratio_exact": ratio, "recovered": recovered, "accuracy": acc,
            "similarity": None}


def test_grid_random_mean_and_range_in_seed_order():
    rows = [_r("base", "none", 0.0, 0.5, scorer=None), _r("sel", "selective", 0.05, 0.4),
            _r("r42", "random", 0.05, 0.3, seed=42), _r("r33", "random", 0.05, 0.2, seed=33),
            _r("r42b", "random", 0.1, 0.1, seed=42)]
    g = T.accuracy_grid(rows, "humaneval")
    assert g.baseline == 50.0 and g.ratios == [0.05, 0.1]
    assert [r.label for r in g.rows] == ["selective", "random (mean of seeds 42, 33) [min–max]"]
    cell = g.row("random").cells[0.05]
    assert cell.value == pytest.approx(25.0) and (cell.lo, cell.hi) == pytest.approx((20.0, 30.0)) and cell.spread
    assert not g.row("random").cells[0.1].spread  # one seed at 10%: a plain value


def test_scorer_plot_at_one_ratio_is_a_bar_per_scorer():
    from taskprune.report import plots
    rows = [_r("base", "none", 0.0, 0.5, scorer=None), _r("sel", "selective", 0.05, 0.4),
            _r("wsp", "selective", 0.05, 0.45, scorer="wanda-sp"),
            _r("r42", "random", 0.05, 0.3, seed=42), _r("r33", "random", 0.05, 0.2, seed=33)]
    g = T.scorer_grid(rows, "humaneval")
    assert g.ratios == [0.05] and [r.label for r in g.rows][:2] == ["selectivity", "wanda-sp"]
    png = plots.grid_plot([g], "accuracy", "Scorer comparison", by_scorer=True)
    assert png.startswith(b"\x89PNG") and png == plots._scorer_bars([g], "accuracy", "Scorer comparison", True, None)
    two = T.scorer_grid(rows + [_r("sel10", "selective", 0.1, 0.3)], "humaneval")  # two ratios: lines
    assert plots.grid_plot([two], "accuracy", "Scorer comparison", by_scorer=True) != \
        plots._scorer_bars([two], "accuracy", "Scorer comparison", True, None)


def test_scorer_figure_caption_at_one_ratio_names_the_bars(tmp_path):
    run = BUILD.build(tmp_path / "run", _two_scorers(), drop=lambda r: r["ratio_nominal"] not in (0.0, 0.1))
    text = write_report(run)[0].read_text()
    assert "![Selective accuracy per scorer (random: mean of seeds, whisker = min–max)](report-scorers.png)" in text


def test_recovery_pairs_with_its_pruned_twin():
    rows = [_r("sel", "selective", 0.1, 0.45), _r("sel-rec", "selective", 0.1, 0.55, recovered=1),
            _r("r42", "random", 0.1, 0.40, seed=42), _r("r33", "random", 0.1, 0.20, seed=33),
            _r("r33-rec", "random", 0.1, 0.30, seed=33, recovered=1)]
    table = T.recovery_table(rows, "humaneval")
    assert [r.label for r in table] == ["selective", "random (seed 33)"]
    assert [v for r in table for v in (r.pruned, r.recovered)] == pytest.approx([45.0, 55.0, 20.0, 30.0])
    assert table[1].gain == pytest.approx(50.0)
    assert table[0].ci is None and table[0].verdict is None  # no per-item scores: no interval


def test_recovery_difference_has_a_paired_interval_over_the_items_both_answered():
    rows = [_r("sel", "selective", 0.1, 0.2), _r("sel-rec", "selective", 0.1, 0.5, recovered=1),
            _r("r42", "random", 0.1, 0.40, seed=42), _r("r42-rec", "random", 0.1, 0.40, seed=42, recovered=1)]
    ids = [f"t{i}" for i in range(40)]
    items = {"sel": {i: float(k < 8) for k, i in enumerate(ids)},  # 8/40 right
             "sel-rec": {i: float(k < 20) for k, i in enumerate(ids)},  # the same 8 and 12 more: +30 points
             "r42": {i: float(k % 2) for k, i in enumerate(ids)},  # 20/40, and recovery swaps which 20
             "r42-rec": {i: float(1 - k % 2) for k, i in enumerate(ids[:-1])}}  # one item unanswered
    sel, rnd = T.recovery_table(rows, "humaneval", items)
    assert sel.delta == pytest.approx(30.0) and sel.n_items == 40 and sel.verdict == "better"
    assert 5.0 < sel.ci[0] < 30.0 < sel.ci[1] < 50.0  # 12 of 40 items gained: the interval excludes 0
    assert rnd.n_items == 39 and rnd.ci[0] < 0 < rnd.ci[1] and rnd.verdict == "not distinguishable"


def test_layer_table():
    rows = T.layer_table({"scorer": "selectivity", "layers": [[3, 1], [0, 0]]})
    assert [(r.layer, r.target, r.distractor, r.target_share) for r in rows] == [(0, 3, 1, 75.0), (1, 0, 0, None)]
    assert T.layer_table(None) == [] and T.layer_table({"layers": "bad"}) == []


REFERENCE = """
paper: arXiv 0000.00000
model: Test-Coder
task: humaneval
tables:
  3a: {caption: "Table 3a", strategy: selective, metric: accuracy, original: 62.8, ratios: {0.05: 47.5, 0.10: 45.0, 0.20: 30.0}}
  4b: {caption: "Table 4b", strategy: selective, recovered: true, metric: trap_pct, ratios: {0.10: 0.5}}
  rnd: {caption: "Random", strategy: random, metric: accuracy, ratios: {0.10: 20.0}}
  5: {caption: "Table 5", metric: peak_memory_gib, original: 2.90, ratios: {0.10: 2.0}}
claims: [random is below selective at every ratio]
"""


def test_reference_numbers_beside_ours(tmp_path):
    from taskprune.report.reference import load_reference
    run = BUILD.build(tmp_path / "study")
    ref_file = tmp_path / "ref.yaml"
    ref_file.write_text(REFERENCE)
    ref = load_reference(ref_file, T.load_study(run).rows)
    t3a, t4b, rnd, t5 = ref.tables
    assert [(r.ratio, r.paper, r.ours) for r in t3a.rows] == [
        (None, 62.8, pytest.approx(60.0)), (0.05, 47.5, pytest.approx(55.0)), (0.1, 45.0, pytest.approx(45.0)),
        (0.2, 30.0, None)]  # no 20% variant in the study: no value, no difference
    assert t3a.rows[1].difference == pytest.approx(7.5) and t3a.rows[3].difference is None
    assert [(r.ratio, r.ours) for r in t4b.rows] == [(0.1, 10.0)]  # the recovered variant's traps
    assert rnd.rows[0].ours == pytest.approx((40.0 + 25.0) / 2)  # mean over the seeds
    # Table 5 is at batch 1: the batch-1 peak, not the evaluation batch's (1288490189 and 1202590843 bytes)
    assert t5.rows[0].ours == pytest.approx(1183632589 / 2**30) and t5.rows[1].ours == pytest.approx(1097733243 / 2**30)
    md, _ = write_report(run, tmp_path / "out", reference=ref_file)
    text = md.read_text()
    assert "## Against the paper (arXiv 0000.00000)" in text
    assert "| 5% | 47.5 | 55.0 | +7.5 |" in text and "random is below selective at every ratio" in text
    plain, _ = write_report(run, tmp_path / "plain")
    assert "Against the paper" not in plain.read_text()


@pytest.mark.parametrize("option, name, content, message", [
    ("--reference", "ref.yaml", "task: humaneval\ntables: {3a: {metric: wrong}}\n",
     "tables.3a.metric must be one of accuracy"),
    ("--benchmark", "bench.json", '{"benchmark": "x"}', "is not a taskprune benchmark result"),
    ("--benchmark", "none.json", None, "does not exist"),
])
def test_a_bad_report_input_file_is_one_line(tmp_path, capsys, option, name, content, message):
    from taskprune.cli import main
    run = BUILD.build(tmp_path / "study")
    bad = tmp_path / name
    if content is not None:
        bad.write_text(content)
    assert main(["report", str(run), option, str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_task_kind_is_the_stored_one_else_derived_from_the_values():
    from taskprune.report.tables import accuracy_tasks, task_kind
    old = [{"task": "humaneval", "accuracy": 0.5, "similarity": None, "kind": None},
           {"task": "squad-sim", "accuracy": None, "similarity": 0.9}]
    new = [{"task": "mc:arc-easy", "accuracy": 0.5, "similarity": None, "kind": "multiple-choice"},
           {"task": "dialogue-sim", "accuracy": None, "similarity": None, "kind": "similarity"}]
    rows = old + new
    assert [task_kind(rows, t) for t in ("humaneval", "squad-sim", "mc:arc-easy", "dialogue-sim")] == [
        "accuracy", "similarity", "multiple-choice", "similarity"]
    assert accuracy_tasks(rows) == ["humaneval", "mc:arc-easy"]


def _speedup_rows() -> list[dict]:
    """Two ratios x two engines, as benchmarks/pruned_speedup.py writes them."""
    rows = []
    for ratio, width, ideal in ((0.05, 4608, 1.04), (0.35, 3072, 1.30)):
        for column, up in (("hf batch 1", 1 + 0.75 * (ideal - 1)), ("llama.cpp f32 batch 1", 1 + 0.9 * (ideal - 1))):
            rows.append({"column": column, "variant": f"{ratio:.0%} (d_ff {width})", "model": "tiny", "ratio": ratio,
                         "kept_width": width, "tokens_per_s": 10 * up, "unpruned_tokens_per_s": 10.0,
                         "speedup": up, "ideal": ideal, "share_of_ideal": (up - 1) / (ideal - 1)})
    return rows


def test_speed_section_shows_benchmarks_beside_the_study(tmp_path, monkeypatch):
    from taskprune.report.speed import FOLDER, Headline, read_benchmark, write_benchmark
    run = BUILD.build(tmp_path / "study")
    monkeypatch.setattr("sys.argv", ["benchmarks/pruned_speedup.py", "--prompts", "2"])
    own = write_benchmark(run / FOLDER / "speedup.json", "pruned_speedup",
                          [Headline("hf batch 1: share of the ideal gain", 0.75, 0.8, "share")], _speedup_rows())
    extra = write_benchmark(tmp_path / "surgery.json", "surgery_memory",
                            [Headline("peak RSS / largest shard", 1.6, 2.15, "x", higher_is_better=False),
                             Headline("verdicts equal", 100 * 4223 / 4224, 99.0, "%")])
    back = read_benchmark(own)
    assert back.name == "pruned_speedup" and back.command.endswith(" benchmarks/pruned_speedup.py --prompts 2")
    assert back.headline[0].met is False and read_benchmark(extra).headline[0].met is True
    text = write_report(run, tmp_path / "out", benchmarks=[extra])[0].read_text()
    speed = text[text.index("## Speed"):]
    # the 5% row: the study's selective 5% parameters share (478,224,384 of 494,032,768) and batch-1 peak memory
    assert _row(speed, "5%") == (f"| 5% | 4608 | {100 * 478224384 / 494032768:.1f}% | 1.06 | 1.040x | "
                                 f"1.030x (0.75) | 1.036x (0.90) |")
    assert _row(speed, "35%") == "| 35% | 3072 | – | – | 1.300x | 1.225x (0.75) | 1.270x (0.90) |"
    assert "| pruned_speedup | hf batch 1: share of the ideal gain | 0.75 | ≥ 0.8 ✗ |" in speed
    assert "| surgery_memory | peak RSS / largest shard | 1.6x | ≤ 2.15 ✓ |" in speed
    assert "| surgery_memory | verdicts equal | 99.98% | ≥ 99 ✓ |" in speed  # not rounded up to 100%
    assert "## Speed" not in write_report(BUILD.build(tmp_path / "bare"), tmp_path / "bare-out")[0].read_text()


def test_two_capture_contents_are_kept_apart_like_two_scorers():
    def cap(row, content):
        return {**row, "capture": f"chat/{content}"}

    both = "chat/prompt,prompt+response"  # what the baseline and random rows of such a study store
    rows = [cap(_r("base", "none", 0.0, 0.5, scorer=None), "prompt,prompt+response"),
            cap(_r("sel-p", "selective", 0.05, 0.2), "prompt"), cap(_r("sel-pr", "selective", 0.05, 0.45), "prompt+response"),
            cap(_r("sel-pr-rec", "selective", 0.05, 0.5, recovered=1), "prompt+response"),
            cap(_r("r42", "random", 0.05, 0.3, seed=42), "prompt,prompt+response")]
    rows = T.by_capture(rows)
    assert rows[-1]["capture"] == both and rows[-1]["scorer"] is None  # random rows keep no scorer
    g = T.accuracy_grid(rows, "humaneval")
    assert [r.label for r in g.rows] == ["selective (selectivity on prompt)", "selective (selectivity on prompt+response)",
                                         "random (seed 42)"]
    assert [g.rows[i].cells[0.05].value for i in range(3)] == pytest.approx([20.0, 45.0, 30.0])
    assert [r.label for r in T.scorer_grid(rows, "humaneval").rows][:2] == ["selectivity on prompt",
                                                                             "selectivity on prompt+response"]
    comps = {(c.a, c.b): c.delta for c in T.comparisons(rows, {}, "humaneval")}
    assert comps == pytest.approx({("selective (selectivity on prompt)", "random"): -10.0,
                                   ("selective (selectivity on prompt+response)", "random"): 15.0})
    [rec] = T.recovery_table(rows, "humaneval")  # paired with its own capture's pruned cell
    assert (rec.label, rec.pruned, rec.recovered) == ("selective (selectivity on prompt+response)",
                                                      pytest.approx(45.0), pytest.approx(50.0))
    one = [cap(_r("sel", "selective", 0.05, 0.2), "prompt"), cap(_r("r42", "random", 0.05, 0.3, seed=42), "prompt")]
    assert T.by_capture(one) == one  # one capture: scorers as stored


def test_a_strategys_second_row_is_drawn_in_a_color_of_its_own():
    from taskprune.report import plots
    rows = [_r("sel-p", "selective", 0.05, 0.2), _r("sel-pr", "selective", 0.05, 0.45, scorer="selectivity on x"),
            _r("rev", "reverse", 0.05, 0.0), _r("r42", "random", 0.05, 0.3, seed=42)]
    colors = plots.row_colors(T.accuracy_grid(rows, "humaneval").rows)
    assert colors[0] == plots.COLORS["selective"] and colors[2] == plots.COLORS["reverse"]
    assert colors[3] == plots.COLORS["random"] and len(set(colors)) == 4
