"""The vLLM evaluation engine (`--backend vllm`): vLLM computes the greedy tokens, taskprune's loop decides.

vLLM decodes every prompt greedily (temperature 0) to the token budget, ending a sequence only on
the same EOS ids as the transformers engine (`ignore_eos` with those ids as `stop_token_ids`, so
vLLM's own idea of EOS cannot differ). The tokens are then replayed through the one greedy loop
every engine shares (`decode_greedy`), which applies the budget, the stop criterion and the early
trap rule exactly as for the other engines and makes the same records; vLLM has decoded past an
early end for nothing, which costs time but never changes a record. Prompts go in as token ids
encoded by taskprune's tokenizer, so both engines see the same ids. Records stream to the caller
a chunk of prompts (four batches) at a time, so a killed run resumes with little lost. Multiple
choice scores with vLLM's prompt log-probabilities (`continuation_logprobs`), tokenised as for
transformers.

vLLM has its own pins (`torch==2.13.0`, `transformers<5.20`), so it lives in `.venv-vllm`
(`make vllm`: the CPU build here, `VLLM_SPEC=vllm` for CUDA); run `.venv-vllm/bin/taskprune`. On this
project's 2-core CPUs it is a compatibility check, not a fast path (eager mode; its compiled warm-up
took over 10 minutes). A variant in memory (a study's pruned model) is saved once per set of
weights under `<cache>/vllm/` (the two most recent kept) for vLLM to load.
"""

from __future__ import annotations

import gc
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import psutil
import torch

from taskprune.cache import keep_recent
from taskprune.evaluate.generate import EarlyStop, GenerationRecord, Row, Timings, decode_greedy, eos_token_ids
from taskprune.models import LoadedModel, weights_fingerprint

KEEP = 2  # saved variants kept under <cache>/vllm
ALIGN = 128  # vLLM's tensor-parallel shards of the MLP: its width a multiple of this times the shards
CHUNK_BATCHES = 4  # prompts handed to vLLM at once, in batches: records stream out after each chunk
DTYPES = {"torch.float32": "float32", "torch.bfloat16": "bfloat16", "torch.float16": "float16"}


class VllmMissing(ValueError):
    """vLLM is not installed where taskprune runs."""


def vllm_module():
    try:
        import vllm
    except ImportError:
        raise VllmMissing("--backend vllm needs vLLM: `make vllm` installs it into .venv-vllm; run "
                          ".venv-vllm/bin/taskprune there, or use --backend hf") from None
    return vllm


def check_width(config, tensor_parallel_size: int = 1) -> None:
    """Refuse an MLP width vLLM cannot shard evenly over `tensor_parallel_size` devices."""
    width, unit = config.intermediate_size, ALIGN * tensor_parallel_size
    if width % unit:
        raise ValueError(f"--backend vllm needs the MLP width to be a multiple of {ALIGN} x tensor_parallel_size "
                         f"= {unit}; this model's is {width}: prune with --align {unit}, or use --backend hf")


