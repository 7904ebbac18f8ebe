"""The llama.cpp suite (`make test-gguf`): GGUF exports read by llama.cpp through llama-cpp-python, built
from its source distribution into .venv-gguf. Not part of `make test`'s tests/ (that venv has no llama.cpp)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))  # tiny.py
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

if importlib.util.find_spec("llama_cpp") is None:
    raise pytest.UsageError("tests_gguf needs llama.cpp's Python bindings: run `make test-gguf` (it builds "
                            "llama-cpp-python into .venv-gguf and runs this suite there)")


@pytest.fixture(autouse=True)
def _data_env(monkeypatch):
    monkeypatch.setenv("TASKPRUNE_DATA", os.environ.get("TASKPRUNE_DATA", str(REPO.parent / "shared" / "data")))
