"""The command line end to end on tiny local checkpoints, and every bad input's message and exit code."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config

from taskprune.cli import main
from taskprune.models.synthetic import byte_tokenizer, tiny_model


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    tiny_model("llama").save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def run(args, capsys):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_capture_score_prune_info(tiny_dir, tmp_path, capsys):
    profile = tmp_path / "profile"
    code, out, err = run(["capture", "--model", tiny_dir, "--target", "gsm8k", "--distractor", "squad,chitchat",
                          "--n", 6, "--max-length", 64, "--dtype", "float32", "--out", profile], capsys)
    assert code == 0, err
    meta = json.loads((profile / "profile.json").read_text())
    assert [s["role"] for s in meta["sets"]] == ["target", "distractor", "distractor"]
    assert meta["counts"]["gsm8k"]["n"] == 6 and meta["capture"]["template"] == "chat"
    code, out, _ = run(["score", "--profile", profile, "--out", tmp_path / "s.safetensors"], capsys)
    assert code == 0 and "positive(S>0)" in out and (tmp_path / "s.safetensors").is_file()
    code, _, err = run(["score", "--profile", profile, "--scorer", "wanda-sp"], capsys)
    assert code == 2 and "--model" in err
    code, _, err = run(["score", "--profile", profile, "--scorer", "wanda-sp", "--model", tiny_dir,
                        "--dtype", "float32"], capsys)
    last = err.strip().splitlines()[-1]  # after the model's loading bar
    assert code == 2 and last.startswith("taskprune score: error: scorer 'wanda-sp' reads token-level") \
        and "--token-stats" in last
    token_profile = tmp_path / "token-profile"
    code, out, err = run(["capture", "--model", tiny_dir, "--target", "gsm8k", "--distractor", "squad,chitchat",
                          "--n", 6, "--max-length", 64, "--dtype", "float32", "--token-stats", "--out",
                          token_profile], capsys)
    assert code == 0, err
    code, out, err = run(["score", "--profile", token_profile, "--scorer", "wanda-sp", "--model", tiny_dir,
                          "--dtype", "float32"], capsys)
    assert code == 0, err
    out_dir = tmp_path / "pruned"
    code, out, err = run(["prune", "--model", tiny_dir, "--profile", profile, "--ratio", 0.2, "--align", 32,
                          "--dtype", "float32", "--out", out_dir], capsys)
    assert code == 0, err
    assert "d_ff 256 -> 192" in out and "0.2 nominal, 0.2500 exact" in out
    record = json.loads((out_dir / "pruning.json").read_text())
    assert record["scorer"] == "selectivity" and record["profile"]["hash"] and record["plan"]["strategy"] == "selective"
    assert AutoModelForCausalLM.from_pretrained(out_dir).config.intermediate_size == 192
    code, out, _ = run(["info", out_dir], capsys)
    assert code == 0 and "d_ff 256 -> 192" in out
    streamed = tmp_path / "streamed"  # the same prune on the checkpoint's shards, no model loaded
    code, out, err = run(["prune", "--model", tiny_dir, "--profile", profile, "--ratio", 0.2, "--align", 32,
                          "--stream", "--out", streamed], capsys)
    assert code == 0, err
    assert json.loads((streamed / "pruning.json").read_text())["plan"] == record["plan"]
    a, b = (load_file(d / "model.safetensors") for d in (out_dir, streamed))
    assert set(b) <= set(a) and all(torch.equal(a[k], b[k]) for k in b)
    code, _, err = run(["prune", "--model", tiny_dir, "--profile", profile, "--scorer", "wanda-sp", "--ratio", 0.2,
                        "--stream", "--out", tmp_path / "x"], capsys)
    assert code == 2 and "reads the model's weights" in err
    code, out, _ = run(["info", profile], capsys)
    assert code == 0 and "target     gsm8k: 6 prompts" in out and "token statistics no" in out
    code, out, _ = run(["info", token_profile], capsys)
    assert code == 0 and "token statistics yes" in out


def test_one_shot_prune_reuses_capture(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TASKPRUNE_CACHE", str(tmp_path / "cache"))
    args = ["prune", "--model", tiny_dir, "--target", "mbpp", "--distractor", "squad", "--n", 4,
            "--max-length", 48, "--ratio", 0.1, "--align", 64, "--dtype", "float32"]
    code, out, err = run(args + ["--out", tmp_path / "a"], capsys)
    assert code == 0, err
    code, out, err = run(args + ["--strategy", "reverse", "--out", tmp_path / "b"], capsys)
    assert code == 0 and "reusing cached profile" in out
    a = json.loads((tmp_path / "a" / "pruning.json").read_text())["plan"]["keep"]
    b = json.loads((tmp_path / "b" / "pruning.json").read_text())["plan"]["keep"]
    assert a != b and len(a[0]) == len(b[0]) == 192
    code, out, err = run(args + ["--scorer", "flap", "--out", tmp_path / "c"], capsys)  # captures its token sums
    assert code == 0 and "reusing cached profile" not in out, err


def test_random_needs_no_profile(tiny_dir, tmp_path, capsys):
    code, out, err = run(["prune", "--model", tiny_dir, "--strategy", "random", "--seed", 33, "--ratio", 0.3,
                          "--align", 16, "--out", tmp_path / "r"], capsys)
    assert code == 0, err
    plan = json.loads((tmp_path / "r" / "pruning.json").read_text())["plan"]
    assert plan["seed"] == 33 and plan["kept_width"] == 176


def test_unsupported_architecture(tmp_path, capsys):
    path = tmp_path / "gpt2"
    AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300)).save_pretrained(path)
    code, _, err = run(["prune", "--model", path, "--strategy", "random", "--ratio", 0.1, "--out", tmp_path / "o"],
                       capsys)
    assert code == 2 and "'gpt2' is not supported" in err and "qwen2" in err and "phi3" in err


@pytest.mark.parametrize("ratio,message", [(0, "strictly between 0 and 1"), (1.2, "strictly between 0 and 1"),
                                           (0.9, "fewer than one block")])
def test_bad_ratio(tiny_dir, tmp_path, capsys, ratio, message):
    code, _, err = run(["prune", "--model", tiny_dir, "--strategy", "random", "--ratio", ratio,
                        "--out", tmp_path / "o"], capsys)
    assert code == 2 and message in err and not (tmp_path / "o").exists()


def test_profile_from_another_model(tiny_dir, other_dir, tmp_path, capsys):
    profile = tmp_path / "p"
    assert run(["capture", "--model", other_dir, "--target", "gsm8k", "--distractor", "squad", "--n", 2,
                "--max-length", 32, "--out", profile], capsys)[0] == 0
    code, _, err = run(["prune", "--model", tiny_dir, "--profile", profile, "--ratio", 0.2, "--align", 32,
                        "--out", tmp_path / "o"], capsys)
    assert code == 2 and "config hash" in err and "capture a new profile" in err


def test_missing_and_malformed_data(tiny_dir, tmp_path, capsys):
    code, _, err = run(["capture", "--model", tiny_dir, "--target", tmp_path / "nope.jsonl", "--distractor", "squad",
                        "--out", tmp_path / "p"], capsys)
    assert code == 2 and "nope.jsonl does not exist" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    code, _, err = run(["capture", "--model", tiny_dir, "--target", bad, "--distractor", "squad",
                        "--out", tmp_path / "p"], capsys)
    assert code == 2 and "bad.jsonl:2: not valid JSON" in err
    assert not (tmp_path / "p").exists()


def test_existing_output(tiny_dir, tmp_path, capsys):
    (tmp_path / "o").mkdir()
    code, _, err = run(["prune", "--model", tiny_dir, "--strategy", "random", "--ratio", 0.1, "--align", 16,
                        "--out", tmp_path / "o"], capsys)
    assert code == 2 and "exists" in err and "--overwrite" in err
    code, _, err = run(["prune", "--model", tiny_dir, "--strategy", "random", "--ratio", 0.1, "--align", 16,
                        "--out", tmp_path / "o", "--overwrite"], capsys)
    assert code == 0, err


def test_unknown_model_and_exit_code_from_shell(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "taskprune.cli", "prune", "--model", str(tmp_path / "nothing"),
                           "--strategy", "random", "--ratio", "0.1", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "cannot find model" in proc.stderr


def test_eval_command(tiny_dir, tmp_path, capsys):
    code, out, err = run(["eval", "--model", tiny_dir, "--tasks", "gsm8k,mbpp", "--limit", 2, "--trap-budget", 0, "--max-new-tokens", 24,
                          "--speed-prompts", 1, "--dtype", "float32", "--out", tmp_path / "ev"], capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert set(summary["tasks"]) == {"gsm8k", "mbpp"} and summary["tasks"]["mbpp"]["n"] == 2
    res = summary["resources"]
    assert res["tokens_per_s_batch1"] > 0
    # Linux: Table 5's footprint, the weights plus what decoding the speed prompt at batch 1 added
    assert res["weight_bytes"] <= res["peak_memory_batch1_bytes"] < res["weight_bytes"] + 100 * 2**20
    assert len((tmp_path / "ev" / "gsm8k.jsonl").read_text().splitlines()) == 2
    code, _, err = run(["eval", "--model", tiny_dir, "--tasks", "gsm9k", "--out", tmp_path / "ev"], capsys)
    assert code == 2 and "unknown task 'gsm9k'" in err


def test_eval_multiple_choice_task(tiny_dir, tmp_path, capsys):
    code, out, err = run(["eval", "--model", tiny_dir, "--tasks", "mc:arc-easy", "--limit", 3, "--speed-prompts", 0,
                          "--dtype", "float32", "--out", tmp_path / "ev"], capsys)
    assert code == 0, err
    task = json.loads((tmp_path / "ev" / "summary.json").read_text())["tasks"]["mc:arc-easy"]
    assert task["n"] == 3 and 0 <= task["acc"] <= 1 and task["accuracy"] == task["acc"]
    assert len((tmp_path / "ev" / "mc-arc-easy.jsonl").read_text().splitlines()) == 3
    code, _, err = run(["eval", "--model", tiny_dir, "--tasks", "mc:arc-hard", "--out", tmp_path / "ev"], capsys)
    assert code == 2 and "unknown multiple-choice set 'arc-hard'" in err


def test_a_new_multiple_choice_set_is_one_registry_entry(tiny_dir, tmp_path, capsys):
    """mc:siqa (Social IQa) was added as one MC_SETS entry in data/multiple_choice.py: the task, its
    records file, the summary and --help follow from it."""
    (tmp_path / "data" / "siqa").mkdir(parents=True)
    row = {"context": "Tracy stayed out.", "question": "What will Tracy do?", "answerA": "sleep",
           "answerB": "go home", "answerC": "eat", "label": "2"}
    (tmp_path / "data" / "siqa" / "validation.jsonl").write_text("".join(json.dumps(row) + "\n" for _ in range(2)))
    code, out, err = run(["eval", "--model", tiny_dir, "--tasks", "mc:siqa", "--speed-prompts", 0, "--dtype",
                          "float32", "--data-dir", tmp_path / "data", "--out", tmp_path / "ev"], capsys)
    assert code == 0, err
    task = json.loads((tmp_path / "ev" / "summary.json").read_text())["tasks"]["mc:siqa"]
    assert task["n"] == 2 and task["kind"] == "multiple-choice" and task["accuracy"] == task["acc"]
    assert len((tmp_path / "ev" / "mc-siqa.jsonl").read_text().splitlines()) == 2
    code, out, _ = run(["eval", "--help"], capsys)
    assert "mc:siqa" in " ".join(out.split())
