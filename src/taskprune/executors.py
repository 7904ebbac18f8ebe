"""Where a study's jobs run (`taskprune run --executor local|ray`).

The driver (`sweep.Study`) plans the jobs (the capture, the baseline, one job per variant) and is the
only writer of `results.sqlite`; an executor runs them and hands each task's row back to it.

- `LocalExecutor` (the default): everything in this process, one job after another, from one loaded
  model that each variant is pruned from a copy of.
- `RayExecutor`: each job a Ray task asking for the study's `resources` (`num_gpus`, `num_cpus`). The
  worker loads the model, reads the profile the capture job left in the study directory, prunes its own
  copy, (recovers,) evaluates into the study's eval directory, writing the same per-sample records as the
  local executor, and returns the rows and per-item scores to the driver, which stores them as they come.
  A job whose worker dies is run again (`resources.max_retries`) and resumes from those records. The study
  directory (and `--data-dir`/`TASKPRUNE_DATA`) must therefore be paths every worker sees: one machine, or
  a file system shared by the cluster.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Protocol

from taskprune.config import check_model_fits
from taskprune.models import load_model

if TYPE_CHECKING:
    from taskprune.sweep import Job, Stored, Study, Variants

EXECUTORS = ("local", "ray")


class ExecutorError(RuntimeError):
    """An executor that cannot be used as asked (Ray not installed, an option it does not take)."""


class Executor(Protocol):
    def run(self, study: Study) -> None:
        """Start `study` (`study.start()`), then run its jobs stage after stage, storing each row with `study.put`."""


class LocalExecutor:
    """Every job in this process, one after another, from one loaded model (the default)."""

    def run(self, study: Study) -> None:
        cfg = study.cfg
        lm = load_model(cfg.model, cfg.dtype)
        check_model_fits(cfg, lm.adapter.d_ff(lm.model))  # before anything is written
        study.start()
        profiles = study.variants.profiles(lm)
        jobs = [job for stage in study.stages() for job in stage]
        start = time.perf_counter()
        for k, job in enumerate(jobs, 1):
            for stored in study.variants.rows(job, lm, profiles):
                study.put(stored)
            study.variants.log(time_left(time.perf_counter() - start, k, len(jobs)))


def time_left(elapsed_s: float, done: int, total: int) -> str:
    """A progress line after `done` of `total` jobs: the time so far and, at its mean a job, the time left."""
    left = "" if done == total else f"; about {elapsed_s / done * (total - done) / 60:.0f} min left at that pace"
    return f"-- {done}/{total} variants in {elapsed_s / 60:.1f} min{left}"


def _on_worker(variants: Variants, job: Job | None) -> list[Stored]:
    """One job in a Ray worker: the model loaded here (on the GPU Ray gave the task, else on the CPU), the
    study's profiles captured (job None: the capture job) or read back from the study directory, then the
    job's variant made from this worker's own copy and evaluated; its rows go back to the driver."""
    cfg = variants.cfg
    lm = load_model(cfg.model, cfg.dtype)
    check_model_fits(cfg, lm.adapter.d_ff(lm.model))
    profiles = variants.profiles(lm)
    return [] if job is None else list(variants.rows(job, lm, profiles, in_place=True))


class RayExecutor:
    """Each job a Ray task with the study's `resources`; the capture first, then the stages' jobs side by side.

    Joins the Ray instance this process is connected to already, else `ray.init(address=address)`: a new
    local instance when `address` is None (and RAY_ADDRESS is unset), or a running cluster (`auto`, `HOST:PORT`).
    """

    def __init__(self, address: str | None = None):
        self.ray = require_ray()
        self.address = address

    def run(self, study: Study) -> None:
        ray = self.ray
        own = not ray.is_initialized()  # connected here, so disconnected (a local instance stopped) at the end
        if own:
            ray.init(address=self.address, log_to_driver=study.variants.progress)
        try:
            r = study.cfg.resources
            # Ray shows a task given no GPU every GPU of its node; a CPU job is shown none, so that nothing in it
            # (the model, the similarity encoder, a recovery) lands on a GPU another job holds.
            cpu_only = {"env_vars": {"CUDA_VISIBLE_DEVICES": ""}} if r.num_gpus == 0 else None
            task = ray.remote(_on_worker).options(num_gpus=r.num_gpus, num_cpus=r.num_cpus, max_retries=r.max_retries,
                                                  runtime_env=cpu_only)
            study.start()
            stages = study.stages()
            if stages:  # a finished study needs no model loaded anywhere
                variants = ray.put(study.variants)
                self._gather(study, {task.remote(variants, None): None})
            for stage in stages:
                self._gather(study, {task.remote(variants, job): job for job in stage})
        finally:
            if own:
                ray.shutdown()

    def _gather(self, study: Study, pending: dict) -> None:
        """Store each job's rows as it finishes. A job that fails (not a dead worker: that one is retried) stops
        the study with the job's own error; the jobs still queued or running are cancelled."""
        ray = self.ray
        try:
            while pending:
                [ref], _ = ray.wait(list(pending), num_returns=1)
                job = pending.pop(ref)
                try:
                    rows = ray.get(ref)
                except ray.exceptions.RayTaskError as err:
                    raise err.cause from err
                for stored in rows:
                    study.put(stored)
                if job is not None:
                    study.variants.log(f"{job.name}: {len(rows)} row(s) stored")
        finally:
            for ref in pending:
                ray.cancel(ref)


def require_ray():
    """The `ray` module, or an ExecutorError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ExecutorError("--executor ray needs Ray, which is not installed: pip install 'taskprune[ray]'") from None
    return ray


def make_executor(name: str, address: str | None = None) -> Executor:
    """The executor `taskprune run --executor NAME [--address ADDR]` runs a study on."""
    if name == "ray":
        return RayExecutor(address)
    if address is not None:
        raise ExecutorError(f"--address is the Ray cluster to join; it needs --executor ray (not {name})")
    return LocalExecutor()
