"""What made an evaluation directory's records, so that a resumed run never mixes in others.

An evaluation directory holds ``made_by.json``::

    {"model": {"spec": ..., "identity": {config_hash, weights, dtype}, "key": ...},
     "tasks": {"humaneval": {"settings": {...}, "key": ...}, ...}}

written before the first record of a task is generated. Every record carries its task's key
(``made_by``) and its prompt. A run into a directory made by another model (other weights, config
or dtype), or a task's records made with other settings (budget, stop criterion, sandbox timeout,
similarity references ...), is refused with a message naming the difference; nothing is mixed.
Batch size and device are not part of the key: they change outputs only in the last bits.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

FILE = "made_by.json"


class StaleRecordsError(ValueError):
    """An evaluation directory holds records made by another model or with other settings."""


def key(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _differences(old: dict, new: dict) -> str:
    names = sorted(set(old) | set(new))
    return "; ".join(f"{n} {old.get(n)!r} -> {new.get(n)!r}" for n in names if old.get(n) != new.get(n))


def _load(out_dir: Path) -> dict | None:
    path = out_dir / FILE
    if not path.is_file():
        if any(out_dir.glob("*.jsonl")) or (out_dir / "summary.json").exists():
            raise StaleRecordsError(
                f"{out_dir} holds evaluation records that do not say what made them (an older taskprune, or "
                f"not taskprune); use another --out, or --overwrite to replace them")
        return None
    try:
        made = json.loads(path.read_text(encoding="utf-8"))
        made["model"]["key"], made["tasks"]  # noqa: B018 - the fields every later check reads
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise StaleRecordsError(f"{path} is damaged ({err}); use another --out, or --overwrite to start "
                                f"the evaluation again") from None
    return made


def _save(out_dir: Path, made: dict) -> None:
    tmp = out_dir / (FILE + ".tmp")
    tmp.write_text(json.dumps(made, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, out_dir / FILE)


def claim(out_dir: Path, spec: str, identity: dict, task: str, settings: dict) -> str:
    """Check that `out_dir`'s records of `task` (if any) were made by this model with these settings,
    record them if they are new, and return the key this task's records carry."""
    out_dir = Path(out_dir)
    made = _load(out_dir)
    model = {"spec": spec, "identity": identity, "key": key(identity)}
    if made is None:
        made = {"model": model, "tasks": {}}
    elif made["model"]["key"] != model["key"]:
        raise StaleRecordsError(
            f"{out_dir} holds records of model {made['model'].get('spec')!r}, not {spec!r} "
            f"({_differences(made['model'].get('identity', {}), identity)}); use another --out, or --overwrite "
            f"to replace them")
    task_key = key(settings)
    old = made["tasks"].get(task)
    if old is not None and old.get("key") != task_key:
        raise StaleRecordsError(
            f"{out_dir}: the {task} records were made with other settings "
            f"({_differences(old.get('settings', {}), settings)}); use another --out, or --overwrite to "
            f"replace them")
    if old is None or made["model"] != model:
        made["model"] = model  # the same weights under another name keep the newest name
        made["tasks"][task] = {"settings": settings, "key": task_key}
        out_dir.mkdir(parents=True, exist_ok=True)
        _save(out_dir, made)
    return task_key


def check_records(path: Path, records: dict[str, dict], task_key: str, prompts: dict[str, str]) -> None:
    """Refuse records that another run made: another key, or another prompt for the same item."""
    for rec_id, rec in records.items():
        if rec.get("made_by") != task_key:
            raise StaleRecordsError(f"{path}: record {rec_id!r} was not made by this model and these settings "
                                    f"(made_by {rec.get('made_by')!r}, expected {task_key}); use another --out, "
                                    f"or --overwrite to replace them")
        if rec_id in prompts and rec.get("prompt") != prompts[rec_id]:
            raise StaleRecordsError(f"{path}: the prompt of record {rec_id!r} differs from this run's (another "
                                    f"chat template or instruction); use another --out, or --overwrite")
