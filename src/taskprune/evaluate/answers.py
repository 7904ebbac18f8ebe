"""GSM8K answer extraction and comparison.

A model's final answer is read from the last complete ``\\boxed{...}`` (or ``\\fbox{...}``) in its
output, turned into a number by :func:`normalize_number`, and compared numerically with the number
after ``####`` in the GSM8K ``answer`` field (:func:`gsm8k_reference`).

All functions are pure; the module holds only compiled patterns.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator

__all__ = [
    "extract_boxed",
    "has_complete_boxed",
    "normalize_number",
    "gsm8k_reference",
    "is_correct",
]

_BOXED_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")

# \text{...}-like wrappers whose content is kept (a unit word, or the number itself).
_WRAPPER = re.compile(
    r"\\(?:text|textbf|textrm|textit|textnormal|mathrm|mathbf|mathit|mathnormal|mbox|operatorname)"
    r"\s*\{([^{}]*)\}"
)
# Tokens removed outright: currency, percent, LaTeX spacing, degree marks, sizing commands.
_NOISE = re.compile(
    r"\\\$|\$|\\%|%|\\[!,;:> ]|~|\^\s*\{?\\circ\}?|°|\\left|\\right|\\displaystyle|\\\(|\\\)|\\\[|\\\]"
)
_EQUALS = re.compile(r"=|\\approx|\\simeq|≈")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_NUM = r"(?:\d+(?:\.\d*)?|\.\d+)"
_UNIT = r"(?:[A-Za-z][A-Za-z'./\-]*(?:\^\{?\d+\}?)?)"
_NUMBER_FORM = re.compile(
    rf"""
    (?P<sign>[-+]?)
    (?:
        (?P<whole>\d+)?\\[dt]?frac\{{(?P<fsign>[-+]?)(?P<fnum>{_NUM})\}}\{{(?P<fden>{_NUM})\}}
      | (?P<swhole>\d+)?\\[dt]?frac(?P<snum>\d)(?P<sden>\d)
      | (?P<num>{_NUM})(?:/(?P<den>{_NUM}))?
    )
    (?P<unit>{_UNIT})?
    """,
    re.VERBOSE,
)


def _complete_boxed_contents(text: str) -> Iterator[str]:
    """Yield the content of every complete ``\\boxed{...}``/``\\fbox{...}``, in order of opening.

    Braces are counted so nested groups (``\\boxed{\\frac{1}{2}}``) stay inside the content; escaped
    braces (``\\{``, ``\\}``) do not count. An opening that is never closed yields nothing.
    """
    for match in _BOXED_OPEN.finditer(text):
        depth = 1
        i = match.end()
        n = len(text)
        while i < n:
            char = text[i]
            if char == "\\" and i + 1 < n and text[i + 1] in "{}":
                i += 2
                continue
            if char == "{":
                depth += 1
            elif char == "}":
                depth -= 1
                if depth == 0:
                    yield text[match.end() : i]
                    break
            i += 1


def extract_boxed(text: str) -> str | None:
    """Return the content of the last complete ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``.

    "Last" is by position of the opening command, so for ``\\boxed{\\boxed{5}}`` the inner ``5`` is
    returned. A final ``\\boxed{`` that is never closed (output cut off) is ignored and the previous
    complete one is used. Returns ``None`` when there is no complete boxed expression.

    >>> extract_boxed(r"so \\boxed{\\frac{1}{2}}")
    '\\\\frac{1}{2}'
    """
    last: str | None = None
    for content in _complete_boxed_contents(text):
        last = content
    return last


def has_complete_boxed(text: str) -> bool:
    """Whether ``text`` contains at least one complete ``\\boxed{...}``/``\\fbox{...}``.

    Meant as a generation stopping criterion: it turns true as soon as the first boxed expression
    is closed.
    """
    return next(_complete_boxed_contents(text), None) is not None


def _strip_wrapping(s: str) -> str:
    """Remove braces or parentheses that wrap the whole string (``{(18)}`` -> ``18``)."""
    pairs = {"{": "}", "(": ")"}
    while len(s) >= 2 and pairs.get(s[0]) == s[-1]:
        opening, closing = s[0], s[-1]
        depth = 0
        for i, char in enumerate(s):
            depth += char == opening
            depth -= char == closing
            if depth == 0 and i < len(s) - 1:
                return s  # the first one closes before the end: "{1}{2}" is not wrapped
        s = s[1:-1]
    return s


def normalize_number(s: str) -> float | None:
    """Read the number a (LaTeX) answer string denotes, or ``None`` when none can be read.

    Handled: currency and percent signs (``$``, ``\\$``, ``%``, ``\\%``), thousands commas
    (``1,234``, ``1{,}234``), LaTeX spacing (``\\!``, ``\\,``, ``\\ ``), ``\\text{...}``-like
    wrappers, unit words after the number (``18 \\text{ dollars}``, ``5 apples``, ``12\\text{km}``),
    spaces, a trailing full stop, braces or parentheses around the whole, fractions
    (``\\frac{a}{b}``, ``\\dfrac``, ``\\tfrac``, ``\\frac12``, ``a/b``, mixed ``2\\frac{1}{2}``), signs including the Unicode minus, and an equation whose
    right-hand side is the number (``x = 5``; the part after the last ``=`` is read).

    Anything else — an expression such as ``2 \\times 3``, words between numbers, several numbers —
    gives ``None`` rather than a guess.
    """
    text = s.replace("\u2212", "-").strip()
    while True:
        unwrapped = _WRAPPER.sub(r" \1 ", text)
        if unwrapped == text:
            break
        text = unwrapped
    text = text.replace("{,}", ",")
    text = _NOISE.sub(" ", text)
    text = _EQUALS.split(text)[-1]
    text = "".join(text.split())
    text = _THOUSANDS.sub("", text)
    text = text.rstrip(".")
    text = _strip_wrapping(text)
    match = _NUMBER_FORM.fullmatch(text)
    if match is None:
        return None
    sign = -1.0 if match["sign"] == "-" else 1.0
    if match["fnum"] is not None:
        whole, numerator, denominator = match["whole"], match["fnum"], match["fden"]
        if match["fsign"] == "-":
            sign = -sign
    elif match["snum"] is not None:
        whole, numerator, denominator = match["swhole"], match["snum"], match["sden"]
    else:
        whole, numerator, denominator = None, match["num"], match["den"]
    value = float(numerator)
    if denominator is not None:
        if float(denominator) == 0.0:
            return None
        value /= float(denominator)
    if whole is not None:
        value += float(whole)
    return sign * value


def gsm8k_reference(answer_field: str) -> float:
    """Return the reference number of a GSM8K ``answer`` field: what follows ``####``.

    Thousands commas are removed (``#### 70,000`` -> ``70000.0``). Raises ``ValueError`` when the
    field has no ``####`` marker or no readable number after it.
    """
    if "####" not in answer_field:
        raise ValueError("GSM8K answer field has no '####' marker")
    tail = answer_field.rsplit("####", 1)[1].strip()
    try:
        return float(tail.replace(",", ""))
    except ValueError:
        value = normalize_number(tail)
        if value is None:
            raise ValueError(f"no number after '####': {tail!r}") from None
        return value


def is_correct(prediction_text: str, reference: float, rel_tol: float = 1e-6) -> bool:
    """Whether the last complete boxed answer in ``prediction_text`` equals ``reference``.

    The boxed content is read with :func:`normalize_number` and compared with
    ``math.isclose(value, reference, rel_tol=rel_tol, abs_tol=1e-6)``. No boxed answer, or one
    that is not a readable number, counts as incorrect.
    """
    boxed = extract_boxed(prediction_text)
    if boxed is None:
        return False
    value = normalize_number(boxed)
    if value is None:
        return False
    return math.isclose(value, reference, rel_tol=rel_tol, abs_tol=1e-6)
