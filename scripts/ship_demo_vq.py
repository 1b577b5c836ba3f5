"""Train the demo VQ the way a first `sar-scale demo` would and store it in the package
(sar_scale/assets/demo_vq/), with the record of what it was trained for (shipped.json).

    .venv/bin/python scripts/ship_demo_vq.py [--workdir /tmp/ship_vq]

Run it after changing configs/demo/vq.yaml, the tokenizer-train code or the demo's default images:
tests/unit/test_demo_shipped_vq.py fails until the shipped VQ matches the repository again.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sar_scale.demo import SHIPPED_VQ, SHIPPED_VQ_FILES, Demo  # noqa: E402


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/ship_demo_vq", help="scratch demo workdir (default /tmp/ship_demo_vq)")
    a = p.parse_args(argv)
    work = Path(a.workdir)
    shutil.rmtree(work, ignore_errors=True)
    demo = Demo(work, train_vq=True, cache_dir=work / "cache")  # defaults = what `sar-scale demo` runs
    if demo.run_all("vq") != 0:
        return 1
    SHIPPED_VQ.mkdir(parents=True, exist_ok=True)
    for name in SHIPPED_VQ_FILES:
        shutil.copy2(demo.p("vq", name), SHIPPED_VQ / name)
    record = {**demo.vq_record(), "made_by": "scripts/ship_demo_vq.py"}
    (SHIPPED_VQ / "shipped.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    print(f"shipped {SHIPPED_VQ} (key {record['key']}, held-out PSNR {demo.facts.get('vq_psnr')} dB)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
