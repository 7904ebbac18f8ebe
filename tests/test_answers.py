"""Hand-made cases for GSM8K answer extraction and comparison."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from taskprune.evaluate.answers import (
    extract_boxed,
    gsm8k_reference,
    has_complete_boxed,
    is_correct,
    normalize_number,
)

DATA_DIR = Path(os.environ.get("TASKPRUNE_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")


# --- extract_boxed / has_complete_boxed -------------------------------------------------------


def test_boxed_nested_braces():
    assert extract_boxed(r"The answer is $\boxed{\frac{1}{2}}$.") == r"\frac{1}{2}"


def test_boxed_last_of_several_wins():
    text = r"First guess \boxed{3}, then corrected: \boxed{5}. Final: \boxed{\dfrac{7}{2}}"
    assert extract_boxed(text) == r"\dfrac{7}{2}"


def test_boxed_unclosed_last_falls_back_to_previous():
    text = r"So \boxed{12}. Wait, let me redo it: \boxed{\frac{13}{"
    assert extract_boxed(text) == "12"


def test_boxed_only_unclosed_is_none():
    assert extract_boxed(r"so the answer is \boxed{4") is None
    assert not has_complete_boxed(r"so the answer is \boxed{4")


def test_fbox_and_space_before_brace():
    assert extract_boxed(r"\fbox{8}") == "8"
    assert extract_boxed(r"\boxed {9}") == "9"


def test_boxed_nested_boxed_returns_inner():
    assert extract_boxed(r"\boxed{\boxed{5}}") == "5"


def test_boxed_escaped_braces_do_not_count():
    assert extract_boxed(r"\boxed{\{1, 2\}}") == r"\{1, 2\}"


def test_no_boxed():
    assert extract_boxed("The answer is 42.") is None
    assert not has_complete_boxed("The answer is 42.")


def test_has_complete_boxed_turns_true_when_closed():
    partial = r"Total: 3 + 4 = 7, so \boxed{7"
    assert not has_complete_boxed(partial)
    assert has_complete_boxed(partial + "}")
    assert has_complete_boxed(partial + r"} and then \boxed{")


# --- normalize_number ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("42", 42.0),
        (r"\frac{3}{4}", 0.75),
        (r"\dfrac{3}{4}", 0.75),
        (r"\tfrac{1}{8}", 0.125),
        (r"\frac12", 0.5),
        ("3/4", 0.75),
        (r"2\frac{1}{2}", 2.5),
        (r"-\frac{3}{4}", -0.75),
        (r"\frac{-3}{4}", -0.75),
        ("1,234", 1234.0),
        ("1,234,567", 1234567.0),
        ("1{,}000", 1000.0),
        (r"1\,000", 1000.0),
        (r"\$18.00", 18.0),
        ("$18", 18.0),
        (r"\$1,234.50", 1234.5),
        (r"18 \text{ dollars}", 18.0),
        (r"\text{18}", 18.0),
        (r"\textbf{42}", 42.0),
        (r"12\text{km}", 12.0),
        (r"12 \mathrm{km}", 12.0),
        ("5 apples", 5.0),
        ("5 apples.", 5.0),
        (r"50\%", 50.0),
        ("50%", 50.0),
        ("-7", -7.0),
        ("\u22123", -3.0),
        ("x = 5", 5.0),
        (r"x = 2 + 3 = 5", 5.0),
        ("18.", 18.0),
        ("18.0", 18.0),
        ("18.00", 18.0),
        (".5", 0.5),
        ("{18}", 18.0),
        (r"90^\circ", 90.0),
        (r"10\!000", 10000.0),
        (r"\left( 4 \right)", 4.0),
    ],
)
def test_normalize_number_reads(text, expected):
    assert normalize_number(text) == pytest.approx(expected)


@pytest.mark.parametrize(
    "text",
    [
        "",
        r"\text{km}",
        "apples",
        r"2 \times 3",
        "18 dollars and 50 cents",
        "1,5",  # not a thousands separator: refused rather than guessed
        r"\frac{1}{0}",
        "3, 4",
    ],
)
def test_normalize_number_refuses(text):
    assert normalize_number(text) is None


# --- gsm8k_reference ------------------------------------------------------------------------------


def test_gsm8k_reference_on_first_test_row():
    path = DATA_DIR / "gsm8k" / "test.jsonl"
    if not path.exists():
        pytest.skip(f"no local GSM8K copy at {path}")
    with path.open(encoding="utf-8") as handle:
        row = json.loads(handle.readline())
    # Janet's ducks: 16 - 3 - 4 = 9 eggs at $2 each.
    assert "####" in row["answer"]
    assert gsm8k_reference(row["answer"]) == 18.0


def test_gsm8k_reference_removes_commas():
    answer = "So he made a profit of 200,000-130,000=$<<200000-130000=70000>>70,000\n#### 70,000"
    assert gsm8k_reference(answer) == 70000.0


def test_gsm8k_reference_negative_and_decimal():
    assert gsm8k_reference("... \n#### -3") == -3.0
    assert gsm8k_reference("... \n#### 2.5") == 2.5


def test_gsm8k_reference_without_marker_raises():
    with pytest.raises(ValueError):
        gsm8k_reference("The answer is 5")


# --- is_correct ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        (r"She makes 9 * 2 = 18 dollars. \boxed{18}", 18.0, True),
        (r"\boxed{\$18.00}", 18.0, True),
        (r"\boxed{18 \text{ dollars}}", 18.0, True),
        (r"\boxed{1,234}", 1234.0, True),
        (r"\boxed{\frac{3}{4}}", 0.75, True),
        (r"\boxed{50\%}", 50.0, True),
        (r"\boxed{-7}", -7.0, True),
        (r"\boxed{17} ... no wait, \boxed{18}", 18.0, True),
        (r"\boxed{18} ... no wait, \boxed{17}", 18.0, False),
        (r"\boxed{18} then \boxed{1", 18.0, True),
        ("The answer is 18.", 18.0, False),
        (r"\boxed{eighteen}", 18.0, False),
        (r"\boxed{18.0000001}", 18.0, True),
        (r"\boxed{18.01}", 18.0, False),
        (r"\boxed{0.0000001}", 0.0, True),
    ],
)
def test_is_correct(prediction, reference, expected):
    assert is_correct(prediction, reference) is expected
