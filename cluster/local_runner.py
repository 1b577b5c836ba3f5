"""Detached supervisor of one local job: starts its node processes, waits, records the outcome.

``python -m cluster.local_runner JOB_DIR`` reads ``JOB_DIR/plan.json`` (written by the local
backend), starts one process per "node" (a torchrun agent, or the plain command), each logging to
``JOB_DIR/node{i}.log``, and keeps ``JOB_DIR/state.json`` current. Hand-written because torchrun
itself does not outlive the shell that started it or leave its exit status anywhere readable:
this process is a session leader, so ``jobs cancel`` signals the whole process group, and
``jobs status`` reads the recorded exit codes after the fact.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sar_scale.distributed.lifeline import set_parent_death_signal
from sar_scale.utils.atomic import atomic_write_json
from sar_scale.utils.cpus import usable_cpus
from sar_scale.utils.net import free_port

GRACE_S = 10.0


def _stop_with_parent() -> None:
    set_parent_death_signal(signal.SIGTERM)  # runs in the child between fork and exec; Linux only, else a no-op


def run(job_dir: Path) -> int:
    plan = json.loads((job_dir / "plan.json").read_text())
    state_path = job_dir / "state.json"
    port = str(free_port())
    env = dict(os.environ)
    env.update(plan.get("env", {}))
    env["SAR_SCALE_JOB_ID"] = plan["job_id"]
    if plan.get("ranks") and "OMP_NUM_THREADS" not in env:
        # Every rank of every local "node" shares this machine: split its cores (oversubscribing
        # halves step speed on CPU).
        env["OMP_NUM_THREADS"] = str(max(1, usable_cpus() // plan["ranks"]))
    cancelled = False

    def _on_term(signum, frame):  # noqa: ARG001 - signal handler signature
        nonlocal cancelled
        cancelled = True

    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGINT, _on_term)

    procs: list[subprocess.Popen] = []
    logs = []
    for i, node in enumerate(plan["nodes"]):
        argv = [a.replace("{rdzv_port}", port) for a in node["argv"]]
        log = open(job_dir / node["log"], "ab")  # noqa: SIM115 - closed below
        logs.append(log)
        # a node process (torchrun agent) is stopped when this supervisor dies, and its ranks die with
        # it (sar_scale.distributed.lifeline): a killed job leaves no orphans writing its run directory
        procs.append(subprocess.Popen(argv, cwd=plan["workdir"], env=env, stdout=log,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      preexec_fn=_stop_with_parent))
        print(f"node {i}: pid {procs[-1].pid}: {' '.join(argv)}", flush=True)
    state = {"state": "RUNNING", "pid": os.getpid(), "started_at": time.time(), "rdzv_port": int(port),
             "nodes": [{"pid": p.pid, "log": n["log"]} for p, n in zip(procs, plan["nodes"])]}
    atomic_write_json(state_path, state, fsync=False)

    failed_at: float | None = None
    while True:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            break
        bad = any(c not in (None, 0) for c in codes)
        if (cancelled or bad) and failed_at is None:
            # One node failed (or a cancel): stop the others, as torchrun does for its workers.
            failed_at = time.time()
            for p in procs:
                if p.poll() is None:
                    p.terminate()
        if failed_at is not None and time.time() - failed_at > GRACE_S:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.2)
    for log in logs:
        log.close()
    codes = [p.returncode for p in procs]
    final = "CANCELLED" if cancelled else ("SUCCEEDED" if all(c == 0 for c in codes) else "FAILED")
    state.update(state=final, exit_codes=codes, ended_at=time.time())
    atomic_write_json(state_path, state, fsync=False)
    print(f"job {plan['job_id']}: {final} (exit codes {codes})", flush=True)
    return 0 if final == "SUCCEEDED" else 1


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m cluster.local_runner JOB_DIR", file=sys.stderr)
        return 2
    return run(Path(args[0]))


if __name__ == "__main__":
    raise SystemExit(main())
