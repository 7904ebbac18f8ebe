"""Architecture adapters: the only place that knows an architecture's module names and conventions.

Capture, gradients, planning, surgery, recovery and evaluation ask an adapter for: the decoder stack
without the LM head and its layers, the layers' MLPs and the `down_proj` whose *input* is the
intermediate activation `h` (and its width `d_ff`), slicing an MLP to a subset of its intermediate
neurons (keeping their order), the Linear modules LoRA adapts, whether a scored text starts with
BOS, and the token id that fills padding. `down_proj_hooks` installs a forward pre-hook on every
(or some) `down_proj` for the length of a `with` block.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from types import MappingProxyType
from typing import ClassVar

import torch
from torch import nn

# The projections LoRA adapts by default (the paper's q,k,v,o,gate,up,down), in the separate-projection
# naming; an adapter maps them onto fused modules where its architecture has them.
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class UnsupportedArchitectureError(ValueError):
    """The model's architecture has no MLP adapter."""


class TargetModuleError(ValueError):
    """Requested LoRA target modules that the model does not have."""


def _slice_linear(linear: nn.Linear, keep: torch.Tensor, dim: int) -> None:
    """Keep `keep` along `dim` of a Linear's weight (0: output rows, 1: input columns), in place."""
    keep = keep.to(linear.weight.device)
    linear.weight = nn.Parameter(linear.weight.data.index_select(dim, keep).clone(),
                                 requires_grad=linear.weight.requires_grad)
    if dim == 0:
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.data.index_select(0, keep).clone(),
                                       requires_grad=linear.bias.requires_grad)
        linear.out_features = len(keep)
    else:
        linear.in_features = len(keep)


