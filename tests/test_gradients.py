"""Gradient pass: Taylor sums against explicit autograd, IG completeness and a reference loop,
batch invariance, the profile format with extra statistics, and capture_profile's gradient option."""

import json

import pytest
import torch
import torch.nn.functional as F

from taskprune.capture import SetStats, capture
from taskprune.gradients import gradient_stats, prompt_token_lengths
from taskprune.models import LoadedModel, get_adapter
from taskprune.models.synthetic import byte_tokenizer, tiny_model
from taskprune.pipeline import CaptureSettings, capture_profile
from taskprune.profile import CaptureCheckpoints, Profile, load_profile, save_profile
from taskprune.scoring import score

TEXTS = ["Janet has 3 apples and buys 5 more.", "def add(a, b):\n    return a + b", "Hi!", "What is 12 * 7?"]


@pytest.fixture(scope="module")
def setup():
    return tiny_model("qwen2", d_ff=64), byte_tokenizer(), get_adapter("qwen2")


def _ids(tok, text):
    return torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])


def test_taylor_matches_explicit_autograd(setup):
    model, tok, adapter = setup
    layers, d_ff = 2, 64
    ref_hg = torch.zeros(layers, d_ff, dtype=torch.float64)
    ref_abs = torch.zeros_like(ref_hg)
    for text in TEXTS:  # one prompt at a time, no padding, the loss summed over its positions
        ids = _ids(tok, text)
        hs = []

        def keep(mod, args):
            args[0].retain_grad()
            hs.append(args[0])
        handles = [adapter.down_proj(m).register_forward_pre_hook(keep) for m in adapter.mlps(model)]
        logits = model(ids).logits
        for h in handles:
            h.remove()
        F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").backward()
        model.zero_grad(set_to_none=True)
        for layer, h in enumerate(hs):
            hg = (h * h.grad)[0].double()
            ref_hg[layer] += hg.sum(0)
            ref_abs[layer] += hg.abs().sum(0)
    got = gradient_stats(model, tok, TEXTS, adapter, kinds=("taylor",), batch_size=3, progress=False)
    torch.testing.assert_close(got["taylor.hg"], ref_hg, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(got["taylor.abs"], ref_abs, rtol=1e-4, atol=1e-7)
    assert float(got["taylor.tokens"]) == sum(_ids(tok, t).shape[1] for t in TEXTS)
    assert all(p.requires_grad for p in model.parameters())  # the pass restores what it froze


def _greedy_logp(model, adapter, ids, zero_layer=None, zero_at=None):
    """log-softmax of the model; optionally layer `zero_layer`'s h set to 0 at positions `zero_at`."""
    handle = None
    if zero_layer is not None:
        def zero(mod, args):
            h = args[0].clone()
            h[0, zero_at] = 0
            return (h,)
        handle = adapter.down_proj(adapter.mlps(model)[zero_layer]).register_forward_pre_hook(zero)
    with torch.no_grad():
        out = model(ids).logits[0].double().log_softmax(-1)
    if handle:
        handle.remove()
    return out


def test_ig_completeness_tightens_with_steps(setup):
    """One prompt, its answer position: sum_j A[l, j] = f(h) - f(0) for each layer l."""
    model, tok, adapter = setup
    text = TEXTS[1]
    ids = _ids(tok, text)
    last = ids.shape[1] - 1
    full = _greedy_logp(model, adapter, ids)
    y = full[last].argmax()
    errors = {}
    for steps in (4, 40):
        got = gradient_stats(model, tok, [text], adapter, kinds=("ig",), ig_steps=steps, ig_threshold=0.0,
                             ig_positions="answer", prompt_lengths=[ids.shape[1]], progress=False)
        assert float(got["ig.positions"]) == 1
        errors[steps] = []
        for layer in range(2):
            delta = full[last, y] - _greedy_logp(model, adapter, ids, layer, [last])[last, y]
            assert abs(float(delta)) > 1e-4  # a real difference to explain
            errors[steps].append(abs(float(got["ig.sum"][layer].sum() - delta)) / abs(float(delta)))
    assert max(errors[40]) < 1e-3
    assert all(e40 < e4 for e4, e40 in zip(errors[4], errors[40]))


def _threshold_in_a_gap(values: torch.Tensor) -> float:
    """A threshold near the median, halfway across the widest gap between neighbouring values in the
    middle half, so that no value sits on it: batched and single forwards differ in the last bits, and a
    value on the threshold would be selected by one and not the other."""
    v = values.double().sort().values
    n = len(v)
    lo, hi = n // 4, 3 * n // 4
    gaps = v[lo + 1:hi + 1] - v[lo:hi]
    k = int(gaps.argmax())
    assert float(gaps[k]) > 1e-6, "no clear gap between neighbouring probabilities"  # float noise: ~1e-9
    return float(v[lo + k] + v[lo + k + 1]) / 2


def test_ig_all_positions_matches_reference_loop(setup):
    """Every position above the threshold, several prompts in a padded batch, against a plain loop."""
    model, tok, adapter = setup
    steps = 3
    probs = [_greedy_logp(model, adapter, _ids(tok, t)).exp().amax(-1) for t in TEXTS]
    threshold = _threshold_in_a_gap(torch.cat(probs))
    ref = torch.zeros(2, 64, dtype=torch.float64)
    count = 0
    for text, p in zip(TEXTS, probs):
        ids = _ids(tok, text)
        sel = p > threshold
        count += int(sel.sum())
        if not sel.any():
            continue
        y = _greedy_logp(model, adapter, ids).argmax(-1)
        for layer, mlp in enumerate(adapter.mlps(model)):
            for k in range(steps):
                alpha = (k + 0.5) / steps
                store = {}

                def scale(mod, args):
                    h = args[0].detach().requires_grad_(True)
                    store["h"] = h
                    factor = torch.where(sel, alpha, 1.0).view(1, -1, 1)
                    return (h * factor,)
                handle = adapter.down_proj(mlp).register_forward_pre_hook(scale)
                logp = model(ids).logits[0].log_softmax(-1)
                handle.remove()
                f = logp[sel].gather(-1, y[sel].unsqueeze(-1)).sum()
                (g,) = torch.autograd.grad(f, store["h"])  # d/dh of f(alpha h) = alpha * f'(alpha h)
                ref[layer] += (store["h"][0, sel] * g[0, sel] / alpha).double().sum(0).detach() / steps
    got = gradient_stats(model, tok, TEXTS, adapter, kinds=("ig",), ig_steps=steps, ig_threshold=threshold,
                         batch_size=4, progress=False)
    assert float(got["ig.positions"]) == count > 0
    torch.testing.assert_close(got["ig.sum"], ref, rtol=1e-4, atol=1e-7)


def test_ig_steps_do_not_rerun_the_layers_below_the_scaled_one(setup):
    model, tok, adapter = setup
    calls = []
    layers = model.model.layers
    handles = [m.mlp.register_forward_hook(lambda mod, a, out, i=i: calls.append(i)) for i, m in enumerate(layers)]
    try:
        gradient_stats(model, tok, TEXTS[:1], adapter, kinds=("ig",), ig_steps=5, ig_threshold=0.0, progress=False)
    finally:
        for h in handles:
            h.remove()
    # one unscaled forward through both layers; then layer 0's 5 steps run both, layer 1's run layer 1 only
    assert calls.count(0) == 1 + 5 and calls.count(1) == 1 + 5 + 5
    assert all(m.__dict__.get("forward") is None for m in layers)  # the layers' own forward is back


def test_batch_size_and_max_prompts(setup):
    model, tok, adapter = setup
    kw = dict(kinds=("taylor", "ig"), ig_steps=2, ig_threshold=0.0, progress=False)
    one = gradient_stats(model, tok, TEXTS, adapter, batch_size=1, **kw)
    four = gradient_stats(model, tok, TEXTS, adapter, batch_size=4, **kw)
    for key in one:
        torch.testing.assert_close(four[key], one[key], rtol=1e-4, atol=1e-6)
    first = gradient_stats(model, tok, TEXTS, adapter, max_prompts=2, **kw)
    assert float(first["taylor.tokens"]) == sum(_ids(tok, t).shape[1] for t in TEXTS[:2])
    assert float(first["ig.positions"]) == float(first["taylor.tokens"])  # threshold 0: every position


def test_bad_options_are_refused(setup):
    model, tok, adapter = setup
    with pytest.raises(ValueError, match="gradient kinds must be some of taylor, ig"):
        gradient_stats(model, tok, TEXTS, adapter, kinds=("hessian",), progress=False)
    with pytest.raises(ValueError, match="needs prompt_lengths"):
        gradient_stats(model, tok, TEXTS, adapter, kinds=("ig",), ig_positions="answer", progress=False)
    with pytest.raises(ValueError, match="ig_steps must be at least 1"):
        gradient_stats(model, tok, TEXTS, adapter, kinds=("ig",), ig_steps=0, progress=False)
    with pytest.raises(ValueError, match="not a prefix"):
        prompt_token_lengths(tok, ["abc"], ["xyz"])


def test_profile_keeps_extra_statistics(setup, tmp_path):
    model, tok, adapter = setup
    target = capture(model, tok, TEXTS, adapter, progress=False)
    target.extra.update(gradient_stats(model, tok, TEXTS, adapter, kinds=("taylor",), progress=False))
    other = capture(model, tok, [t.upper() for t in TEXTS], adapter, progress=False)
    meta = {"model": {"num_layers": 2, "d_ff": 64, "config_hash": "x", "spec": "tiny"},
            "sets": [{"name": "t", "role": "target"}, {"name": "d", "role": "distractor"}], "capture": {}}
    save_profile(Profile(meta, {"t": target, "d": other}), tmp_path / "p")
    loaded = load_profile(tmp_path / "p")
    assert loaded.meta["format_version"] == 1 and loaded.stats["d"].extra == {}
    for key, value in target.extra.items():
        torch.testing.assert_close(loaded.stats["t"].extra[key], value)
    # a file without extras (as written before they existed) still loads
    from safetensors.torch import load_file, save_file
    tensors = {k: v for k, v in load_file(tmp_path / "p" / "stats.safetensors").items() if "/extra/" not in k}
    save_file(tensors, tmp_path / "p" / "stats.safetensors")
    assert load_profile(tmp_path / "p").stats["t"].extra == {}
    # merging sums the extras both sides have and drops the others
    merged = target.merged(target)
    torch.testing.assert_close(merged.extra["taylor.hg"], 2 * target.extra["taylor.hg"])
    assert target.merged(other).extra == {}
    assert SetStats.zeros(2, 4, token_stats=False).extra == {}


def test_capture_profile_runs_the_gradient_pass(setup, tmp_path):
    model, tok, adapter = setup
    for name, rows in {"t": TEXTS, "d": ["hello there", "good morning", "how are you?"]}.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    lm = LoadedModel(model, tok, adapter, {"spec": "tiny"})
    settings = CaptureSettings(n=3, template="chat", gradients=("taylor", "ig"), grad_prompts=2, ig_steps=2,
                               ig_threshold=0.0, ig_positions="answer")
    profile = capture_profile(lm, str(tmp_path / "t.jsonl"), [str(tmp_path / "d.jsonl")], settings, progress=False)
    target = profile.stats[profile.target]
    assert set(target.extra) == {"taylor.hg", "taylor.abs", "taylor.tokens", "ig.sum", "ig.positions"}
    assert float(target.extra["ig.positions"]) == 2  # answer position of each of the 2 gradient prompts
    assert profile.stats[profile.distractors[0]].extra == {}
    g = profile.meta["capture"]["gradients"]
    assert g["kinds"] == ["taylor", "ig"] and g["prompts"] == 2 and g["ig_steps"] == 2
    save_profile(profile, tmp_path / "p")
    loaded = load_profile(tmp_path / "p")
    for name in ("taylor", "taylor-abs", "ig"):
        assert score(name, loaded).shape == (2, 64)
    # A capture's checkpoints keep the gradient sums: a resumed capture reads them back with the set.
    checkpoints = CaptureCheckpoints(tmp_path / "partial")
    for _ in range(2):
        again = capture_profile(lm, str(tmp_path / "t.jsonl"), [str(tmp_path / "d.jsonl")], settings,
                                progress=False, checkpoints=checkpoints)
        assert again.meta["capture"]["gradients"] == g
        for key, value in target.extra.items():
            torch.testing.assert_close(again.stats[again.target].extra[key], value)
    with pytest.raises(ValueError, match="gradient kinds"):
        capture_profile(lm, str(tmp_path / "t.jsonl"), [str(tmp_path / "d.jsonl")],
                        CaptureSettings(n=3, gradients=("nope",)), progress=False)
    plain = capture_profile(lm, str(tmp_path / "t.jsonl"), [str(tmp_path / "d.jsonl")], CaptureSettings(n=3),
                            progress=False)
    assert "gradients" not in plain.meta["capture"] and plain.stats[plain.target].extra == {}
