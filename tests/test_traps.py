"""Hand-made cases for generation-trap detection."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from taskprune.evaluate.answers import has_complete_boxed
from taskprune.evaluate.traps import (
    LoopSpan,
    TrapVerdict,
    classify_trap,
    code_answer_complete,
    find_loop,
    find_token_loop,
    loop_start,
    prefix_before_loop,
    repetition_loop,
    token_repetition_loop,
)

DATA_DIR = Path(os.environ.get("TASKPRUNE_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")

SOLUTION = (
    "Janet's ducks lay 16 eggs per day. She eats 3 and bakes with 4, so she sells "
    "16 - 3 - 4 = 9 eggs. At $2 each she makes 9 * 2 = 18 dollars. \\boxed{18}"
)
VARIED = (
    "To find the total cost, we first compute the price of the apples: 4 apples at 3 dollars each "
    "cost 12 dollars. Next, the oranges: 6 oranges at 2 dollars each cost 12 dollars as well. The "
    "bananas are cheaper; a bunch of 5 costs 4 dollars, and she buys two bunches, for 8 dollars. "
    "Adding everything, 12 + 12 + 8 = 32 dollars. She pays with a 50 dollar bill, so her change is "
    "50 - 32 = 18 dollars. Checking the arithmetic once more: the apples and oranges together are "
    "24 dollars, plus 8 for the bananas gives 32, and 50 minus 32 leaves 18. Therefore she gets 18 "
    "dollars back, which is the answer."
)


def classify_math(text: str, hit_budget_without_eos: bool) -> TrapVerdict:
    """How a math caller decides Type 1 vs Type 2."""
    return classify_trap(text, hit_budget_without_eos, has_complete_boxed(prefix_before_loop(text)))


# --- character loops ------------------------------------------------------------------------------


def test_loop_after_boxed_answer_is_type1():
    text = SOLUTION + " I hope this helps!" * 10
    assert repetition_loop(text)
    assert loop_start(text) == len(SOLUTION)
    assert classify_math(text, hit_budget_without_eos=True) == TrapVerdict(True, "type1", "loop")


def test_loop_that_repeats_the_boxed_answer_is_type1():
    head, unit = "We get 6 * 7 = 42!", " So the answer is \\boxed{42}."
    text = head + unit * 10
    assert find_loop(text) == LoopSpan(start=len(head), period=len(unit), length=10 * len(unit))
    assert not has_complete_boxed(prefix_before_loop(text, include_first_copy=False))
    assert classify_math(text, hit_budget_without_eos=False).kind == "type1"


def test_loop_without_answer_is_type2():
    text = "Let me compute the total. " + "First we add the apples and the oranges together. " * 10
    assert repetition_loop(text)
    assert classify_math(text, hit_budget_without_eos=True) == TrapVerdict(True, "type2", "loop")


def test_loop_start_is_exact_and_partial_last_copy_is_tolerated():
    head = "Answer: 7."
    text = head + "again\n" * 12 + "aga"
    span = find_loop(text)
    assert span is not None
    assert (span.start, span.period, span.length, span.repeats) == (len(head), 6, 75, 12)
    assert prefix_before_loop(text) == head + "again\n"
    assert prefix_before_loop(text, include_first_copy=False) == head


def test_shortest_period_reported_for_the_same_loop():
    text = "Intro. " + "ab" * 60
    assert find_loop(text).period == 2


def test_long_varied_paragraph_is_not_a_loop():
    assert not repetition_loop(VARIED)
    assert loop_start(VARIED) is None
    assert prefix_before_loop(VARIED) == VARIED


def test_numbered_steps_are_not_a_loop():
    text = "".join(f"Step {i}: add the next number to the total. " for i in range(1, 30))
    assert not repetition_loop(text)


def test_real_gsm8k_solutions_are_not_loops():
    path = DATA_DIR / "gsm8k" / "test.jsonl"
    if not path.exists():
        pytest.skip(f"no local GSM8K copy at {path}")
    with path.open(encoding="utf-8") as handle:
        answers = [json.loads(line)["answer"] for _, line in zip(range(50), handle)]
    for answer in answers:
        assert not repetition_loop(answer), answer
    # Many solutions back to back share structure ("<<a*b=c>>", "####") but do not loop.
    assert not repetition_loop("\n".join(answers))


def test_short_repetition_below_span_is_not_a_loop():
    assert not repetition_loop("The end. ha ha ha ha")  # 4 copies but only 12 characters
    assert repetition_loop("The end." + " ha" * 20)  # 60 characters


def test_two_copies_are_not_enough():
    unit = "This sentence is long enough to cover the whole minimum span on its own. "
    assert not repetition_loop("Intro. " + unit * 2)
    assert repetition_loop("Intro. " + unit * 3)


def test_period_longer_than_max_is_not_detected():
    unit = "".join(str(i) for i in range(120))  # 250 characters, no shorter period
    assert len(unit) == 250
    assert not repetition_loop(unit * 4)
    assert repetition_loop(unit * 4, max_period_chars=300)


def test_run_of_one_character():
    assert repetition_loop("Answer: 3" + "!" * 60)
    assert not repetition_loop("Answer: 3" + "!" * 59)


def test_long_text_is_fast_enough():
    text = VARIED * 1 + "x" * 5000
    assert find_loop(text).start == len(VARIED)
    assert not repetition_loop(VARIED + "".join(str(i) for i in range(2000)))


# --- token loops ----------------------------------------------------------------------------------


def test_token_loop_detected():
    ids = [101, 7, 9, 3] + [5, 6, 7, 8] * 10
    assert token_repetition_loop(ids)
    assert find_token_loop(ids) == LoopSpan(start=4, period=4, length=40)


def test_single_token_repeated():
    assert token_repetition_loop([1, 2, 3] + [0] * 32)
    assert not token_repetition_loop([1, 2, 3] + [0] * 31)


def test_token_sequences_that_are_not_loops():
    assert not token_repetition_loop(list(range(200)))
    assert not token_repetition_loop([4, 5, 6] * 3)  # too short
    assert not token_repetition_loop(list(range(20)) * 3)  # three copies, four needed


def test_token_period_limit():
    unit = list(range(100))
    assert not token_repetition_loop(unit * 5)
    assert token_repetition_loop(unit * 5, max_period=100)


# --- classify_trap ----------------------------------------------------------------------------------


def test_budget_hit_with_answer_is_type1_no_eos():
    text = SOLUTION + " Let me double check the computation in a different way: first,"
    assert not repetition_loop(text)
    assert classify_math(text, hit_budget_without_eos=True) == TrapVerdict(True, "type1", "no_eos")


def test_budget_hit_without_answer_is_type2_no_eos():
    assert classify_math(VARIED[:200], hit_budget_without_eos=True) == TrapVerdict(True, "type2", "no_eos")


def test_healthy_generation_is_not_a_trap():
    assert classify_math(SOLUTION, hit_budget_without_eos=False) == TrapVerdict(False, "none", "")
    # A complete answer flag alone does not make a trap.
    assert classify_trap(VARIED, False, True) == TrapVerdict(False, "none", "")


def test_loop_detected_override():
    assert classify_trap(VARIED, False, False, loop_detected=True) == TrapVerdict(True, "type2", "loop")
    looping = SOLUTION + " I hope this helps!" * 10
    assert classify_trap(looping, True, True, loop_detected=False) == TrapVerdict(True, "type1", "no_eos")


# --- code answers before a loop ------------------------------------------------------------------


FUNCTION = "def add(a, b):\n    return a + b\n"


def test_code_loop_after_finished_function_is_complete():
    text = FUNCTION + "print(add(1, 2))\n" * 20
    assert repetition_loop(text)
    assert code_answer_complete(prefix_before_loop(text), "add")


def test_code_loop_inside_function_is_not_complete():
    text = "def add(a, b):\n    total = a\n" + "    total = total + 0\n" * 20
    assert repetition_loop(text)
    assert not code_answer_complete(prefix_before_loop(text), "add")


def test_fenced_function_then_prose_loop_is_complete():
    text = "Here it is:\n```python\n" + FUNCTION + "```\n" + "Hope this helps. " * 10
    assert code_answer_complete(prefix_before_loop(text), "add")


def test_unclosed_fence_is_not_complete():
    assert not code_answer_complete("```python\n" + FUNCTION, "add")


def test_body_only_answer_with_prompt():
    prompt = 'def double(x):\n    """Return twice x."""\n'
    text = "    return 2 * x\n" + "Note that this doubles the input.\n" * 10
    assert code_answer_complete(prefix_before_loop(text), "double", prompt=prompt)
    cut = "    y = 2 * x\n" + "    y = y\n" * 30
    assert not code_answer_complete(prefix_before_loop(cut), "double", prompt=prompt)


def test_placeholder_or_missing_function_is_not_complete():
    assert not code_answer_complete("def add(a, b):\n    pass\nprint(1)\n", "add")
    assert not code_answer_complete('def add(a, b):\n    """Add."""\n    ...\nprint(1)\n', "add")
    assert not code_answer_complete("def other(a, b):\n    return a\nprint(1)\n", "add")


def test_function_not_yet_followed_by_anything_is_not_known_complete():
    assert not code_answer_complete(FUNCTION, "add")
    assert code_answer_complete(FUNCTION + "\n\nprint(add(1, 2))", "add")
