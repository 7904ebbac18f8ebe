"""Study configs: a YAML file describing model, data, capture, scorers x strategies x ratios x seeds,
recovery and evaluation. Loaded into typed dataclasses; unknown keys and bad values are errors."""

from __future__ import annotations

import hashlib
import json
import math
import re
import types
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Union, get_args, get_origin, get_type_hints

import yaml

from taskprune.plan import STRATEGIES
from taskprune.scoring import DEFAULT_SCORER, SCORERS


class ConfigError(ValueError):
    """A study config that cannot be run; the message names the key and the fix."""


DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")  # a study name is one directory name under runs/


def rule(default=MISSING, *, default_factory=MISSING, **checks):
    """A dataclass field with value checks in its metadata, applied to the value (or to every element of a
    list/mapping value) by `load_config`: `min` (>=), `gt` (>), `lt` (<), `choices`, `nonempty`."""
    return field(default=default, default_factory=default_factory, metadata=checks)


@dataclass(frozen=True)
class CaptureConfig:
    n: int = rule(128, min=1)
    seed: int = 0
    max_length: int = rule(512, min=1)
    template: str = rule("chat", choices=("chat", "raw"))
    content: str = rule("prompt", choices=("prompt", "prompt+response"))
    batch_size: int = rule(8, min=1)
    grad_prompts: int | None = rule(None, min=1)  # target prompts in the gradient pass (taylor, ig scorers)
    ig_steps: int = rule(20, min=1)


@dataclass(frozen=True)
class RecoveryPlan:
    enabled: bool = False
    preset: str = rule("code", choices=("code", "math"))  # the paper's LoRA presets
    max_examples: int | None = rule(None, min=1)
    epochs: int | None = rule(None, min=1)  # None: the preset's (2)
    effective_batch_size: int | None = rule(None, min=1)  # None: the preset's (code 16, math 8)
    micro_batch_size: int | None = rule(None, min=1)  # None: 2
    max_length: int | None = rule(None, min=2)  # None: 512
    strategies: tuple[str, ...] = rule(("selective", "random", "reverse"),  # which pruned variants get recovered
                                       choices=STRATEGIES)
    ratios: tuple[float, ...] | None = rule(None, gt=0, lt=1)  # None: all ratios


@dataclass(frozen=True)
class EvalConfig:
    tasks: tuple[str, ...] = rule(("humaneval",), nonempty=True)
    limit: dict[str, int] = rule(default_factory=dict, min=1)  # per task: number of items (absent: the task's default)
    batch_size: int = rule(8, min=1)
    trap_budget: int = rule(1024, min=0)
    max_new_tokens: int | None = rule(None, min=1)
    stop_at_boxed: bool = False
    require_isolation: bool = True  # generated code runs only with every kernel sandbox layer in effect


@dataclass(frozen=True)
class StudyConfig:
    name: str
    model: str
    target: str
    distractors: tuple[str, ...] = rule(nonempty=True)
    ratios: tuple[float, ...] = rule((0.05, 0.10, 0.15, 0.20, 0.25, 0.30, 0.35), gt=0, lt=1, nonempty=True)
    strategies: tuple[str, ...] = rule(("selective", "random", "reverse"), choices=STRATEGIES, nonempty=True)
    scorers: tuple[str, ...] = rule((DEFAULT_SCORER,), choices=tuple(SCORERS), nonempty=True)
    seeds: tuple[int, ...] = (42, 33)  # for random
    align: int = rule(128, min=1)
    dtype: str = rule("auto", choices=DTYPES)
    baseline: bool = True
    # Variants to run first, in this order (names as in the report, e.g. selective-selectivity-r0.1,
    # random-r0.2-s42, selective-selectivity-r0.2-rec); the rest follow in grid order.
    first: tuple[str, ...] = ()
    capture: CaptureConfig = CaptureConfig()
    recovery: RecoveryPlan = RecoveryPlan()
    evaluation: EvalConfig = EvalConfig()

    def hash(self) -> str:
        return settings_hash(self)[:12]


def to_dict(obj) -> dict:
    return asdict(obj) if is_dataclass(obj) else obj


def _default(f):
    return f.default_factory() if f.default_factory is not MISSING else f.default


def non_default(obj) -> dict:
    """A settings object's fields that differ from their defaults (nested ones likewise).

    This is what identifies a study or its evaluation: an option added later with a default leaves
    the hash of every existing study, and so its resumable directory, as it was.
    """
    out = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if is_dataclass(value):
            value = non_default(value)
            if value:
                out[f.name] = value
        elif f.default is MISSING and f.default_factory is MISSING or value != _default(f):
            out[f.name] = value
    return out


def settings_hash(obj) -> str:
    return hashlib.sha256(json.dumps(non_default(obj), sort_keys=True, default=list).encode()).hexdigest()


