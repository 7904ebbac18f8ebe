"""Weight magnitude per neuron (data-free)."""

from __future__ import annotations

import torch

from taskprune.profile import Profile
from taskprune.scoring.common import require_model, row_norms


def magnitude(profile: Profile, model=None, adapter=None) -> torch.Tensor:
    """`||W_gate[j, :]||_2 * ||W_up[j, :]||_2 * ||W_down[:, j]||_2`, float64 `[layers, d_ff]`.

    The product, not the sum: it is invariant to the exact symmetry `W_up[j] *= c, W_down[:, j] /= c`
    and scales like the neuron's output. Low is pruned first.
    """
    rows = require_model("magnitude", profile, model, adapter)
    out = row_norms(rows, "down")
    for part in ("gate", "up"):
        if part in rows[0]:
            out = out * row_norms(rows, part)
    return out
