"""llama.cpp reads taskprune's GGUF exports: tiny seeded pruned models of every exported architecture and,
marked slow, the packaged Qwen2.5-Coder-0.5B pruned 10% at random (its f32 greedy tokens, and its q8_0
export's HumanEval pass@1 against the f32 export's). In f32 llama.cpp's logits match
transformers' on the checkpoint and its greedy tokens equal transformers' greedy tokens; llama.cpp's
tokenizer, built from the GGUF's vocabulary, merges and pre-tokenizer type, tokenizes the chat-formatted
prompts as the Hugging Face tokenizer does."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import PROMPTS, pruned_checkpoint

import llama_cpp

NEW_TOKENS = 24
GGML_TYPE_F32 = 0  # an f32 KV cache, so that the f32 comparison is f32 throughout (the default is f16)
# max |logit difference| in f32 (logits are O(1)): measured 2-4e-7 for the SiLU models; ggml computes GELU
# through an f16 table, so Gemma's differ by ~8e-5 and Gemma 2's (with its tanh soft-capping) by ~5e-4.
F32_TOLERANCE = {"gemma": 1e-3, "gemma2": 1e-3}


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    root, made = tmp_path_factory.mktemp("tiny"), {}

    def get(arch: str, spm: bool = False) -> Path:
        if (arch, spm) not in made:
            made[arch, spm] = pruned_checkpoint(arch, root / f"{arch}{'-spm' * spm}", spm=spm)
        return made[arch, spm]
    return get


def _llama(path: Path, n_ctx: int = 512) -> llama_cpp.Llama:
    return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=2, logits_all=True, verbose=False,
                           type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, seed=0)


def _export(ckpt: Path, out: Path, quant: str) -> Path:
    from taskprune.export import export_gguf
    export_gguf(ckpt, out, quant, progress=False)
    return out


def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    """As taskprune eval encodes a prompt: the chat template, then no added special tokens."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _hf_greedy(model, ids: list[int], eos: set[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=sorted(eos),
                         pad_token_id=sorted(eos)[0], attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return _until_eos(out[0, len(ids):].tolist(), eos)


def _llama_greedy(llm: llama_cpp.Llama, ids: list[int], eos: set[int], n: int) -> list[int]:
    out = []
    for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(token)
        if token in eos or len(out) == n:
            break
    return _until_eos(out, eos)


def _until_eos(tokens: list[int], eos: set[int]) -> list[int]:
    return next((tokens[:i] for i, t in enumerate(tokens) if t in eos), tokens)


def _eos(model, tokenizer) -> set[int]:
    from taskprune.evaluate.generate import eos_token_ids
    return eos_token_ids(model, tokenizer)


