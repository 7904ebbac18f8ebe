"""Architecture facts on the adapters, one test per supported architecture (as SliceGPT's
tests/test_model_adapter.py), plus the padding and hook helpers every model pass shares."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from taskprune.models import (ADAPTERS, DEFAULT_LORA_TARGETS, TargetModuleError, UnsupportedArchitectureError,
                              down_proj_hooks, get_adapter, model_adapter, pad_batch)
from taskprune.models.synthetic import REAL_CONFIGS, byte_tokenizer, tiny_model

LAYERS, D_FF, HIDDEN = 3, 96, 64
SEPARATE = sorted(DEFAULT_LORA_TARGETS)
FUSED = ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
# Per architecture: the LoRA targets of the default request and whether scored texts start with BOS.
FACTS = {
    "llama": (SEPARATE, False),
    "qwen2": (SEPARATE, False),
    "qwen3": (SEPARATE, False),
    "mistral": (SEPARATE, False),
    "gemma": (SEPARATE, True),
    "gemma2": (SEPARATE, True),
    "gemma3_text": (SEPARATE, True),
    "phi3": (FUSED, False),
}


def test_every_adapter_has_a_test_architecture():
    assert set(FACTS) == set(ADAPTERS) == set(REAL_CONFIGS)


@pytest.mark.parametrize("arch", sorted(FACTS))
def test_architecture_facts(arch):
    model = tiny_model(arch, d_ff=D_FF, layers=LAYERS)
    adapter = model_adapter(model)
    assert adapter is get_adapter(arch) and adapter.name == arch
    targets, add_bos = FACTS[arch]

    # decoder stack without the head, its layers and MLPs, and the width of h
    decoder = adapter.decoder(model)
    assert decoder is model.model and not hasattr(decoder, "lm_head")
    assert adapter.layers(model) is decoder.layers and len(adapter.layers(model)) == LAYERS
    mlps = adapter.mlps(model)
    assert len(mlps) == LAYERS and adapter.d_ff(model) == D_FF
    assert all(isinstance(adapter.down_proj(m), nn.Linear) and adapter.down_proj(m).in_features == D_FF for m in mlps)
    rows = adapter.weight_rows(mlps[0])
    assert {k: tuple(v.shape) for k, v in rows.items()} == {k: (D_FF, HIDDEN) for k in ("gate", "up", "down")}

    # LoRA targets are Linear modules, one of each in every decoder layer
    assert adapter.lora_targets(model) == targets
    linear = [name for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    assert all(sum(name.startswith("model.layers.") and name.endswith(f".{t}") for name in linear) == LAYERS
               for t in targets)
    with pytest.raises(TargetModuleError, match="w_in not found"):
        adapter.lora_targets(model, ("q_proj", "w_in"))

    # BOS policy and pad id
    assert adapter.add_bos is add_bos
    assert adapter.pad_id(byte_tokenizer()) == 256

    # slicing keeps the chosen neurons, in order
    keep = torch.tensor([0, 5, 17, 40, 95])
    gate_before = rows["gate"][keep].clone()
    adapter.slice(mlps[0], keep)
    assert adapter.down_proj(mlps[0]).in_features == 5
    torch.testing.assert_close(adapter.weight_rows(mlps[0])["gate"], gate_before)


def test_fused_projections_stand_for_their_parts():
    model = tiny_model("phi3")
    adapter = model_adapter(model)
    assert adapter.lora_targets(model, ("q_proj", "down_proj")) == ["down_proj", "qkv_proj"]
    assert adapter.lora_targets(model, ("gate_up_proj",)) == ["gate_up_proj"]
    with pytest.raises(TargetModuleError, match="gate_up_proj not found"):
        get_adapter("llama").lora_targets(tiny_model("llama"), ("gate_proj", "gate_up_proj"))


def test_unknown_architecture():
    with pytest.raises(UnsupportedArchitectureError, match="supported model types"):
        get_adapter("gpt2")


def test_pad_id_rule():
    adapter = get_adapter("qwen2")
    assert adapter.pad_id(SimpleNamespace(pad_token_id=7, eos_token_id=3)) == 7
    assert adapter.pad_id(SimpleNamespace(pad_token_id=None, eos_token_id=3)) == 3
    assert adapter.pad_id(SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0


@pytest.mark.parametrize("side", ["right", "left"])
def test_pad_batch(side):
    seqs, labels = [[5, 6, 7], [8]], [[-100, 6, 7], [8]]
    batch = pad_batch(seqs, 0, side, labels=labels)
    if side == "right":
        assert batch.input_ids.tolist() == [[5, 6, 7], [8, 0, 0]]
        assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
        assert batch.labels.tolist() == [[-100, 6, 7], [8, -100, -100]]
        assert batch.position_ids.tolist() == [[0, 1, 2], [0, 0, 0]]
    else:
        assert batch.input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
        assert batch.attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
        assert batch.labels.tolist() == [[-100, 6, 7], [-100, -100, 8]]
        assert batch.position_ids.tolist() == [[0, 1, 2], [0, 0, 0]]
    assert pad_batch(seqs, 0, side).labels is None
    with pytest.raises(ValueError, match="padding side"):
        pad_batch(seqs, 0, "middle")


def test_down_proj_hooks_replace_inputs_and_are_removed_on_error():
    model = tiny_model("qwen2")
    adapter = model_adapter(model)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        plain = model(ids).logits
    seen: list[int] = []

    def zero_layer_1(layer, h):
        seen.append(layer)
        return torch.zeros_like(h) if layer == 1 else None

    with torch.no_grad(), down_proj_hooks(model, adapter, zero_layer_1):
        zeroed = model(ids).logits
    assert seen == [0, 1] and not torch.allclose(zeroed, plain)
    with pytest.raises(RuntimeError, match="boom"), down_proj_hooks(model, adapter, zero_layer_1, layers=[1]):
        raise RuntimeError("boom")
    assert all(not adapter.down_proj(m)._forward_pre_hooks for m in adapter.mlps(model))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain, rtol=0, atol=0)
