"""Multiple-choice evaluation by log-likelihood, with `acc` and `acc_norm` as lm-evaluation-harness defines them.

Each item is a context and N candidate continuations; the model scores every continuation by the
sum of its tokens' log-probabilities given the context, and

* ``acc``      -- the item is right when the highest total log-likelihood is the gold choice;
* ``acc_norm`` -- the same after dividing each log-likelihood by the choice's length **in
  characters** (``len(choice)`` of the choice string *without* the leading target delimiter), as
  the harness's ``ConfigurableTask.process_results`` does
  (``completion_len = np.array([float(len(i)) for i in choices])``; ``np.argmax(lls / completion_len)``).

Ties go to the first maximum (``np.argmax``). The continuation sent to the model is the target
delimiter (a space) plus the choice, as the harness builds its requests.

Tokenisation follows the harness's ``HFLM._encode_pair``: trailing whitespace of the context is
moved to the front of the continuation, ``context + continuation`` is encoded *in one piece*, and
the continuation tokens are ``whole[len(encode(context)):]``. So a token that straddles the
boundary (a BPE merge of the context's last characters with the continuation's first ones) counts
as continuation, and the split never changes how the text is tokenised. Encoding adds no special
tokens, except a BOS first when ``add_bos`` (default: the model's adapter says, which is only for
Gemma models, as the harness does).
An empty context is scored after a single prefix token (BOS, else EOS). Inputs longer than
``max_length`` are cut on the left, keeping the last ``max_length + 1`` tokens.

Batching: requests are sorted longest first and padded on the right (default) or the left, with an
attention mask and explicit ``position_ids`` so padding never shifts a row's positions; forward
passes whose input tokens are identical (the single-token continuations " A"/" B"/... of MMLU) are
run once. Only the logits of the positions that predict continuation tokens are computed
(``logits_to_keep``), and log-softmax is taken in fp32. In fp32 a batched result equals the
one-request-at-a-time result to rounding (see ``tests/test_multiple_choice.py``).
"""

from __future__ import annotations

import math
import time
import torch

from taskprune.data.core import MCItem
from taskprune.data.multiple_choice import load_mc, select
from taskprune.models.adapters import model_adapter
from taskprune.models.batch import pad_batch
from taskprune.models.load import input_device


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _prefix_token(tokenizer) -> int:
    for tok_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tok_id is not None:
            return tok_id
    raise ValueError("an empty context needs a BOS or EOS token to condition on; the tokenizer has neither")


def encode_pair(tokenizer, context: str, continuation: str, add_bos: bool = False) -> tuple[list[int], list[int]]:
    """Context and continuation token ids, split as the harness splits them (see the module docstring)."""
    if context == "":
        ctx, cont = [_prefix_token(tokenizer)], _encode(tokenizer, continuation)
    else:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = _encode(tokenizer, context + continuation)
        ctx = _encode(tokenizer, context)
        cont = whole[len(ctx):]  # the context itself stays as encoded alone, as in the harness
        if add_bos:
            if tokenizer.bos_token_id is None:
                raise ValueError("add_bos=True but the tokenizer has no BOS token")
            ctx = [tokenizer.bos_token_id] + ctx
    if not cont:
        raise ValueError(f"continuation {continuation!r} encodes to no tokens after context {context[-40:]!r}")
    return ctx, cont


@torch.no_grad()
def _forward_logprobs(model, rows: list[list[int]], keep_last: list[int], pad_id: int,
                      padding_side: str) -> list[torch.Tensor]:
    """For each row (input ids), fp32 log-probs of its last `keep_last[i]` positions: (keep_last[i], vocab)."""
    batch = pad_batch(rows, pad_id, padding_side).to(input_device(model))
    width = batch.input_ids.shape[1]
    # One past the last real position of each row, in padded coordinates.
    ends = [len(row) if padding_side == "right" else width for row in rows]
    # The logits needed are the last keep_last[i] real positions of every row: keep the columns from
    # the leftmost of them to the end (all rows end at `width` with left padding, so this is tight).
    first = min(e - k for e, k in zip(ends, keep_last))
    keep = width - first
    kwargs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    try:
        logits = model(**kwargs, logits_to_keep=keep).logits
    except TypeError:  # a model whose forward has no logits_to_keep
        logits = model(**kwargs).logits[:, -keep:]
    out = []
    for i, (e, k) in enumerate(zip(ends, keep_last)):
        lo = e - k - first
        out.append(torch.log_softmax(logits[i, lo:lo + k].float(), dim=-1))
    return out


