"""Models: loading from any source and per-architecture MLP adapters."""

from taskprune.models.adapters import (
    ADAPTERS,
    MLPAdapter,
    UnsupportedArchitectureError,
    decoder_layers,
    get_adapter,
)
from taskprune.models.load import (
    PACKAGED,
    LoadedModel,
    ModelLoadError,
    config_hash,
    load_model,
    resolve_dtype,
    weights_fingerprint,
)

__all__ = [
    "ADAPTERS", "MLPAdapter", "UnsupportedArchitectureError", "decoder_layers", "get_adapter",
    "PACKAGED", "LoadedModel", "ModelLoadError", "config_hash", "load_model", "resolve_dtype",
    "weights_fingerprint",
]
