"""The numbers of a study report, as pure functions of the `results` rows (and `items` scores).

Nothing here formats or draws: every function takes plain rows (dicts with the columns of
:mod:`taskprune.results`) and returns small dataclasses that :mod:`.render` turns into tables and
:mod:`.plots` into figures.

Conventions (see :mod:`taskprune.results`): the unpruned baseline has ``strategy="none"`` and
``ratio_nominal=0``; pruned variants have ``strategy`` in selective|reverse|random, a ``scorer``
(None for random), a ``seed`` (random only) and ``recovered`` 0/1. Accuracy is stored as a
fraction (0..1) and reported here in percent; trap columns are already percentages; similarity
stays in 0..1.

Equations (numbered as in the paper):

* eq. 3, relative accuracy loss: ``(acc_base - acc_pruned) / acc_base * 100``;
* eq. 4, relative gain after recovery: ``(acc_recovered - acc_pruned) / acc_pruned * 100``
  (None, shown "n/a", when ``acc_pruned == 0``);
* eq. 5, ``acc_selective - acc_random(seed)`` in percentage points, with a paired bootstrap 95%
  interval over benchmark items (:func:`paired_bootstrap`).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
import numpy as np

from taskprune.results import results_errors

BASELINE = "none"
STRATEGY_ORDER = ("selective", "reverse", "random")
TASK_ORDER = ("humaneval", "mbpp", "gsm8k", "squad-sim", "dialogue-sim")  # the paper's; other tasks follow by name
ACCURACY_KINDS = ("accuracy", "multiple-choice")  # kinds whose score is the `accuracy` column (a fraction)
SIMILARITY_MEAN = "semantic similarity (mean)"
N_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


# ---------------------------------------------------------------------------------------------
# Loading


@dataclass
class Study:
    """Everything a report is made from."""

    run_dir: Path
    rows: list[dict]
    items: dict[str, dict[str, dict[str, float]]]  # task -> variant -> item_id -> score
    layers: dict | None = None  # layers.json
    config: dict | None = None  # config.yaml


def load_rows(db: Path) -> tuple[list[dict], dict[str, dict[str, dict[str, float]]]]:
    """`results` rows in insertion order and `items` as ``{task: {variant: {item_id: score}}}``."""
    if not Path(db).is_file():
        raise FileNotFoundError(f"no results database at {db}")
    with results_errors(Path(db)), closing(sqlite3.connect(db, timeout=30)) as con:
        con.row_factory = sqlite3.Row
        rows = [dict(r) for r in con.execute("SELECT * FROM results ORDER BY rowid")]
        items: dict[str, dict[str, dict[str, float]]] = {}
        for r in con.execute("SELECT variant, task, item_id, score FROM items ORDER BY rowid"):
            items.setdefault(r["task"], {}).setdefault(r["variant"], {})[r["item_id"]] = r["score"]
    return rows, items


def load_study(run_dir: str | Path) -> Study:
    run_dir = Path(run_dir)
    rows, items = load_rows(run_dir / "results.sqlite")
    rows = by_capture(rows)
    layers = config = None
    if (run_dir / "layers.json").is_file():
        layers = json.loads((run_dir / "layers.json").read_text())
    if (run_dir / "config.yaml").is_file():
        import yaml

        config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    return Study(run_dir, rows, items, layers, config)


# ---------------------------------------------------------------------------------------------
# Small helpers


def method(scorer: str, content: str) -> str:
    """A scored cell's method where a study compares capture contents: its scorer on its capture."""
    return f"{scorer} on {content}"


def by_capture(rows: list[dict]) -> list[dict]:
    """`rows`, where the scored (selective, reverse) rows come from more than one capture content, with each
    such row's scorer named with its content (`method`): every table then keeps the captures apart as it keeps
    scorers apart, and the scorer x ratio table compares them."""
    def scored(r: dict) -> bool:
        return not is_baseline(r) and r["strategy"] != "random" and bool(r.get("scorer")) and bool(r.get("capture"))

    if len({r["capture"] for r in rows if scored(r)}) < 2:
        return rows
    return [{**r, "scorer": method(r["scorer"], r["capture"].split("/", 1)[-1])} if scored(r) else r for r in rows]


