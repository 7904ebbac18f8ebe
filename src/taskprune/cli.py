"""The `taskprune` command: one subcommand per stage.

    taskprune capture  --model M --target T --distractor D --out PROFILE
    taskprune score    --profile PROFILE [--scorer selectivity] [--out scores.safetensors]
    taskprune prune    --model M (--profile PROFILE | --target T --distractor D) --ratio R --out DIR
    taskprune info     PROFILE_OR_CHECKPOINT
    taskprune eval     --model M --tasks gsm8k,humaneval,squad-sim,dialogue-sim --limit N --out DIR
    taskprune generate --model M --prompt TEXT
    taskprune recover  --model PRUNED --preset code|math --out DIR
    taskprune run      CONFIG.yaml [--out RUN_DIR]
    taskprune report   RUN_DIR
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

from taskprune import __version__
from taskprune.atomic import check_replaceable

EPILOG = ("Models: a hub id, a local HF directory, a .gguf file, or a packaged name (smollm2-135m, "
          "qwen2.5-coder-0.5b, qwen2.5-coder-1.5b).")


def _split_sets(values: list[str] | None) -> list[str]:
    return [v for value in values or [] for v in value.split(",") if v]


class _Parser(argparse.ArgumentParser):
    """Usage errors on one line, `taskprune COMMAND: error: ...`, exit code 2 (subcommands inherit it)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(kind, low=None, high=None, low_open=False, high_open=False):
    """An argparse type: `kind` (int or float) within the bounds, else a message saying which."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if kind is float and value != value:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number")
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            if low is not None and high is not None:
                if low_open and high_open:
                    want = f"strictly between {low:g} and {high:g}"
                else:
                    want = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            elif low is not None:
                want = f"{'greater than' if low_open else 'at least'} {low:g}"
            else:
                want = f"{'less than' if high_open else 'at most'} {high:g}"
            raise argparse.ArgumentTypeError(f"must be {want}, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


positive_int = _number(int, 1)  # n, batch sizes, lengths, steps, limits, epochs
non_negative_int = _number(int, 0)  # budgets and counts where 0 means "none"
positive_float = _number(float, 0, low_open=True)  # learning rates, timeouts
ratio = _number(float, 0, 1, low_open=True, high_open=True)
probability = _number(float, 0, 1)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="hub id, local HF dir, .gguf file or packaged name")
    p.add_argument("--dtype", default="auto",
                   help="auto (bf16 where the GPU/CPU supports it natively, else fp32), float32, bfloat16, float16")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="where converted GGUF models and profiles are cached (default ~/.cache/taskprune or $TASKPRUNE_CACHE)")


def _add_capture_args(p: argparse.ArgumentParser, required: bool) -> None:
    g = p.add_argument_group("capture")
    g.add_argument("--target", required=required,
                   help="target data set: gsm8k, mbpp, squad, humaneval, chitchat, NAME:SPLIT (e.g. mbpp:non-test, "
                        "every MBPP task but the test split), mc:SET[:SPLIT] (a multiple-choice set, e.g. "
                        "mc:arc-easy) or PATH.jsonl[:FIELD]")
    g.add_argument("--distractor", action="append", required=required,
                   help="distractor data set (repeat, or comma-separate, for several; they are pooled)")
    g.add_argument("--n", type=positive_int, default=128, help="prompts drawn per data set (default 128; the paper uses 800)")
    g.add_argument("--data-seed", type=int, default=0, help="seed for drawing prompts (default 0)")
    g.add_argument("--max-length", type=positive_int, default=512, help="prompts are cut to this many tokens (default 512)")
    g.add_argument("--template", choices=["chat", "raw"], default="chat",
                   help="feed prompts through the chat template (default) or as raw text")
    g.add_argument("--content", choices=["prompt", "prompt+response"], default="prompt",
                   help="capture over the prompt only (the paper) or prompt plus reference response")
    g.add_argument("--batch-size", type=positive_int, default=8, help="capture batch size (default 8)")
    g.add_argument("--data-dir", default=None, help="folder with offline data copies (default $TASKPRUNE_DATA)")
    g = p.add_argument_group("gradient pass (for the taylor, taylor-abs and ig scorers)")
    g.add_argument("--gradients", default="", help="comma-separated: taylor, ig (default none; the one-shot "
                                                   "prune adds what --scorer needs)")
    g.add_argument("--grad-prompts", type=positive_int, default=None, help="target prompts in the gradient pass (default all --n)")
    g.add_argument("--grad-batch-size", type=positive_int, default=4, help="default 4")
    g.add_argument("--ig-steps", type=positive_int, default=20, help="integrated-gradients steps m (default 20)")
    g.add_argument("--ig-threshold", type=probability, default=0.5,
                   help="IG uses positions whose greedy next token has at least this probability (default 0.5)")
    g.add_argument("--ig-positions", choices=["all", "answer"], default="all",
                   help="IG over all positions or from the last prompt token on (default all)")


def _settings(args):
    from taskprune.pipeline import CaptureSettings
    from taskprune.scoring import NEEDS_GRADIENTS
    gradients = set(_split_sets([args.gradients]))
    if getattr(args, "scorer", None) in NEEDS_GRADIENTS:
        gradients.add(NEEDS_GRADIENTS[args.scorer])
    return CaptureSettings(n=args.n, seed=args.data_seed, max_length=args.max_length, template=args.template,
                           content=args.content, batch_size=args.batch_size,
                           keep_per_prompt=getattr(args, "keep_per_prompt", False),
                           gradients=tuple(sorted(gradients)), grad_prompts=args.grad_prompts,
                           grad_batch_size=args.grad_batch_size, ig_steps=args.ig_steps,
                           ig_threshold=args.ig_threshold, ig_positions=args.ig_positions)


def cmd_capture(args) -> int:
    from taskprune.models import load_model
    from taskprune.pipeline import capture_profile, save_profile
    check_replaceable(args.out, "profile", args.overwrite)
    lm = load_model(args.model, args.dtype, args.device, args.cache_dir)
    profile = capture_profile(lm, args.target, _split_sets(args.distractor), _settings(args), args.data_dir)
    save_profile(profile, args.out, overwrite=args.overwrite)
    print(f"profile written to {args.out}")
    return 0


def cmd_score(args) -> int:
    from taskprune.atomic import OutputExistsError, save_tensors
    from taskprune.profile import load_profile
    from taskprune.scoring import score
    if args.out is not None and args.out.is_dir():
        raise OutputExistsError(f"--out {args.out} is a directory; give a .safetensors file name")
    profile = load_profile(args.profile)
    options = {}
    if args.model:
        from taskprune.models import config_hash, load_model
        lm = load_model(args.model, args.dtype, args.device, args.cache_dir)
        profile.check_model(config_hash(lm.model.config), where=str(args.profile))
        options = {"model": lm.model, "adapter": lm.adapter}
    scores = score(args.scorer, profile, **options)
    print(f"{args.scorer} scores, {profile.num_layers} layers x {profile.d_ff} neurons "
          f"(target {profile.target}; distractors {', '.join(profile.distractors)}); low scores are pruned first")
    print("layer  positive(S>0)  negative(S<0)  min      max")
    for i, row in enumerate(scores):
        print(f"{i:5d}  {int((row > 0).sum()):13d}  {int((row < 0).sum()):13d}  {row.min():7.3g}  {row.max():7.3g}")
    if args.out:
        save_tensors({"scores": scores.contiguous()}, args.out,
                     metadata={"scorer": args.scorer, "profile": str(args.profile)})
        print(f"scores written to {args.out}")
    return 0


def _cached_profile(lm, args):
    """One-shot mode: reuse a profile captured with the same model and settings, else capture and cache it."""
    from taskprune.models import config_hash
    from taskprune.models.load import default_cache_dir
    from taskprune.pipeline import capture_profile, load_profile, save_profile
    settings = _settings(args)
    key = json.dumps([config_hash(lm.model.config), lm.source.get("spec"), args.target,
                      _split_sets(args.distractor), settings.__dict__, str(lm.model.dtype)], sort_keys=True)
    path = (args.cache_dir or default_cache_dir()) / "profiles" / hashlib.sha256(key.encode()).hexdigest()[:16]
    if (path / "profile.json").is_file():
        print(f"reusing cached profile {path}")
        return load_profile(path), path
    profile = capture_profile(lm, args.target, _split_sets(args.distractor), settings, args.data_dir)
    save_profile(profile, path, overwrite=True)
    return profile, path


def cmd_prune(args) -> int:
    from taskprune.models import config_hash, load_model
    from taskprune.pipeline import load_profile, plan_from_profile, prune_and_save
    from taskprune.plan import pruned_count
    check_replaceable(args.out, "checkpoint", args.overwrite)
    if args.profile and args.target:
        raise ValueError("give either --profile or --target/--distractor, not both")
    if args.strategy != "random" and not (args.profile or args.target):
        raise ValueError(f"strategy {args.strategy!r} needs --profile, or --target and --distractor to capture one")
    if args.target and not args.distractor:
        raise ValueError("--target needs at least one --distractor")
    lm = load_model(args.model, args.dtype, args.device, args.cache_dir)
    mlps = lm.adapter.mlps(lm.model)
    d_ff = lm.adapter.down_proj(mlps[0]).in_features
    pruned_count(d_ff, args.ratio, args.align)  # validate the ratio before any capture
    profile, profile_path = None, None
    if args.profile:
        profile, profile_path = load_profile(args.profile), args.profile
        profile.check_model(config_hash(lm.model.config), where=str(args.profile))
    elif args.target:
        profile, profile_path = _cached_profile(lm, args)
    plan, _ = plan_from_profile(profile, args.scorer, args.strategy, args.ratio, args.align, args.seed,
                                model=lm.model, adapter=lm.adapter, shape=(len(mlps), d_ff))
    record = prune_and_save(lm, plan, args.out, args.scorer, profile, profile_path, overwrite=args.overwrite)
    p = record["parameters"]
    print(f"pruned {args.model}: d_ff {plan.d_ff} -> {plan.kept_width} in {len(plan.keep)} layers "
          f"(ratio {args.ratio} nominal, {plan.exact_ratio:.4f} exact; strategy {plan.strategy})")
    print(f"parameters {p['before']:,} -> {p['after']:,} ({1 - p['after'] / p['before']:.1%} fewer)")
    print(f"saved to {args.out}")
    return 0


def cmd_info(args) -> int:
    path = args.path
    if (path / "profile.json").is_file():
        from taskprune.profile import load_profile, profile_hash
        from taskprune.scoring import score
        profile = load_profile(path)
        m, c = profile.meta["model"], profile.meta["capture"]
        print(f"profile {path} (hash {profile_hash(path)}, format {profile.meta['format_version']})")
        print(f"  model {m.get('spec')} ({m.get('model_type')}, revision {m.get('revision')}, config hash "
              f"{m['config_hash']}), {m['num_layers']} layers x d_ff {m['d_ff']}")
        print(f"  capture: template {c.get('template')}, content {c.get('content')}, max length "
              f"{c.get('max_length')}, dtype {c.get('dtype')}, seed {c.get('seed')}")
        for s in profile.meta["sets"]:
            st = profile.stats[s["name"]]
            print(f"  {s['role']:10s} {s['name']}: {st.n} prompts of {s.get('available')}, {st.tokens} tokens, "
                  f"{st.truncated} truncated")
        if profile.distractors:
            sel = score("selectivity", profile)
            print(f"  selectivity: {int((sel > 0).sum())} target-leaning and {int((sel < 0).sum())} "
                  f"distractor-leaning neurons in all")
        return 0
    if (path / "pruning.json").is_file():
        rec = _read_json(path / "pruning.json")
        try:
            print("\n".join(_pruned_lines(path, rec)))
        except (KeyError, TypeError, ValueError) as err:  # a record edited or written by something else
            raise ValueError(f"{path / 'pruning.json'} is not the record taskprune writes ({type(err).__name__}: "
                             f"{err}); prune the checkpoint again") from None
        return 0
    if (path / "config.json").is_file():
        cfg = _read_json(path / "config.json")
        print(f"unpruned checkpoint {path}: {cfg.get('model_type')}, d_ff {cfg.get('intermediate_size')}, "
              f"{cfg.get('num_hidden_layers')} layers")
        return 0
    raise FileNotFoundError(f"{path} is neither a profile (profile.json) nor a checkpoint (config.json)")


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON ({getattr(err, 'msg', err)}); it is damaged") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file} does not hold a JSON object; it is damaged")
    return data


def _pruned_lines(path: Path, rec: dict) -> list[str]:
    p, src = rec["plan"], rec["source_model"]
    lines = [f"pruned checkpoint {path}",
             f"  source {src['spec']} ({src['kind']}, revision {src['revision']})",
             f"  strategy {p['strategy']}, scorer {rec['scorer']}, seed {p['seed']}, ratio {p['ratio_nominal']} "
             f"nominal / {p['ratio_exact']:.4f} exact, align {p['align']}",
             f"  d_ff {p['d_ff']} -> {p['kept_width']} in {len(p['keep'])} layers",
             f"  parameters {rec['parameters']['before']:,} -> {rec['parameters']['after']:,}"]
    if rec.get("profile"):
        pr = rec["profile"]
        lines.append(f"  profile {pr['path']} (hash {pr['hash']}): target {pr['target']}, "
                     f"distractors {', '.join(pr['distractors'])}")
    return lines


def cmd_generate(args) -> int:
    import torch

    from taskprune.models import load_model
    lm = load_model(args.model, args.dtype, args.device, args.cache_dir)
    tok = lm.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                   add_generation_prompt=True) if tok.chat_template else args.prompt
    inputs = tok(text, return_tensors="pt", add_special_tokens=False).to(lm.model.device)
    with torch.inference_mode():
        out = lm.model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False,
                                temperature=None, top_p=None, top_k=None, pad_token_id=tok.pad_token_id)
    print(tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return 0


def cmd_eval(args) -> int:
    from taskprune.evaluate.references import reference_outputs, reference_spec
    from taskprune.evaluate.runner import EvalSettings, evaluate
    from taskprune.evaluate.tasks import get_task
    from taskprune.models import load_model
    tasks = _split_sets([args.tasks])
    kinds = [get_task(name).kind for name in tasks]  # fail on a typo before loading anything
    if args.overwrite:
        check_replaceable(args.out, "eval")
    settings = EvalSettings(limit=args.limit, batch_size=args.batch_size, trap_budget=args.trap_budget,
                            stop_at_boxed=args.stop_at_boxed, sandbox_timeout=args.sandbox_timeout,
                            require_isolation=args.require_isolation,
                            speed_prompts=args.speed_prompts, data_dir=args.data_dir,
                            max_new_tokens=args.max_new_tokens)
    similarity, references = None, None
    if "similarity" in kinds:
        from taskprune.evaluate.similarity import SimilarityScorer
        ref = args.reference_model or reference_spec(args.model)
        if ref is not None:
            references = reference_outputs(ref, tasks, settings, args.dtype, args.device, args.cache_dir)
        similarity = SimilarityScorer(cache_dir=args.cache_dir)
    lm = load_model(args.model, args.dtype, args.device, args.cache_dir)
    if args.overwrite and args.out.exists():  # only now: a model that fails to load loses nothing
        shutil.rmtree(args.out)
    summary = evaluate(lm, tasks, args.out, settings, references, similarity)
    r = summary["resources"]
    peak = (f"{r['peak_memory_bytes'] / 2**30:.2f} GiB (weights {r['weight_bytes'] / 2**30:.2f} + working set)"
            if r["peak_memory_bytes"] is not None else "not measurable here")
    print(f"parameters {r['parameters']:,}; peak memory {peak}; "
          f"batch-1 decode {r['tokens_per_s_batch1'] or 0:.1f} tokens/s")
    print(f"per-sample records and summary.json in {args.out}")
    return 0


def cmd_recover(args) -> int:
    from taskprune.recover import config_from_args, recover
    cfg = config_from_args(args.preset, max_examples=args.max_examples, epochs=args.epochs, lr=args.lr, r=args.r,
                           alpha=args.alpha, effective_batch_size=args.effective_batch_size,
                           micro_batch_size=args.micro_batch_size, max_length=args.max_length,
                           gradient_checkpointing=args.gradient_checkpointing or None, seed=args.seed,
                           save_every=args.save_every)
    recover(args.model, args.preset, args.out, config=cfg, data=args.data, data_dir=args.data_dir, dtype=args.dtype,
            device=args.device, cache_dir=args.cache_dir, overwrite=args.overwrite, progress=not args.quiet)
    return 0


def cmd_run(args) -> int:
    from taskprune.config import load_config
    from taskprune.sweep import run_study
    cfg = load_config(args.config)
    if args.reference is not None:  # a bad reference file fails now, not after the study
        from taskprune.report.reference import load_reference
        load_reference(args.reference, [])
    run_dir = args.out or Path("runs") / cfg.name
    start = time.perf_counter()
    tasks = tuple(_split_sets(args.tasks)) if args.tasks else None
    run_study(cfg, run_dir, keep_checkpoints=args.keep_checkpoints, data_dir=args.data_dir, tasks=tasks)
    if not args.no_report:
        from taskprune.report import write_report
        md, html = write_report(run_dir, reference=args.reference)
        print(f"report: {html} (Markdown: {md})")
    print(f"study {cfg.name} finished in {time.perf_counter() - start:.0f} s; results in {run_dir / 'results.sqlite'}")
    return 0


def cmd_report(args) -> int:
    from taskprune.report import write_report
    if not (args.run_dir / "results.sqlite").is_file():
        raise FileNotFoundError(f"{args.run_dir} has no results.sqlite; run a study first (taskprune run CONFIG)")
    md, html = write_report(args.run_dir, args.out, args.reference)
    print(f"report: {html} (Markdown: {md})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="taskprune", description="Task-specific structured pruning of LLM MLP neurons (arXiv 2604.27115).",
        epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"taskprune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("capture", help="capture MLP activation statistics on target and distractor prompts",
                       description="Run target and distractor prompts through the model and stream per-neuron "
                                   "statistics of the SwiGLU intermediate (input of down_proj) to a profile.",
                       epilog=EPILOG)
    _add_model_args(p)
    _add_capture_args(p, required=True)
    p.add_argument("--keep-per-prompt", action="store_true",
                   help="also store the [prompts x layers x d_ff] matrix of prompt means (large)")
    p.add_argument("--out", type=Path, required=True, help="profile directory to write")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it is a profile (has profile.json) or empty; anything else is refused")
    p.set_defaults(func=cmd_capture)

    from taskprune.scoring import DEFAULT_SCORER, SCORERS
    p = sub.add_parser("score", help="score every neuron from a profile and summarise per layer",
                       description="Compute per-neuron scores (low = pruned first by the selective strategy).")
    p.add_argument("--profile", type=Path, required=True, help="profile directory from taskprune capture")
    p.add_argument("--scorer", default=DEFAULT_SCORER, choices=sorted(SCORERS), help=f"default {DEFAULT_SCORER}")
    p.add_argument("--model", default=None, help="the profile's model, for scorers that read weights "
                                                 "(magnitude, wanda-sp, flap, taskaware, specific-importance)")
    p.add_argument("--dtype", default="auto", help="dtype to load --model in (default auto)")
    p.add_argument("--device", default=None)
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None, help="optional .safetensors file for the [layers, d_ff] scores")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("prune", help="plan and physically prune; captures first when given --target/--distractor",
                       description="Remove the same number of MLP neurons from every layer (kept width a multiple "
                                   "of --align) and save a stock Hugging Face checkpoint with pruning.json. "
                                   "Example: taskprune prune --model qwen2.5-coder-0.5b --target gsm8k "
                                   "--distractor squad --ratio 0.2 --out out/",
                       epilog=EPILOG)
    _add_model_args(p)
    p.add_argument("--profile", type=Path, default=None, help="a profile from taskprune capture")
    _add_capture_args(p, required=False)
    p.add_argument("--scorer", default=DEFAULT_SCORER, choices=sorted(SCORERS),
                   help=f"default {DEFAULT_SCORER}; selectivity is the paper's; see docs/scorers.md for all")
    p.add_argument("--strategy", default="selective", choices=["selective", "reverse", "random"],
                   help="selective: lowest scores go (default); reverse: highest go; random: seeded draw")
    p.add_argument("--ratio", type=ratio, required=True, help="fraction of d_ff to remove per layer, in (0, 1)")
    p.add_argument("--align", type=positive_int, default=128, help="kept width is a multiple of this (default 128)")
    p.add_argument("--seed", type=int, default=42, help="seed for --strategy random (default 42; the paper uses 42 and 33)")
    p.add_argument("--out", type=Path, required=True, help="output checkpoint directory")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it is a pruned checkpoint (has pruning.json) or empty; anything else is refused")
    p.set_defaults(func=cmd_prune)

    from taskprune.data.multiple_choice import MC_SETS
    from taskprune.evaluate.tasks import MC_PREFIX, TASKS
    mc_sets = ", ".join(MC_PREFIX + name for name in (*MC_SETS, "mmlu-SUBJECT"))
    p = sub.add_parser("eval", help="evaluate a model: task accuracy, distractor similarity, traps, speed, memory",
                       description="Greedy, batched evaluation with one JSONL record per sample (re-running "
                                   "skips finished samples) and a summary.json. Tasks: " + ", ".join(TASKS) +
                                   ", and mc:SET for multiple-choice log-likelihood scoring (acc, acc_norm as "
                                   f"lm-evaluation-harness; {mc_sets}).",
                       epilog=EPILOG)
    _add_model_args(p)
    p.add_argument("--tasks", default="gsm8k", help="comma-separated tasks (default gsm8k)")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="items per task: the first N (accuracy tasks) or a seeded draw of N (similarity tasks; "
                        "default 200 for those, all items for the others)")
    p.add_argument("--out", type=Path, required=True,
                   help="evaluation directory (re-use it to resume; records made by another model or with other "
                        "settings are refused)")
    p.add_argument("--overwrite", action="store_true",
                   help="start again: replace --out if it is an evaluation directory taskprune wrote")
    p.add_argument("--batch-size", type=positive_int, default=8, help="generation batch size (default 8)")
    p.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help="override every task's token budget (defaults: gsm8k 1024, humaneval/mbpp 512, similarity 128)")
    p.add_argument("--trap-budget", type=non_negative_int, default=1024,
                   help="generate up to this many tokens to detect outputs that never end (default 1024; "
                        "scores use each task's own budget; 0 = task budget only)")
    p.add_argument("--stop-at-boxed", action="store_true",
                   help="GSM8K: stop as soon as a complete \\boxed{} is written (the paper's custom criterion)")
    p.add_argument("--reference-model", default=None,
                   help="unpruned model for the similarity tasks (default: the source in pruning.json, "
                        "or the model itself when it is unpruned)")
    p.add_argument("--sandbox-timeout", type=positive_float, default=3.0, help="seconds per program (default 3)")
    p.add_argument("--require-isolation", action=argparse.BooleanOptionalAction, default=True,
                   help="refuse to run generated code unless the sandbox's kernel layers (unprivileged uid or "
                        "user namespace, read-only file system, PID and network namespaces, death signal) are all "
                        "in effect (default on; --no-require-isolation runs with what the machine has and says so "
                        "in the log and summary.json)")
    p.add_argument("--speed-prompts", type=non_negative_int, default=3, help="prompts for the batch-1 tokens/s figure (0: skip)")
    p.add_argument("--data-dir", default=None, help="folder with offline data copies (default $TASKPRUNE_DATA)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("recover", help="LoRA recovery of a pruned model, merged back (rerun the same command to resume)",
                       description="Fine-tune LoRA adapters on q,k,v,o,gate,up,down with the paper's presets "
                                   "(code: r 16, alpha 32, lr 2e-4, batch 16; math: r 8, alpha 16, lr 2e-5, batch 8; "
                                   "dropout 0.1, 2 epochs), merge them and save a stock checkpoint at the pruned "
                                   "width. Interrupted? Rerun the same command to resume from the last checkpoint.",
                       epilog=EPILOG)
    _add_model_args(p)
    p.add_argument("--preset", required=True, choices=["code", "math"], help="code: MBPP train; math: GSM8K train")
    p.add_argument("--out", type=Path, required=True, help="output checkpoint directory")
    p.add_argument("--data", default=None, help="training data instead of the preset's: gsm8k, mbpp, "
                                                "codefeedback (Hub) or a .jsonl/.json with prompt and response fields")
    p.add_argument("--data-dir", default=None, help="folder with offline data copies (default $TASKPRUNE_DATA)")
    p.add_argument("--max-examples", type=positive_int, default=None, help="cap the training examples")
    p.add_argument("--epochs", type=positive_int, default=None, help="default: the preset's (2)")
    p.add_argument("--lr", type=positive_float, default=None)
    p.add_argument("--r", type=positive_int, default=None, help="LoRA rank")
    p.add_argument("--alpha", type=positive_int, default=None, help="LoRA alpha")
    p.add_argument("--effective-batch-size", type=positive_int, default=None)
    p.add_argument("--micro-batch-size", type=positive_int, default=None, help="default 2 (gradient accumulation fills the rest)")
    p.add_argument("--max-length", type=_number(int, 2), default=None,
                   help="longer examples are dropped (default 512; at least 2)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--save-every", type=non_negative_int, default=None, help="checkpoint every N optimizer steps (default 50; 0: only at epoch ends)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it is a recovered checkpoint (has recovery.json) or empty; anything else "
                        "is refused")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_recover)

    p = sub.add_parser("run", help="run a whole study from a YAML config (resumable) and write its report",
                       description="Capture once, then prune, (recover,) and evaluate every cell of the config; "
                                   "one SQLite row per variant x task. Kill it and run it again to continue.")
    p.add_argument("config", type=Path, help="study config, e.g. configs/demo.yaml")
    p.add_argument("--out", type=Path, default=None,
                   help="study directory: new, empty, or this study's to resume (default runs/<config name>)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep pruned/recovered checkpoints on disk")
    p.add_argument("--no-report", action="store_true", help="skip writing the report at the end")
    p.add_argument("--tasks", action="append", default=None,
                   help="evaluate only these of the config's tasks in this run (comma-separated), e.g. a held-out "
                        "task for every cell first; a later run without --tasks fills in the rest")
    p.add_argument("--data-dir", default=None, help="folder with offline data copies (default $TASKPRUNE_DATA)")
    p.add_argument("--reference", type=Path, default=None,
                   help="published numbers for the report to print beside the study's "
                        "(e.g. references/arxiv-2604.27115.yaml)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("report", help="write the Markdown and HTML report of a study directory")
    p.add_argument("run_dir", type=Path, help="a study directory made by taskprune run")
    p.add_argument("--out", type=Path, default=None, help="where to write the report (default: the study directory)")
    p.add_argument("--reference", type=Path, default=None,
                   help="published numbers to print beside the study's (e.g. references/arxiv-2604.27115.yaml)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("info", help="describe a profile or a pruned checkpoint")
    p.add_argument("path", type=Path, help="profile directory or checkpoint directory")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("generate", help="greedy generation from a model or checkpoint (a quick look)")
    _add_model_args(p)
    p.add_argument("--prompt", required=True, help="user message (sent through the chat template if there is one)")
    p.add_argument("--max-new-tokens", type=positive_int, default=128)
    p.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, --version, or a usage error (already reported on one line)
        return done.code if isinstance(done.code, int) else 0 if done.code is None else 2
    from taskprune.config import ConfigError
    from taskprune.data import DataError
    from taskprune.evaluate.sandbox import SandboxUnavailable
    from taskprune.models import ModelLoadError, UnsupportedArchitectureError
    from taskprune.plan import PlanError
    from taskprune.profile import ProfileError
    from taskprune.recover import RecoveryError
    from taskprune.results import ResultsError
    try:
        return args.func(args)
    except (ConfigError, RecoveryError, DataError, ModelLoadError, UnsupportedArchitectureError, PlanError, ProfileError,
            ResultsError, SandboxUnavailable, ValueError) as err:
        message = _one_line(str(err))
    except OSError as err:  # the file system said no (read-only, full, permission, missing), named with its path
        message = _os_message(err)
    print(f"taskprune {args.command}: error: {message}", file=sys.stderr)
    return 2


_OS_FIX = {errno.EROFS: "write somewhere else (--out)",
           errno.ENOSPC: "free some space or write somewhere else (--out)",
           errno.EDQUOT: "free some space or write somewhere else (--out)",
           errno.EACCES: "write somewhere you may (--out) or fix the permissions",
           errno.EPERM: "write somewhere you may (--out) or fix the permissions",
           errno.ENOENT: "check the path",
           errno.ENOTDIR: "a part of the path is a file; check the path",
           errno.EISDIR: "give a file name"}


def _one_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(lines) or "failed"


def _os_message(err: OSError) -> str:
    """`PATH: what the system said; what to do` for an OSError with an errno, else its own message."""
    if err.errno is None or err.strerror is None:
        return _one_line(str(err))
    where = err.filename if err.filename is not None else "output"
    if err.filename2 is not None:
        where = f"{where} -> {err.filename2}"
    fix = _OS_FIX.get(err.errno)
    return f"{where}: {err.strerror}" + (f" ({fix})" if fix else "")


if __name__ == "__main__":
    sys.exit(main())