def loglikelihoods(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 8, *,
                   padding_side: str = "right", max_length: int | None = None,
                   add_bos: bool | None = None, engine=None) -> list[tuple[float, bool]]:
    """(sum of log p(continuation tokens | context), whether every continuation token is the argmax)
    for each (context, continuation) pair, in input order.

    `max_length` (default: the model's ``max_position_embeddings``) caps the input length, cutting on
    the left; `add_bos` None means the harness's default for this model (its adapter's `add_bos`: True
    only for Gemma). `engine`, when given, computes the same from the token ids instead of `model`'s
    forward: anything with ``continuation_logprobs(rows, n_cont) -> [(loglik, greedy)]``, the sum over
    the last ``n_cont[i]`` tokens of ``rows[i]`` (the vLLM engine's prompt log-probabilities).
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', not {padding_side!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if not pairs:
        return []
    adapter = model_adapter(model)
    if add_bos is None:
        add_bos = adapter.add_bos
    if max_length is None:
        max_length = int(getattr(getattr(model, "config", None), "max_position_embeddings", 0) or 2048)
    pad_id = adapter.pad_id(tokenizer)

    # One forward job per distinct (input tokens, continuation length); requests point into them.
    jobs: dict[tuple[tuple[int, ...], int], int] = {}
    job_inputs: list[list[int]] = []
    job_keep: list[int] = []
    requests = []  # (job index, continuation tokens)
    for context, continuation in pairs:
        ctx, cont = encode_pair(tokenizer, context, continuation, add_bos=add_bos)
        full = (ctx + cont)[-(max_length + 1):]
        inp, n_cont = full[:-1], min(len(cont), len(full) - 1)
        cont = cont[-n_cont:]
        if n_cont < 1 or not inp:
            raise ValueError(f"request ({context[-40:]!r}, {continuation!r}) leaves nothing to score")
        key = (tuple(inp), n_cont)
        if key not in jobs:
            jobs[key] = len(job_inputs)
            job_inputs.append(inp)
            job_keep.append(n_cont)
        requests.append((jobs[key], cont))
    if engine is not None:
        rows = [job_inputs[j] + cont[-1:] for j, cont in requests]  # the whole (cut) context + continuation
        return engine.continuation_logprobs(rows, [len(cont) for _, cont in requests])

    job_logprobs: list[torch.Tensor | None] = [None] * len(job_inputs)
    order = sorted(range(len(job_inputs)), key=lambda j: (-len(job_inputs[j]), j))
    for b in range(0, len(order), batch_size):
        chunk = order[b:b + batch_size]
        outs = _forward_logprobs(model, [job_inputs[j] for j in chunk], [job_keep[j] for j in chunk],
                                 pad_id, padding_side)
        for j, lp in zip(chunk, outs):
            job_logprobs[j] = lp.cpu()

    results = []
    for j, cont in requests:
        lp = job_logprobs[j]
        target = torch.tensor(cont, dtype=torch.long)
        ll = lp.gather(-1, target[:, None]).squeeze(-1).sum().item()
        greedy = bool((lp.argmax(-1) == target).all())
        results.append((float(ll), greedy))
    return results


def _first_argmax(values: list[float]) -> int:
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def score_items(model, tokenizer, items: list[MCItem], batch_size: int = 8, **kwargs) -> list[dict]:
    """Per item: the log-likelihood of each choice, the `acc` and `acc_norm` predictions and verdicts.

    `kwargs` go to :func:`loglikelihoods` (padding_side, max_length, add_bos). Aggregate with
    :func:`aggregate`.
    """
    for item in items:
        if not item.choices or not 0 <= item.gold < len(item.choices):
            raise ValueError(f"item {item.id}: gold {item.gold} is not an index into its {len(item.choices)} choices")
    pairs = [(item.context, cont) for item in items for cont in item.continuations()]
    scored = loglikelihoods(model, tokenizer, pairs, batch_size=batch_size, **kwargs)
    records, k = [], 0
    for item in items:
        n = len(item.choices)
        lls = [ll for ll, _ in scored[k:k + n]]
        greedy = [g for _, g in scored[k:k + n]]
        k += n
        # The harness divides by float(len(choice)); an empty choice would divide by zero, so count it as 1.
        normed = [ll / max(len(c), 1) for ll, c in zip(lls, item.choices)]
        pred, pred_norm = _first_argmax(lls), _first_argmax(normed)
        records.append({
            "id": item.id, "gold": item.gold, "loglik": lls, "is_greedy": greedy,
            "pred": pred, "pred_norm": pred_norm,
            "acc": float(pred == item.gold), "acc_norm": float(pred_norm == item.gold),
            **({"meta": item.meta} if item.meta else {}),
        })
    return records


def _stderr(values: list[float]) -> float | None:
    """Standard error of the mean with the sample (n - 1) deviation, as the harness reports it."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def aggregate(records: list[dict]) -> dict:
    """Mean `acc` and `acc_norm` over items (every item weighs the same), with standard errors."""
    if not records:
        return {"n": 0, "acc": None, "acc_norm": None, "acc_stderr": None, "acc_norm_stderr": None}
    acc = [r["acc"] for r in records]
    norm = [r["acc_norm"] for r in records]
    return {"n": len(records), "acc": sum(acc) / len(acc), "acc_norm": sum(norm) / len(norm),
            "acc_stderr": _stderr(acc), "acc_norm_stderr": _stderr(norm)}


def evaluate_multiple_choice(lm, set_name: str, limit: int | None = None, data_dir=None, batch_size: int = 8,
                             split: str | None = None, source: str = "auto", **kwargs) -> dict:
    """Score a registered multiple-choice set (see `taskprune.data.multiple_choice.MC_SETS`) on `lm`.

    `lm` is a `LoadedModel` (or anything with `.model` and `.tokenizer`). `limit` takes the first
    `limit` items, except for the whole of MMLU, where it takes a seeded draw over all subjects.
    Returns ``{"summary": {...}, "records": [...]}``; the summary has `task` (``mc:<set>``), `n`,
    `acc`, `acc_norm` (+ stderr), the data `source`, the split, timings and, for MMLU, per subject.
    """
    loaded = load_mc(set_name, data_dir=data_dir, split=split, source=source)
    items = select(loaded.items, limit, set_name)
    t0 = time.perf_counter()
    records = score_items(lm.model, lm.tokenizer, items, batch_size=batch_size, **kwargs)
    seconds = time.perf_counter() - t0
    summary = {"task": f"mc:{set_name}", "set": set_name, "split": loaded.split, "source": loaded.source,
               **aggregate(records), "seconds": round(seconds, 3),
               "items_per_second": round(len(items) / seconds, 3) if seconds > 0 else None}
    subjects = sorted({r["meta"]["subject"] for r in records if "subject" in r.get("meta", {})})
    if len(subjects) > 1:
        summary["by_subject"] = {s: aggregate([r for r in records if r.get("meta", {}).get("subject") == s])
                                 for s in subjects}
    return {"summary": summary, "records": records}