def rkey(ratio: float | None) -> float:
    """A ratio as a dictionary key (float noise removed)."""
    return round(float(ratio or 0.0), 6)


def is_baseline(row: dict) -> bool:
    return row["strategy"] == BASELINE


def _order(values: Iterable[str], preferred: tuple[str, ...]) -> list[str]:
    values = list(dict.fromkeys(values))
    return [v for v in preferred if v in values] + sorted(v for v in values if v not in preferred)


def tasks(rows: list[dict]) -> list[str]:
    return _order((r["task"] for r in rows), TASK_ORDER)


def task_kind(rows: list[dict], task: str) -> str | None:
    """One task's kind as its rows store it ("accuracy", "similarity", "multiple-choice"); for rows stored
    before the `kind` column, "accuracy" or "similarity" by which value is set, or None (no value at all)."""
    mine = [r for r in rows if r["task"] == task]
    stored = next((r["kind"] for r in mine if r.get("kind")), None)
    if stored is not None:
        return stored
    if any(r.get("accuracy") is not None for r in mine):
        return "accuracy"
    if any(r.get("similarity") is not None for r in mine):
        return "similarity"
    return None


def accuracy_tasks(rows: list[dict]) -> list[str]:
    return [t for t in tasks(rows) if task_kind(rows, t) in ACCURACY_KINDS]


def similarity_tasks(rows: list[dict]) -> list[str]:
    return [t for t in tasks(rows) if task_kind(rows, t) == "similarity"]


def ratios(rows: list[dict]) -> list[float]:
    return sorted({rkey(r["ratio_nominal"]) for r in rows if not is_baseline(r) and rkey(r["ratio_nominal"]) > 0})


def scorers(rows: list[dict]) -> list[str]:
    """Scorers of the non-random pruned rows, in order of first appearance."""
    return list(dict.fromkeys(r["scorer"] for r in rows
                              if not is_baseline(r) and r["strategy"] != "random" and r.get("scorer")))


def seeds(rows: list[dict], strategy: str = "random") -> list[int]:
    """Seeds of a strategy's rows in order of first appearance (the run order, e.g. 42 then 33)."""
    return list(dict.fromkeys(r["seed"] for r in rows if r["strategy"] == strategy and r.get("seed") is not None))


def baseline_row(rows: list[dict], task: str) -> dict | None:
    return next((r for r in rows if r["task"] == task and is_baseline(r)), None)


def baseline_value(rows: list[dict], task: str, column: str = "accuracy") -> float | None:
    row = baseline_row(rows, task)
    return None if row is None else row.get(column)


def percent(value: float | None) -> float | None:
    return None if value is None else 100.0 * value


def relative_loss(acc_base: float | None, acc_pruned: float | None) -> float | None:
    """Eq. 3: ``(acc_base - acc_pruned) / acc_base * 100`` (None when undefined)."""
    if acc_base is None or acc_pruned is None or acc_base == 0:
        return None
    return (acc_base - acc_pruned) / acc_base * 100.0


def relative_gain(acc_pruned: float | None, acc_recovered: float | None) -> float | None:
    """Eq. 4: ``(acc_recovered - acc_pruned) / acc_pruned * 100``; None ("n/a") when acc_pruned is 0."""
    if acc_pruned is None or acc_recovered is None or acc_pruned == 0:
        return None
    return (acc_recovered - acc_pruned) / acc_pruned * 100.0


def study_info(rows: list[dict], config: dict | None = None) -> dict:
    """Model, target, distractors, capture, tasks, counts (rows first, config.yaml as fallback)."""
    config = config or {}

    def first(column: str):
        value = next((r[column] for r in rows if r.get(column)), None)
        if value is None:
            value = config.get(column)
            if isinstance(value, list):
                value = ",".join(str(v) for v in value)
        return value

    return {"model": first("model"), "target": first("target"), "distractors": first("distractors"),
            "capture": first("capture"), "tasks": tasks(rows), "n_rows": len(rows),
            "n_variants": len({r["variant"] for r in rows}), "scorers": scorers(rows), "ratios": ratios(rows),
            "seeds": seeds(rows), "strategies": _order((r["strategy"] for r in rows if not is_baseline(r)),
                                                         STRATEGY_ORDER)}


