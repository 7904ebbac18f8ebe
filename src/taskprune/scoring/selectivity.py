"""Selectivity (arXiv 2604.27115, eq. 2) and mean target activation, from streamed statistics."""

from __future__ import annotations

import torch

from taskprune.capture import SetStats
from taskprune.profile import Profile
from taskprune.scoring.common import distractor_stats, pooled, target_stats

EPS = 1e-6


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
    target = target_stats(profile)
    distractor = distractor_stats("selectivity", profile, distractors)
    sigma = pooled_std([target, distractor])
    return (target.mean - distractor.mean) / (sigma + EPS)


def activation(profile: Profile) -> torch.Tensor:
    """Mean target activation (mean over prompts of the prompt-level mean |h|); low is pruned first."""
    return target_stats(profile).mean.clone()
