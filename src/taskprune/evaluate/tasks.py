"""Evaluation tasks by name: a task is data (a split, a prompt builder, a token budget, metrics) plus hooks.

In the shape of lm-evaluation-harness's `Task` (`lm_eval/api/task.py`): an `output_type` says how the
runner gets an item's outcome, `user_message` is its `doc_to_text`, `process` its `process_results` (a
scored record to `{metric: value}`) and `metrics` what `process` returns, the first being the task's
headline score. Output types:

* ``generate`` (`gsm8k`, `humaneval`, `mbpp`): greedy generation graded against the data (`accuracy`);
* ``similarity`` (`squad-sim`, `dialogue-sim`): generation scored against the unpruned reference model's
  output for the same prompt by the task's `similarity_scorer` (see `evaluate/similarity.py`);
* ``multiple_choice`` (`mc:SET`, e.g. `mc:arc-easy`, `mc:mmlu-SUBJECT`; the sets are
  `taskprune.data.multiple_choice.MC_SETS`): log-likelihood scoring (`acc`, `acc_norm`).

A task may also name a training target (`training_pair`: the chat turns LoRA recovery trains on).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from taskprune.data import DataError, Example, load_examples, sample
from taskprune.data.multiple_choice import get_mc_set
from taskprune.evaluate.answers import gsm8k_reference, has_complete_boxed, is_correct
from taskprune.evaluate.sanitize import sanitize_code, sanitize_mbpp
from taskprune.evaluate.traps import code_answer_complete

GENERATE, SIMILARITY, MULTIPLE_CHOICE = "generate", "similarity", "multiple_choice"
# The kind stored in summaries and result rows, per output type.
KINDS = {GENERATE: "accuracy", SIMILARITY: "similarity", MULTIPLE_CHOICE: "multiple-choice"}
MC_PREFIX = "mc:"
DEFAULT_TASK = "gsm8k"  # `taskprune eval`'s default, and the speed-prompt source of a multiple-choice-only run

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
    output_type: str  # GENERATE, SIMILARITY or MULTIPLE_CHOICE
    dataset: str  # a data registry name (multiple choice: the set's name)
    split: str
    metrics: tuple[str, ...]  # the keys `process` returns; the first is the headline score
    process: Callable[[dict], dict[str, float]]  # a scored record -> {metric: value}
    max_new_tokens: int = 0  # generation budget (0: no generation)
    user_message: Callable[[Example], str] | None = None
    answer_complete: Callable[[Example, str], bool] | None = None  # a full answer is in this text (trap Type 1 vs 2)
    program: Callable[[Example, str], str] | None = None  # code tasks: the program to run in the sandbox
    grade: Callable[[Example, str], bool] | None = None  # non-code generate tasks
    stop: Callable[[str], bool] | None = None  # optional early stop (GSM8K: a complete \boxed{})
    default_limit: int | None = None  # items used when --limit is not given (None: all)
    similarity_scorer: str | None = None  # similarity tasks: the `SimilarityScorer` method that scores them
    training_pair: Callable[[Example], tuple[str, str]] | None = None  # (user, assistant) turns for recovery

    @property
    def kind(self) -> str:
        """"accuracy", "similarity" or "multiple-choice", as summaries and result rows store it."""
        return KINDS[self.output_type]

    @property
    def metric(self) -> str:
        return self.metrics[0]

    @property
    def records_file(self) -> str:
        """The per-item records' file name in an evaluation directory (`gsm8k.jsonl`, `mc-arc-easy.jsonl`)."""
        return self.name.replace(":", "-") + ".jsonl"

    def score(self, record: dict) -> float:
        """The item's headline score."""
        return self.process(record)[self.metric]

    def examples(self, data_dir=None, limit: int | None = None) -> list[Example]:
        """The first `limit` items for generate tasks; a seeded draw of `limit` for similarity tasks
        (their sources are ordered by topic, so a prefix would be one article)."""
        items = load_examples(self.dataset, data_dir, self.split)
        limit = limit or self.default_limit
        if self.output_type == SIMILARITY:
            return sample(items, limit, seed=0)
        return items[:limit] if limit else items


def _accuracy(record: dict) -> dict[str, float]:
    return {"accuracy": float(record["correct"])}