# ---------------------------------------------------------------------------------------------
# Strategy x ratio grids (Tables 3, 3b, 3 relative loss, similarity, scorer x ratio)


@dataclass
class Cell:
    """One strategy x ratio value: the mean over seeds (or the single value), with its range."""

    values: tuple[float, ...]

    @property
    def value(self) -> float | None:
        return sum(self.values) / len(self.values) if self.values else None

    @property
    def lo(self) -> float | None:
        return min(self.values) if self.values else None

    @property
    def hi(self) -> float | None:
        return max(self.values) if self.values else None

    @property
    def spread(self) -> bool:
        """True when the cell aggregates several seeds (then shown as mean [min-max])."""
        return len(self.values) > 1


@dataclass
class GridRow:
    label: str
    strategy: str
    scorer: str | None
    seeds: list[int]
    cells: dict[float, Cell]


@dataclass
class Grid:
    task: str
    ratios: list[float]
    rows: list[GridRow]
    baseline: float | None = None  # the unpruned value, same unit as the cells

    @property
    def empty(self) -> bool:
        return not any(c.values for row in self.rows for c in row.cells.values())

    def row(self, strategy: str, scorer: str | None = None) -> GridRow | None:
        return next((r for r in self.rows if r.strategy == strategy and (scorer is None or r.scorer == scorer)), None)


def strategy_label(strategy: str, scorer: str | None, seed_list: list[int], several_scorers: bool) -> str:
    if strategy == "random":
        if len(seed_list) > 1:
            return f"random (mean of seeds {', '.join(str(s) for s in seed_list)}) [min–max]"
        return f"random (seed {seed_list[0]})" if seed_list else "random"
    return f"{strategy} ({scorer})" if several_scorers and scorer else strategy


def grid(rows: list[dict], task: str, value: Callable[[dict], float | None], recovered: bool = False,
         strategies: Iterable[str] | None = None, label_by_scorer: bool = False,
         baseline: float | None = None) -> Grid:
    """Rows = strategy (x scorer when several), columns = ratio, cell = `value(row)` over seeds.

    Random rows are pooled over their seeds regardless of scorer (cell = mean, range = min-max).
    `label_by_scorer` labels non-random rows by their scorer alone (the scorer x ratio table).
    """
    mine = [r for r in rows if r["task"] == task and not is_baseline(r) and bool(r["recovered"]) == recovered]
    if strategies is not None:
        wanted = list(strategies)
        mine = [r for r in mine if r["strategy"] in wanted]
    several = len(scorers(rows)) > 1
    groups: dict[tuple[str, str | None], dict[float, list[tuple[int | None, float]]]] = {}
    for r in mine:
        key = (r["strategy"], None if r["strategy"] == "random" else r.get("scorer"))
        v = value(r)
        cells = groups.setdefault(key, {})
        if v is not None:
            cells.setdefault(rkey(r["ratio_nominal"]), []).append((r.get("seed"), float(v)))
    order = _order((k[0] for k in groups), STRATEGY_ORDER)
    score_order = scorers(rows)
    keys = sorted(groups, key=lambda k: (order.index(k[0]),
                                         score_order.index(k[1]) if k[1] in score_order else len(score_order)))
    all_seeds = seeds(rows)
    out_rows = []
    for strategy, scorer in keys:
        cells = groups[(strategy, scorer)]
        row_seeds = [s for s in all_seeds if any(s == seed for vals in cells.values() for seed, _ in vals)]
        if label_by_scorer and strategy != "random":
            label = scorer or strategy
        else:
            label = strategy_label(strategy, scorer, row_seeds, several)
        out_rows.append(GridRow(label, strategy, scorer, row_seeds,
                                {k: Cell(tuple(v for _, v in vals)) for k, vals in cells.items()}))
    present = sorted({k for g in groups.values() for k in g})
    return Grid(task, present, out_rows, baseline)


