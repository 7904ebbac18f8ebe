"""Scorers that weigh target importance against general (distractor) importance.

Both use the Wanda-style importance `I_j = ||W_down[:, j]||_2 * rms_t(h_j)`, with the per-token RMS
`sqrt(sum_t h_j^2 / tokens)` so that sets of different sizes are comparable. `||W_down[:, j]||_2 *
||h_j||_2` is exactly the L2 norm over tokens of the neuron's contribution `W_down[:, j] h_j` to the
residual stream. "General" is the distractor sets pooled token by token; "task" is the target.
"""

from __future__ import annotations

import torch

from taskprune.profile import Profile
from taskprune.scoring.common import distractor_stats, require_model, row_norms, target_stats, token_rms

EPS = 1e-12


def _importances(name, profile, model, adapter, distractors):
    rows = require_model(name, profile, model, adapter)
    w = row_norms(rows, "down")
    n_task = token_rms(name, target_stats(profile))
    n_gen = token_rms(name, distractor_stats(name, profile, distractors))
    return w * n_task, w * n_gen, n_task, n_gen


def taskaware(profile: Profile, model=None, adapter=None, distractors: list[str] | None = None,
              tau: float = 0.3, gamma: float = 0.5) -> torch.Tensor:
    """Task-aware fusion (a reading of arXiv 2510.22489; see docs/scorers.md).

    `r_j = |n_task - n_gen| / max(n_task, n_gen)` (activation RMS). Shared (`r <= tau`):
    `(I_task + I_gen) / 2`. Task-exclusive (`r > tau`, `n_task > n_gen`): `I_task + B_l` with
    `B_l = max over the layer of max(I_task, I_gen)`, so every task-exclusive neuron outranks every
    other neuron of its layer. General-exclusive (`r > tau`, `n_gen > n_task`): `gamma * I_gen`.
    """
    i_task, i_gen, n_task, n_gen = _importances("taskaware", profile, model, adapter, distractors)
    r = (n_task - n_gen).abs() / torch.maximum(n_task, n_gen).clamp(min=EPS)
    task_only = (r > tau) & (n_task > n_gen)
    gen_only = (r > tau) & (n_gen > n_task)
    bonus = torch.maximum(i_task, i_gen).amax(dim=1, keepdim=True)
    out = (i_task + i_gen) / 2
    out = torch.where(task_only, i_task + bonus, out)
    return torch.where(gen_only, gamma * i_gen, out)


def specific_importance(profile: Profile, model=None, adapter=None, distractors: list[str] | None = None,
                        lam: float = 1.0) -> torch.Tensor:
    """`t - lam * relu(d - t)` with `t = I_task / mean_layer(I_task)`, `d = I_gen / mean_layer(I_gen)`.

    Neurons that matter for the target keep their (layer-normalised) target importance; neurons that
    matter more for the distractors than for the target are pushed down by the excess. Low is pruned first.
    """
    i_task, i_gen, _, _ = _importances("specific-importance", profile, model, adapter, distractors)
    t = i_task / i_task.mean(dim=1, keepdim=True).clamp(min=EPS)
    d = i_gen / i_gen.mean(dim=1, keepdim=True).clamp(min=EPS)
    return t - lam * (d - t).clamp(min=0)
