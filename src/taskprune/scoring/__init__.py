"""Scorers by name: each maps a profile (and, where needed, the model) to one score per neuron.

A score tensor is float64 `[layers, d_ff]`; a low score means "prune first" for the `selective`
strategy (and last for `reverse`). Plan and surgery never look behind the name.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from taskprune.profile import Profile
from taskprune.scoring.selectivity import activation, selectivity

Scorer = Callable[..., torch.Tensor]

SCORERS: dict[str, Scorer] = {
    "selectivity": selectivity,
    "activation": activation,
}


def score(name: str, profile: Profile, **options) -> torch.Tensor:
    """Scores of scorer `name` on `profile`; options (e.g. `model`, `adapter`) pass through."""
    try:
        scorer = SCORERS[name]
    except KeyError:
        raise ValueError(f"unknown scorer {name!r}; available: {', '.join(SCORERS)}") from None
    scores = scorer(profile, **options)
    expected = (profile.num_layers, profile.d_ff)
    if tuple(scores.shape) != expected:
        raise RuntimeError(f"scorer {name!r} returned shape {tuple(scores.shape)}, expected {expected}")
    return scores


__all__ = ["SCORERS", "Scorer", "score", "selectivity", "activation"]