def accuracy_grid(rows: list[dict], task: str, recovered: bool = False) -> Grid:
    """Table 3: accuracy in % per strategy x ratio."""
    return grid(rows, task, lambda r: percent(r.get("accuracy")), recovered,
                baseline=percent(baseline_value(rows, task)))


def trap_grids(rows: list[dict], task: str, recovered: bool = False) -> dict[str, Grid]:
    """Table 3b: trap %, and its Type 1 / Type 2 split, per strategy x ratio."""
    base = baseline_row(rows, task) or {}
    return {col: grid(rows, task, lambda r, c=col: r.get(c), recovered, baseline=base.get(col))
            for col in ("trap_pct", "type1_pct", "type2_pct")}


def loss_grid(rows: list[dict], task: str) -> Grid:
    """Eq. 3 relative accuracy loss (%) per strategy x ratio, before recovery."""
    base = baseline_value(rows, task)
    return grid(rows, task, lambda r: relative_loss(base, r.get("accuracy")), baseline=0.0 if base else None)


def with_similarity_mean(rows: list[dict]) -> list[dict]:
    """`rows` plus one synthetic row per variant holding the mean of its similarity tasks (the paper's
    semantic similarity: squad-sim and dialogue-sim).

    The mean is only formed where there are at least two similarity tasks and a variant has them all.
    """
    sims = similarity_tasks(rows)
    by_variant: dict[str, dict[str, dict]] = {}
    for r in rows:
        if r["task"] in sims and r.get("similarity") is not None:
            by_variant.setdefault(r["variant"], {})[r["task"]] = r
    extra = []
    for variant, per_task in by_variant.items():
        if len(sims) > 1 and len(per_task) == len(sims):
            first = per_task[sims[0]]
            extra.append({**first, "task": SIMILARITY_MEAN, "accuracy": None,
                          "similarity": sum(r["similarity"] for r in per_task.values()) / len(per_task)})
    return rows + extra


def similarity_grids(rows: list[dict], recovered: bool = False) -> list[Grid]:
    """Distractor similarity per strategy x ratio: each similarity task (squad-sim, dialogue-sim) and their mean."""
    rows = with_similarity_mean(rows)
    names = [t for t in similarity_tasks(rows) if t != SIMILARITY_MEAN]
    if any(r["task"] == SIMILARITY_MEAN for r in rows):
        names.append(SIMILARITY_MEAN)
    out = []
    for t in names:
        g = grid(rows, t, lambda r: r.get("similarity"), recovered, baseline=baseline_value(rows, t, "similarity"))
        if not g.empty:
            out.append(g)
    return out


def scorer_grid(rows: list[dict], task: str, value: Callable[[dict], float | None] | None = None,
                baseline: float | None = None) -> Grid:
    """Scorer x ratio: `value` (default: accuracy in %, with its baseline) of selective pruning per
    scorer, with the random mean beside."""
    if value is None:
        value, baseline = (lambda r: percent(r.get("accuracy"))), percent(baseline_value(rows, task))
    return grid(rows, task, value, strategies=("selective", "random"), label_by_scorer=True, baseline=baseline)


@dataclass
class SummaryColumn:
    name: str  # e.g. "humaneval acc (%)"
    digits: int
    grid: Grid


def scorer_summary(rows: list[dict]) -> list[SummaryColumn]:
    """One column per metric for the scorer comparison: accuracy and trap % of each accuracy task,
    then each similarity task and their mean; rows = scorers (selective) and random, per ratio."""
    rows = with_similarity_mean(rows)
    out = []
    for t in accuracy_tasks(rows):
        out.append(SummaryColumn(f"{t} acc (%)", 1, scorer_grid(rows, t)))
        out.append(SummaryColumn(f"{t} trap (%)", 1, scorer_grid(rows, t, lambda r: r.get("trap_pct"),
                                                                 (baseline_row(rows, t) or {}).get("trap_pct"))))
    sims = [t for t in similarity_tasks(rows) if t != SIMILARITY_MEAN]
    if any(r["task"] == SIMILARITY_MEAN for r in rows):
        sims.append(SIMILARITY_MEAN)
    for t in sims:
        out.append(SummaryColumn(t, 3, scorer_grid(rows, t, lambda r: r.get("similarity"),
                                                   baseline_value(rows, t, "similarity"))))
    return [c for c in out if not c.grid.empty]


