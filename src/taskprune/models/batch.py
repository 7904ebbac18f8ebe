"""Padding a batch of token id lists: the one place that builds `input_ids`, `attention_mask` and labels.

The pad id comes from the adapter (`MLPAdapter.pad_id`). Position ids follow the attention mask, so
padding never shifts a row's positions, whichever side it is on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100  # label of positions without a loss (prompt, padding)
SIDES = ("right", "left")


@dataclass(frozen=True)
class PaddedBatch:
    input_ids: torch.Tensor  # [B, T] long, the pad id on padding
    attention_mask: torch.Tensor  # [B, T] long, 1 on real tokens
    labels: torch.Tensor | None = None  # [B, T] long, IGNORE_INDEX on padding; only when labels were given

    @property
    def position_ids(self) -> torch.Tensor:
        """0, 1, ... along each row's real tokens (left padding gets 0, right padding the last position)."""
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)

    def to(self, device: torch.device | str) -> PaddedBatch:
        labels = None if self.labels is None else self.labels.to(device)
        return PaddedBatch(self.input_ids.to(device), self.attention_mask.to(device), labels)


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, side: str = "right",
              labels: Sequence[Sequence[int]] | None = None) -> PaddedBatch:
    """Pad `seqs` to their longest on `side` ("right" or "left"); `labels` (one list per sequence, of the
    same length) are padded with IGNORE_INDEX."""
    if side not in SIDES:
        raise ValueError(f"padding side must be 'right' or 'left', not {side!r}")
    width = max(len(seq) for seq in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    padded_labels = None if labels is None else torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
    for row, seq in enumerate(seqs):
        cols = slice(0, len(seq)) if side == "right" else slice(width - len(seq), width)
        ids[row, cols] = torch.tensor(seq, dtype=torch.long)
        mask[row, cols] = 1
        if padded_labels is not None:
            padded_labels[row, cols] = torch.tensor(labels[row], dtype=torch.long)
    return PaddedBatch(ids, mask, padded_labels)
