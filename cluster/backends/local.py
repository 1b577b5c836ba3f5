"""Local backend: run the job on this machine, detached, with logs in the registry.

Distributed commands start one torchrun agent per "node" (``--nodes 2`` gives two agents on
loopback that meet through a c10d rendezvous, the same shape as a real multi-node job), each with
``procs_per_node`` ranks. The agents run under :mod:`cluster.local_runner`, a detached
supervisor that records the exit codes so ``jobs status`` works after the shell is gone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

from cluster.backends.base import Backend, JobStatus, read_log, sar_argv, torchrun_argv
from cluster.errors import ClusterError
from cluster.registry import JobRecord
from cluster.spec import JobSpec
from sar_scale.utils.atomic import atomic_write_json
from sar_scale.utils.procs import pid_alive, stop_process_group

CANCEL_WAIT_S = 20.0


def launch_plan(spec: JobSpec) -> dict:
    """The supervisor's input: per node argv (``{rdzv_port}`` is filled with a free port at launch)."""
    if spec.distributed:
        # c10d assigns node ranks itself; one agent hosts the store on the port, the others join it.
        nodes = [{"argv": torchrun_argv(spec, str(spec.nodes), "127.0.0.1:{rdzv_port}", spec.job_id),
                  "log": f"node{i}.log"} for i in range(spec.nodes)]
    else:
        nodes = [{"argv": sar_argv(spec), "log": "node0.log"}]
    return {"job_id": spec.job_id, "workdir": spec.profile.workdir or os.getcwd(), "env": spec.profile.job_env(),
            "secret_env": list(spec.profile.secret_env), "nodes": nodes,
            "ranks": spec.nodes * spec.nproc_per_node if spec.distributed else 0}


class LocalBackend(Backend):
    name = "local"

    def render(self, spec: JobSpec, job_dir: Path, after: list[str] | None = None) -> str:
        plan = launch_plan(spec)
        plan["logs"] = [str(job_dir / n["log"]) for n in plan["nodes"]]
        plan["supervisor"] = [sys.executable, "-m", "cluster.local_runner", str(job_dir)]
        return json.dumps(plan, indent=2) + "\n"

    def submit(self, spec: JobSpec, job_dir: Path, after: list[str] | None = None) -> tuple[str, dict]:
        if after:
            raise ClusterError("the local backend has no job dependencies: submit the curriculum with "
                               "--stages single (one job walking the stages)")
        job_dir.mkdir(parents=True, exist_ok=True)
        plan = launch_plan(spec)
        atomic_write_json(job_dir / "plan.json", plan, fsync=False)
        with open(job_dir / "supervisor.log", "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "cluster.local_runner", str(job_dir)],
                                    cwd=plan["workdir"], stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        create_time = psutil.Process(proc.pid).create_time()
        return str(proc.pid), {"pid": proc.pid, "create_time": create_time, "job_dir": str(job_dir)}

    @staticmethod
    def _alive(record: JobRecord) -> bool:
        pid = record.info.get("pid")  # same pid and start time: not a recycled pid
        return bool(pid) and pid_alive(int(pid), float(record.info.get("create_time", 0)))

    def status(self, record: JobRecord) -> JobStatus:
        job_dir = Path(record.info["job_dir"])
        state_path = job_dir / "state.json"
        state = json.loads(state_path.read_text()) if state_path.exists() else {}
        alive = self._alive(record)
        s = state.get("state")
        if s in ("SUCCEEDED", "FAILED", "CANCELLED"):
            codes = state.get("exit_codes", [])
            code = next((c for c in codes if c != 0), 0) if codes else None
            return JobStatus(s, f"exit codes {codes}", code, s)
        if alive:
            return JobStatus("RUNNING" if s == "RUNNING" else "PENDING",
                             f"supervisor pid {record.info['pid']}", None, s or "STARTING")
        if (job_dir / "cancel_requested").exists():
            return JobStatus("CANCELLED", "cancelled before it recorded an outcome", None, "CANCELLED")
        return JobStatus("FAILED", f"supervisor exited without recording an outcome "
                         f"(see {job_dir / 'supervisor.log'})", None, "LOST")

    def logs(self, record: JobRecord, tail: int | None = None) -> str:
        job_dir = Path(record.info["job_dir"])
        plan = json.loads((job_dir / "plan.json").read_text())
        parts = []
        for node in plan["nodes"]:
            path = job_dir / node["log"]
            if not path.exists():
                continue
            text = read_log(path, tail)
            parts.append(f"==> {node['log']} <==\n{text}" if len(plan["nodes"]) > 1 else text)
        if not parts:
            return read_log(job_dir / "supervisor.log", tail)
        return "".join(parts)

    def cancel(self, record: JobRecord) -> None:
        job_dir = Path(record.info["job_dir"])
        (job_dir / "cancel_requested").write_text(str(time.time()))
        if not self._alive(record):
            return
        pgid = int(record.info["pid"])  # the supervisor leads its own session/process group
        if stop_process_group(pgid, CANCEL_WAIT_S, alive=lambda: self._alive(record)):
            state_path = job_dir / "state.json"
            state = json.loads(state_path.read_text()) if state_path.exists() else {}
            state.update(state="CANCELLED", ended_at=time.time())
            atomic_write_json(state_path, state, fsync=False)
