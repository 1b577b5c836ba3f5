"""A real single-host Slurm (slurmctld + slurmd + munged from Debian's slurm-wlm/munge), started here.

The fixture writes a minimal slurm.conf/cgroup.conf for this host in a temp dir, starts munged,
slurmctld and slurmd on free ports, and stops them at the end. Through `sar-scale submit
--backend slurm` it runs a two-stage debug training curriculum as a chain of two dependent jobs
(stage 2 starts after stage 1 succeeded and resumes from its checkpoint), reads the logs with
`sar-scale jobs logs`, and checks idempotent resubmission (registry, then squeue by job name)
and cancel. Where Slurm cannot start, the tests skip and say why.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cluster.backends.slurm import SlurmBackend
from cluster.cli import main as submit_main
from cluster.errors import SubmitError
from cluster.jobs_cli import main as jobs_main
from cluster.registry import JobRegistry
from cluster.submit import submit_job
from sar_scale.config import load_config
from sar_scale.utils.net import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo")


class SlurmCluster:
    """munged + slurmctld + slurmd for this host, all state under ``root``."""

    def __init__(self, root: Path):
        self.root = root
        self.procs: list[subprocess.Popen] = []
        self.host = socket.gethostname().split(".")[0]
        for d in ("state", "spool", "log", "munge"):
            (root / d).mkdir(parents=True, exist_ok=True)
        (root / "munge").chmod(0o700)
        key = root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self.sock = root / "munge" / "sock"
        self.conf = root / "slurm.conf"
        ctld_port, d_port = free_port(), free_port()
        cpus = os.cpu_count() or 1
        self.conf.write_text("\n".join([
            "ClusterName=sarscaletest", f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}", f"SlurmdPort={d_port}",
            "AuthType=auth/munge", f"AuthInfo=socket={self.sock}", "CredType=cred/munge",
            "SlurmUser=root", "SlurmdUser=root",
            f"StateSaveLocation={root / 'state'}", f"SlurmdSpoolDir={root / 'spool'}",
            f"SlurmctldPidFile={root / 'slurmctld.pid'}", f"SlurmdPidFile={root / 'slurmd.pid'}",
            f"SlurmctldLogFile={root / 'log/slurmctld.log'}", f"SlurmdLogFile={root / 'log/slurmd.log'}",
            # no cgroups/accounting: runs in containers and sandboxes; sacct is then unavailable,
            # which also exercises the squeue -> scontrol status fallback
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none",
            "SchedulerType=sched/builtin", "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "MpiDefault=none", "ReturnToService=2", "MinJobAge=600", "KillWait=5", "InactiveLimit=0",
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 State=UNKNOWN",
            f"PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP", ""]))
        (root / "cgroup.conf").write_text("CgroupPlugin=autodetect\n")
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def _start(self, argv: list[str], name: str) -> None:
        log = open(self.root / "log" / f"{name}.out", "wb")  # noqa: SIM115 - closed by the OS at exit
        self.procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env))

    def start(self, timeout: float = 40.0) -> None:
        r = self.root
        self._start(["munged", "-F", "-f", f"--socket={self.sock}", f"--key-file={r / 'munge/munge.key'}",
                     f"--log-file={r / 'log/munged.log'}", f"--pid-file={r / 'munge/pid'}",
                     f"--seed-file={r / 'munge/seed'}"], "munged")
        self._wait(lambda: self.sock.exists(), 10, "munged did not create its socket")
        self._start(["slurmctld", "-D", "-f", str(self.conf)], "slurmctld")
        self._start(["slurmd", "-D", "-f", str(self.conf), "-N", self.host], "slurmd")

        def idle() -> bool:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=self.env)
            return out.returncode == 0 and out.stdout.strip().startswith("idle")

        self._wait(idle, timeout, "the node did not become idle")

    def _wait(self, ok, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if ok():
                return
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.3)
        logs = "\n".join(f"--- {p.name}\n" + p.read_text(errors="replace")[-800:]
                         for p in sorted((self.root / "log").glob("*")) if p.is_file())
        raise RuntimeError(f"{what} in {timeout:.0f}s:\n{logs}")

    def stop(self) -> None:
        subprocess.run(["scancel", "--user", str(os.getuid())], env=self.env, capture_output=True)
        deadline = time.time() + 15
        while time.time() < deadline:
            q = subprocess.run(["squeue", "-h"], capture_output=True, text=True, env=self.env)
            if q.returncode != 0 or not q.stdout.strip():
                break
            time.sleep(0.3)
        for p in reversed(self.procs):
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = [t for t in TOOLS if not shutil.which(t)]
    if missing:
        pytest.skip(f"Slurm cannot start: {', '.join(missing)} not installed (Debian: apt-get install "
                    f"slurm-wlm munge, or `bash scripts/setup_system.sh`)")
    if os.getuid() != 0:
        pytest.skip("Slurm cannot start: slurmd must run as root to launch jobs")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except RuntimeError as e:
        cluster.stop()
        pytest.skip(f"Slurm cannot start on this machine: {e}")
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    yield cluster
    cluster.stop()
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old


def _profile(tmp: Path, secret_env: list[str] | None = None) -> Path:
    p = tmp / "profile.yaml"
    p.write_text(yaml.safe_dump({
        "name": "single-host", "python": sys.executable, "workdir": str(REPO),
        "env": {"MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1"},
        "secret_env": secret_env or [],
        "resources": {"nodes": 1, "procs_per_node": 1, "cpus_per_task": 1},
        "slurm": {"partition": "debug"}}))
    return p


def _stage_dir(tmp: Path) -> Path:
    """A two-stage debug curriculum in the t2i_900m layout: stage2's stages = stage1's + one."""
    from sar_scale.training.debug_data import write_debug_shards

    write_debug_shards(tmp / "shards", num_samples=32, samples_per_shard=16)
    d = tmp / "run"
    d.mkdir()
    base = yaml.safe_load((REPO / "configs/train/debug.yaml").read_text())
    base.pop("curriculum")
    base.update(run_dir=str(tmp / "train"), data={"url": str(tmp / "shards"), "num_workers": 0},
                mlflow={"enabled": False}, ema={"enabled": False}, checkpoint={"every_steps": 0, "keep_last": 2})
    (d / "base.yaml").write_text(yaml.safe_dump(base))
    s1 = {"name": "a", "resolution": 64, "steps": 2, "micro_batch": 2}
    s2 = {"name": "b", "resolution": 128, "steps": 2, "micro_batch": 2}
    (d / "stage1_a.yaml").write_text(yaml.safe_dump({"defaults": "base.yaml", "curriculum": {"stages": [s1]}}))
    (d / "stage2_b.yaml").write_text(yaml.safe_dump({"defaults": "base.yaml", "curriculum": {"stages": [s1, s2]}}))
    return d


def _wait_terminal(backend, rec, timeout=150.0) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = backend.status(rec)
        if st.state in ("SUCCEEDED", "FAILED", "CANCELLED"):
            return st.state
        time.sleep(0.5)
    raise TimeoutError(f"Slurm job {rec.backend_id} still {backend.status(rec)} after {timeout}s")


def test_curriculum_chain_trains_on_real_slurm(slurm, tmp_path, capsys, monkeypatch):
    reg = tmp_path / "reg"
    stage_dir = _stage_dir(tmp_path)
    # a secret named in the profile reaches the job (its script exits early without it) but is
    # written nowhere: not in the sbatch scripts, the registry or the logs
    canary = "CANARY-5e1f-slurm-secret"
    monkeypatch.setenv("SAR_TEST_SECRET_TOKEN", canary)
    profile = _profile(tmp_path, secret_env=["SAR_TEST_SECRET_TOKEN"])
    rc = submit_main(["--backend", "slurm", "--profile", str(profile), "--registry", str(reg),
                      "--job-id", "chain", "--", "train", str(stage_dir)])
    out = capsys.readouterr().out
    assert rc == 0, out
    registry = JobRegistry(reg)
    group = registry.get("chain")
    assert group.kind == "chain" and group.members == ["chain-stage1-a", "chain-stage2-b"]
    r1, r2 = (registry.get(m) for m in group.members)
    assert r2.info["after"] == [r1.backend_id]  # afterok on stage 1's Slurm id
    backend = SlurmBackend()
    assert _wait_terminal(backend, r1) == "SUCCEEDED", backend.logs(r1)
    assert _wait_terminal(backend, r2) == "SUCCEEDED", backend.logs(r2)
    log1, log2 = backend.logs(r1), backend.logs(r2)
    assert "starting fresh" in log1 and "done: 2 steps" in log1
    # stage 2's job resumed from the stage-1 end checkpoint and trained only stage b
    assert "resuming from" in log2 and "stage a" in log2 and "done: 4 steps" in log2
    for f in reg.rglob("*"):
        if f.is_file():
            assert canary not in f.read_text(errors="replace"), f
    assert 'SAR_TEST_SECRET_TOKEN:?' in Path(r1.info["script"]).read_text()
    # logs and status through the CLI
    capsys.readouterr()
    assert jobs_main(["--registry", str(reg), "logs", "chain", "--tail", "5"]) == 0
    text = capsys.readouterr().out
    assert "===== chain-stage1-a =====" in text and "===== chain-stage2-b =====" in text and "done: 4 steps" in text
    assert jobs_main(["--registry", str(reg), "status", "chain"]) == 0
    text = capsys.readouterr().out
    assert text.count("SUCCEEDED") == 2
    # resubmitting the chain starts nothing new
    rc = submit_main(["--backend", "slurm", "--profile", str(profile), "--registry", str(reg),
                      "--job-id", "chain", "--", "train", str(stage_dir)])
    assert rc == 0 and "already submitted" in capsys.readouterr().out
    assert [registry.get(m).backend_id for m in group.members] == [r1.backend_id, r2.backend_id]


def test_idempotent_resubmission_and_cancel_on_real_slurm(slurm, tmp_path):
    from cluster.spec import JobSpec

    reg = JobRegistry(tmp_path / "reg")
    spec = load_config(JobSpec, {"job_id": "long-run", "backend": "slurm", "command": ["sample", "--steps", "1000000"],
                                 "cpus_per_task": 1, "profile": yaml.safe_load(_profile(tmp_path).read_text())})
    first = submit_job(spec, reg)
    assert first.created and first.record.backend_id.isdigit()
    again = submit_job(spec, reg)
    assert not again.created and again.record.backend_id == first.record.backend_id
    # lose the registry (another login node, a crash after sbatch): squeue --name finds the job
    shutil.rmtree(reg.job_dir("long-run"))
    adopted = submit_job(spec, reg)
    assert not adopted.created and adopted.record.backend_id == first.record.backend_id
    assert adopted.record.info.get("adopted")
    backend = SlurmBackend()
    assert backend.status(adopted.record).state in ("PENDING", "RUNNING")
    assert jobs_main(["--registry", str(tmp_path / "reg"), "cancel", "long-run"]) == 0
    assert _wait_terminal(backend, adopted.record, timeout=30) == "CANCELLED"


def test_sbatch_refusal_is_reported(slurm, tmp_path):
    from cluster.spec import JobSpec

    prof = yaml.safe_load(_profile(tmp_path).read_text())
    prof["slurm"]["partition"] = "no-such-partition"
    spec = load_config(JobSpec, {"job_id": "bad-part", "backend": "slurm", "command": ["sample"], "profile": prof})
    with pytest.raises(SubmitError, match="sbatch refused the job.*[Pp]artition"):
        submit_job(spec, JobRegistry(tmp_path / "reg"))
