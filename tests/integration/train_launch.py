"""Helpers for the multi-process training tests: spawn ranks like a launcher does, read run outputs.

Also runnable as a worker: ``python tests/integration/train_launch.py zero-sweep CFG_JSON PORTS``
trains the same config under ZeRO 0, 1, 2 and 3 one after another inside one process per rank
(one interpreter start instead of four), each stage on its own rendezvous port.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from sar_scale.utils.net import free_port

REPO = Path(__file__).resolve().parents[2]


def rank_env(rank: int, world: int, port: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    for k in ("MLFLOW_TRACKING_URI", "SAR_SCALE_FAULT"):
        env.pop(k, None)
    env.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "MLFLOW_DISABLE_TELEMETRY": "true"})
    env.update(extra or {})
    return env


def spawn(world: int, argv: list[str], log_dir: Path, extra_env: dict[str, str] | None = None,
          name: str = "run") -> list[subprocess.Popen]:
    """Start ``world`` ranks of ``python ARGV`` (what torchrun would do, minus its agent)."""
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for r in range(world):
        log = open(log_dir / f"{name}.rank{r}.log", "wb")  # noqa: SIM115 - closed with the process
        procs.append(subprocess.Popen([sys.executable, *argv], env=rank_env(r, world, port, extra_env),
                                      stdout=log, stderr=subprocess.STDOUT, cwd=REPO))
        procs[-1]._log = log  # type: ignore[attr-defined]
    return procs


def wait(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    """Exit codes; kills everything still running after ``timeout`` seconds (and says so)."""
    deadline = time.time() + timeout
    codes = []
    try:
        for p in procs:
            codes.append(p.wait(max(0.1, deadline - time.time())))
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"ranks still running after {timeout}s") from None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            p._log.close()  # type: ignore[attr-defined]
    return codes


def stop(procs: list[subprocess.Popen]) -> None:
    """SIGKILL whatever is still running (a deliberately hung rank) and reap everything."""
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
        p._log.close()  # type: ignore[attr-defined]


def logs(log_dir: Path, name: str) -> str:
    return "\n".join(p.read_text(errors="replace")[-4000:] for p in sorted(log_dir.glob(f"{name}.rank*.log")))


def train_argv(cfg_path: Path, *overrides: str, resume: str = "auto") -> list[str]:
    return ["-m", "sar_scale.cli", "train", str(cfg_path), *overrides, "--resume", resume]


def metrics(run_dir: Path) -> dict[int, dict]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec  # steps re-run after a resume: the last record wins
    return out


def data_order(run_dir: Path, rank: int) -> dict[tuple[int, int], list[str]]:
    out = {}
    for line in (run_dir / "data_order" / f"rank{rank}.jsonl").read_text().splitlines():
        r = json.loads(line)
        out[(r["global_step"], r["micro"])] = r["keys"]
    return out


def keys_per_step(run_dir: Path) -> dict[int, list[str]]:
    """The union of the sample keys of each global step over all ranks (any world size), sorted; a step
    re-run after a resume counts once (its newest records, per global slot)."""
    recs: dict[tuple[int, int], tuple[float, list[str]]] = {}
    for path in (run_dir / "data_order").glob("rank*.jsonl"):
        for line in path.read_text().splitlines():
            r = json.loads(line)
            k = (r["global_step"], r["slot"])
            if k not in recs or r["time"] >= recs[k][0]:
                recs[k] = (r["time"], r["keys"])
    out: dict[int, list[str]] = {}
    for (step, _), (_, keys) in recs.items():
        out.setdefault(step, []).extend(keys)
    return {s: sorted(v) for s, v in sorted(out.items())}


def _zero_sweep(cfg_json: str, ports: str) -> int:
    from sar_scale.config import load_config
    from sar_scale.training.config import TrainConfig
    from sar_scale.training.trainer import Trainer

    base = json.loads(cfg_json)
    for stage, port in zip((0, 1, 2, 3), ports.split(",")):
        os.environ["MASTER_PORT"] = port
        cfg = load_config(TrainConfig, base, [f"deepspeed.zero_stage={stage}", f"run_dir={base['run_dir']}/z{stage}"])
        Trainer(cfg, resume="none").run()
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "zero-sweep":
        raise SystemExit(_zero_sweep(sys.argv[2], sys.argv[3]))
    raise SystemExit(f"unknown worker mode {sys.argv[1]!r}")


def base_config(run_dir: Path, shards: Path, **extra) -> dict:
    """The small ZeRO-2 debug-model run the multi-process training tests vary."""
    cfg = {
        "run_dir": str(run_dir), "seed": 3, "device": "cpu",
        "model": {"name": "debug"},
        "data": {"url": str(shards), "num_workers": 1},
        "plan": {"orders": {"random": 1.0, "raster": 1.0}, "num_sets": [2, 4], "intervals": {"random": 1.0}},
        "optim": {"lr": 2e-3, "warmup_steps": 0, "schedule": "constant"},
        "deepspeed": {"zero_stage": 2, "timeout_s": 60},
        "ema": {"enabled": True, "decay": 0.9},
        "curriculum": {"stages": [{"name": "s64", "resolution": 64, "steps": 2, "micro_batch": 2, "grad_accum": 2}]},
        "checkpoint": {"every_steps": 0, "keep_last": 2},
        "mlflow": {"enabled": False},
        "log_data_order": True,
    }
    for k, v in extra.items():
        cfg[k] = v
    return cfg
