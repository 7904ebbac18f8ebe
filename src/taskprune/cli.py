"""The `taskprune` command line: one subcommand per stage, each a function of `taskprune.commands`
whose docstring is its help and whose options are derived from the settings objects in
`taskprune.settings` (the ones a study config embeds).

    taskprune capture  --model M --target T --distractor D --out PROFILE
    taskprune score    --profile PROFILE [--scorer selectivity] [--out scores.safetensors]
    taskprune prune    --model M (--profile PROFILE | --target T --distractor D) --ratio R --out DIR
    taskprune info     PROFILE_OR_CHECKPOINT
    taskprune eval     --model M --tasks gsm8k,humaneval,squad-sim,dialogue-sim --limit N --out DIR
    taskprune generate --model M --prompt TEXT
    taskprune recover  --model PRUNED --preset code|math --out DIR
    taskprune run      CONFIG.yaml [--out RUN_DIR] [--executor local|ray [--address ADDR]]
    taskprune report   RUN_DIR
    taskprune export   --model CHECKPOINT --out FILE.gguf [--quant f16|f32|bf16|q8_0|q4_k_m]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from taskprune import __version__
from taskprune.commands import (cmd_capture, cmd_eval, cmd_export, cmd_generate, cmd_info, cmd_prune, cmd_recover,
                                cmd_report, cmd_run, cmd_score)
from taskprune.errors import one_line, user_errors
from taskprune.options import Items, add_options, number
from taskprune.settings import (CaptureSettings, DataDir, DataSets, EvalSettings, ExportSettings, ModelSettings,
                                PruneSettings, RecoverySettings, ScoreSettings)

EPILOG = ("Models: a hub id, a local HF directory, a .gguf file, or a packaged name (smollm2-135m, "
          "qwen2.5-coder-0.5b, qwen2.5-coder-1.5b).")


class _Parser(argparse.ArgumentParser):
    """Usage errors on one line, `taskprune COMMAND: error: ...`, exit code 2 (subcommands inherit it)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Formatter(argparse.HelpFormatter):
    """Wraps each line of a description or epilog on its own (so a table of scorers keeps its rows)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n".join(super(_Formatter, self)._fill_text(line, width, indent) for line in text.splitlines())


def _command(sub, func, *settings: type, epilog: str = "", **fill) -> argparse.ArgumentParser:
    """A subcommand from `func` (its docstring: help line, then description) with `settings`' options."""
    summary, _, description = (func.__doc__ or "").partition("\n\n")
    p = sub.add_parser(func.__name__.removeprefix("cmd_"), help=summary.strip(), epilog=epilog + EPILOG,
                       description=" ".join(description.format(**fill).split()) or summary.strip(),
                       formatter_class=_Formatter)
    for cls in settings:
        add_options(p, cls)
    p.set_defaults(func=func)
    return p


def _out(p, what: str, kind: str | None = None) -> None:
    p.add_argument("--out", type=Path, required=True, help=what)
    if kind:
        p.add_argument("--overwrite", action="store_true",
                       help=f"replace --out if it is {kind} or empty; anything else is refused")


def _reference(p) -> None:
    p.add_argument("--reference", type=Path, default=None,
                   help="published numbers to print beside the study's (e.g. references/arxiv-2604.27115.yaml)")


