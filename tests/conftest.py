"""Shared fixtures: offline data location and tiny random models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _data_dir() -> Path:
    env = os.environ.get("TASKPRUNE_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = _data_dir()
    assert (path / "gsm8k" / "train.jsonl").is_file(), (
        f"offline data not found at {path}: set TASKPRUNE_DATA to the shared data folder")
    return path


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Profiles cached by one-shot runs go to a per-session temp dir; converted models stay shared."""
    monkeypatch.setenv("TASKPRUNE_DATA", str(_data_dir()))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2 checkpoint with the byte tokenizer, saved like a real one."""
    from taskprune.models.synthetic import byte_tokenizer, tiny_model
    path = tmp_path_factory.mktemp("models") / "tiny-qwen2"
    tiny_model("qwen2").save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path
