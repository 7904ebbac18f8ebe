"""The Ray executor (`taskprune run --executor ray`): a 4-cell tiny study (2 strategies x 2 ratios, one cell
also recovered) on a local Ray gives the local executor's rows and per-sample records, also when a worker
dies in the middle of a cell (its retry resumes from the records the dead attempt wrote)."""

import json
import os
import sqlite3
import sys
from pathlib import Path

import pytest

from taskprune import sweep
from taskprune.cli import main
from taskprune.config import load_config
from taskprune.evaluate.runner import read_records
from test_sweep import _config

if os.environ.get("TASKPRUNE_REQUIRE_RAY") != "1":  # make test sets it: there a missing Ray fails, never skips
    pytest.importorskip("ray", reason="Ray is not installed: pip install 'taskprune[ray]' (make install does)")
import ray  # noqa: E402
from ray import cloudpickle  # noqa: E402

from taskprune.executors import RayExecutor  # noqa: E402

# Measurements of the process that ran the variant, not results.
MEASURED = {"wall_s", "tokens_per_s_batch1", "tokens_per_s_eval", "peak_memory_bytes", "peak_memory_batch1_bytes",
            "created"}
VARIANTS = ["base", "random-r0.25-s42", "random-r0.5-s42", "selective-selectivity-r0.25",
            "selective-selectivity-r0.25-rec", "selective-selectivity-r0.5"]


def _kill_once_hook(control: str):
    """A Ray worker set-up hook: once the test writes `control/kill`, the first worker to generate for a
    pruned variant dies (os._exit) right after its first record is on disk, and writes `control/killed`
    (that records file); the retried attempt notes in `control/resumed` how many records it found there."""
    def install() -> None:
        from taskprune.evaluate import backends, runner
        real_records, real_generate = runner.generate_records, backends.TorchBackend.generate
        armed: list[Path] = []

        def generate_records(lm, task, examples, path, *args, **kwargs):
            killed = Path(control) / "killed"
            if (Path(control) / "kill").exists() and not path.parent.name.startswith("base-"):
                try:
                    fd = os.open(killed, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # one worker only, once
                    os.write(fd, str(path).encode())
                    os.close(fd)
                    armed.append(path)
                except FileExistsError:
                    if killed.read_text() == str(path):
                        with open(Path(control) / "resumed", "a") as fh:
                            fh.write(f"{len(runner.read_records(path))}\n")
            return real_records(lm, task, examples, path, *args, **kwargs)

        def generate(self, *args, on_record=None, **kwargs):
            def record(r) -> None:
                on_record(r)
                if armed:
                    os._exit(1)  # dies like a killed worker: no exception, no clean-up
            return real_generate(self, *args, on_record=record if on_record else None, **kwargs)
        runner.generate_records, backends.TorchBackend.generate = generate_records, generate
    return install


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    control = tmp_path_factory.mktemp("ray-control")
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the hook travels to workers by value
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": _kill_once_hook(str(control))})
    yield control
    ray.shutdown()


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_dir):
    """The tiny study's config (batch size 1: a resumed task generates exactly what a whole one does) and
    its local executor's results."""
    tmp = tmp_path_factory.mktemp("study")
    path = _config(tmp, tiny_dir, evaluation={"tasks": ["mbpp", "squad-sim"], "limit": {"mbpp": 2, "squad-sim": 2},
                                               "max_new_tokens": 8, "trap_budget": 0, "batch_size": 1})
    sweep.run_study(load_config(path), tmp / "local", progress=False)
    return path, _results(tmp / "local")


def _results(run_dir: Path) -> dict:
    """Rows (without the measurements), per-item scores and per-sample records (without their seconds)."""
    con = sqlite3.connect(run_dir / "results.sqlite")
    con.row_factory = sqlite3.Row
    rows = {(r["variant"], r["task"]): {k: r[k] for k in r.keys() if k not in MEASURED}
            for r in con.execute("SELECT * FROM results")}
    items = sorted(tuple(r) for r in con.execute("SELECT * FROM items"))
    records = {f"{d.name}/{f.name}": {i: {k: v for k, v in rec.items() if k != "seconds"}
                                      for i, rec in read_records(f).items()}
               for d in sorted((run_dir / "eval").iterdir()) for f in sorted(d.glob("*.jsonl"))}
    made_by = {d.name: json.loads((d / "made_by.json").read_text()) for d in (run_dir / "eval").iterdir()}
    for made in made_by.values():  # a recovered variant's spec is its checkpoint's path in this study directory
        made["model"]["spec"] = made["model"]["spec"].replace(str(run_dir), "RUN")
    return {"rows": rows, "items": items, "records": records, "made_by": made_by}


def test_ray_gives_the_local_executors_rows_and_records(local_ray, study, tmp_path):
    path, local = study
    assert sorted({v for v, _ in local["rows"]}) == VARIANTS and len(local["rows"]) == 12
    sweep.run_study(load_config(path), tmp_path / "ray", progress=False, executor=RayExecutor())
    assert _results(tmp_path / "ray") == local
    assert not (tmp_path / "ray" / "checkpoints" / "selective-selectivity-r0.25-rec").exists()  # deleted


def test_a_worker_killed_mid_cell_is_retried_and_resumes_from_its_records(local_ray, study, tmp_path):
    path, local = study
    (local_ray / "kill").touch()
    try:
        sweep.run_study(load_config(path), tmp_path / "ray", progress=False, executor=RayExecutor())
    finally:
        (local_ray / "kill").unlink()
    killed = Path((local_ray / "killed").read_text())
    assert killed.parent.parent == tmp_path / "ray" / "eval"
    assert (local_ray / "resumed").read_text() == "1\n"  # the retry found the dead attempt's one record
    assert _results(tmp_path / "ray") == local


def test_run_executor_ray_on_the_command_line(local_ray, study, tmp_path, capsys):
    path, local = study
    assert main(["run", str(path), "--out", str(tmp_path / "run"), "--executor", "ray", "--no-report"]) == 0
    assert _results(tmp_path / "run") == local
    assert main(["run", str(path), "--out", str(tmp_path / "run2"), "--address", "auto", "--no-report"]) == 2
    assert "--address is the Ray cluster to join; it needs --executor ray" in capsys.readouterr().err
    assert not (tmp_path / "run2").exists()



def test_a_failing_job_stops_the_study_with_its_own_one_line_error(local_ray, tiny_dir, tmp_path, capsys):
    """An error in a job (not a dead worker) is not retried: the study stops with the worker's error, said as
    the local executor says it, and a study that stored nothing leaves nothing behind."""
    path = _config(tmp_path, tiny_dir, target=str(tmp_path / "nope.jsonl"), recovery={"enabled": False})
    assert main(["run", str(path), "--out", str(tmp_path / "run"), "--executor", "ray", "--no-report"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("taskprune run: error: ") and "nope.jsonl" in err and "does not exist" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()
