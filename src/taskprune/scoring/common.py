"""What several scorers share: the model's per-neuron weight norms, the target and pooled distractor
statistics, token-level activation statistics of a set, and the clear errors when a scorer lacks an input."""

from __future__ import annotations

import torch
from torch import nn

from taskprune.capture import SetStats
from taskprune.models.adapters import MLPAdapter, model_adapter
from taskprune.profile import Profile, ProfileError


def require_model(name: str, profile: Profile, model: nn.Module | None,
                  adapter: MLPAdapter | None = None) -> list[dict[str, torch.Tensor]]:
    """The model's MLP weight rows, checked against the profile's shape; an error saying what to pass otherwise."""
    if model is None:
        raise ValueError(
            f"scorer {name!r} needs the model's weights: pass model= (and adapter=) to score(); on the "
            f"command line `taskprune prune` passes them, `taskprune score` needs --model")
    if adapter is None:
        adapter = model_adapter(model)
    mlps = adapter.mlps(model)
    d_ff = adapter.d_ff(model)
    if (len(mlps), d_ff) != (profile.num_layers, profile.d_ff):
        raise ProfileError(
            f"scorer {name!r}: the model has {len(mlps)} layers x {d_ff} neurons but the profile was captured "
            f"on {profile.num_layers} x {profile.d_ff}; give the model the profile was captured on")
    return [adapter.weight_rows(m) for m in mlps]


def pooled(stats: list[SetStats]) -> SetStats:
    """Union of several data sets' prompts (and tokens)."""
    out = stats[0]
    for s in stats[1:]:
        out = out.merged(s)
    return out


def row_norms(rows: list[dict[str, torch.Tensor]], part: str, ord: float = 2) -> torch.Tensor:
    """`ord`-norm of each neuron's `part` ("gate", "up" or "down") weights, float64 `[layers, d_ff]`."""
    with torch.no_grad():
        return torch.stack([torch.linalg.vector_norm(r[part].detach(), ord, dim=1, dtype=torch.float64).cpu()
                            for r in rows])


def target_stats(profile: Profile) -> SetStats:
    return profile.stats[profile.target]


def distractor_stats(name: str, profile: Profile, distractors: list[str] | None = None) -> SetStats:
    """The distractor sets pooled token by token (and prompt by prompt)."""
    names = distractors or profile.distractors
    if not names:
        raise ValueError(f"scorer {name!r} needs at least one distractor set in the profile")
    missing = [n for n in names if n not in profile.stats]
    if missing:
        raise ValueError(f"distractor set(s) {missing} not in the profile (it has {sorted(profile.stats)})")
    return pooled([profile.stats[n] for n in names])


def _token_sums(name: str, s: SetStats) -> tuple[torch.Tensor, torch.Tensor]:
    """The set's token sums of h and h^2, or an error saying how to capture them."""
    if not s.has_token_stats:
        raise ProfileError(
            f"scorer {name!r} reads token-level statistics (token sums of h and h^2), which this profile "
            f"lacks: capture with --token-stats (CaptureSettings(token_stats=True) in Python); taskprune prune "
            f"and taskprune run add them when their scorer needs them")
    return s.tok_sum, s.tok_sumsq


def token_l2(name: str, s: SetStats) -> torch.Tensor:
    """`||h_j||_2` over every token of the set: `sqrt(sum_t h^2)`."""
    return _token_sums(name, s)[1].clamp(min=0).sqrt()


def token_rms(name: str, s: SetStats) -> torch.Tensor:
    """Per-token root mean square `sqrt(sum_t h^2 / tokens)`, comparable between sets of different sizes."""
    return (_token_sums(name, s)[1].clamp(min=0) / s.tokens).sqrt()


def token_var(name: str, s: SetStats) -> torch.Tensor:
    """Sample variance (N - 1) over tokens of h, from the token sums."""
    tok_sum, tok_sumsq = _token_sums(name, s)
    if s.tokens < 2:
        raise ValueError(f"scorer {name!r} needs at least two target tokens")
    return ((tok_sumsq - tok_sum.square() / s.tokens) / (s.tokens - 1)).clamp(min=0)


def extra(name: str, profile: Profile, key: str, kind: str) -> torch.Tensor:
    """A gradient statistic of the target set, or an error saying how to capture it."""
    s = target_stats(profile)
    if key not in s.extra:
        raise ProfileError(
            f"scorer {name!r} needs the gradient statistics {key!r} of the target set {profile.target!r}, "
            f"which this profile lacks: capture with --gradients {kind} "
            f"(CaptureSettings(gradients=({kind!r},)) in Python)")
    return s.extra[key]