def _similarity(record: dict) -> dict[str, float]:
    return {"similarity": record["similarity"]}


def _mc_scores(record: dict) -> dict[str, float]:
    return {"acc": float(record["acc"]), "acc_norm": float(record["acc_norm"])}


_CALC = re.compile(r"<<.*?>>")


def gsm8k_solution(answer: str) -> str:
    """A GSM8K `answer` field as a boxed-answer solution: calculator annotations removed, the final
    `#### X` line replaced by "The final answer is \\boxed{X}."."""
    if "####" not in answer:
        raise DataError("GSM8K answer field has no '####' marker")
    body, final = answer.rsplit("####", 1)
    body = _CALC.sub("", body).rstrip()
    boxed = f"The final answer is \\boxed{{{final.strip()}}}."
    return f"{body}\n{boxed}" if body else boxed


def mbpp_solution(code: str) -> str:
    """MBPP reference code in a ```python fence (CRLF normalised, trailing spaces dropped)."""
    lines = [line.rstrip() for line in code.replace("\r\n", "\n").replace("\r", "\n").strip("\n").split("\n")]
    return "```python\n" + "\n".join(lines) + "\n```"


def _gsm8k_message(ex: Example) -> str:
    return f"{ex.prompt}\n{GSM8K_INSTRUCTION}"


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


def _gsm8k_pair(ex: Example) -> tuple[str, str]:
    return _gsm8k_message(ex), gsm8k_solution(ex.response)


def _mbpp_pair(ex: Example) -> tuple[str, str]:
    return _mbpp_message(ex), mbpp_solution(ex.response)


TASKS: dict[str, Task] = {
    "gsm8k": Task(
        "gsm8k", GENERATE, "gsm8k", "test", ("accuracy",), _accuracy, 1024,
        user_message=_gsm8k_message,
        answer_complete=lambda ex, text: has_complete_boxed(text),
        grade=_gsm8k_grade, stop=has_complete_boxed, training_pair=_gsm8k_pair),
    "humaneval": Task(
        "humaneval", GENERATE, "humaneval", "test", ("accuracy",), _accuracy, 512,
        user_message=lambda ex: f"{HUMANEVAL_INSTRUCTION}\n\n{ex.prompt}",
        answer_complete=lambda ex, text: code_answer_complete(text, ex.meta["entry_point"], prompt=ex.prompt),
        program=_humaneval_program),
    "mbpp": Task(
        "mbpp", GENERATE, "mbpp", "test", ("accuracy",), _accuracy, 512,
        user_message=_mbpp_message,
        answer_complete=lambda ex, text: bool(mbpp_entry_point(ex)) and code_answer_complete(text, mbpp_entry_point(ex)),
        program=_mbpp_program, training_pair=_mbpp_pair),
    "squad-sim": Task(
        "squad-sim", SIMILARITY, "squad", "validation", ("similarity",), _similarity, 128,
        user_message=lambda ex: ex.prompt, answer_complete=_any_text, default_limit=200,
        similarity_scorer="bertscore"),
    "dialogue-sim": Task(
        "dialogue-sim", SIMILARITY, "chitchat", "train", ("similarity",), _similarity, 128,
        user_message=lambda ex: ex.prompt, answer_complete=_any_text, default_limit=200,
        similarity_scorer="sbert"),
}


def _mc_task(name: str) -> Task:
    """`mc:SET`: a multiple-choice set of the data layer, scored by log-likelihood on its evaluation split."""
    mc = get_mc_set(name.removeprefix(MC_PREFIX))  # raises, naming the sets there are
    return Task(name, MULTIPLE_CHOICE, mc.name, mc.split, ("acc", "acc_norm"), _mc_scores)


def get_task(name: str) -> Task:
    """A task by name: one of `TASKS`, or `mc:SET` for a multiple-choice set."""
    if name.startswith(MC_PREFIX):
        return _mc_task(name)
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(TASKS)}, or mc:SET for a "
                         f"multiple-choice set (mc:arc-easy, mc:mmlu, ...)") from None


def training_target(dataset: str) -> Callable[[Example], tuple[str, str]] | None:
    """The chat turns to train on for examples of `dataset`: those of the task evaluated on it, if it has any."""
    return next((t.training_pair for t in TASKS.values() if t.dataset == dataset and t.training_pair), None)
