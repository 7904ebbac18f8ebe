"""The report's figures, drawn with matplotlib's Agg canvas (no pyplot, no display) as PNG bytes.

Every function takes the dataclasses of :mod:`.tables` and returns the PNG as bytes (or None
when there is nothing to draw). The figures carry no timestamp or software tag, so the same
study draws the same bytes.
"""

from __future__ import annotations

import io

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from .tables import Grid, LayerRow, RecoveryRow

COLORS = {"selective": "#1f77b4", "reverse": "#d62728", "random": "#7f7f7f"}
CYCLE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
MARKERS = {"selective": "o", "reverse": "s", "random": "^"}
DPI = 110


def _figure(n_panels: int, width: float = 5.0, height: float = 3.6, legend: bool = True) -> tuple[Figure, list]:
    cols = min(n_panels, 2)
    rows = (n_panels + cols - 1) // cols
    fig = Figure(figsize=(width * cols, height * rows + 0.6 + (0.5 if legend else 0)), dpi=DPI,
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n_panels)]
    for ax in axes:
        ax.grid(True, color="#dddddd", linewidth=0.8)
        ax.set_axisbelow(True)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    return fig, axes


def _legend(fig: Figure, axes: list) -> None:
    """One legend for all panels, below them (labels deduplicated, first-seen order)."""
    handles: dict[str, object] = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    if handles:
        column = 0.062 * max(map(len, handles)) + 0.7  # inches a column of 9-point labels takes, handle included
        fig.legend(list(handles.values()), list(handles), loc="outside lower center", frameon=False, fontsize=9,
                   ncol=min(len(handles), max(1, int(fig.get_figwidth() // column))))  # narrow figures wrap


def _png(fig: Figure, title: str | None = None) -> bytes:
    if title:
        fig.suptitle(title, fontsize=13, fontweight="bold")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white", metadata={"Software": None})
    return buf.getvalue()


def _pct_axis(axis, decimals: int = 0) -> None:
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.{decimals}f}%"))


def _ratio_ticks(ax, ratios: list[float]) -> None:
    ticks = [0.0] + [100 * r for r in ratios]
    ax.set_xticks(ticks)
    ax.set_xticklabels(["base" if t == 0 else f"{t:g}%" for t in ticks])
    ax.set_xlabel("pruning ratio (share of MLP neurons removed)")


def row_colors(rows: list, by_scorer: bool = False) -> list[str]:
    """A color per grid row: random grey; by scorer, one color a row; else the strategy's own color for its
    first row and another for each further one (another scorer or capture of the same strategy)."""
    out = []
    for i, row in enumerate(rows):
        nth = [r.strategy for r in rows[:i]].count(row.strategy)
        if row.strategy == "random":
            out.append(COLORS["random"])
        elif by_scorer or nth:
            out.append(CYCLE[(i if by_scorer else nth) % len(CYCLE)])
        else:
            out.append(COLORS.get(row.strategy, CYCLE[(i + 3) % len(CYCLE)]))
    return out


def one_ratio(grids: list[Grid]) -> bool:
    """Whether every grid has a single ratio: a scorer comparison is then drawn as bars, not lines."""
    return all(len(g.ratios) == 1 for g in grids)


def grid_plot(grids: list[Grid], ylabel: str, title: str, percent: bool = True, by_scorer: bool = False,
              titles: list[str] | None = None, ylim: tuple[float, float] | None = None) -> bytes | None:
    """One panel per grid: a line per strategy over the ratios, starting at the baseline.

    Rows aggregating several seeds (random) are drawn as their mean with a shaded min-max band.
    """
    grids = [g for g in grids if not g.empty]
    if not grids:
        return None
    if by_scorer and one_ratio(grids):
        return _scorer_bars(grids, ylabel, title, percent, titles)
    fig, axes = _figure(len(grids))
    for k, (ax, g) in enumerate(zip(axes, grids)):
        for row, color in zip(g.rows, row_colors(g.rows, by_scorer)):
            xs = [r for r in g.ratios if r in row.cells and row.cells[r].values]
            if not xs:
                continue
            ys = [row.cells[r].value for r in xs]
            if g.baseline is not None:
                xs, ys = [0.0] + xs, [g.baseline] + ys
            x100 = [100 * x for x in xs]
            ax.plot(x100, ys, marker=MARKERS.get(row.strategy, "D"), color=color, linewidth=2, markersize=6,
                    label=row.label.replace(" [min–max]", ""),
                    linestyle="--" if row.strategy == "random" else "-")
            if any(row.cells[r].spread for r in row.cells):
                lo = [g.baseline if x == 0 else row.cells[x].lo for x in xs]
                hi = [g.baseline if x == 0 else row.cells[x].hi for x in xs]
                ax.fill_between(x100, lo, hi, color=color, alpha=0.18, linewidth=0,
                                label="random min–max over seeds")
        if g.baseline is not None:
            ax.axhline(g.baseline, color="black", linewidth=0.8, linestyle=":", label="unpruned baseline")
        _ratio_ticks(ax, g.ratios)
        ax.set_ylabel(ylabel)
        if percent:
            _pct_axis(ax.yaxis)
        if ylim:
            ax.set_ylim(*ylim)
        elif percent:
            top = max([v for row in g.rows for c in row.cells.values() for v in c.values]
                      + ([g.baseline] if g.baseline is not None else []) + [1.0])
            ax.set_ylim(0, top * 1.08)
        ax.set_title(titles[k] if titles else g.task)
    _legend(fig, axes)
    return _png(fig, title)


def _scorer_bars(grids: list[Grid], ylabel: str, title: str, percent: bool,
                 titles: list[str] | None) -> bytes:
    """One ratio only: a horizontal bar per scorer (random: its mean, with the min-max over seeds as a whisker)."""
    n_rows = max(len(g.rows) for g in grids)
    fig, axes = _figure(len(grids), height=0.42 * n_rows + 1.4)
    for k, (ax, g) in enumerate(zip(axes, grids)):
        ratio = g.ratios[0]
        rows = [row for row in g.rows if ratio in row.cells and row.cells[ratio].values]
        ys = list(range(len(rows)))[::-1]  # first row on top
        for y, row, color in zip(ys, rows, row_colors(rows, by_scorer=True)):
            cell = row.cells[ratio]
            err = [[cell.value - cell.lo], [cell.hi - cell.value]] if cell.spread else None
            ax.barh(y, cell.value, color=color, xerr=err, capsize=4,
                    hatch="//" if row.strategy == "random" else None, edgecolor="white")
            ax.annotate(f"{cell.value:.1f}%" if percent else f"{cell.value:.3g}", (cell.hi, y), xytext=(6, 0),
                        textcoords="offset points", va="center", fontsize=8)
        ax.set_yticks(ys)
        ax.set_yticklabels([row.label.replace(" [min–max]", "") for row in rows], fontsize=9)
        if g.baseline is not None:
            ax.axvline(g.baseline, color="black", linewidth=0.8, linestyle=":", label="unpruned baseline")
        ax.set_xlabel(f"{ylabel} at {100 * ratio:g}% pruned")
        if percent:
            _pct_axis(ax.xaxis)
            top = max([row.cells[ratio].hi for row in rows] + ([g.baseline] if g.baseline is not None else []) + [1.0])
            ax.set_xlim(0, top * 1.15)
        ax.set_title(titles[k] if titles else g.task)
    _legend(fig, axes)
    return _png(fig, title)


def recovery_plot(tables: dict[str, list[RecoveryRow]]) -> bytes | None:
    """Before/after recovery bars per recovered variant (one panel per task)."""
    tables = {t: rows for t, rows in tables.items() if rows}
    if not tables:
        return None
    fig, axes = _figure(len(tables), width=max(4.0, 1.6 * max(len(r) for r in tables.values()) + 2.0))
    for ax, (task, rows) in zip(axes, tables.items()):
        xs = range(len(rows))
        before = [r.pruned or 0.0 for r in rows]
        after = [r.recovered or 0.0 for r in rows]
        w = 0.38
        b1 = ax.bar([x - w / 2 for x in xs], before, w, color="#9ecae1", label="pruned", edgecolor="#3182bd")
        b2 = ax.bar([x + w / 2 for x in xs], after, w, color="#3182bd", label="after recovery", edgecolor="#08519c")
        for bars, vals in ((b1, before), (b2, after)):
            for bar, v in zip(bars, vals):
                ax.annotate(f"{v:.1f}%", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
        ax.set_xticks(list(xs))
        ax.set_xticklabels([f"{r.label}\n{100 * r.ratio:g}%" for r in rows], fontsize=9)
        ax.set_ylabel("accuracy")
        _pct_axis(ax.yaxis)
        ax.set_ylim(0, max(before + after + [1.0]) * 1.15)
        ax.set_xlim(-0.75, len(rows) - 0.25)
        ax.set_title(task)
    _legend(fig, axes)
    return _png(fig, "Accuracy before and after recovery")


def layers_plot(layers: list[LayerRow], scorer: str | None = None) -> bytes | None:
    """Figure 6: target-leaning (S>0) vs distractor-leaning (S<0) neuron counts per layer."""
    if not layers:
        return None
    width = min(16.0, max(8.5, 0.38 * len(layers) + 3))
    fig = Figure(figsize=(width, 4.4), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.grid(True, axis="y", color="#dddddd", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    xs = [r.layer for r in layers]
    w = 0.4
    ax.bar([x - w / 2 for x in xs], [r.target for r in layers], w, color="#1f77b4", label="target-leaning (S > 0)")
    ax.bar([x + w / 2 for x in xs], [r.distractor for r in layers], w, color="#ff7f0e",
           label="distractor-leaning (S < 0)")
    ax.set_xticks(xs)
    if len(xs) > 24:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=24))
    ax.set_xlabel("layer")
    ax.set_ylabel("neurons")
    ax.set_ylim(0, max(max(r.target, r.distractor) for r in layers) * 1.08 or 1)
    _legend(fig, [ax])
    title = "Target- vs distractor-leaning neurons per layer"
    return _png(fig, f"{title} (scorer: {scorer})" if scorer else title)
