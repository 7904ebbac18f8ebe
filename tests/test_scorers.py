"""Scorers against hand computations: weights straight from the Linear layers, activations from a
hook of the test's own (one prompt at a time, no padding), the clear errors, and the registry's records."""

import inspect

import pytest
import torch

from taskprune.capture import capture
from taskprune.models import get_adapter
from taskprune.models.synthetic import byte_tokenizer, tiny_model
from taskprune.plan import make_plan
from taskprune.profile import Profile, ProfileError
from taskprune.scoring import NEEDS_GRADIENTS, NEEDS_MODEL, NEEDS_TOKEN_STATS, SCORERS, score, scorer_help

TARGET = ["Janet has 3 apples and buys 5 more.", "What is 12 * 7?", "A train goes 60 km in 1.5 hours."]
D1 = ["def add(a, b):\n    return a + b", "for i in range(10): print(i)"]
D2 = ["Hi! How are you today?", "Paris is in France.", "ok"]
D_FF, LAYERS = 64, 2


@pytest.fixture(scope="module")
def setup():
    model, tok, adapter = tiny_model("qwen2", d_ff=D_FF), byte_tokenizer(), get_adapter("qwen2")
    stats = {name: capture(model, tok, texts, adapter, batch_size=2, token_stats=True, progress=False)
             for name, texts in (("t", TARGET), ("d1", D1), ("d2", D2))}
    meta = {"model": {"num_layers": LAYERS, "d_ff": D_FF, "config_hash": "x", "spec": "tiny"},
            "sets": [{"name": "t", "role": "target"}, {"name": "d1", "role": "distractor"},
                     {"name": "d2", "role": "distractor"}], "capture": {}}
    return model, tok, adapter, Profile(meta, stats)


def _tokens_h(model, tok, adapter, texts):
    """Every token's h, [tokens, layers, d_ff] float64, from a hook in the test, one prompt at a time."""
    rows = []
    for text in texts:
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        hs = []
        handles = [adapter.down_proj(m).register_forward_pre_hook(lambda mod, a: hs.append(a[0][0]))
                   for m in adapter.mlps(model)]
        with torch.no_grad():
            model(ids)
        for h in handles:
            h.remove()
        rows.append(torch.stack(hs, dim=1).double())
    return torch.cat(rows)


def _down(model):
    return torch.stack([layer.mlp.down_proj.weight.detach().double() for layer in model.model.layers])  # [L, d, d_ff]


def test_magnitude_is_the_product_of_the_three_norms(setup):
    model, _, adapter, profile = setup
    expected = torch.stack([
        layer.mlp.gate_proj.weight.double().norm(dim=1) * layer.mlp.up_proj.weight.double().norm(dim=1)
        * layer.mlp.down_proj.weight.double().norm(dim=0) for layer in model.model.layers]).detach()
    torch.testing.assert_close(score("magnitude", profile, model=model, adapter=adapter), expected)
    torch.testing.assert_close(score("magnitude", profile, model=model), expected)  # adapter from the config


def test_magnitude_on_fused_gate_up(setup):
    _, _, _, profile = setup
    phi = tiny_model("phi3", d_ff=D_FF)
    expected = []
    for layer in phi.model.layers:
        gate, up = layer.mlp.gate_up_proj.weight.double().chunk(2, dim=0)
        expected.append(gate.norm(dim=1) * up.norm(dim=1) * layer.mlp.down_proj.weight.double().norm(dim=0))
    got = score("magnitude", profile, model=phi, adapter=get_adapter("phi3"))
    torch.testing.assert_close(got, torch.stack(expected).detach())


def test_wanda_sp_and_flap(setup):
    model, tok, adapter, profile = setup
    H = _tokens_h(model, tok, adapter, TARGET)  # [N, L, d_ff]
    W = _down(model)
    wanda = W.abs().sum(1) * H.square().sum(0).sqrt()
    torch.testing.assert_close(score("wanda-sp", profile, model=model, adapter=adapter), wanda, rtol=1e-5, atol=1e-8)
    flap = H.var(0, unbiased=True) * W.square().sum(1)
    torch.testing.assert_close(score("flap", profile, model=model, adapter=adapter), flap, rtol=1e-4, atol=1e-9)


