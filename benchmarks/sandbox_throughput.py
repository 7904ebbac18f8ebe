"""Throughput of the sandbox (taskprune.evaluate.sandbox.run_many) on HumanEval reference solutions.

Every HumanEval task's canonical solution with its tests (``prompt + canonical_solution +
test + check(entry_point)``, as the evaluation assembles programs) runs through
``run_many``. Two configurations are timed in the same run, in alternating rounds so that
other load on a shared machine hits both alike:

* **new**: the current sandbox, with whatever :func:`isolation` reports (on a Linux machine
  with util-linux: unprivileged uid or user namespace, read-only mount namespace, PID/net/IPC
  namespaces, death signal, tmpfs quota, the audit hook).
* **baseline**: the sandbox as it was at ``--baseline-rev`` (default ``082bc9b``, before
  the kernel layers), loaded from ``git show`` into a temporary module and called the same
  way. It ran ``python -I -B -c <runner>`` under ``unshare --net --pid --fork
  --kill-child`` where that works, with a host temp dir per program.

Printed: programs/s for each (median over rounds), the ratio new/baseline, and child CPU
seconds per program (less distorted by other load than wall time). It also checks that
every canonical solution passes under the new sandbox and lists any that do not, with the
end of its stderr; the exit status is 1 if any fails.

Usage::

    python benchmarks/sandbox_throughput.py                 # 164 programs, 3 rounds, 2 workers
    python benchmarks/sandbox_throughput.py --n 40 --rounds 1 --workers 1   # quick
    python benchmarks/sandbox_throughput.py --baseline-rev none             # new sandbox only
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

from taskprune.data.registry import load_humaneval
from taskprune.evaluate import sandbox
from taskprune.report.speed import Headline, machine, write_benchmark

REPO = Path(__file__).resolve().parents[1]


def programs(n: int | None) -> tuple[list[str], list[str]]:
    examples = load_humaneval(None, "test")[:n]
    ids = [ex.id for ex in examples]
    texts = [
        f"{ex.prompt}{ex.response}\n\n{ex.meta['test']}\n\ncheck({ex.meta['entry_point']})\n"
        for ex in examples
    ]
    return ids, texts


def load_baseline(rev: str, directory: str) -> ModuleType:
    source = subprocess.run(
        ["git", "show", f"{rev}:src/taskprune/evaluate/sandbox.py"],
        cwd=REPO, check=True, capture_output=True, text=True,
    ).stdout
    path = Path(directory) / f"sandbox_{rev}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"sandbox_{rev}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def timed(run_many, texts: list[str], workers: int, timeout_s: float) -> tuple[float, float, list]:
    """(wall seconds, child CPU seconds, results)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    results = run_many(texts, timeout_s=timeout_s, workers=workers)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=None, help="first N tasks (default: all 164)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("--workers", type=int, default=2, help="run_many workers (default 2)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per program")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here (report/speed.py)")
    parser.add_argument("--baseline-rev", default="082bc9b",
                        help="git revision of the baseline sandbox, or 'none'")
    args = parser.parse_args()

    ids, texts = programs(args.n)
    found = sandbox.isolation()
    print(f"CPU: {machine()['cpu']}, {os.cpu_count()} logical cores; Python {platform.python_version()}; "
          f"{platform.system()} {platform.release()}; euid {os.geteuid()}")
    print(f"new sandbox: {found.summary}")
    print(f"{len(texts)} HumanEval canonical solutions, {args.workers} workers, "
          f"{args.rounds} rounds\n")

    def new_run_many(texts, timeout_s, workers):
        return sandbox.run_many(texts, timeout_s=timeout_s, workers=workers,
                                require_isolation=False)

    configs = {"new": new_run_many}
    with tempfile.TemporaryDirectory() as directory:
        if args.baseline_rev != "none":
            baseline = load_baseline(args.baseline_rev, directory)
            configs["baseline"] = baseline.run_many
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in configs}
        failures: dict[str, dict[str, str]] = {name: {} for name in configs}
        for name, run_many in configs.items():  # warm-up (and the new sandbox's probe)
            run_many(texts[:2], timeout_s=args.timeout, workers=args.workers)
        for index in range(args.rounds):
            order = list(configs) if index % 2 == 0 else list(reversed(configs))
            for name in order:
                wall, cpu, results = timed(configs[name], texts, args.workers, args.timeout)
                samples[name].append((wall, cpu))
                for task, result in zip(ids, results):
                    if not result.passed:
                        failures[name][task] = f"{result.status}: {result.stderr[-300:]}"
                print(f"round {index + 1} {name:>8}: {len(texts) / wall:6.1f} programs/s "
                      f"({wall:.2f} s wall, {1000 * cpu / len(texts):.1f} ms child CPU/program, "
                      f"{sum(r.passed for r in results)}/{len(texts)} passed)")

    print()
    rates = {}
    for name, values in samples.items():
        rates[name] = statistics.median(len(texts) / wall for wall, _ in values)
        cpu = statistics.median(1000 * c / len(texts) for _, c in values)
        print(f"{name:>8}: {rates[name]:6.1f} programs/s (median), {cpu:.1f} ms child CPU/program")
    if "baseline" in rates:
        print(f"ratio new/baseline: {rates['new'] / rates['baseline']:.2f}x programs/s")
    for name, failed in failures.items():
        if failed:
            print(f"\n{name}: {len(failed)} canonical solutions did not pass:")
            for task, why in sorted(failed.items()):
                print(f"  {task}: {why.strip()}")
        else:
            print(f"{name}: all {len(texts)} canonical solutions passed")
    if args.json:
        headline = [Headline("sandboxed programs/s", rates["new"], None, "programs/s")]
        if "baseline" in rates:
            headline.append(Headline(f"programs/s, this sandbox / revision {args.baseline_rev}'s",
                                     rates["new"] / rates["baseline"], None, "x"))
        write_benchmark(args.json, "sandbox_throughput", headline,
                        [{"programs": len(texts), "workers": args.workers, "programs_per_s": rates,
                          "failed": {k: sorted(v) for k, v in failures.items()}}])
    return 1 if failures["new"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
