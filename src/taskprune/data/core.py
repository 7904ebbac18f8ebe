"""The data layer's own types and helpers: items, errors, JSONL reading, seeded sampling.

Nothing here (nor anywhere under `taskprune.data`) imports the evaluation layer.
"""

from __future__ import annotations

import gzip
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path


class DataError(ValueError):
    """A data set that cannot be read; the message names it and says how to fix it."""


@dataclass(frozen=True)
class Example:
    """One item: the task text (a user turn) and, where the set has one, a reference response."""

    id: str
    prompt: str
    response: str | None = None
    meta: dict = field(default_factory=dict, compare=False)


@dataclass
class MCItem:
    """One multiple-choice question: the prompt, the choice strings (no leading space) and the gold index."""

    id: str
    context: str
    choices: list[str]
    gold: int
    meta: dict = field(default_factory=dict)  # e.g. {"subject": ...} for MMLU

    target_delimiter = " "  # the harness's default, put between the context and each choice

    def continuations(self) -> list[str]:
        return [self.target_delimiter + c for c in self.choices]


def data_dir_from(arg: str | Path | None) -> Path | None:
    value = arg or os.environ.get("TASKPRUNE_DATA")
    return Path(value).expanduser() if value else None


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file (optionally gzipped); malformed lines are an error naming the line."""
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: not valid JSON ({err.msg}); fix or remove that line") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object per line, got {type(row).__name__}")
            rows.append(row)
    return rows


def sample(examples: list, n: int | None, seed: int) -> list:
    """`n` examples drawn without replacement with `seed` (all of them, in order, if n is None or >= len)."""
    if n is None or n >= len(examples):
        return list(examples)
    if n <= 0:
        raise DataError(f"number of prompts must be positive, got {n}")
    idx = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [examples[i] for i in idx]
