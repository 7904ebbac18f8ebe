"""The report as Markdown (GitHub tables, PNGs beside it) and as one self-contained HTML file.

Both are rendered from one list of blocks (:class:`Doc`), so they always say the same thing. The
HTML carries its CSS inline and its figures as ``data:image/png;base64`` images: it loads nothing
from anywhere and can be mailed or archived as a single file.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path

from . import plots
from .reference import Reference, load_reference
from .speed import Benchmark, load_benchmarks, machine_text
from .tables import Cell, Comparison, Grid, Report, build_report, load_study

# ---------------------------------------------------------------------------------------------
# Number formats


def ratio_label(ratio: float) -> str:
    return f"{100 * ratio:g}%"


def num(x: float | None, digits: int = 1) -> str:
    if x is None:
        return "–"
    if round(x, digits) == 0:
        x = 0.0  # no "-0.0"
    return f"{x:.{digits}f}"


def signed(x: float | None, digits: int = 1) -> str:
    if x is None:
        return "n/a"
    if round(x, digits) == 0:
        x = 0.0
    return f"{x:+.{digits}f}"


def cell_text(cell: Cell | None, digits: int = 1, suffix: str = "") -> str:
    """`mean` or, for several seeds, `mean [min–max]`."""
    if cell is None or not cell.values:
        return "–"
    text = num(cell.value, digits) + suffix
    if cell.spread:
        text += f" [{num(cell.lo, digits)}–{num(cell.hi, digits)}]"
    return text


def grid_table(g: Grid, digits: int = 1, suffix: str = "") -> tuple[list[str], list[list[str]]]:
    headers = ["Strategy"] + [ratio_label(r) for r in g.ratios]
    rows = [[row.label] + [cell_text(row.cells.get(r), digits, suffix) for r in g.ratios] for row in g.rows]
    return headers, rows


def ci_text(ci: tuple[float, float] | None) -> str:
    return "n/a" if ci is None else f"[{signed(ci[0])}, {signed(ci[1])}]"


def sentence(c: Comparison) -> str:
    """e.g. "At 5%, selective is not distinguishable from random (seed 42: +1.2 points, 95% CI [-3.0, +5.5])"."""
    who = f"seed {c.seed}: " if c.seed is not None else ""
    at = f"At {ratio_label(c.ratio)}"
    if c.verdict is None:
        seed = f" (seed {c.seed})" if c.seed is not None else ""
        return (f"{at}, {c.a} − {c.b}{seed} = {signed(c.delta)} points; no per-item scores on common items, "
                f"so no confidence interval.")
    verdict = {"better": "better than", "worse": "worse than",
               "not distinguishable": "not distinguishable from"}[c.verdict]
    return f"{at}, {c.a} is {verdict} {c.b} ({who}{signed(c.delta)} points, 95% CI {ci_text(c.ci)})"


# ---------------------------------------------------------------------------------------------
# Document model


@dataclass
class Block:
    kind: str  # h1 h2 h3 p note list table img
    text: str = ""
    items: list = field(default_factory=list)
    headers: list[str] = field(default_factory=list)
    align: str = ""  # per column: "l" or "r" (default: first left, the rest right)
    anchor: str = ""
    name: str = ""  # image file name
    png: bytes = b""


class Doc:
    def __init__(self) -> None:
        self.blocks: list[Block] = []

    def h(self, level: int, text: str) -> None:
        anchor = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
        self.blocks.append(Block(f"h{level}", text, anchor=anchor))

    def p(self, text: str) -> None:
        self.blocks.append(Block("p", text))

    def note(self, text: str) -> None:
        self.blocks.append(Block("note", text))

    def bullets(self, items: list[str]) -> None:
        if items:
            self.blocks.append(Block("list", items=list(items)))

    def table(self, headers: list[str], rows: list[list[str]], caption: str = "", align: str = "") -> None:
        align = (align or "l") + "r" * (len(headers) - len(align or "l"))
        self.blocks.append(Block("table", caption, items=rows, headers=headers, align=align))

    def image(self, name: str, png: bytes | None, caption: str) -> None:
        if png:
            self.blocks.append(Block("img", caption, name=name, png=png))

    @property
    def images(self) -> list[Block]:
        return [b for b in self.blocks if b.kind == "img"]

    # -- Markdown --------------------------------------------------------------------------

    def markdown(self) -> str:
        out: list[str] = []
        for b in self.blocks:
            if b.kind.startswith("h"):
                out += ["#" * int(b.kind[1]) + " " + b.text, ""]
            elif b.kind == "p":
                out += [b.text, ""]
            elif b.kind == "note":
                out += [f"> *{b.text}*", ""]
            elif b.kind == "list":
                out += [f"- {x}" for x in b.items] + [""]
            elif b.kind == "table":
                if b.text:
                    out += [f"**{b.text}**", ""]
                esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
                out.append("| " + " | ".join(esc(h) for h in b.headers) + " |")
                out.append("|" + "|".join(":---" if a == "l" else "---:" for a in b.align) + "|")
                out += ["| " + " | ".join(esc(c) for c in row) + " |" for row in b.items]
                out.append("")
            elif b.kind == "img":
                out += [f"![{b.text}]({b.name})", ""]
        return "\n".join(out).rstrip() + "\n"

    # -- HTML ------------------------------------------------------------------------------

    @staticmethod
    def _inline(text: str) -> str:
        text = html.escape(text)
        text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
        return re.sub(r"`(.+?)`", r"<code>\1</code>", text)

    def html(self, title: str) -> str:
        body: list[str] = []
        toc = [b for b in self.blocks if b.kind == "h2"]
        for b in self.blocks:
            if b.kind == "h1":
                body.append(f"<h1>{self._inline(b.text)}</h1>")
                if toc:
                    links = "".join(f'<li><a href="#{t.anchor}">{self._inline(t.text)}</a></li>' for t in toc)
                    body.append(f'<nav class="toc"><strong>Contents</strong><ol>{links}</ol></nav>')
            elif b.kind.startswith("h"):
                body.append(f'<{b.kind} id="{b.anchor}">{self._inline(b.text)}</{b.kind}>')
            elif b.kind == "p":
                body.append(f"<p>{self._inline(b.text)}</p>")
            elif b.kind == "note":
                body.append(f'<p class="note">{self._inline(b.text)}</p>')
            elif b.kind == "list":
                body.append("<ul>" + "".join(f"<li>{self._inline(x)}</li>" for x in b.items) + "</ul>")
            elif b.kind == "table":
                cls = ['' if a == "r" else ' class="l"' for a in b.align]
                head = "".join(f"<th{k}>{self._inline(h)}</th>" for k, h in zip(cls, b.headers))
                rows = "".join("<tr>" + "".join(f"<td{k}>{self._inline(c)}</td>" for k, c in zip(cls, row))
                               + "</tr>" for row in b.items)
                if b.text:
                    body.append(f'<p class="cap">{self._inline(b.text)}</p>')
                body.append(f'<div class="tw"><table><thead><tr>{head}</tr></thead>'
                            f"<tbody>{rows}</tbody></table></div>")
            elif b.kind == "img":
                data = base64.b64encode(b.png).decode("ascii")
                body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(b.text)}">'
                            f"<figcaption>{self._inline(b.text)}</figcaption></figure>")
        return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
                f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
                f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
                + "\n".join(body) + "\n</main>\n</body>\n</html>\n")


CSS = """
body { margin: 0; background: #f6f7f9; color: #1d2330;
       font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 32px 64px; background: #fff;
       box-shadow: 0 0 0 1px #e3e6eb; min-height: 100vh; }
h1 { font-size: 26px; margin: 8px 0 12px; }
h2 { font-size: 20px; margin: 36px 0 10px; padding-bottom: 4px; border-bottom: 2px solid #e3e6eb; }
h3 { font-size: 16px; margin: 22px 0 8px; color: #2b3a55; }
p { margin: 6px 0 10px; }
p.note { color: #6b7280; font-style: italic; border-left: 3px solid #d1d5db; padding-left: 10px; }
ul { margin: 6px 0 12px; padding-left: 22px; }
li { margin: 2px 0; }
code { background: #f1f3f5; padding: 1px 4px; border-radius: 3px; font-size: 13px; }
nav.toc { background: #f8fafc; border: 1px solid #e3e6eb; border-radius: 6px; padding: 8px 16px;
          margin: 10px 0 18px; font-size: 14px; }
nav.toc ol { margin: 4px 0; padding-left: 22px; columns: 2; }
nav.toc a { color: #1f5fbf; text-decoration: none; }
.tw { overflow-x: auto; margin: 4px 0 16px; }
table { border-collapse: collapse; font-size: 14px; font-variant-numeric: tabular-nums; }
p.cap { font-weight: 600; margin: 16px 0 4px; color: #2b3a55; }
th, td { padding: 5px 12px; border-bottom: 1px solid #e5e7eb; text-align: right; white-space: nowrap; }
th { background: #eef2f7; font-weight: 600; border-bottom: 2px solid #cbd5e1; }
th.l, td.l { text-align: left; }
tbody tr:last-child td { border-bottom: 2px solid #cbd5e1; }
tbody tr:nth-child(even) { background: #fafbfc; }
tbody tr:hover { background: #f1f5fb; }
figure { margin: 12px 0 22px; }
figure img { max-width: 100%; height: auto; border: 1px solid #eceef2; border-radius: 4px; }
figcaption { font-size: 13px; color: #6b7280; margin-top: 4px; }
"""


# ---------------------------------------------------------------------------------------------
# The report


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def build_doc(rep: Report, run_dir: Path, reference: Reference | None = None,
              benchmarks: list[Benchmark] | tuple = ()) -> Doc:
    """The report's document; with `reference`, the published numbers beside the study's; with `benchmarks`,
    a Speed section of their measurements (report/speed.py)."""
    info = rep.info
    d = Doc()
    d.h(1, f"Pruning study report — {info['model'] or run_dir.name}")
    d.bullets([f"**Model:** `{info['model'] or 'unknown'}`",
               f"**Target:** {info['target'] or 'unknown'}",
               f"**Distractors:** {info['distractors'] or 'unknown'}"
               + (f" (capture {info['capture']})" if info["capture"] else ""),
               f"**Tasks:** {', '.join(info['tasks']) or 'none'}",
               f"**Results:** {_n(info['n_rows'], 'row')} ({_n(info['n_variants'], 'model variant')} x task)",
               f"**Strategies:** {', '.join(info['strategies']) or 'none'}; "
               f"**scorers:** {', '.join(info['scorers']) or 'none'}; "
               f"**ratios:** {', '.join(ratio_label(r) for r in info['ratios']) or 'none'}"
               + (f"; **random seeds:** {', '.join(str(s) for s in info['seeds'])}" if info["seeds"] else ""),
               f"**Study directory:** `{run_dir.name}`"])
    _baseline(d, rep)
    _reference(d, rep, reference)
    _accuracy(d, rep)
    _traps(d, rep)
    _recovery(d, rep)
    _loss(d, rep)
    _comparisons(d, rep)
    _similarity(d, rep)
    _layers(d, rep)
    _resources(d, rep)
    _speed(d, rep, list(benchmarks))
    _scorers(d, rep)
    return d


def _baseline(d: Doc, rep: Report) -> None:
    d.h(3, "Unpruned baseline")
    rows = []
    for task, g in rep.accuracy.items():
        if g.baseline is not None:
            rows.append([task, "accuracy", f"{num(g.baseline)}%"])
    for g in rep.similarity:
        if g.baseline is not None:
            rows.append([g.task, "similarity", num(g.baseline, 3)])
    if rows:
        d.table(["Task", "Metric", "Baseline"], rows, align="llr")
    else:
        d.note("No baseline (strategy \"none\") rows in this study.")


def _grid_tables(d: Doc, grids: list[Grid], intro: str, caption: str, with_baseline: bool,
                 row_header: str | None = None) -> None:
    """An intro paragraph, then one strategy (or scorer) x ratio table per task."""
    d.p(intro)
    for g in grids:
        headers, rows = grid_table(g)
        if row_header:
            headers[0] = row_header
        base = f" — unpruned baseline {num(g.baseline)}%" if with_baseline and g.baseline is not None else ""
        d.table(headers, rows, caption=f"{g.task}: {caption}{base}")


def _accuracy(d: Doc, rep: Report) -> None:
    d.h(2, "Accuracy per strategy and pruning ratio")
    grids = [g for g in rep.accuracy.values() if not g.empty]
    if not grids:
        d.note("No accuracy results for pruned variants.")
        return
    _grid_tables(d, grids, "Accuracy (%) on each accuracy task before recovery (the paper's Table 3). Random "
                 "pruning is the mean over its seeds with the range [min–max] beside it.",
                 "accuracy (%)", with_baseline=True)
    d.image("report-accuracy.png", plots.grid_plot(grids, "accuracy", "Accuracy vs pruning ratio"),
            "Accuracy vs pruning ratio (random: mean of seeds, band = min–max)")


def _traps(d: Doc, rep: Report) -> None:
    d.h(2, "Traps: Type 1 and Type 2")
    if not rep.traps:
        d.note("No trap results for pruned variants.")
        return
    d.p("Share of answers caught in a generation trap (the paper's Table 3b), in %: total, then "
        "(Type 1 / Type 2). Random: mean over seeds [min–max] of the total.")
    for task, gs in rep.traps.items():
        total, t1, t2 = gs["trap_pct"], gs["type1_pct"], gs["type2_pct"]
        rows = []
        for row in total.rows:
            cells = [row.label]
            for r in total.ratios:
                c = row.cells.get(r)
                if c is None or not c.values:
                    cells.append("–")
                    continue
                r1 = t1.row(row.strategy, row.scorer)
                r2 = t2.row(row.strategy, row.scorer)
                c1 = r1.cells.get(r) if r1 else None
                c2 = r2.cells.get(r) if r2 else None
                split = f" ({num(c1.value if c1 else None)} / {num(c2.value if c2 else None)})"
                cells.append(cell_text(c) + split)
            rows.append(cells)
        base = f" — unpruned baseline {num(total.baseline)}%" if total.baseline is not None else ""
        d.table(["Strategy"] + [ratio_label(r) for r in total.ratios], rows,
                caption=f"{task}: trap % (Type 1 / Type 2){base}")
    d.image("report-traps.png",
            plots.grid_plot([gs["trap_pct"] for gs in rep.traps.values()], "answers in a trap",
                            "Trap rate vs pruning ratio"),
            "Trap % vs pruning ratio (Type 1 + Type 2)")


def _reference(d: Doc, rep: Report, ref: Reference | None) -> None:
    if ref is None:
        return
    d.h(2, f"Against the paper ({ref.paper})")
    d.p(f"The published numbers for {ref.model or 'the paper'} on {ref.task} beside this study's, and the "
        f"difference (taskprune − paper). Random variants, where a table has them, are the mean over seeds; "
        f"'–' where this study has no such variant yet. The intervals of the comparisons below are this "
        f"study's; the paper gives none.")
    for t in ref.tables:
        digits = 2 if t.metric in ("peak_memory_gib",) else 1
        d.table(["Ratio", "Paper", "taskprune", "Difference"],
                [["original" if r.ratio is None else ratio_label(r.ratio), num(r.paper, digits),
                  num(r.ours, digits), signed(r.difference, digits)] for r in t.rows], caption=t.caption)
    if ref.claims:
        d.p("The paper's claims, to read against the comparisons and similarity sections:")
        d.bullets(ref.claims)


def _recovery(d: Doc, rep: Report) -> None:
    d.h(2, "After recovery")
    if not rep.recovery:
        d.note("No recovered variants in this study (recovery disabled or not run yet).")
        return
    d.p("Accuracy (%) of the recovered variants beside their pruned counterparts (the paper's Table 4), the "
        "relative gain after recovery, eq. 4: (acc_recovered − acc_pruned) / acc_pruned × 100 "
        "(n/a when the pruned accuracy is 0), and the difference in points with its paired bootstrap 95% "
        "interval over the items both answered (as for eq. 5); recovery is called better or worse only when "
        "the interval excludes 0.")
    for task, rows in rep.recovery.items():
        d.table(["Variant", "Ratio", "Pruned (%)", "Recovered (%)", "Relative gain (eq. 4)", "Δ (points)",
                 "95% CI", "Verdict"],
                [[r.label, ratio_label(r.ratio), num(r.pruned), num(r.recovered),
                  "n/a" if r.gain is None else f"{signed(r.gain)}%",
                  "n/a" if r.delta is None else signed(r.delta), ci_text(r.ci), r.verdict or "n/a"] for r in rows],
                caption=f"{task}: accuracy after recovery")
    d.image("report-recovery.png", plots.recovery_plot(rep.recovery),
            "Accuracy before and after recovery")


def _loss(d: Doc, rep: Report) -> None:
    d.h(2, "Relative accuracy loss")
    grids = [g for g in rep.loss.values() if not g.empty]
    if not grids:
        d.note("No relative loss: it needs a baseline with non-zero accuracy and pruned variants.")
        return
    _grid_tables(d, grids, "Eq. 3: (acc_base − acc_pruned) / acc_base × 100, before recovery; negative values "
                 "mean the pruned model scores above the baseline.", "relative accuracy loss (%)",
                 with_baseline=False)


def _comparisons(d: Doc, rep: Report) -> None:
    d.h(2, "Selective vs random and reverse")
    if not any(rep.comparisons.values()):
        d.note("No selective variant with a random or reverse counterpart at the same ratio.")
        return
    d.p("Eq. 5: acc_selective − acc_other in percentage points, per ratio and random seed, before recovery. "
        "The 95% interval is a paired bootstrap over the benchmark items both variants answered "
        "(item ids resampled with replacement, 2000 resamples, seed 0); selective is called better or worse "
        "only when the interval excludes 0.")
    for task, comps in rep.comparisons.items():
        if not comps:
            continue
        d.h(3, task)
        d.table(["Ratio", "Comparison", "Δ (points)", "95% CI", "Items", "Verdict"], align="llrrrl", rows=[
                 [ratio_label(c.ratio), f"{c.a} − {c.b}" + (f" (seed {c.seed})" if c.seed is not None else ""),
                  signed(c.delta), ci_text(c.ci), str(c.n_items) if c.ci else "–", c.verdict or "n/a"]
                 for c in comps])
        if any(c.ci is not None for c in comps):
            d.bullets([sentence(c) for c in comps])
        else:
            d.note(f"{task} has no per-item scores: the deltas are shown without confidence intervals.")


def _similarity(d: Doc, rep: Report) -> None:
    d.h(2, "Distractor similarity")
    if not rep.similarity:
        d.note("No similarity results (squad-sim / dialogue-sim) in this study.")
        return
    d.p("How close the pruned model's answers to distractor prompts stay to the unpruned model's (0–1, higher "
        "= less off-task damage): BERTScore F1 on squad-sim, SBERT cosine on dialogue-sim, and their mean — the "
        "paper's semantic similarity. Random: mean over seeds [min–max].")
    for g in rep.similarity:
        headers, rows = grid_table(g, digits=3)
        d.table(headers, rows, caption=f"{g.task}: similarity")
    d.image("report-similarity.png",
            plots.grid_plot(rep.similarity, "similarity to the unpruned model", "Distractor similarity vs pruning ratio",
                            percent=False),
            "Distractor similarity vs pruning ratio")


def _layers(d: Doc, rep: Report) -> None:
    d.h(2, "Layer-wise distribution")
    if not rep.layers:
        d.note("No layers.json in the study directory.")
        return
    tot_t = sum(r.target for r in rep.layers)
    tot_d = sum(r.distractor for r in rep.layers)
    scorer = f" by {rep.layer_scorer}" if rep.layer_scorer else ""
    d.p(f"Neurons scored{scorer} as target-leaning (S > 0) and distractor-leaning (S < 0) per layer (the paper's "
        f"Figure 6): {tot_t:,} target-leaning and {tot_d:,} distractor-leaning in all.")
    d.image("report-layers.png", plots.layers_plot(rep.layers, rep.layer_scorer),
            "Target-leaning vs distractor-leaning neurons per layer")
    rows = [[str(r.layer), f"{r.target:,}", f"{r.distractor:,}",
             "–" if r.target_share is None else f"{num(r.target_share)}%"] for r in rep.layers]
    share = f"{num(100 * tot_t / (tot_t + tot_d))}%" if tot_t + tot_d else "–"
    rows.append(["all", f"{tot_t:,}", f"{tot_d:,}", share])
    d.table(["Layer", "Target-leaning (S>0)", "Distractor-leaning (S<0)", "Target share"], rows)


def _resources(d: Doc, rep: Report) -> None:
    d.h(2, "Resources")
    if not rep.resources:
        d.note("No resource measurements.")
        return
    d.p("Parameters, peak memory and decoding throughput per pruning ratio (the paper's Table 5), measured on "
        "the selective variants (any pruned variant where there is none); throughput averaged over tasks. "
        "Peak memory is the model's own: its weights plus the most memory its generation added on top of what "
        "was in use when generation started (CUDA peak allocated on a GPU, resident-set high-water mark on a "
        "CPU), so what else the study process holds does not count: while decoding the batch-1 speed prompts "
        "(the paper's Table 5 setting), and over the evaluation at its batch, where trapped rows run to the trap "
        "budget (so a collapsed model can need more than the unpruned one).")

    def tps(x):
        return "–" if x is None else f"{x:,.1f}"

    d.table(["Variant", "Ratio (exact)", "Parameters", "vs base", "Peak memory batch 1 (GiB)",
             "Peak memory eval batch (GiB)", "Tokens/s batch 1", "Tokens/s eval batch"],
            [[r.label, "0%" if r.ratio == 0 else
              f"{ratio_label(r.ratio)} ({num(100 * r.ratio_exact, 2)}%)" if r.ratio_exact is not None else
              ratio_label(r.ratio),
              "–" if r.parameters is None else f"{r.parameters:,}",
              "–" if r.params_vs_base is None else f"{num(r.params_vs_base)}%",
              num(r.peak_batch1_gib, 2), num(r.peak_gib, 2), tps(r.tokens_per_s_batch1), tps(r.tokens_per_s_eval)]
             for r in rep.resources])


def _speed(d: Doc, rep: Report, benchmarks: list[Benchmark]) -> None:
    if not benchmarks:
        return
    d.h(2, "Speed")
    for b in benchmarks:
        if b.name == "pruned_speedup" and b.rows:
            _speedup_table(d, rep, b)
    d.p("Every benchmark's headline figures, each a ratio against a baseline measured in the same run (so that "
        "these noisy machines compare like with like), with the issue's target where there is one.")
    d.table(["Benchmark", "Measure", "Value", "Target", "Machine", "Created"],
            # Percentages near 100 keep four digits: 99.98% must not print as 100%.
            [[b.name, h.measure, f"{h.value:.{4 if h.unit == '%' else 3}g}{h.unit if h.unit in ('x', '%') else ''}",
              "–" if h.target is None else f"{'≥' if h.higher_is_better else '≤'} {h.target:g}"
              + (" ✓" if h.met else " ✗"), machine_text(b.machine), b.created[:10]]
             for b in benchmarks for h in b.headline])
    d.p("Commands: " + "; ".join(f"`{b.command}`" for b in benchmarks if b.command) + ".")


def _speedup_table(d: Doc, rep: Report, b: Benchmark) -> None:
    """The pruned model's decode speed-up against its physical ideal, per ratio and engine, beside the study's
    parameters and peak memory at that ratio (the paper's Table 5)."""
    columns = list(dict.fromkeys(r["column"] for r in b.rows))
    ratios = list(dict.fromkeys(r["ratio"] for r in b.rows if r.get("ratio") is not None))
    study = {round(r.ratio, 4): r for r in rep.resources}
    d.p(f"Decode speed of pruned models over the unpruned one ({b.rows[0].get('model', 'the model')}, random "
        f"prunes, {machine_text(b.machine)}): each speed-up beside the ideal, the weight bytes read per decoded "
        f"token unpruned over pruned, and in brackets the share of the ideal gain realised, (speed-up − 1) / "
        f"(ideal − 1). Parameters and peak memory are the study's own variants at that ratio (Resources).")
    rows = []
    for ratio in ratios:
        at = {r["column"]: r for r in b.rows if r.get("ratio") == ratio}
        any_row = next(iter(at.values()))
        res = study.get(round(ratio, 4))
        rows.append([ratio_label(ratio), str(any_row.get("kept_width", "–")),
                     "–" if res is None or res.params_vs_base is None else f"{num(res.params_vs_base)}%",
                     num(None if res is None else res.peak_batch1_gib, 2), f"{any_row['ideal']:.3f}x"]
                    + [f"{at[c]['speedup']:.3f}x ({at[c]['share_of_ideal']:.2f})" if c in at else "–"
                       for c in columns])
    d.table(["Ratio", "d_ff", "Parameters vs base", "Peak memory batch 1 (GiB)", "Ideal"] + columns, rows,
            caption="Decode speed-up over the unpruned model, measured vs ideal")


def _scorers(d: Doc, rep: Report) -> None:
    d.h(2, "Scorers")
    grids = [g for g in rep.scorers.values() if not g.empty]
    if not grids:
        names = rep.info["scorers"]
        d.note(f"One scorer in this study ({names[0]}): no scorer comparison." if names else
               "No scored (selective or reverse) variants: no scorer comparison.")
        return
    _grid_tables(d, grids, "Accuracy (%) of selective pruning per scorer and ratio, before recovery, with random "
                 "pruning beside.", "accuracy (%) per scorer", with_baseline=True, row_header="Scorer")
    d.image("report-scorers.png", plots.grid_plot(grids, "accuracy", "Scorer comparison", by_scorer=True),
            "Selective accuracy per scorer (random: mean of seeds, whisker = min–max)" if plots.one_ratio(grids) else
            "Selective accuracy per scorer vs pruning ratio (random: mean of seeds, band = min–max)")
    _scorer_summary(d, rep)


def _scorer_summary(d: Doc, rep: Report) -> None:
    cols = rep.scorer_summary
    if not cols:
        return
    d.p("Per ratio, every metric side by side: accuracy and trap % of each accuracy task, distractor "
        "similarity (random: mean of seeds [min–max]).")
    ratios = sorted({r for c in cols for r in c.grid.ratios})
    labels = list(dict.fromkeys(row.label for c in cols for row in c.grid.rows))
    headers = ["Scorer"] + [c.name for c in cols]
    base = ["unpruned"] + [num(c.grid.baseline, c.digits) for c in cols]
    for ratio in ratios:
        rows = [base]
        for label in labels:
            cells = []
            for c in cols:
                row = next((r for r in c.grid.rows if r.label == label), None)
                cells.append(cell_text(row.cells.get(ratio) if row else None, c.digits))
            rows.append([label] + cells)
        d.table(headers, rows, caption=f"All metrics per scorer at {ratio_label(ratio)}")


def write_report(run_dir: str | Path, out_dir: str | Path | None = None, reference: str | Path | None = None,
                 benchmarks: list[str | Path] | tuple = ()) -> tuple[Path, Path]:
    """Write `report.md` (+ its PNG figures) and the self-contained `report.html`; return their paths.
    `reference`: a YAML file of published numbers to print beside the study's (report/reference.py);
    `benchmarks`: benchmark files (report/speed.py) shown in the Speed section beside the study's own
    (`RUN_DIR/benchmarks/*.json`)."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    study = load_study(run_dir)
    rep = build_report(study)
    doc = build_doc(rep, run_dir, None if reference is None else load_reference(reference, study.rows),
                    load_benchmarks(run_dir, benchmarks))
    for img in doc.images:
        (out_dir / img.name).write_bytes(img.png)
    md, page = out_dir / "report.md", out_dir / "report.html"
    md.write_text(doc.markdown(), encoding="utf-8")
    page.write_text(doc.html(f"Pruning study report — {rep.info['model'] or run_dir.name}"), encoding="utf-8")
    return md, page


__all__ = ["write_report", "build_doc", "sentence"]
