"""LoRA recovery of a pruned model (PEFT), merged back into a stock checkpoint.

`recover(model, preset, out)` fine-tunes LoRA adapters on the task's training data, merges them into
the weights and saves a plain Hugging Face checkpoint that keeps the pruned MLP width, with the
pruned input's `pruning.json` copied and a `recovery.json` added.

Presets follow the paper (arXiv 2604.27115, Table 7): `code` r 16 / alpha 32 / lr 2e-4 / effective
batch 16, `math` r 8 / alpha 16 / lr 2e-5 / effective batch 8; both dropout 0.1, 2 epochs, LoRA on
q,k,v,o,gate,up,down (fused `qkv_proj` / `gate_up_proj` where the architecture has them, e.g. Phi-3),
bf16 where the hardware supports it natively, else fp32.

Data. `math`: GSM8K train, the user turn exactly as evaluation builds it (question + the boxed
instruction), the assistant turn the GSM8K solution with the `<<...>>` calculator annotations removed
and the final `#### X` line replaced by "The final answer is \\boxed{X}.". `code`: MBPP train
(task ids 601-974, disjoint from the test ids), the user turn as evaluation builds it, the assistant
turn the reference code in a ```python fence. `data="codefeedback"` (Hub, needs a network) uses the
CodeFeedback Python answers as the paper did; a local `.jsonl`/`.json` file with `prompt` and
`response` fields is used as is. Loss is on response tokens only (prompt and padding labels -100).
Examples longer than `max_length` tokens are dropped (not cut, so every kept answer ends with the
end-of-turn token); how many is recorded.

Training. Plain PyTorch: AdamW (weight decay 0, gradient clipping at norm 1.0) on the LoRA
parameters, linear warm-up over the first 3% of optimizer steps then linear decay towards 0
(`schedule="constant"` keeps the peak after warm-up). One optimizer step is one effective batch,
accumulated over micro-batches; the loss is the mean over all response tokens of the effective batch
(so the gradient does not depend on how it is split into micro-batches). Each epoch visits the
examples in a seeded random order (seed, epoch), so the order is a pure function of the step.

Resuming. Every `save_every` optimizer steps and at each epoch end the adapter, optimizer,
scheduler, RNG states and position are written atomically to `<out>.work/checkpoint/`. Rerunning
with the same output resumes from there and gives the same result as an uninterrupted run (checked
bit for bit on CPU in fp32 by the tests). Settings that would change the result must match, else
the run stops and says which.

Merging. The trained adapter is merged in fp32 into a fresh load of the pruned checkpoint and the
result is cast back to that checkpoint's stored dtype (one rounding), saved atomically (temp dir +
rename) with tokenizer and generation config, plus the adapter itself under `lora_adapter/`.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from taskprune import __version__
from taskprune.atomic import atomic_dir, check_replaceable
from taskprune.data import Example, load_examples
from taskprune.data.registry import DataError, load_file
from taskprune.evaluate.tasks import gsm8k_solution, mbpp_solution, training_target

__all__ = ["RecoveryConfig", "PRESETS", "RecoveryError", "TrainExample", "RecoveryData", "recover",
           "recovery_examples", "gsm8k_solution", "mbpp_solution", "chat_pair", "encode_pair", "collate",
           "lora_target_modules", "make_lora_config", "work_dir_for"]

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Fused projections some architectures use instead of separate ones (Phi-3).
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
TASK_DATA = {"math": "gsm8k", "code": "mbpp"}
CODEFEEDBACK_DEFAULT_N = 7000  # the paper's code fine-tuning set size (Table 1)
SCHEDULES = ("linear", "constant")


class RecoveryError(ValueError):
    """A recovery request that cannot run; the message says what to change."""


@dataclass(frozen=True)
class RecoveryConfig:
    """LoRA hyperparameters (the preset part) and run settings."""

    r: int
    alpha: int
    lr: float
    effective_batch_size: int
    dropout: float = 0.1
    epochs: int = 2
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    max_examples: int | None = None  # None: every example that fits (codefeedback: 7000)
    micro_batch_size: int = 2  # gradient accumulation = effective_batch_size // micro_batch_size
    max_length: int = 512  # prompt + response tokens; longer examples are dropped
    gradient_checkpointing: bool = False
    seed: int = 0
    save_every: int = 50  # optimizer steps between checkpoints (0: only at epoch ends)
    warmup_ratio: float = 0.03
    schedule: str = "linear"  # "linear" decay after warm-up, or "constant"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0

    @property
    def grad_accum(self) -> int:
        return self.effective_batch_size // self.micro_batch_size

    def validate(self) -> None:
        if self.micro_batch_size < 1 or self.effective_batch_size < 1:
            raise RecoveryError("batch sizes must be positive")
        if self.effective_batch_size % self.micro_batch_size:
            raise RecoveryError(f"effective batch {self.effective_batch_size} is not a multiple of micro batch "
                                f"{self.micro_batch_size}; pick a micro batch that divides it")
        if self.epochs < 1:
            raise RecoveryError(f"epochs must be at least 1, got {self.epochs}")
        if self.schedule not in SCHEDULES:
            raise RecoveryError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.max_examples is not None and self.max_examples < 1:
            raise RecoveryError(f"max_examples must be positive, got {self.max_examples}")
        if self.max_length < 2:
            raise RecoveryError(f"max_length must be at least 2, got {self.max_length}")


PRESETS: dict[str, RecoveryConfig] = {
    "code": RecoveryConfig(r=16, alpha=32, lr=2e-4, effective_batch_size=16),
    "math": RecoveryConfig(r=8, alpha=16, lr=2e-5, effective_batch_size=8),
}

# Fields that do not change the trained result (may differ between a run and its resumption).
_RESUME_FREE = {"save_every", "gradient_checkpointing"}


# ---------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class TrainExample:
    id: str
    input_ids: list[int]
    labels: list[int]  # -100 on prompt tokens

    @property
    def n_response(self) -> int:
        return sum(1 for x in self.labels if x != -100)


@dataclass
class RecoveryData:
    examples: list[TrainExample]
    source: str  # registry name or file path
    split: str | None
    available: int  # examples in the source (after any source filter)
    dropped_too_long: int  # seen but longer than max_length (or empty response)
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.examples)

    def info(self) -> dict:
        ids = "\n".join(ex.id for ex in self.examples).encode()
        return {"source": self.source, "split": self.split, "available": self.available,
                "n_examples": len(self.examples), "dropped_too_long": self.dropped_too_long,
                "response_tokens": sum(ex.n_response for ex in self.examples),
                "ids_sha256": hashlib.sha256(ids).hexdigest()[:16], **self.meta}


def chat_pair(source: str, ex: Example) -> tuple[str, str]:
    """(user turn, assistant turn) of one training example of `source`."""
    if ex.response is None:
        raise DataError(f"{ex.id} has no response to train on")
    target = training_target(source)
    return target(ex) if target is not None else (ex.prompt, ex.response)


def encode_pair(tokenizer, user: str, assistant: str) -> tuple[list[int], list[int]]:
    """Token ids of the chat (user + assistant turn) and labels that are -100 on the prompt.

    The prompt is the chat template with the generation prompt; it must render as a prefix of the
    full chat. Ids are taken from the full text when the prompt's ids are a prefix of them, else
    (a token merging across the boundary) the two parts are tokenised separately and joined.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise RecoveryError("the tokenizer has no chat template; recovery trains on chat turns")
    messages = [{"role": "user", "content": user}]
    prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": assistant}],
                                              tokenize=False)
    if not full_text.startswith(prompt_text):
        raise RecoveryError("the chat template does not render the generation prompt as a prefix of the "
                            "conversation, so the response boundary cannot be found")
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
    if full_ids[:len(prompt_ids)] != prompt_ids:
        full_ids = prompt_ids + tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
    labels = [-100] * len(prompt_ids) + full_ids[len(prompt_ids):]
    return full_ids, labels


