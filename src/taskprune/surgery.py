"""Physical pruning: slice each MLP to its kept neurons and save a stock Hugging Face checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from taskprune import __version__
from taskprune.atomic import atomic_dir
from taskprune.models.adapters import MLPAdapter
from taskprune.plan import Plan


def prune_model(model: nn.Module, adapter: MLPAdapter, plan: Plan) -> nn.Module:
    """Slice gate/up rows and down columns to `plan.keep` in every layer, in place; returns the model.

    Survivors keep their order. `config.intermediate_size` becomes the kept width, so
    `save_pretrained` writes a checkpoint that stock `transformers` rebuilds at the right shapes.
    """
    mlps = adapter.mlps(model)
    if len(mlps) != len(plan.keep):
        raise ValueError(f"plan has {len(plan.keep)} layers, model has {len(mlps)}")
    for mlp, keep in zip(mlps, plan.keep):
        if adapter.down_proj(mlp).in_features != plan.d_ff:
            raise ValueError(f"plan is for d_ff {plan.d_ff}, model layer has {adapter.down_proj(mlp).in_features}")
        adapter.slice(mlp, torch.tensor(keep, dtype=torch.long))
    model.config.intermediate_size = plan.kept_width
    return model


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _model_card(record: dict) -> str:
    p = record["plan"]
    return f"""---
library_name: transformers
tags: [taskprune, pruned, structured-pruning]
base_model: {record['source_model']['spec']}
---
# Pruned {record['source_model']['spec']}

Made with taskprune {record['taskprune_version']}: the MLP intermediate width went from {p['d_ff']} to
{p['kept_width']} in every layer ({p['pruned_per_layer']} neurons removed per layer; ratio {p['ratio_nominal']}
nominal, {p['ratio_exact']:.4f} exact), strategy `{p['strategy']}`, scorer `{record['scorer']}`
{f"(seed {p['seed']})" if p['seed'] is not None else ""}.

Parameters: {record['parameters']['before']:,} before, {record['parameters']['after']:,} after.

It is a standard checkpoint: `AutoModelForCausalLM.from_pretrained(this_dir)` loads it with no
taskprune import. `pruning.json` lists the kept neuron indices of every layer and where the scores came from.
"""


def save_pruned(model: nn.Module, tokenizer, out_dir: Path, record: dict, overwrite: bool = False) -> Path:
    """Save model, tokenizer, generation config, `pruning.json` and a model card, atomically.

    Everything is written to a temporary sibling directory that is renamed into place at the end,
    so a failure leaves no half-written output.
    """
    with atomic_dir(out_dir, overwrite, kind="checkpoint") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        record = dict(record, taskprune_version=__version__)
        (tmp / "pruning.json").write_text(json.dumps(record, indent=1) + "\n")
        (tmp / "README.md").write_text(_model_card(record))
    return Path(out_dir)
