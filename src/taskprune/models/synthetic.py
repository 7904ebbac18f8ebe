"""Random-init models with real architectures, for tests and benchmarks (no download needed).

`tiny_model(arch)` shrinks a real config of each supported family to a few layers and a small
width; `real_shape_model(name)` keeps the real shape (e.g. Qwen2.5-1.5B/7B) for GPU benchmarks.
`byte_tokenizer()` is a self-contained byte-level tokenizer with a ChatML template.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerFast

# Architecture-defining fields of real checkpoints' config.json (sizes are shrunk by tiny_config).
REAL_CONFIGS: dict[str, dict] = {
    "llama": {"model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
              "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False},  # Llama-3.2-1B
    "qwen2": {"model_type": "qwen2", "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
              "tie_word_embeddings": False, "use_sliding_window": False},  # Qwen2.5-1.5B-Instruct
    "qwen3": {"model_type": "qwen3", "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
              "tie_word_embeddings": True, "attention_bias": False},  # Qwen3-0.6B
    "mistral": {"model_type": "mistral", "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 1000000.0,
                "tie_word_embeddings": False, "sliding_window": None},  # Mistral-7B-Instruct-v0.3
    "gemma": {"model_type": "gemma", "hidden_act": "gelu_pytorch_tanh",
              "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6},  # gemma-2b
    "gemma2": {"model_type": "gemma2", "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6,
               "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0,
               "query_pre_attn_scalar": 16, "sliding_window": 4096},  # gemma-2-2b
    "gemma3_text": {"model_type": "gemma3_text", "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6,
                    "query_pre_attn_scalar": 16, "sliding_window": 512},  # gemma-3-1b
    "phi3": {"model_type": "phi3", "hidden_act": "silu", "rms_norm_eps": 1e-5,
             "tie_word_embeddings": False},  # Phi-3-mini-4k-instruct (fused gate_up_proj)
}

# Full-size shapes for benchmarks on a GPU (random weights; the shapes are what is timed).
REAL_SHAPES: dict[str, dict] = {
    "qwen2.5-0.5b": {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                     "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936},
    "qwen2.5-1.5b": {"model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                     "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936},
    "qwen2.5-7b": {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                   "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064},
}

TINY_VOCAB = 272  # the byte tokenizer's 259 ids, rounded up


def tiny_config(arch: str, d_ff: int = 256, layers: int = 2) -> PretrainedConfig:
    """A real family's config shrunk to hidden 64, `d_ff`, `layers` layers, 4 heads (2 KV), vocab 272."""
    fields = dict(REAL_CONFIGS[arch])
    model_type = fields.pop("model_type")
    fields.update(hidden_size=64, intermediate_size=d_ff, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=TINY_VOCAB, max_position_embeddings=512,
                  pad_token_id=256, bos_token_id=None, eos_token_id=258)
    return AutoConfig.for_model(model_type, **fields)


def tiny_model(arch: str, d_ff: int = 256, layers: int = 2, seed: int = 0,
               dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A random-init causal LM of family `arch` (a key of REAL_CONFIGS), in eval mode."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, d_ff, layers), dtype=dtype)
    # Random init leaves some norms at zero-centred values (Gemma's 1 + w): give them spread so
    # every neuron carries signal and masking errors cannot hide.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.eval()


def real_shape_model(name: str, dtype: torch.dtype = torch.bfloat16, device: str = "cpu") -> torch.nn.Module:
    """A random-init model with a real checkpoint's shapes (`REAL_SHAPES`), for speed and memory benchmarks."""
    fields = dict(REAL_SHAPES[name])
    model_type = fields.pop("model_type")
    config = AutoConfig.for_model(model_type, **fields, tie_word_embeddings=False)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: ids 0-255 are bytes, 256 `<|endoftext|>` (pad), 257 `<|im_start|>`, 258 `<|im_end|>` (eos)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return with_chatml(PreTrainedTokenizerFast(tokenizer_object=tok))


def with_chatml(fast: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """`fast` with ids 256-258 the ChatML specials (`<|endoftext|>` pad, `<|im_start|>`, `<|im_end|>` EOS)
    and a ChatML chat template."""
    fast.add_special_tokens({"pad_token": "<|endoftext|>", "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    fast.eos_token = "<|im_end|>"
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return fast
