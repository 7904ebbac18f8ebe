"""MLP adapters: where each architecture keeps its MLP and how to slice it.

An adapter is the only place that knows an architecture's module names. Capture, planning and
surgery talk to it through three operations: list the decoder layers' MLPs, return the
`down_proj` whose *input* is the intermediate activation `h`, and slice an MLP to a subset of
its intermediate neurons (keeping their order).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class UnsupportedArchitectureError(ValueError):
    """The model's architecture has no MLP adapter."""


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


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM (`model.model.layers` for every supported family)."""
    base = getattr(model, model.base_model_prefix, model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise UnsupportedArchitectureError(
            f"could not find decoder layers on {type(model).__name__} (looked for .{model.base_model_prefix}.layers)"
        )
    return layers


@dataclass(frozen=True)
class GatedMLPAdapter:
    """SwiGLU/GeGLU MLP with separate `gate_proj`, `up_proj` and `down_proj` (Llama, Qwen, Mistral, Gemma)."""

    name: str

    def mlps(self, model: nn.Module) -> list[nn.Module]:
        return [layer.mlp for layer in decoder_layers(model)]

    def down_proj(self, mlp: nn.Module) -> nn.Linear:
        return mlp.down_proj

    def slice(self, mlp: nn.Module, keep: torch.Tensor) -> None:
        _slice_linear(mlp.gate_proj, keep, 0)
        _slice_linear(mlp.up_proj, keep, 0)
        _slice_linear(mlp.down_proj, keep, 1)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = len(keep)

    def weight_rows(self, mlp: nn.Module) -> dict[str, torch.Tensor]:
        """Per-neuron weights: gate and up rows `[d_ff, d]`, down columns as rows `[d_ff, d]`."""
        return {"gate": mlp.gate_proj.weight, "up": mlp.up_proj.weight, "down": mlp.down_proj.weight.T}


@dataclass(frozen=True)
class FusedGateUpAdapter(GatedMLPAdapter):
    """MLP with one fused `gate_up_proj` (gate half first, then up half) and `down_proj` (Phi-3)."""

    def slice(self, mlp: nn.Module, keep: torch.Tensor) -> None:
        d_ff = mlp.down_proj.in_features
        keep = keep.to(mlp.gate_up_proj.weight.device)
        _slice_linear(mlp.gate_up_proj, torch.cat([keep, keep + d_ff]), 0)
        _slice_linear(mlp.down_proj, keep, 1)

    def weight_rows(self, mlp: nn.Module) -> dict[str, torch.Tensor]:
        gate, up = mlp.gate_up_proj.weight.chunk(2, dim=0)
        return {"gate": gate, "up": up, "down": mlp.down_proj.weight.T}


MLPAdapter = GatedMLPAdapter  # FusedGateUpAdapter is a subclass

ADAPTERS: dict[str, MLPAdapter] = {
    "llama": GatedMLPAdapter("llama"),
    "qwen2": GatedMLPAdapter("qwen2"),
    "qwen3": GatedMLPAdapter("qwen3"),
    "mistral": GatedMLPAdapter("mistral"),
    "gemma": GatedMLPAdapter("gemma"),
    "gemma2": GatedMLPAdapter("gemma2"),
    "gemma3_text": GatedMLPAdapter("gemma3_text"),
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
