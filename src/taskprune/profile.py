"""Activation profiles on disk: `stats.safetensors` (+ optional `per_prompt.safetensors`) and `profile.json`.

A profile holds one `SetStats` per data set and the metadata needed to trust it later: the model id,
revision and config hash, each set's role, size and sampling, the maximum length, the prompt
template and the format version. Optional per-set statistics (`SetStats.extra`, e.g. the gradient
pass's sums) are stored as `"{set}/extra/{key}"` in `stats.safetensors`; format 1 readers skip them
and profiles without them load with an empty `extra`. The token sums `tok_sum` and `tok_sumsq` are
there when `profile.json` says `capture.token_stats` is true, or does not say (profiles written
before it was optional always have them).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from taskprune.atomic import atomic_dir, save_tensors
from taskprune.capture import SetStats

FORMAT_VERSION = 1
_TENSORS = ("sum", "sumsq")  # always there
_TOKEN_TENSORS = ("tok_sum", "tok_sumsq")  # there when the profile has token statistics
_EXTRA = "extra"  # optional per-set statistics are stored as "{set}/extra/{key}" (format 1 readers skip them)


class ProfileError(ValueError):
    """A profile that cannot be used as asked; the message says why and what to do."""


@dataclass
class Profile:
    meta: dict
    stats: dict[str, SetStats]

    @property
    def target(self) -> str:
        return next(s["name"] for s in self.meta["sets"] if s["role"] == "target")

    @property
    def distractors(self) -> list[str]:
        return [s["name"] for s in self.meta["sets"] if s["role"] == "distractor"]

    @property
    def num_layers(self) -> int:
        return self.meta["model"]["num_layers"]

    @property
    def d_ff(self) -> int:
        return self.meta["model"]["d_ff"]

    def check_model(self, config_hash: str, where: str = "") -> None:
        """Refuse a model other than the one the profile was captured on."""
        mine = self.meta["model"]["config_hash"]
        if mine != config_hash:
            raise ProfileError(
                f"profile{' ' + where if where else ''} was captured on {self.meta['model']['spec']!r} "
                f"(config hash {mine}) but the model given has config hash {config_hash}; "
                f"capture a new profile on this model (taskprune capture)"
            )


def profile_hash(path: Path) -> str:
    """Content hash of a saved profile (its statistics and metadata)."""
    h = hashlib.sha256()
    for name in ("profile.json", "stats.safetensors"):
        h.update((Path(path) / name).read_bytes())
    return h.hexdigest()[:16]


def save_profile(profile: Profile, path: Path, overwrite: bool = False) -> Path:
    """Write atomically: a temporary sibling directory renamed into place."""
    token_stats = all(s.has_token_stats for s in profile.stats.values())  # kept only where every set has them
    with atomic_dir(path, overwrite, kind="profile") as tmp:
        tensors, per_prompt = {}, {}
        for name, s in profile.stats.items():
            tensors.update({f"{name}/{key}": value for key, value in _set_tensors(s, token_stats).items()})
            if s.per_prompt is not None:
                per_prompt[name] = s.per_prompt.contiguous()
        save_file(tensors, tmp / "stats.safetensors")
        if per_prompt:
            save_file(per_prompt, tmp / "per_prompt.safetensors")
        meta = dict(profile.meta, format_version=FORMAT_VERSION,
                    capture={**profile.meta.get("capture", {}), "token_stats": token_stats},
                    counts={n: {"n": s.n, "tokens": s.tokens, "truncated": s.truncated}
                            for n, s in profile.stats.items()})
        (tmp / "profile.json").write_text(json.dumps(meta, indent=2) + "\n")
    profile.meta = meta
    return Path(path)


def _set_tensors(s: SetStats, token_stats: bool) -> dict[str, torch.Tensor]:
    """One set's tensors by their stored key: the sums, the token sums where kept, extras under `extra/`."""
    tensors = {key: getattr(s, key) for key in _TENSORS + (_TOKEN_TENSORS if token_stats else ())}
    tensors.update({f"{_EXTRA}/{key}": value for key, value in s.extra.items()})
    return {key: value.contiguous() for key, value in tensors.items()}


