"""Benchmark results as files the report can show: one JSON document per benchmark run.

Every script in `benchmarks/` writes, with `--json FILE`, the same envelope::

    {"benchmark": "pruned_speedup", "format": 1, "created": "2026-12-02T19:30:00+00:00",
     "command": "python benchmarks/pruned_speedup.py --prompts 2", "machine": {...},
     "headline": [{"measure": "...", "value": 0.77, "target": 0.8, "unit": "share"}, ...],
     "rows": [...]}                                # the benchmark's own detail rows

`headline` is what the report's Speed section prints for every benchmark; `rows` are read by the
benchmark-specific tables (the pruned model's speed-up against its ideal, per ratio). The report reads
every `*.json` under a study's `benchmarks/` folder, plus any file given to `taskprune report --benchmark`.
"""

from __future__ import annotations

import json
import platform
import shlex
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

FORMAT = 1
FOLDER = "benchmarks"  # inside a study directory


class BenchmarkFileError(ValueError):
    """A benchmark file the report cannot read; the message names the file and the fix."""


@dataclass(frozen=True)
class Headline:
    measure: str  # e.g. "capture / plain forward tokens/s"
    value: float
    target: float | None = None  # the target, where there is one
    unit: str = ""  # "x", "share", "%", "GiB", "tokens/s"
    higher_is_better: bool = True

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        return self.value >= self.target if self.higher_is_better else self.value <= self.target


@dataclass(frozen=True)
class Benchmark:
    name: str
    created: str
    command: str
    machine: dict
    headline: list[Headline] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)


def machine() -> dict:
    """What the figures were measured on: CPU model and the flags that decide bf16 speed, threads, GPU."""
    info = {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")]
        flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
        if names:
            info["cpu"] = names[0]
        info["cores"] = len(names) or None
        info["cpu_flags"] = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    except OSError:
        pass
    try:
        import torch
        info["torch"] = torch.__version__
        info["threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def write_benchmark(path: str | Path, name: str, headline: list[Headline], rows: list[dict] | None = None) -> Path:
    """Write one benchmark run (`headline` for the report, `rows` its details) to `path`."""
    doc = {"benchmark": name, "format": FORMAT, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "command": shlex.join([Path(sys.executable).name, *sys.argv]), "machine": machine(),
           "headline": [vars(h) for h in headline], "rows": rows or []}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return path


def read_benchmark(path: str | Path) -> Benchmark:
    path = Path(path)
    again = "write it again with the benchmark's --json option"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BenchmarkFileError(f"benchmark file {path} does not exist; give a file a benchmark wrote with "
                                 f"--json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BenchmarkFileError(f"benchmark file {path} is not valid JSON ({getattr(err, 'msg', err)}); "
                                 f"{again}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("benchmark"), str):
        raise BenchmarkFileError(f"benchmark file {path} is not a taskprune benchmark result (format {FORMAT}); "
                                 f"{again}")
    try:
        headline = [Headline(**h) for h in doc.get("headline", [])]
        rows = [dict(r) for r in doc.get("rows", [])]
    except (TypeError, ValueError) as err:
        raise BenchmarkFileError(f"benchmark file {path}: malformed headline or rows ({err}); {again}") from None
    return Benchmark(doc["benchmark"], str(doc.get("created", "")), str(doc.get("command", "")),
                     dict(doc.get("machine") or {}), headline, rows)


def load_benchmarks(run_dir: str | Path, extra: list[str | Path] | tuple = ()) -> list[Benchmark]:
    """The study's own benchmark files (`RUN_DIR/benchmarks/*.json`, by name) and then `extra`."""
    folder = Path(run_dir) / FOLDER
    own = sorted(folder.glob("*.json")) if folder.is_dir() else []
    return [read_benchmark(p) for p in [*own, *extra]]


def machine_text(m: dict) -> str:
    parts = [m.get("gpu") or m.get("cpu") or "unknown machine"]
    if m.get("gpu") is None and m.get("cores"):
        parts.append(f"{m['cores']} cores")
    if m.get("cpu_flags"):
        parts.append("/".join(m["cpu_flags"]))
    return ", ".join(parts)


__all__ = ["Headline", "Benchmark", "BenchmarkFileError", "write_benchmark", "read_benchmark", "load_benchmarks",
           "machine", "machine_text", "FOLDER"]
