"""The llama.cpp evaluation engine (`--backend llamacpp`) decodes what the transformers engine decodes: on a
tiny seeded pruned model in f32 (the engine exports a same-dtype GGUF and keeps an f32 KV cache), its greedy
records equal transformers' at batch 1 and with several sequences (a KV stream each) and slots refilled;
a new row takes the lowest free sequence id, so the running ones stay consecutive (one pass of llama.cpp);
its GGUF cache keeps the newest files only."""

from __future__ import annotations

import json
import os

import pytest
from tiny import PROMPTS, pruned_checkpoint

from taskprune.evaluate import llamacpp
from taskprune.evaluate.generate import Row, generate
from taskprune.evaluate.llamacpp import LlamaCppBackend
from taskprune.models import load_model

NEW_TOKENS = 20
# Prompts of different lengths, more than a batch: slots are freed (their KV sequence removed) and reused.
MANY = PROMPTS + ["a", "the and the", "What is 7 times 6, and why?", "at at at"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = pruned_checkpoint("qwen2", tmp_path_factory.mktemp("tiny") / "qwen2")
    return load_model(str(path), dtype="float32", device="cpu")


def _fields(records) -> list[tuple]:
    return [(r.index, r.output, r.new_tokens, r.stopped_by) for r in records]


@pytest.mark.parametrize("batch_size", [1, 3])
def test_llamacpp_engine_equals_transformers_greedy_in_f32(tiny, tmp_path, batch_size):
    prompts = [tiny.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                  add_generation_prompt=True) for p in MANY]
    expected = generate(tiny.model, tiny.tokenizer, prompts, NEW_TOKENS, batch_size=1, progress=False)
    backend = LlamaCppBackend(tiny, tmp_path, progress=False)
    try:
        got = backend.generate(prompts, NEW_TOKENS, batch_size=batch_size, progress=False)
        assert backend.tokens_per_second(prompts[:1], 8) > 0
    finally:
        backend.close()
    assert _fields(sorted(got, key=lambda r: r.index)) == _fields(expected)
    assert sum(r.new_tokens for r in got) > len(prompts)  # not all ended at once on EOS


def test_a_new_row_takes_the_lowest_free_sequence(tiny, tmp_path):
    backend = LlamaCppBackend(tiny, tmp_path, progress=False)
    ids = [tiny.tokenizer(p, add_special_tokens=False)["input_ids"] for p in MANY[:4]]
    decoder = backend._decoder(MANY[:4], 8, 3)
    try:
        first = decoder.add([Row(index=i, prompt_ids=ids[i]) for i in range(3)])
        assert [decoder.seq[i] for i in range(3)] == [0, 1, 2] and len(first) == 3
        for row, token in zip(decoder.rows, first):
            row.generated.append(token)
        decoder.keep([0, 2])  # the row in sequence 1 ends
        (token,) = decoder.add([Row(index=3, prompt_ids=ids[3])])
        assert decoder.seq == {0: 0, 2: 2, 3: 1}
        decoder.rows[-1].generated.append(token)
        assert len(decoder.step()) == 3  # one token per running row, in the rows' order
    finally:
        decoder.close()
        backend.close()


def test_gguf_cache_keeps_the_newest_exports(tiny, tmp_path, monkeypatch):
    folder = tmp_path / "gguf"
    folder.mkdir()
    for i, name in enumerate(["old-f32.gguf", "older-f32.gguf"]):
        (folder / name).write_bytes(b"x")
        os.utime(folder / name, (1000 - i, 1000 - i))
    monkeypatch.setattr(llamacpp, "KEEP", 2)
    path = llamacpp.cached_gguf(tiny, tmp_path, progress=False)
    assert path.is_file() and path.suffix == ".gguf" and path.stat().st_size > 1000
    assert sorted(p.name for p in folder.glob("*.gguf")) == sorted([path.name, "old-f32.gguf"])
    assert llamacpp.cached_gguf(tiny, tmp_path, progress=False) == path  # not exported again


def test_auto_measures_both_engines_once_and_remembers_the_faster(tiny, tmp_path, monkeypatch):
    from taskprune.evaluate import backends
    prompts = [p + "\n" for p in MANY]
    backend = backends.open_backend("auto", tiny, tmp_path, prompts, batch_size=2, progress=False)
    backend.close()
    known = json.loads((tmp_path / "backends.json").read_text())
    (choice,) = known.values()
    assert set(choice["tokens_per_s"]) == {"hf", "llamacpp"} and all(v > 0 for v in choice["tokens_per_s"].values())
    assert backend.name == choice["backend"] == max(choice["tokens_per_s"], key=choice["tokens_per_s"].get)

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured again")
    monkeypatch.setattr(backends, "BACKENDS", {name: no_measuring for name in backends.BACKENDS})
    assert backends.choose(tiny, tmp_path, prompts, 2, progress=False) == choice["backend"]
