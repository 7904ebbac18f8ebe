"""Models: loading from any source, per-architecture adapters, and batch padding."""

from taskprune.models.adapters import (
    ADAPTERS,
    DEFAULT_LORA_TARGETS,
    MLPAdapter,
    TargetModuleError,
    UnsupportedArchitectureError,
    decoder_layers,
    down_proj_hooks,
    get_adapter,
    model_adapter,
)
from taskprune.models.batch import IGNORE_INDEX, PaddedBatch, pad_batch
from taskprune.models.load import (
    PACKAGED,
    LoadedModel,
    ModelLoadError,
    config_hash,
    input_device,
    load_model,
    resolve_dtype,
    weights_fingerprint,
)

__all__ = [
    "ADAPTERS", "DEFAULT_LORA_TARGETS", "MLPAdapter", "TargetModuleError", "UnsupportedArchitectureError",
    "decoder_layers", "down_proj_hooks", "get_adapter", "model_adapter",
    "IGNORE_INDEX", "PaddedBatch", "pad_batch",
    "PACKAGED", "LoadedModel", "ModelLoadError", "config_hash", "input_device", "load_model", "resolve_dtype",
    "weights_fingerprint",
]
