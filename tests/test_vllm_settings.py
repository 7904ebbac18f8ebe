"""What taskprune asks of vLLM that can be checked without vLLM installed."""

from types import SimpleNamespace

from taskprune.evaluate import vllm_engine


def test_cpu_memory_share_is_eighty_percent_of_what_is_available(monkeypatch):
    """vLLM's CPU default (92% of all RAM) refuses to start beside a study; taskprune asks for 80% of the free part."""
    monkeypatch.setattr(vllm_engine.psutil, "virtual_memory", lambda: SimpleNamespace(available=10 << 30, total=25 << 30))
    assert vllm_engine.cpu_memory_share() == 0.32
