"""Ray backend: submit through the Ray Jobs API (``JobSubmissionClient``) of an existing cluster.

The job id is Ray's ``submission_id``, Ray's own idempotency key: before submitting we ask the
cluster for it, so a second submission of the same id returns the first job. The code travels
as the runtime env's ``working_dir`` (``.gitignore`` and ``excludes`` honoured by Ray); plain and
secret environment variables go in ``runtime_env.env_vars``. Secret values are read from the
submitting environment at submit time only; what is rendered or recorded shows ``${NAME}``.

Ray 2.60 enables token authentication: the client needs ``RAY_AUTH_MODE=token`` and the
cluster's token (``RAY_AUTH_TOKEN`` or ``~/.ray/auth_token``); we set the mode when a token is
available and explain the error when it is not.
"""

from __future__ import annotations

import json
import os
import shlex
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from cluster.backends.base import Backend, JobStatus, sar_argv, tail_text
from cluster.errors import BackendUnreachableError, ClusterError, SubmitError
from cluster.registry import JobRecord
from cluster.spec import JobSpec

_STATE_MAP = {"PENDING": "PENDING", "RUNNING": "RUNNING", "SUCCEEDED": "SUCCEEDED", "FAILED": "FAILED",
              "STOPPED": "CANCELLED"}


def resolve_address(spec: JobSpec, override: str | None = None) -> str:
    """--ray-address > $RAY_ADDRESS (when it is an http address) > profile ray.address."""
    env = os.environ.get("RAY_ADDRESS", "")
    addr = override or (env if env.startswith("http") else "") or spec.profile.ray.address
    if not addr.startswith(("http://", "https://")):
        addr = "http://" + addr
    return addr.rstrip("/")