def _compare(ckpt: Path, gguf_path: Path, prompts: list[str], n: int, logit_tol: float | None) -> dict:
    """llama.cpp against transformers (fp32) on `prompts`: max |logit difference| over the prompt positions,
    greedy token sequences, tokenizations."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    eos = _eos(model, tokenizer)
    llm = _llama(gguf_path)
    gap, hf_tokens, cpp_tokens, same_tokenization = 0.0, [], [], []
    for prompt in prompts:
        ids = _prompt_ids(tokenizer, prompt)
        text = tokenizer.decode(ids)
        same_tokenization.append(llm.tokenize(text.encode(), add_bos=False, special=True) == ids)
        llm.reset()
        llm.eval(ids)
        with torch.no_grad():
            reference = model(torch.tensor([ids])).logits[0].numpy()
        gap = max(gap, float(np.abs(np.asarray(llm.scores[:len(ids)]) - reference).max()))
        with torch.no_grad():
            hf_tokens.append(_hf_greedy(model, ids, eos, n))
        cpp_tokens.append(_llama_greedy(llm, ids, eos, n))
    result = {"gap": gap, "hf": hf_tokens, "llama.cpp": cpp_tokens, "same_tokenization": same_tokenization}
    if logit_tol is not None:
        assert gap <= logit_tol, result
    return result


@pytest.mark.parametrize("arch,spm", [("qwen2", False), ("llama", False), ("qwen3", False), ("mistral", False),
                                      ("gemma", False), ("gemma2", False),
                                      ("mistral", True), ("gemma", True), ("gemma2", True)])
def test_f32_tiny_pruned_model_in_llamacpp_matches_transformers(tiny_checkpoints, tmp_path, arch, spm):
    """Byte-level BPE tokenizers (Qwen2 and Llama 3 split regexes) and, with spm, sentencepiece-style ones
    (Llama 2 / Mistral's with a "▁" prefix, Gemma's without)."""
    ckpt = tiny_checkpoints(arch, spm)
    result = _compare(ckpt, _export(ckpt, tmp_path / "m.gguf", "f32"), PROMPTS, NEW_TOKENS,
                      logit_tol=F32_TOLERANCE.get(arch, 1e-5))
    assert result["llama.cpp"] == result["hf"], result
    assert all(result["same_tokenization"]), result


@pytest.mark.parametrize("quant", ["f16", "bf16", "q8_0"])
def test_reduced_precision_tiny_exports_load_and_stay_close(tiny_checkpoints, tmp_path, quant):
    ckpt = tiny_checkpoints("qwen2")
    result = _compare(ckpt, _export(ckpt, tmp_path / "m.gguf", quant), PROMPTS[:1], 4,
                      logit_tol={"f16": 5e-3, "bf16": 3e-2, "q8_0": 6e-2}[quant])
    assert result["gap"] > 0


def test_q4_k_m_through_llamacpps_quantizer_keeps_the_taskprune_keys(tiny_checkpoints, tmp_path):
    from taskprune.cli import main
    ckpt, out = tiny_checkpoints("qwen2"), tmp_path / "q4" / "m.gguf"
    assert main(["export", "--model", str(ckpt), "--out", str(out), "--quant", "q4_k_m"]) == 0
    llm = _llama(out)
    meta = llm.metadata
    assert meta["general.file_type"] == str(llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M)
    assert (meta["taskprune.kept_width"], meta["qwen2.feed_forward_length"]) == ("128", "128")
    assert meta["taskprune.source_model"] == "tiny-qwen2" and meta["taskprune.export_type"] == "q4_k_m"
    llm.eval([257, 10, 20, 30])  # it runs
    assert np.isfinite(np.asarray(llm.scores[:4])).all()
    assert (out.parent / "Modelfile").read_text().count("FROM ./m.gguf") == 1
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def _pruned_coder(out: Path) -> Path:
    """qwen2.5-coder-0.5b pruned 10% at random (seed 42; d_ff 4864 -> 4352, align 128), saved to `out`."""
    from taskprune.models import load_model
    from taskprune.pipeline import prune_and_save
    from taskprune.plan import make_plan
    lm = load_model("qwen2.5-coder-0.5b", dtype="float32", device="cpu")
    layers, d_ff = len(lm.adapter.mlps(lm.model)), lm.adapter.d_ff(lm.model)
    plan = make_plan(None, "random", 0.1, 128, 42, shape=(layers, d_ff))
    prune_and_save(lm, plan, out, "selectivity")
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == plan.kept_width == 4352
    return out


@pytest.mark.slow
def test_packaged_coder_pruned_10pct_random_in_llamacpp_matches_transformers(tmp_path):
    """qwen2.5-coder-0.5b (d_ff 4864 -> 4352 at 10%, align 128), f32: identical greedy tokens on 3 prompts."""
    ckpt = _pruned_coder(tmp_path / "pruned")
    prompts = ["Write a Python function that returns the n-th Fibonacci number.",
               "def is_palindrome(s: str) -> bool:\n    \"\"\"Return True if s reads the same backwards.\"\"\"",
               "What is 17 * 23? Answer with the number."]
    result = _compare(ckpt, _export(ckpt, tmp_path / "coder.gguf", "f32"), prompts, 32, logit_tol=None)
    print(f"max |logit difference| llama.cpp vs transformers (f32, prompt positions): {result['gap']:.2e}")
    assert all(result["same_tokenization"]), result
    assert result["llama.cpp"] == result["hf"], result
    assert result["gap"] < 1e-2, result


@pytest.mark.slow
def test_packaged_coder_q8_0_export_keeps_humaneval_pass_at_1(tmp_path, monkeypatch):
    """The pruned coder's q8_0 export, decoded by llama.cpp, scores HumanEval pass@1 on the first 20 problems
    within 2 points of its f32 export (one problem is 5 points: the same count). Both run through the
    llama.cpp engine (`--backend llamacpp`), handed the exported file in place of its own f32 export."""
    from taskprune.evaluate import llamacpp
    from taskprune.evaluate.runner import evaluate, read_records
    from taskprune.models import load_model
    from taskprune.settings import EvalSettings
    ckpt = _pruned_coder(tmp_path / "pruned")
    lm = load_model(str(ckpt), dtype="float32", device="cpu")
    settings = EvalSettings(tasks=("humaneval",), limit=20, batch_size=16, trap_budget=0, speed_prompts=0,
                            backend="llamacpp")
    accuracy, outputs = {}, {}
    for quant in ("f32", "q8_0"):
        gguf = _export(ckpt, tmp_path / f"coder-{quant}.gguf", quant)
        monkeypatch.setattr(llamacpp, "cached_gguf", lambda *args, gguf=gguf, **kw: gguf)
        summary = evaluate(lm, ["humaneval"], tmp_path / f"eval-{quant}", settings, progress=False)
        accuracy[quant] = summary["tasks"]["humaneval"]["accuracy"]
        records = read_records(tmp_path / f"eval-{quant}" / "humaneval.jsonl")
        outputs[quant] = {i: r["output"] for i, r in records.items()}
    same = sum(outputs["f32"][i] == outputs["q8_0"].get(i) for i in outputs["f32"])
    print(f"HumanEval first 20, llama.cpp: pass@1 f32 {accuracy['f32']:.3f}, q8_0 {accuracy['q8_0']:.3f}; "
          f"{same}/20 outputs identical")
    assert len(outputs["f32"]) == len(outputs["q8_0"]) == 20
    assert abs(accuracy["q8_0"] - accuracy["f32"]) <= 0.02
