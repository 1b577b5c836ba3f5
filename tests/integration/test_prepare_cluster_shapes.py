"""`data prepare` is deterministic across cluster shapes: the same inputs and config give byte-identical
shards, index/hashes sidecars, stats, rejects and manifest with 1 worker, 2 workers (and another
partition count), and on a 2-node Ray cluster (`ray start --head` + a second `ray start --address` on
loopback, each node with its own --temp-dir and one CPU)."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from sar_scale.utils.net import free_port
from tests.conftest import REPO
from tests.data_inputs import build_folder

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _digests(out: Path) -> dict[str, str]:
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


def _prepare(cfg: Path, out: Path, *over: str, env: dict[str, str] | None = None) -> str:
    cmd = [sys.executable, "-m", "sar_scale.cli", "data", "prepare", str(cfg), f"output.url={out}", *over]
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return r.stdout


class TwoNodeRay:
    """Head + one worker node on loopback, one CPU each, separate temp dirs, own process groups."""

    def __init__(self):
        exe = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
        self.tmp = [Path(tempfile.mkdtemp(prefix=f"rn{i}", dir="/tmp")) for i in range(2)]  # short socket paths
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
        self.procs, self.logs = [], []
        common = ["--block", "--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--disable-usage-stats",
                  "--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
                  "--metrics-export-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
                  "--dashboard-agent-grpc-port", str(free_port()), "--runtime-env-agent-port", str(free_port())]
        lo = free_port()
        head = [exe, "start", "--head", "--port", str(self.port), "--include-dashboard", "false",
                "--ray-client-server-port", str(free_port()), "--temp-dir", str(self.tmp[0]),
                "--min-worker-port", str(lo), "--max-worker-port", str(lo + 100), *common]
        self._start(head, 0)
        self._wait_nodes(1)
        common = [c if not c.isdigit() or len(c) < 4 else str(free_port()) for c in common]
        worker = [exe, "start", "--address", self.address, "--temp-dir", str(self.tmp[1]),
                  "--min-worker-port", str(lo + 101), "--max-worker-port", str(lo + 200), *common]
        self._start(worker, 1)
        self._wait_nodes(2)

    def _start(self, argv: list[str], i: int) -> None:
        log = open(self.tmp[i] / "node.log", "wb")  # noqa: SIM115 - closed in stop()
        self.logs.append(log)
        self.procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                           start_new_session=True))

    def _wait_nodes(self, n: int, timeout: float = 120.0) -> None:
        probe = (f"import ray; ray.init(address='{self.address}', log_to_driver=False); "
                 "print(sum(1 for x in ray.nodes() if x['Alive']))")
        deadline = time.time() + timeout
        out = ""
        while time.time() < deadline:
            r = subprocess.run([sys.executable, "-c", probe], env=self.env, capture_output=True, text=True,
                               timeout=60)
            out = r.stdout.strip().splitlines()[-1:] if r.returncode == 0 else r.stderr[-500:]
            if r.returncode == 0 and out and out[0] == str(n):
                return
            time.sleep(2)
        logs = "\n".join((t / "node.log").read_text(errors="replace")[-1000:] for t in self.tmp)
        raise RuntimeError(f"Ray cluster did not reach {n} nodes: {out}\n{logs}")

    def stop(self) -> None:
        for p in reversed(self.procs):
            try:
                os.killpg(p.pid, signal.SIGKILL)  # only this cluster's process groups
            except ProcessLookupError:
                pass
            p.wait(10)
        for log in self.logs:
            log.close()
        for t in self.tmp:
            shutil.rmtree(t, ignore_errors=True)


def test_same_bytes_with_1_worker_2_workers_and_a_2_node_cluster(tmp_path):
    import torch

    from sar_scale.tokenizers.vq import build_vq, save_vq

    torch.manual_seed(0)
    save_vq(build_vq("demo-small"), tmp_path / "vq")
    build_folder(tmp_path / "in", n_shapes=16)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({
        "defaults": str(REPO / "configs/data/shapes_demo.yaml"),
        "input": {"path": str(tmp_path / "in"), "files_per_unit": 6},
        "filters": {"min_side": 32, "near_dedup": True, "phash_max_distance": 2},
        "tokenize": {"vq_path": str(tmp_path / "vq"), "resolutions": [32, 64], "batch_size": 4},
        "output": {"samples_per_shard": 4}}))
    outs = {}
    outs["1 worker"] = tmp_path / "one"
    _prepare(cfg, outs["1 worker"], "ray.num_cpus=1", "ray.tokenize_actors=1", "ray.partitions=1",
             "ray.max_inflight=1")
    outs["2 workers"] = tmp_path / "two"
    _prepare(cfg, outs["2 workers"], "ray.num_cpus=2", "ray.tokenize_actors=2", "ray.partitions=7")
    cluster = TwoNodeRay()
    try:
        outs["2 nodes"] = tmp_path / "nodes"
        _prepare(cfg, outs["2 nodes"], "ray.tokenize_actors=2", "ray.partitions=5",
                 f"ray.address={cluster.address}", env={"RAY_AUTH_MODE": "disabled"})
    finally:
        cluster.stop()
    ref = _digests(outs["1 worker"])
    assert any(k.endswith(".tar") for k in ref) and "manifest.json" in ref and "rejects.jsonl" in ref
    assert sum(k.endswith(".stats.json") for k in ref) >= 4
    for shape, out in outs.items():
        assert _digests(out) == ref, shape