def build_parser() -> argparse.ArgumentParser:
    from taskprune.data.multiple_choice import MC_SETS
    from taskprune.evaluate.tasks import MC_PREFIX, TASKS
    from taskprune.executors import EXECUTORS
    from taskprune.scoring import scorer_help
    parser = _Parser(prog="taskprune", description="Task-specific structured pruning of LLM MLP neurons "
                                                   "(arXiv 2604.27115).", epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"taskprune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _command(sub, cmd_capture, ModelSettings, DataSets, DataDir, CaptureSettings)
    _out(p, "profile directory to write", "a profile (has profile.json)")

    scorers = f"Scorers (low scores are pruned first by the selective strategy):\n{scorer_help()}\n\n"
    p = _command(sub, cmd_score, epilog=scorers)
    p.add_argument("--profile", type=Path, required=True, help="profile directory from taskprune capture")
    add_options(p, ScoreSettings)
    add_options(p, ModelSettings, required=False)
    p.add_argument("--out", type=Path, default=None, help="optional .safetensors file for the [layers, d_ff] scores")

    p = _command(sub, cmd_prune, ModelSettings, ScoreSettings, PruneSettings, epilog=scorers)
    p.add_argument("--profile", type=Path, default=None, help="a profile from taskprune capture")
    p.add_argument("--stream", action="store_true", help="prune a local safetensors checkpoint shard by shard without "
                   "loading the model (memory: about two shards; with --profile, or --strategy random)")
    group = p.add_argument_group("capture, when there is no --profile (cached for the next prune)")
    for cls in (DataSets, DataDir, CaptureSettings):
        add_options(group, cls, required=False)
    _out(p, "output checkpoint directory", "a pruned checkpoint (has pruning.json)")

    p = _command(sub, cmd_eval, ModelSettings, EvalSettings, DataDir, tasks=", ".join(TASKS),
                 mc_sets=", ".join(MC_PREFIX + name for name in (*MC_SETS, "mmlu-SUBJECT")))
    p.add_argument("--reference-model", default=None, help="unpruned model for the similarity tasks (default: the "
                   "source in pruning.json, or the model itself when it is unpruned)")
    _out(p, "evaluation directory (re-use it to resume; records made by another model or with other settings are "
            "refused)", "an evaluation directory taskprune wrote (start again)")

    p = _command(sub, cmd_recover, ModelSettings, DataDir)
    add_options(p, RecoverySettings, required=("preset",))
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _out(p, "output checkpoint directory", "a recovered checkpoint (has recovery.json)")

    p = _command(sub, cmd_run, DataDir)
    p.add_argument("config", type=Path, help="study config, e.g. configs/demo.yaml")
    p.add_argument("--out", type=Path, default=None,
                   help="study directory: new, empty, or this study's to resume (default runs/<config name>)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep pruned/recovered checkpoints on disk")
    p.add_argument("--no-report", action="store_true", help="skip writing the report at the end")
    p.add_argument("--tasks", action=Items, default=None, help="evaluate only these of the config's tasks in "
                   "this run (comma-separated), e.g. a held-out task for every cell first; a later run without "
                   "--tasks fills in the rest")
    p.add_argument("--first", action=Items, default=None, metavar="VARIANTS",
                   help="run these variants (comma-separated names as in the report, e.g. reverse-selectivity-r0.2) "
                   "before the config's own `first` list in this run; the order is not part of the study's "
                   "identity, so a study resumes under any order")
    p.add_argument("--executor", choices=EXECUTORS, default="local", help="where the jobs run: local (this process, "
                   "one after another; the default) or ray (each job a Ray task with the config's resources; needs "
                   "pip install 'taskprune[ray]')")
    p.add_argument("--address", default=None, help="with --executor ray: the Ray cluster to join (auto, or "
                   "HOST:PORT); default: start a local Ray instance")
    _reference(p)
    p = _command(sub, cmd_report)
    p.add_argument("run_dir", type=Path, help="a study directory made by taskprune run")
    p.add_argument("--out", type=Path, default=None, help="where to write the report (default: the study directory)")
    _reference(p)
    p.add_argument("--benchmark", type=Path, action="append", default=[],
                   help="a benchmark's --json file to show in the Speed section (repeat for several), beside the "
                        "study's own RUN_DIR/benchmarks/*.json")

    _command(sub, cmd_info).add_argument("path", type=Path, help="profile directory or checkpoint directory")

    p = _command(sub, cmd_generate, ModelSettings)
    p.add_argument("--prompt", required=True, help="user message (sent through the chat template if there is one)")
    p.add_argument("--max-new-tokens", type=number(int, 1), default=128, help="default 128")

    from taskprune.export.gguf import supported
    p = _command(sub, cmd_export, archs=supported())
    add_options(p, ModelSettings, only=("model", "cache_dir"))
    add_options(p, ExportSettings)
    p.add_argument("--out", type=Path, required=True, help="the .gguf file to write (the Modelfile goes beside it)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it is a GGUF file (and the Modelfile "
                   "beside it if taskprune wrote it); anything else is refused")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, --version, or a usage error (already reported on one line)
        return done.code if isinstance(done.code, int) else 0 if done.code is None else 2
    try:
        return args.func(args)
    except user_errors() as err:
        print(f"taskprune {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
