"""Peak memory of checkpoint surgery (taskprune.surgery.prune_checkpoint) against in-memory surgery (issue 15).

A random-init model with the real Qwen2.5-1.5B shapes (28 layers, hidden 1536, d_ff 8960, 12/2 heads,
vocab 151936, tied embeddings) is saved in bf16 as 4 safetensors shards. Each surgery then runs in a
fresh child process, so that its peak resident set (ru_maxrss) is its own:

* **checkpoint**: `prune_checkpoint`, shard by shard, no model object;
* **in memory** (the baseline): `load_model` + `prune_model` + `save_pruned`, as `taskprune prune` does.

Printed: each one's peak RSS above that of a process that only imports them (torch's own ~0.4 GiB), as a multiple of the largest input shard, and the target (at most 1.3x the
largest shard plus the shard being written). Then the two outputs are checked equal: every tensor, and
the logits of both pruned models on a short input. Exit status 1 if they differ or the target is missed.

Usage::

    python benchmarks/surgery_memory.py                  # 35% random prune, in a temporary directory
    python benchmarks/surgery_memory.py --ratio 0.2 --work /tmp/sm --keep
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from taskprune.report.speed import Headline, write_benchmark

QWEN25_15B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rms_norm_eps=1e-6,
                  rope_theta=1000000.0, tie_word_embeddings=True, hidden_act="silu")

CHECKPOINT = """
import json, sys
from pathlib import Path
from taskprune.plan import make_plan
from taskprune.surgery import prune_checkpoint
src, out, ratio = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
cfg = json.loads((src / "config.json").read_text())
plan = make_plan(None, "random", ratio, 128, 42, shape=(cfg["num_hidden_layers"], cfg["intermediate_size"]))
prune_checkpoint(src, plan, out, {"plan": plan.to_dict(), "scorer": None, "source_model": {"spec": str(src)}})
print("VmHWM", open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
"""

IN_MEMORY = """
import sys
from pathlib import Path
from taskprune.models import load_model
from taskprune.pipeline import prune_and_save
from taskprune.plan import make_plan
src, out, ratio = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])
lm = load_model(src, "bfloat16", "cpu")
plan = make_plan(None, "random", ratio, 128, 42, shape=(len(lm.adapter.mlps(lm.model)), lm.adapter.d_ff(lm.model)))
prune_and_save(lm, plan, out, "selectivity")
print("VmHWM", open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
"""


def peak_rss(script: str, *args: str) -> int:
    """Peak resident set of a fresh Python process running `script` (bytes): its own high-water mark
    (VmHWM, which starts again at exec; ru_maxrss would keep the forking parent's)."""
    out = subprocess.run([sys.executable, "-c", script, *args], check=True, capture_output=True, text=True).stdout
    return int(out.split("VmHWM")[-1].split()[0]) * 1024


def baseline_rss() -> int:
    """The same for a process that only imports what the surgeries import (torch, transformers)."""
    return peak_rss("import taskprune.pipeline, taskprune.surgery\n"
                    "print('VmHWM', open('/proc/self/status').read().split('VmHWM:')[1].split()[0])")


def make_checkpoint(path: Path, shards: int = 4) -> None:
    from transformers import AutoModelForCausalLM, Qwen2Config

    from taskprune.models.synthetic import byte_tokenizer
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen2Config(**QWEN25_15B), dtype=torch.bfloat16)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(path, max_shard_size=f"{size * 11 // (10 * shards) // 2**20}MB")  # greedy packing: a margin
    byte_tokenizer().save_pretrained(path)


def logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        return model(ids).logits.float()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratio", type=float, default=0.35)
    parser.add_argument("--work", type=Path, default=None, help="working directory (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here (report/speed.py)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="surgery-memory-"))
    src, streamed, in_memory = work / "src", work / "checkpoint", work / "in-memory"
    try:
        if not (src / "config.json").is_file():
            make_checkpoint(src)
        shard_sizes = sorted(f.stat().st_size for f in src.glob("*.safetensors"))
        largest = shard_sizes[-1]
        for out in (streamed, in_memory):
            shutil.rmtree(out, ignore_errors=True)
        base = baseline_rss()
        rss = {"checkpoint": peak_rss(CHECKPOINT, str(src), str(streamed), str(args.ratio)) - base,
               "in memory": peak_rss(IN_MEMORY, str(src), str(in_memory), str(args.ratio)) - base}
        written = max(f.stat().st_size for f in streamed.glob("*.safetensors"))
        print(f"source: {len(shard_sizes)} shards, largest {largest / 2**30:.2f} GiB, total "
              f"{sum(shard_sizes) / 2**30:.2f} GiB; {args.ratio:.0%} random prune")
        print(f"peak RSS above the {base / 2**30:.2f} GiB of a process that only imports torch and taskprune:")
        for name, value in rss.items():
            print(f"{name:>10}: {value / 2**30:.2f} GiB = {value / largest:.2f}x the largest shard")
        budget = 1.3 * largest + written
        print(f"target: at most 1.3x the largest shard + the shard being written = {budget / largest:.2f}x; "
              f"checkpoint surgery {'meets' if rss['checkpoint'] <= budget else 'MISSES'} it; "
              f"{rss['in memory'] / rss['checkpoint']:.2f}x less than in memory")
        from safetensors import safe_open
        same = True
        for f in sorted(in_memory.glob("*.safetensors")):
            with safe_open(f, framework="pt") as a:
                for name in a.keys():
                    file = json.loads((streamed / "model.safetensors.index.json").read_text())["weight_map"][name]
                    with safe_open(streamed / file, framework="pt") as b:
                        same &= torch.equal(a.get_tensor(name), b.get_tensor(name))
        ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
        diff = (logits(streamed, ids) - logits(in_memory, ids)).abs().max().item()
        print(f"equal to in-memory surgery: tensors {'identical' if same else 'DIFFER'}; logits max |diff| {diff:.3g}")
        if args.json:
            write_benchmark(args.json, "surgery_memory", [
                Headline("checkpoint surgery peak RSS / largest shard", rss["checkpoint"] / largest,
                         budget / largest, "x", higher_is_better=False),
                Headline("in-memory surgery peak RSS / largest shard", rss["in memory"] / largest, None, "x",
                         higher_is_better=False)],
                [{"shards": len(shard_sizes), "largest_shard_bytes": largest, "ratio": args.ratio,
                  "peak_rss_bytes": rss, "tensors_identical": same, "logits_max_abs_diff": diff}])
        return 0 if same and diff == 0 and rss["checkpoint"] <= budget else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
