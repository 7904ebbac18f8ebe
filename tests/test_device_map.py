"""`--device auto`: a model accelerate spreads over devices and disk (`device_map="auto"`) captures, fingerprints
and evaluates exactly like the same model loaded on one device; what cannot work on it is refused in one line."""

import pytest
import torch

from taskprune.capture import capture
from taskprune.cli import main
from taskprune.evaluate.runner import evaluate, read_records
from taskprune.models import ModelLoadError, load_model, weights_fingerprint
from taskprune.models.load import input_device, parse_max_memory
from taskprune.plan import make_plan
from taskprune.settings import EvalSettings
from taskprune.surgery import prune_model

TEXTS = ["def add(a, b):\n    return a + b", "The capital of France is", "12 * 7 =", "print('hi')"]
CPU_LIMIT = "cpu=450000"  # the tiny model is ~630 kB: its embedding stays on the CPU, the layers go to disk


@pytest.fixture(scope="module")
def both(tiny_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    plain = load_model(str(tiny_dir), "float32", "cpu", cache_dir=cache)
    spread = load_model(str(tiny_dir), "float32", "auto", cache_dir=cache, max_memory=CPU_LIMIT)
    return plain, spread


def test_the_layers_are_offloaded_and_the_weights_are_the_same(both):
    plain, spread = both
    assert set(spread.model.hf_device_map.values()) == {"cpu", "disk"}
    assert any(p.device.type == "meta" for p in spread.model.parameters())  # really not in memory
    assert input_device(spread.model) == torch.device("cpu")
    assert weights_fingerprint(spread.model) == weights_fingerprint(plain.model)


def test_capture_hooks_every_down_proj_wherever_it_lives(both):
    plain, spread = both
    a = capture(plain.model, plain.tokenizer, TEXTS, plain.adapter, batch_size=2, token_stats=True, progress=False)
    b = capture(spread.model, spread.tokenizer, TEXTS, spread.adapter, batch_size=2, token_stats=True,
                progress=False)
    assert (a.n, a.tokens) == (b.n, b.tokens) == (4, a.tokens) and a.tokens > 0
    for name in ("sum", "sumsq", "tok_sum", "tok_sumsq"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.abs().sum() > 0 and torch.allclose(x, y, rtol=1e-5, atol=1e-7), name


def test_evaluation_records_equal_the_single_device_ones(both, data_dir, tmp_path):
    plain, spread = both
    settings = EvalSettings(limit=3, batch_size=2, max_new_tokens=12, trap_budget=0, speed_prompts=0)
    for name, lm in (("plain", plain), ("spread", spread)):
        evaluate(lm, ["gsm8k"], tmp_path / name, settings, progress=False, data_dir=str(data_dir))
    a, b = (read_records(tmp_path / name / "gsm8k.jsonl") for name in ("plain", "spread"))
    assert len(a) == 3 and {k: r["output"] for k, r in a.items()} == {k: r["output"] for k, r in b.items()}
    tokens = [r["new_tokens"] for r in a.values()]
    assert tokens == [r["new_tokens"] for r in b.values()] and max(tokens) > 0


def test_a_dispatched_model_is_not_pruned_in_memory(both):
    _, spread = both
    d_ff = spread.adapter.d_ff(spread.model)
    layers = len(spread.adapter.mlps(spread.model))
    plan = make_plan(None, "random", 0.25, align=64, seed=0, shape=(layers, d_ff))
    with pytest.raises(ValueError, match="--device auto .* taskprune prune --stream"):
        prune_model(spread.model, spread.adapter, plan)


@pytest.mark.parametrize("text, message", [
    ("0=20GiB,gpu=3GiB", "each item is DEVICE=SIZE"),
    ("cpu", "each item is DEVICE=SIZE"),
])
def test_a_bad_max_memory_is_refused(text, message):
    with pytest.raises(ModelLoadError, match=message):
        parse_max_memory(text)


def test_max_memory_parses_to_accelerates_mapping():
    assert parse_max_memory("0=20GiB, 1=18GiB,cpu=1000") == {0: "20GiB", 1: "18GiB", "cpu": 1000}


def test_max_memory_without_device_auto_is_a_one_line_error(tiny_dir, tmp_path, capsys):
    assert main(["capture", "--model", str(tiny_dir), "--max-memory", "cpu=1GiB", "--target", "gsm8k",
                 "--distractor", "squad", "--out", str(tmp_path / "p")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--max-memory 'cpu=1GiB' needs --device auto" in lines[0]
    assert not (tmp_path / "p").exists()
