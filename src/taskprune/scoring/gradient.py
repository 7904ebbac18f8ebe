"""Scorers from the gradient pass on the target set (taskprune.gradients): Taylor and Integrated Gradients."""

from __future__ import annotations

import torch

from taskprune.profile import Profile, ProfileError
from taskprune.scoring.common import extra


def taylor(profile: Profile) -> torch.Tensor:
    """`|sum over target tokens of h_j * dL/dh_j| / tokens`: LLM-Pruner's first-order estimate of the
    loss change when neuron j is removed (the gradient summed over the data before the absolute value)."""
    return extra("taylor", profile, "taylor.hg", "taylor").abs() / extra("taylor", profile, "taylor.tokens", "taylor")


def taylor_abs(profile: Profile) -> torch.Tensor:
    """`sum over target tokens of |h_j * dL/dh_j| / tokens` (per-token sensitivity, no cancellation)."""
    tokens = extra("taylor-abs", profile, "taylor.tokens", "taylor")
    return extra("taylor-abs", profile, "taylor.abs", "taylor") / tokens


def ig(profile: Profile) -> torch.Tensor:
    """Mean Integrated-Gradients attribution per selected (high-confidence) prediction, signed.

    High = the neuron supports the model's confident predictions on the target. Under `selective`
    the lowest go first (importance pruning); arXiv 2507.09185 prunes the *highest* attributions,
    which is the `reverse` strategy with this scorer.
    """
    total = extra("ig", profile, "ig.sum", "ig")
    count = float(extra("ig", profile, "ig.positions", "ig"))
    if count == 0:
        threshold = profile.meta.get("capture", {}).get("gradients", {}).get("ig_threshold", "?")
        raise ProfileError(
            f"scorer 'ig': no target position had a greedy prediction with probability above the IG "
            f"threshold ({threshold}); capture again with a lower --ig-threshold")
    return total / count
