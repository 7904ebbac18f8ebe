"""A scorer's record: its function and what it needs (the model, a gradient pass, options)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch

Scorer = Callable[..., torch.Tensor]

# Callers pass these to every scorer (e.g. `plan_from_profile`); only scorers that need the model read them.
MODEL_OPTIONS = frozenset({"model", "adapter"})


@dataclass(frozen=True)
class ScorerSpec:
    """One scorer: `fn(profile, **options) -> [layers, d_ff]` scores, and what it needs to run."""

    fn: Scorer
    help: str  # one line: what it measures and where it comes from
    needs_model: bool = False  # reads the model's weights (model=, adapter=)
    gradients: str | None = None  # the --gradients kind whose statistics it reads
    token_stats: bool = False  # reads the token sums of h and h^2 (--token-stats)

    @property
    def options(self) -> frozenset[str]:
        """The keyword options `fn` takes besides the profile and the model: its signature is their one definition."""
        return frozenset(inspect.signature(self.fn).parameters) - {"profile"} - MODEL_OPTIONS

    def needs(self) -> str:
        """What it reads besides a profile, and its options, in words:
        `needs the model and --token-stats; options: distractors, lam`."""
        inputs = (["the model"] if self.needs_model else []) + \
                 ([f"--gradients {self.gradients}"] if self.gradients is not None else []) + \
                 (["--token-stats"] if self.token_stats else [])
        parts = [f"needs {' and '.join(inputs)}"] if inputs else []
        if self.options:
            parts.append(f"options: {', '.join(sorted(self.options))}")
        return "; ".join(parts)
