"""The stages wired together: capture a profile, score it, plan and prune (in memory or to disk)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from taskprune import __version__
from taskprune.atomic import check_replaceable
from taskprune.capture import capture
from taskprune.data import format_text, load_examples, sample
from taskprune.gradients import check_settings, gradient_stats, prompt_token_lengths
from taskprune.models import LoadedModel, config_hash
from taskprune.plan import Plan, make_plan
from taskprune.profile import Profile, load_profile, profile_hash, save_profile
from taskprune.scoring import score
from taskprune.surgery import parameter_count, prune_model, save_pruned


@dataclass(frozen=True)
class CaptureSettings:
    n: int = 128  # prompts per data set
    seed: int = 0  # for drawing the prompts
    max_length: int = 512
    template: str = "chat"  # chat | raw
    content: str = "prompt"  # prompt | prompt+response
    batch_size: int = 8
    keep_per_prompt: bool = False
    # Gradient pass on the target set (taskprune.gradients), for the taylor and ig scorers.
    gradients: tuple[str, ...] = ()  # e.g. ("taylor", "ig")
    grad_prompts: int | None = None  # target prompts in the gradient pass (None: all n)
    grad_batch_size: int = 4
    ig_steps: int = 20
    ig_threshold: float = 0.5
    ig_positions: str = "all"  # all | answer


def capture_profile(lm: LoadedModel, target: str, distractors: list[str], settings: CaptureSettings = CaptureSettings(),
                    data_dir: str | Path | None = None, progress: bool = True) -> Profile:
    """Capture target and distractor statistics on `lm` and return them as a `Profile`."""
    if not distractors:
        raise ValueError("give at least one distractor data set")
    if target in distractors:
        raise ValueError(f"{target!r} is both the target and a distractor")
    for key in ("n", "max_length", "batch_size", "grad_batch_size", "ig_steps"):
        if getattr(settings, key) < 1:
            raise ValueError(f"capture setting {key} must be at least 1, got {getattr(settings, key)}")
    if settings.grad_prompts is not None and settings.grad_prompts < 1:
        raise ValueError(f"capture setting grad_prompts must be at least 1, got {settings.grad_prompts}")
    if settings.gradients:
        check_settings(settings.gradients, settings.ig_steps, settings.ig_positions)
    sets, stats, grad_meta = [], {}, None
    for role, spec in [("target", target)] + [("distractor", d) for d in distractors]:
        everything = load_examples(spec, data_dir)
        chosen = sample(everything, settings.n, settings.seed)
        texts = [format_text(lm.tokenizer, ex, settings.template, settings.content) for ex in chosen]
        s = capture(lm.model, lm.tokenizer, texts, lm.adapter, max_length=settings.max_length,
                    batch_size=settings.batch_size, keep_per_prompt=settings.keep_per_prompt,
                    progress=progress, desc=f"capture {role} {spec}")
        if role == "target" and settings.gradients:
            lengths = None
            if settings.ig_positions == "answer" and "ig" in settings.gradients:
                prompts = [format_text(lm.tokenizer, ex, settings.template, "prompt") for ex in chosen]
                lengths = prompt_token_lengths(lm.tokenizer, texts, prompts)
            s.extra.update(gradient_stats(
                lm.model, lm.tokenizer, texts, lm.adapter, kinds=settings.gradients, max_length=settings.max_length,
                batch_size=settings.grad_batch_size, max_prompts=settings.grad_prompts, ig_steps=settings.ig_steps,
                ig_threshold=settings.ig_threshold, ig_positions=settings.ig_positions, prompt_lengths=lengths,
                progress=progress, desc=f"gradients {spec}"))
            grad_meta = {"kinds": list(settings.gradients), "set": spec,
                         "prompts": min(len(texts), settings.grad_prompts or len(texts)),
                         "batch_size": settings.grad_batch_size, "ig_steps": settings.ig_steps,
                         "ig_threshold": settings.ig_threshold, "ig_positions": settings.ig_positions,
                         "ig_rule": "midpoint", "loss": "per text, sum of next-token cross-entropy over its positions"}
        stats[spec] = s
        sets.append({"name": spec, "role": role, "n": len(chosen), "available": len(everything),
                     "truncated": s.truncated, "ids": [ex.id for ex in chosen]})
        if progress and s.truncated:
            print(f"{spec}: {s.truncated} of {len(chosen)} prompts were cut to {settings.max_length} tokens")
    mlps = lm.adapter.mlps(lm.model)
    meta = {
        "model": {"spec": lm.source.get("spec"), "kind": lm.source.get("kind"), "revision": lm.source.get("revision"),
                  "model_type": lm.model.config.model_type, "config_hash": config_hash(lm.model.config),
                  "num_layers": len(mlps), "d_ff": lm.adapter.down_proj(mlps[0]).in_features},
        "sets": sets,
        "capture": {"n": settings.n, "seed": settings.seed, "max_length": settings.max_length,
                    "template": settings.template, "content": settings.content,
                    "dtype": str(next(lm.model.parameters()).dtype).removeprefix("torch."),
                    "statistic": "prompt-level mean of |h| over valid tokens; token sums of h and h^2",
                    **({"gradients": grad_meta} if grad_meta else {})},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "taskprune_version": __version__,
    }
    return Profile(meta=meta, stats=stats)


def plan_from_profile(profile: Profile | None, scorer: str, strategy: str, ratio: float, align: int = 128,
                      seed: int | None = None, model: nn.Module | None = None, adapter=None,
                      shape: tuple[int, int] | None = None) -> tuple[Plan, torch.Tensor | None]:
    """Scores (unless the strategy is random) and the resulting plan."""
    if strategy == "random":
        shape = shape or (profile.num_layers, profile.d_ff)
        return make_plan(None, "random", ratio, align, seed, shape=shape), None
    if profile is None:
        raise ValueError(f"strategy {strategy!r} needs a profile (or --target/--distractor to capture one)")
    scores = score(scorer, profile, model=model, adapter=adapter)
    return make_plan(scores, strategy, ratio, align, seed), scores


def prune_in_memory(lm: LoadedModel, plan: Plan) -> nn.Module:
    """Prune `lm.model` in place (the in-memory API); returns the pruned model."""
    return prune_model(lm.model, lm.adapter, plan)


def prune_and_save(lm: LoadedModel, plan: Plan, out: Path, scorer: str, profile: Profile | None = None,
                   profile_path: Path | None = None, overwrite: bool = False) -> dict:
    """Prune `lm.model` in place and save it with its `pruning.json`; returns that record."""
    check_replaceable(out, "checkpoint", overwrite)  # fail before the work, not after
    before = parameter_count(lm.model)
    prune_model(lm.model, lm.adapter, plan)
    record = {
        "source_model": {k: lm.source.get(k) for k in ("spec", "kind", "revision")},
        "profile": None if profile is None else {
            "path": str(profile_path) if profile_path else None,
            "hash": profile_hash(profile_path) if profile_path else None,
            "target": profile.target, "distractors": profile.distractors,
            "capture": profile.meta["capture"]},
        "scorer": scorer if plan.strategy != "random" else None,
        "plan": plan.to_dict(),
        "parameters": {"before": before, "after": parameter_count(lm.model)},
    }
    save_pruned(lm.model, lm.tokenizer, out, record, overwrite=overwrite)
    return record


__all__ = ["CaptureSettings", "capture_profile", "plan_from_profile", "prune_in_memory", "prune_and_save",
           "load_profile", "save_profile"]