def model_dir(lm: LoadedModel, cache_dir: Path) -> Path:
    """A Hugging Face directory holding `lm`'s weights as they are in memory (whatever was done to them since
    loading), saved under `cache_dir/vllm/` once per set of weights."""
    folder = Path(cache_dir) / "vllm"
    target = folder / weights_fingerprint(lm.model)
    if not (target / "config.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".save-"))
        lm.model.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    keep_recent(target, (p for p in folder.iterdir() if not p.name.startswith(".")), KEEP)
    return target


class _Replay:
    """A `Decoder` that hands out tokens already computed (by vLLM), row by row, for `decode_greedy`."""

    def __init__(self, tokens: list[list[int]]):
        self.tokens, self.rows = tokens, []

    def _next(self, row: Row) -> int:
        made = self.tokens[row.index]
        if len(row.generated) >= len(made):
            raise RuntimeError(f"vLLM ended prompt {row.index} after {len(made)} tokens, before the budget or an "
                               f"EOS id (its context length?)")
        return made[len(row.generated)]

    def add(self, rows: list[Row]) -> list[int]:
        self.rows.extend(rows)
        return [self._next(r) for r in rows]

    def step(self) -> list[int]:
        return [self._next(r) for r in self.rows]

    def keep(self, keep: list[int]) -> None:
        self.rows = [self.rows[i] for i in keep]


CPU_MEMORY_SHARE = 0.8  # of the RAM available when the engine starts


def cpu_memory_share() -> float:
    """vLLM's `gpu_memory_utilization` on a CPU, where it is the share of the machine's RAM the engine
    reserves (default 0.92, refused at start whenever other processes hold more than 8%): 80% of what is
    available now, so the engine starts beside a study or a test run."""
    vm = psutil.virtual_memory()
    return round(CPU_MEMORY_SHARE * vm.available / vm.total, 3)


class VllmBackend:
    """The vLLM engine over `lm`'s weights and dtype (loaded on first use, kept for later calls), on one
    device: tensor parallelism is not offered yet (`check_width` says what it would need)."""

    name = "vllm"
    # `--batch-size auto`: vLLM admits rows as its KV-cache blocks allow, up to its default max_num_seqs.
    schedules_batch = 256

    def __init__(self, lm: LoadedModel, cache_dir: Path, progress: bool = True):
        vllm_module()  # fail before saving anything
        check_width(lm.model.config)
        dtype = str(next(lm.model.parameters()).dtype)
        if dtype not in DTYPES:
            raise ValueError(f"--backend vllm runs float32, bfloat16 or float16 models, not {dtype}; choose --dtype")
        self.lm, self.cache_dir, self.progress, self.dtype = lm, Path(cache_dir), progress, DTYPES[dtype]
        self.eos_ids = eos_token_ids(lm.model, lm.tokenizer)
        self._llm, self._shape = None, None

    def _engine(self, max_len: int, batch_size: int):
        """vLLM's `LLM`, made again only when a call needs longer sequences or a bigger batch."""
        if self._llm is None or max_len > self._shape[0] or batch_size > self._shape[1]:
            self.close()
            vllm = vllm_module()
            max_len = min(max(max_len, 2048), self.lm.model.config.max_position_embeddings)
            # Eager on CPUs (vLLM's compiled CPU warm-up took over 10 minutes here); CUDA graphs on GPUs.
            on_gpu = torch.cuda.is_available()
            self._llm = vllm.LLM(model=str(model_dir(self.lm, self.cache_dir)), dtype=self.dtype,
                                 max_model_len=max_len, max_num_seqs=batch_size, enforce_eager=not on_gpu,
                                 seed=0, **({} if on_gpu else {"gpu_memory_utilization": cpu_memory_share()}))
            self._shape = (max_len, batch_size)
        return self._llm

    def _tokens(self, ids: list[list[int]], max_new_tokens: int, batch_size: int) -> list[list[int]]:
        """vLLM's greedy tokens for each prompt's `ids`, to the budget or one of our EOS ids."""
        vllm = vllm_module()
        llm = self._engine(max(map(len, ids)) + max_new_tokens, batch_size)
        params = vllm.SamplingParams(temperature=0.0, max_tokens=max_new_tokens, ignore_eos=True,
                                     stop_token_ids=sorted(self.eos_ids), detokenize=False)
        outputs = llm.generate([{"prompt_token_ids": p} for p in ids], params, use_tqdm=self.progress)
        return [list(o.outputs[0].token_ids) for o in outputs]

    def generate(self, prompts: list[str], max_new_tokens: int, *, batch_size: int = 8, stop=None,
                 progress: bool = True, on_record=None, early: EarlyStop | None = None,
                 timings: Timings | None = None) -> list[GenerationRecord]:
        """The Backend protocol's generate; `timings` stays empty (vLLM schedules its own steps)."""
        records: list[GenerationRecord] = []
        chunk = CHUNK_BATCHES * batch_size
        for start in range(0, len(prompts), chunk):
            part = prompts[start:start + chunk]
            ids = [self.lm.tokenizer(p, add_special_tokens=False)["input_ids"] for p in part]
            began = time.perf_counter()
            tokens = self._tokens(ids, max_new_tokens, batch_size)
            per_token = (time.perf_counter() - began) / max(1, sum(map(len, tokens)))

            def placed(r: GenerationRecord, start=start, tokens=tokens, per_token=per_token) -> GenerationRecord:
                # Its place in `prompts`, and its share of vLLM's time by the tokens vLLM made for it.
                return replace(r, index=start + r.index, seconds=per_token * len(tokens[r.index]))

            done = decode_greedy(_Replay(tokens), self.lm.tokenizer, self.eos_ids, part, max_new_tokens, batch_size,
                                 stop, False, on_record and (lambda r, placed=placed: on_record(placed(r))),
                                 early=early)
            records += [placed(r) for r in done]
        return records

    def continuation_logprobs(self, rows: list[list[int]], n_cont: list[int]) -> list[tuple[float, bool]]:
        """(sum of the log-probabilities of the last `n_cont[i]` tokens of `rows[i]` given what precedes them,
        whether each is the most probable token there) from vLLM's prompt log-probabilities (fp32 log-softmax
        of the logits): multiple choice on this engine (taskprune.evaluate.multiple_choice)."""
        vllm = vllm_module()
        llm = self._engine(max(map(len, rows)) + 1, self._shape[1] if self._shape else 8)
        params = vllm.SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0, detokenize=False)
        outputs = llm.generate([{"prompt_token_ids": r} for r in rows], params, use_tqdm=self.progress)
        results = []
        for row, n, out in zip(rows, n_cont, outputs, strict=True):
            scored = [out.prompt_logprobs[pos][row[pos]] for pos in range(len(row) - n, len(row))]
            results.append((sum(s.logprob for s in scored), all(s.rank == 1 for s in scored)))
        return results

    def tokens_per_second(self, prompts: list[str], new_tokens: int = 64) -> float:
        """Batch-1 decode speed, EOS ignored (as `resources.decode_tokens_per_second` for transformers)."""
        vllm = vllm_module()
        ids = [self.lm.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        llm = self._engine(max(map(len, ids)) + new_tokens, 1)
        params = vllm.SamplingParams(temperature=0.0, max_tokens=new_tokens, min_tokens=new_tokens,
                                     ignore_eos=True, detokenize=False)
        total, seconds = 0, 0.0
        for p in ids:
            start = time.perf_counter()
            out = llm.generate([{"prompt_token_ids": p}], params, use_tqdm=False)
            seconds += time.perf_counter() - start
            total += len(out[0].outputs[0].token_ids)
        return total / seconds

    def close(self) -> None:
        if self._llm is not None:
            self._llm = None
            gc.collect()


__all__ = ["VllmBackend", "VllmMissing", "check_width", "model_dir", "vllm_module"]
