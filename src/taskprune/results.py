"""The results store of a study: SQLite, one row per model variant x task, plus per-item outcomes.

Rows are written in one transaction per variant x task with `INSERT OR REPLACE` on a primary key
made of what defines the cell, so a run killed at any moment (even `kill -9`) and started again
finishes with no row lost or duplicated.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    variant TEXT NOT NULL,          -- e.g. selective-selectivity-r0.05-rec0
    task TEXT NOT NULL,
    model TEXT, target TEXT, distractors TEXT, capture TEXT,
    scorer TEXT, strategy TEXT NOT NULL, seed INTEGER,
    ratio_nominal REAL NOT NULL, ratio_exact REAL NOT NULL, recovered INTEGER NOT NULL,
    n INTEGER, accuracy REAL, similarity REAL,
    trap_pct REAL, type1_pct REAL, type2_pct REAL, no_eos_pct REAL,
    parameters INTEGER, checkpoint_bytes INTEGER, peak_memory_bytes INTEGER, peak_memory_batch1_bytes INTEGER,
    tokens_per_s_batch1 REAL, tokens_per_s_eval REAL,
    wall_s REAL, config_hash TEXT, created TEXT DEFAULT CURRENT_TIMESTAMP,
    kind TEXT, metric TEXT,         -- the task's kind (accuracy|similarity|multiple-choice), its headline metric
    PRIMARY KEY (variant, task)
);
CREATE TABLE IF NOT EXISTS items (
    variant TEXT NOT NULL, task TEXT NOT NULL, item_id TEXT NOT NULL,
    score REAL, trap INTEGER, trap_type TEXT,
    PRIMARY KEY (variant, task, item_id)
);
"""


@dataclass
class ResultRow:
    variant: str
    task: str
    strategy: str
    ratio_nominal: float  # 0 for the unpruned baseline
    ratio_exact: float
    recovered: bool
    model: str | None = None
    target: str | None = None
    distractors: str | None = None  # comma-separated
    capture: str | None = None  # e.g. "chat/prompt"
    scorer: str | None = None
    seed: int | None = None
    n: int | None = None
    accuracy: float | None = None
    similarity: float | None = None
    trap_pct: float | None = None
    type1_pct: float | None = None
    type2_pct: float | None = None
    no_eos_pct: float | None = None
    parameters: int | None = None
    checkpoint_bytes: int | None = None
    peak_memory_bytes: int | None = None
    peak_memory_batch1_bytes: int | None = None  # the same while decoding at batch 1 (the paper's Table 5)
    tokens_per_s_batch1: float | None = None
    tokens_per_s_eval: float | None = None
    wall_s: float | None = None
    config_hash: str | None = None
    kind: str | None = None  # the task's kind: accuracy, similarity or multiple-choice
    metric: str | None = None  # the task's headline metric (accuracy, similarity, acc)


COLUMNS = [f.name for f in fields(ResultRow)]
# Columns added after the first studies were stored: an older database gets them (NULL in its old rows).
ADDED_COLUMNS = {"kind": "TEXT", "metric": "TEXT", "peak_memory_batch1_bytes": "INTEGER"}


class ResultsError(RuntimeError):
    """A `results.sqlite` that cannot be read or written; the message names the file and the fix."""


@contextmanager
def results_errors(path: Path) -> Iterator[None]:
    try:
        yield
    except sqlite3.DatabaseError as err:  # includes OperationalError (locked, read-only, cannot open)
        text = str(err)
        if "not a database" in text or "malformed" in text:
            fix = "it is damaged or not a taskprune results file; move it away, or use another --out"
        elif "readonly" in text or "unable to open" in text:
            fix = "it cannot be written here; check the permissions and free space, or use another --out"
        else:
            fix = "check the file, or use another --out"
        raise ResultsError(f"{path}: {text} ({fix})") from None


class ResultStore:
    """A study's `results.sqlite`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with results_errors(self.path), closing(self._connect()) as con, con:
            con.executescript(SCHEMA)
            missing = set(COLUMNS) - {row[1] for row in con.execute("PRAGMA table_info(results)")}
            for column in sorted(missing & set(ADDED_COLUMNS)):
                con.execute(f"ALTER TABLE results ADD COLUMN {column} {ADDED_COLUMNS[column]}")
            missing -= set(ADDED_COLUMNS)
            if missing:
                raise ResultsError(f"{self.path}: its results table lacks {', '.join(sorted(missing))} (made by "
                                   f"another version?); move it away, or use another --out")

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=30)
        con.execute("PRAGMA journal_mode=WAL")
        return con

    def put(self, row: ResultRow, items: list[dict] | None = None) -> None:
        """Store one variant x task row and its items atomically (replacing any earlier copy)."""
        values = asdict(row)
        values["recovered"] = int(row.recovered)
        with results_errors(self.path), closing(self._connect()) as con, con:
            con.execute(f"INSERT OR REPLACE INTO results ({', '.join(COLUMNS)}) "
                        f"VALUES ({', '.join('?' for _ in COLUMNS)})", [values[c] for c in COLUMNS])
            con.execute("DELETE FROM items WHERE variant = ? AND task = ?", (row.variant, row.task))
            con.executemany("INSERT INTO items (variant, task, item_id, score, trap, trap_type) VALUES (?, ?, ?, ?, ?, ?)",
                            [(row.variant, row.task, it["item_id"], it.get("score"), int(bool(it.get("trap"))),
                              it.get("trap_type")) for it in items or []])

    def has(self, variant: str, task: str) -> bool:
        with results_errors(self.path), closing(self._connect()) as con:
            return con.execute("SELECT 1 FROM results WHERE variant = ? AND task = ?", (variant, task)).fetchone() is not None

    def rows(self) -> list[dict]:
        with results_errors(self.path), closing(self._connect()) as con:
            con.row_factory = sqlite3.Row
            return [dict(r) for r in con.execute("SELECT * FROM results ORDER BY task, strategy, ratio_nominal, seed")]

    def items(self, task: str) -> dict[str, dict[str, float]]:
        """`{variant: {item_id: score}}` for one task (for paired comparisons)."""
        out: dict[str, dict[str, float]] = {}
        with results_errors(self.path), closing(self._connect()) as con:
            for variant, item, score in con.execute(
                    "SELECT variant, item_id, score FROM items WHERE task = ?", (task,)):
                out.setdefault(variant, {})[item] = score
        return out
