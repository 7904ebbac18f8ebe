"""oneDNN-packed bf16 weights in the CPU engine: the plain path's logits, forwards restored, and only where it
applies (bf16 on a CPU with oneDNN bf16 kernels, no hooks, memory to spare)."""

from types import SimpleNamespace

import pytest
import torch

from taskprune.evaluate import prepack
from taskprune.evaluate.generate import generate
from taskprune.evaluate.prepack import packable, prepacked
from taskprune.models.synthetic import byte_tokenizer, tiny_model

needs_bf16_kernels = pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                                        reason="this CPU's oneDNN has no bf16 kernels (packing never applies)")


def _ids() -> torch.Tensor:
    return torch.randint(0, 256, (3, 17), generator=torch.Generator().manual_seed(0))


@needs_bf16_kernels
def test_packed_layers_give_the_plain_logits_and_their_forwards_come_back():
    model = tiny_model("qwen2", dtype=torch.bfloat16)
    layers = packable(model)
    # Every projection of both layers, the output head left out.
    assert len(layers) == 2 * 7 and model.get_output_embeddings() not in layers
    with torch.inference_mode():
        plain = model(_ids()).logits
        with prepacked(model) as packed:
            assert packed and all("forward" in m.__dict__ for m in layers)
            logits = model(_ids()).logits
    assert not any("forward" in m.__dict__ for m in model.modules())
    torch.testing.assert_close(logits, plain, rtol=1.6e-2, atol=1e-2)
    assert logits.float().abs().max() > 0.1  # not a degenerate comparison


@needs_bf16_kernels
def test_generate_packs_for_its_call_only(monkeypatch):
    model, tok = tiny_model("qwen2", dtype=torch.bfloat16), byte_tokenizer()
    seen = []
    real = prepack._packed_linear
    monkeypatch.setattr(prepack, "_packed_linear", lambda x, **kw: seen.append(x.shape) or real(x, **kw))
    generate(model, tok, ["def f(x):", "print(1)"], 4, batch_size=2, progress=False)
    assert seen  # the engine's products ran from the packed weights
    assert not any("forward" in m.__dict__ for m in model.modules())
    seen.clear()
    generate(model, tok, ["def f(x):"], 4, progress=False, prepack=False)
    assert not seen


def test_fp32_hooked_or_short_of_memory_stays_plain(monkeypatch):
    assert packable(tiny_model("qwen2")) == []  # fp32: the path whose batched outputs the tests pin
    model = tiny_model("qwen2", dtype=torch.bfloat16)
    model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, args: None)  # as a capture does
    assert packable(model) == []
    model = tiny_model("qwen2", dtype=torch.bfloat16)
    monkeypatch.setattr(prepack.psutil, "virtual_memory", lambda: SimpleNamespace(available=1024))
    with prepacked(model) as packed:
        assert not packed and not any("forward" in m.__dict__ for m in model.modules())
