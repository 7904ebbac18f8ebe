"""Hand-made cases for the HumanEval/MBPP completion sanitiser.

Every snippet here is written for this test, so executing the sanitised programs is safe.
"""

from __future__ import annotations

import ast

import pytest

from taskprune.evaluate.sanitize import extract_code, find_function, sanitize_code, sanitize_mbpp

PROMPT = '''from typing import List


def has_close_elements(numbers: List[float], threshold: float) -> bool:
    """Check if any two numbers are closer to each other than the threshold.
    >>> has_close_elements([1.0, 2.0, 3.0], 0.5)
    False
    """
'''
ENTRY = "has_close_elements"

# A HumanEval/38-style prompt: a helper is defined before the target function.
HELPER_PROMPT = '''def encode_shift(s: str) -> str:
    """Shift every letter by 5."""
    return "".join(chr(((ord(ch) + 5 - ord("a")) % 26) + ord("a")) for ch in s)


def decode_shift(s: str) -> str:
    """Inverse of encode_shift."""
'''


def run(program: str) -> dict:
    """Compile and execute a sanitised program; return its namespace."""
    namespace: dict = {}
    exec(compile(program, "<sanitised>", "exec"), namespace)
    return namespace


def check_has_close(namespace: dict) -> None:
    fn = namespace[ENTRY]
    assert fn([1.0, 2.0, 3.0], 0.5) is False
    assert fn([1.0, 2.8, 3.0, 4.0, 5.0, 2.0], 0.3) is True
    assert fn([], 1.0) is False


def top_level_kinds(program: str) -> list[str]:
    return [type(node).__name__ for node in ast.parse(program).body]


def test_fenced_code_with_prose_around():
    completion = """Sure! Here is an efficient solution:

```python
def has_close_elements(numbers: List[float], threshold: float) -> bool:
    ordered = sorted(numbers)
    return any(b - a < threshold for a, b in zip(ordered, ordered[1:]))

print(has_close_elements([1.0, 2.0], 0.5))
```

It sorts the numbers first, so only neighbours need to be compared.
"""
    program = sanitize_code(completion, PROMPT, ENTRY)
    assert "Sure!" not in program and "sorts the numbers" not in program
    assert "print(" not in program
    assert program.startswith("from typing import List\n")
    check_has_close(run(program))


def test_completion_repeating_signature_uses_list_from_prompt():
    # No fences; `List` is only imported by the prompt.
    completion = """def has_close_elements(numbers: List[float], threshold: float) -> bool:
    for i, a in enumerate(numbers):
        for b in numbers[i + 1:]:
            if abs(a - b) < threshold:
                return True
    return False
"""
    program = sanitize_code(completion, PROMPT, ENTRY)
    assert top_level_kinds(program) == ["ImportFrom", "FunctionDef"]
    assert program.count("def has_close_elements") == 1
    check_has_close(run(program))


def test_completion_with_own_import_is_not_duplicated():
    completion = (
        "```python\nfrom typing import List\n\n"
        "def has_close_elements(numbers: List[float], threshold: float) -> bool:\n    return False\n```"
    )
    program = sanitize_code(completion, PROMPT, ENTRY)
    assert program.count("from typing import List") == 1


def test_body_only_completion_is_appended_to_prompt():
    completion = "    ordered = sorted(numbers)\n    return any(b - a < threshold for a, b in zip(ordered, ordered[1:]))\n"
    program = sanitize_code(completion, PROMPT, ENTRY)
    assert program == PROMPT + completion  # prompt (docstring included) followed by the body
    check_has_close(run(program))


def test_body_without_indentation_is_indented():
    completion = "ordered = sorted(numbers)\nreturn any(b - a < threshold for a, b in zip(ordered, ordered[1:]))"
    check_has_close(run(sanitize_code(completion, PROMPT, ENTRY)))