def submit_request(spec: JobSpec, address: str, secrets: dict[str, str] | None = None) -> dict[str, Any]:
    """The ``submit_job`` arguments. ``secrets=None`` renders ``${NAME}`` placeholders."""
    if spec.distributed:
        entry = [spec.python, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc_per_node={spec.nproc_per_node}", "-m", "sar_scale.cli", *spec.command]
    else:
        entry = sar_argv(spec)
    env = {"SAR_SCALE_JOB_ID": spec.job_id, **spec.profile.job_env()}
    for k in spec.profile.secret_env:
        env[k] = secrets[k] if secrets is not None else f"${{{k}}}"
    runtime_env: dict[str, Any] = {"env_vars": env}
    r = spec.profile.ray
    if r.working_dir:
        wd = r.working_dir
        runtime_env["working_dir"] = wd if "://" in wd else os.path.abspath(wd)  # uploaded from here
        runtime_env["excludes"] = list(r.excludes)
    if r.pip:
        runtime_env["pip"] = list(r.pip)
    req: dict[str, Any] = {"address": address, "submission_id": spec.job_id,
                           "entrypoint": shlex.join(entry), "runtime_env": runtime_env,
                           "metadata": {"sar_scale_job_id": spec.job_id, "command": shlex.join(spec.command)}}
    if spec.profile.workdir and not r.working_dir:
        req["entrypoint"] = f"cd {shlex.quote(spec.profile.workdir)} && {req['entrypoint']}"
    if r.entrypoint_num_cpus is not None:
        req["entrypoint_num_cpus"] = r.entrypoint_num_cpus
    if spec.gpus_per_node:
        req["entrypoint_num_gpus"] = spec.gpus_per_node
    return req


def _enable_token_auth() -> None:
    if os.environ.get("RAY_AUTH_MODE"):
        return
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or token_file.exists():
        os.environ["RAY_AUTH_MODE"] = "token"


def reload_token() -> None:
    """Ray caches the auth token process-wide on first use; re-read it so a token given now
    (env or file, e.g. a second cluster in the same process) is the one sent."""
    try:
        from ray._raylet import AuthenticationTokenLoader

        AuthenticationTokenLoader.instance().reset_cache()
    except (ImportError, AttributeError):  # older Ray without token auth
        pass


def _reachable(address: str) -> None:
    """Fail fast (2 s) with what to do, instead of Ray's long retry loop and stack trace."""
    try:
        urllib.request.urlopen(f"{address}/api/version", timeout=2)
    except urllib.error.HTTPError:
        return  # something answers (maybe 401 without a token): the client will say more
    except (urllib.error.URLError, OSError) as e:
        raise BackendUnreachableError(
            f"cannot reach the Ray Jobs API at {address} ({getattr(e, 'reason', e)}). Start a head with "
            f"`RAY_AUTH_MODE=token ray start --head --dashboard-host 127.0.0.1` (the Jobs API is on the "
            f"dashboard port, 8265 by default), or point --ray-address / $RAY_ADDRESS / ray.address in "
            f"the profile at your cluster's dashboard") from None


def client(address: str):
    """A ``JobSubmissionClient`` with Ray 2.60's token auth handled."""
    _enable_token_auth()
    reload_token()
    _reachable(address)
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as e:  # noqa: BLE001 - Ray raises bare exceptions; we add what to do
        msg = str(e)
        if "401" in msg or "403" in msg or "uthenticat" in msg:
            raise ClusterError(f"the Ray cluster at {address} refused us ({msg.splitlines()[0]}): it uses "
                               f"token auth; set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or "
                               f"~/.ray/auth_token) to the cluster's token") from None
        raise BackendUnreachableError(f"Ray Jobs API at {address} did not answer: {msg.splitlines()[0]}") from None


class RayBackend(Backend):
    name = "ray"

    def __init__(self, address: str | None = None):
        self.address_override = address

    def check(self, spec: JobSpec, environ: dict[str, str]) -> None:
        super().check(spec, environ)
        if spec.nodes > 1:
            raise ClusterError(f"nodes={spec.nodes}: the ray backend submits to an existing Ray cluster, "
                               f"which Ray Data spreads work over; size the cluster itself (or use "
                               f"--backend k8s to create one per job)")

    def render(self, spec: JobSpec, job_dir: Path, after: list[str] | None = None) -> str:
        req = submit_request(spec, resolve_address(spec, self.address_override))
        return json.dumps(req, indent=2) + "\n"

    def find(self, spec: JobSpec, job_dir: Path) -> tuple[str, dict] | None:
        address = resolve_address(spec, self.address_override)
        c = client(address)
        try:
            c.get_job_info(spec.job_id)
        except RuntimeError as e:
            if "does not exist" in str(e) or "404" in str(e):
                return None
            raise
        return spec.job_id, {"address": address, "adopted": True}

    def submit(self, spec: JobSpec, job_dir: Path, after: list[str] | None = None) -> tuple[str, dict]:
        if after:
            raise ClusterError("the ray backend has no job dependencies: use --stages single")
        address = resolve_address(spec, self.address_override)
        c = client(address)
        req = submit_request(spec, address, secrets={k: os.environ[k] for k in spec.profile.secret_env})
        req.pop("address")
        try:
            sid = c.submit_job(**req)
        except Exception as e:  # noqa: BLE001
            if "already exists" in str(e):
                return spec.job_id, {"address": address, "adopted": True}
            raise SubmitError(f"Ray refused the job: {str(e).strip().splitlines()[-1]}") from None
        return sid, {"address": address}

    def _client_for(self, record: JobRecord):
        return client(self.address_override or record.info.get("address") or "http://127.0.0.1:8265")

    def status(self, record: JobRecord) -> JobStatus:
        c = self._client_for(record)
        try:
            info = c.get_job_info(record.backend_id)
        except RuntimeError as e:
            return JobStatus("UNKNOWN", f"Ray has no job {record.backend_id}: {str(e).splitlines()[0]}")
        s = str(getattr(info.status, "value", info.status))
        return JobStatus(_STATE_MAP.get(s, "UNKNOWN"), info.message or "", info.driver_exit_code, s)

    def logs(self, record: JobRecord, tail: int | None = None) -> str:
        return tail_text(self._client_for(record).get_job_logs(record.backend_id), tail)

    def cancel(self, record: JobRecord) -> None:
        self._client_for(record).stop_job(record.backend_id)
