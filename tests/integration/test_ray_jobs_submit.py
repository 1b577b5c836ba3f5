"""A real local Ray head (`ray start --head` on loopback, token auth as Ray 2.60 ships it).

The data pipeline (`sar-scale data prepare`) runs as a Ray job submitted with `sar-scale submit
--backend ray` (code uploaded as the job's working_dir); its status and logs come back through
`sar-scale jobs`, the shards it wrote are there, and resubmitting the same job id starts nothing
(registry first, then Ray's own submission id). The head is stopped at the end by its process group.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from cluster.backends.ray_jobs import RayBackend, reload_token
from cluster.cli import main as submit_main
from cluster.jobs_cli import main as jobs_main
from cluster.registry import JobRegistry
from sar_scale.utils.net import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


class RayHead:
    def __init__(self):
        exe = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
        # short path: Ray's unix sockets live under it (107-byte limit)
        self.tmp = Path(tempfile.mkdtemp(prefix="rayh", dir="/tmp"))
        self.token = secrets.token_hex(16)
        self.dashboard = free_port()
        self.address = f"http://127.0.0.1:{self.dashboard}"
        ports = {"--port": free_port(), "--dashboard-port": self.dashboard,
                 "--ray-client-server-port": free_port(), "--node-manager-port": free_port(),
                 "--object-manager-port": free_port(), "--metrics-export-port": free_port(),
                 "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
                 "--runtime-env-agent-port": free_port()}
        lo = free_port()
        argv = [exe, "start", "--head", "--block", "--num-cpus", "2", "--node-ip-address", "127.0.0.1",
                "--dashboard-host", "127.0.0.1", "--disable-usage-stats", "--temp-dir", str(self.tmp),
                "--min-worker-port", str(lo), "--max-worker-port", str(lo + 200)]
        for k, v in ports.items():
            argv += [k, str(v)]
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}
        self.log = open(self.tmp / "head.log", "wb")  # noqa: SIM115
        # own process group: stopping it stops exactly this head's processes (never `ray stop`)
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 90.0) -> None:
        from ray.job_submission import JobSubmissionClient

        deadline = time.time() + timeout
        last: Exception | None = None
        while time.time() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                JobSubmissionClient(self.address).list_jobs()
                return
            except Exception as e:  # noqa: BLE001 - not up yet
                last = e
                time.sleep(1.0)
        raise RuntimeError(f"Ray head not ready in {timeout}s ({last}):\n"
                           + (self.tmp / "head.log").read_text(errors="replace")[-1500:])

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(2)
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # Ray drains for up to 30 s on SIGTERM
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head():
    head = RayHead()
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ADDRESS")}
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=head.token)
    os.environ.pop("RAY_ADDRESS", None)
    reload_token()  # an earlier in-process Ray (other tests) cached ~/.ray/auth_token's token
    try:
        head.wait_ready()
        yield head
    finally:
        head.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        reload_token()


def _inputs(tmp: Path) -> tuple[Path, Path]:
    from sar_scale.data.synthetic import main as synth_main
    from sar_scale.tokenizers.vq import build_vq, save_vq

    images = tmp / "images"
    assert synth_main(["--out", str(images), "--n", "12", "--size", "64"]) == 0
    vq = tmp / "vq"
    save_vq(build_vq("demo-small"), vq)
    return images, vq


def test_data_prepare_runs_as_a_ray_job(ray_head, tmp_path, capsys):
    images, vq = _inputs(tmp_path)
    out_dir = tmp_path / "shards"
    profile = tmp_path / "ray.yaml"
    profile.write_text(yaml.safe_dump({
        "name": "ray-test", "python": sys.executable,
        "env": {"HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true"},
        "ray": {"address": ray_head.address, "working_dir": str(REPO)}}))
    reg = tmp_path / "reg"
    argv = ["--backend", "ray", "--profile", str(profile), "--registry", str(reg), "--job-id", "prep-shapes",
            "--", "data", "prepare", "configs/data/shapes_demo.yaml", f"input.path={images}",
            f"tokenize.vq_path={vq}", f"output.url={out_dir}", "tokenize.resolutions=[64]",
            "ray.actor_num_cpus=0.5", "ray.load_num_cpus=0.25", "ray.scan_num_cpus=0.25",
            "--ray-address", "auto"]
    capsys.readouterr()
    rc = submit_main(["--wait", "--timeout", "240", *argv])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "job prep-shapes: SUCCEEDED" in out
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["samples"] > 0

    assert jobs_main(["--registry", str(reg), "status", "prep-shapes", "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["state"] == "SUCCEEDED" and st["backend_state"] == "SUCCEEDED" and st["exit_code"] == 0
    assert jobs_main(["--registry", str(reg), "logs", "prep-shapes"]) == 0
    assert "shards" in capsys.readouterr().out.lower()

    # same id again: nothing new runs; with the registry gone, Ray's submission id is found
    assert submit_main(argv) == 0
    assert "already submitted" in capsys.readouterr().out
    shutil.rmtree(reg)
    assert submit_main(argv) == 0
    assert "already submitted" in capsys.readouterr().out
    rec = JobRegistry(reg).get("prep-shapes")
    assert rec.info.get("adopted") and RayBackend().status(rec).state == "SUCCEEDED"
    from ray.job_submission import JobSubmissionClient

    jobs = [j for j in JobSubmissionClient(ray_head.address).list_jobs() if j.submission_id == "prep-shapes"]
    assert len(jobs) == 1  # exactly one Ray job for the id


def test_cancel_a_ray_job(ray_head, tmp_path, capsys):
    profile = tmp_path / "ray.yaml"
    profile.write_text(yaml.safe_dump({"python": sys.executable,
                                       "ray": {"address": ray_head.address, "working_dir": str(REPO)}}))
    reg = tmp_path / "reg"
    assert submit_main(["--backend", "ray", "--profile", str(profile), "--registry", str(reg), "--job-id",
                        "long-sample", "--", "sample", "--steps", "1000000"]) == 0
    rec = JobRegistry(reg).get("long-sample")
    backend = RayBackend()
    deadline = time.time() + 60
    while backend.status(rec).state == "PENDING" and time.time() < deadline:
        time.sleep(0.5)
    assert jobs_main(["--registry", str(reg), "cancel", "long-sample"]) == 0
    deadline = time.time() + 60
    while backend.status(rec).state not in ("CANCELLED", "FAILED", "SUCCEEDED") and time.time() < deadline:
        time.sleep(0.5)
    assert backend.status(rec).state == "CANCELLED"
