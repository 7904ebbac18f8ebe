"""Another evaluation engine (`--engine llamacpp` or `vllm`) against the transformers engine, in one run.

Both engines evaluate the same model on the first ``--n`` HumanEval problems through `taskprune.evaluate`
itself (same prompts, greedy settings, stop rule, budget, sandbox and records; ``--trap-budget`` 0 by
default, so every row stops at EOS or 512 tokens), each into its own directory. Printed: HumanEval
tokens/s of each engine at ``--batch-size`` and their ratio (engine / transformers), the batch-1
decode ratio, how many outputs are identical, pass@1 of each and their paired difference with a 95%
bootstrap interval. The target for llama.cpp's eval-batch ratio (issue 17): >= 1x on a CPU with native
bf16 (avx512_bf16 / amx_bf16), >= 3x on one without, at 1.5B; vLLM has none on a CPU (it is the GPU
engine; here the run checks agreement).

Usage (each engine in its own virtualenv: llama.cpp after `make gguf`, vLLM after `make vllm`)::

    .venv-gguf/bin/python benchmarks/engine_vs_hf.py                        # llama.cpp, embedded 0.5B, f32, 20
    .venv-gguf/bin/python benchmarks/engine_vs_hf.py --model qwen2.5-coder-1.5b --dtype auto --n 16
    .venv-vllm/bin/python benchmarks/engine_vs_hf.py --engine vllm --dtype auto --n 20

Pause other torch work first: two processes on two cores distort each other's timings.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from taskprune.evaluate.runner import evaluate, read_records
from taskprune.models import load_model
from taskprune.report.speed import Headline, machine, machine_text, write_benchmark
from taskprune.report.tables import paired_bootstrap
from taskprune.settings import EvalSettings

def run_engine(lm, engine: str, out: Path, args) -> tuple[dict, dict[str, dict]]:
    settings = EvalSettings(tasks=("humaneval",), limit=args.n, batch_size=args.batch_size,
                            trap_budget=args.trap_budget, speed_prompts=args.speed_prompts, backend=engine)
    summary = evaluate(lm, ["humaneval"], out, settings, cache_dir=args.cache_dir)
    return summary, read_records(out / "humaneval.jsonl")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", default="llamacpp", choices=("llamacpp", "vllm"))
    parser.add_argument("--model", default="qwen2.5-coder-0.5b", help="model spec (packaged name, path, hub id)")
    parser.add_argument("--dtype", default="float32", help="float32 (agreement within noise), bfloat16 or auto")
    parser.add_argument("--n", type=int, default=20, help="HumanEval problems (164: all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--trap-budget", type=int, default=0, help="the study uses 1024; 0 stops rows at 512 tokens")
    parser.add_argument("--speed-prompts", type=int, default=3, help="prompts for the batch-1 figure (0: skip)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="where GGUF exports are cached")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here (report/speed.py)")
    args = parser.parse_args(argv)

    engines = ("hf", args.engine)
    lm = load_model(args.model, dtype=args.dtype)
    dtype = str(next(lm.model.parameters()).dtype).removeprefix("torch.")
    m = machine()
    print(f"{args.model} in {dtype} on {machine_text(m)}; HumanEval first {args.n}, batch {args.batch_size}",
          flush=True)
    summaries, records = {}, {}
    with tempfile.TemporaryDirectory(prefix=f"{args.engine}-engine-") as tmp:
        for engine in engines:
            summaries[engine], records[engine] = run_engine(lm, engine, Path(tmp) / engine, args)

    def figure(engine: str, key: str) -> float:
        s = summaries[engine]
        return s["tasks"]["humaneval"][key] if key != "batch1" else s["resources"]["tokens_per_s_batch1"]

    hf, other = records["hf"], records[args.engine]
    same = sum(hf[i]["output"] == other[i]["output"] for i in hf)
    agree = sum(bool(hf[i]["correct"]) == bool(other[i]["correct"]) for i in hf)
    delta = paired_bootstrap({i: float(r["correct"]) for i, r in other.items()},
                             {i: float(r["correct"]) for i, r in hf.items()})
    native_bf16 = bool({"avx512_bf16", "amx_bf16"} & set(m.get("cpu_flags", [])))
    target = (1.0 if native_bf16 else 3.0) if args.engine == "llamacpp" else None
    ratio = figure(args.engine, "tokens_per_s") / figure("hf", "tokens_per_s")
    rows = []
    for engine in engines:
        t = summaries[engine]["tasks"]["humaneval"]
        rows.append({"engine": engine, "pass_at_1": t["accuracy"], "tokens_per_s": t["tokens_per_s"],
                     "tokens_per_s_batch1": figure(engine, "batch1"), "mean_new_tokens": t["mean_new_tokens"],
                     "wall_s": t["wall_s_this_run"]})
        print(f"  {engine:9s} pass@1 {100 * t['accuracy']:5.1f}%  {t['tokens_per_s']:6.1f} tok/s at batch "
              f"{args.batch_size}  {figure(engine, 'batch1') or 0:6.1f} tok/s at batch 1  "
              f"{t['mean_new_tokens']:6.1f} new tokens/problem  {t['wall_s_this_run']:7.1f} s", flush=True)
    headline = [Headline(f"{args.model} {dtype}: {args.engine} / transformers HumanEval tokens/s at batch "
                         f"{args.batch_size}", ratio, target, "x")]
    aim = f" (target >= {target:g}x on this CPU, {'native' if native_bf16 else 'no native'} bf16)" if target else ""
    print(f"{args.engine} / transformers: {ratio:.2f}x at batch {args.batch_size}{aim}", flush=True)
    if args.speed_prompts:
        ratio1 = figure(args.engine, "batch1") / figure("hf", "batch1")
        headline.append(Headline(f"{args.model} {dtype}: {args.engine} / transformers batch-1 tokens/s", ratio1,
                                 None, "x"))
        print(f"{args.engine} / transformers: {ratio1:.2f}x at batch 1", flush=True)
    print(f"identical outputs {same}/{len(hf)}, same verdict {agree}/{len(hf)}; pass@1 {args.engine} - transformers "
          f"{delta[0]:+.1f} points (95% paired bootstrap [{delta[1]:+.1f}, {delta[2]:+.1f}], {delta[3]} problems)",
          flush=True)
    headline.append(Headline(f"{args.model} {dtype}: identical HumanEval outputs", same / len(hf), None, "share"))
    if args.json:
        rows.append({"identical_outputs": same, "same_verdict": agree, "problems": len(hf),
                     "pass_at_1_delta_points": list(delta[:3])})
        write_benchmark(args.json, f"{args.engine}_engine", headline, rows)
        print(f"wrote {args.json}")
    print(json.dumps({"ratio": ratio, "identical": same, "n": len(hf)}))


if __name__ == "__main__":
    main()
