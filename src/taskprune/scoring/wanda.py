"""Activation-times-weight scorers on the target set: Wanda-SP and FLAP's fluctuation metric."""

from __future__ import annotations

import torch

from taskprune.profile import Profile
from taskprune.scoring.common import require_model, row_norms, target_stats, token_l2, token_var


def wanda_sp(profile: Profile, model=None, adapter=None) -> torch.Tensor:
    """`||W_down[:, j]||_1 * ||h_j||_2`, the norm over every target token (a sum, not a per-token mean)."""
    rows = require_model("wanda-sp", profile, model, adapter)
    return row_norms(rows, "down", 1) * token_l2("wanda-sp", target_stats(profile))


def flap(profile: Profile, model=None, adapter=None) -> torch.Tensor:
    """`Var_t(h_j) * ||W_down[:, j]||_2^2`, sample variance (N - 1) over the target tokens (FLAP)."""
    rows = require_model("flap", profile, model, adapter)
    return token_var("flap", target_stats(profile)) * row_norms(rows, "down").square()
