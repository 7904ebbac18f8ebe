"""What each `taskprune` command does, given its parsed options (`taskprune.cli` builds the parser from
the settings objects and these functions' docstrings: the first line is the command's help, the rest its
description)."""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from taskprune.atomic import check_replaceable
from taskprune.options import from_args
from taskprune.settings import (CaptureSettings, DataDir, DataSets, EvalSettings, ExportSettings, ModelSettings,
                                PruneSettings, RecoverySettings, ScoreSettings)


def _data_dir(args) -> str | None:
    return from_args(DataDir, args).data_dir


def cmd_capture(args) -> int:
    """capture MLP activation statistics on target and distractor prompts

    Run target and distractor prompts through the model and stream per-neuron statistics of the SwiGLU
    intermediate (input of down_proj) to a profile."""
    from taskprune.pipeline import capture_profile, save_profile
    check_replaceable(args.out, "profile", args.overwrite)
    sets, lm = from_args(DataSets, args), from_args(ModelSettings, args).load()
    profile = capture_profile(lm, sets.target, list(sets.distractors), from_args(CaptureSettings, args),
                              _data_dir(args))
    save_profile(profile, args.out, overwrite=args.overwrite)
    print(f"profile written to {args.out}")
    return 0


def cmd_score(args) -> int:
    """score every neuron from a profile and summarise per layer

    Compute per-neuron scores (low = pruned first by the selective strategy)."""
    from taskprune.atomic import OutputExistsError, save_tensors
    from taskprune.info import score_lines
    from taskprune.profile import load_profile
    from taskprune.scoring import score
    if args.out is not None and args.out.is_dir():
        raise OutputExistsError(f"--out {args.out} is a directory; give a .safetensors file name")
    profile, scorer, options = load_profile(args.profile), from_args(ScoreSettings, args).scorer, {}
    model = from_args(ModelSettings, args)
    if model.model:
        from taskprune.models import config_hash
        lm = model.load()
        profile.check_model(config_hash(lm.model.config), where=str(args.profile))
        options = {"model": lm.model, "adapter": lm.adapter}
    scores = score(scorer, profile, **options)
    print("\n".join(score_lines(scorer, profile, scores)))
    if args.out:
        save_tensors({"scores": scores.contiguous()}, args.out, metadata={"scorer": scorer, "profile": str(args.profile)})
        print(f"scores written to {args.out}")
    return 0


def cmd_prune(args) -> int:
    """plan and physically prune; captures first when given --target/--distractor

    Remove the same number of MLP neurons from every layer (kept width a multiple of --align) and save a
    stock Hugging Face checkpoint with pruning.json. Example: taskprune prune --model qwen2.5-coder-0.5b
    --target gsm8k --distractor squad --ratio 0.2 --out out/"""
    from taskprune.pipeline import prune_checkpoint_to_disk, prune_to_disk
    check_replaceable(args.out, "checkpoint", args.overwrite)
    model, sets, prune = from_args(ModelSettings, args), from_args(DataSets, args), from_args(PruneSettings, args)
    if args.stream and sets.target:
        raise ValueError("--stream prunes without loading the model, so it cannot capture: give --profile")
    if args.profile and sets.target:
        raise ValueError("give either --profile or --target/--distractor, not both")
    if prune.strategy != "random" and not (args.profile or sets.target):
        raise ValueError(f"strategy {prune.strategy!r} needs --profile, or --target and --distractor to capture one")
    if sets.target and not sets.distractors:
        raise ValueError("--target needs at least one --distractor")
    scorer = from_args(ScoreSettings, args).scorer
    if args.stream:
        plan, record = prune_checkpoint_to_disk(Path(model.model), prune, scorer, args.out, args.profile,
                                                args.overwrite)
    else:
        plan, record = prune_to_disk(model.load(), prune, scorer, args.out, args.profile, sets,
                                     from_args(CaptureSettings, args), model.cache_dir, _data_dir(args), args.overwrite)
    p = record["parameters"]
    print(f"pruned {model.model}: d_ff {plan.d_ff} -> {plan.kept_width} in {len(plan.keep)} layers "
          f"(ratio {prune.ratio} nominal, {plan.exact_ratio:.4f} exact; strategy {plan.strategy})")
    print(f"parameters {p['before']:,} -> {p['after']:,} ({1 - p['after'] / p['before']:.1%} fewer)")
    print(f"saved to {args.out}")
    return 0


