"""A (pruned) checkpoint as one GGUF file for llama.cpp, Ollama and LM Studio.

Written with the `gguf` library (`GGUFWriter`, its tensor-name maps and quantizers), with the tensor
layout, metadata and tokenizer export of llama.cpp's own `convert_hf_to_gguf.py`:

* tensors: HF names mapped by `gguf.get_tensor_name_map`; Llama's q/k rows permuted into llama.cpp's
  rotary layout; Gemma's zero-centred norms stored as `1 + w`; 1-D tensors, norms and biases in F32,
  the rest in the chosen type (Q8_0 needs rows divisible by 32, else that tensor falls back to F16);
  tied embeddings write no `output.weight` (llama.cpp then reuses `token_embd`); Llama 3 rope scaling
  as a `rope_freqs` tensor.
* metadata: block count, context and embedding length, `feed_forward_length` (the pruned width: every
  layer must have it), head counts, rope base and scaling, RMS epsilon, file type; the tokenizer
  (tokens, token types, merges or scores, pre-tokenizer, BOS/EOS/pad ids, add-BOS, chat template);
  and the pruning record's essentials under `taskprune.*`.

Tensors are streamed: their table is written first, then one tensor at a time is read from the
safetensors, converted and appended, so memory holds one tensor, not the model. The file is built
under a temporary name beside the output and renamed into place when complete.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_k_m")
# f16 is llama.cpp's converter default: half the bytes of f32 at a precision no task score notices, and
# fast on every CPU llama.cpp targets (bf16 is as small but slow on CPUs without native bf16).
DEFAULT_QUANT = "f16"


class ExportError(ValueError):
    """A checkpoint or option the export cannot use; the message names the fix."""


@dataclass(frozen=True)
class _Arch:
    """How llama.cpp's converter treats one HF `model_type`."""

    name: str  # gguf.MODEL_ARCH member
    permute_qk: bool = False  # llama: q/k rows into llama.cpp's rotary layout
    norm_offset: float = 0.0  # gemma: HF norms multiply by (1 + w); llama.cpp stores 1 + w
    drop_lm_head: bool = False  # gemma: the head is always the embedding


ARCHS: dict[str, _Arch] = {
    "qwen2": _Arch("QWEN2"),
    "qwen3": _Arch("QWEN3"),
    "llama": _Arch("LLAMA", permute_qk=True),
    "mistral": _Arch("LLAMA", permute_qk=True),  # llama.cpp runs Mistral as its llama architecture
    "gemma": _Arch("GEMMA", norm_offset=1.0, drop_lm_head=True),
    "gemma2": _Arch("GEMMA2", norm_offset=1.0, drop_lm_head=True),
}

# The converter's probe text: its token ids' hash names the BPE pre-tokenizer (`tokenizer.ggml.pre`).
_CHKTXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 '
           '33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
           '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
           '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
# Hashes of the families exported here, as llama.cpp's converter lists them.
_PRE_BY_HASH = {
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 ... Qwen2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3.x
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}
# A tokenizer not in that list (a derived or synthetic one) is recognised by its split regex, which is
# what a llama.cpp pre-tokenizer type stands for.
_PRE_BY_REGEX = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
}


def supported() -> str:
    return ", ".join(ARCHS)


# -- the checkpoint --------------------------------------------------------------------------------


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _weight_files(ckpt: Path) -> list[Path]:
    """The checkpoint's own safetensors (never a `lora_adapter/` beside them)."""
    index = _read_json(ckpt / "model.safetensors.index.json")
    if index is not None:
        return [ckpt / name for name in dict.fromkeys(index["weight_map"].values())]
    if (ckpt / "model.safetensors").is_file():
        return [ckpt / "model.safetensors"]
    raise ExportError(f"{ckpt} has no model.safetensors (or model.safetensors.index.json); export reads a "
                      f"checkpoint saved by taskprune prune/recover or save_pretrained(safe_serialization=True)")


class _Tensors:
    """Names, shapes and lazy loads of a checkpoint's tensors, across its safetensors shards."""

    def __init__(self, ckpt: Path):
        from safetensors import safe_open
        self._handles, self.shapes, self._where = [], {}, {}
        for path in _weight_files(ckpt):
            handle = safe_open(str(path), framework="pt")
            self._handles.append(handle)
            for name in handle.keys():
                self.shapes[name] = tuple(handle.get_slice(name).get_shape())
                self._where[name] = handle

    def load(self, name: str) -> np.ndarray:
        import torch
        return self._where[name].get_tensor(name).to(torch.float32).numpy()


