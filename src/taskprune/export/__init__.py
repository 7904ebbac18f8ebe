"""Deployment formats for a (pruned) checkpoint: a GGUF file for llama.cpp, Ollama and LM Studio
(`taskprune.export.gguf`) and an Ollama Modelfile beside it (`taskprune.export.modelfile`)."""

from taskprune.export.gguf import ARCHS, DEFAULT_QUANT, QUANTS, ExportError, export_gguf, write_gguf
from taskprune.export.modelfile import write_modelfile

__all__ = ["ARCHS", "DEFAULT_QUANT", "QUANTS", "ExportError", "export_gguf", "write_gguf", "write_modelfile"]