# ---------------------------------------------------------------------------------------------
# Recovery (Table 4)


@dataclass
class RecoveryRow:
    label: str
    strategy: str
    scorer: str | None
    seed: int | None
    ratio: float
    pruned: float | None  # accuracy in %
    recovered: float | None  # accuracy in %
    ci: tuple[float, float] | None = None  # paired bootstrap 95% interval of recovered - pruned, points
    n_items: int = 0

    @property
    def gain(self) -> float | None:
        """Eq. 4 in % (None = n/a)."""
        return relative_gain(self.pruned, self.recovered)

    @property
    def delta(self) -> float | None:
        """Recovered - pruned accuracy in points."""
        return None if self.pruned is None or self.recovered is None else self.recovered - self.pruned

    @property
    def verdict(self) -> str | None:
        """Recovery "better", "worse" or "not distinguishable" than the pruned model; None without an interval."""
        return interval_verdict(self.ci)


def _same_cell(a: dict, b: dict) -> bool:
    return (a["task"] == b["task"] and a["strategy"] == b["strategy"] and a.get("scorer") == b.get("scorer")
            and a.get("seed") == b.get("seed") and rkey(a["ratio_nominal"]) == rkey(b["ratio_nominal"]))


def recovery_table(rows: list[dict], task: str, items: dict[str, dict[str, float]] | None = None) -> list[RecoveryRow]:
    """Each recovered variant of `task` beside its pruned (unrecovered) counterpart, with the paired
    bootstrap interval of their difference where `items` (``{variant: {item_id: score}}``) has both."""
    items = items or {}
    several = len(scorers(rows)) > 1
    pruned = [r for r in rows if not is_baseline(r) and not r["recovered"]]
    out = []
    for r in rows:
        if r["task"] != task or is_baseline(r) or not r["recovered"] or r.get("accuracy") is None:
            continue
        twin = next((p for p in pruned if _same_cell(p, r)), None)
        if r["strategy"] == "random":
            label = f"random (seed {r.get('seed')})"
        else:
            label = strategy_label(r["strategy"], r.get("scorer"), [], several)
        row = RecoveryRow(label, r["strategy"], r.get("scorer"), r.get("seed"), rkey(r["ratio_nominal"]),
                          percent(twin.get("accuracy")) if twin else None, percent(r["accuracy"]))
        boot = paired_bootstrap(items.get(r["variant"], {}), items.get(twin["variant"], {})) if twin else None
        if boot is not None:
            row.ci, row.n_items = (boot[1], boot[2]), boot[3]
        out.append(row)
    order = _order((x.strategy for x in out), STRATEGY_ORDER)
    return sorted(out, key=lambda x: (x.ratio, order.index(x.strategy), x.label))


# ---------------------------------------------------------------------------------------------
# Paired comparisons (eq. 5) with a bootstrap over items


def paired_bootstrap(a: dict[str, float], b: dict[str, float], n_resamples: int = N_RESAMPLES,
                     seed: int = BOOTSTRAP_SEED, level: float = 0.95) -> tuple[float, float, float, int] | None:
    """Paired bootstrap of ``mean(a) - mean(b)`` over the items both variants scored, in points.

    Item ids common to both are sorted, resampled with replacement `n_resamples` times with
    ``numpy.random.default_rng(seed)``, and the percentile interval at `level` is returned with the
    observed mean difference: ``(delta, lo, hi, n_items)``, all x100 (points for 0/1 scores).
    None when no item is common.
    """
    common = sorted(set(a) & set(b))
    if not common:
        return None
    diff = np.array([float(a[i]) - float(b[i]) for i in common]) * 100.0
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diff), size=(n_resamples, len(diff)))
    means = diff[idx].mean(axis=1)
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(means, [tail, 100.0 - tail])
    return float(diff.mean()), float(lo), float(hi), len(common)


