"""`sar-scale jobs list|status|logs|cancel`: follow jobs submitted with `sar-scale submit`.

The registry (``~/.sar-scale/jobs`` or ``--registry``/``$SAR_SCALE_JOBS_DIR``) says which backend
holds a job id; status, logs and cancel then ask that backend (squeue/scontrol/sacct, the Ray Jobs
API, kubectl, or the local supervisor's records). A chain id covers all its stage jobs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from cluster.backends import TERMINAL, get_backend
from cluster.errors import ClusterError, JobNotFoundError
from cluster.registry import JobRecord, JobRegistry


def _records(reg: JobRegistry, job_id: str) -> list[JobRecord]:
    rec = reg.get(job_id)
    if rec is None:
        known = [r.job_id for r in reg.list()][-5:]
        raise JobNotFoundError(f"no job {job_id!r} in the registry {reg.root}"
                               + (f" (recent: {', '.join(known)})" if known else ""))
    if rec.kind == "chain":
        out = [reg.get(m) for m in rec.members]
        return [r for r in out if r is not None and r.backend_id]
    if not rec.backend_id:
        raise ClusterError(f"job {job_id!r} was never confirmed by {rec.backend} (a submission was "
                           f"interrupted): submit it again with the same --job-id")
    return [rec]


def _backend(rec: JobRecord, ray_address: str | None):
    return get_backend(rec.backend, ray_address=ray_address)


def cmd_list(reg: JobRegistry, args) -> int:
    recs = reg.list()
    if args.json:
        print(json.dumps([{"job_id": r.job_id, "kind": r.kind, "backend": r.backend, "backend_id": r.backend_id,
                           "submitted_at": r.submitted_at, "command": r.command} for r in recs], indent=2))
        return 0
    if not recs:
        print(f"no jobs in {reg.root}")
    for r in recs:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.submitted_at))
        ident = f"chain of {len(r.members)}" if r.kind == "chain" else f"{r.backend} {r.backend_id}"
        print(f"{r.job_id:40s} {when}  {ident:24s} {' '.join(r.command)}")
    return 0


def cmd_status(reg: JobRegistry, args) -> int:
    rows = []
    for rec in _records(reg, args.job_id):
        st = _backend(rec, args.ray_address).status(rec)
        rows.append({"job_id": rec.job_id, "backend": rec.backend, "backend_id": rec.backend_id, **st.as_dict()})
    if args.json:
        print(json.dumps(rows if len(rows) != 1 else rows[0], indent=2))
    else:
        for r in rows:
            code = f" exit {r['exit_code']}" if r["exit_code"] not in (None, 0) else ""
            print(f"{r['job_id']}: {r['state']}{code}  [{r['backend']} {r['backend_id']}] {r['detail']}")
    return 0


def cmd_logs(reg: JobRegistry, args) -> int:
    recs = _records(reg, args.job_id)
    while True:
        for rec in recs:
            try:
                text = _backend(rec, args.ray_address).logs(rec, tail=args.tail)
            except ClusterError as e:
                text = f"(no log yet: {e})\n"
            if len(recs) > 1:
                print(f"===== {rec.job_id} =====")
            sys.stdout.write(text if text.endswith("\n") or not text else text + "\n")
        if not args.follow:
            return 0
        states = [_backend(r, args.ray_address).status(r).state for r in recs]
        if all(s in TERMINAL for s in states):
            return 0
        time.sleep(args.interval)
        if sys.stdout.isatty():
            print("\033[2J\033[H", end="")  # redraw in place, like `watch`
        else:
            print(f"----- {time.strftime('%H:%M:%S')} -----")


def cmd_cancel(reg: JobRegistry, args) -> int:
    for rec in reversed(_records(reg, args.job_id)):
        b = _backend(rec, args.ray_address)
        if b.status(rec).state in TERMINAL:
            print(f"{rec.job_id}: already finished, nothing to cancel")
            continue
        b.cancel(rec)
        print(f"{rec.job_id}: cancel requested ({rec.backend} {rec.backend_id})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sar-scale jobs", description=__doc__.split("\n\n")[0] + "\n\n"
                                + __doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--registry", help="job registry folder (default $SAR_SCALE_JOBS_DIR or ~/.sar-scale/jobs)")
    p.add_argument("--ray-address", help="override the recorded Ray Jobs API address")
    sub = p.add_subparsers(dest="action", required=True)
    ls = sub.add_parser("list", help="jobs in the registry, oldest first")
    ls.add_argument("--json", action="store_true")
    st = sub.add_parser("status", help="state of a job (each stage of a chain)")
    st.add_argument("job_id")
    st.add_argument("--json", action="store_true")
    lg = sub.add_parser("logs", help="the job's output (all stages of a chain)")
    lg.add_argument("job_id")
    lg.add_argument("--tail", type=int, help="only the last N lines")
    lg.add_argument("--follow", "-f", action="store_true", help="refresh until the job ends")
    lg.add_argument("--interval", type=float, default=5.0, help="seconds between refreshes with --follow")
    cc = sub.add_parser("cancel", help="cancel a job (every unfinished stage of a chain)")
    cc.add_argument("job_id")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    reg = JobRegistry(args.registry)
    try:
        return {"list": cmd_list, "status": cmd_status, "logs": cmd_logs, "cancel": cmd_cancel}[args.action](reg, args)
    except ClusterError as e:
        print(f"sar-scale jobs: error: {e}", file=sys.stderr)
        return 1
