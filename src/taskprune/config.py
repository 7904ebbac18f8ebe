"""Study configs: a YAML file describing model, data, capture, scorers x strategies x ratios x seeds,
recovery and evaluation. The capture, recovery and evaluation parts are the settings objects the
commands use (`taskprune.settings`); unknown keys and bad values are errors naming the key."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields, is_dataclass, replace
from pathlib import Path

import yaml

from taskprune.options import ConfigError, build, option, settings_hash
from taskprune.plan import Strategy
from taskprune.scoring import DEFAULT_SCORER, SCORERS
from taskprune.settings import CaptureSettings, Content, Dtype, EvalSettings, RecoverySettings

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")  # a study name is one directory name under runs/


@dataclass(frozen=True)
class StudyCapture(CaptureSettings):
    """A study's capture: the `taskprune capture` settings, where `content` may list several contents to
    compare (e.g. [prompt, prompt+response]): each is captured into a profile of its own and the scored
    strategies (selective, reverse) get a cell per content."""

    content: Content | tuple[Content, ...] = option(
        "prompt", nonempty=True, help="prompt (the paper's), prompt+response, or a list of them to compare")

    @property
    def contents(self) -> tuple[Content, ...]:
        return self.content if isinstance(self.content, tuple) else (self.content,)

    def settings(self, content: Content) -> CaptureSettings:
        """The one capture of `content`."""
        return CaptureSettings(**{**{f.name: getattr(self, f.name) for f in fields(CaptureSettings)}, "content": content})


@dataclass(frozen=True)
class RecoveryPlan(RecoverySettings):
    """Which pruned variants of a study are recovered, and how (the `taskprune recover` settings)."""

    enabled: bool = False
    strategies: tuple[Strategy, ...] = ("selective", "random", "reverse")
    ratios: tuple[float, ...] | None = option(None, gt=0, lt=1)  # None: all ratios
    contents: tuple[Content, ...] | None = None  # with several capture contents, whose cells (None: all)


@dataclass(frozen=True)
class Resources:
    """What each job of a study (the capture, the baseline, one variant) asks of a Ray cluster under
    `taskprune run --executor ray`; the local executor runs everything in its own process and reads none."""

    num_gpus: float = option(0.0, min=0, help="GPUs per job (0: CPU only; a fraction shares a GPU)")
    num_cpus: float = option(1.0, min=0, help="CPUs per job")
    max_retries: int = option(3, min=0, help="times a job whose worker died is run again (it resumes from the "
                                             "per-sample records of the attempts before)")


@dataclass(frozen=True)
class StudyConfig:
    name: str
    model: str
    target: str
    distractors: tuple[str, ...] = option(nonempty=True)
    ratios: tuple[float, ...] = option((0.05, 0.10, 0.15, 0.20, 0.25, 0.30, 0.35), gt=0, lt=1, nonempty=True)
    strategies: tuple[Strategy, ...] = option(("selective", "random", "reverse"), nonempty=True)
    scorers: tuple[str, ...] = option((DEFAULT_SCORER,), choices=tuple(SCORERS), nonempty=True)
    seeds: tuple[int, ...] = (42, 33)  # for random
    align: int = option(128, min=1)
    dtype: Dtype = "auto"
    baseline: bool = True
    # Variants to run first, in this order (names as in the report, e.g. selective-selectivity-r0.1,
    # random-r0.2-s42, selective-selectivity-r0.2-rec); the rest follow in grid order.
    first: tuple[str, ...] = ()
    capture: StudyCapture = StudyCapture()
    recovery: RecoveryPlan = RecoveryPlan()
    evaluation: EvalSettings = EvalSettings()
    resources: Resources = Resources()

    def hash(self) -> str:
        """The study's identity: what makes its results (so not where or how safely they are made: `resources`
        is left out, and a study started on one machine resumes on a cluster; so is `recovery.save_every`, which
        a recovery already resumes across)."""
        return settings_hash(replace(self, resources=Resources(),
                                     recovery=replace(self.recovery, save_every=None)))[:12]


def to_dict(obj) -> dict:
    return asdict(obj) if is_dataclass(obj) else obj


def validate(cfg: StudyConfig) -> StudyConfig:
    """What field types and rules cannot say: names, tasks, and how the fields fit together."""
    from taskprune.evaluate.tasks import get_task
    from taskprune.recover import RecoveryError
    if not NAME.fullmatch(cfg.name):
        raise ConfigError(f"name {cfg.name!r} must be one directory name (letters, digits, '.', '_', '+', '-', "
                          f"not starting with '.'), with no '/' or '..'; the study goes to runs/<name>")
    for t in cfg.evaluation.tasks:
        try:
            get_task(t)
        except ValueError as err:
            raise ConfigError(f"evaluation.tasks: {err}") from None
    limit = cfg.evaluation.limit
    extra = sorted(set(limit) - set(cfg.evaluation.tasks)) if isinstance(limit, dict) else []
    if extra:
        raise ConfigError(f"evaluation.limit names {', '.join(extra)}, not among evaluation.tasks "
                          f"({', '.join(cfg.evaluation.tasks)})")
    if "random" in cfg.strategies and not cfg.seeds:
        raise ConfigError("seeds: random pruning needs at least one seed")
    contents = cfg.capture.contents
    if len(set(contents)) < len(contents):
        raise ConfigError(f"capture.content lists a content twice: {', '.join(contents)}")
    if cfg.target in cfg.distractors:
        raise ConfigError(f"distractors: {cfg.target!r} is also the target")
    r = cfg.recovery
    if r.enabled:
        stray = [x for x in r.ratios or () if x not in cfg.ratios]
        if stray:
            raise ConfigError(f"recovery.ratios: {', '.join(map(str, stray))} not among ratios; nothing would be "
                              f"recovered there")
        stray = [c for c in r.contents or () if c not in contents]
        if stray:
            raise ConfigError(f"recovery.contents: {', '.join(stray)} not among capture.content "
                              f"({', '.join(contents)}); nothing would be recovered there")
        try:
            r.config().validate()
        except RecoveryError as err:
            raise ConfigError(f"recovery: {err}") from None
    return cfg


def check_model_fits(cfg: StudyConfig, d_ff: int) -> None:
    """Every ratio must leave at least one `align` block of the model's MLP width `d_ff`."""
    from taskprune.plan import PlanError, pruned_count
    for key, ratios in (("ratios", cfg.ratios), ("recovery.ratios", cfg.recovery.ratios or ())):
        for r in ratios:
            try:
                pruned_count(d_ff, r, cfg.align)
            except PlanError as err:
                raise ConfigError(f"{key}: {err} (align is the config's align)") from None


def load_config(path: str | Path) -> StudyConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if isinstance(data, dict) and isinstance(data.get("distractors"), str):
        data["distractors"] = [data["distractors"]]
    try:
        return validate(build(StudyConfig, {} if data is None else data))
    except ConfigError as err:
        raise ConfigError(f"{path.name}: {err}") from None