def cmd_info(args) -> int:
    """describe a profile or a pruned checkpoint"""
    from taskprune.info import describe
    print("\n".join(describe(args.path)))
    return 0


def cmd_generate(args) -> int:
    """greedy generation from a model or checkpoint (a quick look)"""
    from taskprune.evaluate.generate import generate
    from taskprune.evaluate.runner import chat_prompt
    lm = from_args(ModelSettings, args).load()
    prompt = chat_prompt(lm.tokenizer, args.prompt)
    print(generate(lm.model, lm.tokenizer, [prompt], args.max_new_tokens, progress=False)[0].output)
    return 0


def cmd_eval(args) -> int:
    """evaluate a model: task accuracy, distractor similarity, traps, speed, memory

    Greedy, batched evaluation with one JSONL record per sample (re-running skips finished samples) and a
    summary.json. Tasks: {tasks}, and mc:SET for multiple-choice log-likelihood scoring (acc, acc_norm as
    lm-evaluation-harness; {mc_sets})."""
    from taskprune.evaluate.backends import require_backend
    from taskprune.evaluate.references import similarity_inputs
    from taskprune.evaluate.runner import evaluate
    from taskprune.evaluate.tasks import get_task
    model, settings = from_args(ModelSettings, args), from_args(EvalSettings, args)
    for name in settings.tasks:  # fail on a typo before loading anything
        get_task(name)
    require_backend(settings.backend)
    if args.overwrite:
        check_replaceable(args.out, "eval")
    references, similarity = similarity_inputs(model, settings, args.reference_model, _data_dir(args))
    lm = model.load()
    if args.overwrite and args.out.exists():  # only now: a model that fails to load loses nothing
        shutil.rmtree(args.out)
    summary = evaluate(lm, list(settings.tasks), args.out, settings, references, similarity, data_dir=_data_dir(args),
                       cache_dir=model.cache_dir)
    r = summary["resources"]
    peak = (f"{r['peak_memory_bytes'] / 2**30:.2f} GiB (weights {r['weight_bytes'] / 2**30:.2f} + working set)"
            if r["peak_memory_bytes"] is not None else "not measurable here")
    batch1 = ("" if r["peak_memory_batch1_bytes"] is None else
              f" at {r['peak_memory_batch1_bytes'] / 2**30:.2f} GiB")
    print(f"parameters {r['parameters']:,}; peak memory {peak}; batch-1 decode {r['tokens_per_s_batch1'] or 0:.1f} "
          f"tokens/s{batch1}")
    print(f"per-sample records and summary.json in {args.out}")
    return 0


def cmd_recover(args) -> int:
    """LoRA recovery of a pruned model, merged back (rerun the same command to resume)

    Fine-tune LoRA adapters on q,k,v,o,gate,up,down with the paper's presets (dropout 0.1, 2 epochs), merge
    them and save a stock checkpoint at the pruned width. Interrupted? Rerun the same command to resume
    from the last checkpoint."""
    from taskprune.recover import recover
    model, settings = from_args(ModelSettings, args), from_args(RecoverySettings, args)
    recover(model.model, settings.preset, args.out, config=settings.config(), data=settings.data,
            data_dir=_data_dir(args), dtype=model.dtype, device=model.device, cache_dir=model.cache_dir,
            overwrite=args.overwrite, progress=not args.quiet)
    return 0


