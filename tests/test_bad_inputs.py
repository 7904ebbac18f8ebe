"""Every bad input ends with exit code 2, one line on stderr (`taskprune CMD: error: ...`, no traceback),
and leaves the output path exactly as it was (existence and contents hashed before and after)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from taskprune import sweep
from taskprune.cli import main
from taskprune.config import load_config, to_dict


@pytest.fixture(autouse=True)
def _quiet_transformers():
    """Loading bars and load reports are not ours; only the error line is asserted on."""
    from transformers.utils import logging
    level = logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    yield
    logging.enable_progress_bar()
    logging.set_verbosity(level)


def tree_hash(path: Path) -> str | None:
    """None for a missing path; else a hash of every name, kind and file content below it."""
    if not path.exists() and not path.is_symlink():
        return None
    h = hashlib.sha256()
    if path.is_symlink():
        return "link:" + os.readlink(path)
    if path.is_file():
        return "file:" + hashlib.sha256(path.read_bytes()).hexdigest()
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode() + b"\0")
        if p.is_file() and not p.is_symlink():
            h.update(p.read_bytes())
    return "dir:" + h.hexdigest()


def expect_error(argv: list, capsys, watch: list[Path], fragment: str) -> str:
    """Run the CLI; assert exit 2, one stderr line naming the command and containing `fragment`, and
    every watched path unchanged."""
    before = {p: tree_hash(p) for p in watch}
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"taskprune {argv[0]}: error: "), lines[0]
    assert fragment in lines[0], lines[0]
    assert {p: tree_hash(p) for p in watch} == before
    return lines[0]


@dataclass
class Ctx:
    tmp: Path
    tiny: Path
    profile: Path

    def copy_model(self, name: str) -> Path:
        dst = self.tmp / name
        shutil.copytree(self.tiny, dst)
        return dst

    def copy_profile(self, name: str) -> Path:
        dst = self.tmp / name
        shutil.copytree(self.profile, dst)
        return dst

    def unrelated_dir(self, name: str = "thesis") -> Path:
        d = self.tmp / name
        d.mkdir()
        (d / "chapter1.tex").write_text("years of work")
        (d / "figs").mkdir()
        (d / "figs" / "plot.png").write_bytes(b"\x89PNG")
        return d


@pytest.fixture(scope="module")
def profile_dir(tiny_dir, data_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("profiles") / "p"
    code = main(["capture", "--model", str(tiny_dir), "--target", "gsm8k", "--distractor", "squad", "--n", "2",
                 "--max-length", "16", "--dtype", "float32", "--data-dir", str(data_dir), "--out", str(path)])
    assert code == 0
    return path


@pytest.fixture
def ctx(tmp_path, tiny_dir, profile_dir):
    return Ctx(tmp_path, tiny_dir, profile_dir)


def _random_prune(model, out, *extra):
    return ["prune", "--model", model, "--strategy", "random", "--ratio", 0.5, "--align", 16, "--out", out, *extra]


# -- outputs and --overwrite ---------------------------------------------------------------------


def case_overwrite_unrelated_dir(c):
    d = c.unrelated_dir()
    return _random_prune(c.tiny, d, "--overwrite"), [d], "is a directory without pruning.json"


def case_overwrite_regular_file(c):
    f = c.tmp / "notes.txt"
    f.write_text("keep me")
    return _random_prune(c.tiny, f, "--overwrite"), [f], "is a file, not a directory"


def case_overwrite_symlink(c):
    d = c.unrelated_dir()
    os.symlink(d, c.tmp / "link")
    return _random_prune(c.tiny, c.tmp / "link", "--overwrite"), [d, c.tmp / "link"], "symbolic link"


def case_overwrite_other_kind(c):  # a profile is not a checkpoint
    p = c.copy_profile("prof")
    return _random_prune(c.tiny, p, "--overwrite"), [p], "without pruning.json"


def case_capture_overwrite_checkpoint(c):
    d = c.tmp / "ckpt"
    d.mkdir()
    (d / "pruning.json").write_text("{}")
    return (["capture", "--model", c.tiny, "--target", "gsm8k", "--distractor", "squad", "--n", 2,
             "--out", d, "--overwrite"], [d], "without profile.json")


def case_recover_overwrite_unrelated(c):
    d = c.unrelated_dir()
    return ["recover", "--model", c.tiny, "--preset", "code", "--out", d, "--overwrite"], [d], "without recovery.json"


def case_exists_without_overwrite(c):
    d = c.tmp / "empty"
    d.mkdir()
    return _random_prune(c.tiny, d), [d], "pass --overwrite"


def case_out_under_a_file(c):
    f = c.tmp / "afile"
    f.write_text("x")
    return _random_prune(c.tiny, f / "sub"), [f], "Not a directory"


def case_score_out_is_a_directory(c):
    d = c.unrelated_dir()
    return ["score", "--profile", c.profile, "--out", d], [d], "is a directory"


# -- models ------------------------------------------------------------------------------------


def case_truncated_config_json(c):
    m = c.copy_model("m")
    (m / "config.json").write_text((c.tiny / "config.json").read_text()[:100])
    return _random_prune(m, c.tmp / "o"), [c.tmp / "o", m], "config.json is not valid JSON"


def case_truncated_safetensors(c):
    m = c.copy_model("m")
    (m / "model.safetensors").write_bytes((c.tiny / "model.safetensors").read_bytes()[:1000])
    return _random_prune(m, c.tmp / "o"), [c.tmp / "o", m], "damaged or incomplete"


def case_truncated_tokenizer(c):
    m = c.copy_model("m")
    (m / "tokenizer.json").write_text((c.tiny / "tokenizer.json").read_text()[:100])
    return _random_prune(m, c.tmp / "o"), [c.tmp / "o", m], "damaged or incomplete"


def case_edited_config_shapes(c):
    m = c.copy_model("m")
    cfg = json.loads((m / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (m / "config.json").write_text(json.dumps(cfg))
    return _random_prune(m, c.tmp / "o"), [c.tmp / "o", m], "do not have the shapes"


def case_dir_without_config(c):
    d = c.unrelated_dir("notamodel")
    return _random_prune(d, c.tmp / "o"), [c.tmp / "o", d], "has no config.json"


def case_model_is_a_file(c):
    f = c.tmp / "weights.bin"
    f.write_bytes(b"\0" * 16)
    return _random_prune(f, c.tmp / "o"), [c.tmp / "o", f], "is a file"


def case_dot_path_missing(c):
    return _random_prune("./no-such-model", c.tmp / "o"), [c.tmp / "o"], "no such directory"


def case_two_slashes_missing(c):
    return _random_prune("runs/x/y", c.tmp / "o"), [c.tmp / "o"], "no such directory"


def case_existing_prefix_missing(c):  # "org/nothing" looks like a hub id, but ./org exists here
    (c.tmp / "org").mkdir()
    return _random_prune("org/nothing", c.tmp / "o"), [c.tmp / "o", c.tmp / "org"], "the folder 'org' exists here"


# -- profiles ----------------------------------------------------------------------------------


def case_truncated_stats(c):
    p = c.copy_profile("p")
    (p / "stats.safetensors").write_bytes((c.profile / "stats.safetensors").read_bytes()[:500])
    return ["score", "--profile", p], [p], "stats.safetensors is damaged"


def case_zeroed_stats(c):
    p = c.copy_profile("p")
    (p / "stats.safetensors").write_bytes(b"\0" * (c.profile / "stats.safetensors").stat().st_size)
    return (["prune", "--model", c.tiny, "--profile", p, "--ratio", 0.25, "--align", 16, "--out", c.tmp / "o"],
            [p, c.tmp / "o"], "stats.safetensors is damaged")


def case_stats_cut_short(c):
    p = c.copy_profile("p")
    data = (c.profile / "stats.safetensors").read_bytes()
    (p / "stats.safetensors").write_bytes(data[:-64])
    return ["info", p], [p], "stats.safetensors is damaged"


def case_profile_without_counts(c):
    p = c.copy_profile("p")
    meta = json.loads((p / "profile.json").read_text())
    del meta["counts"]
    (p / "profile.json").write_text(json.dumps(meta))
    return ["info", p], [p], "counts is missing"


def case_profile_edited_shapes(c):
    p = c.copy_profile("p")
    meta = json.loads((p / "profile.json").read_text())
    meta["model"]["d_ff"], meta["model"]["num_layers"] = 999, 7
    (p / "profile.json").write_text(json.dumps(meta))
    return ["score", "--profile", p], [p], "7 layers x d_ff 999"


def case_profile_json_not_json(c):
    p = c.copy_profile("p")
    (p / "profile.json").write_text('{"format_version": 1,')
    return ["score", "--profile", p], [p], "profile.json is not valid JSON"


def case_pruning_json_edited(c):
    d = c.tmp / "ckpt"
    shutil.copytree(c.tiny, d)
    (d / "pruning.json").write_text('{"plan": {}}')
    return ["info", d], [d], "not the record taskprune writes"


# -- numbers on the command line ---------------------------------------------------------------


def _capture(c, *extra):
    return ["capture", "--model", c.tiny, "--target", "gsm8k", "--distractor", "squad", "--out", c.tmp / "p", *extra]


def case_capture_batch_size_0(c):
    return _capture(c, "--batch-size", 0), [c.tmp / "p"], "--batch-size: must be at least 1"


def case_capture_max_length_0(c):
    return _capture(c, "--max-length", 0), [c.tmp / "p"], "--max-length: must be at least 1"


def case_capture_n_negative(c):
    return _capture(c, "--n", -3), [c.tmp / "p"], "--n: must be at least 1"


def case_capture_ig_threshold(c):
    return _capture(c, "--ig-threshold", 1.5), [c.tmp / "p"], "--ig-threshold: must be in [0, 1]"


def case_prune_ratio_not_a_number(c):
    return ["prune", "--model", c.tiny, "--ratio", "abc", "--out", c.tmp / "o"], [c.tmp / "o"], "is not a number"


def case_prune_align_0(c):
    return _random_prune(c.tiny, c.tmp / "o", "--align", 0), [c.tmp / "o"], "--align: must be at least 1"


def case_recover_lr_0(c):
    return (["recover", "--model", c.tiny, "--preset", "code", "--lr", 0, "--out", c.tmp / "o"], [c.tmp / "o"],
            "--lr: must be greater than 0")


def case_recover_epochs_0(c):
    return (["recover", "--model", c.tiny, "--preset", "code", "--epochs", 0, "--out", c.tmp / "o"], [c.tmp / "o"],
            "--epochs: must be at least 1")


def case_generate_max_new_tokens_0(c):
    return (["generate", "--model", c.tiny, "--prompt", "hi", "--max-new-tokens", 0], [],
            "--max-new-tokens: must be at least 1")


def case_eval_limit_negative(c):
    return (["eval", "--model", c.tiny, "--tasks", "gsm8k", "--limit", -1, "--out", c.tmp / "e"], [c.tmp / "e"],
            "--limit: must be at least 1")


def case_eval_backend_llamacpp_not_installed(c):
    if importlib.util.find_spec("llama_cpp") is not None:
        pytest.skip("llama.cpp is installed here: tests_gguf covers that engine")
    return (["eval", "--model", c.tiny, "--tasks", "humaneval", "--limit", 1, "--backend", "llamacpp",
             "--out", c.tmp / "e"], [c.tmp / "e"], "--backend llamacpp needs llama.cpp's Python bindings")


def case_eval_backend_vllm_not_installed(c):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here: tests_vllm covers that engine")
    return (["eval", "--model", c.tiny, "--tasks", "humaneval", "--limit", 1, "--backend", "vllm",
             "--out", c.tmp / "e"], [c.tmp / "e"], "--backend vllm needs vLLM: `make vllm`")


def case_eval_batch_size_word(c):
    return (["eval", "--model", c.tiny, "--tasks", "gsm8k", "--batch-size", "fast", "--out", c.tmp / "e"],
            [c.tmp / "e"], "--batch-size: 'fast' is not an integer (or use auto)")


def case_missing_required_option(c):
    return ["prune", "--model", c.tiny, "--out", c.tmp / "o"], [c.tmp / "o"], "required: --ratio"


# -- study configs -----------------------------------------------------------------------------


def _study(c, **over):
    cfg = {"name": "tiny", "model": str(c.tiny), "target": "mbpp", "distractors": ["squad"], "dtype": "float32",
           "capture": {"n": 2, "max_length": 16, "batch_size": 2}, "strategies": ["selective"],
           "ratios": [0.25], "align": 64, "baseline": False,
           "evaluation": {"tasks": ["mbpp"], "limit": {"mbpp": 1}, "max_new_tokens": 4, "trap_budget": 0}}
    for key, value in over.items():
        if "." in key:
            section, sub = key.split(".")
            cfg[section] = {**cfg.get(section, {}), sub: value}
        else:
            cfg[key] = value
    path = c.tmp / "study.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(c, **over):
    return ["run", _study(c, **over), "--out", c.tmp / "run", "--no-report"], [c.tmp / "run"]


def case_config_ratio_not_a_number(c):
    return (*_run(c, ratios=[0.1, "abc"]), "ratios[1] must be a number, got 'abc'")


def case_config_ratios_scalar(c):
    return (*_run(c, ratios=0.1), "(write [0.1])")


def case_config_align_string(c):
    return (*_run(c, align="big"), "align must be an integer, got 'big'")


def case_config_align_0(c):
    return (*_run(c, align=0), "align: 0 is below the minimum 1")


def case_config_ratio_leaves_no_block(c):  # d_ff 256, align 128: 0.6 keeps 0 neurons
    return (*_run(c, ratios=[0.25, 0.6], align=128), "fewer than one block")


def case_config_capture_n_string(c):
    return (*_run(c, **{"capture.n": "ten"}), "capture.n must be an integer, got 'ten'")


def case_config_capture_batch_0(c):
    return (*_run(c, **{"capture.batch_size": 0}), "capture.batch_size: 0 is below the minimum 1")


def case_config_limit_list(c):
    return (*_run(c, **{"evaluation.limit": [2, 2]}), "evaluation.limit must be an integer or a mapping")


def case_config_limit_0(c):
    return (*_run(c, **{"evaluation.limit": {"mbpp": 0}}), "evaluation.limit.mbpp: 0 is below the minimum 1")


def case_config_backend_llamacpp_not_installed(c):
    if importlib.util.find_spec("llama_cpp") is not None:
        pytest.skip("llama.cpp is installed here: tests_gguf covers that engine")
    return (*_run(c, **{"evaluation.backend": "llamacpp"}), "--backend llamacpp needs llama.cpp's Python bindings")


def case_config_backend_unknown(c):
    return (*_run(c, **{"evaluation.backend": "vllm-gpu"}), "evaluation.backend")


def case_config_limit_unknown_task(c):
    return (*_run(c, **{"evaluation.limit": {"gsm8k": 2}}), "not among evaluation.tasks")


def case_config_baseline_string(c):
    return (*_run(c, baseline="no"), "baseline must be true or false, got 'no'")


def case_config_recovery_batches(c):
    return (*_run(c, recovery={"enabled": True, "effective_batch_size": 3, "micro_batch_size": 2}),
            "not a multiple of micro batch")


def case_config_unknown_key(c):
    return (*_run(c, ratio=0.1), "unknown key(s) ['ratio']")


def case_config_name_escapes_runs(c):  # the test runs in c.tmp: runs/../../escaped is outside it
    path = _study(c, name="../../escaped")
    return ["run", path, "--no-report"], [c.tmp / "runs", c.tmp.parent / "escaped"], "must be one directory name"


def case_config_name_with_slash(c):
    return (*_run(c, name="a/b"), "must be one directory name")


def case_config_missing_model(c):
    return (*_run(c, model=str(c.tmp / "gone")), "no such directory")


def case_config_yaml_broken(c):
    path = c.tmp / "study.yaml"
    path.write_text("name: [unclosed\n")
    return ["run", path, "--out", c.tmp / "run"], [c.tmp / "run"], "is not valid YAML"


def case_run_out_is_unrelated(c):
    d = c.unrelated_dir()
    return ["run", _study(c), "--out", d, "--no-report"], [d], "holds no study"


def case_results_not_a_database(c):
    path = _study(c)
    cfg = load_config(path)
    run = c.tmp / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({**json.loads(json.dumps(to_dict(cfg))), "_hash": cfg.hash()}))
    (run / "results.sqlite").write_bytes(b"this is not a database, just some text" * 20)
    return ["run", path, "--out", run, "--no-report"], [run], "results.sqlite: file is not a database"


def case_report_not_a_database(c):
    run = c.tmp / "run"
    run.mkdir()
    (run / "results.sqlite").write_bytes(b"garbage" * 100)
    return ["report", run], [run], "file is not a database"


def case_capture_data_missing_no_debris(c):  # fails at capture, after the model loaded: nothing left
    return (*_run(c, target=str(c.tmp / "nope.jsonl")), "does not exist")


def case_failed_start_default_out(c):  # runs/tiny would be made, then removed with runs/ itself
    return ["run", _study(c, target=str(c.tmp / "nope.jsonl")), "--no-report"], [c.tmp / "runs"], "does not exist"


def case_hub_unreachable(c):
    """A hub id that is tried and fails (here: a connection error, multi-line as transformers words it)."""
    return _random_prune("some-org/some-model", c.tmp / "o"), [c.tmp / "o"], "from the Hugging Face Hub"


CASES = {name[5:]: fn for name, fn in sorted(globals().items()) if name.startswith("case_")}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name, ctx, capsys, monkeypatch):
    monkeypatch.chdir(ctx.tmp)
    if name == "hub_unreachable":
        from transformers import AutoConfig

        def unreachable(*args, **kwargs):
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection.")
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        monkeypatch.setattr(AutoConfig, "from_pretrained", unreachable)
    argv, watch, fragment = CASES[name](ctx)
    expect_error(argv, capsys, watch, fragment)


def test_enough_cases():
    assert len(CASES) >= 30


def test_hub_id_offline_is_not_tried(ctx, capsys, monkeypatch):
    """With HF_HUB_OFFLINE a hub-looking id that is not cached fails at once: no download is attempted."""
    import huggingface_hub
    import huggingface_hub.file_download
    import transformers.utils.hub

    def no_network(*args, **kwargs):
        raise AssertionError("the Hub was contacted although HF_HUB_OFFLINE is set")
    for module in (huggingface_hub, huggingface_hub.file_download, transformers.utils.hub):
        monkeypatch.setattr(module, "hf_hub_download", no_network)
    monkeypatch.setattr(transformers.utils.hub, "snapshot_download", no_network, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(ctx.tmp / "hf"))
    monkeypatch.chdir(ctx.tmp)
    line = expect_error(_random_prune("foo/bar", ctx.tmp / "o"), capsys, [ctx.tmp / "o"], "not in the Hugging Face cache")
    assert "HF_HUB_OFFLINE" in line


def test_failed_start_leaves_nothing_and_the_fix_runs(ctx, capsys, monkeypatch):
    """A study that fails on its input leaves no directory, so the corrected config is not 'another config'."""
    monkeypatch.chdir(ctx.tmp)
    argv, watch = _run(ctx, target=str(ctx.tmp / "nope.jsonl"))
    expect_error(argv, capsys, watch, "does not exist")
    assert not (ctx.tmp / "run").exists()
    sweep.Study(load_config(_study(ctx)), ctx.tmp / "run", progress=False)  # accepted: nothing stale there


def test_overwrite_replaces_own_output_with_umask(ctx, capsys):
    out = ctx.tmp / "o"
    old = os.umask(0o022)
    try:
        assert main([str(a) for a in _random_prune(ctx.tiny, out)]) == 0
        (out / "stray.txt").write_text("inside a checkpoint taskprune wrote")
        assert main([str(a) for a in _random_prune(ctx.tiny, out, "--overwrite")]) == 0
    finally:
        os.umask(old)
    assert not (out / "stray.txt").exists() and (out / "pruning.json").is_file()
    assert (out.stat().st_mode & 0o777) == 0o755
    assert ((out / "model.safetensors").stat().st_mode & 0o777) == 0o644
    assert sorted(p.name for p in ctx.tmp.iterdir()) == ["o"]  # no temporary or old copies


# -- file systems that refuse: real tmpfs mounts (root only) ------------------------------------


@pytest.fixture
def mount(tmp_path):
    mounted = []

    def make(name: str, options: str) -> Path:
        point = tmp_path / name
        point.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root and mount permission): {proc.stderr.strip()}")
        mounted.append(point)
        return point
    yield make
    for point in mounted:
        subprocess.run(["umount", str(point)], check=False)


def test_read_only_file_system_from_the_shell(ctx, mount):
    ro = mount("ro", "ro,size=1m")
    env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([sys.executable, "-m", "taskprune.cli", *map(str, _random_prune(ctx.tiny, ro / "o"))],
                          capture_output=True, text=True, timeout=120, env=env)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    assert "Read-only file system" in lines[0] and str(ro / "o") in lines[0]
    assert list(ro.iterdir()) == []


@pytest.mark.parametrize("command", ["capture", "score"])
def test_read_only_file_system(ctx, mount, capsys, command):
    ro = mount("ro", "ro,size=1m")
    argv = (_capture(ctx)[:-2] + ["--n", 2, "--out", ro / "p"] if command == "capture"
            else ["score", "--profile", ctx.profile, "--out", ro / "s.safetensors"])
    expect_error(argv, capsys, [ro], "Read-only file system")


def test_full_file_system(ctx, mount, capsys):
    full = mount("full", "size=64k")  # far smaller than the tiny model's weights
    line = expect_error(_random_prune(ctx.tiny, full / "o"), capsys, [full], "No space left on device")
    assert str(full / "o") in line
    assert list(full.iterdir()) == []  # the temporary directory went too


def test_results_error_is_typed(tmp_path):
    from taskprune.results import ResultsError, ResultStore
    bad = tmp_path / "results.sqlite"
    bad.write_bytes(b"x" * 4096)
    with pytest.raises(ResultsError, match="not a database"):
        ResultStore(bad)
    good = tmp_path / "ok.sqlite"
    ResultStore(good)
    assert sqlite3.connect(good).execute("SELECT count(*) FROM results").fetchone() == (0,)
