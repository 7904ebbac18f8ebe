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

Several processes. Under `accelerate launch` (one process per GPU; `configs/accelerate/`) each process
holds a copy of the model and trains on its share of every effective batch (the batch sorted by length,
then every n-th example), and the LoRA gradients are summed over the processes once per optimizer step,
before clipping; the effective batch and the token-mean loss stay the preset's, so the run matches the
single-process one up to float rounding (and LoRA dropout, whose masks differ: each process draws its
own). Only the main process writes checkpoints (with every process's RNG state) and the merged model.
A run resumes only with the number of processes it was started with. Without a launcher (no
`WORLD_SIZE` above 1) none of this applies.
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
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from taskprune import __version__
from taskprune.atomic import atomic_dir, check_replaceable
from taskprune.data import Example, load_examples
from taskprune.data.registry import DataError, load_file
from taskprune.evaluate.tasks import gsm8k_solution, mbpp_solution, training_target
from taskprune.models.adapters import DEFAULT_LORA_TARGETS, TargetModuleError, model_adapter
from taskprune.models.batch import pad_batch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["RecoveryConfig", "PRESETS", "RecoveryError", "TrainExample", "RecoveryData", "recover",
           "recovery_examples", "gsm8k_solution", "mbpp_solution", "chat_pair", "encode_pair", "collate",
           "lora_target_modules", "make_lora_config", "work_dir_for"]

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
    target_modules: tuple[str, ...] = DEFAULT_LORA_TARGETS  # the adapter maps them onto fused projections
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


def _preset(preset: str) -> RecoveryConfig:
    """The preset's settings, or an error that names the presets."""
    if preset not in PRESETS:
        raise RecoveryError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
    return PRESETS[preset]


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
    if training_target(source) is not None:  # the training split of a data set a task trains on
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
    padded = pad_batch([ex.input_ids for ex in batch], pad_id, labels=[ex.labels for ex in batch])
    return {"input_ids": padded.input_ids, "attention_mask": padded.attention_mask, "labels": padded.labels}


# ---------------------------------------------------------------------------------------------
# LoRA


def lora_target_modules(model: nn.Module, requested: tuple[str, ...] = DEFAULT_LORA_TARGETS) -> list[str]:
    """The Linear module names in the model to adapt: `requested`, with the fused projections the
    model's adapter knows (Phi-3's `qkv_proj`, `gate_up_proj`) standing in for their parts."""
    try:
        return model_adapter(model).lora_targets(model, requested)
    except TargetModuleError as err:
        raise RecoveryError(str(err)) from None


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
# Processes (one, or those of `accelerate launch`)


@dataclass(frozen=True)
class _Processes:
    """The processes a run is spread over: one (a plain run), or those `accelerate launch` started."""

    rank: int = 0
    count: int = 1
    device: str | None = None  # each process's device when launched; else the caller's choice

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, value: float) -> float:
        """`value` summed over the processes."""
        if self.count == 1:
            return value
        from accelerate.utils import reduce  # noqa: PLC0415

        return reduce(torch.tensor(value, dtype=torch.float64, device=self.device), reduction="sum").item()

    def sum_grads(self, params: list[nn.Parameter]) -> None:
        """Replace each gradient by its sum over the processes (one all-reduce of them all, flattened)."""
        if self.count == 1:
            return
        from accelerate.utils import reduce  # noqa: PLC0415

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        total = reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="sum")
        for p, g in zip(params, total.split([g.numel() for g in grads]), strict=True):
            p.grad = g.view_as(p)

    def gather(self, obj: object) -> list:
        """`obj` of every process, by rank (on every process)."""
        if self.count == 1:
            return [obj]
        from accelerate.utils import gather_object  # noqa: PLC0415

        return gather_object([obj])

    def from_main(self, obj: object) -> object:
        """The main process's `obj`, on every process (after all have reached this point)."""
        if self.count == 1:
            return obj
        from accelerate.utils import broadcast_object_list  # noqa: PLC0415

        return broadcast_object_list([obj])[0]

    def close(self) -> None:
        """Leave the process group now: left to the interpreter's exit, gloo's threads were torn down
        unjoined and a process could abort ("terminate called without an active exception")."""
        if self.count > 1:
            from accelerate import PartialState  # noqa: PLC0415

            PartialState().destroy_process_group()


