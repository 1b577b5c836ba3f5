"""Kubernetes backend: KubeRay ``RayJob`` for data jobs, Kubeflow ``PyTorchJob`` (or an indexed
``batch/v1`` Job + headless Service) for training, applied with ``kubectl``.

Secrets are never inlined: each ``secret_env`` name becomes an env entry with ``secretKeyRef`` into
the profile's ``k8s.secret_name`` Secret. The job id is the object name, so ``kubectl create``
of an existing name is refused by the API server and we look the object up first (idempotency).

PyTorchJob: the training operator (>= 1.7) sets ``MASTER_ADDR``/``MASTER_PORT`` (the master pod's
service) and ``PET_NNODES``/``PET_NODE_RANK``/``PET_NPROC_PER_NODE`` when ``nprocPerNode`` is
set; the container runs one torchrun agent per pod with those values (``$(VAR)`` is expanded by
the kubelet). IndexedJob: pod ``<id>-0`` behind the headless Service ``<id>`` is the rendezvous
host and ``JOB_COMPLETION_INDEX`` is the node rank.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import yaml

from cluster.backends.base import Backend, JobStatus, require_tool, run_tool, sar_argv, tail_text
from cluster.errors import BackendUnreachableError, ClusterError, SubmitError
from cluster.registry import JobRecord
from cluster.spec import JobSpec, time_to_seconds
from sar_scale.utils.redact import is_secret_key

LABEL = "sar-scale/job-id"
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
RESOURCE = {"PyTorchJob": "pytorchjobs.kubeflow.org", "RayJob": "rayjobs.ray.io", "Job": "jobs.batch",
            "Service": "services"}


def _k8s_mem(mem: str) -> str:
    """Slurm memory (``900G``) -> Kubernetes quantity (``900Gi``)."""
    m = re.fullmatch(r"(\d+)([KMGT]?)B?", mem.strip(), re.I)
    if not m:
        return mem
    num, unit = m.groups()
    return f"{num}{unit.upper()}i" if unit else f"{num}Mi"  # Slurm's default unit is MB


def _env(spec: JobSpec) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [{"name": "SAR_SCALE_JOB_ID", "value": spec.job_id}]
    env += [{"name": k, "value": v} for k, v in spec.profile.job_env().items()]
    env += [{"name": k, "valueFrom": {"secretKeyRef": {"name": spec.profile.k8s.secret_name, "key": k}}}
            for k in spec.profile.secret_env]
    return env


def _volumes(spec: JobSpec) -> tuple[list[dict], list[dict]]:
    vols: list[dict] = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.profile.k8s.shm_size}}]
    mounts: list[dict] = [{"name": "dshm", "mountPath": "/dev/shm"}]
    for i, m in enumerate(spec.profile.mounts):
        name = f"mount-{i}"
        if m.source.startswith("pvc:"):
            vols.append({"name": name, "persistentVolumeClaim": {"claimName": m.source[4:]}})
        else:
            vols.append({"name": name, "hostPath": {"path": m.source}})
        mounts.append({"name": name, "mountPath": m.target, "readOnly": m.readonly})
    return vols, mounts


def _container(spec: JobSpec, name: str, command: list[str] | None, gpus: int) -> dict[str, Any]:
    _, mounts = _volumes(spec)
    c: dict[str, Any] = {"name": name, "image": spec.profile.container.image, "env": _env(spec),
                         "volumeMounts": mounts}
    if command is not None:
        c["command"] = command
    if spec.profile.workdir:
        c["workingDir"] = spec.profile.workdir
    res: dict[str, dict[str, Any]] = {}
    if gpus:
        res["limits"] = {"nvidia.com/gpu": gpus}
    req: dict[str, Any] = {}
    if spec.cpus_per_task:
        req["cpu"] = spec.cpus_per_task
    if spec.mem:
        req["memory"] = _k8s_mem(spec.mem)
    if req:
        res["requests"] = req
    if res:
        c["resources"] = res
    return c


def _pod_spec(spec: JobSpec, containers: list[dict], restart: str | None = None) -> dict[str, Any]:
    k = spec.profile.k8s
    vols, _ = _volumes(spec)
    pod: dict[str, Any] = {"containers": containers, "volumes": vols}
    if restart:
        pod["restartPolicy"] = restart
    if k.service_account:
        pod["serviceAccountName"] = k.service_account
    if k.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": s} for s in k.image_pull_secrets]
    if k.node_selector:
        pod["nodeSelector"] = dict(k.node_selector)
    if k.tolerations:
        pod["tolerations"] = list(k.tolerations)
    return pod


def _meta(spec: JobSpec, name: str | None = None) -> dict[str, Any]:
    return {"name": name or spec.job_id, "namespace": spec.profile.k8s.namespace,
            "labels": {"app.kubernetes.io/name": "sar-scale", LABEL: spec.job_id}}


def _template(spec: JobSpec, pod: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"labels": {LABEL: spec.job_id}}, "spec": pod}


def _rayjob(spec: JobSpec) -> list[dict[str, Any]]:
    k = spec.profile.k8s
    entry = shlex.join(sar_argv(spec))
    if spec.profile.workdir:  # the driver runs in Ray's session dir, not the container's workingDir
        entry = f"cd {shlex.quote(spec.profile.workdir)} && {entry}"
    runtime_env = {"env_vars": {"SAR_SCALE_JOB_ID": spec.job_id}}
    head = _container(spec, "ray-head", None, spec.gpus_per_node)
    head["ports"] = [{"containerPort": 6379, "name": "gcs"}, {"containerPort": 8265, "name": "dashboard"},
                     {"containerPort": 10001, "name": "client"}]
    cluster: dict[str, Any] = {
        "rayVersion": k.ray_version,
        "headGroupSpec": {"rayStartParams": {"dashboard-host": "0.0.0.0"},
                          "template": _template(spec, _pod_spec(spec, [head]))},
    }
    if spec.nodes > 1:
        worker = _container(spec, "ray-worker", None, spec.gpus_per_node)
        n = spec.nodes - 1
        cluster["workerGroupSpecs"] = [{"groupName": "workers", "replicas": n, "minReplicas": n,
                                        "maxReplicas": n, "rayStartParams": {},
                                        "template": _template(spec, _pod_spec(spec, [worker]))}]
    body: dict[str, Any] = {
        "entrypoint": entry,
        "runtimeEnvYAML": yaml.safe_dump(runtime_env, sort_keys=True),
        "submissionMode": "K8sJobMode",
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": k.ttl_seconds_after_finished,
        "rayClusterSpec": cluster,
    }
    if spec.time:
        body["activeDeadlineSeconds"] = time_to_seconds(spec.time)
    return [{"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": _meta(spec), "spec": body}]


def _pytorchjob(spec: JobSpec) -> list[dict[str, Any]]:
    cmd = [spec.python, "-m", "torch.distributed.run", "--nnodes=$(PET_NNODES)",
           "--node_rank=$(PET_NODE_RANK)", "--nproc_per_node=$(PET_NPROC_PER_NODE)",
           "--master_addr=$(MASTER_ADDR)", "--master_port=$(MASTER_PORT)", "-m", "sar_scale.cli", *spec.command]
    restart = "OnFailure" if spec.profile.k8s.backoff_limit else "Never"

    def replica(n: int) -> dict[str, Any]:
        c = _container(spec, "pytorch", cmd, spec.gpus_per_node)  # the operator requires this name
        return {"replicas": n, "restartPolicy": restart, "template": _template(spec, _pod_spec(spec, [c]))}

    replicas = {"Master": replica(1)}
    if spec.nodes > 1:
        replicas["Worker"] = replica(spec.nodes - 1)
    run_policy: dict[str, Any] = {"cleanPodPolicy": "None", "backoffLimit": spec.profile.k8s.backoff_limit,
                                  "ttlSecondsAfterFinished": spec.profile.k8s.ttl_seconds_after_finished}
    if spec.time:
        run_policy["activeDeadlineSeconds"] = time_to_seconds(spec.time)
    return [{"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": _meta(spec),
             "spec": {"nprocPerNode": str(spec.nproc_per_node), "runPolicy": run_policy,
                      "pytorchReplicaSpecs": replicas}}]


def _indexed_job(spec: JobSpec) -> list[dict[str, Any]]:
    k = spec.profile.k8s
    head = f"{spec.job_id}-0.{spec.job_id}"
    if spec.distributed:
        cmd = [spec.python, "-m", "torch.distributed.run", f"--nnodes={spec.nodes}",
               "--node_rank=$(JOB_COMPLETION_INDEX)", f"--nproc_per_node={spec.nproc_per_node}",
               f"--master_addr={head}", f"--master_port={k.rdzv_port}", "-m", "sar_scale.cli", *spec.command]
    else:
        cmd = sar_argv(spec)
    c = _container(spec, "sar-scale", cmd, spec.gpus_per_node)
    pod = _pod_spec(spec, [c], restart="Never")
    pod["subdomain"] = spec.job_id
    job: dict[str, Any] = {"completions": spec.nodes, "parallelism": spec.nodes, "completionMode": "Indexed",
                           "backoffLimit": k.backoff_limit, "ttlSecondsAfterFinished": k.ttl_seconds_after_finished,
                           "template": _template(spec, pod)}
    if spec.time:
        job["activeDeadlineSeconds"] = time_to_seconds(spec.time)
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": _meta(spec),
           "spec": {"clusterIP": "None", "selector": {LABEL: spec.job_id},
                    "ports": [{"name": "rdzv", "port": k.rdzv_port}]}}
    return [svc, {"apiVersion": "batch/v1", "kind": "Job", "metadata": _meta(spec), "spec": job}]


def manifests(spec: JobSpec) -> list[dict[str, Any]]:
    """The objects to create: RayJob for plain (data) commands, else the profile's training kind."""
    if not spec.profile.container.image:
        raise ClusterError(f"the k8s backend needs container.image in the cluster profile ({spec.profile.name})")
    if not spec.distributed:
        return _rayjob(spec)
    if spec.profile.k8s.training_kind == "PyTorchJob":
        return _pytorchjob(spec)
    return _indexed_job(spec)


