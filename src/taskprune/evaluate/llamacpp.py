"""The llama.cpp evaluation engine (`--backend llamacpp`): the fast engine on CPUs.

The model is exported to a GGUF in the dtype it runs in (f32, bf16 or f16: no quantization, so the
comparison with the transformers engine is one of engines, not of weights), once per set of weights
(`weights_fingerprint`), into `<cache>/gguf/`, which keeps the `KEEP` most recently used files (a study
makes one per variant). Decoding goes through llama.cpp's batch API, several sequences per decode step,
as its `batched` example does, each sequence in a KV stream of its own (`kv_unified` off: a unified cache
makes every row attend over every other row's cells, then discards them), driven by the same greedy loop as the
transformers engine (`taskprune.evaluate.generate.decode_greedy`): prompts are encoded and outputs
decoded by the Hugging Face tokenizer, and the EOS ids, stop rule, early trap rule, budgets and records
are the transformers engine's. Only the logits come from llama.cpp.

llama-cpp-python is not a dependency of taskprune (no binary wheel exists for every platform): `make gguf`
builds it into .venv-gguf with taskprune, and `.venv-gguf/bin/taskprune` runs this engine.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from taskprune.cache import keep_recent
from taskprune.evaluate.generate import EarlyStop, GenerationRecord, Row, Timings, decode_greedy, eos_token_ids
from taskprune.models import LoadedModel, weights_fingerprint

# The GGUF tensor type and the ggml KV-cache type for each dtype a model runs in (ggml's enum: F32 0,
# F16 1, BF16 30): the cache is kept in the model's dtype, as transformers keeps it.
DTYPES = {torch.float32: ("f32", 0), torch.bfloat16: ("bf16", 30), torch.float16: ("f16", 1)}
KEEP = 2  # GGUF files kept in the cache
N_BATCH = 512  # tokens per llama_decode call (longer prefills are split)


class LlamaCppMissing(ValueError):
    """llama-cpp-python is not installed where taskprune runs."""


def llama_cpp_module():
    try:
        import llama_cpp
    except ImportError:
        raise LlamaCppMissing("--backend llamacpp needs llama.cpp's Python bindings: `make gguf` builds them into "
                              ".venv-gguf; run .venv-gguf/bin/taskprune there, or use --backend hf") from None
    from llama_cpp import _logger
    _logger.set_verbose(False)  # llama.cpp's model-loading chatter; errors still reach stderr
    return llama_cpp


def model_dtype(lm: LoadedModel) -> torch.dtype:
    return next(lm.model.parameters()).dtype


def cached_gguf(lm: LoadedModel, cache_dir: Path, progress: bool = True) -> Path:
    """`lm` as a GGUF in its own dtype under `cache_dir/gguf/`, exported unless these weights were already."""
    from taskprune.export import write_gguf
    dtype = model_dtype(lm)
    if dtype not in DTYPES:
        raise ValueError(f"--backend llamacpp runs f32, bf16 or f16 models, not {dtype}; choose --dtype")
    quant = DTYPES[dtype][0]
    folder = Path(cache_dir) / "gguf"
    path = folder / f"{weights_fingerprint(lm.model)}-{quant}.gguf"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder, prefix=".checkpoint-") as tmp:
            lm.model.save_pretrained(tmp)
            lm.tokenizer.save_pretrained(tmp)
            write_gguf(Path(tmp), path, quant, progress=progress)
    keep_recent(path, folder.glob("*.gguf"), KEEP)
    return path


class _Model:
    """A GGUF loaded by llama.cpp (all layers on the GPU where the build has one)."""

    def __init__(self, path: Path):
        self.llama_cpp = llama = llama_cpp_module()
        llama.llama_backend_init()
        params = llama.llama_model_default_params()
        params.n_gpu_layers = -1 if llama.llama_supports_gpu_offload() else 0
        self.ptr = llama.llama_model_load_from_file(str(path).encode(), params)
        if not self.ptr:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.n_vocab = llama.llama_vocab_n_tokens(llama.llama_model_get_vocab(self.ptr))

    def close(self) -> None:
        if self.ptr:
            self.llama_cpp.llama_model_free(self.ptr)
            self.ptr = None


class LlamaCppDecoder:
    """`taskprune.evaluate.generate.Decoder` on llama.cpp: each running row is a sequence with a KV stream of
    its own of `seq_ctx` tokens; a finished row's sequence is removed from the cache and its id reused.

    llama.cpp computes the rows of consecutive sequence ids in one pass over the weights (a ubatch) and
    splits the rest into more passes, so entries are fed in sequence order and a new row takes the lowest
    free id: while the batch is full every decode step is one pass."""

    def __init__(self, model: _Model, n_seq: int, seq_ctx: int, kv_type: int, threads: int):
        llama = self.llama_cpp = model.llama_cpp
        self.model = model
        params = llama.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = n_seq * seq_ctx, N_BATCH, N_BATCH
        params.n_seq_max, params.kv_unified = n_seq, False
        params.n_threads = params.n_threads_batch = threads
        params.type_k = params.type_v = kv_type
        params.no_perf = True
        self.ctx = llama.llama_init_from_model(model.ptr, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not make a context of {seq_ctx} tokens for each of {n_seq} "
                               f"sequences")
        self.memory = llama.llama_get_memory(self.ctx)
        self.batch = llama.llama_batch_init(N_BATCH, 0, 1)
        self.rows: list[Row] = []
        self.seq: dict[int, int] = {}  # row index -> sequence id
        self.free = set(range(n_seq))

    def close(self) -> None:
        self.llama_cpp.llama_batch_free(self.batch)
        self.llama_cpp.llama_free(self.ctx)

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> dict[int, int]:
        """Feed (token, position, sequence, wants logits) entries; the greedy token of each that wants logits,
        by its sequence (one per sequence)."""
        llama, batch, out = self.llama_cpp, self.batch, {}
        entries = sorted(entries, key=lambda e: (e[2], e[1]))
        for start in range(0, len(entries), N_BATCH):
            chunk = entries[start:start + N_BATCH]
            for i, (token, pos, seq, logits) in enumerate(chunk):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, logits
                batch.seq_id[i][0] = seq
            batch.n_tokens = len(chunk)
            rc = llama.llama_decode(self.ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc} (1: no room in the KV cache)")
            for i, (_, _, seq, logits) in enumerate(chunk):
                if logits:
                    row = np.ctypeslib.as_array(llama.llama_get_logits_ith(self.ctx, i), shape=(self.model.n_vocab,))
                    out[seq] = int(row.argmax())
        return out

    def add(self, rows: list[Row]) -> list[int]:
        entries = []
        for row in rows:
            seq = self.seq[row.index] = min(self.free)
            self.free.remove(seq)
            ids = row.prompt_ids + row.generated
            entries += [(token, pos, seq, pos == len(ids) - 1) for pos, token in enumerate(ids)]
        self.rows += rows
        tokens = self._decode(entries)
        return [tokens[self.seq[row.index]] for row in rows]

    def step(self) -> list[int]:
        tokens = self._decode([(row.generated[-1], len(row.prompt_ids) + len(row.generated) - 1,
                                self.seq[row.index], True) for row in self.rows])
        return [tokens[self.seq[row.index]] for row in self.rows]

    def keep(self, keep: list[int]) -> None:
        kept = set(keep)
        for i, row in enumerate(self.rows):
            if i not in kept:
                seq = self.seq.pop(row.index)
                self.llama_cpp.llama_memory_seq_rm(self.memory, seq, -1, -1)
                self.free.add(seq)
        self.rows = [self.rows[i] for i in keep]


class LlamaCppBackend:
    """The llama.cpp engine over `lm`'s weights (exported on first use)."""

    name = "llamacpp"

    def __init__(self, lm: LoadedModel, cache_dir: Path, progress: bool = True):
        llama_cpp_module()  # fail before exporting anything
        self.lm, self.cache_dir, self.progress = lm, Path(cache_dir), progress
        self.eos_ids = eos_token_ids(lm.model, lm.tokenizer)
        self.kv_type = DTYPES.get(model_dtype(lm), (None, 0))[1]
        self.threads = torch.get_num_threads()
        self._model: _Model | None = None

    def _loaded(self) -> _Model:
        if self._model is None:
            self._model = _Model(cached_gguf(self.lm, self.cache_dir, self.progress))
        return self._model

    def _decoder(self, prompts: list[str], max_new_tokens: int, batch_size: int) -> LlamaCppDecoder:
        """A context of `batch_size` sequences, each holding the longest prompt with its whole budget."""
        longest = max(len(self.lm.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts)
        n_seq = max(1, min(batch_size, len(prompts)))
        return LlamaCppDecoder(self._loaded(), n_seq, -(-(longest + max_new_tokens) // 256) * 256, self.kv_type,
                               self.threads)

    def generate(self, prompts: list[str], max_new_tokens: int, *, batch_size: int = 8, stop=None,
                 progress: bool = True, on_record=None, early: EarlyStop | None = None,
                 timings: Timings | None = None) -> list[GenerationRecord]:
        if not prompts:
            return []
        decoder = self._decoder(prompts, max_new_tokens, batch_size)
        try:
            return decode_greedy(decoder, self.lm.tokenizer, self.eos_ids, prompts, max_new_tokens, batch_size, stop,
                                 progress, on_record, early=early, timings=timings)
        finally:
            decoder.close()

    def tokens_per_second(self, prompts: list[str], new_tokens: int = 64) -> float:
        """Batch-1 decode speed, EOS ignored (as `resources.decode_tokens_per_second` for transformers)."""
        total, seconds = 0, 0.0
        for text in prompts:
            decoder = self._decoder([text], new_tokens, 1)
            try:
                row = Row(index=0, prompt_ids=self.lm.tokenizer(text, add_special_tokens=False)["input_ids"])
                start = time.perf_counter()
                row.generated += decoder.add([row])
                for _ in range(new_tokens - 1):
                    row.generated += decoder.step()
                seconds += time.perf_counter() - start
                total += new_tokens
            finally:
                decoder.close()
        return total / seconds

    def close(self) -> None:
        if self._model is not None:
            self._model.close()
            self._model = None


__all__ = ["DTYPES", "LlamaCppBackend", "LlamaCppDecoder", "LlamaCppMissing", "cached_gguf", "llama_cpp_module"]
