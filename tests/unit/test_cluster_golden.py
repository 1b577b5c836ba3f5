"""Golden dry-run outputs for every backend: what `sar-scale submit --dry-run` prints must not drift.

Regenerate after an intended change with:
    SAR_SCALE_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/unit/test_cluster_golden.py -q
and review the diff of tests/golden/ like code.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster.backends import get_backend
from cluster.backends.k8s import manifests, validate_manifest
from cluster.backends.slurm import render_script
from cluster.cli import dry_run_text
from cluster.cli import main as submit_main
from cluster.registry import JobRegistry
from cluster.spec import ClusterProfile, JobSpec, load_profile
from sar_scale.config import load_config

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "golden"
REGISTRY = Path("/registry")  # never created: rendering writes nothing
UPDATE = os.environ.get("SAR_SCALE_UPDATE_GOLDEN") == "1"

PROFILE = {
    "name": "test-cluster", "python": "python", "workdir": "/work/sar-scale",
    "env": {"NCCL_DEBUG": "WARN", "WEIRD": "a b'c"},
    "secret_env": ["AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_TOKEN"],
    "mounts": [{"source": "/shared", "target": "/shared"}, {"source": "/data", "target": "/data", "readonly": True}],
    "container": {"image": "registry.example/sar-scale:1", "runtime": "pyxis"},
    "s3_endpoint": "http://s3.example:9000", "mlflow_tracking_uri": "http://mlflow.example:5000",
    "slurm": {"partition": "gpu", "account": "proj", "log_dir": "/shared/logs"},
    "ray": {"address": "http://ray-head:8265", "working_dir": "/work/sar-scale"},
    "k8s": {"namespace": "ml", "secret_name": "sar-secrets"},
}


def spec(backend: str, command: list[str], profile: dict | None = None, **kw) -> JobSpec:
    return load_config(JobSpec, {"job_id": kw.pop("job_id", "golden-job"), "backend": backend, "command": command,
                                 "profile": profile or PROFILE, **kw})


def check_golden(name: str, text: str) -> None:
    text = text.replace(sys.executable, "<PYTHON>").replace(str(REPO), "<REPO>")
    path = GOLDEN / name
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    if not path.exists():
        pytest.fail(f"golden file {path} is missing (generate it with SAR_SCALE_UPDATE_GOLDEN=1)")
    assert text == path.read_text(), (f"{name} drifted from the golden file; if intended, regenerate with "
                                      f"SAR_SCALE_UPDATE_GOLDEN=1 and review the diff")


def render(s: JobSpec) -> str:
    return get_backend(s.backend).render(s, REGISTRY / s.job_id)


CASES = {
    "local-train-2nodes.json": lambda: spec("local", ["train", "configs/train/debug.yaml", "seed=1"],
                                            nodes=2, procs_per_node=1),
    "local-sample.json": lambda: spec("local", ["sample", "--steps", "5"]),
    "slurm-train-pyxis.sbatch": lambda: spec("slurm", ["train", "configs/train/debug.yaml", "run_dir=/shared/r"],
                                             nodes=2, gpus_per_node=8, cpus_per_task=64, time="2-00:00:00",
                                             mem="500G"),
    "slurm-prepare-apptainer.sbatch": lambda: spec(
        "slurm", ["data", "prepare", "configs/data/t2i_256_512.yaml", "output.url=s3://b/p q"],
        profile={**PROFILE, "container": {"image": "/img/sar.sif", "runtime": "apptainer"},
                 "slurm": {"partition": "cpu", "rdzv_port": 29400, "setup": ["module load cuda"]}},
        cpus_per_task=16),
    "ray-prepare.json": lambda: spec("ray", ["data", "prepare", "configs/data/t2i_256_512.yaml",
                                            "--ray-address", "auto"]),
    "k8s-pytorchjob.yaml": lambda: spec("k8s", ["train", "configs/train/debug.yaml"], nodes=3, gpus_per_node=8,
                                        cpus_per_task=90, mem="900G", time="12:00:00"),
    "k8s-indexedjob.yaml": lambda: spec("k8s", ["train", "configs/train/debug.yaml"], nodes=2, gpus_per_node=4,
                                        profile={**PROFILE, "k8s": {"namespace": "ml", "training_kind": "IndexedJob"}}),
    "k8s-rayjob.yaml": lambda: spec("k8s", ["data", "prepare", "configs/data/t2i_256_512.yaml"], nodes=3,
                                    cpus_per_task=8),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_dry_run_golden(name):
    check_golden(name, render(CASES[name]()))


def test_t2i_900m_slurm_chain_golden():
    """The real run: the 900M stage directory as a chain of three afterok jobs on the H100 profile."""
    import argparse

    from cluster.cli import make_specs

    args = argparse.Namespace(profile=str(REPO / "configs/cluster/h100-slurm.yaml"), backend="slurm", nodes=None,
                              gpus_per_node=None, procs_per_node=None, cpus_per_task=None, mem=None, time=None,
                              launcher="auto", job_id="t2i-900m", stages="auto")
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        job_id, specs, chain = make_specs(args, ["train", "configs/t2i_900m/"])
    finally:
        os.chdir(cwd)
    assert chain and [s.job_id for s in specs] == ["t2i-900m-stage1-256", "t2i-900m-stage2-512", "t2i-900m-stage3-1024"]
    assert all(s.nodes == 4 and s.gpus_per_node == 8 and s.command[-2:] == ["--resume", "auto"] for s in specs)
    text = dry_run_text(job_id, specs, True, JobRegistry(REGISTRY), get_backend("slurm"))
    assert text.count("--dependency=afterok:") == 2
    check_golden("slurm-chain-t2i-900m.txt", text)


def test_sbatch_scripts_are_valid_bash(tmp_path):
    if not shutil.which("bash"):
        pytest.skip("bash not installed")
    for name in ("slurm-train-pyxis.sbatch", "slurm-prepare-apptainer.sbatch"):
        script = tmp_path / name
        script.write_text(render_script(CASES[name](), REGISTRY))
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr


def test_sbatch_quotes_user_arguments_but_expands_ours():
    s = spec("slurm", ["train", "cfg.yaml", "run_dir=$(touch /tmp/pwned)", "name=a b"], nodes=2)
    script = render_script(s, REGISTRY)
    assert "'run_dir=$(touch /tmp/pwned)'" in script  # single-quoted: never expanded
    assert "'name=a b'" in script
    assert '"--rdzv_endpoint=$head_node:$rdzv_port"' in script  # double-quoted: the batch shell expands it
    assert "#SBATCH --ntasks-per-node=1" in script and "--nproc_per_node=1" in script


def test_k8s_manifests_validate_structurally():
    for name in ("k8s-pytorchjob.yaml", "k8s-indexedjob.yaml", "k8s-rayjob.yaml"):
        docs = manifests(CASES[name]())
        for d in docs:
            assert validate_manifest(d) == [], (name, validate_manifest(d))
        # what --dry-run prints parses back to the same objects
        assert list(yaml.safe_load_all(render(CASES[name]()))) == docs
    pj = manifests(CASES["k8s-pytorchjob.yaml"]())[0]
    assert pj["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 2
    c = pj["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 8 and c["resources"]["requests"]["memory"] == "900Gi"
    assert pj["spec"]["runPolicy"]["activeDeadlineSeconds"] == 12 * 3600
    svc, job = manifests(CASES["k8s-indexedjob.yaml"]())
    assert svc["spec"]["clusterIP"] == "None" and job["spec"]["completionMode"] == "Indexed"
    assert "--master_addr=golden-job-0.golden-job" in job["spec"]["template"]["spec"]["containers"][0]["command"]
    rj = manifests(CASES["k8s-rayjob.yaml"]())[0]
    assert rj["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == 2


def test_k8s_validator_catches_broken_manifests():
    pj = manifests(CASES["k8s-pytorchjob.yaml"]())[0]
    bad = yaml.safe_load(yaml.safe_dump(pj))
    bad["metadata"]["name"] = "Bad_Name"
    bad["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = 2
    c = bad["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    c["name"] = "trainer"
    c["image"] = None
    c["env"].append({"name": "AWS_SECRET_ACCESS_KEY", "value": "inline"})
    c["volumeMounts"].append({"name": "nope", "mountPath": "/x"})
    errs = "\n".join(validate_manifest(bad))
    for needle in ("DNS-1123", "Master.replicas must be 1", "container named 'pytorch'", "has no image",
                   "inlines a secret", "mount 'nope' has no volume"):
        assert needle in errs, needle
    rj = manifests(CASES["k8s-rayjob.yaml"]())[0]
    rj["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplicas"] = 0
    rj["apiVersion"] = "ray.io/v1alpha1"
    errs = "\n".join(validate_manifest(rj))
    assert "minReplicas <= replicas <= maxReplicas" in errs and "apiVersion" in errs


def test_no_secret_value_in_any_rendering(monkeypatch):
    canary = "CANARY-7f3a9-never-print-me"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", canary)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", canary)
    for name, make in CASES.items():
        text = render(make())
        assert canary not in text, name
        if make().backend != "local":
            assert "AWS_SECRET_ACCESS_KEY" in text, name  # referenced by name


def test_submit_cli_dry_run_prints_and_writes_nothing(tmp_path, capsys):
    reg = tmp_path / "reg"
    rc = submit_main(["--backend", "slurm", "--registry", str(reg), "--job-id", "dry", "--nodes", "2",
                      "--dry-run", "--", "train", "configs/train/debug.yaml"])
    out = capsys.readouterr().out
    assert rc == 0 and "#SBATCH --nodes=2" in out and "torch.distributed.run" in out
    assert not reg.exists()


def test_real_profiles_load():
    for p in sorted((REPO / "configs/cluster").glob("*.yaml")):
        prof = load_profile(p)
        assert isinstance(prof, ClusterProfile) and prof.name == p.stem
