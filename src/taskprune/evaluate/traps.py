"""Generation traps: outputs that never end, or end in a loop.

A generation is *trapped* when it runs into the token budget without emitting EOS, or when its
text ends in a repetition loop (the same unit of text repeated until the budget runs out). Traps
are split by whether the task was already solved when the model got stuck:

* **Type 1** — a complete answer (a closed ``\\boxed{}``, a finished function) came before the
  loop or the budget: the model solved the task but did not stop.
* **Type 2** — no complete answer came first: the model got lost.

Loop detection is exact: the tail must consist of whole copies of one unit (the last copy may be
partial). Loops whose copies differ (``Step 11 ... Step 12 ...``) are not loops here; they show up
as budget hits instead.
"""

from __future__ import annotations

import ast
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

from taskprune.evaluate.sanitize import extract_code, find_function, parsable_prefix, sanitize_code

__all__ = [
    "LoopSpan",
    "TrapVerdict",
    "find_loop",
    "find_token_loop",
    "repetition_loop",
    "token_repetition_loop",
    "loop_start",
    "prefix_before_loop",
    "classify_trap",
    "code_answer_complete",
]


@dataclass(frozen=True)
class LoopSpan:
    """A trailing loop: ``length`` items from ``start`` to the end repeat with period ``period``."""

    start: int
    period: int
    length: int

    @property
    def repeats(self) -> int:
        """Number of whole copies of the unit in the loop (a partial last copy is not counted)."""
        return self.length // self.period


@dataclass(frozen=True)
class TrapVerdict:
    """Whether a generation is trapped, which type, and why.

    ``kind`` is ``"none"``, ``"type1"`` (complete answer before the trap) or ``"type2"``;
    ``reason`` is ``""``, ``"no_eos"`` (budget hit without EOS) or ``"loop"`` (ends in a loop).
    """

    is_trap: bool
    kind: str
    reason: str


def _common_suffix_with_shift(seq: Sequence, period: int) -> int:
    """Largest ``k`` with ``seq[n-period-k : n-period] == seq[n-k : n]`` (galloping, then bisection).

    This is the number of trailing positions ``i`` (counted back from ``n - period - 1``) at which
    ``seq[i] == seq[i + period]``.
    """
    n = len(seq)
    limit = n - period
    if limit <= 0:
        return 0

    def matches(k: int) -> bool:
        return seq[limit - k : limit] == seq[n - k : n]

    good, step = 0, 1
    while True:
        probe = min(good + step, limit)
        if not matches(probe):
            bad = probe
            break
        good = probe
        if good == limit:
            return good
        step *= 2
    while bad - good > 1:
        middle = (good + bad) // 2
        if matches(middle):
            good = middle
        else:
            bad = middle
    return good


def _periodic_tail(
    seq: Sequence, min_period: int, max_period: int, min_repeats: int, min_span: int
) -> LoopSpan | None:
    """The longest trailing loop of ``seq`` meeting the thresholds (ties: the shortest period)."""
    n = len(seq)
    best: LoopSpan | None = None
    for period in range(max(1, min_period), max_period + 1):
        if period * max(min_repeats, 1) > n:
            break
        length = _common_suffix_with_shift(seq, period) + period
        if length // period >= min_repeats and length >= min_span:
            if best is None or length > best.length:
                best = LoopSpan(start=n - length, period=period, length=length)
    return best


def find_loop(
    text: str,
    min_period_chars: int = 1,
    max_period_chars: int = 200,
    min_repeats: int = 3,
    min_span_chars: int = 60,
) -> LoopSpan | None:
    """The repetition loop ``text`` ends in, or ``None``.

    A loop is a tail made of at least ``min_repeats`` consecutive copies of one unit of
    ``min_period_chars`` to ``max_period_chars`` characters (the last copy may be partial),
    ``min_span_chars`` characters long in all. Of the qualifying periods, the one whose loop starts
    earliest is reported (on a tie, the shortest). Cost: O(max_period_chars * log n) slice
    comparisons.

    The loop starts where the periodicity starts, which can be a few characters before the first
    copy as written when the text before it ends like the unit does (``"... 42." + " is 42." * 9``
    starts at the first ``.``): the reported unit is then a rotation of the written one.
    """
    return _periodic_tail(text, min_period_chars, max_period_chars, min_repeats, min_span_chars)


def find_token_loop(
    token_ids: Sequence[int], max_period: int = 64, min_repeats: int = 4, min_span: int = 32
) -> LoopSpan | None:
    """:func:`find_loop` on token ids: periods of 1 to ``max_period`` tokens."""
    return _periodic_tail(list(token_ids), 1, max_period, min_repeats, min_span)


def repetition_loop(
    text: str,
    min_period_chars: int = 1,
    max_period_chars: int = 200,
    min_repeats: int = 3,
    min_span_chars: int = 60,
) -> bool:
    """Whether ``text`` ends in a repetition loop (see :func:`find_loop` for the thresholds)."""
    return find_loop(text, min_period_chars, max_period_chars, min_repeats, min_span_chars) is not None


