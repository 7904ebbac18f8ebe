"""Capture statistics: exact against a hand computation, invariant to batching and padding side."""

import json
import os
import stat

import pytest
import torch

from taskprune.capture import SetStats, capture
from taskprune.models import get_adapter
from taskprune.models.synthetic import byte_tokenizer, tiny_model
from taskprune.profile import CaptureCheckpoints, Profile, ProfileError, load_profile, save_profile
from taskprune.scoring import NEEDS_TOKEN_STATS, score

TEXTS = ["Janet has 3 apples and buys 5 more.", "def add(a, b):\n    return a + b", "Hi!",
         "The quick brown fox jumps over the lazy dog. " * 4, "What is 12 * 7?", "ok", "Paris is in France.",
         "for i in range(10): print(i)", "x" * 40]


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("qwen2")
    return model, byte_tokenizer(), get_adapter("qwen2")


def _reference(model, tok, adapter, texts):
    """Per-prompt means of |h| computed one prompt at a time, no padding at all."""
    rows = []
    for text in texts:
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        hs = []
        handles = [adapter.down_proj(m).register_forward_pre_hook(lambda mod, a: hs.append(a[0][0].abs().mean(0)))
                   for m in adapter.mlps(model)]
        with torch.no_grad():
            model(ids)
        for h in handles:
            h.remove()
        rows.append(torch.stack(hs).double())
    return torch.stack(rows)  # [n, layers, d_ff]


