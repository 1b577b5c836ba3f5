"""`sar-scale dashboard`: the MLflow UI on a tracking store, on loopback, at a free port.

Training and evaluation log into an embedded SQLite store (``RUN_DIR/mlflow.db``); this command
finds that store under a work folder (the demo's by default), starts ``mlflow server`` on
127.0.0.1 with the lean flags that suit a laptop (one worker, no job-execution workers: ~0.4 GB
instead of ~1.9 GB with the defaults, measured with MLflow 3.17 on the 2-core development machine),
waits until it answers, prints the URL (and a direct link
to the newest run) and serves until Ctrl-C. Artifacts (sample grids, eval tables) live in files
beside the store and are served by the same process.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from sar_scale.utils.net import free_port
from sar_scale.utils.procs import stop_process_group

logger = logging.getLogger(__name__)

DEFAULT_WORKDIR = "runs/demo"
HOST = "127.0.0.1"  # loopback only: the UI has no authentication


def find_store(workdir: str | Path) -> str:
    """The SQLite tracking store under ``workdir`` (the newest ``mlflow.db`` when there are several)."""
    root = Path(workdir)
    if not root.exists():
        raise FileNotFoundError(f"--workdir {root}: no such folder (run `sar-scale demo` first, or pass "
                                f"--backend-store-uri)")
    if root.is_file() and root.suffix == ".db":
        return f"sqlite:///{root.resolve()}"
    dbs = sorted(root.rglob("mlflow.db"), key=lambda p: p.stat().st_mtime, reverse=True)
    if not dbs:
        raise FileNotFoundError(f"--workdir {root}: no mlflow.db under it (a training run writes "
                                f"RUN_DIR/mlflow.db); pass --backend-store-uri for another store")
    if len(dbs) > 1:
        logger.info("several tracking stores under %s; using the newest %s (others: %s)", root, dbs[0],
                    ", ".join(map(str, dbs[1:])))
    return f"sqlite:///{dbs[0].resolve()}"


# MLflow 3's UI picks its GenAI or model-training view from this URL parameter first, then from the
# browser's last choice (GenAI by default), whatever the experiment's kind tag says
MODEL_TRAINING_VIEW = "workflowType=machine_learning"


def latest_run_path(store_uri: str) -> str | None:
    """``#/experiments/E/runs/R/model-metrics`` (its charts, in the model-training view) of the newest
    run in the store, for a direct link."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store_uri)
    exps = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in exps], order_by=["attributes.start_time DESC"],
                              max_results=1) if exps else []
    if not runs:
        return None
    r = runs[0].info
    return f"#/experiments/{r.experiment_id}/runs/{r.run_id}/model-metrics?{MODEL_TRAINING_VIEW}"


def die_with_parent() -> None:
    """Linux: the server gets SIGTERM when this process dies, even by SIGKILL (no orphaned UI).

    ``mlflow server`` stops its uvicorn worker on SIGTERM. Elsewhere this is a no-op and the
    SIGTERM/SIGINT handlers of :func:`main` do the cleanup.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def _mlflow_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "mlflow"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("mlflow")
    return [found] if found else [sys.executable, "-m", "mlflow"]


class Dashboard:
    """A running ``mlflow server`` (its own process group, so stopping it stops its workers)."""

    def __init__(self, store_uri: str, port: int | None = None, artifacts_dir: str | Path | None = None,
                 log_path: str | Path | None = None):
        self.store_uri = store_uri
        self.port = port or free_port()
        self.url = f"http://{HOST}:{self.port}"
        if artifacts_dir is None and store_uri.startswith("sqlite:///"):
            artifacts_dir = Path(store_uri[len("sqlite:///"):]).parent / "mlartifacts"
        self.artifacts_dir = Path(artifacts_dir) if artifacts_dir else None
        self.log_path = Path(log_path) if log_path else None
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        cmd = [*_mlflow_cmd(), "server", "--backend-store-uri", self.store_uri, "--host", HOST,
               "--port", str(self.port), "--workers", "1"]
        if self.artifacts_dir is not None:
            # new experiments made from the UI keep their artifacts beside the store, not in ./mlartifacts
            cmd += ["--artifacts-destination", str(self.artifacts_dir.resolve())]
        return cmd

    def start(self, timeout: float = 120.0) -> str:
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(self.command(), env=env, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=die_with_parent)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:] if self.log_path else ""
                raise RuntimeError(f"mlflow server exited with code {self.proc.returncode}" +
                                   (f"; log tail:\n{tail}" if tail else ""))
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return self.url
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"mlflow server did not answer on {self.url} within {timeout:.0f} s")

    def stop(self, timeout: float = 5.0) -> None:
        # uvicorn waits for open keep-alive connections (a browser tab) before it exits on SIGTERM,
        # so the grace period is short and SIGKILL follows
        if self.proc is not None:
            stop_process_group(self.proc, timeout)  # the server's own group (start_new_session)

    def __enter__(self) -> Dashboard:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="sar-scale dashboard",
        description="Start the MLflow UI on a tracking store (loopback only, a free port unless --port) "
                    "and print its URL; Ctrl-C stops it. By default it serves the demo's store "
                    f"({DEFAULT_WORKDIR}/**/mlflow.db).")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--workdir", default=None,
                     help=f"folder to search for mlflow.db (default {DEFAULT_WORKDIR}, the demo's work folder)")
    src.add_argument("--backend-store-uri", default=None,
                     help="an MLflow backend store URI instead, e.g. sqlite:///runs/x/mlflow.db or "
                          "postgresql://user@127.0.0.1/mlflow")
    p.add_argument("--port", type=int, default=None, help="port on 127.0.0.1 (default: a free one)")
    p.add_argument("--artifacts-dir", default=None,
                   help="where artifacts of experiments created in the UI go (default: beside the store)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the server to answer")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        uri = a.backend_store_uri or find_store(a.workdir or DEFAULT_WORKDIR)
    except FileNotFoundError as e:
        print(f"sar-scale dashboard: {e}", file=sys.stderr)
        return 2
    if a.port is not None and not (0 < a.port < 65536):
        print(f"sar-scale dashboard: --port must be 1-65535, got {a.port}", file=sys.stderr)
        return 2
    try:
        link = latest_run_path(uri)
    except Exception as e:  # noqa: BLE001 - the UI can still start (e.g. an empty store); say why no link
        logger.warning("could not list runs in %s: %s", uri, e)
        link = None
    dash = Dashboard(uri, a.port, a.artifacts_dir)

    def _terminate(signum: int, _frame: object) -> None:
        # the server runs in its own session: on SIGTERM/SIGHUP stop it too, never leave it orphaned
        raise KeyboardInterrupt

    # SIGINT too: a shell starts background jobs with SIGINT ignored, and Python keeps it ignored
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminate)
    print(f"starting MLflow UI on {uri} ...", flush=True)
    try:
        try:
            url = dash.start(a.timeout)
        except (RuntimeError, TimeoutError) as e:
            print(f"sar-scale dashboard: {e}", file=sys.stderr)
            return 1
        print(f"MLflow UI: {url}", flush=True)
        if link:
            print(f"newest run: {url}/{link}", flush=True)
        print("press Ctrl-C to stop", flush=True)
        while dash.proc is not None and dash.proc.poll() is None:
            time.sleep(0.5)
        print(f"sar-scale dashboard: mlflow server exited with code {dash.proc.returncode}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopping the MLflow UI", flush=True)
        return 0
    finally:
        dash.stop()