def _pods(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    s, kind = doc.get("spec") or {}, doc.get("kind")
    if kind == "PyTorchJob":
        return [(f"spec.pytorchReplicaSpecs.{r}.template.spec", (v.get("template") or {}).get("spec") or {})
                for r, v in (s.get("pytorchReplicaSpecs") or {}).items()]
    if kind == "RayJob":
        rc = s.get("rayClusterSpec") or {}
        out = [("spec.rayClusterSpec.headGroupSpec.template.spec",
                ((rc.get("headGroupSpec") or {}).get("template") or {}).get("spec") or {})]
        out += [(f"spec.rayClusterSpec.workerGroupSpecs[{i}].template.spec", (g.get("template") or {}).get("spec") or {})
                for i, g in enumerate(rc.get("workerGroupSpecs") or [])]
        return out
    if kind == "Job":
        return [("spec.template.spec", (s.get("template") or {}).get("spec") or {})]
    return []


def validate_manifest(doc: dict[str, Any]) -> list[str]:
    """Structural problems of one manifest (empty list = valid). No cluster needed.

    Checks what the API server and the operators would reject, plus our own rules: names are
    DNS-1123 labels, every pod has containers with an image, env entries have a value or a
    ``valueFrom``, secret-looking variables only come from Secrets, mounts match volumes.
    """
    errs: list[str] = []
    kind = doc.get("kind")
    expect = {"PyTorchJob": "kubeflow.org/v1", "RayJob": "ray.io/v1", "Job": "batch/v1", "Service": "v1"}
    if kind not in expect:
        return [f"kind {kind!r} is not one we render ({', '.join(expect)})"]
    if doc.get("apiVersion") != expect[kind]:
        errs.append(f"{kind}: apiVersion {doc.get('apiVersion')!r}, expected {expect[kind]!r}")
    name = (doc.get("metadata") or {}).get("name", "")
    if not DNS1123_LABEL.match(name or "") or len(name) > 63:
        errs.append(f"{kind}: metadata.name {name!r} is not a DNS-1123 label")
    s = doc.get("spec") or {}
    if kind == "PyTorchJob":
        reps = s.get("pytorchReplicaSpecs") or {}
        if set(reps) - {"Master", "Worker"} or "Master" not in reps:
            errs.append(f"PyTorchJob: pytorchReplicaSpecs must have Master (and optionally Worker), got {sorted(reps)}")
        if (reps.get("Master") or {}).get("replicas") != 1:
            errs.append("PyTorchJob: Master.replicas must be 1")
        for r, v in reps.items():
            if not isinstance(v.get("replicas"), int) or v["replicas"] < 1:
                errs.append(f"PyTorchJob: {r}.replicas must be a positive integer")
            if v.get("restartPolicy") not in ("Always", "OnFailure", "Never", "ExitCode"):
                errs.append(f"PyTorchJob: {r}.restartPolicy {v.get('restartPolicy')!r} is invalid")
            names = [c.get("name") for c in ((v.get("template") or {}).get("spec") or {}).get("containers", [])]
            if "pytorch" not in names:
                errs.append(f"PyTorchJob: {r} needs a container named 'pytorch' (the operator looks for it)")
        if not str(s.get("nprocPerNode", "")).isdigit():
            errs.append("PyTorchJob: spec.nprocPerNode must be a number (as a string)")
    elif kind == "RayJob":
        if not s.get("entrypoint"):
            errs.append("RayJob: spec.entrypoint is empty")
        rc = s.get("rayClusterSpec") or {}
        if not rc.get("headGroupSpec"):
            errs.append("RayJob: spec.rayClusterSpec.headGroupSpec is missing")
        for g in rc.get("workerGroupSpecs") or []:
            if not g.get("groupName"):
                errs.append("RayJob: a worker group has no groupName")
            if not (g.get("minReplicas", 0) <= g.get("replicas", 0) <= g.get("maxReplicas", 0)):
                errs.append(f"RayJob: worker group {g.get('groupName')}: need minReplicas <= replicas <= maxReplicas")
        if "runtimeEnvYAML" in s:
            try:
                yaml.safe_load(s["runtimeEnvYAML"])
            except yaml.YAMLError as e:
                errs.append(f"RayJob: runtimeEnvYAML is not YAML: {e}")
    elif kind == "Job":
        if s.get("completionMode") == "Indexed" and not isinstance(s.get("completions"), int):
            errs.append("Job: an Indexed job needs integer completions")
        if (s.get("template") or {}).get("spec", {}).get("restartPolicy") not in ("Never", "OnFailure"):
            errs.append("Job: template.spec.restartPolicy must be Never or OnFailure")
    elif kind == "Service":
        if not s.get("selector") or not s.get("ports"):
            errs.append("Service: needs a selector and ports")
    for where, pod in _pods(doc):
        containers = pod.get("containers") or []
        if not containers:
            errs.append(f"{kind}: {where}.containers is empty")
        vols = {v.get("name") for v in pod.get("volumes") or []}
        for c in containers:
            cname = c.get("name", "?")
            if not c.get("image"):
                errs.append(f"{kind}: {where} container {cname!r} has no image")
            if "command" in c and not (isinstance(c["command"], list) and all(isinstance(x, str) for x in c["command"])):
                errs.append(f"{kind}: {where} container {cname!r}: command must be a list of strings")
            for e in c.get("env") or []:
                if ("value" in e) == ("valueFrom" in e):
                    errs.append(f"{kind}: {where} env {e.get('name')!r} needs exactly one of value/valueFrom")
                if "value" in e and is_secret_key(e.get("name", "")):
                    errs.append(f"{kind}: {where} env {e.get('name')!r} inlines a secret value")
                if "value" in e and not isinstance(e["value"], str):
                    errs.append(f"{kind}: {where} env {e.get('name')!r}: value must be a string")
            for m in c.get("volumeMounts") or []:
                if m.get("name") not in vols:
                    errs.append(f"{kind}: {where} mount {m.get('name')!r} has no volume")
    return errs


class _NoAliasDumper(yaml.SafeDumper):
    """Repeated sub-objects (command, tolerations) written out in full: no &id001 anchors."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def render_yaml(docs: list[dict[str, Any]]) -> str:
    return "---\n".join(yaml.dump(d, Dumper=_NoAliasDumper, sort_keys=False) for d in docs)


class K8sBackend(Backend):
    name = "k8s"

    def _kubectl(self, spec_or_info: JobSpec | dict, *args: str, input: str | None = None):
        if isinstance(spec_or_info, JobSpec):
            k = spec_or_info.profile.k8s
            exe, ctx, ns = k.kubectl, k.context, k.namespace
        else:
            exe, ctx, ns = spec_or_info["kubectl"], spec_or_info.get("context"), spec_or_info["namespace"]
        argv = [exe] + (["--context", ctx] if ctx else []) + ["-n", ns, *args]
        proc = run_tool(argv, input=input, check=False, timeout=60)
        err = (proc.stderr or "").strip()
        if proc.returncode != 0 and re.search(r"connection refused|no such host|Unable to connect|"
                                              r"dial tcp|i/o timeout|couldn't get current server", err):
            raise BackendUnreachableError(f"kubectl cannot reach the Kubernetes API ({err.splitlines()[-1]}): "
                                          f"set KUBECONFIG or k8s.context in the profile to a reachable cluster")
        return proc

    def check(self, spec: JobSpec, environ: dict[str, str]) -> None:
        # Secrets live in a k8s Secret, not in this environment.
        require_tool(spec.profile.k8s.kubectl)

    def render(self, spec: JobSpec, job_dir: Path, after: list[str] | None = None) -> str:
        return render_yaml(manifests(spec))

    def _info(self, spec: JobSpec, docs: list[dict]) -> dict[str, Any]:
        k = spec.profile.k8s
        return {"kubectl": k.kubectl, "context": k.context, "namespace": k.namespace,
                "objects": [[d["kind"], d["metadata"]["name"]] for d in docs]}

    def find(self, spec: JobSpec, job_dir: Path) -> tuple[str, dict] | None:
        docs = manifests(spec)
        main = docs[-1]
        proc = self._kubectl(spec, "get", RESOURCE[main["kind"]], main["metadata"]["name"], "-o", "name")
        if proc.returncode == 0:
            return spec.job_id, {**self._info(spec, docs), "adopted": True}
        if "NotFound" in proc.stderr or "not found" in proc.stderr:
            return None
        raise ClusterError(f"kubectl get failed: {proc.stderr.strip()}")

    def submit(self, spec: JobSpec, job_dir: Path, after: list[str] | None = None) -> tuple[str, dict]:
        if after:
            raise ClusterError("the k8s backend has no job dependencies: use --stages single")
        docs = manifests(spec)
        problems = [p for d in docs for p in validate_manifest(d)]
        if problems:
            raise SubmitError("refusing to submit an invalid manifest:\n  " + "\n  ".join(problems))
        job_dir.mkdir(parents=True, exist_ok=True)
        text = render_yaml(docs)
        (job_dir / f"{spec.job_id}.yaml").write_text(text)
        proc = self._kubectl(spec, "create", "-f", "-", input=text)
        if proc.returncode != 0:
            err = proc.stderr.strip()
            if "AlreadyExists" in err:
                return spec.job_id, {**self._info(spec, docs), "adopted": True}
            if "no matches for kind" in err:
                raise SubmitError(f"the cluster does not know this kind ({err}): install the Kubeflow training "
                                  f"operator (PyTorchJob) or KubeRay (RayJob), or set "
                                  f"k8s.training_kind: IndexedJob")
            raise SubmitError(f"kubectl create failed: {err}")
        return spec.job_id, self._info(spec, docs)

    def _main(self, record: JobRecord) -> tuple[str, str]:
        kind, name = record.info["objects"][-1]
        return kind, name

    def status(self, record: JobRecord) -> JobStatus:
        kind, name = self._main(record)
        proc = self._kubectl(record.info, "get", RESOURCE[kind], name, "-o", "json")
        if proc.returncode != 0:
            return JobStatus("UNKNOWN", proc.stderr.strip())
        return parse_status(kind, json.loads(proc.stdout))

    def logs(self, record: JobRecord, tail: int | None = None) -> str:
        kind, name = self._main(record)
        extra = [f"--tail={tail}"] if tail else []
        if kind == "RayJob":  # the driver's output is in the submitter Job's pod
            proc = self._kubectl(record.info, "logs", f"job/{name}", *extra)
        else:
            nodes = record.spec.get("nodes", 1)
            proc = self._kubectl(record.info, "logs", "-l", f"{LABEL}={record.job_id}", "--all-containers",
                                 "--prefix", f"--max-log-requests={int(nodes) + 1}", *extra)
        if proc.returncode != 0:
            raise ClusterError(f"kubectl logs failed: {proc.stderr.strip()}")
        return tail_text(proc.stdout, tail)

    def cancel(self, record: JobRecord) -> None:
        for kind, name in reversed(record.info["objects"]):
            proc = self._kubectl(record.info, "delete", RESOURCE[kind], name, "--ignore-not-found")
            if proc.returncode != 0:
                raise ClusterError(f"kubectl delete {kind}/{name} failed: {proc.stderr.strip()}")


def parse_status(kind: str, obj: dict[str, Any]) -> JobStatus:
    """Normalise a PyTorchJob / RayJob / Job status object."""
    st = obj.get("status") or {}
    if kind == "RayJob":
        js = st.get("jobStatus") or ""
        dep = st.get("jobDeploymentStatus") or ""
        m = {"SUCCEEDED": "SUCCEEDED", "FAILED": "FAILED", "STOPPED": "CANCELLED", "RUNNING": "RUNNING",
             "PENDING": "PENDING"}
        state = m.get(js) or ("FAILED" if dep == "Failed" else "PENDING")
        return JobStatus(state, st.get("message", ""), None, f"{js}/{dep}")
    conds = [c for c in st.get("conditions") or [] if c.get("status") == "True"]
    last = conds[-1]["type"] if conds else ""
    if kind == "PyTorchJob":
        m = {"Succeeded": "SUCCEEDED", "Failed": "FAILED", "Running": "RUNNING", "Restarting": "RUNNING",
             "Created": "PENDING", "Suspended": "PENDING"}
        return JobStatus(m.get(last, "PENDING"), conds[-1].get("message", "") if conds else "", None, last)
    if last in ("Complete", "SuccessCriteriaMet"):
        return JobStatus("SUCCEEDED", "", 0, last)
    if last in ("Failed", "FailureTarget"):
        return JobStatus("FAILED", conds[-1].get("message", ""), None, last)
    return JobStatus("RUNNING" if st.get("active") else "PENDING", "", None, last or "Pending")