def _processes(device: str | None) -> _Processes:
    """This run's processes: those of `accelerate launch` (or torchrun) when WORLD_SIZE is above 1, on
    CPUs (gloo) with `device` "cpu", else on the launcher's accelerators."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Processes(device=device)
    from accelerate import PartialState  # noqa: PLC0415

    state = PartialState(cpu=device == "cpu")
    if state.num_processes != world:
        raise RecoveryError(f"launched as {world} processes but accelerate found no distributed backend for "
                            f"{state.device}; on CPUs pass --device cpu")
    return _Processes(state.process_index, state.num_processes, str(state.device))


# ---------------------------------------------------------------------------------------------
# Checkpoints


def work_dir_for(out: Path) -> Path:
    return Path(out).with_name(Path(out).name + ".work")


def _rng_file(rank: int) -> str:
    return "rng.pt" if rank == 0 else f"rng-{rank}.pt"


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(work: Path, trainer: _Trainer, state: dict, rng_states: list[dict]) -> None:
    """Write the checkpoint (`rng_states`: each process's, by rank) to `checkpoint.new`, then swap it in
    (the old one survives a crash)."""
    from safetensors.torch import save_file  # noqa: PLC0415

    new, cur, old = work / "checkpoint.new", work / "checkpoint", work / "checkpoint.old"
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir(parents=True)
    save_file(trainer.adapter_state(None), str(new / "adapter_model.safetensors"))
    torch.save(trainer.optimizer.state_dict(), new / "optimizer.pt")
    torch.save(trainer.scheduler.state_dict(), new / "scheduler.pt")
    for rank, rng in enumerate(rng_states):
        torch.save(rng, new / _rng_file(rank))
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


def _load_checkpoint(path: Path, trainer: _Trainer, device: torch.device, rank: int) -> dict:
    """Restore the adapter, optimizer, scheduler and process `rank`'s RNG states saved at `path`; returns
    its state."""
    from peft import set_peft_model_state_dict  # noqa: PLC0415
    from safetensors.torch import load_file  # noqa: PLC0415

    adapter = load_file(str(path / "adapter_model.safetensors"), device=str(device))
    result = set_peft_model_state_dict(trainer.model, adapter)
    if getattr(result, "unexpected_keys", None):
        raise RecoveryError(f"checkpoint {path} does not fit this model (unexpected {result.unexpected_keys[:3]})")
    trainer.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=True))
    trainer.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    _set_rng_state(torch.load(path / _rng_file(rank), weights_only=True))
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


def _train_step(model, batch: list[TrainExample], cfg: RecoveryConfig, pad_id: int, device,
                procs: _Processes = _Processes()) -> float:
    """Forward/backward over this process's micro-batches of one effective batch (every `procs.count`-th
    example); returns their part of the batch's token-mean loss."""
    batch = sorted(batch, key=lambda ex: len(ex.input_ids))  # less padding; the sum does not care
    n_tokens = sum(ex.n_response for ex in batch)
    share = batch[procs.rank::procs.count]
    total = 0.0
    for i in range(0, len(share), cfg.micro_batch_size):
        t = {k: v.to(device) for k, v in collate(share[i:i + cfg.micro_batch_size], pad_id).items()}
        # Logits only where some row of the micro-batch is supervised (the next token is a response token):
        # the prompt's positions never reach the loss, and vocab-wide logits there are most of the memory.
        cols = (t["labels"][:, 1:] != -100).any(0).nonzero().squeeze(1)
        logits = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"], use_cache=False,
                       logits_to_keep=cols).logits.float()
        labels = t["labels"][:, cols + 1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               ignore_index=-100, reduction="sum") / n_tokens
        loss.backward()
        total += loss.item()
        del logits, loss
    return total