def test_main_block_and_example_calls_are_dropped(capsys):
    completion = """```python
import math

def has_close_elements(numbers, threshold):
    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1:])

result = has_close_elements([1.0, 2.0], 0.5)
print(result)
assert has_close_elements([1.0, 1.1], 0.5)
for x in range(3):
    print(x)

if __name__ == "__main__":
    import doctest
    doctest.testmod()
    print("done")
```"""
    program = sanitize_code(completion, PROMPT, ENTRY)
    assert "__main__" not in program and "print" not in program and "assert" not in program
    assert "result" not in program
    assert top_level_kinds(program) == ["ImportFrom", "Import", "FunctionDef"]
    check_has_close(run(program))
    assert capsys.readouterr().out == ""


def test_body_only_completion_with_main_block():
    completion = """    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1:])


if __name__ == "__main__":
    print(has_close_elements([1.0, 2.0], 0.5))
"""
    program = sanitize_code(completion, PROMPT, ENTRY)
    assert "__main__" not in program
    check_has_close(run(program))


def test_truncated_fenced_completion_drops_partial_last_line():
    completion = """```python
def has_close_elements(numbers: List[float], threshold: float) -> bool:
    ordered = sorted(numbers)
    for a, b in zip(ordered, ordered[1:]):
        if b - a < threshold:
            return True
    return Fal"""
    program = sanitize_code(completion, PROMPT, ENTRY)
    compile(program, "<sanitised>", "exec")
    assert "return Fal" not in program
    fn = run(program)[ENTRY]
    assert fn([1.0, 1.1], 0.5) is True


def test_truncated_completion_mid_string_still_compiles():
    completion = '''def has_close_elements(numbers, threshold):
    ordered = sorted(numbers)
    return any(b - a < threshold for a, b in zip(ordered, ordered[1:]))


def describe(numbers):
    """Describe the list of numbers and'''
    program = sanitize_code(completion, PROMPT, ENTRY)
    compile(program, "<sanitised>", "exec")
    assert "def describe" not in program
    check_has_close(run(program))


def test_truncated_mid_body_keeps_longest_valid_prefix():
    completion = "def has_close_elements(numbers, threshold):\n    ordered = sorted(numbers)\n    if len(ordered) <"
    program = sanitize_code(completion, PROMPT, ENTRY)
    compile(program, "<sanitised>", "exec")
    assert "ordered = sorted(numbers)" in program and "if len" not in program


def test_prompt_helper_is_kept_when_completion_lacks_it():
    completion = '''```python
def decode_shift(s: str) -> str:
    return "".join(chr(((ord(ch) - 5 - ord("a")) % 26) + ord("a")) for ch in s)
```'''
    program = sanitize_code(completion, HELPER_PROMPT, "decode_shift")
    namespace = run(program)
    assert namespace["decode_shift"](namespace["encode_shift"]("hello")) == "hello"
    assert program.count("def decode_shift") == 1  # the prompt's stub is not repeated


def test_prompt_helper_redefined_by_completion_appears_once():
    completion = '''def encode_shift(s: str) -> str:
    return "".join(chr(((ord(ch) + 5 - ord("a")) % 26) + ord("a")) for ch in s)


def decode_shift(s: str) -> str:
    return "".join(chr(((ord(ch) - 5 - ord("a")) % 26) + ord("a")) for ch in s)
'''
    program = sanitize_code(completion, HELPER_PROMPT, "decode_shift")
    assert program.count("def encode_shift") == 1
    assert run(program)["decode_shift"]("mjqqt") == "hello"


def test_entry_point_inferred_from_prompt():
    completion = "```python\ndef has_close_elements(numbers, threshold):\n    return False\n```"
    assert find_function(sanitize_code(completion, PROMPT), ENTRY) is not None


def test_prefers_block_defining_entry_point():
    completion = """Usage:

```python
print(add(2, 3))
```

Implementation:

```python
def add(a, b):
    return a + b
```
"""
    program = sanitize_mbpp(completion, "add")
    assert run(program)["add"](2, 3) == 5
    assert "print" not in program


