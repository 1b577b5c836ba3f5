"""benchmarks/gpu_check.py --smoke: every part runs on the CPU with debug sizes, so the one-command
GPU check cannot rot before a GPU is lent. Compiled variants use aot_eager here (dynamo + AOT autograd
without inductor's C++ build, which costs minutes on 2 shared cores); the GPU run uses inductor."""

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_part(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    out = tmp_path / "check.json"
    rc = gpu_check.main(["--smoke", "--out", str(out), "--compile-backend", "aot_eager", "--budget-s", "3000"])
    doc = json.loads(out.read_text())
    assert rc == 0, doc.get("errors")
    parts = doc["parts"]
    assert parts["env"]["matmul"]["flops_per_s"] > 0
    train = parts["train"]
    for key in ("sdpa_eager_noac", "sdpa_compiled_noac", "sdpa_eager_ac", "sdpa_compiled_ac"):
        assert train[key]["tokens_per_s"] > 0 and train[key]["plan_estimate_gib"] > 0, key
    assert "skipped" in train["flex_eager_noac"]  # no CPU flex backward: recorded, not crashed
    for key in ("debug_eager", "debug_compiled"):
        row = parts["sample"][key]
        assert row["ar_kv"]["steps"] == 16 and row["sar_kv"]["steps"] == 4
    assert parts["images"]["batch"]["sar32"]["images_per_s"] > 0
    assert parts["vq"]["demo-small"]["bf16_fp32_code_agreement"] == 1.0  # fp32 both ways on the CPU
    assert doc["errors"] == []
