"""`sar-scale` entry point: a thin dispatcher; every subcommand lives in its own module.

Each module exposes ``main(argv: list[str]) -> int`` with its own argparse (``--help`` there).
Modules are imported lazily so ``sar-scale --help`` is instant and a heavy import (Ray,
DeepSpeed) only happens for the command that needs it.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("sar_scale.demo", "run the whole system end to end on embedded defaults (CPU)"),
    "data": ("pipelines.cli", "data jobs: `data synth` (shapes dataset), `data prepare` (Ray -> shards)"),
    "tokenizer": ("sar_scale.tokenizers.cli", "image tokenizer: `tokenizer train|eval` (small VQ)"),
    "train": ("sar_scale.training.cli", "train a SAR model with DeepSpeed ZeRO (any launcher)"),
    "export": ("sar_scale.export.cli", "consolidate a checkpoint into a safetensors release"),
    "generate": ("sar_scale.export.generate_cli", "sample images from an exported model"),
    "edit": ("sar_scale.export.edit_cli", "inpaint/outpaint an image with an exported model"),
    "eval": ("sar_scale.eval.cli", "evaluate a model (shapes accuracy, token NLL, FID)"),
    "sweep": ("sar_scale.sweep", "a grid of training recipes x inference plans x seeds -> FID/accuracy/speed table"),
    "dashboard": ("sar_scale.dashboard", "start the MLflow UI on a tracking store"),
    "submit": ("cluster.cli", "submit a job to local|slurm|ray|k8s"),
    "jobs": ("cluster.jobs_cli", "status|logs|cancel of submitted jobs"),
    "plan": ("cluster.plan", "size a training config: memory, tokens, step time, GPU-hours"),
    "sample": ("sar_scale.sar.cli", "quick SAR train+sample smoke run on random data (debug)"),
}


def _usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = [
        "usage: sar-scale COMMAND [ARGS...]",
        "",
        "Set AutoRegressive (SAR) text-to-image pretraining at scale.",
        "",
        "commands:",
    ]
    lines += [f"  {name.ljust(width)}  {desc}" for name, (_, desc) in COMMANDS.items()]
    lines += ["", "Run `sar-scale COMMAND --help` for the options of a command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from sar_scale import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"sar-scale: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