def _fingerprint(spec_path: str, cfg: RecoveryConfig, data: RecoveryData, train_dtype: torch.dtype, preset: str,
                 processes: int) -> dict:
    return {"model": spec_path, "preset": preset, "dtype": str(train_dtype).removeprefix("torch."),
            "config": {k: v for k, v in _config_dict(cfg).items() if k not in _RESUME_FREE},
            "data": data.info()["ids_sha256"], "n_examples": len(data),
            **({"processes": processes} if processes > 1 else {})}


def _config_dict(cfg: RecoveryConfig) -> dict:
    d = asdict(cfg)
    d["target_modules"] = list(d["target_modules"])
    return d


def _check_resume(saved: dict, now: dict, work: Path) -> None:
    diffs = []
    for key in {**saved, **now}:  # a key only one side has ("processes") differs too
        if key == "config":
            diffs += [f"config.{k}: {saved['config'].get(k)!r} then, {v!r} now"
                      for k, v in now["config"].items() if saved["config"].get(k) != v]
        elif saved.get(key) != now.get(key):
            diffs.append(f"{key}: {saved.get(key)!r} then, {now.get(key)!r} now")
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


# ---------------------------------------------------------------------------------------------
# The recipe: setup, resume, train, merge and save (in the manner of torchtune's LoRA recipe)


@dataclass(frozen=True)
class _Setup:
    """What a run fixes before its first step: settings, data, schedule and what its record names."""

    preset: str
    cfg: RecoveryConfig
    data: RecoveryData
    tokenizer: PreTrainedTokenizerBase
    source: dict  # the loaded model's source: spec, kind, revision, path
    train_dtype: torch.dtype
    device: torch.device
    width: int  # MLP width of the pruned model, kept through the merge
    targets: list[str]  # LoRA target modules
    pad_id: int
    steps_per_epoch: int
    total_steps: int
    warmup: int
    procs: _Processes

    @property
    def fingerprint(self) -> dict:
        """What a checkpoint must have been made with to be resumed."""
        return _fingerprint(str(self.source["path"]), self.cfg, self.data, self.train_dtype, self.preset,
                            self.procs.count)


