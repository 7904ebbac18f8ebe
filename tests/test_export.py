"""`taskprune export --format gguf`: the GGUF file read back by transformers' own GGUF loader (a reader
independent of the writer) gives the HF checkpoint's logits; its metadata records the pruned width and the
pruning; the Ollama Modelfile; the refusals. (tests_gguf/, run by `make test-gguf`, reads the same files
with llama.cpp.)"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gguf_tiny", REPO / "tests_gguf" / "tiny.py")
tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny)

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# What transformers' GGUF reader does not take from the file, for these tiny shapes: Qwen3's head_dim (it
# does not map attention.key_length; real Qwen3s have the default 128) and Gemma 2's query_pre_attn_scalar
# (GGUF has no key for it; llama.cpp uses head_dim, as the tiny config does).
READER_CONFIG = {"qwen3": {"head_dim": 16}, "gemma2": {"query_pre_attn_scalar": 16}}
TOLERANCE = {"f32": 1e-5, "f16": 5e-3, "bf16": 2.5e-2, "q8_0": 5e-2}  # max |logit difference|; logits are O(1)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    cache = {}

    def get(arch: str, **kw) -> Path:
        key = (arch, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = tiny.pruned_checkpoint(arch, root / f"{arch}-{len(cache)}", **kw)
        return cache[key]
    return get


def _export(ckpt: Path, out_dir: Path, quant: str) -> Path:
    from taskprune.export import write_gguf
    out_dir.mkdir(parents=True, exist_ok=True)
    write_gguf(ckpt, out_dir / "model.gguf", quant, progress=False)
    return out_dir / "model.gguf"


def _read(path: Path, arch: str):
    """Model and tokenizer from the GGUF alone (its directory holds nothing else)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                 **READER_CONFIG.get(arch, {})).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _logit_gap(ckpt: Path, path: Path, arch: str) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    reference = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    model, _ = _read(path, arch)
    batch = tokenizer(tiny.PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return (reference(**batch).logits - model(**batch).logits).abs().max().item()


def _fields(path: Path) -> dict:
    import gguf
    reader = gguf.GGUFReader(str(path))
    out = {}
    for key, f in reader.fields.items():
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            out[key] = len(f.data) if f.types[-1] == gguf.GGUFValueType.STRING else [f.parts[i].tolist()[0] for i in f.data]
        elif f.types[0] == gguf.GGUFValueType.STRING:
            out[key] = bytes(f.parts[f.data[0]]).decode()
        else:
            out[key] = f.parts[f.data[0]].tolist()[0]
    out["tensors"] = {t.name: t for t in reader.tensors}
    return out


@pytest.mark.parametrize("arch", ["qwen2", "llama", "qwen3", "mistral", "gemma2"])
def test_f32_export_gives_the_checkpoints_logits(checkpoints, tmp_path, arch):
    ckpt = checkpoints(arch)
    path = _export(ckpt, tmp_path / "f32", "f32")
    assert _logit_gap(ckpt, path, arch) <= TOLERANCE["f32"]
    model, tokenizer = _read(path, arch)
    assert model.config.intermediate_size == 128  # the pruned width, from feed_forward_length
    from transformers import AutoTokenizer
    reference = AutoTokenizer.from_pretrained(ckpt)
    for prompt in tiny.PROMPTS:  # the merges and the split regex came through
        assert tokenizer(prompt)["input_ids"] == reference(prompt)["input_ids"]
    assert tokenizer.chat_template == reference.chat_template


@pytest.mark.parametrize("arch", ["mistral", "gemma2"])
def test_sentencepiece_style_tokenizer_exports_with_scores_in_merge_order(checkpoints, tmp_path, arch):
    """Llama 2 / Mistral / Gemma tokenizers (byte-fallback BPE over "▁" pieces): llama.cpp's "llama"
    tokenizer, each piece scored minus the rank of the merge that makes it; transformers rebuilds the same
    tokenizer from the file."""
    import gguf
    from transformers import AutoTokenizer
    ckpt = checkpoints(arch, spm=True)
    path = _export(ckpt, tmp_path / "f32", "f32")
    assert _logit_gap(ckpt, path, arch) <= TOLERANCE["f32"]
    reference, (_, tokenizer) = AutoTokenizer.from_pretrained(ckpt), _read(path, arch)
    for prompt in [*tiny.PROMPTS, "  two  spaces", "ünïcode ✓"]:
        assert tokenizer(prompt)["input_ids"] == reference(prompt)["input_ids"]
    f = _fields(path)
    assert (f["tokenizer.ggml.model"], f["tokenizer.ggml.pre"]) == ("llama", "default")
    assert f["tokenizer.ggml.add_space_prefix"] is (arch == "mistral")  # Gemma puts no "▁" before the text
    assert f["tokenizer.ggml.eos_token_id"] == reference.eos_token_id
    scores, types = f["tokenizer.ggml.scores"], f["tokenizer.ggml.token_type"]
    vocab = reference.get_vocab()
    assert scores[vocab["▁t"]] == 0 and scores[vocab["he"]] == -1 and scores[vocab["▁the"]] == -2
    assert types[vocab["<0x41>"]] == gguf.TokenType.BYTE and types[vocab["<unk>"]] == gguf.TokenType.UNKNOWN
    assert types[reference.eos_token_id] == gguf.TokenType.CONTROL


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("quant", ["f16", "bf16", "q8_0"])
def test_reduced_precision_exports_stay_close(checkpoints, tmp_path, arch, quant):
    ckpt = checkpoints(arch)
    gap = _logit_gap(ckpt, _export(ckpt, tmp_path / quant, quant), arch)
    assert 0 < gap <= TOLERANCE[quant]


def test_metadata_records_the_pruned_width_and_the_pruning(checkpoints, tmp_path):
    import gguf
    ckpt = checkpoints("qwen2")
    f = _fields(_export(ckpt, tmp_path / "q8", "q8_0"))
    record = json.loads((ckpt / "pruning.json").read_text())
    assert f["general.architecture"] == "qwen2" and f["general.type"] == "model"
    assert f["qwen2.feed_forward_length"] == record["plan"]["kept_width"] == 128
    assert (f["qwen2.block_count"], f["qwen2.embedding_length"], f["qwen2.context_length"]) == (2, 64, 512)
    assert (f["qwen2.attention.head_count"], f["qwen2.attention.head_count_kv"]) == (4, 2)
    assert f["qwen2.rope.freq_base"] == 1e6 and f["qwen2.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert f["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert (f["tokenizer.ggml.model"], f["tokenizer.ggml.pre"]) == ("gpt2", "qwen2")
    assert (f["tokenizer.ggml.tokens"], f["tokenizer.ggml.merges"]) == (272, 13)
    assert (f["tokenizer.ggml.eos_token_id"], f["tokenizer.ggml.padding_token_id"]) == (258, 256)
    assert f["tokenizer.ggml.add_bos_token"] is False and "<|im_start|>" in f["tokenizer.chat_template"]
    assert f["tokenizer.ggml.token_type"][256:259] == [gguf.TokenType.CONTROL] * 3
    assert f["taskprune.pruned"] is True and f["taskprune.source_model"] == "tiny-qwen2"
    assert (f["taskprune.strategy"], f["taskprune.scorer"], f["taskprune.seed"]) == ("random", "none", 42)
    assert (f["taskprune.d_ff"], f["taskprune.kept_width"], f["taskprune.pruned_per_layer"]) == (256, 128, 128)
    assert f["taskprune.ratio_nominal"] == 0.5 and f["taskprune.ratio_exact"] == record["plan"]["ratio_exact"]
    assert f["taskprune.parameters_after"] == record["parameters"]["after"]
    t = f["tensors"]
    assert t["blk.0.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert list(t["blk.0.ffn_down.weight"].shape) == [128, 64]  # ggml order: columns first
    assert t["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert t["blk.0.attn_q.bias"].tensor_type == gguf.GGMLQuantizationType.F32
    assert "output.weight" in t  # Qwen2.5 unties the head


def test_llama_layout_tied_head_and_bpe_pre(checkpoints, tmp_path):
    from safetensors.torch import load_file
    ckpt = checkpoints("llama")
    f = _fields(_export(ckpt, tmp_path / "f32", "f32"))
    assert f["general.architecture"] == "llama" and f["llama.feed_forward_length"] == 128
    assert f["tokenizer.ggml.pre"] == "llama-bpe" and f["llama.rope.dimension_count"] == 16
    assert f["llama.vocab_size"] == 272
    assert "output.weight" not in f["tensors"]  # tied: llama.cpp reuses token_embd
    q_hf = load_file(ckpt / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"].numpy()
    q_gguf = np.asarray(f["tensors"]["blk.0.attn_q.weight"].data)
    assert not np.array_equal(q_gguf, q_hf)  # rows in llama.cpp's rotary order ...
    assert np.array_equal(np.sort(q_gguf, axis=0), np.sort(q_hf, axis=0))  # ... the same rows


def test_q8_0_falls_back_to_f16_where_rows_do_not_fit_its_blocks(checkpoints, tmp_path):
    import gguf
    ckpt = checkpoints("qwen2", ratio=0.2, align=8)
    width = json.loads((ckpt / "config.json").read_text())["intermediate_size"]
    assert width % 32
    path = _export(ckpt, tmp_path / "q8", "q8_0")
    t = _fields(path)["tensors"]
    assert t["blk.0.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.F16  # rows of `width`
    assert t["blk.0.ffn_gate.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0  # rows of 64
    assert _logit_gap(ckpt, path, "qwen2") <= TOLERANCE["q8_0"]


def test_unpruned_checkpoint_exports_too(tmp_path):
    from taskprune.models.synthetic import tiny_model
    ckpt = tmp_path / "plain"
    tiny_model("qwen2").save_pretrained(ckpt)
    tiny.bpe_tokenizer(tiny.QWEN2_SPLIT).save_pretrained(ckpt)
    f = _fields(_export(ckpt, tmp_path / "out", "f16"))
    assert f["taskprune.pruned"] is False and "taskprune.kept_width" not in f
    assert f["qwen2.feed_forward_length"] == 256


def test_cli_writes_gguf_and_modelfile_and_refuses_to_clobber(checkpoints, tmp_path, capsys):
    from taskprune.cli import main
    ckpt, out = checkpoints("qwen2"), tmp_path / "deploy" / "coder.gguf"
    assert main(["export", "--model", str(ckpt), "--out", str(out), "--quant", "q8_0"]) == 0
    assert out.is_file() and "ollama create NAME -f" in capsys.readouterr().out
    modelfile = (out.parent / "Modelfile").read_text()
    assert "FROM ./coder.gguf" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert "PARAMETER temperature 0" in modelfile and "PARAMETER repeat_penalty 1" in modelfile
    assert "TEMPLATE \"\"\"{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n" in modelfile
    before = out.read_bytes()

    assert main(["export", "--model", str(ckpt), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("taskprune export: error: output") and "--overwrite" in err and err.count("\n") == 1
    assert out.read_bytes() == before
    assert main(["export", "--model", str(ckpt), "--out", str(out), "--overwrite", "--quant", "f32"]) == 0
    assert out.stat().st_size > len(before)  # replaced, as f32
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary left

    other = tmp_path / "other.gguf"
    other.write_text("not a gguf")
    assert main(["export", "--model", str(ckpt), "--out", str(other), "--overwrite"]) == 2
    assert "is not a GGUF file" in capsys.readouterr().err and other.read_text() == "not a gguf"

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "Modelfile").write_text("FROM llama3\n")
    assert main(["export", "--model", str(ckpt), "--out", str(theirs / "m.gguf")]) == 2
    assert "Modelfile" in capsys.readouterr().err and not (theirs / "m.gguf").exists()
    assert main(["export", "--model", str(ckpt), "--out", str(theirs / "m.gguf"), "--no-modelfile"]) == 0
    assert (theirs / "Modelfile").read_text() == "FROM llama3\n"


def test_errors_are_one_line_and_name_the_fix(checkpoints, tmp_path, capsys):
    from taskprune.cli import main
    from taskprune.models.synthetic import byte_tokenizer, tiny_model
    phi = tmp_path / "phi3"
    tiny_model("phi3").save_pretrained(phi)
    byte_tokenizer().save_pretrained(phi)
    capsys.readouterr()
    assert main(["export", "--model", str(phi), "--out", str(tmp_path / "p.gguf")]) == 2
    err = capsys.readouterr().err
    assert "'phi3' has no GGUF export; supported: qwen2, qwen3, llama, mistral, gemma, gemma2" in err
    assert err.count("\n") == 1 and not (tmp_path / "p.gguf").exists()

    assert main(["export", "--model", str(checkpoints("qwen2")), "--out", str(tmp_path / "x.bin")]) == 2
    assert "must name a .gguf file" in capsys.readouterr().err

    bent = tmp_path / "bent"
    shutil.copytree(checkpoints("qwen2"), bent)
    config = json.loads((bent / "config.json").read_text())
    (bent / "config.json").write_text(json.dumps({**config, "intermediate_size": 256}))
    capsys.readouterr()
    assert main(["export", "--model", str(bent), "--out", str(tmp_path / "b.gguf")]) == 2
    assert "one width for all layers" in capsys.readouterr().err

    if importlib.util.find_spec("llama_cpp") is None:
        assert main(["export", "--model", str(bent), "--out", str(tmp_path / "q.gguf"), "--quant", "q4_k_m"]) == 2
        err = capsys.readouterr().err
        assert "needs llama.cpp's quantizer" in err and "make gguf" in err


def test_modelfile_translates_chatml_with_a_default_system_prompt_and_llama3():
    from taskprune.export.modelfile import modelfile_text, translate
    tok = tiny.bpe_tokenizer(tiny.QWEN2_SPLIT)
    tok.chat_template = (  # Qwen2.5's shape: a default system turn unless the conversation has one
        "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are Qwen, a helpful assistant.<|im_end|>\n"
        "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    fmt, default = translate(tok)
    assert fmt.name == "chatml" and default == "You are Qwen, a helpful assistant."
    text = modelfile_text("m.gguf", tok, 258, 32768)
    assert 'SYSTEM """You are Qwen, a helpful assistant."""' in text and "PARAMETER num_ctx 4096" in text

    llama3 = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
              "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
              "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
    tok.chat_template = llama3
    fmt, default = translate(tok)
    assert (fmt.name, default) == ("llama3", None)
    assert "<|start_header_id|>{{ .Role }}<|end_header_id|>" in fmt.go_template()
    tok.bos_token = "<|endoftext|>"  # a BOS written by the template, which this tokenizer does not add itself:
    tok.chat_template = "{{ bos_token }}" + llama3  # a TEMPLATE without it would lose it
    assert translate(tok) is None

    tok.chat_template = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}### assistant:"
    assert translate(tok) is None
    assert "TEMPLATE" not in modelfile_text("m.gguf", tok, 258).replace("# The chat template", "")
