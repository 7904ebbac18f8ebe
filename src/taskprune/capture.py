"""Capture streamed per-neuron statistics of the MLP intermediate activation `h` (input of `down_proj`).

Per prompt, the mean of `|h|` over its valid tokens (the paper's eq. 7). Per data set and neuron,
the count, sum and sum of squares of those prompt means, in float64 and streamed, so memory is
O(layers x d_ff) whatever the number of prompts. Token-level sums of `h` and `h^2` (activation
norms and variances, which only some scorers read) are kept when asked for (`token_stats`). Padding
never enters a statistic and position ids follow the attention mask, so the result does not depend
on batch size or padding side.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from taskprune.models.adapters import MLPAdapter, down_proj_hooks
from taskprune.models.batch import pad_batch
from taskprune.models.load import input_device


@dataclass
class SetStats:
    """Streamed statistics of one data set; tensors are float64 `[layers, d_ff]`."""

    n: int  # prompts
    sum: torch.Tensor  # sum over prompts of the prompt-level mean |h|
    sumsq: torch.Tensor  # sum over prompts of its square
    tokens: int  # valid tokens
    tok_sum: torch.Tensor | None  # sum over tokens of h (None when token statistics were not captured)
    tok_sumsq: torch.Tensor | None  # sum over tokens of h^2 (likewise)
    truncated: int = 0  # prompts cut to max_length
    per_prompt: torch.Tensor | None = None  # [n, layers, d_ff] float32, only when asked for
    # Further additive statistics by key (e.g. the gradient pass's "taylor.hg", "ig.sum", counts as
    # 1-element tensors); saved as "{set}/extra/{key}". See taskprune.gradients.
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def zeros(cls, layers: int, d_ff: int, token_stats: bool) -> "SetStats":
        z = lambda: torch.zeros(layers, d_ff, dtype=torch.float64)  # noqa: E731
        return cls(0, z(), z(), 0, z() if token_stats else None, z() if token_stats else None)

    @property
    def has_token_stats(self) -> bool:
        return self.tok_sum is not None and self.tok_sumsq is not None

    @property
    def mean(self) -> torch.Tensor:
        """Mean over prompts of the prompt-level mean |h|."""
        return self.sum / self.n

    def merged(self, other: "SetStats") -> "SetStats":
        """Statistics of the union of two disjoint prompt sets (per-prompt rows are not merged; extra
        and token statistics are summed where both sets have them and dropped where only one has)."""
        extra = {k: v + other.extra[k] for k, v in self.extra.items() if k in other.extra}
        both = self.has_token_stats and other.has_token_stats
        return SetStats(self.n + other.n, self.sum + other.sum, self.sumsq + other.sumsq,
                        self.tokens + other.tokens, self.tok_sum + other.tok_sum if both else None,
                        self.tok_sumsq + other.tok_sumsq if both else None, self.truncated + other.truncated,
                        extra=extra)


def encode_texts(tokenizer, texts: Sequence[str], max_length: int) -> tuple[list[list[int]], int]:
    """Token ids of `texts` without special tokens added, cut to `max_length` (an empty text becomes
    one EOS), and how many were cut."""
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    truncated = sum(len(ids) > max_length for ids in encoded)
    return [ids[:max_length] or [tokenizer.eos_token_id] for ids in encoded], truncated


_CHUNK = 128  # tokens per step of the masked sums: each chunk's |h| or h^2 temporary stays in cache


def _masked_sums(m: torch.Tensor, h: torch.Tensor, squares: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sums over valid tokens of `|h|` (and of `h^2` when `squares`), float64 `[B, d_ff]`, with
    `m` the `[B, 1, T]` mask in `h`'s dtype.

    Batched mat-vec products over a chunk of tokens at a time: one read of `h` and a cache-sized
    temporary instead of a full-size copy (3x faster than one product over all tokens on CPU). On
    bf16 models each chunk's sum is rounded once to bf16, ~0.4%, the precision `h` itself has; fp32
    models are exact. Accumulation is float64 from there.
    """
    abs_sum = torch.zeros(h.shape[0], h.shape[2], dtype=torch.float64, device=h.device)
    sq_sum = torch.zeros_like(abs_sum) if squares else None
    for start in range(0, h.shape[1], _CHUNK):
        mask, part = m[:, :, start:start + _CHUNK], h[:, start:start + _CHUNK].abs()
        abs_sum += torch.bmm(mask, part).squeeze(1)
        if squares:
            sq_sum += torch.bmm(mask, part.square_()).squeeze(1)
    return abs_sum, sq_sum