@dataclass
class Comparison:
    task: str
    ratio: float
    a: str  # e.g. "selective"
    b: str  # e.g. "random"
    seed: int | None  # the seed of b (random)
    delta: float | None  # eq. 5, points, from the stored accuracies
    ci: tuple[float, float] | None = None  # bootstrap 95% interval over common items, points
    n_items: int = 0

    @property
    def verdict(self) -> str | None:
        """"better", "worse", "not distinguishable", or None without an interval."""
        return interval_verdict(self.ci)


def interval_verdict(ci: tuple[float, float] | None) -> str | None:
    """"better" or "worse" when a 95% interval of a difference excludes 0, else "not distinguishable";
    None without an interval."""
    if ci is None:
        return None
    lo, hi = ci
    if lo > 0:
        return "better"
    if hi < 0:
        return "worse"
    return "not distinguishable"


def comparisons(rows: list[dict], items: dict[str, dict[str, float]], task: str) -> list[Comparison]:
    """Selective - random (per seed) and selective - reverse, per ratio, before recovery.

    `items` is ``{variant: {item_id: score}}`` for `task`. With several scorers, each scorer's
    selective variant is compared (with reverse of the same scorer).
    """
    mine = [r for r in rows if r["task"] == task and not is_baseline(r) and not r["recovered"]
            and r.get("accuracy") is not None]
    several = len(scorers(rows)) > 1
    out = []
    for ratio in ratios(mine):
        at = [r for r in mine if rkey(r["ratio_nominal"]) == ratio]
        for sel in (r for r in at if r["strategy"] == "selective"):
            a_label = strategy_label("selective", sel.get("scorer"), [], several)
            others = [r for r in at if r["strategy"] == "random"]
            others += [r for r in at if r["strategy"] == "reverse" and r.get("scorer") == sel.get("scorer")]
            for other in others:
                b_label = strategy_label(other["strategy"], other.get("scorer"), [], several)
                c = Comparison(task, ratio, a_label, b_label, other.get("seed") if other["strategy"] == "random" else None,
                               (sel["accuracy"] - other["accuracy"]) * 100.0)
                boot = paired_bootstrap(items.get(sel["variant"], {}), items.get(other["variant"], {}))
                if boot is not None:
                    c.ci, c.n_items = (boot[1], boot[2]), boot[3]
                out.append(c)
    return out


# ---------------------------------------------------------------------------------------------
# Resources (Table 5) and layers (Figure 6)


@dataclass
class ResourceRow:
    label: str
    ratio: float
    ratio_exact: float | None
    parameters: int | None
    peak_gib: float | None  # at the evaluation batch
    peak_batch1_gib: float | None  # while decoding at batch 1 (the paper's Table 5)
    tokens_per_s_batch1: float | None
    tokens_per_s_eval: float | None
    params_vs_base: float | None = None  # % of the baseline's parameters


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def resources_table(rows: list[dict]) -> list[ResourceRow]:
    """Baseline first, then one row per ratio from the selective variants (else any pruned ones).

    Per ratio, unrecovered rows are preferred; the values pool that variant's rows over tasks:
    parameters and exact ratio as stored, peak memories the maximum, throughputs the mean.
    """
    def summarise(label: str, ratio: float, chosen: list[dict]) -> ResourceRow:
        params = next((r["parameters"] for r in chosen if r.get("parameters") is not None), None)
        def peak(column: str) -> float | None:
            values = [r[column] for r in chosen if r.get(column) is not None]
            return max(values) / 2**30 if values else None

        return ResourceRow(label, ratio, _mean([r.get("ratio_exact") for r in chosen]), params,
                           peak("peak_memory_bytes"), peak("peak_memory_batch1_bytes"),
                           _mean([r.get("tokens_per_s_batch1") for r in chosen]),
                           _mean([r.get("tokens_per_s_eval") for r in chosen]))

    out = []
    base = [r for r in rows if is_baseline(r)]
    if base:
        out.append(summarise("baseline", 0.0, base))
    first_scorer = (scorers(rows) or [None])[0]
    for ratio in ratios(rows):
        at = [r for r in rows if not is_baseline(r) and rkey(r["ratio_nominal"]) == ratio]
        for pool in ([r for r in at if not r["recovered"]], at):
            sel = [r for r in pool if r["strategy"] == "selective" and r.get("scorer") == first_scorer]
            if sel or pool:
                chosen = sel or [r for r in pool if r["variant"] == pool[0]["variant"]]
                label = "selective" if sel else chosen[0]["strategy"]
                if sel and len(scorers(rows)) > 1:
                    label = f"selective ({first_scorer})"
                out.append(summarise(label, ratio, chosen))
                break
    base_params = out[0].parameters if base and out else None
    for r in out:
        if base_params and r.parameters is not None:
            r.params_vs_base = 100.0 * r.parameters / base_params
    return out


