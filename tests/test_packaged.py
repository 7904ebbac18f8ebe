"""The packaged SmolLM2-135M end to end (slow: converts the GGUF once, then captures on real data)."""

import json
import subprocess
import sys

import pytest

from taskprune.cli import main

pytestmark = pytest.mark.slow

GENERATE = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                               tokenize=False, add_generation_prompt=True)
ids = tok(text, return_tensors="pt", add_special_tokens=False)
out = model.generate(**ids, max_new_tokens=24, do_sample=False)
print(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
assert "taskprune" not in sys.modules
"""


def test_one_shot_prune_of_packaged_model_generates_text(tmp_path, capsys):
    out = tmp_path / "pruned"
    code = main(["prune", "--model", "smollm2-135m", "--target", "gsm8k", "--distractor", "squad", "--n", "8",
                 "--max-length", "128", "--ratio", "0.05", "--dtype", "float32", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    record = json.loads((out / "pruning.json").read_text())
    assert record["plan"]["d_ff"] == 1536 and record["plan"]["kept_width"] == 1408
    proc = subprocess.run([sys.executable, "-c", GENERATE, str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    answer = proc.stdout.strip()
    assert "Paris" in answer, answer
