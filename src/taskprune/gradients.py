"""Streamed gradient statistics of the MLP intermediate activation `h` (input of `down_proj`).

Two kinds, each a few float64 `[layers, d_ff]` sums (plus counts) whatever the number of prompts:

* `taylor` (first-order Taylor, LLM-Pruner style). The loss of a text is the sum over its positions
  of the next-token cross-entropy on the text itself (positions 0..T-2 predict tokens 1..T-1; the
  whole captured text, i.e. the prompt, or prompt+response when that is what was captured). With
  `g = dL/dh` (total derivative, lower layers fixed), per neuron:
  `taylor.hg = sum over texts and tokens of h*g` (signed; `-taylor.hg` is the first-order change of
  the summed loss when the neuron is removed), `taylor.abs = sum of |h*g|`, `taylor.tokens` = tokens.
* `ig` (Integrated Gradients, after arXiv 2507.09185). Per text, an unscaled forward gives the
  model's own greedy prediction `y_t` and its probability `p_t` at each position; the *selected*
  positions S are the candidate positions (`positions="all"`: every token; `"answer"`: from the last
  prompt token on) with `p_t > threshold`. `F = sum over t in S of log p(y_t | x_<=t)`. For each
  layer l on its own, the activation of layer l at the positions in S is scaled by alpha from a zero
  baseline to its value (other positions and other layers unchanged) and
  `A[l, j] = sum over t in S of h[t, j] * mean_k dF/dx[t, j] (alpha_k * h)`, `alpha_k = (k - 1/2) / m`
  (Riemann midpoint, m steps). Completeness: `sum_j A[l, j] ~= F(h) - F(h with layer l zeroed on S)`,
  with an O(1/m^2) error. Stored: `ig.sum` (sum over texts of A) and `ig.positions` (|S| summed).
  Cost per batch: one forward, then layers x m forward+backward passes, each through the layers from
  the scaled one up only (the lower ones do not depend on alpha), with logits at the selected columns only.

Batches are right-padded with position ids from the attention mask, each text's loss is a sum over
its own positions, so every statistic is a sum of per-text terms: independent of batch size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from taskprune.capture import encode_texts
from taskprune.models.adapters import MLPAdapter, down_proj_hooks
from taskprune.models.batch import PaddedBatch, pad_batch
from taskprune.models.load import input_device

KINDS = ("taylor", "ig")
IG_POSITIONS = ("all", "answer")


class _FrozenParams:
    """Parameters stop requiring grad for the pass (no weight gradients are needed), then are restored."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.saved = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in self.saved:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p, flag in self.saved:
            p.requires_grad_(flag)


def _forward(model, batch: PaddedBatch, **kwargs):
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                 use_cache=False, **kwargs).logits


def _taylor_batch(model, adapter: MLPAdapter, batch: PaddedBatch, acc: dict) -> None:
    """One forward+backward: accumulate sum h*g and sum |h*g| over valid tokens, for every layer."""
    hs: list[torch.Tensor | None] = [None] * len(adapter.mlps(model))

    def record(layer: int, h: torch.Tensor) -> None:
        hs[layer] = h

    emb = model.get_input_embeddings()
    with emb.register_forward_hook(lambda m, a, out: out.requires_grad_()), down_proj_hooks(model, adapter, record):
        logits = _forward(model, batch)
    ids, mask = batch.input_ids, batch.attention_mask
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                           reduction="sum")
    grads = torch.autograd.grad(loss, hs)
    valid = mask.unsqueeze(-1).bool()
    for layer, (h, g) in enumerate(zip(hs, grads)):
        hg = (h.detach().double() * g.double()).masked_fill(~valid, 0)
        acc["taylor.hg"][layer] += hg.sum((0, 1)).cpu()
        acc["taylor.abs"][layer] += hg.abs().sum((0, 1)).cpu()
    acc["taylor.tokens"] += float(mask.sum())