def token_repetition_loop(
    token_ids: list[int], max_period: int = 64, min_repeats: int = 4, min_span: int = 32
) -> bool:
    """Whether a token id sequence ends in a repetition loop (see :func:`find_token_loop`)."""
    return find_token_loop(token_ids, max_period, min_repeats, min_span) is not None


def loop_start(text: str) -> int | None:
    """Character index where the trailing loop of ``text`` begins (its first copy), or ``None``.

    Uses :func:`find_loop`'s default thresholds.
    """
    span = find_loop(text)
    return None if span is None else span.start


def prefix_before_loop(text: str, include_first_copy: bool = True) -> str:
    """The part of ``text`` the model wrote before looping (all of it when there is no loop).

    With ``include_first_copy`` (the default) the first copy of the repeated unit is kept: writing
    the answer once and then repeating it is a complete answer followed by a loop, i.e. Type 1.
    Use it to decide ``answer_complete_before_loop``, e.g.
    ``has_complete_boxed(prefix_before_loop(text))`` for math.
    """
    span = find_loop(text)
    if span is None:
        return text
    return text[: span.start + span.period] if include_first_copy else text[: span.start]


def classify_trap(
    text: str,
    hit_budget_without_eos: bool,
    answer_complete_before_loop: bool,
    *,
    loop_detected: bool | None = None,
) -> TrapVerdict:
    """Classify one generation.

    It is a trap when it hit the budget without EOS or ends in a loop (``repetition_loop(text)``,
    unless the caller passes ``loop_detected``, e.g. from :func:`token_repetition_loop`). The reason
    is ``"loop"`` whenever a loop is present (it explains a budget hit too), else ``"no_eos"``. The
    kind is Type 1 when ``answer_complete_before_loop`` (a complete answer came before the loop or
    the budget), else Type 2. A generation that is not trapped is ``TrapVerdict(False, "none", "")``
    whatever ``answer_complete_before_loop`` says.
    """
    looped = repetition_loop(text) if loop_detected is None else loop_detected
    if not (looped or hit_budget_without_eos):
        return TrapVerdict(is_trap=False, kind="none", reason="")
    return TrapVerdict(
        is_trap=True,
        kind="type1" if answer_complete_before_loop else "type2",
        reason="loop" if looped else "no_eos",
    )


def _is_placeholder(stmt: ast.stmt) -> bool:
    """Whether ``stmt`` implements nothing: a docstring, ``pass``, ``...``, ``raise NotImplementedError``."""
    if isinstance(stmt, ast.Pass):
        return True
    if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
        return True  # docstring or Ellipsis
    if isinstance(stmt, ast.Raise) and stmt.exc is not None:
        exc = stmt.exc.func if isinstance(stmt.exc, ast.Call) else stmt.exc
        return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"
    return False


def _definition_closed(source: str, entry_point: str) -> bool:
    """Whether the last column-0 ``def entry_point`` in ``source`` is followed by a column-0 line.

    A function is only known to be finished once something at its own indentation follows it;
    until then the model may still be writing its body.
    """
    lines = source.splitlines()
    pattern = re.compile(rf"^(?:async\s+)?def\s+{re.escape(entry_point)}\s*\(")
    starts = [i for i, line in enumerate(lines) if pattern.match(line)]
    if not starts:
        return False
    start = starts[-1]
    prefix = parsable_prefix("\n".join(lines[start:]))
    if not prefix:
        return False
    body = ast.parse(prefix).body
    first = body[0] if body else None
    if not isinstance(first, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return False
    end = start + first.end_lineno
    return any(line.strip() and not line[0].isspace() for line in lines[end:])


def code_answer_complete(text_prefix: str, entry_point: str, prompt: str = "") -> bool:
    """Whether ``text_prefix`` already holds a finished implementation of ``entry_point``.

    True when the sanitised program (:func:`~taskprune.evaluate.sanitize.sanitize_code`, with
    ``prompt`` for body-only HumanEval answers) defines ``entry_point`` with a real body (not just a
    docstring, ``pass``, ``...`` or ``raise NotImplementedError``), and the definition is finished:
    its markdown fence was closed or, without fences, a column-0 line follows the function. A
    function cut off mid-body (a loop inside it, or the budget) is therefore not complete.
    """
    program = sanitize_code(text_prefix, prompt, entry_point)
    function = find_function(program, entry_point)
    if function is None or all(_is_placeholder(stmt) for stmt in function.body):
        return False
    region = extract_code(text_prefix, entry_point)
    if region.fenced:
        return region.closed
    code = textwrap.dedent(region.code)
    if re.search(rf"^(?:async\s+)?def\s+{re.escape(entry_point)}\s*\(", code, re.M):
        return _definition_closed(code, entry_point)
    body_program = (prompt if prompt.endswith("\n") or not prompt else prompt + "\n") + region.code
    return _definition_closed(body_program, entry_point)