def _source_examples(source: str, data_dir) -> tuple[list[Example], str | None, dict]:
    if source in ("gsm8k", "mbpp"):
        return load_examples(source, data_dir, "train"), "train", {}
    if source == "codefeedback":
        rows = load_examples("codefeedback", data_dir, "train")
        python = [ex for ex in rows if ex.response and "```python" in ex.response]
        return python, "train", {"filter": "answers with a ```python block", "before_filter": len(rows)}
    path = Path(source)
    if path.suffix in (".jsonl", ".json", ".gz"):
        return load_file(path, "prompt", "response"), None, {"fields": ["prompt", "response"]}
    raise RecoveryError(f"unknown recovery data {source!r}: use math, code, gsm8k, mbpp, codefeedback "
                        "or a .jsonl/.json file with 'prompt' and 'response' fields")


def recovery_examples(task: str, tokenizer, data_dir=None, max_examples: int | None = None, seed: int = 0,
                      max_length: int = 512) -> RecoveryData:
    """Tokenised training examples for `task` ("math", "code") or a data source ("gsm8k", "mbpp",
    "codefeedback", or a JSONL/JSON file with prompt/response fields).

    Examples are visited in a seeded random order and kept while they fit in `max_length` tokens,
    until `max_examples` are kept (all that fit when None); the kept ones are returned in source order.
    """
    source = TASK_DATA.get(task, task)
    items, split, meta = _source_examples(source, data_dir)
    if source == "codefeedback" and max_examples is None:
        max_examples = CODEFEEDBACK_DEFAULT_N
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    kept: list[tuple[int, TrainExample]] = []
    dropped = 0
    for i in order:
        if max_examples is not None and len(kept) >= max_examples:
            break
        ex = items[i]
        if not ex.response:
            dropped += 1
            continue
        ids, labels = encode_pair(tokenizer, *chat_pair(source, ex))
        if len(ids) > max_length or all(x == -100 for x in labels):
            dropped += 1
            continue
        kept.append((i, TrainExample(ex.id, ids, labels)))
    kept.sort(key=lambda t: t[0])
    data = RecoveryData([t[1] for t in kept], source, split, len(items), dropped, meta)
    if not data.examples:
        raise DataError(f"no training examples for {task!r}: {len(items)} available, {dropped} longer than "
                        f"max_length {max_length} or without a response; raise --max-length or check the data")
    return data