def _importances(model, tok, adapter):
    W = _down(model).square().sum(1).sqrt()
    rms = lambda texts: _tokens_h(model, tok, adapter, texts).square().mean(0).sqrt()  # noqa: E731
    n_t, n_g = rms(TARGET), rms(D1 + D2)  # the distractors pooled token by token
    return W * n_t, W * n_g, n_t, n_g


def test_taskaware_rule(setup):
    model, tok, adapter, profile = setup
    i_t, i_g, n_t, n_g = _importances(model, tok, adapter)
    for tau, gamma in ((0.3, 0.5), (0.1, 0.2)):
        expected = torch.empty(LAYERS, D_FF, dtype=torch.float64)
        groups = {"shared": 0, "task": 0, "general": 0}
        for layer in range(LAYERS):
            bonus = max(float(i_t[layer].max()), float(i_g[layer].max()))
            for j in range(D_FF):
                a, b = float(n_t[layer, j]), float(n_g[layer, j])
                if abs(a - b) / max(a, b) <= tau:
                    expected[layer, j] = (i_t[layer, j] + i_g[layer, j]) / 2
                    groups["shared"] += 1
                elif a > b:
                    expected[layer, j] = i_t[layer, j] + bonus
                    groups["task"] += 1
                else:
                    expected[layer, j] = gamma * i_g[layer, j]
                    groups["general"] += 1
        got = score("taskaware", profile, model=model, adapter=adapter, tau=tau, gamma=gamma)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-8)
    assert all(groups.values()), groups  # the fixture exercises all three groups (at tau 0.1)
    # task-exclusive neurons are kept before any other neuron of their layer
    got = score("taskaware", profile, model=model, adapter=adapter)
    task_only = ((n_t - n_g).abs() / torch.maximum(n_t, n_g) > 0.3) & (n_t > n_g)
    for layer in range(LAYERS):
        if task_only[layer].any() and (~task_only[layer]).any():
            assert got[layer][task_only[layer]].min() > got[layer][~task_only[layer]].max()


def test_specific_importance_rule(setup):
    model, tok, adapter, profile = setup
    i_t, i_g, _, _ = _importances(model, tok, adapter)
    t = i_t / i_t.mean(1, keepdim=True)
    d = i_g / i_g.mean(1, keepdim=True)
    for lam in (1.0, 3.0):
        expected = torch.where(d > t, t - lam * (d - t), t)
        got = score("specific-importance", profile, model=model, adapter=adapter, lam=lam)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-8)


def test_gradient_scorers_read_the_extras(setup):
    model, _, adapter, profile = setup
    target = profile.stats["t"]
    hg = torch.randn(LAYERS, D_FF, dtype=torch.float64)
    target.extra.update({"taylor.hg": hg, "taylor.abs": hg.abs() * 3, "taylor.tokens": torch.tensor([10.0]),
                         "ig.sum": hg * 2, "ig.positions": torch.tensor([4.0])})
    try:
        torch.testing.assert_close(score("taylor", profile), hg.abs() / 10)
        torch.testing.assert_close(score("taylor-abs", profile), hg.abs() * 3 / 10)
        torch.testing.assert_close(score("ig", profile), hg / 2)
        # ig is importance: selective drops the lowest attributions, reverse (arXiv 2507.09185) the highest
        ig = score("ig", profile)
        for strategy, pick in (("selective", ig.argmin), ("reverse", ig.argmax)):
            plan = make_plan(ig, strategy, 1 / 64, align=1)
            for layer in range(LAYERS):
                assert int(pick(dim=1)[layer]) not in plan.keep[layer]
        for name in SCORERS:  # every scorer: float64 [layers, d_ff]
            s = score(name, profile, model=model, adapter=adapter)
            assert s.shape == (LAYERS, D_FF) and s.dtype == torch.float64 and torch.isfinite(s).all()
        target.extra["ig.positions"] = torch.tensor([0.0])
        with pytest.raises(ProfileError, match="lower --ig-threshold"):
            score("ig", profile)
    finally:
        target.extra.clear()


