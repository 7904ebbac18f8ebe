"""Integrated-Gradients pass against the plain per-layer loop it replaces.

    python benchmarks/ig_pass.py [--model qwen2.5-coder-0.5b] [--n 4] [--steps 4] [--dtype auto]
    python benchmarks/ig_pass.py --model synthetic:qwen2.5-1.5b   # real shapes, random weights (GPU)

`taskprune.gradients.gradient_stats(kinds=("ig",))` runs, for each scaled layer l and step, only the
layers from l up and the vocabulary head at the columns that hold a selected position. The baseline
is the plain loop: a full forward (every layer, logits at every position) and backward per layer and
step, on the same batches. Both must give the same attributions (checked to a tolerance); the script
prints both times and their ratio (target: >= 1.25x). Runs alternate, best of `--repeats`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from taskprune.data import format_text, load_examples, sample
from taskprune.gradients import _batch, _encode, _forward, _selected_positions, gradient_stats
from taskprune.models import LoadedModel, get_adapter, load_model, resolve_dtype
from taskprune.models.synthetic import byte_tokenizer, real_shape_model
from taskprune.report.speed import Headline, write_benchmark


def plain_ig(model, tokenizer, adapter, texts, steps, threshold, max_length, batch_size) -> torch.Tensor:
    """The plain loop: every step is a full forward (all layers, all logits) and a backward."""
    encoded = _encode(tokenizer, texts, max_length)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    mlps = adapter.mlps(model)
    out = torch.zeros(len(mlps), adapter.down_proj(mlps[0]).in_features, dtype=torch.float64)
    device = next(model.parameters()).device
    for p in model.parameters():
        p.requires_grad_(False)
    for start in range(0, len(order), batch_size):
        ids, mask = (t.to(device) for t in _batch(encoded, order[start:start + batch_size], tokenizer.pad_token_id))
        with torch.no_grad():
            y, sel = _selected_positions(_forward(model, ids, mask), mask, torch.zeros(len(ids), dtype=torch.long,
                                                                                       device=device), threshold)
        if not sel.any():
            continue
        for layer, mlp in enumerate(mlps):
            grad_sum, state = 0.0, {}

            def scale(module, args):
                h = args[0].detach()
                state["h"] = h[sel]
                state["x"] = (state["alpha"] * h[sel]).requires_grad_(True)
                return (h.index_put((sel,), state["x"]),)

            handle = adapter.down_proj(mlp).register_forward_pre_hook(scale)
            for k in range(steps):
                state["alpha"] = (k + 0.5) / steps
                logp = _forward(model, ids, mask)[sel].float().log_softmax(-1)
                (g,) = torch.autograd.grad(logp.gather(-1, y[sel].unsqueeze(-1)).sum(), state["x"])
                grad_sum = grad_sum + g.double()
            handle.remove()
            out[layer] += (state["h"].double() * grad_sum / steps).sum(0).cpu()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b",
                        help="any model spec, or synthetic:NAME for random weights with real shapes")
    parser.add_argument("--dtype", default="float32", help="float32 keeps the agreement check tight")
    parser.add_argument("--n", type=int, default=4, help="texts (MBPP prompt + code)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here (report/speed.py)")
    args = parser.parse_args()

    if args.model.startswith("synthetic:"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = real_shape_model(args.model.removeprefix("synthetic:"), resolve_dtype(args.dtype), device)
        lm = LoadedModel(model, byte_tokenizer(), get_adapter(model.config.model_type), {"spec": args.model})
        threshold = 0.0  # random weights are never confident
    else:
        lm = load_model(args.model, args.dtype)
        threshold = args.threshold
    texts = [format_text(lm.tokenizer, ex, content="prompt+response") for ex in sample(load_examples("mbpp"), args.n, 0)]
    kw = dict(max_length=args.max_length, batch_size=args.batch_size)
    print(f"model {args.model}, dtype {lm.model.dtype}, {len(texts)} texts, {args.steps} steps, "
          f"{len(lm.adapter.mlps(lm.model))} layers, threads {torch.get_num_threads()}")
    runs = {
        "taskprune": lambda: gradient_stats(lm.model, lm.tokenizer, texts, lm.adapter, kinds=("ig",),
                                            ig_steps=args.steps, ig_threshold=threshold, progress=False, **kw)["ig.sum"],
        "plain": lambda: plain_ig(lm.model, lm.tokenizer, lm.adapter, texts, args.steps, threshold, **kw),
    }
    best, result = {}, {}
    for rep in range(args.repeats):
        for name in (list(runs) if rep % 2 == 0 else list(runs)[::-1]):
            start = time.perf_counter()
            result[name] = runs[name]()
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
    a, b = result["taskprune"], result["plain"]
    rel = float((a - b).norm() / b.norm().clamp_min(1e-30))
    for name, seconds in best.items():
        print(f"{name:10s} {seconds:8.2f} s")
    print(f"attributions agree: relative difference {rel:.2e} (sum {float(a.sum()):.4f} vs {float(b.sum()):.4f})")
    print(f"ratio plain / taskprune: {best['plain'] / best['taskprune']:.2f}x  (target >= 1.25x)")
    if args.json:
        write_benchmark(args.json, "ig_pass", [
            Headline(f"{args.model}: plain IG seconds / taskprune's", best["plain"] / best["taskprune"], 1.25, "x")],
            [{"model": args.model, "seconds": best, "relative_difference": rel}])


if __name__ == "__main__":
    main()
