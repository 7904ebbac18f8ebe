"""Scorers by name: each maps a profile (and, where needed, the model) to one score per neuron.

A score tensor is float64 `[layers, d_ff]`; a low score means "prune first" for the `selective`
strategy (and last for `reverse`). Plan and surgery never look behind the name. Each scorer is one
`ScorerSpec` record in `SCORERS`; `NEEDS_MODEL`, `NEEDS_GRADIENTS`, `NEEDS_TOKEN_STATS` and
`scorer_help()` are read from them.
"""

from __future__ import annotations

import torch

from taskprune.profile import Profile
from taskprune.scoring.gradient import ig, taylor, taylor_abs
from taskprune.scoring.magnitude import magnitude
from taskprune.scoring.selectivity import activation, selectivity
from taskprune.scoring.spec import MODEL_OPTIONS, Scorer, ScorerSpec
from taskprune.scoring.taskaware import specific_importance, taskaware
from taskprune.scoring.wanda import flap, wanda_sp

SCORERS: dict[str, ScorerSpec] = {
    "selectivity": ScorerSpec(
        selectivity, "(mean target - mean distractor) / pooled std of the prompt-level mean |h| "
                     "(arXiv 2604.27115, eq. 2)"),
    "activation": ScorerSpec(activation, "mean over target prompts of the prompt-level mean |h| (activation baseline)"),
    "magnitude": ScorerSpec(
        magnitude, "||W_gate[j]|| * ||W_up[j]|| * ||W_down[:, j]||, data-free weight magnitude", needs_model=True),
    "wanda-sp": ScorerSpec(
        wanda_sp, "||W_down[:, j]||_1 * ||h_j||_2 over the target tokens (Wanda-SP, the FLAP paper's baseline)",
        needs_model=True, token_stats=True),
    "flap": ScorerSpec(
        flap, "Var_t(h_j) * ||W_down[:, j]||_2^2 over the target tokens (FLAP's fluctuation metric)",
        needs_model=True, token_stats=True),
    "taylor": ScorerSpec(
        taylor, "|sum_t h_j dL/dh_j| / tokens on the target: first-order loss change (LLM-Pruner)",
        gradients="taylor"),
    "taylor-abs": ScorerSpec(
        taylor_abs, "sum_t |h_j dL/dh_j| / tokens on the target: per-token sensitivity, no cancellation",
        gradients="taylor"),
    "ig": ScorerSpec(
        ig, "mean Integrated-Gradients attribution to confident target predictions (a reading of "
            "arXiv 2507.09185, which prunes the highest: --strategy reverse)", gradients="ig"),
    "taskaware": ScorerSpec(
        taskaware, "target and general Wanda importances fused over shared and exclusive neurons "
                   "(a reading of arXiv 2510.22489)", needs_model=True, token_stats=True),
    "specific-importance": ScorerSpec(
        specific_importance, "t - lam * relu(d - t) of layer-normalised target and distractor Wanda "
                             "importances (ours)", needs_model=True, token_stats=True),
}

# The scorer used when none is named (CLI --scorer, a study config without `scorers`), chosen on
# held-out MBPP by the rule in docs/scorers.md (selectivity tied with taskaware and wanda-sp, above random).
DEFAULT_SCORER = "selectivity"

# Scorers that read the model's weights (callers pass model= and adapter=).
NEEDS_MODEL = frozenset(name for name, spec in SCORERS.items() if spec.needs_model)
# Scorers that read the gradient pass's statistics, by the --gradients kind they need.
NEEDS_GRADIENTS = {name: spec.gradients for name, spec in SCORERS.items() if spec.gradients is not None}
# Scorers that read the token sums of h and h^2 (captured with --token-stats).
NEEDS_TOKEN_STATS = frozenset(name for name, spec in SCORERS.items() if spec.token_stats)


def _spec(name: str) -> ScorerSpec:
    try:
        return SCORERS[name]
    except KeyError:
        raise ValueError(f"unknown scorer {name!r}; available: {', '.join(SCORERS)}") from None


def score(name: str, profile: Profile, **options) -> torch.Tensor:
    """Scores of scorer `name` on `profile`.

    `model=` and `adapter=` are accepted by every scorer (callers may pass them whatever the scorer)
    and read by those that need the model; any other option must be one the scorer takes.
    """
    spec = _spec(name)
    unknown = sorted(set(options) - spec.options - MODEL_OPTIONS)
    if unknown:
        takes = ", ".join(sorted(spec.options)) or "none"
        raise ValueError(f"scorer {name!r} does not take option(s) {', '.join(unknown)}; its options: {takes} "
                         f"(and model=, adapter=, which every scorer accepts)")
    if not spec.needs_model:
        options = {k: v for k, v in options.items() if k not in MODEL_OPTIONS}
    scores = spec.fn(profile, **options).to(torch.float64)
    expected = (profile.num_layers, profile.d_ff)
    if tuple(scores.shape) != expected:
        raise RuntimeError(f"scorer {name!r} returned shape {tuple(scores.shape)}, expected {expected}")
    return scores


def scorer_help() -> str:
    """One line per scorer, `name: what it measures (source) [what it needs]`, for the command line's help."""
    return "\n".join(f"{name}: {spec.help}" + (f" [{spec.needs()}]" if spec.needs() else "")
                     for name, spec in SCORERS.items())


__all__ = ["SCORERS", "DEFAULT_SCORER", "NEEDS_MODEL", "NEEDS_GRADIENTS", "NEEDS_TOKEN_STATS", "Scorer", "ScorerSpec", "score",
           "scorer_help", "selectivity", "activation", "magnitude", "wanda_sp", "flap", "taylor", "taylor_abs",
           "ig", "taskaware", "specific_importance"]
