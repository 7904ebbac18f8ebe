"""Published numbers beside a study's own: "paper | taskprune | difference" per table and ratio.

A reference file (YAML, e.g. `references/arxiv-2604.27115.yaml`) names the paper, the task and, per
table, which variants it describes (strategy, before or after recovery), the metric and its values::

    task: humaneval
    tables:
      3a: {caption: ..., strategy: selective, recovered: false, metric: accuracy,
           original: 62.80, ratios: {0.05: 47.56, ...}}

Metrics: `accuracy` and `trap_pct` (%), `peak_memory_gib`, `tokens_per_s_batch1`. "original" is
the unpruned model. A study of another model simply gets no reference section.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from taskprune.report.tables import baseline_row, method, percent, rkey

METRICS = {
    "accuracy": lambda r: percent(r.get("accuracy")),
    "trap_pct": lambda r: r.get("trap_pct"),
    # batch 1, as the paper's Table 5 (not the evaluation batch's peak, whose trapped rows run to the trap budget)
    "peak_memory_gib": lambda r: (None if r.get("peak_memory_batch1_bytes") is None
                                  else r["peak_memory_batch1_bytes"] / 2**30),
    "tokens_per_s_batch1": lambda r: r.get("tokens_per_s_batch1"),
}


class ReferenceError(ValueError):
    """A reference file that cannot be read; the message names the file and the field."""


@dataclass(frozen=True)
class ReferenceRow:
    ratio: float | None  # None: the unpruned model
    paper: float | None
    ours: float | None

    @property
    def difference(self) -> float | None:
        return None if self.paper is None or self.ours is None else self.ours - self.paper


@dataclass(frozen=True)
class ReferenceTable:
    key: str
    caption: str
    metric: str
    rows: list[ReferenceRow]


@dataclass(frozen=True)
class Reference:
    paper: str
    model: str
    task: str
    tables: list[ReferenceTable]
    claims: list[str]


def _table(key: str, spec: dict, rows: list[dict], task: str, where: str) -> ReferenceTable:
    if not isinstance(spec, dict):
        raise ReferenceError(f"{where}: tables.{key} must be a mapping")
    metric = spec.get("metric")
    if metric not in METRICS:
        raise ReferenceError(f"{where}: tables.{key}.metric must be one of {', '.join(METRICS)}, got {metric!r}")
    value = METRICS[metric]
    strategy, recovered = spec.get("strategy", "selective"), bool(spec.get("recovered", False))
    ours = [r for r in rows if r["task"] == task and r["strategy"] == strategy and bool(r["recovered"]) == recovered]
    for paper in ("selectivity", method("selectivity", "prompt")):  # the paper's, where a study has several
        if any(r.get("scorer") == paper for r in ours):
            ours = [r for r in ours if r.get("scorer") == paper]
    out = []
    if "original" in spec:
        base = baseline_row(rows, task)
        out.append(ReferenceRow(None, float(spec["original"]), value(base) if base else None))
    try:
        published = {rkey(float(ratio)): float(v) for ratio, v in (spec.get("ratios") or {}).items()}
    except (TypeError, ValueError):
        raise ReferenceError(f"{where}: tables.{key}.ratios must map ratios to numbers") from None
    for ratio, paper in sorted(published.items()):
        mine = [value(r) for r in ours if rkey(r["ratio_nominal"]) == ratio and value(r) is not None]
        out.append(ReferenceRow(ratio, paper, sum(mine) / len(mine) if mine else None))
    return ReferenceTable(key, str(spec.get("caption", key)), metric, out)


def load_reference(path: str | Path, rows: list[dict]) -> Reference:
    """The reference file at `path` with this study's value beside each published one."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReferenceError(f"reference file {path} does not exist") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ReferenceError(f"{path} is not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("tables"), dict) or not data.get("task"):
        raise ReferenceError(f"{path} needs a task and a tables mapping (see references/arxiv-2604.27115.yaml)")
    tables = [_table(str(k), spec, rows, str(data["task"]), str(path)) for k, spec in data["tables"].items()]
    return Reference(str(data.get("paper", path.stem)), str(data.get("model", "")), str(data["task"]), tables,
                     [str(c) for c in data.get("claims") or []])
