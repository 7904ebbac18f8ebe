"""Selectivity (arXiv 2604.27115, eq. 2) and mean target activation, from streamed statistics."""

from __future__ import annotations

import torch

from taskprune.capture import SetStats
from taskprune.profile import Profile

EPS = 1e-6


def pooled(stats: list[SetStats]) -> SetStats:
    """Union of several data sets' prompts."""
    out = stats[0]
    for s in stats[1:]:
        out = out.merged(s)
    return out


def pooled_std(stats: list[SetStats]) -> torch.Tensor:
    """Sample standard deviation (n - 1) of the prompt-level means over all prompts of `stats`."""
    allp = pooled(stats)
    if allp.n < 2:
        raise ValueError("selectivity needs at least two prompts in total")
    var = (allp.sumsq - allp.sum.square() / allp.n) / (allp.n - 1)
    return var.clamp(min=0).sqrt()


def selectivity(profile: Profile, distractors: list[str] | None = None) -> torch.Tensor:
    """`S = (mu_target - mu_distractor) / (sigma_pooled + 1e-6)`, float64 `[layers, d_ff]`.

    `mu` are means over prompts of the prompt-level mean |h|; the distractor sets are pooled
    prompt by prompt; sigma is the sample standard deviation over every prompt of target and
    distractors together, computed exactly from counts, sums and sums of squares.
    Low S (distractor-leaning) is pruned first.
    """
    names = distractors or profile.distractors
    if not names:
        raise ValueError("selectivity needs at least one distractor set in the profile")
    missing = [n for n in names if n not in profile.stats]
    if missing:
        raise ValueError(f"distractor set(s) {missing} not in the profile (it has {sorted(profile.stats)})")
    target = profile.stats[profile.target]
    distractor = pooled([profile.stats[n] for n in names])
    sigma = pooled_std([target, distractor])
    return (target.mean - distractor.mean) / (sigma + EPS)


def activation(profile: Profile) -> torch.Tensor:
    """Mean target activation (mean over prompts of the prompt-level mean |h|); low is pruned first."""
    return profile.stats[profile.target].mean.clone()
