"""Tiny seeded random checkpoints pruned with taskprune's own surgery, with a real byte-level BPE tokenizer
(merges and a Qwen2 or Llama 3 split regex), for the GGUF export tests of both suites (tests/test_export.py
loads this file by path)."""

from __future__ import annotations

from pathlib import Path

# The split regexes of Qwen2's and Llama 3's tokenizer.json (llama.cpp pre-tokenizers qwen2 and llama-bpe).
QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")
# 13 merges in the byte alphabet (Ġ is a space): ids 259-271 fill the tiny models' vocab of 272.
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("o", "n"), ("Ġ", "s"),
          ("r", "e"), ("a", "t"), ("Ġ", "w"), ("n", "d"), ("Ġa", "nd")]
SPLIT = {"qwen2": QWEN2_SPLIT, "qwen3": QWEN2_SPLIT, "llama": LLAMA3_SPLIT, "mistral": LLAMA3_SPLIT,
         "gemma": LLAMA3_SPLIT, "gemma2": LLAMA3_SPLIT}
PROMPTS = ["Write the sum of a and b.", "What is the answer to 12 + 30?", "Then the weather was on and on."]


def bpe_tokenizer(split: str, ignore_merges: bool = False):
    """Ids 0-255 the bytes, 256 `<|endoftext|>` (pad), 257 `<|im_start|>`, 258 `<|im_end|>` (EOS), 259-271
    the merges' tokens; ChatML chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from taskprune.models.synthetic import with_chatml

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for i, tok in enumerate(("<|endoftext|>", "<|im_start|>", "<|im_end|>")):
        vocab[tok] = 256 + i
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=MERGES, ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return with_chatml(PreTrainedTokenizerFast(tokenizer_object=tok))


def spm_tokenizer(gemma: bool = False):
    """A sentencepiece-style tokenizer (BPE over "▁"-marked pieces with byte fallback, as transformers builds
    Llama 2 / Mistral's and Gemma's from their vocabulary and merges): the special tokens, the 256 byte
    pieces, then pieces and merges up to 272 ids. Llama-style prepends "▁" to the text, Gemma-style not."""
    from transformers.models.gemma.tokenization_gemma import GemmaTokenizer
    from transformers.models.llama.tokenization_llama import LlamaTokenizer

    specials = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>") if gemma else ("<unk>", "<s>", "</s>")
    vocab = {tok: i for i, tok in enumerate(specials)}
    vocab.update({f"<0x{b:02X}>": len(vocab) + b for b in range(256)})
    pieces = ["▁", "t", "h", "e", "a", "n", "d", "▁t", "he", "▁the", "nd", "▁a", "▁and"][:272 - len(vocab)]
    vocab.update({piece: len(vocab) + i for i, piece in enumerate(pieces)})
    merges = [m for m in [("▁", "t"), ("h", "e"), ("▁t", "he"), ("n", "d"), ("▁", "a"), ("▁a", "nd")]
              if "".join(m) in vocab]
    tokenizer = (GemmaTokenizer if gemma else LlamaTokenizer)(vocab=vocab, merges=merges)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token  # Llama 2 has none; tests pad batches
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant:{% endif %}")
    return tokenizer


def pruned_checkpoint(arch: str, path: Path, ratio: float = 0.5, align: int = 32, d_ff: int = 256, layers: int = 2,
                      seed: int = 0, spm: bool = False) -> Path:
    """A tiny random `arch` model (taskprune.models.synthetic), pruned `ratio` at random (seed 42) by
    taskprune's surgery and saved with pruning.json at `path`; with the byte-level BPE tokenizer, or with
    `spm` the sentencepiece-style one (the model's special ids set to its)."""
    from taskprune.models import LoadedModel
    from taskprune.models.adapters import get_adapter
    from taskprune.models.synthetic import tiny_model
    from taskprune.pipeline import prune_and_save
    from taskprune.plan import make_plan

    model = tiny_model(arch, d_ff=d_ff, layers=layers, seed=seed)
    if spm:
        tokenizer = spm_tokenizer(gemma=arch.startswith("gemma"))
        for config in (model.config, model.generation_config):
            config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
            config.pad_token_id = tokenizer.pad_token_id
    else:
        tokenizer = bpe_tokenizer(SPLIT[arch], ignore_merges=SPLIT[arch] == LLAMA3_SPLIT)
    lm = LoadedModel(model, tokenizer, get_adapter(model.config.model_type),
                     {"spec": f"tiny-{arch}", "kind": "synthetic", "revision": None})
    plan = make_plan(None, "random", ratio, align, 42, shape=(layers, d_ff))
    prune_and_save(lm, plan, Path(path), "selectivity")
    return Path(path)
