"""Evaluation engines by name (`--backend`, study key `evaluation: backend:`): what decodes a task's
prompts. Every engine runs the same greedy loop (`taskprune.evaluate.generate.decode_greedy`) with the
same tokenizer, stop rules, budgets and records; they differ in what computes the logits.

    hf        transformers, on the model's device and dtype (the default)
    llamacpp  llama.cpp on a GGUF export of the same weights in the same dtype (taskprune.evaluate.llamacpp)
    vllm      vLLM on the same weights and dtype (taskprune.evaluate.vllm_engine; its own virtualenv)
    auto      the fastest of those installed here, by a short measurement cached per CPU, model and dtype

Multiple-choice tasks are log-likelihood scoring: with vLLM's prompt log-probabilities on `vllm` (an engine
with `continuation_logprobs`), else with transformers.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Protocol

from taskprune.evaluate.generate import EarlyStop, GenerationRecord, Timings, generate
from taskprune.evaluate.resources import decode_tokens_per_second
from taskprune.models import LoadedModel, config_hash

# The auto measurement: this many prompts, decoded this far, at the evaluation batch size.
PROBE_TOKENS = 32


class Backend(Protocol):
    name: str

    def generate(self, prompts: list[str], max_new_tokens: int, *, batch_size: int = 8, stop=None,
                 progress: bool = True, on_record=None, early: EarlyStop | None = None,
                 timings: Timings | None = None) -> list[GenerationRecord]:
        """`taskprune.evaluate.generate.generate` on this engine (`timings` filled by the engines whose steps
        `decode_greedy` drives: not vLLM's, which schedules its own)."""

    def tokens_per_second(self, prompts: list[str], new_tokens: int = 64) -> float:
        """Batch-1 decode speed over `prompts`, EOS ignored."""

    def close(self) -> None:
        ...


class TorchBackend:
    """The transformers engine (`taskprune.evaluate.generate`)."""

    name = "hf"

    def __init__(self, lm: LoadedModel, cache_dir: Path | None = None, progress: bool = True):
        self.lm = lm

    def generate(self, prompts: list[str], max_new_tokens: int, *, batch_size: int = 8, stop=None,
                 progress: bool = True, on_record=None, early: EarlyStop | None = None,
                 timings: Timings | None = None) -> list[GenerationRecord]:
        return generate(self.lm.model, self.lm.tokenizer, prompts, max_new_tokens, batch_size=batch_size, stop=stop,
                        progress=progress, on_record=on_record, early=early, timings=timings)

    def tokens_per_second(self, prompts: list[str], new_tokens: int = 64) -> float:
        return decode_tokens_per_second(self.lm.model, self.lm.tokenizer, prompts, new_tokens)

    def close(self) -> None:
        pass


def _llamacpp(lm: LoadedModel, cache_dir: Path | None = None, progress: bool = True) -> Backend:
    from taskprune.evaluate.llamacpp import LlamaCppBackend
    return LlamaCppBackend(lm, cache_dir, progress)


def _vllm(lm: LoadedModel, cache_dir: Path | None = None, progress: bool = True) -> Backend:
    from taskprune.evaluate.vllm_engine import VllmBackend
    return VllmBackend(lm, cache_dir, progress)


BACKENDS = {"hf": TorchBackend, "llamacpp": _llamacpp, "vllm": _vllm}
BACKEND_CHOICES = ("hf", "llamacpp", "vllm", "auto")


def require_backend(name: str) -> None:
    """Fail now, before any output exists, where engine `name` is unknown or cannot run here."""
    if name not in BACKEND_CHOICES:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_CHOICES)}")
    if name == "llamacpp":
        from taskprune.evaluate.llamacpp import llama_cpp_module
        llama_cpp_module()
    if name == "vllm":
        from taskprune.evaluate.vllm_engine import vllm_module
        vllm_module()


def installed() -> list[str]:
    """The engines that can run here."""
    names = []
    for name in BACKENDS:
        try:
            require_backend(name)
        except ValueError:
            continue
        names.append(name)
    return names


def open_backend(name: str, lm: LoadedModel, cache_dir: Path | None = None, probe: list[str] = (),
                 batch_size: int = 8, progress: bool = True) -> Backend:
    """The engine `name` over `lm`; `auto` measures both on the `probe` prompts (see `choose`)."""
    from taskprune.models.load import default_cache_dir
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    if name == "auto":
        name = choose(lm, cache_dir, list(probe), batch_size, progress)
    require_backend(name)
    return BACKENDS[name](lm, cache_dir, progress)


def choose(lm: LoadedModel, cache_dir: Path, probe: list[str], batch_size: int, progress: bool = True) -> str:
    """The fastest engine for `lm` here: transformers where no other is installed, else the one with the
    highest tokens/s decoding the `probe` prompts `PROBE_TOKENS` tokens at `batch_size`. Measured once per
    CPU, model architecture, dtype and batch size and remembered in `<cache>/backends.json`, so that a
    resumed evaluation picks the engine its records were made with."""
    from taskprune.report.speed import machine
    names = installed()
    if names == ["hf"]:
        return "hf"
    m = machine()
    dtype = str(next(lm.model.parameters()).dtype).removeprefix("torch.")
    key = f"{m.get('cpu')}|{m.get('gpu')}|{m.get('threads')}|{config_hash(lm.model.config)}|{dtype}|{batch_size}"
    path = cache_dir / "backends.json"
    known = json.loads(path.read_text()) if path.is_file() else {}
    if key not in known:
        if not probe:
            raise ValueError("--backend auto needs prompts to measure with")
        speeds = {}
        for name in names:
            backend = BACKENDS[name](lm, cache_dir, progress)
            try:
                backend.generate(probe[:1], 2, batch_size=1, progress=False)  # warm-up (and llama.cpp's export)
                start = time.perf_counter()
                records = backend.generate(probe, PROBE_TOKENS, batch_size=batch_size, progress=False)
                speeds[name] = sum(r.new_tokens for r in records) / (time.perf_counter() - start)
            finally:
                backend.close()
        known[key] = {"backend": max(speeds, key=speeds.get), "tokens_per_s": speeds}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(known, indent=2) + "\n")
    choice = known[key]
    if progress:
        figures = ", ".join(f"{n} {s:.1f}" for n, s in choice["tokens_per_s"].items())
        print(f"backend auto: {choice['backend']} (tokens/s at batch {batch_size}: {figures}; {path})",
              file=sys.stderr, flush=True)
    return choice["backend"]


__all__ = ["BACKENDS", "BACKEND_CHOICES", "Backend", "TorchBackend", "choose", "installed", "open_backend",
           "require_backend"]
