"""Which neurons go: a strategy over scores, the same count removed in every layer, aligned widths."""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal, get_args

import torch

Strategy = Literal["selective", "reverse", "random"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)


class PlanError(ValueError):
    """A pruning request that cannot be met; the message says which input and what to change."""


def _exact(ratio: float | str | Fraction) -> Fraction:
    """The ratio as written (`0.1` is exactly 1/10, not the nearest binary float)."""
    if isinstance(ratio, Fraction):
        return ratio
    try:
        return Fraction(str(ratio))
    except (ValueError, ZeroDivisionError):
        raise PlanError(f"ratio {ratio!r} is not a number") from None


def pruned_count(d_ff: int, ratio: float | str | Fraction, align: int = 128) -> int:
    """Neurons to remove per layer: the fewest that is at least `ratio * d_ff` and keeps the width a
    multiple of `align` (when `d_ff` is itself a multiple of `align`: the smallest multiple of
    `align` that is at least `ratio * d_ff`). Exact arithmetic: 0.1 of 8960 is 896, not 1024.
    """
    r = _exact(ratio)
    if not 0 < r < 1:
        raise PlanError(f"ratio must be strictly between 0 and 1, got {ratio}")
    if align < 1:
        raise PlanError(f"align must be a positive integer, got {align}")
    need = math.ceil(r * d_ff)
    kept = (d_ff - need) // align * align
    if kept < align:
        raise PlanError(
            f"ratio {ratio} of d_ff {d_ff} with align {align} would keep {max(kept, 0)} neurons per layer, "
            f"fewer than one block of {align}; use a smaller ratio or a smaller --align"
        )
    return d_ff - kept


@dataclass(frozen=True)
class Plan:
    """Kept neuron indices per layer (sorted, original order) and how they were chosen."""

    strategy: str
    ratio: float  # nominal
    align: int
    d_ff: int
    n_pruned: int  # per layer
    keep: list[list[int]]
    seed: int | None = None

    @property
    def exact_ratio(self) -> float:
        return self.n_pruned / self.d_ff

    @property
    def kept_width(self) -> int:
        return self.d_ff - self.n_pruned

    def to_dict(self) -> dict:
        return {"strategy": self.strategy, "ratio_nominal": self.ratio, "ratio_exact": self.exact_ratio,
                "align": self.align, "seed": self.seed, "d_ff": self.d_ff, "kept_width": self.kept_width,
                "pruned_per_layer": self.n_pruned, "keep": self.keep}


def make_plan(scores: torch.Tensor | None, strategy: str, ratio: float, align: int = 128,
              seed: int | None = None, shape: tuple[int, int] | None = None) -> Plan:
    """Uniform plan: in every layer remove the `pruned_count` neurons the strategy picks.

    `selective` removes the lowest scores, `reverse` the highest (ties: lower index first, stable),
    `random` a seeded uniform draw per layer (scores unused; give `shape` instead).
    """
    if strategy not in STRATEGIES:
        raise PlanError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    if scores is None:
        if strategy != "random" or shape is None:
            raise PlanError(f"strategy {strategy!r} needs scores")
        layers, d_ff = shape
    else:
        layers, d_ff = scores.shape
    k = pruned_count(d_ff, ratio, align)
    keep = []
    if strategy == "random":
        if seed is None:
            raise PlanError("strategy 'random' needs a seed (--seed)")
        gen = torch.Generator().manual_seed(seed)
        for _ in range(layers):
            pruned = torch.randperm(d_ff, generator=gen)[:k]
            keep.append(_complement(pruned, d_ff))
    else:
        for row in scores:
            order = torch.sort(row.double(), stable=True, descending=(strategy == "reverse")).indices
            keep.append(_complement(order[:k], d_ff))
    return Plan(strategy=strategy, ratio=float(ratio), align=align, d_ff=d_ff, n_pruned=k, keep=keep,
                seed=seed if strategy == "random" else None)


def _complement(pruned: torch.Tensor, d_ff: int) -> list[int]:
    mask = torch.ones(d_ff, dtype=torch.bool)
    mask[pruned] = False
    return mask.nonzero().flatten().tolist()