def _block_of(name: str) -> int | None:
    return next((int(part) for part in name.split(".") if part.isdecimal()), None)


# -- tensors ---------------------------------------------------------------------------------------


def _permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """HF's rotary layout of q/k rows into llama.cpp's (the converter's `LlamaModel.permute`)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_rope_factors(hp: dict, rope: dict) -> np.ndarray:
    """The converter's `rope_freqs` for Llama 3 rope scaling."""
    base = rope.get("rope_theta", hp.get("rope_theta", 10000.0))
    dim = hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"]
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old / low, old / high
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


@dataclass
class _Planned:
    gguf_name: str
    shape: tuple[int, ...]
    qtype: object  # gguf.GGMLQuantizationType
    load: Callable[[], np.ndarray]


def _qtype(gguf_name: str, shape: tuple[int, ...], want):
    """The converter's choice: F32 for 1-D tensors, norms and anything not a `.weight`; else `want`,
    or F16 where a block quantizer cannot cut the rows."""
    import gguf
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight"):
        return gguf.GGMLQuantizationType.F32
    if want in gguf.GGML_QUANT_SIZES and want not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
                                                      gguf.GGMLQuantizationType.BF16):
        block, _ = gguf.GGML_QUANT_SIZES[want]
        if shape[-1] % block:
            return gguf.GGMLQuantizationType.F16
    return want


def _rope(hp: dict) -> dict:
    """The rope parameters as the converter reads them (`rope_parameters`, else `rope_scaling`, with
    the root `rope_theta` mirrored)."""
    rope = dict(hp.get("rope_parameters") or hp.get("rope_scaling") or {})
    rope = dict(rope.get("full_attention", rope))
    if "rope_theta" not in rope and hp.get("rope_theta") is not None:
        rope["rope_theta"] = hp["rope_theta"]
    if "rope_type" not in rope and rope.get("type") is not None:
        rope["rope_type"] = rope["type"]
    return rope


def _plan_tensors(tensors: _Tensors, hp: dict, arch: _Arch, want) -> list[_Planned]:
    import gguf
    n_layers = hp["num_hidden_layers"]
    tmap = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.name), n_layers)
    tied = bool(hp.get("tie_word_embeddings")) or arch.drop_lm_head
    n_head, n_kv = hp["num_attention_heads"], hp.get("num_key_value_heads", hp["num_attention_heads"])
    planned: list[_Planned] = []
    rope = _rope(hp)
    if arch.permute_qk and str(rope.get("rope_type", "")).lower() == "llama3":
        factors = _llama3_rope_factors(hp, rope)
        planned.append(_Planned("rope_freqs.weight", factors.shape, gguf.GGMLQuantizationType.F32, lambda: factors))

    def order(name: str):
        block = _block_of(name)
        return (0 if "embed" in name else 1 if block is not None else 2, block or 0, name)

    for name in sorted(tensors.shapes, key=order):
        if name.endswith((".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")):
            continue
        if name == "lm_head.weight" and (tied or arch.drop_lm_head):
            continue  # the embedding is the head: llama.cpp reuses token_embd when output.weight is absent
        gguf_name = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ExportError(f"tensor {name!r} has no GGUF name in llama.cpp's {arch.name.lower()} architecture; "
                              f"is this a stock {hp['model_type']} checkpoint?")
        shape = tensors.shapes[name]

        def load(name=name):
            data = tensors.load(name)
            if arch.permute_qk and name.endswith(("q_proj.weight", "q_proj.bias")):
                data = _permute(data, n_head, n_head)
            elif arch.permute_qk and name.endswith(("k_proj.weight", "k_proj.bias")):
                data = _permute(data, n_head, n_kv)
            if arch.norm_offset and name.endswith("norm.weight"):
                data = data + np.float32(arch.norm_offset)
            return data

        planned.append(_Planned(gguf_name, shape, _qtype(gguf_name, shape, want), load))
    _check_widths(planned, hp)
    return planned


