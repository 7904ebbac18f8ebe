"""Capture throughput against a plain forward of the same batches, and statistics memory vs prompt count.

    python benchmarks/capture_overhead.py [--model qwen2.5-coder-0.5b] [--n 32] [--dtype auto] [--json FILE]
    python benchmarks/capture_overhead.py --model synthetic:qwen2.5-7b   # real 7B shapes, random weights (GPU)

Prints tokens/s of `taskprune.capture.capture` (as captured by default, and with `token_stats=True`,
the token sums some scorers read) and of the same padded batches through the model with no hooks
(two baselines: the decoder alone, which is what capture runs, and the full causal LM with its
vocabulary head), and their ratios (target: default capture / plain decoder >= 0.95). Runs
alternate and the best of `--repeats` is kept, since this machine is noisy. Then it shows that the
statistics' size does not depend on the number of prompts.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from taskprune.capture import capture
from taskprune.data import format_text, load_examples, sample
from taskprune.models import LoadedModel, get_adapter, load_model, resolve_dtype
from taskprune.models.synthetic import byte_tokenizer, real_shape_model


def plain_forward(model, tokenizer, texts, max_length, batch_size, full: bool) -> int:
    """The same batches as capture (longest first, right padding), no hooks; returns tokens seen."""
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_length] for t in texts]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    runner = model if full else getattr(model, model.base_model_prefix)
    tokens = 0
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = [encoded[i] for i in order[start:start + batch_size]]
            width = max(map(len, batch))
            ids = torch.full((len(batch), width), tokenizer.pad_token_id)
            mask = torch.zeros_like(ids)
            for row, seq in enumerate(batch):
                ids[row, :len(seq)] = torch.tensor(seq)
                mask[row, :len(seq)] = 1
            device = next(model.parameters()).device
            runner(input_ids=ids.to(device), attention_mask=mask.to(device),
                   position_ids=(mask.cumsum(-1) - 1).clamp(min=0).to(device), use_cache=False)
            tokens += int(mask.sum())
    return tokens


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b",
                        help="any model spec, or synthetic:NAME for random weights with real shapes "
                             "(qwen2.5-0.5b, qwen2.5-1.5b, qwen2.5-7b)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--n", type=int, default=32, help="prompts (half MBPP, half SQuAD)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    if args.model.startswith("synthetic:"):  # the real shapes without the download: timing only
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = real_shape_model(args.model.removeprefix("synthetic:"), resolve_dtype(args.dtype), device)
        lm = LoadedModel(model, byte_tokenizer(), get_adapter(model.config.model_type), {"spec": args.model})
    else:
        lm = load_model(args.model, args.dtype)
    examples = sample(load_examples("mbpp"), args.n // 2, 0) + sample(load_examples("squad"), args.n - args.n // 2, 0)
    texts = [format_text(lm.tokenizer, ex) for ex in examples]
    print(f"model {args.model}, dtype {lm.model.dtype}, {len(texts)} prompts, batch {args.batch_size}, "
          f"threads {torch.get_num_threads()}")

    kw = dict(max_length=args.max_length, batch_size=args.batch_size)
    plain_forward(lm.model, lm.tokenizer, texts[:args.batch_size], args.max_length, args.batch_size, True)  # warm-up
    runs = {
        "decoder": lambda: plain_forward(lm.model, lm.tokenizer, texts, full=False, **kw),
        "capture": lambda: capture(lm.model, lm.tokenizer, texts, lm.adapter, progress=False, **kw),
        "capture+token": lambda: capture(lm.model, lm.tokenizer, texts, lm.adapter, token_stats=True,
                                         progress=False, **kw),
        "full": lambda: plain_forward(lm.model, lm.tokenizer, texts, full=True, **kw),
    }
    names = list(runs)
    best = dict.fromkeys(names, float("inf"))
    for rep in range(args.repeats):  # rotate the order so no variant always runs first
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            best[name] = min(best[name], timed(runs[name]))
    tokens = plain_forward(lm.model, lm.tokenizer, texts, full=False, **kw)
    for name, seconds in best.items():
        print(f"{name:13s} {tokens / seconds:8.1f} tokens/s  ({seconds:.2f} s for {tokens} tokens)")
    ratios = {"capture/decoder": best["decoder"] / best["capture"],
              "capture+token/decoder": best["decoder"] / best["capture+token"],
              "capture/full": best["full"] / best["capture"]}
    print(f"ratio capture / plain decoder forward (hook overhead): {ratios['capture/decoder']:.3f}  (target >= 0.95)")
    print(f"  with token statistics (--token-stats):             {ratios['capture+token/decoder']:.3f}")
    print(f"ratio capture / plain full-model forward:              {ratios['capture/full']:.3f}")

    print("statistics memory vs number of prompts:")
    for n in (len(texts) // 4, len(texts)):
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        s = capture(lm.model, lm.tokenizer, texts[:n], lm.adapter, token_stats=True, progress=False, **kw)
        size = sum(t.numel() * t.element_size() for t in (s.sum, s.sumsq, s.tok_sum, s.tok_sumsq))
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
        print(f"  {n:4d} prompts: statistics {size / 2**20:.2f} MiB, peak RSS grew by {grown / 1024:.1f} MiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "dtype": str(lm.model.dtype), "prompts": len(texts), "tokens": tokens,
                       "batch_size": args.batch_size, "threads": torch.get_num_threads(),
                       "seconds": best, "ratios": ratios}, f, indent=2)


if __name__ == "__main__":
    main()
