"""benchmarks/bench_loader.py runs end to end at toy sizes (so the script cannot rot between the runs
that produce the README's figures): the scale and throughput parts, old reader included."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.integration.train_launch import REPO

pytestmark = [pytest.mark.integration]


def test_bench_loader_scale_and_throughput_parts_run_at_toy_sizes():
    for part, args in (("scale", ["--shards", "4", "--per-shard", "50", "--old-samples", "100", "--world", "2"]),
                       ("throughput", ["--tp-shards", "2", "--tp-per-shard", "4", "--old-read", "4",
                                       "--tokens-only", "--workers", "2"])):
        r = subprocess.run([sys.executable, str(REPO / "benchmarks/bench_loader.py"), "--part", part, *args],
                           capture_output=True, text=True, timeout=600, cwd=REPO)
        assert r.returncode == 0, r.stderr[-3000:]
        out = json.loads(r.stdout)[part]
        if part == "scale":
            assert "error" not in json.dumps(out), out
        else:
            assert out["new"]["samples"] == 8 and out["old"]["samples"] >= 4  # the old reader fills whole batches
            assert out["old"]["requests_per_sample"] >= 1 and out["new"]["local_dir_samples_per_s"] > 0
            assert out["new"]["requests_per_epoch"] <= out["new"]["requests_bound_1.1x_shards_plus_index"]
