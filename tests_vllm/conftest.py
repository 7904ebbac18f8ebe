"""The vLLM suite (`make test-vllm`): a taskprune-pruned checkpoint in plain vLLM, and `--backend vllm`
against the transformers engine. vLLM lives in .venv-vllm (its pins); not part of `make test`'s tests/."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: the tiny models need little, the machine has 24
# One process: vLLM's engine core in the test's own process (no spawned workers to outlive a failed test).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

if importlib.util.find_spec("vllm") is None:
    raise pytest.UsageError("tests_vllm needs vLLM: run `make test-vllm` (it installs vLLM into .venv-vllm and "
                            "runs this suite there)")


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("TASKPRUNE_DATA", os.environ.get("TASKPRUNE_DATA", str(REPO.parent / "shared" / "data")))
    monkeypatch.setenv("TASKPRUNE_CACHE", str(tmp_path_factory.mktemp("cache")))


def small_qwen2(d_ff: int = 512, seed: int = 0):
    """A random Qwen2 with heads of 64 (vLLM's CPU attention has no kernels for the tiny models' 16)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from taskprune.models.synthetic import TINY_VOCAB
    config = AutoConfig.for_model("qwen2", hidden_size=256, intermediate_size=d_ff, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=TINY_VOCAB,
                                  max_position_embeddings=1024, pad_token_id=256, bos_token_id=None,
                                  eos_token_id=258, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.eval()
