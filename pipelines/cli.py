"""`sar-scale data ...`: dispatches to the data jobs.

    sar-scale data synth   --out DIR --n N --seed S [--two-objects]   (synthetic shapes folder)
    sar-scale data prepare CONFIG.yaml [key=value ...] [--ray-address ADDR]   (Ray -> shards)
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("sar_scale.data.synthetic", "write the synthetic 'shapes' image folder (+ labels.jsonl)"),
    "prepare": ("pipelines.prepare", "filter + bucket + tokenize inputs into webdataset shards (Ray)"),
}


def _usage() -> str:
    lines = ["usage: sar-scale data SUBCOMMAND [ARGS...]", "", "subcommands:"]
    lines += [f"  {k.ljust(8)} {v[1]}" for k, v in SUBCOMMANDS.items()]
    lines += ["", "Run `sar-scale data SUBCOMMAND --help` for its options."]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"sar-scale data: unknown subcommand {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    return int(importlib.import_module(SUBCOMMANDS[name][0]).main(rest) or 0)
