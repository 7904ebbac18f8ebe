"""oneDNN-packed bf16 weights for the CPU engine's linear layers, for the length of one `generate` call.

`torch.nn.functional.linear` on a CPU hands oneDNN the plain row-major weight at every call; oneDNN's own
blocked layout (``torch.ops.mkldnn._reorder_linear_weight``, what inductor's CPU backend packs weights into)
lets the same product run from it directly. On a 2-core Xeon with AMX (bf16, one 1536 x 8960 MLP product
of Qwen2.5-1.5B) that took 1.22 -> 0.88 ms at 1 row, 1.38 -> 0.85 ms at 8, 2.11 -> 1.64 ms at 32, 7.2 ->
4.7 ms at 150 (a one-prompt prefill) and 104 -> 90 ms at 2,112 (an 8-prompt prefill), with bit-identical
results. The pack is a second copy of the weights, so it is made only where the free memory holds it
twice over, and dropped when the call ends.

Only bf16 weights on a CPU whose oneDNN has bf16 kernels are packed: fp32 stays on the plain path, whose
batched-equals-batch-1 outputs the tests pin, and so do layers with hooks (accelerate's offload, capture)
and the output head (a tied head would copy the embedding matrix).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import psutil
import torch

__all__ = ["packable", "prepacked"]

ROWS_HINT = 8  # the row count oneDNN's layout is chosen for; 8, 32 and 256 gave the same speeds at 1-2,112 rows


def packable(model: torch.nn.Module) -> list[torch.nn.Linear]:
    """The linear layers of `model` that `prepacked` would pack (empty where it would pack none)."""
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return []
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    layers = [m for m in model.modules() if type(m) is torch.nn.Linear and m is not head]
    plain = all(m.weight.device.type == "cpu" and m.weight.dtype == torch.bfloat16 and not m._forward_hooks
                and not m._forward_pre_hooks and "forward" not in m.__dict__ for m in layers)
    return layers if plain else []


def _packed_linear(x: torch.Tensor, *, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@contextmanager
def prepacked(model: torch.nn.Module) -> Iterator[bool]:
    """Run `model`'s `packable` linear layers from oneDNN-packed copies of their weights inside the block, where
    the free memory holds those weights twice over; yields whether it did. The layers' own forwards come back
    at the end, and the packs are freed."""
    layers = packable(model)
    size = sum(m.weight.numel() * m.weight.element_size() for m in layers)
    if not layers or psutil.virtual_memory().available < 2 * size:
        yield False
        return
    try:
        for m in layers:
            weight = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), ROWS_HINT)
            bias = None if m.bias is None else m.bias.detach()
            m.forward = partial(_packed_linear, weight=weight, bias=bias)
        yield True
    finally:
        for m in layers:
            m.__dict__.pop("forward", None)