def test_matches_hand_computation(setup):
    model, tok, adapter = setup
    ref = _reference(model, tok, adapter, TEXTS)
    s = capture(model, tok, TEXTS, adapter, batch_size=4, keep_per_prompt=True, progress=False)
    assert s.n == len(TEXTS)
    torch.testing.assert_close(s.sum, ref.sum(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.sumsq, ref.square().sum(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.per_prompt.double(), ref, rtol=1e-5, atol=1e-6)
    assert s.tokens == sum(len(tok(t)["input_ids"]) for t in TEXTS)


@pytest.mark.parametrize("batch_size,side", [(1, "right"), (3, "left"), (8, "right"), (8, "left"), (16, "left")])
def test_invariant_to_batch_size_and_padding_side(setup, batch_size, side):
    model, tok, adapter = setup
    base = capture(model, tok, TEXTS, adapter, batch_size=2, padding_side="right", token_stats=True, progress=False)
    other = capture(model, tok, TEXTS, adapter, batch_size=batch_size, padding_side=side, token_stats=True,
                    progress=False)
    for key in ("sum", "sumsq", "tok_sum", "tok_sumsq"):
        torch.testing.assert_close(getattr(other, key), getattr(base, key), rtol=1e-5, atol=1e-6)
    assert other.tokens == base.tokens and other.n == base.n


def test_truncation_is_counted(setup):
    model, tok, adapter = setup
    s = capture(model, tok, TEXTS, adapter, max_length=10, progress=False)
    assert s.truncated == sum(len(tok(t)["input_ids"]) > 10 for t in TEXTS)
    assert s.tokens == sum(min(len(tok(t)["input_ids"]), 10) for t in TEXTS)


def test_statistics_memory_does_not_grow_with_prompts(setup):
    model, tok, adapter = setup
    small = capture(model, tok, TEXTS[:2], adapter, token_stats=True, progress=False)
    large = capture(model, tok, TEXTS * 5, adapter, token_stats=True, progress=False)
    sizes = lambda s: [t.numel() for t in (s.sum, s.sumsq, s.tok_sum, s.tok_sumsq)]  # noqa: E731
    assert sizes(small) == sizes(large) and large.per_prompt is None


def test_selectivity_streamed_equals_direct(setup, tmp_path):
    model, tok, adapter = setup
    target = capture(model, tok, TEXTS[:5], adapter, keep_per_prompt=True, progress=False)
    d1 = capture(model, tok, TEXTS[5:], adapter, keep_per_prompt=True, progress=False)
    d2 = capture(model, tok, [t.upper() for t in TEXTS], adapter, keep_per_prompt=True, progress=False)
    meta = {"model": {"num_layers": 2, "d_ff": 256, "config_hash": "x", "spec": "tiny"},
            "sets": [{"name": "t", "role": "target"}, {"name": "d1", "role": "distractor"},
                     {"name": "d2", "role": "distractor"}], "capture": {}}
    profile = Profile(meta, {"t": target, "d1": d1, "d2": d2})
    save_profile(profile, tmp_path / "p")
    loaded = load_profile(tmp_path / "p")
    s = score("selectivity", loaded)
    A_t = target.per_prompt.double()
    A_d = torch.cat([d1.per_prompt, d2.per_prompt]).double()
    direct = (A_t.mean(0) - A_d.mean(0)) / (torch.cat([A_t, A_d]).std(0, unbiased=True) + 1e-6)
    torch.testing.assert_close(s, direct, rtol=1e-4, atol=1e-4)
    assert loaded.stats["d2"].per_prompt.shape == (len(TEXTS), 2, 256)
    torch.testing.assert_close(score("activation", loaded), A_t.mean(0), rtol=1e-5, atol=1e-7)


def test_bf16_capture_close_to_fp32(setup):
    model, tok, adapter = setup
    fp32 = capture(model, tok, TEXTS, adapter, progress=False)
    bf16 = capture(tiny_model("qwen2", dtype=torch.bfloat16), tok, TEXTS, adapter, progress=False)
    rel = ((bf16.sum - fp32.sum).abs() / fp32.sum.abs().clamp(min=1e-3)).median()
    assert rel < 0.02  # the model's own bf16 rounding dominates; statistics add little


def test_token_statistics_are_opt_in(setup):
    model, tok, adapter = setup
    lean = capture(model, tok, TEXTS, adapter, batch_size=4, progress=False)
    full = capture(model, tok, TEXTS, adapter, batch_size=4, token_stats=True, progress=False)
    assert not lean.has_token_stats and lean.tok_sum is None and lean.tok_sumsq is None
    assert full.has_token_stats and full.tok_sumsq.abs().sum() > 0
    for key in ("sum", "sumsq"):  # the prompt-level statistics do not depend on the option
        torch.testing.assert_close(getattr(lean, key), getattr(full, key), rtol=1e-6, atol=1e-9)
    assert (lean.n, lean.tokens) == (full.n, full.tokens)
    assert not lean.merged(full).has_token_stats and full.merged(full).has_token_stats
    torch.testing.assert_close(full.merged(full).tok_sum, 2 * full.tok_sum)


def _profile(stats: dict, capture_meta: dict | None = None) -> Profile:
    meta = {"model": {"num_layers": 2, "d_ff": 256, "config_hash": "x", "spec": "tiny"},
            "sets": [{"name": n, "role": "target" if i == 0 else "distractor"} for i, n in enumerate(stats)],
            "capture": capture_meta or {}}
    return Profile(meta, stats)


def test_profile_records_which_statistics_it_holds(setup, tmp_path):
    from safetensors.torch import load_file
    model, tok, adapter = setup
    lean = {n: capture(model, tok, TEXTS[i::2], adapter, progress=False) for i, n in enumerate(("t", "d"))}
    save_profile(_profile(lean), tmp_path / "lean")
    assert sorted(load_file(tmp_path / "lean" / "stats.safetensors")) == ["d/sum", "d/sumsq", "t/sum", "t/sumsq"]
    loaded = load_profile(tmp_path / "lean")
    assert loaded.meta["capture"]["token_stats"] is False and not loaded.stats["t"].has_token_stats
    torch.testing.assert_close(score("selectivity", loaded), score("selectivity", _profile(lean)))

    full = {n: capture(model, tok, TEXTS[i::2], adapter, token_stats=True, progress=False)
            for i, n in enumerate(("t", "d"))}
    save_profile(_profile(full), tmp_path / "full")
    again = load_profile(tmp_path / "full")
    assert again.meta["capture"]["token_stats"] is True
    torch.testing.assert_close(again.stats["d"].tok_sumsq, full["d"].tok_sumsq)

    # A profile written before token statistics were optional says nothing and has them all.
    meta_file = tmp_path / "full" / "profile.json"
    meta = json.loads(meta_file.read_text())
    del meta["capture"]["token_stats"]
    meta_file.write_text(json.dumps(meta))
    assert load_profile(tmp_path / "full").stats["t"].has_token_stats
    # ... but one that says it has them must have them.
    meta_file = tmp_path / "lean" / "profile.json"
    meta = json.loads(meta_file.read_text())
    meta["capture"]["token_stats"] = True
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ProfileError, match="t/tok_sum is missing"):
        load_profile(tmp_path / "lean")


@pytest.mark.parametrize("name", sorted(NEEDS_TOKEN_STATS))
def test_a_scorer_that_needs_token_statistics_says_how_to_get_them(setup, name):
    model, tok, adapter = setup
    lean = _profile({n: capture(model, tok, TEXTS[i::2], adapter, progress=False) for i, n in enumerate(("t", "d"))})
    with pytest.raises(ProfileError, match=f"scorer '{name}' reads token-level statistics.*--token-stats"):
        score(name, lean, model=model, adapter=adapter)


def test_token_statistics_are_captured_when_a_scorer_needs_them():
    from taskprune.pipeline import settings_for
    from taskprune.settings import CaptureSettings
    assert NEEDS_TOKEN_STATS == {"wanda-sp", "flap", "taskaware", "specific-importance"}
    assert not settings_for(CaptureSettings(), ["selectivity", "activation", "magnitude"]).token_stats
    assert settings_for(CaptureSettings(), ["selectivity", "flap"]).token_stats
    assert settings_for(CaptureSettings(token_stats=True), ["selectivity"]).token_stats
    assert settings_for(CaptureSettings(), ["taylor", "ig"]).gradients == ("ig", "taylor")


class _Stop(Exception):
    """Stands for the machine going away mid-capture."""


def _stop_after(batches: int, save=None):
    seen = []

    def checkpoint(stats):
        if save is not None:
            save(stats)
        seen.append(stats.n)
        if len(seen) == batches:
            raise _Stop
    return checkpoint


def _copy(stats):
    return SetStats(stats.n, stats.sum.clone(), stats.sumsq.clone(), stats.tokens, stats.tok_sum.clone(),
                    stats.tok_sumsq.clone(), stats.truncated, stats.per_prompt.clone())


def test_a_stopped_capture_resumes_to_the_uninterrupted_result(setup):
    model, tok, adapter = setup
    kw = dict(batch_size=2, token_stats=True, keep_per_prompt=True, max_length=64, progress=False)
    whole = capture(model, tok, TEXTS, adapter, **kw)
    saved = []
    with pytest.raises(_Stop):
        capture(model, tok, TEXTS, adapter, checkpoint=_stop_after(2, lambda s: saved.append(_copy(s))), **kw)
    assert saved[-1].n == 4 and 0 < saved[-1].tokens < whole.tokens
    resumed = capture(model, tok, TEXTS, adapter, resume=saved[-1], **kw)
    # The same batches in the same order: the same numbers, bit for bit.
    for key in ("sum", "sumsq", "tok_sum", "tok_sumsq", "per_prompt"):
        assert torch.equal(getattr(resumed, key), getattr(whole, key)), key
    assert (resumed.n, resumed.tokens, resumed.truncated) == (whole.n, whole.tokens, whole.truncated)


def _write_sets(tmp_path):
    sets = {"t": TEXTS, "d1": ["hello there", "good morning", "how are you?", "fine, thanks"],
            "d2": ["see you", "bye now", "what's up", "nothing much", "ok then"]}
    for name, rows in sets.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    return str(tmp_path / "t.jsonl"), [str(tmp_path / "d1.jsonl"), str(tmp_path / "d2.jsonl")]


def test_a_stopped_study_capture_resumes_from_its_checkpoints(setup, tmp_path, monkeypatch):
    import taskprune.pipeline as pipeline
    from taskprune.models import LoadedModel
    from taskprune.settings import CaptureSettings
    model, tok, adapter = setup
    lm = LoadedModel(model, tok, adapter, {"spec": "tiny"})
    target, distractors = _write_sets(tmp_path)
    settings = CaptureSettings(n=8, batch_size=2, template="raw", token_stats=True)
    whole = pipeline.capture_profile(lm, target, distractors, settings, progress=False)

    # Stopped in the second distractor set's second batch, saving after every batch.
    calls = []
    real = pipeline.capture

    def stopping(*args, **kw):
        calls.append(kw["desc"])
        if len(calls) == 3:
            kw["checkpoint"] = _stop_after(2, kw["checkpoint"])
        return real(*args, **kw)
    monkeypatch.setattr(pipeline, "capture", stopping)
    checkpoints = CaptureCheckpoints(tmp_path / "partial", every_s=0)
    with pytest.raises(_Stop):
        pipeline.capture_profile(lm, target, distractors, settings, progress=False, checkpoints=checkpoints)
    assert sorted(p.name for p in (tmp_path / "partial").iterdir()) == [
        "set0.json", "set0.safetensors", "set1.json", "set1.safetensors", "set2.json", "set2.safetensors"]
    assert json.loads((tmp_path / "partial" / "set2.json").read_text())["n"] == 4
    umask = os.umask(0o022)
    os.umask(umask)
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "partial").iterdir()} == {0o666 & ~umask}

    # Resumed: the two finished sets are read back, the third goes on from its 4th prompt.
    calls.clear()
    monkeypatch.setattr(pipeline, "capture", lambda *a, **kw: calls.append(kw["resume"] and kw["resume"].n)
                        or real(*a, **kw))
    resumed = pipeline.capture_profile(lm, target, distractors, settings, progress=False, checkpoints=checkpoints)
    assert calls == [4]
    assert resumed.meta["sets"] == whole.meta["sets"]
    for name, s in whole.stats.items():
        for key in ("sum", "sumsq", "tok_sum", "tok_sumsq"):
            assert torch.equal(getattr(resumed.stats[name], key), getattr(s, key)), (name, key)
        assert (resumed.stats[name].n, resumed.stats[name].tokens) == (s.n, s.tokens)

    # Other settings (another draw of prompts) never reuse them: every set is captured afresh.
    calls.clear()
    pipeline.capture_profile(lm, target, distractors, CaptureSettings(n=8, batch_size=2, template="raw",
                                                                      token_stats=True, seed=1),
                             progress=False, checkpoints=checkpoints)
    assert calls == [None, None, None]


def test_a_damaged_capture_checkpoint_starts_that_set_again(setup, tmp_path):
    model, tok, adapter = setup
    stats = capture(model, tok, TEXTS[:3], adapter, progress=False)
    checkpoints = CaptureCheckpoints(tmp_path / "partial")
    checkpoints.save(0, "k", stats, complete=True)
    loaded, complete = checkpoints.load(0, "k")
    assert complete and torch.equal(loaded.sum, stats.sum) and loaded.n == 3
    assert checkpoints.load(0, "other") == (None, False)  # made by other settings: stale
    (tmp_path / "partial" / "set0.safetensors").write_bytes(b"cut short")
    assert checkpoints.load(0, "k") == (None, False)
