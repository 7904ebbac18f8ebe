"""Housekeeping of the files taskprune caches per set of weights (GGUF exports, vLLM copies)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path


def keep_recent(used: Path, entries: Iterable[Path], keep: int) -> None:
    """Mark `used` as the most recently used of `entries` (files or directories, `used` among them) and
    delete all but the `keep` most recently used."""
    os.utime(used)
    for old in sorted(entries, key=lambda p: p.stat().st_mtime, reverse=True)[keep:]:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