def test_clear_errors(setup):
    model, _, adapter, profile = setup
    assert NEEDS_MODEL | set(NEEDS_GRADIENTS) < set(SCORERS)
    for name in sorted(NEEDS_MODEL):
        with pytest.raises(ValueError, match=f"scorer '{name}' needs the model's weights: pass model="):
            score(name, profile)
    for name, kind in NEEDS_GRADIENTS.items():
        with pytest.raises(ProfileError, match=f"capture with --gradients {kind}"):
            score(name, profile, model=model, adapter=adapter)
    wider = tiny_model("qwen2", d_ff=128)
    with pytest.raises(ProfileError, match="2 layers x 128 neurons but the profile was captured on 2 x 64"):
        score("wanda-sp", profile, model=wider)
    lonely = Profile({**profile.meta, "sets": [{"name": "t", "role": "target"}]}, {"t": profile.stats["t"]})
    for name in ("selectivity", "taskaware", "specific-importance"):
        with pytest.raises(ValueError, match=f"scorer '{name}' needs at least one distractor"):
            score(name, lonely, model=model, adapter=adapter)
        with pytest.raises(ValueError, match=r"distractor set\(s\) \['d3'\] not in the profile"):
            score(name, profile, model=model, adapter=adapter, distractors=["d3"])


def test_needs_are_read_from_the_records():
    assert NEEDS_MODEL == frozenset({"magnitude", "wanda-sp", "flap", "taskaware", "specific-importance"})
    assert NEEDS_GRADIENTS == {"taylor": "taylor", "taylor-abs": "taylor", "ig": "ig"}
    for name, spec in SCORERS.items():  # a scorer takes the model exactly when its record says it needs it
        assert ("model" in inspect.signature(spec.fn).parameters) == spec.needs_model, name
    assert SCORERS["taskaware"].options == {"distractors", "tau", "gamma"}
    assert SCORERS["specific-importance"].options == {"distractors", "lam"}
    assert SCORERS["selectivity"].options == {"distractors"} and not SCORERS["wanda-sp"].options


def test_unknown_option_raises(setup):
    model, _, adapter, profile = setup
    with pytest.raises(ValueError, match=r"scorer 'selectivity' does not take option\(s\) tau; "
                                         r"its options: distractors"):
        score("selectivity", profile, tau=0.1)
    with pytest.raises(ValueError, match=r"scorer 'taskaware' does not take option\(s\) lam, typo; "
                                         r"its options: distractors, gamma, tau"):
        score("taskaware", profile, model=model, adapter=adapter, typo=1, lam=2.0)
    with pytest.raises(ValueError, match=r"scorer 'activation' does not take option\(s\) distractors; "
                                         r"its options: none"):
        score("activation", profile, distractors=["d1"])
    # model= and adapter= are accepted by every scorer (callers pass them whatever the scorer), read where needed
    torch.testing.assert_close(score("activation", profile, model=model, adapter=adapter), score("activation", profile))
    torch.testing.assert_close(score("selectivity", profile, model=None, adapter=None, distractors=["d1"]),
                               score("selectivity", profile, distractors=["d1"]))
    with pytest.raises(ValueError, match="scorer 'flap' needs the model's weights: pass model="):
        score("flap", profile, model=None, adapter=adapter)
    with pytest.raises(ValueError, match="unknown scorer 'nope'; available: selectivity, activation"):
        score("nope", profile)


def test_help_lists_every_scorer():
    lines = scorer_help().splitlines()
    assert [line.split(": ")[0] for line in lines] == list(SCORERS)
    for line, (name, spec) in zip(lines, SCORERS.items()):
        assert spec.help in line
        assert ("[needs the model" in line) == (name in NEEDS_MODEL)
        assert (f"needs --gradients {NEEDS_GRADIENTS.get(name)}" in line) == (name in NEEDS_GRADIENTS)
        assert ("--token-stats" in line) == (name in NEEDS_TOKEN_STATS)
    assert lines[-2].endswith("[needs the model and --token-stats; options: distractors, gamma, tau]")
