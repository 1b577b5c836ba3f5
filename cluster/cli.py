"""`sar-scale submit`: run any sar-scale command as a job on local, Slurm, Ray or Kubernetes.

Examples::

    sar-scale submit --backend local --nodes 2 --procs-per-node 1 -- train configs/train/debug.yaml
    sar-scale submit --backend slurm --profile configs/cluster/h100-slurm.yaml --dry-run \\
        -- train configs/t2i_900m/
    sar-scale submit --backend ray --profile configs/cluster/ray-local.yaml -- data prepare configs/data/x.yaml
    sar-scale submit --backend k8s --profile configs/cluster/k8s-h100.yaml --dry-run -- train cfg.yaml
"""

from __future__ import annotations

import argparse
import json
import logging
import secrets
import sys
import time
from pathlib import Path

from cluster.backends import TERMINAL, get_backend
from cluster.errors import ClusterError
from cluster.registry import JobRegistry
from cluster.spec import BACKENDS, JobSpec, load_profile
from sar_scale.config import ConfigError

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sar-scale submit",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Submit a sar-scale command as a job. Everything after `--` is the command\n"
            "(e.g. `-- train configs/t2i_900m/stage1_256.yaml`). `train DIR` with a directory of stage\n"
            "configs submits the curriculum (--stages). The job id is an idempotency key: submitting\n"
            "the same id again returns the existing job (the local registry and the backend are both\n"
            "checked). Resources default to the profile's `resources`; secrets are passed by name only."),
        epilog="examples:" + __doc__.split("Examples::", 1)[1])
    p.add_argument("--backend", choices=BACKENDS, default="local", help="where to run (default local)")
    p.add_argument("--profile", help="cluster profile YAML (configs/cluster/*.yaml): partition, account, "
                   "image, env, secret names, mounts, S3 endpoint, MLflow URI, default resources")
    p.add_argument("--job-id", help="idempotency key and job name (lowercase, digits, '-'); default: "
                   "COMMAND-DATE-TIME-RANDOM")
    p.add_argument("--nodes", type=int, help="nodes (local: torchrun agents on loopback)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs per node (also the ranks per node by default)")
    p.add_argument("--procs-per-node", type=int, help="ranks per node (default: gpus-per-node, at least 1)")
    p.add_argument("--cpus-per-task", type=int, help="CPUs per node task")
    p.add_argument("--mem", help="memory per node (Slurm syntax, e.g. 900G)")
    p.add_argument("--time", help="wall-clock limit (Slurm syntax: MM, HH:MM:SS, D-HH:MM:SS)")
    p.add_argument("--launcher", choices=("auto", "torchrun", "plain"), default="auto",
                   help="torchrun agents or one plain process (auto: torchrun for `train`)")
    p.add_argument("--stages", choices=("auto", "single", "chain"), default="auto",
                   help="for `train DIR`: one job walking all stages, or one job per stage chained with "
                        "afterok dependencies (auto: chain on slurm, single elsewhere)")
    p.add_argument("--ray-address", help="Ray Jobs API address (default $RAY_ADDRESS, then the profile)")
    p.add_argument("--registry", help="job registry folder (default $SAR_SCALE_JOBS_DIR or ~/.sar-scale/jobs)")
    p.add_argument("--dry-run", action="store_true", help="print exactly what would be submitted; submit nothing")
    p.add_argument("--wait", action="store_true", help="wait for the job (all stages) to finish, then "
                   "print its log tail; exit code 0 only if it succeeded")
    p.add_argument("--timeout", type=float, default=0, help="with --wait: give up after this many seconds")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- sar-scale COMMAND [ARGS...]")
    return p


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def make_specs(args: argparse.Namespace, command: list[str]) -> tuple[str, list[JobSpec], bool]:
    """(job id, specs, is_chain) from parsed flags and the command."""
    profile = load_profile(args.profile)
    r = profile.resources
    base = {
        "backend": args.backend,
        "nodes": args.nodes if args.nodes is not None else r.nodes,
        "gpus_per_node": args.gpus_per_node if args.gpus_per_node is not None else r.gpus_per_node,
        "procs_per_node": args.procs_per_node if args.procs_per_node is not None else r.procs_per_node,
        "cpus_per_task": args.cpus_per_task if args.cpus_per_task is not None else r.cpus_per_task,
        "mem": args.mem or r.mem, "time": args.time or r.time, "launcher": args.launcher,
        "profile": profile,
    }
    job_id = args.job_id or f"{command[0]}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    if command[0] == "train" and len(command) > 1 and Path(command[1]).is_dir():
        from cluster.curriculum import stage_commands

        mode = args.stages if args.stages != "auto" else ("chain" if args.backend == "slurm" else "single")
        if mode == "chain" and args.backend != "slurm":
            raise ClusterError(f"--stages chain needs job dependencies (Slurm afterok); the {args.backend} "
                               f"backend runs the curriculum as one job: use --stages single")
        cmds = stage_commands(command[1], command[2:], mode)
        if mode == "single":
            return job_id, [_spec(base, job_id, cmds[0][1])], False
        return job_id, [_spec(base, f"{job_id}-{slug}"[:63].rstrip("-"), c) for slug, c in cmds], True
    return job_id, [_spec(base, job_id, command)], False


