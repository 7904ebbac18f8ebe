"""vLLM reads taskprune's pruned checkpoints as they are, and `--backend vllm` makes the hf engine's records."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import small_qwen2

from taskprune.evaluate.backends import TorchBackend, open_backend
from taskprune.evaluate.generate import EarlyStop
from taskprune.evaluate.runner import EvalSettings, evaluate, read_records
from taskprune.evaluate.vllm_engine import VllmBackend, check_width
from taskprune.cli import main
from taskprune.models import LoadedModel, get_adapter, load_model
from taskprune.models.synthetic import byte_tokenizer

PROMPTS = ["def add(a, b):", "Janet has 3 apples and buys 5 more. How many", "Hi!", "x = [i * i for i in"]

# Plain vLLM, no taskprune in the process: the checkpoint must stand on its own.
PLAIN = r"""
import json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
from vllm import LLM, SamplingParams
path, prompts, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
llm = LLM(model=path, dtype="float32", enforce_eager=True, skip_tokenizer_init=True, max_model_len=256, seed=0)
params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False)
outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
assert not any(m.startswith("taskprune") for m in sys.modules)
print(json.dumps([list(o.outputs[0].token_ids) for o in outs]))
"""


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """small_qwen2 with 384 of its 512 MLP neurons kept, pruned by `taskprune prune` (random plan), loaded back."""
    root = tmp_path_factory.mktemp("models")
    small_qwen2().save_pretrained(root / "base")
    byte_tokenizer().save_pretrained(root / "base")
    assert main(["prune", "--model", str(root / "base"), "--strategy", "random", "--ratio", "0.25", "--align", "128",
                 "--dtype", "float32", "--out", str(root / "pruned")]) == 0
    return load_model(str(root / "pruned"), "float32"), root / "pruned"


def test_pruned_checkpoint_loads_in_plain_vllm_with_the_same_greedy_tokens(pruned):
    lm, path = pruned
    assert lm.model.config.intermediate_size == 384
    ids = [lm.tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    out = subprocess.run([sys.executable, "-c", PLAIN, str(path), json.dumps(ids), "12"], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    theirs = json.loads(out.stdout.strip().splitlines()[-1])
    with torch.no_grad():
        ours = [lm.model.generate(torch.tensor([p]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                  pad_token_id=256)[0, len(p):].tolist() for p in ids]
    assert theirs == ours


def test_vllm_engine_makes_the_hf_engines_records(pruned, tmp_path):
    lm, _ = pruned
    hf, vllm = TorchBackend(lm), VllmBackend(lm, tmp_path / "cache", progress=False)
    try:
        for kwargs in ({}, {"stop": lambda text: "}" in text}, {"early": EarlyStop(4, lambda text: len(text) > 6, 2)}):
            a = hf.generate(PROMPTS, 10, batch_size=3, progress=False, **kwargs)
            streamed = []
            b = vllm.generate(PROMPTS, 10, batch_size=3, progress=False, on_record=streamed.append, **kwargs)
            key = lambda r: (r.index, r.output, r.new_tokens, r.ended_by_eos, r.stopped_by)  # noqa: E731
            assert [key(r) for r in b] == [key(r) for r in a], kwargs
            assert sorted(key(r) for r in streamed) == sorted(key(r) for r in a)
            if "early" in kwargs:  # the rule really ended rows, in both engines alike
                assert {r.stopped_by for r in b} >= {"early"}
        assert vllm.tokens_per_second(PROMPTS[:1], 8) > 0
    finally:
        vllm.close()


def test_evaluate_with_vllm_equals_hf(pruned, tmp_path):
    lm, _ = pruned
    settings = EvalSettings(tasks=("gsm8k",), limit=3, max_new_tokens=8, trap_budget=16, speed_prompts=1)
    hf = evaluate(lm, ["gsm8k"], tmp_path / "hf", settings, progress=False)
    vl = evaluate(lm, ["gsm8k"], tmp_path / "vllm", EvalSettings(**{**settings.__dict__, "backend": "vllm"}),
                  progress=False)
    assert vl["resources"]["backend"] == "vllm" and hf["resources"]["backend"] == "hf"
    a, b = (read_records(tmp_path / d / "gsm8k.jsonl") for d in ("hf", "vllm"))
    assert {i: (r["output"], r["trap"]) for i, r in a.items()} == {i: (r["output"], r["trap"]) for i, r in b.items()}
    assert vl["tasks"]["gsm8k"]["accuracy"] == hf["tasks"]["gsm8k"]["accuracy"]


def test_a_width_vllm_cannot_shard_is_refused():
    model = small_qwen2(d_ff=320)
    with pytest.raises(ValueError, match="multiple of 128 x tensor_parallel_size = 128; this model's is 320"):
        check_width(model.config)
    check_width(small_qwen2(d_ff=512).config, tensor_parallel_size=4)
    with pytest.raises(ValueError, match="= 256"):
        check_width(small_qwen2(d_ff=384).config, tensor_parallel_size=2)
    lm = LoadedModel(model, byte_tokenizer(), get_adapter("qwen2"), {"spec": "x"})
    with pytest.raises(ValueError, match="--align 128"):
        open_backend("vllm", lm)


def test_multiple_choice_from_vllms_prompt_logprobs(pruned, tmp_path):
    from taskprune.evaluate.multiple_choice import loglikelihoods
    lm, _ = pruned
    pairs = [("Question: 2 + 2 =", " 4"), ("Question: 2 + 2 =", " five"), ("", " hello"), ("abc " * 40, " d e f")]
    engine = VllmBackend(lm, tmp_path / "cache", progress=False)
    try:
        ours = loglikelihoods(lm.model, lm.tokenizer, pairs, batch_size=2)
        theirs = loglikelihoods(lm.model, lm.tokenizer, pairs, engine=engine)
    finally:
        engine.close()
    assert [g for _, g in theirs] == [g for _, g in ours]
    for (a, _), (b, _) in zip(ours, theirs):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-4)
    settings = EvalSettings(tasks=("mc:arc-easy",), limit=4, speed_prompts=0)
    hf = evaluate(lm, ["mc:arc-easy"], tmp_path / "hf", settings, progress=False)
    vl = evaluate(lm, ["mc:arc-easy"], tmp_path / "vllm", EvalSettings(**{**settings.__dict__, "backend": "vllm"}),
                  progress=False)
    a, b = (read_records(tmp_path / d / "mc-arc-easy.jsonl") for d in ("hf", "vllm"))
    assert a.keys() == b.keys() and len(a) == 4
    for i in a:
        assert b[i]["loglik"] == pytest.approx(a[i]["loglik"], rel=1e-4, abs=1e-4)
    assert vl["tasks"]["mc:arc-easy"]["n"] == hf["tasks"]["mc:arc-easy"]["n"] == 4