class _Recorder:
    """Folds each `down_proj` input of the batch in flight into a `SetStats` (see `down_proj_hooks`)."""

    def __init__(self, stats: SetStats, keep_per_prompt: bool):
        self.stats = stats
        self.keep_per_prompt = keep_per_prompt
        self.mask: torch.Tensor | None = None  # [B, T] of the batch in flight
        self.batch_rows: list[torch.Tensor | None] = []  # per layer, [B, d_ff] prompt means

    def record(self, layer: int, h: torch.Tensor) -> None:
        """Fold `h` [B, T, d_ff], the input of layer `layer`'s `down_proj`, into the statistics."""
        if h.dtype not in (torch.float32, torch.bfloat16, torch.float64):
            h = h.float()  # fp16 sums over tokens could overflow
        s = self.stats
        m = self.mask.to(h.dtype).unsqueeze(1)  # [B, 1, T]
        per_prompt_abs, squares = _masked_sums(m, h, s.has_token_stats)  # [B, d_ff]
        prompt_mean = per_prompt_abs / self.mask.sum(1, keepdim=True).double()
        s.sum[layer] += prompt_mean.sum(0).cpu()
        s.sumsq[layer] += prompt_mean.square().sum(0).cpu()
        if s.has_token_stats:
            s.tok_sum[layer] += torch.bmm(m, h).squeeze(1).double().sum(0).cpu()  # h is contiguous: no copy
            s.tok_sumsq[layer] += squares.sum(0).cpu()
        if self.keep_per_prompt:
            self.batch_rows[layer] = prompt_mean.float().cpu()


@torch.inference_mode()
def capture(model: nn.Module, tokenizer, texts: list[str], adapter: MLPAdapter, max_length: int = 512,
            batch_size: int = 8, keep_per_prompt: bool = False, token_stats: bool = False, padding_side: str = "right",
            progress: bool = True, desc: str = "capture", resume: SetStats | None = None,
            checkpoint: Callable[[SetStats], None] | None = None) -> SetStats:
    """Run `texts` through `model` and return the streamed statistics of every MLP's `h`.

    Texts are tokenized without special tokens added (chat-formatted text carries its own), cut to
    `max_length` tokens (counted in `truncated`), and batched longest-first to limit padding.
    `token_stats` also keeps the token sums of `h` and `h^2` (for wanda-sp, flap, taskaware and
    specific-importance; two more reductions per layer).

    A long capture can be resumed: `checkpoint` is called with the statistics after each batch (it
    decides whether to save them), and `resume`, statistics so saved for the same texts and settings,
    continues after the `resume.n` prompts they hold. The batches are the same either way, so the result
    equals an uninterrupted capture's.
    """
    if not texts:
        raise ValueError("capture needs at least one text")
    layers, d_ff = len(adapter.mlps(model)), adapter.d_ff(model)
    encoded, truncated = encode_texts(tokenizer, texts, max_length)
    stats = resume or SetStats.zeros(layers, d_ff, token_stats)
    stats.truncated = truncated
    if keep_per_prompt and stats.per_prompt is None:
        stats.per_prompt = torch.zeros(len(texts), layers, d_ff)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))

    recorder = _Recorder(stats, keep_per_prompt)
    device = input_device(model)
    decoder = adapter.decoder(model)  # the LM head is not needed
    pad_id = adapter.pad_id(tokenizer)
    with down_proj_hooks(model, adapter, recorder.record), \
            tqdm(total=len(texts), initial=stats.n, desc=desc, unit="prompt", disable=not progress) as bar:
        for start in range(stats.n, len(order), batch_size):
            rows = order[start:start + batch_size]
            batch = pad_batch([encoded[i] for i in rows], pad_id, padding_side).to(device)
            recorder.mask = batch.attention_mask
            recorder.batch_rows = [None] * layers
            decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    position_ids=batch.position_ids, use_cache=False)
            stats.n += len(rows)
            stats.tokens += int(batch.attention_mask.sum())
            if keep_per_prompt:
                stats.per_prompt[rows] = torch.stack(recorder.batch_rows, dim=1)
            bar.update(len(rows))
            bar.set_postfix(tokens=stats.tokens)
            if checkpoint is not None:
                checkpoint(stats)
    return stats