@dataclass(frozen=True)
class GatedMLPAdapter:
    """SwiGLU/GeGLU MLP with separate `gate_proj`, `up_proj` and `down_proj` (Llama, Qwen, Mistral, Gemma)."""

    name: str
    add_bos: bool = False  # scored texts start with BOS (lm-evaluation-harness: Gemma only, badly off without it)
    # Fused projection -> the separate projections it stands for, where the architecture fuses them.
    fused: ClassVar[Mapping[str, tuple[str, ...]]] = MappingProxyType({})

    def decoder(self, model: nn.Module) -> nn.Module:
        """The decoder stack without the LM head (`model.model` for every supported family)."""
        return getattr(model, model.base_model_prefix, model)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers (`model.model.layers` for every supported family)."""
        layers = getattr(self.decoder(model), "layers", None)
        if layers is None:
            raise UnsupportedArchitectureError(f"could not find decoder layers on {type(model).__name__} "
                                               f"(looked for .{model.base_model_prefix}.layers)")
        return layers

    def mlps(self, model: nn.Module) -> list[nn.Module]:
        return [layer.mlp for layer in self.layers(model)]

    def down_proj(self, mlp: nn.Module) -> nn.Linear:
        return mlp.down_proj

    def d_ff(self, model: nn.Module) -> int:
        """The MLP width (input features of the first layer's `down_proj`)."""
        return self.down_proj(self.mlps(model)[0]).in_features

    def pad_id(self, tokenizer) -> int:
        """The id that fills padding: the tokenizer's pad token, else its EOS, else 0. Padded positions
        are masked out of attention and of every statistic and loss, so the value never reaches a result."""
        for tok_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
            if tok_id is not None:
                return tok_id
        return 0

    def lora_targets(self, model: nn.Module, requested: Sequence[str] = DEFAULT_LORA_TARGETS) -> list[str]:
        """The decoder layers' Linear module names to adapt: `requested`, with the fused projections
        standing in for their parts where the model has them. Raises `TargetModuleError` if one is missing."""
        present = {name.rsplit(".", 1)[-1] for name, mod in self.layers(model).named_modules()
                   if isinstance(mod, nn.Linear)}
        chosen = {name for name in requested if name in present}
        for fused, parts in self.fused.items():
            if fused in present and (fused in requested or set(parts) & set(requested)):
                chosen.add(fused)
        covered = chosen | {p for fused in chosen & set(self.fused) for p in self.fused[fused]}
        missing = [name for name in requested if name not in covered]
        if not chosen or missing:
            raise TargetModuleError(f"target modules {', '.join(missing or requested)} not found among the decoder "
                                    f"layers' Linear modules ({', '.join(sorted(present))})")
        return sorted(chosen)

    def slice(self, mlp: nn.Module, keep: torch.Tensor) -> None:
        _slice_linear(mlp.gate_proj, keep, 0)
        _slice_linear(mlp.up_proj, keep, 0)
        _slice_linear(mlp.down_proj, keep, 1)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = len(keep)

    def weight_rows(self, mlp: nn.Module) -> dict[str, torch.Tensor]:
        """Per-neuron weights: gate and up rows `[d_ff, d]`, down columns as rows `[d_ff, d]`."""
        return {"gate": mlp.gate_proj.weight, "up": mlp.up_proj.weight, "down": mlp.down_proj.weight.T}

    # A layer's MLP tensors in a checkpoint, by name after `<layers>.<i>.`: the dimension that runs over
    # the intermediate neurons and how many d_ff blocks it holds (2 where gate and up are fused).
    mlp_tensors: ClassVar[Mapping[str, tuple[int, int]]] = MappingProxyType({
        "mlp.gate_proj.weight": (0, 1), "mlp.gate_proj.bias": (0, 1), "mlp.up_proj.weight": (0, 1),
        "mlp.up_proj.bias": (0, 1), "mlp.down_proj.weight": (1, 1)})
    layers_prefix: ClassVar[str] = "model.layers."

    def checkpoint_slice(self, name: str) -> tuple[int, int, int] | None:
        """For a checkpoint tensor name, `(layer, dim, blocks)` if it is an MLP tensor that pruning slices
        (surgery on the checkpoint itself, without a model), else None."""
        if not name.startswith(self.layers_prefix):
            return None
        layer, _, rest = name[len(self.layers_prefix):].partition(".")
        if not layer.isdigit() or rest not in self.mlp_tensors:
            return None
        return (int(layer), *self.mlp_tensors[rest])


@dataclass(frozen=True)
class FusedGateUpAdapter(GatedMLPAdapter):
    """MLP with one fused `gate_up_proj` (gate half first, then up half) and `down_proj`, attention with one
    fused `qkv_proj` (Phi-3)."""

    fused: ClassVar[Mapping[str, tuple[str, ...]]] = MappingProxyType(
        {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")})

    def slice(self, mlp: nn.Module, keep: torch.Tensor) -> None:
        d_ff = mlp.down_proj.in_features
        keep = keep.to(mlp.gate_up_proj.weight.device)
        _slice_linear(mlp.gate_up_proj, torch.cat([keep, keep + d_ff]), 0)
        _slice_linear(mlp.down_proj, keep, 1)

    mlp_tensors: ClassVar[Mapping[str, tuple[int, int]]] = MappingProxyType({
        "mlp.gate_up_proj.weight": (0, 2), "mlp.down_proj.weight": (1, 1)})

    def weight_rows(self, mlp: nn.Module) -> dict[str, torch.Tensor]:
        gate, up = mlp.gate_up_proj.weight.chunk(2, dim=0)
        return {"gate": gate, "up": up, "down": mlp.down_proj.weight.T}


MLPAdapter = GatedMLPAdapter  # FusedGateUpAdapter is a subclass

ADAPTERS: dict[str, MLPAdapter] = {
    "llama": GatedMLPAdapter("llama"),
    "qwen2": GatedMLPAdapter("qwen2"),
    "qwen3": GatedMLPAdapter("qwen3"),
    "mistral": GatedMLPAdapter("mistral"),
    "gemma": GatedMLPAdapter("gemma", add_bos=True),
    "gemma2": GatedMLPAdapter("gemma2", add_bos=True),
    "gemma3_text": GatedMLPAdapter("gemma3_text", add_bos=True),
    "phi3": FusedGateUpAdapter("phi3"),
}


def get_adapter(model_type: str) -> MLPAdapter:
    """The adapter for a `config.model_type`, or an error that lists what is supported."""
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"architecture {model_type!r} is not supported; supported model types: "
            f"{', '.join(sorted(ADAPTERS))}. Adding one is a small adapter in taskprune/models/adapters.py."
        ) from None


def model_adapter(model: nn.Module) -> MLPAdapter:
    """The adapter for a model, by its `config.model_type`."""
    return get_adapter(model.config.model_type)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a model of a supported architecture."""
    return model_adapter(model).layers(model)


@contextmanager
def down_proj_hooks(model: nn.Module, adapter: MLPAdapter, fn: Callable[[int, torch.Tensor], torch.Tensor | None],
                    layers: Sequence[int] | None = None) -> Iterator[None]:
    """For the `with` block, `fn(layer, h)` runs before the `down_proj` of each of `layers` (default: all)
    with its input `h`; a tensor it returns replaces `h`. The hooks are removed on exit, also on error."""
    mlps = adapter.mlps(model)
    with ExitStack() as stack:
        for layer in range(len(mlps)) if layers is None else layers:
            stack.enter_context(adapter.down_proj(mlps[layer]).register_forward_pre_hook(_pre_hook(fn, layer)))
        yield


def _pre_hook(fn: Callable[[int, torch.Tensor], torch.Tensor | None], layer: int):
    def pre_hook(module: nn.Module, args: tuple) -> tuple | None:
        h = fn(layer, args[0])
        return None if h is None else (h, *args[1:])
    return pre_hook
