"""Each variant of study B against the same-ratio variants of study A, paired over the items both answered.

    python scripts/compare_studies.py results/paper-code-1.5b results/paper-code-1.5b-product [--task humaneval]

Two studies that differ in one setting (here the capture content) keep separate result stores; this
prints B's variants with pass@1 and traps, then B - A for every variant of A at the same ratio and
recovery state, with the paired bootstrap 95% interval of the report's eq. 5 (`paired_bootstrap`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from taskprune.report.tables import load_rows, paired_bootstrap, rkey


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", type=Path, help="the study compared with (e.g. the paper's setting)")
    parser.add_argument("b", type=Path, help="the study whose variants are compared")
    parser.add_argument("--task", default="humaneval")
    args = parser.parse_args()
    rows_a, items_a = load_rows(args.a / "results.sqlite")
    rows_b, items_b = load_rows(args.b / "results.sqlite")
    scores_a, scores_b = items_a.get(args.task, {}), items_b.get(args.task, {})
    mine_a = [r for r in rows_a if r["task"] == args.task and r["accuracy"] is not None]
    for r in (r for r in rows_b if r["task"] == args.task and r["accuracy"] is not None):
        print(f"{r['variant']}: {100 * r['accuracy']:.1f}, traps {r['trap_pct']:.1f} "
              f"(Type 1 {r['type1_pct']:.1f}, Type 2 {r['type2_pct']:.1f}), wall {r['wall_s']:.0f} s")
        for other in mine_a:
            if rkey(other["ratio_nominal"]) != rkey(r["ratio_nominal"]) or other["recovered"] != r["recovered"]:
                continue
            boot = paired_bootstrap(scores_b.get(r["variant"], {}), scores_a.get(other["variant"], {}))
            if boot is not None:
                delta, lo, hi, n = boot
                print(f"  - {args.a.name}/{other['variant']} ({100 * other['accuracy']:.1f}): "
                      f"{delta:+.1f} [{lo:+.1f}, {hi:+.1f}] over {n}")


if __name__ == "__main__":
    main()