def _selected_positions(logits, mask, starts, threshold) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy predictions `y` [B, T] and the boolean mask of selected positions [B, T]."""
    probs = logits.float().softmax(-1)
    p, y = probs.max(-1)
    cols = torch.arange(mask.shape[1], device=mask.device)
    candidate = mask.bool() & (cols.unsqueeze(0) >= starts.unsqueeze(1))
    return y, candidate & (p > threshold)


class _SkipLowerLayers:
    """For the IG steps of layer l: the decoder layers below l do not depend on the scale, so they are
    not run again. Their `forward` is replaced for the duration: the first returns the input that layer
    l received in the unscaled forward, the others pass it on (in the real layers' output format).
    Embedding, masks, rotary embeddings, final norm and head run as usual."""

    def __init__(self, layers: nn.ModuleList, inputs: list[torch.Tensor], as_tuple: bool):
        self.layers, self.inputs, self.as_tuple = layers, inputs, as_tuple

    def __call__(self, layer: int) -> "_SkipLowerLayers":
        self.layer = layer
        return self

    def __enter__(self) -> None:
        self.saved = [(m, m.__dict__.get("forward")) for m in self.layers[:self.layer]]
        for i, (m, _) in enumerate(self.saved):
            cached = self.inputs[self.layer] if i == 0 else None
            m.forward = self._replay(cached)

    def _replay(self, cached: torch.Tensor | None):
        def forward(hidden_states, *args, **kwargs):
            h = cached if cached is not None else hidden_states
            return (h,) if self.as_tuple else h
        return forward

    def __exit__(self, *exc) -> None:
        for m, forward in self.saved:
            del m.forward
            if forward is not None:  # e.g. a device-placement wrapper installed on the instance
                m.forward = forward


def _layer_inputs(model, adapter: MLPAdapter, batch: PaddedBatch) -> tuple[torch.Tensor, list[torch.Tensor], bool]:
    """One unscaled forward: logits, each decoder layer's input hidden states, and whether layers
    return tuples (older transformers) or tensors."""
    layers = adapter.layers(model)
    inputs: list = [None] * len(layers)
    out_tuple: list[bool] = []

    def record(i):
        def pre_hook(module, args, kwargs):
            inputs[i] = (args[0] if args else kwargs["hidden_states"]).detach()
        return pre_hook

    handles = [m.register_forward_pre_hook(record(i), with_kwargs=True) for i, m in enumerate(layers)]
    handles.append(layers[0].register_forward_hook(lambda m, a, out: out_tuple.append(isinstance(out, tuple))))
    try:
        logits = _forward(model, batch)
    finally:
        for h in handles:
            h.remove()
    return logits, inputs, out_tuple[0]


def _ig_batch(model, adapter: MLPAdapter, batch: PaddedBatch, starts, steps, threshold, acc: dict) -> None:
    """IG of F = sum of the greedy log-probabilities at the selected positions, layer by layer.

    Each step computes only what depends on the scale: the layers from the scaled one up (see
    `_SkipLowerLayers`) and the head's logits at the columns holding a selected position."""
    with torch.no_grad():
        logits, inputs, as_tuple = _layer_inputs(model, adapter, batch)
        y, sel = _selected_positions(logits, batch.attention_mask, starts, threshold)
        del logits
    count = int(sel.sum())
    if count == 0:
        return
    cols = sel.any(0).nonzero().flatten()  # sorted, so sel[:, cols] keeps sel's row-major order
    sel_kept, y_sel = sel[:, cols], y[sel]
    skip = _SkipLowerLayers(adapter.layers(model), inputs, as_tuple)
    state: dict = {}

    def scale(layer: int, h: torch.Tensor) -> torch.Tensor:
        h = h.detach()
        h_sel = h[sel]  # [count, d_ff]
        state["h"] = h_sel
        state["x"] = (state["alpha"] * h_sel).requires_grad_(True)
        return h.index_put((sel,), state["x"])

    for layer in range(len(inputs)):
        grad_sum = None
        with down_proj_hooks(model, adapter, scale, layers=[layer]), skip(layer):
            for k in range(steps):
                state["alpha"] = (k + 0.5) / steps
                logits = _forward(model, batch, logits_to_keep=cols)
                logp = logits[sel_kept].float().log_softmax(-1)  # [count, vocab]
                f = logp.gather(-1, y_sel.unsqueeze(-1)).sum()
                (g,) = torch.autograd.grad(f, state["x"])
                g = g.double()
                grad_sum = g if grad_sum is None else grad_sum + g
        acc["ig.sum"][layer] += (state["h"].double() * grad_sum / steps).sum(0).cpu()
    acc["ig.positions"] += float(count)


def check_settings(kinds: Sequence[str], ig_steps: int = 20, ig_positions: str = "all") -> None:
    """Refuse unknown gradient kinds or IG options before any work is done."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"gradient kinds must be some of {', '.join(KINDS)}, got {list(kinds)}")
    if ig_steps < 1:
        raise ValueError(f"ig_steps must be at least 1, got {ig_steps}")
    if ig_positions not in IG_POSITIONS:
        raise ValueError(f"ig_positions must be one of {IG_POSITIONS}, got {ig_positions!r}")


def gradient_stats(model: nn.Module, tokenizer, texts: Sequence[str], adapter: MLPAdapter,
                   kinds: Sequence[str] = ("taylor",), max_length: int = 512, batch_size: int = 4,
                   max_prompts: int | None = None, ig_steps: int = 20, ig_threshold: float = 0.5,
                   ig_positions: str = "all", prompt_lengths: Sequence[int] | None = None,
                   progress: bool = True, desc: str = "gradients") -> dict[str, torch.Tensor]:
    """Streamed gradient statistics of `texts` (see the module docstring); returns float64 tensors:
    `taylor.hg`, `taylor.abs` `[layers, d_ff]` and `taylor.tokens` `[1]` for "taylor";
    `ig.sum` `[layers, d_ff]` and `ig.positions` `[1]` for "ig". `max_prompts` keeps the first ones.
    `prompt_lengths` (tokens of each text's prompt part) is needed for `ig_positions="answer"`.
    """
    kinds = tuple(dict.fromkeys(kinds))
    check_settings(kinds, ig_steps, ig_positions)
    if batch_size < 1 or (max_prompts is not None and max_prompts < 1):
        raise ValueError(f"batch_size and max_prompts must be positive, got {batch_size} and {max_prompts}")
    if not texts:
        raise ValueError("the gradient pass needs at least one text")
    texts = list(texts)[:max_prompts] if max_prompts is not None else list(texts)
    encoded, _ = encode_texts(tokenizer, texts, max_length)  # as capture makes them
    if ig_positions == "answer":
        if prompt_lengths is None:
            raise ValueError("ig_positions='answer' needs prompt_lengths (tokens of each text's prompt part)")
        starts_all = [max(min(p, len(ids)) - 1, 0) for p, ids in zip(prompt_lengths, encoded)]
    else:
        starts_all = [0] * len(encoded)

    layers, d_ff = len(adapter.mlps(model)), adapter.d_ff(model)
    z = lambda: torch.zeros(layers, d_ff, dtype=torch.float64)  # noqa: E731
    acc: dict[str, torch.Tensor] = {}
    if "taylor" in kinds:
        acc.update({"taylor.hg": z(), "taylor.abs": z(), "taylor.tokens": torch.zeros(1, dtype=torch.float64)})
    if "ig" in kinds:
        acc.update({"ig.sum": z(), "ig.positions": torch.zeros(1, dtype=torch.float64)})

    device = input_device(model)
    pad_id = adapter.pad_id(tokenizer)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(False), torch.enable_grad(), _FrozenParams(model), \
                tqdm(total=len(texts), desc=desc, unit="prompt", disable=not progress) as bar:
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                batch = pad_batch([encoded[i] for i in rows], pad_id).to(device)
                if "taylor" in kinds:
                    _taylor_batch(model, adapter, batch, acc)
                if "ig" in kinds:
                    starts = torch.tensor([starts_all[i] for i in rows], device=device)
                    _ig_batch(model, adapter, batch, starts, ig_steps, ig_threshold, acc)
                bar.update(len(rows))
                if "ig" in kinds:
                    bar.set_postfix(ig_positions=int(acc["ig.positions"]))
    finally:
        model.train(was_training)
    return acc


def prompt_token_lengths(tokenizer, full_texts: Sequence[str], prompt_texts: Sequence[str]) -> list[int]:
    """Tokens of each text's prompt part, for `ig_positions="answer"`; the prompt text must be a prefix."""
    out = []
    for full, prompt in zip(full_texts, prompt_texts):
        if not full.startswith(prompt):
            raise ValueError("the prompt-only text is not a prefix of the captured text; use ig_positions='all'")
        out.append(len(tokenizer(prompt, add_special_tokens=False)["input_ids"]))
    return out


__all__ = ["KINDS", "IG_POSITIONS", "check_settings", "gradient_stats", "prompt_token_lengths"]
