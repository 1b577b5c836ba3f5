"""Job specs, profiles, idempotent submission, the local backend end to end, and clear errors."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from cluster.backends import get_backend
from cluster.backends.local import LocalBackend
from cluster.errors import BackendUnreachableError, ClusterError, JobConflictError, ToolNotFoundError
from cluster.jobs_cli import main as jobs_main
from cluster.registry import JobRecord, JobRegistry
from cluster.spec import ClusterProfile, JobSpec, time_to_seconds
from cluster.submit import submit_job
from sar_scale.config import ConfigError, load_config
from sar_scale.utils.net import free_port

REPO = Path(__file__).resolve().parents[2]


def local_spec(command, job_id="job-a", **kw) -> JobSpec:
    prof = kw.pop("profile", {"workdir": str(REPO)})
    return load_config(JobSpec, {"job_id": job_id, "backend": "local", "command": command, "profile": prof, **kw})


def wait_state(backend, rec, states=("SUCCEEDED", "FAILED", "CANCELLED"), timeout=90.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = backend.status(rec)
        if st.state in states:
            return st
        time.sleep(0.3)
    raise TimeoutError(f"{rec.job_id} still {backend.status(rec).state} after {timeout}s")


# ---------------------------------------------------------------- specs and profiles
def test_profile_rejects_inline_secrets_and_bad_names():
    with pytest.raises(ConfigError, match="env.AWS_SECRET_ACCESS_KEY looks like a secret"):
        load_config(ClusterProfile, {"env": {"AWS_SECRET_ACCESS_KEY": "x"}})
    with pytest.raises(ConfigError, match="secret_env entry"):
        load_config(ClusterProfile, {"secret_env": ["abc=def"]})
    with pytest.raises(ConfigError, match="unknown key 'slurm.partion'"):
        load_config(ClusterProfile, {"slurm": {"partion": "gpu"}})


def test_jobspec_validation_names_the_field():
    with pytest.raises(ConfigError, match="job id 'Bad_ID'"):
        local_spec(["sample"], job_id="Bad_ID")
    with pytest.raises(ConfigError, match="'nope' is not a sar-scale command"):
        local_spec(["nope"])
    with pytest.raises(ConfigError, match="cannot run inside a job"):
        local_spec(["submit", "--", "train"])
    with pytest.raises(ConfigError, match="needs a distributed launcher"):
        local_spec(["sample"], nodes=2)
    with pytest.raises(ConfigError, match="not a Slurm time"):
        local_spec(["sample"], time="2 days")
    assert local_spec(["train", "x.yaml"]).distributed and not local_spec(["sample"]).distributed
    assert local_spec(["sample"], launcher="torchrun").distributed


@pytest.mark.parametrize("text,seconds", [("30", 1800), ("30:15", 1815), ("2:00:00", 7200),
                                          ("1-00", 86400), ("1-2:30", 95400), ("7-00:00:00", 604800)])
def test_slurm_time_formats(text, seconds):
    assert time_to_seconds(text) == seconds


def test_fingerprint_tracks_the_submission():
    a, b = local_spec(["sample"]), local_spec(["sample"])
    assert a.fingerprint() == b.fingerprint()
    assert local_spec(["sample", "--steps", "3"]).fingerprint() != a.fingerprint()


# ---------------------------------------------------------------- local backend, idempotency
def test_local_job_runs_once_per_id_and_reports(tmp_path, capsys):
    reg = JobRegistry(tmp_path / "reg")
    spec = local_spec(["data", "synth", "--out", str(tmp_path / "imgs"), "--n", "3", "--size", "32"])
    backend = LocalBackend()
    first = submit_job(spec, reg, backend)
    second = submit_job(spec, reg, backend)  # same id: the existing job, nothing new starts
    assert first.created and not second.created
    assert second.record.backend_id == first.record.backend_id
    st = wait_state(backend, first.record)
    assert st.state == "SUCCEEDED" and st.exit_code == 0
    assert "wrote 3 images" in backend.logs(first.record)
    assert len(list((tmp_path / "imgs").glob("*.png"))) == 3
    state = json.loads((tmp_path / "reg" / "job-a" / "state.json").read_text())
    assert state["exit_codes"] == [0] and state["ended_at"] >= state["started_at"]
    # a third submission after completion still does not rerun it
    assert not submit_job(spec, reg, backend).created
    assert len(list((tmp_path / "reg" / "job-a").glob("node*.log"))) == 1
    # the CLI reads the same registry
    assert jobs_main(["--registry", str(tmp_path / "reg"), "status", "job-a"]) == 0
    assert "job-a: SUCCEEDED" in capsys.readouterr().out
    assert jobs_main(["--registry", str(tmp_path / "reg"), "logs", "job-a", "--tail", "3"]) == 0
    assert jobs_main(["--registry", str(tmp_path / "reg"), "list"]) == 0


def test_same_id_different_command_is_a_conflict(tmp_path):
    reg = JobRegistry(tmp_path)
    rec = JobRecord(job_id="job-a", backend="local", backend_id="1", fingerprint="0" * 16, command=["sample"])
    reg.put(rec)
    with pytest.raises(JobConflictError, match="already used for a different submission"):
        submit_job(local_spec(["sample"]), reg, LocalBackend())


def test_interrupted_submission_is_completed_on_retry(tmp_path):
    """A record without backend id (crash between marker and submit) does not block a retry."""
    reg = JobRegistry(tmp_path)
    spec = local_spec(["data", "synth", "--out", str(tmp_path / "imgs"), "--n", "1", "--size", "32"])
    reg.put(JobRecord(job_id=spec.job_id, backend="local", fingerprint=spec.fingerprint(), command=spec.command,
                      info={"job_dir": str(reg.job_dir(spec.job_id))}))
    assert jobs_main(["--registry", str(tmp_path), "status", spec.job_id]) == 1  # "never confirmed"
    res = submit_job(spec, reg, LocalBackend())
    assert res.created and res.record.backend_id
    assert wait_state(LocalBackend(), res.record).state == "SUCCEEDED"


def test_local_cancel_and_failure(tmp_path, capsys):
    reg = JobRegistry(tmp_path)
    backend = LocalBackend()
    long = submit_job(local_spec(["sample", "--steps", "1000000"], job_id="long"), reg, backend).record
    wait_state(backend, long, states=("RUNNING",), timeout=30)
    assert jobs_main(["--registry", str(tmp_path), "cancel", "long"]) == 0
    assert "cancel requested" in capsys.readouterr().out
    assert wait_state(backend, long).state == "CANCELLED"
    assert not backend._alive(long)
    bad = submit_job(local_spec(["data", "synth", "--n", "1"], job_id="bad"), reg, backend).record
    st = wait_state(backend, bad)
    assert st.state == "FAILED" and st.exit_code == 2
    assert "--out" in backend.logs(bad)  # argparse's own message reaches the job log


def test_unknown_job_is_a_clear_error(tmp_path, capsys):
    assert jobs_main(["--registry", str(tmp_path), "status", "nope"]) == 1
    assert "no job 'nope' in the registry" in capsys.readouterr().err


def test_local_rejects_dependencies(tmp_path):
    with pytest.raises(ClusterError, match="--stages single"):
        LocalBackend().submit(local_spec(["sample"]), tmp_path, after=["1"])


def test_secrets_must_be_set_and_never_recorded(tmp_path, monkeypatch):
    reg = JobRegistry(tmp_path)
    spec = local_spec(["data", "synth", "--out", str(tmp_path / "imgs"), "--n", "1", "--size", "32"],
                      profile={"workdir": str(REPO), "secret_env": ["MY_TOKEN"]})
    monkeypatch.delenv("MY_TOKEN", raising=False)
    with pytest.raises(ClusterError, match="MY_TOKEN named in the cluster profile"):
        submit_job(spec, reg, LocalBackend())
    monkeypatch.setenv("MY_TOKEN", "CANARY-b41d-secret")
    rec = submit_job(spec, reg, LocalBackend()).record
    wait_state(LocalBackend(), rec)
    for p in (tmp_path / spec.job_id).rglob("*"):
        if p.is_file():
            assert "CANARY-b41d-secret" not in p.read_text(errors="replace"), p


# ---------------------------------------------------------------- clear errors for missing tools
def test_missing_sbatch_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no slurm tools here
    spec = load_config(JobSpec, {"job_id": "s", "backend": "slurm", "command": ["sample"]})
    with pytest.raises(ToolNotFoundError, match="`sbatch` not found.*slurm-client.*--backend local"):
        submit_job(spec, JobRegistry(tmp_path / "reg"))
    assert JobRegistry(tmp_path / "reg").get("s") is None  # nothing recorded for a job that never started


def test_missing_kubectl_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    spec = load_config(JobSpec, {"job_id": "k", "backend": "k8s", "command": ["train", "c.yaml"],
                                 "profile": {"container": {"image": "img"}}})
    with pytest.raises(ToolNotFoundError, match="`kubectl` not found.*KUBECONFIG.*--dry-run"):
        submit_job(spec, JobRegistry(tmp_path / "reg"))


def test_k8s_needs_an_image():
    spec = load_config(JobSpec, {"job_id": "k", "backend": "k8s", "command": ["train", "c.yaml"]})
    with pytest.raises(ClusterError, match="needs container.image"):
        get_backend("k8s").render(spec, Path("/r"))


def test_unreachable_kubernetes_api_is_explained(tmp_path, monkeypatch):
    if not shutil.which("kubectl"):
        pytest.skip("kubectl is not installed on this machine")
    port = free_port()  # nothing listens there
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "t",
        "clusters": [{"name": "t", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
        "contexts": [{"name": "t", "context": {"cluster": "t", "user": "u"}}], "users": [{"name": "u", "user": {}}]}))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    spec = load_config(JobSpec, {"job_id": "k", "backend": "k8s", "command": ["train", "c.yaml"],
                                 "profile": {"container": {"image": "img"}}})
    with pytest.raises(BackendUnreachableError, match="cannot reach the Kubernetes API.*KUBECONFIG"):
        submit_job(spec, JobRegistry(tmp_path / "reg"))


def test_unreachable_ray_address_says_how_to_start_a_head(tmp_path, monkeypatch):
    port = free_port()
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    spec = load_config(JobSpec, {"job_id": "r", "backend": "ray", "command": ["sample"],
                                 "profile": {"ray": {"address": f"http://127.0.0.1:{port}"}}})
    t = time.time()
    with pytest.raises(BackendUnreachableError, match=rf"127.0.0.1:{port}.*ray start --head"):
        submit_job(spec, JobRegistry(tmp_path))
    assert time.time() - t < 20  # fails fast, no long retry loop


def test_ray_backend_rejects_multi_node_sizing():
    spec = load_config(JobSpec, {"job_id": "r", "backend": "ray", "command": ["data", "prepare", "x"], "nodes": 2})
    with pytest.raises(ClusterError, match="existing Ray cluster"):
        get_backend("ray").check(spec, dict(os.environ))
