"""Evaluation tasks by name: a task is a data split, a prompt builder, a token budget and a scorer.

Accuracy tasks (`gsm8k`, `humaneval`, `mbpp`) score each output against the data; similarity tasks
(`squad-sim`, `dialogue-sim`) score it against the unpruned reference model's output for the same
prompt (see `evaluate/similarity.py`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from taskprune.data import Example, load_examples, sample
from taskprune.evaluate.answers import gsm8k_reference, has_complete_boxed, is_correct
from taskprune.evaluate.sanitize import sanitize_code, sanitize_mbpp
from taskprune.evaluate.traps import code_answer_complete

# The paper's instructions (arXiv 2604.27115, appendix E).
GSM8K_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
HUMANEVAL_INSTRUCTION = (
    "You are generating solutions for the HumanEval benchmark. Output ONLY valid Python code. Output ONLY the "
    "function definition requested. Do NOT include explanations, comments outside the function, examples, tests, "
    "prints, or prose. Do NOT include markdown, backticks, or formatting. Do NOT add helper text before or after "
    "the code. The output must consist of one or more top-level def functions only. No top-level statements other "
    "than function definitions. No if __name__ == \u201c__main__\u201d blocks. No print statements. No test cases. "
    "No explanations. Respond with Python code ONLY."
)


@dataclass(frozen=True)
class Task:
    """What `taskprune eval` needs to run and score one benchmark."""

    name: str
    kind: str  # "accuracy" (graded against the data) or "similarity" (against a reference model's output)
    dataset: str
    split: str
    max_new_tokens: int
    user_message: Callable[[Example], str]
    answer_complete: Callable[[Example, str], bool]  # a full answer is in this text (trap Type 1 vs 2)
    program: Callable[[Example, str], str] | None = None  # code tasks: the program to run in the sandbox
    grade: Callable[[Example, str], bool] | None = None  # non-code accuracy tasks
    stop: Callable[[str], bool] | None = None  # optional early stop (GSM8K: a complete \boxed{})
    default_limit: int | None = None  # items used when --limit is not given (None: all)

    def examples(self, data_dir=None, limit: int | None = None) -> list[Example]:
        """The first `limit` items for accuracy tasks; a seeded draw of `limit` for similarity tasks
        (their sources are ordered by topic, so a prefix would be one article)."""
        items = load_examples(self.dataset, data_dir, self.split)
        limit = limit or self.default_limit
        if self.kind == "similarity":
            return sample(items, limit, seed=0)
        return items[:limit] if limit else items


def _gsm8k_grade(ex: Example, output: str) -> bool:
    return is_correct(output, gsm8k_reference(ex.response))


def _humaneval_program(ex: Example, output: str) -> str:
    code = sanitize_code(output, ex.prompt, ex.meta["entry_point"])
    return f"{code}\n\n{ex.meta['test']}\n\ncheck({ex.meta['entry_point']})\n"


def mbpp_entry_point(ex: Example) -> str | None:
    match = re.search(r"assert\s+(?:not\s+)?\(?\s*([A-Za-z_]\w*)\s*\(", ex.meta["test_list"][0])
    return match.group(1) if match else None


def _mbpp_message(ex: Example) -> str:
    tests = "\n".join(ex.meta["test_list"])
    return (f"{ex.prompt}\nYour code should pass these tests:\n{tests}\n"
            "Respond with the Python function only.")


def _mbpp_program(ex: Example, output: str) -> str:
    code = sanitize_mbpp(output, mbpp_entry_point(ex))
    setup = ex.meta.get("test_setup_code") or ""
    return f"{setup}\n{code}\n\n" + "\n".join(ex.meta["test_list"]) + "\n"


def _any_text(ex: Example, output: str) -> bool:
    return bool(output.strip())


TASKS: dict[str, Task] = {
    "gsm8k": Task(
        "gsm8k", "accuracy", "gsm8k", "test", 1024,
        user_message=lambda ex: f"{ex.prompt}\n{GSM8K_INSTRUCTION}",
        answer_complete=lambda ex, text: has_complete_boxed(text),
        grade=_gsm8k_grade, stop=has_complete_boxed),
    "humaneval": Task(
        "humaneval", "accuracy", "humaneval", "test", 512,
        user_message=lambda ex: f"{HUMANEVAL_INSTRUCTION}\n\n{ex.prompt}",
        answer_complete=lambda ex, text: code_answer_complete(text, ex.meta["entry_point"], prompt=ex.prompt),
        program=_humaneval_program),
    "mbpp": Task(
        "mbpp", "accuracy", "mbpp", "test", 512,
        user_message=_mbpp_message,
        answer_complete=lambda ex, text: bool(mbpp_entry_point(ex)) and code_answer_complete(text, mbpp_entry_point(ex)),
        program=_mbpp_program),
    "squad-sim": Task(
        "squad-sim", "similarity", "squad", "validation", 128,
        user_message=lambda ex: ex.prompt, answer_complete=_any_text, default_limit=200),
    "dialogue-sim": Task(
        "dialogue-sim", "similarity", "chitchat", "train", 128,
        user_message=lambda ex: ex.prompt, answer_complete=_any_text, default_limit=200),
}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(TASKS)}, or mc:SET for a "
                         f"multiple-choice set (mc:arc-easy, mc:mmlu, ...)") from None


def task_kind(name: str) -> str:
    """"accuracy", "similarity" or "multiple-choice" (`mc:SET` names); an unknown name is an error."""
    if name.startswith("mc:"):
        from taskprune.data.multiple_choice import get_mc_set  # noqa: PLC0415 - keeps the import light
        get_mc_set(name[3:])  # raises, naming the sets there are
        return "multiple-choice"
    return get_task(name).kind
