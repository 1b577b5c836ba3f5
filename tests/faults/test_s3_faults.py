"""Object-storage faults (promise 4) at the storage layer, through the fault proxy on the moto server.

The pipeline, loader and checkpoint runs through the same proxy live in test_pipeline_faults.py and
test_train_faults.py; here: the proxy itself is deterministic, every Storage operation survives
10-20% injected faults with nothing lost or duplicated, and a permanent outage ends each of the three
client paths (pipeline upload, loader read, checkpoint upload) with a clear error in bounded time.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import pytest

from sar_scale.data.storage import S3Storage, StorageError, open_storage
from sar_scale.testing.s3_fault_proxy import KINDS, FaultConfig, S3FaultProxy, request_identity

pytestmark = [pytest.mark.faults, pytest.mark.integration]


def test_fault_schedule_is_deterministic_and_seeded():
    """Same seed -> the same attempts fail, whatever the thread order; another seed -> another schedule."""
    reqs = [("GET", f"/b/k{i % 7}?partNumber={i % 3}&uploadId={i}") for i in range(300)]

    def schedule(seed: int, order: list[int]) -> dict[tuple[str, int], str]:
        px = S3FaultProxy("http://127.0.0.1:9", FaultConfig.mixed(0.2, seed=seed, kinds=KINDS))
        try:
            seen: dict[str, int] = {}
            out = {}
            for i in order:
                ident = request_identity(*reqs[i])
                seen[ident] = seen.get(ident, 0) + 1
                out[(ident, seen[ident])] = px.decide(*reqs[i])[0]
            return out
        finally:
            px.stop()

    fwd = list(range(300))
    a, b = schedule(1, fwd), schedule(1, fwd[::-1])
    assert a == b
    c = schedule(2, fwd)
    assert a != c
    share = sum(v != "forward" for v in a.values()) / len(a)
    assert 0.1 < share < 0.3, share
    # retries of one multipart part are "the same request" whatever the upload id
    assert request_identity("PUT", "/b/k?partNumber=2&uploadId=x") == request_identity("PUT", "/b/k?uploadId=y&partNumber=2")


def test_storage_survives_faults_nothing_lost_or_duplicated(s3_env, fault_proxy, tmp_path, monkeypatch, figures):
    """15% of attempts fail (500, 503 SlowDown, reset, slow, lost reply, body cut mid-stream): every put,
    get, range read, download, size, list and delete still completes and returns exactly the right bytes."""
    s3_env.make_bucket("flt-storage")
    fault_proxy.configure(FaultConfig.mixed(0.15, seed=25, kinds=KINDS))  # a seed that hits every kind
    monkeypatch.setenv("AWS_ENDPOINT_URL", fault_proxy.endpoint)
    st = open_storage("s3://flt-storage/p")
    blobs = {f"obj/{i:02d}.bin": hashlib.sha256(str(i).encode()).digest() * (50 + 40 * i) for i in range(16)}
    for i, (k, v) in enumerate(blobs.items()):
        if i % 2:
            (tmp_path / "up.bin").write_bytes(v)
            st.put_file(tmp_path / "up.bin", k)  # transfer manager path
        else:
            st.put_bytes(v, k)
    for k, v in blobs.items():
        assert st.get_bytes(k) == v
        assert st.get_range(k, 17, 100) == v[17:117]
        assert st.size(k) == len(v)
        assert st.get_file(k, tmp_path / "dl.bin").read_bytes() == v
    assert st.list("obj/") == sorted(blobs)  # nothing duplicated, nothing missing
    for k in list(blobs)[:4]:
        st.delete(k)
    assert st.list("obj/") == sorted(blobs)[4:]
    # what the server holds, read directly (no proxy): byte-identical
    direct = s3_env.client()
    for k, v in list(blobs.items())[4:]:
        assert direct.get_object(Bucket="flt-storage", Key=f"p/{k}")["Body"].read() == v
    snap = fault_proxy.snapshot()
    assert snap["injected"] >= 15 and all(snap[k] > 0 for k in KINDS), snap
    ops = len(blobs) * 5 + 1 + 4 + 2
    figures.record("4_object_storage_faults", "storage_ops", tried=snap["injected"], survived=snap["injected"],
                   lost=0, operations=ops, requests=snap["requests"],
                   by_kind={k: snap[k] for k in KINDS})


def _checkpoint_dir(root: Path) -> tuple[str, list[str]]:
    """A small checkpoint folder shaped like the trainer's (marker written by the real verifier code)."""
    from sar_scale.checkpoint.manager import COMPLETE, _files_of, sha256_file, tag_for

    tag = tag_for(2)
    d = root / tag
    d.mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(b"\1" * 5000)
    (d / "train_state.json").write_text(json.dumps({"global_step": 2, "stage": 0, "data": {}}))
    files = _files_of(d)
    marker = {"files": {f: {"sha256": sha256_file(d / f), "bytes": (d / f).stat().st_size} for f in files}}
    (d / COMPLETE).write_text(json.dumps(marker))
    return tag, files