def cmd_run(args) -> int:
    """run a whole study from a YAML config (resumable) and write its report

    Capture once, then prune, (recover,) and evaluate every cell of the config; one SQLite row per
    variant x task. Kill it and run it again to continue. --executor ray runs each cell as a Ray task with
    the config's resources (num_gpus, num_cpus per cell); the study directory must be a path every worker
    sees."""
    from taskprune.config import load_config
    from taskprune.executors import make_executor
    from taskprune.sweep import run_study
    executor = make_executor(args.executor, args.address)  # Ray missing or a stray --address: said now
    cfg = load_config(args.config)
    if args.reference is not None:  # a bad reference file fails now, not after the study
        from taskprune.report.reference import load_reference
        load_reference(args.reference, [])
    run_dir, start = args.out or Path("runs") / cfg.name, time.perf_counter()
    run_study(cfg, run_dir, keep_checkpoints=args.keep_checkpoints, data_dir=_data_dir(args),
              tasks=tuple(args.tasks) if args.tasks else None, executor=executor, first=tuple(args.first or ()))
    if not args.no_report:
        cmd_report(argparse.Namespace(run_dir=run_dir, out=None, reference=args.reference, benchmark=[]))
    print(f"study {cfg.name} finished in {time.perf_counter() - start:.0f} s; results in {run_dir / 'results.sqlite'}")
    return 0


def cmd_report(args) -> int:
    """write the Markdown and HTML report of a study directory"""
    from taskprune.report import write_report
    if not (args.run_dir / "results.sqlite").is_file():
        raise FileNotFoundError(f"{args.run_dir} has no results.sqlite; run a study first (taskprune run CONFIG)")
    md, html = write_report(args.run_dir, args.out, args.reference, args.benchmark)
    print(f"report: {html} (Markdown: {md})")
    return 0


def cmd_export(args) -> int:
    """export a checkpoint as GGUF for llama.cpp, Ollama and LM Studio (with an Ollama Modelfile)

    Write the (pruned) checkpoint as one GGUF file: its tensors, the architecture metadata llama.cpp reads
    (feed_forward_length is the pruned width), the tokenizer and chat template, and pruning.json's
    essentials under taskprune.* keys. --quant f32, f16, bf16 and q8_0 are written by the gguf library,
    q4_k_m by llama.cpp's quantizer (make gguf builds it). Beside it a Modelfile (the chat template as
    Ollama's TEMPLATE, stop tokens, greedy decoding as in taskprune eval): ollama create NAME -f Modelfile.
    Architectures: {archs}. Example: taskprune export --model out/ --out coder-pruned.gguf --quant q8_0"""
    from taskprune.export import export_gguf, write_modelfile
    from taskprune.export.gguf import ExportError, check_output
    from taskprune.export.modelfile import check_modelfile
    settings, model = from_args(ExportSettings, args), from_args(ModelSettings, args)
    if args.out.suffix != ".gguf":
        raise ExportError(f"--out {args.out} must name a .gguf file")
    check_output(args.out, args.overwrite)
    modelfile = args.out.parent / "Modelfile"
    if settings.modelfile:
        check_modelfile(modelfile, args.overwrite)
    ckpt = _checkpoint_dir(model)
    summary = export_gguf(ckpt, args.out, settings.quant)
    print(f"wrote {args.out} ({summary['quant']}, {summary['bytes'] / 2**20:.1f} MiB, {summary['tensors']} tensors; "
          f"{summary['architecture']}, feed_forward_length {summary['feed_forward_length']})")
    if settings.modelfile:
        write_modelfile(ckpt, args.out, modelfile)
        print(f"Ollama: ollama create NAME -f {modelfile}")
    return 0


def _checkpoint_dir(model: ModelSettings) -> Path:
    """The local checkpoint directory of a model spec (a packaged name or .gguf is converted once; a hub id is
    fetched into the Hugging Face cache)."""
    from taskprune.models.load import hub_offline, resolve_model_path
    path, source = resolve_model_path(model.model, model.cache_dir)
    if source["kind"] != "hub":
        return Path(path)
    from huggingface_hub import snapshot_download
    return Path(snapshot_download(path, local_files_only=hub_offline()))