def collate(batch: list[TrainExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (-100 on padding)."""
    width = max(len(ex.input_ids) for ex in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ex in enumerate(batch):
        n = len(ex.input_ids)
        ids[row, :n] = torch.tensor(ex.input_ids)
        labels[row, :n] = torch.tensor(ex.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ---------------------------------------------------------------------------------------------
# LoRA


def lora_target_modules(model: nn.Module, requested: tuple[str, ...] = DEFAULT_TARGETS) -> list[str]:
    """The Linear module names in the model to adapt: `requested`, with fused projections
    (`qkv_proj`, `gate_up_proj`) standing in for their parts where the model has them."""
    present = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules()
               if isinstance(mod, nn.Linear) and ".layers." in f".{name}"}
    chosen = {name for name in requested if name in present}
    for fused, parts in FUSED.items():
        if fused in present and (fused in requested or set(parts) & set(requested)):
            chosen.add(fused)
    covered = chosen | {p for fused in chosen & set(FUSED) for p in FUSED[fused]}
    missing = [name for name in requested if name not in covered]
    if not chosen or missing:
        raise RecoveryError(f"target modules {', '.join(missing or requested)} not found among the decoder "
                            f"layers' Linear modules ({', '.join(sorted(present))})")
    return sorted(chosen)


def make_lora_config(model: nn.Module, cfg: RecoveryConfig):
    from peft import LoraConfig  # noqa: PLC0415

    return LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
                      task_type="CAUSAL_LM", target_modules=lora_target_modules(model, cfg.target_modules))


def _lr_lambda(total: int, warmup: int, schedule: str) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        return max(0.0, (total - step) / max(1, total - warmup))
    return f


# ---------------------------------------------------------------------------------------------
# Checkpoints


def work_dir_for(out: Path) -> Path:
    return Path(out).with_name(Path(out).name + ".work")


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(work: Path, peft_model, optimizer, scheduler, state: dict) -> None:
    """Write the checkpoint to `checkpoint.new`, then swap it in (the old one survives a crash)."""
    from peft import get_peft_model_state_dict  # noqa: PLC0415
    from safetensors.torch import save_file  # noqa: PLC0415

    new, cur, old = work / "checkpoint.new", work / "checkpoint", work / "checkpoint.old"
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir(parents=True)
    adapter = {k: v.detach().to("cpu").contiguous() for k, v in get_peft_model_state_dict(peft_model).items()}
    save_file(adapter, str(new / "adapter_model.safetensors"))
    torch.save(optimizer.state_dict(), new / "optimizer.pt")
    torch.save(scheduler.state_dict(), new / "scheduler.pt")
    torch.save(_rng_state(), new / "rng.pt")
    (new / "state.json").write_text(json.dumps(state, indent=1) + "\n")
    shutil.rmtree(old, ignore_errors=True)
    if cur.exists():
        os.replace(cur, old)
    os.replace(new, cur)
    shutil.rmtree(old, ignore_errors=True)


def _find_checkpoint(work: Path) -> Path | None:
    for name in ("checkpoint", "checkpoint.old"):  # .old: a crash between the two renames
        path = work / name
        if (path / "state.json").is_file():
            return path
    return None


def _load_checkpoint(path: Path, peft_model, optimizer, scheduler, device) -> dict:
    from peft import set_peft_model_state_dict  # noqa: PLC0415
    from safetensors.torch import load_file  # noqa: PLC0415

    result = set_peft_model_state_dict(peft_model, load_file(str(path / "adapter_model.safetensors"), device=str(device)))
    if getattr(result, "unexpected_keys", None):
        raise RecoveryError(f"checkpoint {path} does not fit this model (unexpected {result.unexpected_keys[:3]})")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    _set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    return json.loads((path / "state.json").read_text())


# ---------------------------------------------------------------------------------------------
# Training


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen).tolist()


def _step_examples(data: list[TrainExample], cfg: RecoveryConfig, step: int, steps_per_epoch: int) -> list[TrainExample]:
    epoch, k = divmod(step, steps_per_epoch)
    order = _epoch_order(len(data), cfg.seed, epoch)
    return [data[i] for i in order[k * cfg.effective_batch_size:(k + 1) * cfg.effective_batch_size]]


def _train_step(model, batch: list[TrainExample], cfg: RecoveryConfig, pad_id: int, device) -> float:
    """Forward/backward over the micro-batches of one effective batch; returns the token-mean loss."""
    batch = sorted(batch, key=lambda ex: len(ex.input_ids))  # less padding; the sum does not care
    n_tokens = sum(ex.n_response for ex in batch)
    total = 0.0
    for i in range(0, len(batch), cfg.micro_batch_size):
        t = {k: v.to(device) for k, v in collate(batch[i:i + cfg.micro_batch_size], pad_id).items()}
        logits = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"], use_cache=False).logits
        logits = logits[:, :-1].float()
        labels = t["labels"][:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               ignore_index=-100, reduction="sum") / n_tokens
        loss.backward()
        total += loss.item()
        del logits, loss
    return total


def _fingerprint(spec_path: str, cfg: RecoveryConfig, data: RecoveryData, train_dtype: torch.dtype, preset: str) -> dict:
    return {"model": spec_path, "preset": preset, "dtype": str(train_dtype).removeprefix("torch."),
            "config": {k: v for k, v in _config_dict(cfg).items() if k not in _RESUME_FREE},
            "data": data.info()["ids_sha256"], "n_examples": len(data)}


def _config_dict(cfg: RecoveryConfig) -> dict:
    d = asdict(cfg)
    d["target_modules"] = list(d["target_modules"])
    return d


def _check_resume(saved: dict, now: dict, work: Path) -> None:
    diffs = []
    for key in now:
        if key == "config":
            diffs += [f"config.{k}: {saved['config'].get(k)!r} then, {v!r} now"
                      for k, v in now["config"].items() if saved["config"].get(k) != v]
        elif saved.get(key) != now[key]:
            diffs.append(f"{key}: {saved.get(key)!r} then, {now[key]!r} now")
    if diffs:
        raise RecoveryError(f"{work} holds an unfinished recovery with other settings ({'; '.join(diffs)}); "
                            f"rerun with the same settings to resume, or delete {work} to start over")


def _stored_dtype(path: str) -> torch.dtype:
    from transformers import AutoConfig  # noqa: PLC0415

    dtype = getattr(AutoConfig.from_pretrained(path), "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _model_card(record: dict) -> str:
    c, d = record["config"], record["data"]
    return f"""---
library_name: transformers
tags: [taskprune, pruned, lora-recovered]
base_model: {record['base_model']['spec']}
---
# Recovered {record['base_model']['spec']}

LoRA recovery with taskprune {record['taskprune_version']} (preset `{record['preset']}`: r {c['r']}, alpha
{c['alpha']}, lr {c['lr']}, effective batch {c['effective_batch_size']}, {c['epochs']} epochs) on {d['n_examples']}
examples of `{d['source']}`, {record['steps']} optimizer steps, final loss {record['final_loss']:.4f}. The adapter is merged
into the weights; the MLP width stays {record['intermediate_size']}. `recovery.json` has the full record,
`pruning.json` (if present) the pruning that came before, `lora_adapter/` the unmerged adapter.
"""


def recover(model: str, preset: str, out: Path, config: RecoveryConfig | None = None, data_dir=None,
            dtype: str = "auto", device: str | None = None, overwrite: bool = False, progress: bool = True,
            data: str | None = None, cache_dir: Path | None = None,
            on_step: Callable[[int, float], None] | None = None) -> dict:
    """LoRA-fine-tune `model` with `preset` ("code" or "math"), merge, save a stock checkpoint at `out`.

    `config` replaces the preset's settings (start from `dataclasses.replace(PRESETS[preset], ...)`);
    `data` overrides the preset's data set (gsm8k, mbpp, codefeedback or a prompt/response file);
    `on_step(step, loss)` is called after each optimizer step (and its checkpoint, if one is due).
    Returns the recovery record, also written to `out/recovery.json`.
    """
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    from taskprune.models.load import load_model, resolve_dtype, resolve_model_path  # noqa: PLC0415

    if preset not in PRESETS:
        raise RecoveryError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
    cfg = config or PRESETS[preset]
    cfg.validate()
    out = Path(out)
    check_replaceable(out, "recovery", overwrite)
    train_dtype = resolve_dtype(dtype)
    if train_dtype == torch.float16:  # fp16 needs loss scaling, which this loop does not do
        if dtype != "auto":
            raise RecoveryError("float16 training is not supported (no loss scaling); use bfloat16 or float32")
        train_dtype = torch.float32
    started = time.time()

    lm = load_model(model, dtype=str(train_dtype).removeprefix("torch."), device=device, cache_dir=cache_dir)
    base_path = lm.source["path"]
    dev = next(lm.model.parameters()).device
    width = lm.model.config.intermediate_size
    data_set = recovery_examples(data or preset, lm.tokenizer, data_dir, cfg.max_examples, cfg.seed, cfg.max_length)
    examples = data_set.examples
    steps_per_epoch = math.ceil(len(examples) / cfg.effective_batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    warmup = round(cfg.warmup_ratio * total_steps)

    torch.manual_seed(cfg.seed)
    if cfg.gradient_checkpointing:
        lm.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    targets = lora_target_modules(lm.model, cfg.target_modules)
    peft_model = get_peft_model(lm.model, make_lora_config(lm.model, cfg))
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total_steps, warmup, cfg.schedule))
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.tokenizer.eos_token_id

    work = work_dir_for(out)
    fingerprint = _fingerprint(str(base_path), cfg, data_set, train_dtype, preset)
    step, losses, resumed, prior_wall = 0, [], [], 0.0
    ckpt = _find_checkpoint(work)
    if ckpt is not None:
        saved = json.loads((ckpt / "state.json").read_text())
        _check_resume(saved["fingerprint"], fingerprint, work)
        state = _load_checkpoint(ckpt, peft_model, optimizer, scheduler, dev)
        step, losses, resumed, prior_wall = state["step"], state["losses"], state["resumed"], state["wall_time_s"]
        resumed = resumed + [step]
        if progress:
            print(f"Resuming recovery from step {step} of {total_steps} ({ckpt})")
    work.mkdir(parents=True, exist_ok=True)

    session_start = time.time()

    def checkpoint() -> None:
        epoch, k = divmod(step, steps_per_epoch)
        _save_checkpoint(work, peft_model, optimizer, scheduler, {
            "step": step, "epoch": epoch, "sample_position": k * cfg.effective_batch_size,
            "total_steps": total_steps, "losses": losses, "resumed": resumed,
            "wall_time_s": prior_wall + time.time() - session_start, "fingerprint": fingerprint})

    bar = tqdm(total=total_steps, initial=step, desc=f"recover {preset}", unit="step", disable=not progress)
    try:
        while step < total_steps:
            loss = _train_step(peft_model, _step_examples(examples, cfg, step, steps_per_epoch), cfg, pad_id, dev)
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.append(loss)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if step % steps_per_epoch == 0 or (cfg.save_every and step % cfg.save_every == 0):
                checkpoint()
            if on_step is not None:
                on_step(step, loss)
    except BaseException:
        bar.close()
        if progress and step < total_steps:
            print(f"Recovery stopped at step {step}; rerun the same command to resume from the last checkpoint in {work}")
        raise
    bar.close()
    train_wall = prior_wall + time.time() - session_start

    # Merge in fp32 into a fresh load of the checkpoint, then cast back to its stored dtype.
    adapter_state = {k: v.detach().to("cpu", torch.float32) for k, v in get_peft_model_state_dict(peft_model).items()}
    del peft_model, optimizer, scheduler, params, lm.model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    path, _ = resolve_model_path(model, cache_dir)
    save_dtype = _stored_dtype(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(dev)
    merged_peft = get_peft_model(base, make_lora_config(base, cfg))
    set_peft_model_state_dict(merged_peft, {k: v.to(dev) for k, v in adapter_state.items()})
    merged_peft.eval()

    record = {
        "preset": preset, "config": _config_dict(cfg),
        "base_model": {k: lm.source.get(k) for k in ("spec", "kind", "revision", "path")},
        "data": data_set.info(),
        "lora": {"r": cfg.r, "alpha": cfg.alpha, "dropout": cfg.dropout,
                 "target_modules": targets},
        "optimizer": {"name": "AdamW", "lr": cfg.lr, "weight_decay": cfg.weight_decay, "max_grad_norm": cfg.max_grad_norm,
                      "schedule": f"{cfg.schedule} after linear warm-up", "warmup_steps": warmup},
        "grad_accum": cfg.grad_accum, "steps": step, "steps_per_epoch": steps_per_epoch, "epochs": cfg.epochs,
        "first_loss": losses[0], "final_loss": losses[-1], "mean_loss": sum(losses) / len(losses),
        "losses": losses, "resumed_from_steps": resumed, "train_dtype": str(train_dtype).removeprefix("torch."),
        "saved_dtype": str(save_dtype).removeprefix("torch."), "device": str(dev), "intermediate_size": width,
        "trainable_parameters": sum(v.numel() for v in adapter_state.values()),
        "train_wall_time_s": round(train_wall, 3), "taskprune_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }

    with atomic_dir(out, overwrite=overwrite, kind="recovery") as tmp:
        merged_peft.save_pretrained(tmp / "lora_adapter")
        merged = merged_peft.merge_and_unload()
        from taskprune.models.adapters import get_adapter  # noqa: PLC0415

        adapter = get_adapter(merged.config.model_type)
        widths = {adapter.down_proj(mlp).in_features for mlp in adapter.mlps(merged)}
        if merged.config.intermediate_size != width or widths != {width}:
            raise RecoveryError(f"merged model has MLP widths {sorted(widths)} / config "
                                f"{merged.config.intermediate_size}, expected {width}")
        merged.to(save_dtype).save_pretrained(tmp, safe_serialization=True)
        lm.tokenizer.save_pretrained(tmp)
        if (Path(path) / "pruning.json").is_file():
            shutil.copy2(Path(path) / "pruning.json", tmp / "pruning.json")
        record["wall_time_s"] = round(time.time() - started + prior_wall, 3)
        (tmp / "recovery.json").write_text(json.dumps(record, indent=1) + "\n")
        (tmp / "README.md").write_text(_model_card(record))
    shutil.rmtree(work, ignore_errors=True)
    if progress:
        print(f"Recovered checkpoint saved to {out} ({step} steps, final loss {losses[-1]:.4f})")
    return record


def config_from_args(preset: str, **overrides) -> RecoveryConfig:
    """The preset with the non-None `overrides` applied (CLI helper)."""
    if preset not in PRESETS:
        raise RecoveryError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
    names = {f.name for f in fields(RecoveryConfig)}
    unknown = set(overrides) - names
    if unknown:
        raise RecoveryError(f"unknown recovery settings: {', '.join(sorted(unknown))}")
    return replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})
