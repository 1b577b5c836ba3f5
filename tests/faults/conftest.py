"""Fixtures of the fault suite: the figures ledger, a tiny VQ, the input corpus, CLI runners, the S3 proxy.

Every fault test records what it tried in the session's :class:`Figures` ledger; at the end of the
session the ledger is written to ``<pytest basetemp>/reliability_figures.json`` (and to
``$SAR_SCALE_RELIABILITY_FIGURES`` when set) and printed, so docs/reliability.md quotes real counts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from sar_scale.testing.s3_fault_proxy import FaultConfig, S3FaultProxy
from tests.faults import corpus

REPO = Path(__file__).resolve().parents[2]
FIGURES_ENV = "SAR_SCALE_RELIABILITY_FIGURES"
_LEDGER: Figures | None = None


class Figures:
    """Per promise: how many faults/bad inputs were tried, how many the system survived, what was lost."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def record(self, promise: str, test: str, tried: int, survived: int, lost: int = 0, **detail: Any) -> None:
        with self._lock:
            p = self.data.setdefault(promise, {"tried": 0, "survived": 0, "lost": 0, "tests": {}})
            p["tried"] += tried
            p["survived"] += survived
            p["lost"] += lost
            p["tests"][test] = {"tried": tried, "survived": survived, "lost": lost, **detail}
            self.write()

    def write(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=1, sort_keys=True, default=str))
        extra = os.environ.get(FIGURES_ENV)
        if extra:
            Path(extra).write_text(self.path.read_text())


@pytest.fixture(scope="session")
def figures(tmp_path_factory) -> Figures:
    global _LEDGER
    if _LEDGER is None:
        _LEDGER = Figures(tmp_path_factory.getbasetemp() / "reliability_figures.json")
    return _LEDGER


def pytest_terminal_summary(terminalreporter) -> None:
    if _LEDGER is None or not _LEDGER.data:
        return
    tr = terminalreporter
    tr.section("reliability figures")
    for promise, p in sorted(_LEDGER.data.items()):
        tr.write_line(f"{promise:<28} tried {p['tried']:>5}  survived {p['survived']:>5}  lost {p['lost']}")
    tr.write_line(f"written to {_LEDGER.path}")


# ----------------------------------------------------------------------------- processes


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a child CLI run: repo on the path, quiet, offline, single-threaded BLAS."""
    env = dict(os.environ)
    for k in ("MLFLOW_TRACKING_URI", "SAR_SCALE_FAULT", "AWS_ENDPOINT_URL", "RANK", "WORLD_SIZE",
              "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update({"PYTHONPATH": str(REPO), "MLFLOW_DISABLE_TELEMETRY": "true", "RAY_USAGE_STATS_ENABLED": "0",
                "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
                "RAY_DEDUP_LOGS": "0"})
    env.update(extra)
    return env


def run_cli(args: list[str], env: dict[str, str], timeout: float, log: Path | None = None) -> tuple[int, str, float]:
    """Run ``python -m sar_scale.cli ARGS``; returns (exit code, stdout+stderr, seconds). Never hangs."""
    t0 = time.time()
    try:
        p = subprocess.run([sys.executable, "-m", "sar_scale.cli", *args], env=env, cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
        out, rc = p.stdout.decode(errors="replace"), p.returncode
    except subprocess.TimeoutExpired as e:
        out, rc = (e.stdout or b"").decode(errors="replace") + f"\n[timed out after {timeout}s]", -999
    if log is not None:
        log.write_text(out)
    return rc, out, time.time() - t0


# ----------------------------------------------------------------------------- data pipeline inputs


@pytest.fixture(scope="session")
def tiny_vq(tmp_path_factory) -> Path:
    """A random-weight VQ (downsample 8, 64 codes): tokens are arbitrary but deterministic."""
    import torch

    from sar_scale.tokenizers.vq import VQConfig, build_vq, save_vq

    torch.manual_seed(0)
    cfg = VQConfig(ch=32, ch_mult=[1, 1, 2, 2], z_channels=32, num_res_blocks=1, codebook_size=64)
    return save_vq(build_vq(cfg), tmp_path_factory.mktemp("vq") / "vq")


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """Input folder: good images + every bad case; (folder, source id -> expected fate)."""
    root = tmp_path_factory.mktemp("corpus") / "in"
    return root, corpus.write_folder(root, n_good=24)


def prepare_config(path: Path, input_path: str, out_url: str, vq: Path, **sections: dict[str, Any]) -> Path:
    """A small `data prepare` config (64 px, 1 tokenizer actor, 8 samples per shard)."""
    cfg: dict[str, Any] = {
        "input": {"kind": "folder", "path": input_path, "files_per_unit": 8},
        "decode": {"max_pixels": 16_000_000},
        "filters": {"min_side": 64, "max_aspect": 2.0, "caption_min_words": 2, "caption_min_chars": 5,
                    "caption_max_chars": 300, "near_dedup": False},
        "tokenize": {"vq_path": str(vq), "resolutions": [64], "max_ratio": 2.0, "batch_size": 8},
        "output": {"url": out_url, "name": "d", "samples_per_shard": 8},
        "ray": {"num_cpus": 2, "tokenize_actors": 1, "actor_num_cpus": 1.0, "load_num_cpus": 0.25, "partitions": 2,
                "scan_num_cpus": 0.5},
    }
    for k, v in sections.items():
        cfg[k] = {**cfg.get(k, {}), **v}
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="session")
def clean_prepare(tmp_path_factory, tiny_vq, corpus_dir) -> dict[str, Any]:
    """One clean `data prepare` of the corpus to a local dir: the reference for every pipeline fault."""
    tmp = tmp_path_factory.mktemp("clean_prepare")
    cfg = prepare_config(tmp / "prepare.yaml", str(corpus_dir[0]), str(tmp / "out"), tiny_vq)
    rc, out, secs = run_cli(["data", "prepare", str(cfg)], clean_env(), 240, tmp / "log.txt")
    assert rc == 0, out[-4000:]
    return {"config": cfg, "out": tmp / "out", "log": out, "seconds": secs}


# ----------------------------------------------------------------------------- S3 + proxy


@pytest.fixture
def fault_proxy(s3_server):
    """A fault proxy in front of the session's moto server (faults off until configured)."""
    with S3FaultProxy(s3_server.endpoint, FaultConfig()) as px:
        yield px