@dataclass
class LayerRow:
    layer: int
    target: int  # neurons with S > 0
    distractor: int  # neurons with S < 0

    @property
    def target_share(self) -> float | None:
        total = self.target + self.distractor
        return 100.0 * self.target / total if total else None


def layer_table(layers: dict | None) -> list[LayerRow]:
    """layers.json -> one row per layer (empty when absent or malformed)."""
    if not layers or not isinstance(layers.get("layers"), list):
        return []
    out = []
    for i, pair in enumerate(layers["layers"]):
        if isinstance(pair, (list, tuple)) and len(pair) >= 2:
            out.append(LayerRow(i, int(pair[0]), int(pair[1])))
    return out


@dataclass
class Report:
    """All tables of one study, computed once (input of render and plots)."""

    info: dict
    accuracy: dict[str, Grid] = field(default_factory=dict)
    traps: dict[str, dict[str, Grid]] = field(default_factory=dict)
    recovered: dict[str, Grid] = field(default_factory=dict)
    recovery: dict[str, list[RecoveryRow]] = field(default_factory=dict)
    loss: dict[str, Grid] = field(default_factory=dict)
    comparisons: dict[str, list[Comparison]] = field(default_factory=dict)
    similarity: list[Grid] = field(default_factory=list)
    layers: list[LayerRow] = field(default_factory=list)
    layer_scorer: str | None = None
    resources: list[ResourceRow] = field(default_factory=list)
    scorers: dict[str, Grid] = field(default_factory=dict)
    scorer_summary: list[SummaryColumn] = field(default_factory=list)


def build_report(study: Study) -> Report:
    """Every table of `study`."""
    rows = study.rows
    rep = Report(study_info(rows, study.config))
    for t in accuracy_tasks(rows):
        rep.accuracy[t] = accuracy_grid(rows, t)
        rep.loss[t] = loss_grid(rows, t)
        rec = recovery_table(rows, t, study.items.get(t, {}))
        if rec:
            rep.recovery[t] = rec
            rep.recovered[t] = accuracy_grid(rows, t, recovered=True)
        rep.comparisons[t] = comparisons(rows, study.items.get(t, {}), t)
        if len(scorers(rows)) > 1:
            rep.scorers[t] = scorer_grid(rows, t)
    for t in tasks(rows):  # accuracy tasks with trap data, other tasks only where some trap occurred
        trap = [r.get("trap_pct") for r in rows if r["task"] == t and not is_baseline(r)]
        if any(v is not None for v in trap) and (task_kind(rows, t) in ACCURACY_KINDS or any(v for v in trap)):
            rep.traps[t] = trap_grids(rows, t)
    rep.similarity = similarity_grids(rows)
    rep.layers = layer_table(study.layers)
    layers = study.layers or {}
    rep.layer_scorer = layers.get("scorer")
    if rep.layer_scorer and layers.get("content"):
        rep.layer_scorer = method(rep.layer_scorer, layers["content"])
    rep.resources = resources_table(rows)
    if len(scorers(rows)) > 1:
        rep.scorer_summary = scorer_summary(rows)
    return rep