def _check_widths(planned: list[_Planned], hp: dict) -> None:
    """Every layer's MLP has the config's width: GGUF holds one feed_forward_length for all of them."""
    d_ff = hp.get("intermediate_size")
    widths = {}
    for t in planned:
        m = re.fullmatch(r"blk\.(\d+)\.ffn_(gate|up|down)\.weight", t.gguf_name)
        if m:
            widths[(int(m[1]), m[2])] = t.shape[1] if m[2] == "down" else t.shape[0]
    odd = sorted({w for w in widths.values() if w != d_ff})
    if odd or not widths:
        raise ExportError(f"the MLP widths in the weights ({', '.join(map(str, odd)) or 'none found'}) are not the "
                          f"config's intermediate_size {d_ff} in every layer; GGUF needs one width for all layers "
                          f"(a taskprune checkpoint has it: re-save the checkpoint with taskprune prune)")


# -- metadata --------------------------------------------------------------------------------------


def _hparams(w, hp: dict, arch: _Arch, file_type: int) -> None:
    """The architecture's keys, as the converter's `set_gguf_parameters` writes them."""
    import gguf
    n_head = hp["num_attention_heads"]
    n_kv = hp.get("num_key_value_heads", n_head)
    w.add_block_count(hp["num_hidden_layers"])
    w.add_context_length(hp["max_position_embeddings"])
    w.add_embedding_length(hp["hidden_size"])
    w.add_feed_forward_length(hp["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    rope = _rope(hp)
    if arch.name.startswith("GEMMA"):
        w.add_key_length(hp["head_dim"])
        w.add_value_length(hp["head_dim"])
        w.add_rope_freq_base(rope.get("rope_theta", 10000.0))
        if arch.name == "GEMMA2":
            w.add_attn_logit_softcapping(hp["attn_logit_softcapping"])
            w.add_final_logit_softcapping(hp["final_logit_softcapping"])
            w.add_sliding_window(hp["sliding_window"])
        w.add_file_type(file_type)
        return
    rope_type = str(rope.get("rope_type") or "default").lower()
    if rope_type == "linear" and rope.get("factor") is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    elif rope_type == "yarn" and rope.get("factor") is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        for key, add in (("extrapolation_factor", w.add_rope_scaling_yarn_ext_factor),
                         ("attention_factor", w.add_rope_scaling_yarn_attn_factor),
                         ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
            if rope.get(key) is not None:
                add(rope[key])
    elif rope_type == "llama3" and arch.permute_qk:
        pass  # the rope_freqs tensor carries it
    elif rope_type != "default":
        raise ExportError(f"rope scaling {rope_type!r} is not exported (supported: none, linear, yarn, llama3)")
    if rope.get("rope_theta") is not None:
        w.add_rope_freq_base(rope["rope_theta"])
    if hp.get("head_dim") is not None:
        w.add_key_length(hp["head_dim"])
        w.add_value_length(hp["head_dim"])
    if arch.name == "LLAMA":
        w.add_vocab_size(hp["vocab_size"])
        w.add_rope_dimension_count(hp.get("head_dim") or hp["hidden_size"] // n_head)
    w.add_file_type(file_type)


def _taskprune_keys(w, ckpt: Path, exported_as: str) -> dict:
    """The pruning (and recovery) record's essentials under `taskprune.*`; returns the pruning record."""
    from taskprune import __version__
    record = _read_json(ckpt / "pruning.json")
    w.add_string("taskprune.exported_by", f"taskprune {__version__}")
    w.add_string("taskprune.export_type", exported_as)
    w.add_bool("taskprune.pruned", record is not None)
    if record is not None:
        plan, source = record["plan"], record.get("source_model") or {}
        w.add_string("taskprune.version", str(record.get("taskprune_version", "")) or "unknown")
        w.add_string("taskprune.source_model", str(source.get("spec") or "unknown"))
        if source.get("revision"):
            w.add_string("taskprune.source_revision", str(source["revision"]))
        w.add_string("taskprune.strategy", plan["strategy"])
        w.add_string("taskprune.scorer", record.get("scorer") or "none")
        w.add_float64("taskprune.ratio_nominal", float(plan["ratio_nominal"]))
        w.add_float64("taskprune.ratio_exact", float(plan["ratio_exact"]))
        w.add_uint32("taskprune.d_ff", int(plan["d_ff"]))
        w.add_uint32("taskprune.kept_width", int(plan["kept_width"]))
        w.add_uint32("taskprune.pruned_per_layer", int(plan["pruned_per_layer"]))
        w.add_uint32("taskprune.align", int(plan["align"]))
        if plan.get("seed") is not None:
            w.add_int64("taskprune.seed", int(plan["seed"]))
        profile = record.get("profile") or {}
        if profile.get("target"):
            w.add_string("taskprune.target", str(profile["target"]))
            w.add_array("taskprune.distractors", [str(d) for d in profile.get("distractors") or []])
        params = record.get("parameters") or {}
        if params:
            w.add_uint64("taskprune.parameters_before", int(params["before"]))
            w.add_uint64("taskprune.parameters_after", int(params["after"]))
    recovery = _read_json(ckpt / "recovery.json")
    if recovery is not None:
        w.add_string("taskprune.recovery.preset", str(recovery.get("preset")))
        w.add_uint32("taskprune.recovery.steps", int(recovery.get("steps", 0)))
        if recovery.get("final_loss") is not None:
            w.add_float64("taskprune.recovery.final_loss", float(recovery["final_loss"]))
    return record or {}


# -- tokenizer -------------------------------------------------------------------------------------


def _looks_special(token: str) -> bool:
    """The converter's `does_token_look_special`."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>")) or (token.startswith("<unused") and token.endswith(">")))


def _bpe_pre(tokenizer, tokenizer_json: dict) -> str:
    """`tokenizer.ggml.pre`: the converter's hash of the probe text's ids, else the split regex."""
    digest = hashlib.sha256(str(tokenizer.encode(_CHKTXT)).encode()).hexdigest()
    if digest in _PRE_BY_HASH:
        return _PRE_BY_HASH[digest]
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    for step in steps:
        if step.get("type") == "Split" and step.get("pattern", {}).get("Regex") in _PRE_BY_REGEX:
            return _PRE_BY_REGEX[step["pattern"]["Regex"]]
    if len(steps) == 1 and steps[0].get("type") == "ByteLevel" and steps[0].get("use_regex", True):
        return "gpt-2"
    raise ExportError(f"the tokenizer's pre-tokenizer is not one llama.cpp knows (probe hash {digest[:12]}); "
                      f"supported: the Qwen2/Qwen3, Llama 3, SmolLM, Mistral Nemo and GPT-2 tokenizers")


def _bpe_vocab(tokenizer, vocab_size: int):
    """Tokens and token types of a byte-level BPE vocabulary (the converter's `get_vocab_base`)."""
    import gguf
    reverse = {i: t for t, i in tokenizer.vocab.items()}
    if max(reverse) >= vocab_size:
        raise ExportError(f"the tokenizer has ids up to {max(reverse)}, past the model's vocab_size {vocab_size}")
    added, decoder = tokenizer.get_added_vocab(), tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            if not decoder[i].normalized:  # llama.cpp assumes control/user tokens pre-normalized
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if decoder[i].special or _looks_special(token):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types


def _spm_vocab(tokenizer, tokenizer_json: dict, vocab_size: int):
    """Tokens, scores and types of a sentencepiece-style vocabulary from its tokenizer.json.

    llama.cpp's sentencepiece tokenizer merges the adjacent pair whose joined piece scores highest; a
    tokenizer.json lists merges by rank (transformers made them from the sentencepiece scores, best
    first). So a piece scores minus the rank of the first merge that makes it, which gives llama.cpp the
    same merge order (gguf's LlamaHfVocab, which the converter falls back to, scores every piece -1000)."""
    import gguf
    model = tokenizer_json["model"]
    rank: dict[str, int] = {}
    for i, merge in enumerate(model.get("merges") or []):
        a, b = merge if isinstance(merge, list) else merge.split(" ", 1)
        rank.setdefault(a + b, i)
    unmade = -float(len(rank) + 1)  # a longer piece no merge makes: last
    tokens, scores = [f"[PAD{i}]" for i in range(vocab_size)], [-1000.0] * vocab_size
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, i in model["vocab"].items():
        if i >= vocab_size:
            raise ExportError(f"the tokenizer has id {i}, past the model's vocab_size {vocab_size}")
        tokens[i] = token
        if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
            types[i], scores[i] = gguf.TokenType.BYTE, 0.0
        elif token in (model.get("unk_token"), tokenizer.unk_token):
            types[i], scores[i] = gguf.TokenType.UNKNOWN, 0.0
        else:
            types[i] = gguf.TokenType.NORMAL
            scores[i] = -float(rank[token]) if token in rank else (0.0 if len(token) == 1 else unmade)
    for i, added in tokenizer.added_tokens_decoder.items():
        if i >= vocab_size:
            raise ExportError(f"the tokenizer has id {i}, past the model's vocab_size {vocab_size}")
        if types[i] == gguf.TokenType.UNKNOWN:
            continue
        tokens[i], scores[i] = added.content, -1000.0
        types[i] = gguf.TokenType.CONTROL if added.special or _looks_special(added.content) else \
            gguf.TokenType.USER_DEFINED
    return tokens, scores, types


def _spm_space_prefix(tokenizer_json: dict) -> bool:
    """Whether the tokenizer puts a "▁" before the text (Llama 2, Mistral: yes; Gemma: no)."""
    for part in (tokenizer_json.get("normalizer"), tokenizer_json.get("pre_tokenizer")):
        for step in (part or {}).get("normalizers", (part or {}).get("pretokenizers", [part or {}])):
            if step.get("type") == "Prepend" and step.get("prepend") == "\u2581":
                return True
            if step.get("type") == "Metaspace":
                return step.get("prepend_scheme", "always") != "never" and step.get("add_prefix_space", True)
    return False


def _tokenizer(w, ckpt: Path, hp: dict) -> None:
    import gguf
    from transformers import AutoTokenizer
    tokenizer_json = _read_json(ckpt / "tokenizer.json")
    if tokenizer_json is None:
        raise ExportError(f"{ckpt} has no tokenizer.json; save the tokenizer with the checkpoint "
                          f"(taskprune prune does)")
    model = tokenizer_json.get("model") or {}
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    vocab_size = hp.get("vocab_size") or len(tokenizer.vocab)
    if model.get("type") == "BPE" and not model.get("byte_fallback", False):
        tokens, types = _bpe_vocab(tokenizer, vocab_size)
        special = gguf.SpecialVocab(ckpt, load_merges=True)
        if not special.merges:
            raise ExportError("the tokenizer is a BPE without merges, which llama.cpp cannot load")
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(_bpe_pre(tokenizer, tokenizer_json))
        w.add_token_list(tokens)
        w.add_token_types(types)
    elif model.get("type") == "BPE":  # sentencepiece-style (byte fallback): Llama 2, Mistral, Gemma
        tokens, scores, types = _spm_vocab(tokenizer, tokenizer_json, vocab_size)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_add_space_prefix(_spm_space_prefix(tokenizer_json))
        special = gguf.SpecialVocab(ckpt, n_vocab=vocab_size)
    else:
        raise ExportError(f"tokenizer model {model.get('type')!r} is not exported (byte-level BPE and "
                          f"sentencepiece-style BPE are)")
    # The add-BOS flag where the tokenizer files do not state it: what the tokenizer does (llama.cpp's
    # default differs between pre-tokenizer types).
    for kind, token_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id)):
        if kind not in special.add_special_token:
            ids = tokenizer("a")["input_ids"]
            special.add_special_token[kind] = token_id is not None and bool(ids) and \
                ids[0 if kind == "bos" else -1] == token_id and len(ids) > 1
    if special.chat_template is None and getattr(tokenizer, "chat_template", None):
        special.chat_template = tokenizer.chat_template
    special.add_to_gguf(w, quiet=True)


# -- writing ---------------------------------------------------------------------------------------


def _qtype_of(quant: str):
    import gguf
    t = gguf.GGMLQuantizationType
    return {"f32": (t.F32, gguf.LlamaFileType.ALL_F32), "f16": (t.F16, gguf.LlamaFileType.MOSTLY_F16),
            "bf16": (t.BF16, gguf.LlamaFileType.MOSTLY_BF16), "q8_0": (t.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0)}[quant]


def _nbytes(shape: tuple[int, ...], qtype) -> int:
    import gguf
    return int(np.prod(gguf.quant_shape_to_byte_shape(shape, qtype), dtype=np.int64))


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse an existing `out` unless `overwrite`, and then only a GGUF file (not a directory, a link or
    another kind of file); and the place must be writable."""
    from taskprune.atomic import OutputExistsError, check_writable
    out = Path(out)
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise OutputExistsError(f"output {out} exists; choose another --out or pass --overwrite")
        if out.is_symlink() or not out.is_file():
            raise OutputExistsError(f"output {out} is not a regular file; --overwrite only replaces a GGUF file: "
                                    f"choose another --out or remove it yourself")
        with open(out, "rb") as f:
            if f.read(4) != b"GGUF":
                raise OutputExistsError(f"output {out} is not a GGUF file; --overwrite only replaces one: choose "
                                        f"another --out or remove it yourself")
    check_writable(out)


@contextmanager
def atomic_file(out: Path) -> Iterator[Path]:
    """A temporary path beside `out` that replaces it when the block succeeds (removed on failure), with
    the user's umask."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}-", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        mask = os.umask(0o022)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_gguf(ckpt: Path, out: Path, quant: str = DEFAULT_QUANT, progress: bool = True,
               export_type: str | None = None) -> dict:
    """Write the checkpoint directory `ckpt` as a GGUF file at `out` (replaced atomically) in `quant`
    (f32, f16, bf16 or q8_0); `taskprune.export_type` records `export_type` (default `quant`). Returns a
    summary: path, quant, tensors, bytes, architecture, feed_forward_length, parameters, pruned."""
    import gguf
    ckpt, out = Path(ckpt), Path(out)
    hp = _read_json(ckpt / "config.json")
    if hp is None:
        raise ExportError(f"{ckpt} has no config.json; give a Hugging Face checkpoint directory")
    hp = {**hp, **hp.get("text_config", {})}
    model_type = hp.get("model_type")
    if model_type not in ARCHS:
        raise ExportError(f"architecture {model_type!r} has no GGUF export; supported: {supported()}")
    arch = ARCHS[model_type]
    # The config as transformers runs it: config.json over the class defaults (tie_word_embeddings, eps, ...).
    from transformers import AutoConfig
    hp = {**AutoConfig.from_pretrained(ckpt).to_dict(), **hp}
    missing = [k for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                           "max_position_embeddings", "rms_norm_eps", "vocab_size") if hp.get(k) is None]
    if missing:
        raise ExportError(f"{ckpt / 'config.json'} has no {', '.join(missing)}; is it a stock {model_type} checkpoint?")
    want, file_type = _qtype_of(quant)
    planned = _plan_tensors(_Tensors(ckpt), hp, arch, want)

    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, arch.name)])
    for t in planned:
        writer.add_tensor_info(t.gguf_name, t.shape, np.dtype(np.float32), _nbytes(t.shape, t.qtype),
                               raw_dtype=t.qtype)
    total, shared, expert, count = writer.get_total_parameter_count()
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(ckpt.resolve().name)
    writer.add_size_label(gguf.size_label(total, shared, expert, count))
    _hparams(writer, hp, arch, int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _tokenizer(writer, ckpt, hp)
    record = _taskprune_keys(writer, ckpt, export_type or quant)

    from tqdm.auto import tqdm
    with atomic_file(out) as tmp:
        try:
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for t in tqdm(planned, desc=f"GGUF {quant}", unit="tensor", disable=not progress):
                data = gguf.quants.quantize(t.load(), t.qtype)
                writer.write_tensor_data(data)
        finally:
            writer.close()
    return {"path": str(out), "quant": quant, "tensors": len(planned), "bytes": out.stat().st_size,
            "architecture": writer.arch, "feed_forward_length": hp["intermediate_size"],
            "parameters": total, "pruned": bool(record)}


def quantize_llamacpp(src: Path, out: Path, ftype: str = "q4_k_m") -> None:
    """Quantize the GGUF `src` to `out` with llama.cpp's own quantizer (`llama_model_quantize`), which
    keeps every metadata key (the `taskprune.*` ones too)."""
    try:
        import llama_cpp
    except ImportError:
        raise ExportError(f"--quant {ftype} needs llama.cpp's quantizer from llama-cpp-python: `make gguf` builds it "
                          f"into .venv-gguf (then run .venv-gguf/bin/taskprune export ...), or pip install "
                          f"llama-cpp-python") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}[ftype]
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    if rc != 0:
        raise ExportError(f"llama.cpp's quantizer failed on {src} (return code {rc})")


def export_gguf(ckpt: Path, out: Path, quant: str = DEFAULT_QUANT, progress: bool = True) -> dict:
    """`write_gguf`, or for q4_k_m an f32 GGUF quantized by llama.cpp (the temporary f32 file is removed)."""
    if quant not in QUANTS:
        raise ExportError(f"unknown --quant {quant!r}; use {', '.join(QUANTS)}")
    if quant != "q4_k_m":
        return write_gguf(ckpt, out, quant, progress)
    try:
        import llama_cpp  # noqa: F401  (fail before the f32 export, not after)
    except ImportError:
        quantize_llamacpp(Path(), Path(), quant)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=Path(out).parent, prefix=f".{Path(out).name}-") as tmp:
        summary = write_gguf(ckpt, Path(tmp) / "f32.gguf", "f32", progress, export_type=quant)
        with atomic_file(out) as final:
            quantize_llamacpp(Path(tmp) / "f32.gguf", final, quant)
    return {**summary, "path": str(out), "quant": quant, "bytes": Path(out).stat().st_size}