def test_mbpp_keeps_needed_constants_and_drops_unused_assignments():
    completion = """Here is the code.

MOD = 10**9 + 7
BASE = MOD - 1
unused = 3

def power_mod(a, n):
    return pow(a, n, BASE + 1)

answer = power_mod(2, 10)
print(answer)

This uses Python's three-argument pow.
"""
    program = sanitize_mbpp(completion, "power_mod")
    assert "unused" not in program and "answer" not in program and "three-argument" not in program
    assert "MOD = 10**9 + 7" in program and "BASE = MOD - 1" in program
    assert run(program)["power_mod"](2, 10) == 1024


def test_local_variable_named_like_example_result_does_not_keep_the_call():
    completion = """def square(x):
    result = x * x
    return result

result = square(4)
"""
    program = sanitize_mbpp(completion, "square")
    assert "square(4)" not in program


def test_import_try_block_and_decorators_are_kept():
    completion = """```python
try:
    from functools import cache
except ImportError:
    from functools import lru_cache as cache

@cache
def fib(n):
    return n if n < 2 else fib(n - 1) + fib(n - 2)

print(fib(30))
```"""
    program = sanitize_mbpp(completion, "fib")
    assert top_level_kinds(program) == ["Try", "FunctionDef"]
    assert "@cache" in program
    assert run(program)["fib"](30) == 832040


def test_class_answer_without_entry_point_is_still_returned():
    completion = "class Solution:\n    def add(self, a, b):\n        return a + b\n"
    program = sanitize_mbpp(completion, "add")
    assert "class Solution" in program


def test_empty_completion_returns_compilable_prompt():
    program = sanitize_code("", PROMPT, ENTRY)
    compile(program, "<sanitised>", "exec")
    assert find_function(program, ENTRY) is not None


def test_prose_only_completion_gives_empty_program():
    assert sanitize_mbpp("I am not able to solve this problem.", "f") == ""


@pytest.mark.parametrize(
    ("completion", "closed"),
    [
        ("```python\nx = 1\n```", True),
        ("```py\nx = 1\n", False),
        ("x = 1\n", None),
    ],
)
def test_extract_code_reports_fence_state(completion, closed):
    region = extract_code(completion)
    assert region.code.strip() == "x = 1"
    assert region.fenced is (closed is not None)
    if closed is not None:
        assert region.closed is closed


def test_extract_code_prefers_python_blocks():
    completion = "```bash\npip install x\n```\n\n```\ndef f():\n    return 1\n```"
    assert extract_code(completion, "f").code == "def f():\n    return 1\n"


def test_parsable_prefix():
    from taskprune.evaluate.sanitize import parsable_prefix

    assert parsable_prefix("x = 1\ny = (1,\n     2)\nz = [") == "x = 1\ny = (1,\n     2)"
    assert parsable_prefix("def f():\n    a = 1\n    if a:\n") == "def f():\n    a = 1"
    assert parsable_prefix("Here is prose.\nx = 1") == ""
    assert parsable_prefix("# only a comment") == ""


def test_pathological_unclosed_brackets_keep_earlier_definitions():
    # A looping generation that never closes its brackets must not hide the finished function.
    completion = "def add(a, b):\n    return a + b\n\n" + "total = add(1 +\n" * 500
    program = sanitize_mbpp(completion, "add")
    assert program == "def add(a, b):\n    return a + b\n"
    compile(sanitize_mbpp("x = (\n" * 300, "f"), "<sanitised>", "exec")


def test_unfinished_try_block_after_function():
    completion = "def add(a, b):\n    return a + b\n\ntry:\n" + "    print(1)\n" * 300
    assert sanitize_mbpp(completion, "add") == "def add(a, b):\n    return a + b\n"
