"""Wall time per stage and the shapes accuracy of `sar-scale demo`; prints one JSON object.

Runs the real demo (a subprocess of the CLI) and reads its summary.json, adding the machine's
load average so a figure taken on a busy CPU is marked as such. Examples::

    .venv/bin/python benchmarks/bench_demo.py --workdir runs/bench-demo            # the 10-minute default
    .venv/bin/python benchmarks/bench_demo.py --workdir runs/bench-demo -- --minutes 30
    SAR_SCALE_CACHE=/tmp/empty .venv/bin/python benchmarks/bench_demo.py ...      # include VQ training
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/bench-demo")
    p.add_argument("demo_args", nargs="*", help="extra `sar-scale demo` flags (after --)")
    a = p.parse_args()
    load_before = os.getloadavg()
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "sar_scale.cli", "demo", "--workdir", a.workdir, "--fresh",
                           "--quiet", *a.demo_args], capture_output=True, text=True)
    wall = time.time() - t0
    summary_file = Path(a.workdir) / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    facts = summary.get("facts", {})
    ev = facts.get("eval", {})
    print(json.dumps({
        "benchmark": "demo", "args": a.demo_args, "exit_code": proc.returncode, "wall_s": round(wall, 1),
        "stages_s": {k: v["seconds"] for k, v in summary.get("stages", {}).items()},
        "stage_status": {k: v["status"] for k, v in summary.get("stages", {}).items()},
        "train_steps": facts.get("train_steps"), "final_loss": facts.get("final_loss"),
        "default_plan": ev.get("default_plan"),
        "accuracy_default_plan": (ev.get("plans", {}).get(ev.get("default_plan")) if ev else None),
        "accuracy_by_plan": ev.get("plans"), "nll_by_plan": ev.get("nll"),
        "cpu_count": os.cpu_count(), "load_avg_before": [round(x, 2) for x in load_before],
        "load_avg_after": [round(x, 2) for x in os.getloadavg()], "machine": platform.machine(),
    }, indent=2))
    if proc.returncode:
        print(proc.stdout[-3000:] + proc.stderr[-3000:], file=sys.stderr)


if __name__ == "__main__":
    main()