def test_permanent_outage_ends_each_client_path_with_a_clear_error(s3_server, tmp_path, monkeypatch, figures):
    """An endpoint that always answers 503 / 500 / resets: the pipeline's shard upload, the loader's index
    read and the checkpoint mirror upload each raise StorageError naming the object after exactly the retry
    budget, in bounded time (no hang). Run concurrently, one outage kind each, with a 4-attempt budget to keep
    the suite fast (the default 8 retries back off for at most 1+2+4+8+16+20+20+20 = 91 s; the `data prepare`
    CLI is run against an outage with the defaults in test_pipeline_faults.py)."""
    from sar_scale.checkpoint.manager import CheckpointManager
    from sar_scale.data.loader import DatasetIndex
    from sar_scale.data.shards import commit_shard

    ATTEMPTS = 4
    bucket = s3_server.make_bucket("flt-outage")
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    proxies = {kind: S3FaultProxy(s3_server.endpoint, FaultConfig(permanent=kind)).start()
               for kind in ("503", "500", "reset")}
    tag, files = _checkpoint_dir(tmp_path / "ckpt")

    def pipeline_upload(ep: str):
        st = S3Storage(f"s3://{bucket}/shards", endpoint_url=ep, max_attempts=ATTEMPTS)
        commit_shard(st, "d", 0, [], {64: (8, 8)}, tmp_dir=tmp_path)

    def loader_read(ep: str):
        DatasetIndex(f"s3://{bucket}/shards", storage=S3Storage(f"s3://{bucket}/shards", endpoint_url=ep,
                                                                max_attempts=ATTEMPTS))

    def checkpoint_upload(ep: str):
        mgr = CheckpointManager(tmp_path / "ckpt", mirror_url=f"s3://{bucket}/ckpt")
        mgr._mirror = S3Storage(f"s3://{bucket}/ckpt", endpoint_url=ep, max_attempts=ATTEMPTS)
        mgr._upload(tag, files)  # what the trainer's background upload thread runs

    jobs = {"pipeline_upload": (pipeline_upload, "503", "d-000000."),  # stale stats delete, then the tar
            "loader_read": (loader_read, "500", "manifest.json"),
            "checkpoint_upload": (checkpoint_upload, "reset", f"{tag}/")}
    results: dict[str, tuple[BaseException | None, float]] = {}

    def go(name: str) -> None:
        fn, kind, _ = jobs[name]
        t0 = time.time()
        try:
            fn(proxies[kind].endpoint)
            results[name] = (None, time.time() - t0)
        except BaseException as e:  # noqa: BLE001 - inspected below
            results[name] = (e, time.time() - t0)

    threads = [threading.Thread(target=go, args=(n,), daemon=True) for n in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    try:
        assert not any(t.is_alive() for t in threads), "a client hung on a permanent outage"
        for name, (_, kind, names) in jobs.items():
            err, secs = results[name]
            assert isinstance(err, StorageError), (name, err)
            assert names in str(err) and f"s3://{bucket}/" in str(err), (name, str(err))
            attempts = proxies[kind].snapshot()["permanent"]
            # the budget, then a clear stop (botocore's max_attempts counts the retries after the first call)
            assert attempts == ATTEMPTS + 1, (name, attempts)
            assert secs < 60, (name, secs)
        figures.record("4_object_storage_faults", "permanent_outage", tried=3, survived=3, lost=0,
                       note="survived = ended with a clear StorageError in bounded time",
                       seconds={n: round(results[n][1], 1) for n in jobs},
                       errors={n: str(results[n][0])[:160] for n in jobs})
    finally:
        for px in proxies.values():
            px.stop()


def test_proxy_cli_serves_faults_and_reports_counts(s3_server):
    """`python -m sar_scale.testing.s3_fault_proxy` prints its endpoint, injects the configured fault, and on
    Ctrl-C prints what it injected."""
    import os
    import signal
    import subprocess
    import sys
    import urllib.error
    import urllib.request

    from tests.faults.conftest import REPO, clean_env

    proc = subprocess.Popen([sys.executable, "-m", "sar_scale.testing.s3_fault_proxy", "--upstream", s3_server.endpoint,
                             "permanent=503"], env=clean_env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        first = proc.stdout.readline()
        assert first.startswith("s3 fault proxy on http://127.0.0.1:"), first
        endpoint = first.split()[4]
        with pytest.raises(urllib.error.HTTPError) as ei:
            urllib.request.urlopen(f"{endpoint}/some-bucket/key", timeout=10)
        assert ei.value.code == 503 and b"<Code>SlowDown</Code>" in ei.value.read()
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    assert "'permanent': 1" in out and "'requests': 1" in out, out