@dataclass
class _Trainer:
    """The LoRA-wrapped model and its optimizer and schedule."""

    model: nn.Module  # a PEFT model
    params: list[nn.Parameter]  # the trainable (LoRA) parameters
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR

    def step(self, batch: list[TrainExample], setup: _Setup) -> float:
        """One optimizer step on one effective batch (this process's share of it); returns its token-mean loss."""
        loss = setup.procs.sum(_train_step(self.model, batch, setup.cfg, setup.pad_id, setup.device, setup.procs))
        setup.procs.sum_grads(self.params)
        if setup.cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, setup.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def adapter_state(self, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        """The LoRA weights on the CPU, in `dtype` (None: as trained)."""
        from peft import get_peft_model_state_dict  # noqa: PLC0415

        return {k: v.detach().to("cpu", dtype).contiguous() for k, v in get_peft_model_state_dict(self.model).items()}


@dataclass
class _Progress:
    """Where training stands; saved with every checkpoint and restored from it."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    resumed: list[int] = field(default_factory=list)  # the step each resumption started from
    prior_wall: float = 0.0  # training seconds of earlier sessions

    def checkpoint_state(self, setup: _Setup, wall: float) -> dict:
        epoch, k = divmod(self.step, setup.steps_per_epoch)
        return {"step": self.step, "epoch": epoch, "sample_position": k * setup.cfg.effective_batch_size,
                "total_steps": setup.total_steps, "losses": self.losses, "resumed": self.resumed,
                "wall_time_s": wall, "fingerprint": setup.fingerprint}


def _train_dtype(dtype: str) -> torch.dtype:
    """The dtype to train in: `dtype` resolved, with "auto" falling back from float16 to float32."""
    from taskprune.models.load import resolve_dtype  # noqa: PLC0415

    train_dtype = resolve_dtype(dtype)
    if train_dtype == torch.float16:  # fp16 needs loss scaling, which this loop does not do
        if dtype != "auto":
            raise RecoveryError("float16 training is not supported (no loss scaling); use bfloat16 or float32")
        return torch.float32
    return train_dtype


def _setup(model: str, preset: str, cfg: RecoveryConfig, data: str | None, data_dir, train_dtype: torch.dtype,
           procs: _Processes, cache_dir: Path | None) -> tuple[_Setup, _Trainer]:
    """Load the model and the training data, fix the schedule, and wrap the model in LoRA (seeded)."""
    from taskprune.models.load import load_model  # noqa: PLC0415

    lm = load_model(model, dtype=str(train_dtype).removeprefix("torch."), device=procs.device, cache_dir=cache_dir)
    data_set = recovery_examples(data or preset, lm.tokenizer, data_dir, cfg.max_examples, cfg.seed, cfg.max_length)
    steps_per_epoch = math.ceil(len(data_set) / cfg.effective_batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    setup = _Setup(preset=preset, cfg=cfg, data=data_set, tokenizer=lm.tokenizer, source=lm.source,
                   train_dtype=train_dtype, device=next(lm.model.parameters()).device,
                   width=lm.model.config.intermediate_size, targets=lora_target_modules(lm.model, cfg.target_modules),
                   pad_id=lm.adapter.pad_id(lm.tokenizer), steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                   warmup=round(cfg.warmup_ratio * total_steps), procs=procs)
    return setup, _lora_trainer(lm.model, setup)


def _lora_trainer(model: nn.Module, setup: _Setup) -> _Trainer:
    """LoRA adapters on `model` (initialised from the seed), AdamW on them and the warm-up schedule."""
    from peft import get_peft_model  # noqa: PLC0415

    cfg = setup.cfg
    torch.manual_seed(cfg.seed)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model = get_peft_model(model, make_lora_config(model, cfg))  # the same adapter in every process
    if setup.procs.rank:  # its own dropout masks
        torch.manual_seed(cfg.seed * 1_000_003 + setup.procs.rank)
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(setup.total_steps, setup.warmup, cfg.schedule))
    return _Trainer(peft_model, params, optimizer, scheduler)


def _resume(setup: _Setup, trainer: _Trainer, work: Path, progress: bool) -> _Progress:
    """The progress of the checkpoint in `work`, with the trainer and RNG restored from it; a fresh start
    without one. A checkpoint made with other settings is refused."""
    ckpt = _find_checkpoint(work)
    if ckpt is None:
        return _Progress()
    saved = json.loads((ckpt / "state.json").read_text())
    _check_resume(saved["fingerprint"], setup.fingerprint, work)
    state = _load_checkpoint(ckpt, trainer, setup.device, setup.procs.rank)
    if progress:
        print(f"Resuming recovery from step {state['step']} of {setup.total_steps} ({ckpt})")
    return _Progress(state["step"], state["losses"], state["resumed"] + [state["step"]], state["wall_time_s"])


def _train(setup: _Setup, trainer: _Trainer, run: _Progress, work: Path, progress: bool,
           on_step: Callable[[int, float], None] | None) -> float:
    """Optimizer steps from `run.step` to the end, with a checkpoint every `save_every` steps and at each
    epoch end; returns the training seconds of all sessions."""
    cfg = setup.cfg
    work.mkdir(parents=True, exist_ok=True)
    session_start = time.time()
    bar = tqdm(total=setup.total_steps, initial=run.step, desc=f"recover {setup.preset}", unit="step",
               disable=not progress)
    try:
        while run.step < setup.total_steps:
            loss = trainer.step(_step_examples(setup.data.examples, cfg, run.step, setup.steps_per_epoch), setup)
            run.step += 1
            run.losses.append(loss)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{trainer.scheduler.get_last_lr()[0]:.2e}")
            if run.step % setup.steps_per_epoch == 0 or (cfg.save_every and run.step % cfg.save_every == 0):
                _checkpoint(setup, trainer, run, work, run.prior_wall + time.time() - session_start)
            if on_step is not None:
                on_step(run.step, loss)
    except BaseException:
        bar.close()
        if progress and run.step < setup.total_steps:
            print(f"Recovery stopped at step {run.step}; rerun the same command to resume from the last checkpoint "
                  f"in {work}")
        raise
    bar.close()
    return run.prior_wall + time.time() - session_start


def _checkpoint(setup: _Setup, trainer: _Trainer, run: _Progress, work: Path, wall: float) -> None:
    """Every process's RNG state to the main process, which writes the checkpoint."""
    rng_states = setup.procs.gather(_rng_state())
    if setup.procs.is_main:
        _save_checkpoint(work, trainer, run.checkpoint_state(setup, wall), rng_states)


def _reload_with_adapter(setup: _Setup, adapter_state: dict[str, torch.Tensor], path: str) -> nn.Module:
    """A fresh fp32 load of the pruned checkpoint at `path` with the trained adapter set on it (unmerged)."""
    from peft import get_peft_model, set_peft_model_state_dict  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(setup.device)
    peft_model = get_peft_model(base, make_lora_config(base, setup.cfg))
    set_peft_model_state_dict(peft_model, {k: v.to(setup.device) for k, v in adapter_state.items()})
    return peft_model.eval()


def _record(setup: _Setup, run: _Progress, adapter_state: dict[str, torch.Tensor], train_wall: float,
            save_dtype: torch.dtype) -> dict:
    cfg = setup.cfg
    return {
        "preset": setup.preset, "config": _config_dict(cfg),
        "base_model": {k: setup.source.get(k) for k in ("spec", "kind", "revision", "path")},
        "data": setup.data.info(),
        "lora": {"r": cfg.r, "alpha": cfg.alpha, "dropout": cfg.dropout, "target_modules": setup.targets},
        "optimizer": {"name": "AdamW", "lr": cfg.lr, "weight_decay": cfg.weight_decay,
                      "max_grad_norm": cfg.max_grad_norm, "schedule": f"{cfg.schedule} after linear warm-up",
                      "warmup_steps": setup.warmup},
        "grad_accum": cfg.grad_accum, "steps": run.step, "steps_per_epoch": setup.steps_per_epoch, "epochs": cfg.epochs,
        "first_loss": run.losses[0], "final_loss": run.losses[-1], "mean_loss": sum(run.losses) / len(run.losses),
        "losses": run.losses, "resumed_from_steps": run.resumed,
        "train_dtype": str(setup.train_dtype).removeprefix("torch."),
        "saved_dtype": str(save_dtype).removeprefix("torch."), "device": str(setup.device),
        **({"processes": setup.procs.count} if setup.procs.count > 1 else {}),
        "intermediate_size": setup.width, "trainable_parameters": sum(v.numel() for v in adapter_state.values()),
        "train_wall_time_s": round(train_wall, 3), "taskprune_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _check_width(merged: nn.Module, width: int) -> None:
    """The merged model keeps the pruned MLP width, in its config and in every layer."""
    adapter = model_adapter(merged)
    widths = {adapter.down_proj(mlp).in_features for mlp in adapter.mlps(merged)}
    if merged.config.intermediate_size != width or widths != {width}:
        raise RecoveryError(f"merged model has MLP widths {sorted(widths)} / config "
                            f"{merged.config.intermediate_size}, expected {width}")


def _merge_and_save(setup: _Setup, adapter_state: dict[str, torch.Tensor], run: _Progress, train_wall: float,
                    model: str, cache_dir: Path | None, out: Path, overwrite: bool, started: float) -> dict:
    """Merge the adapter in fp32 into a fresh load of the pruned checkpoint, cast back to its stored dtype,
    and save it atomically at `out` with the tokenizer, the unmerged adapter, the pruned input's
    pruning.json, recovery.json and a model card. Returns the recovery record."""
    from taskprune.models.load import resolve_model_path  # noqa: PLC0415

    path, _ = resolve_model_path(model, cache_dir)
    save_dtype = _stored_dtype(path)
    peft_model = _reload_with_adapter(setup, adapter_state, path)
    record = _record(setup, run, adapter_state, train_wall, save_dtype)
    with atomic_dir(out, overwrite=overwrite, kind="recovery") as tmp:
        peft_model.save_pretrained(tmp / "lora_adapter")
        merged = peft_model.merge_and_unload()
        _check_width(merged, setup.width)
        merged.to(save_dtype).save_pretrained(tmp, safe_serialization=True)
        setup.tokenizer.save_pretrained(tmp)
        if (Path(path) / "pruning.json").is_file():
            shutil.copy2(Path(path) / "pruning.json", tmp / "pruning.json")
        record["wall_time_s"] = round(time.time() - started + run.prior_wall, 3)
        (tmp / "recovery.json").write_text(json.dumps(record, indent=1) + "\n")
        (tmp / "README.md").write_text(_model_card(record))
    return record


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def recover(model: str, preset: str, out: Path, config: RecoveryConfig | None = None, data_dir=None,
            dtype: str = "auto", device: str | None = None, overwrite: bool = False, progress: bool = True,
            data: str | None = None, cache_dir: Path | None = None,
            on_step: Callable[[int, float], None] | None = None) -> dict:
    """LoRA-fine-tune `model` with `preset` ("code" or "math"), merge, save a stock checkpoint at `out`.

    `config` replaces the preset's settings (start from `dataclasses.replace(PRESETS[preset], ...)`);
    `data` overrides the preset's data set (gsm8k, mbpp, codefeedback or a prompt/response file);
    `on_step(step, loss)` is called after each optimizer step (and its checkpoint, if one is due).
    Returns the recovery record, also written to `out/recovery.json`. Launched by `accelerate launch`,
    every process trains its share and the main one saves; `device` is then each process's own.
    """
    preset_config = _preset(preset)  # an unknown preset is refused even with a config
    cfg = config or preset_config
    cfg.validate()
    out = Path(out)
    check_replaceable(out, "recovery", overwrite)
    train_dtype = _train_dtype(dtype)
    started = time.time()
    procs = _processes(device)
    progress = progress and procs.is_main
    setup, trainer = _setup(model, preset, cfg, data, data_dir, train_dtype, procs, cache_dir)
    work = work_dir_for(out)
    run = _resume(setup, trainer, work, progress)
    train_wall = _train(setup, trainer, run, work, progress, on_step)
    adapter_state = trainer.adapter_state(torch.float32)
    del trainer  # the training model and optimizer go before the fresh load for the merge
    _release_memory()
    record = None
    if procs.is_main:
        record = _merge_and_save(setup, adapter_state, run, train_wall, model, cache_dir, out, overwrite, started)
        shutil.rmtree(work, ignore_errors=True)
    record = procs.from_main(record)
    procs.close()
    if progress:
        print(f"Recovered checkpoint saved to {out} ({run.step} steps, final loss {run.losses[-1]:.4f})")
    return record


def config_from_args(preset: str, **overrides) -> RecoveryConfig:
    """The preset with the non-None `overrides` applied (CLI helper)."""
    preset_config = _preset(preset)
    names = {f.name for f in fields(RecoveryConfig)}
    unknown = set(overrides) - names
    if unknown:
        raise RecoveryError(f"unknown recovery settings: {', '.join(sorted(unknown))}")
    return replace(preset_config, **{k: v for k, v in overrides.items() if v is not None})