def _extras(tensors: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """The extras stored under `{prefix}extra/`, by their own key."""
    start = f"{prefix}{_EXTRA}/"
    return {k[len(start):]: v for k, v in tensors.items() if k.startswith(start)}


_JSON_KIND = {dict: "an object", list: "a list", int: "an integer", str: "a string"}


def _check_meta(meta, meta_file: Path) -> None:
    """Refuse a profile.json that this taskprune did not write (or that was edited): every field read later."""
    again = "capture the profile again (taskprune capture)"

    def need(obj, key: str, kind, where: str):
        value = obj.get(key) if isinstance(obj, dict) else None
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ProfileError(f"{meta_file}: {where}{key} is missing or not {_JSON_KIND[kind]}; {again}")
        return value

    if not isinstance(meta, dict):
        raise ProfileError(f"{meta_file} does not hold a JSON object; {again}")
    model = need(meta, "model", dict, "")
    for key in ("num_layers", "d_ff"):
        if need(model, key, int, "model.") < 1:
            raise ProfileError(f"{meta_file}: model.{key} must be positive; {again}")
    need(model, "config_hash", str, "model.")
    if not isinstance(need(meta, "capture", dict, "").get("token_stats", True), bool):
        raise ProfileError(f"{meta_file}: capture.token_stats must be true or false; {again}")
    sets = need(meta, "sets", list, "")
    counts = need(meta, "counts", dict, "")
    for i, entry in enumerate(sets):
        name = need(entry, "name", str, f"sets[{i}].")
        if need(entry, "role", str, f"sets[{i}].") not in ("target", "distractor"):
            raise ProfileError(f"{meta_file}: sets[{i}].role must be target or distractor; {again}")
        for key in ("n", "tokens", "truncated"):
            need(counts.get(name), key, int, f"counts.{name}.")
    if [e["role"] for e in sets].count("target") != 1:
        raise ProfileError(f"{meta_file}: needs exactly one target set; {again}")
    if set(counts) != {e["name"] for e in sets}:
        raise ProfileError(f"{meta_file}: counts and sets name different data sets; {again}")


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(file)
    except FileNotFoundError:
        raise ProfileError(f"{file} is missing; capture the profile again (taskprune capture)") from None
    except (SafetensorError, OSError) as err:
        raise ProfileError(f"{file} is damaged ({err}); capture the profile again (taskprune capture)") from None


def load_profile(path: Path) -> Profile:
    path = Path(path)
    meta_file = path / "profile.json"
    if not meta_file.is_file():
        raise ProfileError(f"{path} is not a profile directory (no profile.json); make one with taskprune capture")
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ProfileError(f"{meta_file} is not valid JSON ({getattr(err, 'msg', err)}); capture the profile again") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise ProfileError(f"{path} has profile format {version}, this taskprune reads "
                           f"{FORMAT_VERSION}; capture it again")
    _check_meta(meta, meta_file)
    tensors = _read_tensors(path / "stats.safetensors")
    per_prompt = _read_tensors(path / "per_prompt.safetensors") if (path / "per_prompt.safetensors").is_file() else {}
    shape = (meta["model"]["num_layers"], meta["model"]["d_ff"])
    keys = _TENSORS + (_TOKEN_TENSORS if meta["capture"].get("token_stats", True) else ())
    stats = {}
    for name, c in meta["counts"].items():
        for k in keys:
            t = tensors.get(f"{name}/{k}")
            if t is None or tuple(t.shape) != shape:
                found = "missing" if t is None else f"of shape {tuple(t.shape)}"
                raise ProfileError(f"{path / 'stats.safetensors'}: {name}/{k} is {found}, profile.json says "
                                   f"{shape[0]} layers x d_ff {shape[1]}; capture the profile again")
        if name in per_prompt and tuple(per_prompt[name].shape) != (c["n"], *shape):
            raise ProfileError(f"{path / 'per_prompt.safetensors'}: {name} has shape {tuple(per_prompt[name].shape)}, "
                               f"expected {(c['n'], *shape)}; capture the profile again")
        stats[name] = SetStats(n=c["n"], tokens=c["tokens"], truncated=c["truncated"],
                               per_prompt=per_prompt.get(name), extra=_extras(tensors, f"{name}/"),
                               **{k: tensors[f"{name}/{k}"] if k in keys else None
                                  for k in _TENSORS + _TOKEN_TENSORS})
    return Profile(meta=meta, stats=stats)


class CaptureCheckpoints:
    """A capture's progress on disk, so that a capture stopped part-way resumes where it was (a study's
    capture on a CPU takes hours): per data set, `set{i}.safetensors` holds the statistics of the prompts
    done so far and `set{i}.json` their counts, whether the set is complete, and the key of what made
    them (model, dtype, settings and the texts themselves). Statistics with another key are stale and
    never resumed. A set in progress is saved at most every `every_s` seconds; a finished one at once.
    """

    def __init__(self, path: Path, every_s: float = 300.0):
        self.path, self.every_s = Path(path), every_s

    def _files(self, index: int) -> tuple[Path, Path]:
        return self.path / f"set{index}.safetensors", self.path / f"set{index}.json"

    def load(self, index: int, key: str) -> tuple[SetStats | None, bool]:
        """The saved statistics of set `index` made under `key` (None where there are none, or stale ones),
        and whether the set was complete."""
        tensors_file, meta_file = self._files(index)
        try:
            meta = json.loads(meta_file.read_text())
            if not isinstance(meta, dict) or meta.get("key") != key:
                return None, False
            tensors = load_file(tensors_file)
            stats = SetStats(n=meta["n"], tokens=meta["tokens"], truncated=meta["truncated"],
                             sum=tensors["sum"], sumsq=tensors["sumsq"], tok_sum=tensors.get("tok_sum"),
                             tok_sumsq=tensors.get("tok_sumsq"), per_prompt=tensors.get("per_prompt"),
                             extra=_extras(tensors))
            return stats, bool(meta["complete"])
        except (OSError, ValueError, KeyError, TypeError, SafetensorError):
            return None, False  # missing, or a save cut short: that set starts again

    def save(self, index: int, key: str, stats: SetStats, complete: bool) -> None:
        tensors = _set_tensors(stats, stats.has_token_stats)
        if stats.per_prompt is not None:
            tensors["per_prompt"] = stats.per_prompt.contiguous()
        tensors_file, meta_file = self._files(index)
        self.path.mkdir(parents=True, exist_ok=True)
        meta_file.unlink(missing_ok=True)  # no stale pair while the tensors are replaced
        tmp = tensors_file.with_name(tensors_file.name + ".tmp")
        save_tensors(tensors, tmp)  # with the user's umask, as every output
        tmp.replace(tensors_file)
        meta = {"key": key, "n": stats.n, "tokens": stats.tokens, "truncated": stats.truncated, "complete": complete}
        tmp = meta_file.with_name(meta_file.name + ".tmp")
        tmp.write_text(json.dumps(meta) + "\n")
        tmp.replace(meta_file)

    def saver(self, index: int, key: str) -> Callable[[SetStats], None]:
        """A `capture(checkpoint=...)` callback that saves set `index` every `every_s` seconds."""
        last = time.monotonic()

        def save(stats: SetStats) -> None:
            nonlocal last
            if time.monotonic() - last >= self.every_s:
                self.save(index, key, stats, complete=False)
                last = time.monotonic()
        return save

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