def _spec(base: dict, job_id: str, command: list[str]) -> JobSpec:
    from sar_scale.config import load_config

    return load_config(JobSpec, {**base, "job_id": job_id, "command": command})


def dry_run_text(job_id: str, specs: list[JobSpec], chain: bool, registry: JobRegistry, backend) -> str:
    if not chain:
        return backend.render(specs[0], registry.job_dir(specs[0].job_id))
    parts = [f"# chain {job_id}: {len(specs)} dependent job(s); each starts after the previous one "
             f"succeeded (afterok). $<JOB>_ID is the Slurm id printed by the previous sbatch.\n"]
    prev = None
    for s in specs:
        after = [f"${prev}"] if prev else None  # the previous job's Slurm id, known at submit time
        parts.append(backend.render(s, registry.job_dir(s.job_id), after=after))
        prev = s.job_id.upper().replace("-", "_") + "_ID"
    return "\n".join(parts)


def wait_for(records, backend, timeout: float) -> str:
    """Poll until every record is terminal; returns the last state seen (progress on stderr)."""
    from tqdm import tqdm

    start = time.time()
    bar = tqdm(total=len(records), desc="waiting", unit="job", file=sys.stderr, leave=True)
    done: dict[str, str] = {}
    state = "UNKNOWN"
    while len(done) < len(records):
        for rec in records:
            if rec.job_id in done:
                continue
            st = backend.status(rec)
            bar.set_postfix_str(f"{rec.job_id}: {st.state}")
            if st.state in TERMINAL:
                done[rec.job_id] = st.state
                bar.update(1)
                if st.state != "SUCCEEDED":
                    bar.close()
                    return st.state
            state = st.state
        if timeout and time.time() - start > timeout:
            bar.close()
            raise ClusterError(f"--wait: gave up after {timeout:.0f}s (last state {state}); the job keeps running")
        if len(done) < len(records):
            time.sleep(1.0)
    bar.close()
    return "SUCCEEDED"


def main(argv: list[str]) -> int:
    opts, command = split_argv(list(argv))
    parser = build_parser()
    args = parser.parse_args(opts)
    command = command or list(args.command)
    if not command:
        parser.error("no command: put the sar-scale command after `--`, e.g. `-- train cfg.yaml`")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    registry = JobRegistry(args.registry)
    try:
        job_id, specs, chain = make_specs(args, command)
        backend = get_backend(args.backend, ray_address=args.ray_address)
        if args.dry_run:
            sys.stdout.write(dry_run_text(job_id, specs, chain, registry, backend))
            return 0
        from cluster.submit import submit_chain, submit_job

        if chain:
            res = submit_chain(job_id, specs, registry, backend)
            records = [m.record for m in res.members]
        else:
            res = submit_job(specs[0], registry, backend)
            records = [res.record]
    except (ClusterError, ConfigError) as e:
        print(f"sar-scale submit: error: {e}", file=sys.stderr)
        return 2
    summary = {"job_id": job_id, "backend": args.backend, "created": res.created,
               "jobs": [{"job_id": r.job_id, "backend_id": r.backend_id, "command": r.command,
                         "log": r.info.get("log")} for r in records]}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        verb = "submitted" if res.created else "already submitted (not resubmitted)"
        print(f"job {job_id}: {verb} on {args.backend}")
        for r in records:
            print(f"  {r.job_id}: {args.backend} id {r.backend_id}  ({' '.join(r.command)})")
        print(f"track it with: sar-scale jobs status {job_id}   |   sar-scale jobs logs {job_id}")
    if args.wait:
        try:
            state = wait_for(records, backend, args.timeout)
        except ClusterError as e:
            print(f"sar-scale submit: {e}", file=sys.stderr)
            return 1
        print(f"job {job_id}: {state}")
        try:
            tail = backend.logs(records[-1], tail=20)
            print(tail, end="" if tail.endswith("\n") else "\n")
        except ClusterError as e:
            print(f"(no log: {e})")
        return 0 if state == "SUCCEEDED" else 1
    return 0