def _describe(hint) -> str:
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args if a is not type(None)) + " (or null)"
    if origin is tuple:
        return f"a list of {_describe(args[0]).removeprefix('an ').removeprefix('a ')}s"
    if origin is dict:
        return f"a mapping of {_describe(args[0]).removeprefix('a ')} to {_describe(args[1]).removeprefix('an ')}"
    if is_dataclass(hint):
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}[hint]


def _convert(value, hint, where: str):
    """`value` as the field type `hint` (a dataclass field's type), or a ConfigError naming `where`."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        try:
            return _convert(value, inner, where)
        except ConfigError:
            raise ConfigError(f"{where} must be {_describe(hint)}, got {value!r}") from None
    if is_dataclass(hint):
        return _build(hint, value, where)
    ok = True
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        value = float(value) if ok else value
    elif hint is str:
        ok = isinstance(value, str)
    elif origin is tuple:
        if not isinstance(value, (list, tuple)):
            hint_text = f" (write [{value}])" if isinstance(value, (int, float, str)) else ""
            raise ConfigError(f"{where} must be {_describe(hint)}, got {value!r}{hint_text}")
        return tuple(_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    elif origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be {_describe(hint)}, got {value!r}")
        if not args:
            return dict(value)
        return {_convert(k, args[0], f"{where} key"): _convert(v, args[1], f"{where}.{k}") for k, v in value.items()}
    else:
        raise TypeError(f"config field {where} has a type the loader does not know: {hint!r}")
    if not ok:
        raise ConfigError(f"{where} must be {_describe(hint)}, got {value!r}")
    return value


def _check(value, checks: dict, where: str) -> None:
    """The `rule` checks of one field; list and mapping values are checked element by element."""
    if value is None:
        return
    if checks.get("nonempty") and not value:
        raise ConfigError(f"{where} is empty; give at least one")
    if isinstance(value, dict):
        items = [(f"{where}.{k}", v) for k, v in value.items()]
    elif isinstance(value, tuple):
        items = [(f"{where}[{i}]", v) for i, v in enumerate(value)]
    else:
        items = [(where, value)]
    for where, v in items:
        if "choices" in checks and v not in checks["choices"]:
            raise ConfigError(f"{where}: unknown {v!r}; use {', '.join(checks['choices'])}")
        if "min" in checks and v < checks["min"]:
            raise ConfigError(f"{where}: {v} is below the minimum {checks['min']}")
        if "gt" in checks and "lt" in checks and not checks["gt"] < v < checks["lt"]:
            raise ConfigError(f"{where}: {v} is not strictly between {checks['gt']} and {checks['lt']}")


def _build(cls, data: dict, where: str):
    """`cls` from a YAML mapping: every key known, every value of its field's type and within its rules."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'the config'} must be a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)} in {where or 'the config'}; known: {', '.join(known)}")
    missing = [n for n, f in known.items() if n not in data and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise ConfigError(f"missing key(s) {', '.join(missing)}{' in ' + where if where else ''}")
    hints = get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        name = f"{where}.{key}" if where else key
        kwargs[key] = _convert(value, hints[key], name)
        _check(kwargs[key], known[key].metadata, name)
    return cls(**kwargs)


def validate(cfg: StudyConfig) -> StudyConfig:
    """What field types and rules cannot say: names, tasks, and how the fields fit together."""
    from taskprune.evaluate.tasks import get_task
    from taskprune.recover import RecoveryError, config_from_args
    if not NAME.fullmatch(cfg.name):
        raise ConfigError(f"name {cfg.name!r} must be one directory name (letters, digits, '.', '_', '+', '-', "
                          f"not starting with '.'), with no '/' or '..'; the study goes to runs/<name>")
    for t in cfg.evaluation.tasks:
        try:
            get_task(t)
        except ValueError as err:
            raise ConfigError(f"evaluation.tasks: {err}") from None
    extra = sorted(set(cfg.evaluation.limit) - set(cfg.evaluation.tasks))
    if extra:
        raise ConfigError(f"evaluation.limit names {', '.join(extra)}, not among evaluation.tasks "
                          f"({', '.join(cfg.evaluation.tasks)})")
    if "random" in cfg.strategies and not cfg.seeds:
        raise ConfigError("seeds: random pruning needs at least one seed")
    if cfg.target in cfg.distractors:
        raise ConfigError(f"distractors: {cfg.target!r} is also the target")
    r = cfg.recovery
    if r.enabled:
        stray = [x for x in r.ratios or () if x not in cfg.ratios]
        if stray:
            raise ConfigError(f"recovery.ratios: {', '.join(map(str, stray))} not among ratios; nothing would be "
                              f"recovered there")
        try:
            config_from_args(r.preset, max_examples=r.max_examples, epochs=r.epochs,
                             effective_batch_size=r.effective_batch_size, micro_batch_size=r.micro_batch_size,
                             max_length=r.max_length).validate()
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
        return validate(_build(StudyConfig, {} if data is None else data, ""))
    except ConfigError as err:
        raise ConfigError(f"{path.name}: {err}") from None
