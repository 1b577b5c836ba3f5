"""`sar-scale data prepare` under faults: bad inputs (promise 5), S3 faults (4), SIGKILL of a Ray worker and
of the driver (3), secrets (8), and a permanent S3 outage (4). Every run is compared with one clean run.

All runs are real CLI processes with their own local Ray; S3 is the session's moto server, reached
directly or through the fault proxy.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from pipelines.prepare import COMMIT_DELAY_ENV
from sar_scale.data import schema
from sar_scale.data.storage import Storage, open_storage
from sar_scale.testing.s3_fault_proxy import KINDS, FaultConfig, S3FaultProxy
from tests.faults import corpus
from tests.faults.conftest import REPO, clean_env, prepare_config, run_cli

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.slow]

CANARY_AWS = "CANARY-aws-5ecret-7f3a9c1e"
CANARY_MLFLOW = "CANARY-mlflow-t0ken-b81d44"


def shard_set(st: Storage) -> dict[str, Any]:
    """What a dataset holds: tar bytes (by name), each sample's members, rejects, committed shards."""
    tars, samples = {}, {}
    for tar, _ in schema.committed_shards(st):
        data = st.get_bytes(tar)
        tars[tar] = hashlib.sha256(data).hexdigest()
        with tarfile.open(fileobj=io.BytesIO(data)) as tf:
            for ti in tf:
                key, ext = ti.name.split(".", 1)
                digest = hashlib.sha256(tf.extractfile(ti).read()).hexdigest()  # read, never extracted
                assert ext not in samples.setdefault(key, {}), f"{tar}: {ti.name} twice"
                samples[key][ext] = digest
    rejects = sorted((r["source_id"], r["reason"]) for r in schema.read_rejects(st))
    return {"tars": tars, "samples": samples, "rejects": rejects, "keys": st.list()}


def source_ids(st: Storage) -> list[str]:
    out = []
    for tar, _ in schema.committed_shards(st):
        with tarfile.open(fileobj=io.BytesIO(st.get_bytes(tar))) as tf:
            out += [json.loads(tf.extractfile(ti).read())["source_id"] for ti in tf if ti.name.endswith(".json")]
    return out


def s3_direct(server, url: str) -> Storage:
    """Storage on the moto server itself (no proxy), to see what is really there."""
    from sar_scale.data.storage import S3Storage

    return S3Storage(url, endpoint_url=server.endpoint)


def upload_tree(server, root: Path, bucket: str, prefix: str) -> int:
    c = server.client()
    n = 0
    for p in sorted(root.rglob("*")):
        if p.is_file():
            c.upload_file(str(p), bucket, f"{prefix}/{p.relative_to(root).as_posix()}")
            n += 1
    return n


@pytest.fixture(scope="module")
def outage_run(s3_server, tmp_path_factory, tiny_vq, corpus_dir):
    """`data prepare` to an S3 endpoint that is down for good (every request: 503 SlowDown), with the
    default retry budget. Started early in the module so its backoff overlaps the other runs."""
    tmp = tmp_path_factory.mktemp("outage")
    s3_server.make_bucket("flt-pout")
    proxy = S3FaultProxy(s3_server.endpoint, FaultConfig(permanent="503")).start()
    cfg = prepare_config(tmp / "p.yaml", str(corpus_dir[0]), "s3://flt-pout/shards", tiny_vq)
    env = clean_env(**s3_server.env())
    env["AWS_ENDPOINT_URL"] = proxy.endpoint
    log = open(tmp / "log.txt", "wb")  # noqa: SIM115 - closed below
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "sar_scale.cli", "data", "prepare", str(cfg)], env=env,
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    state = {"proc": proc, "t0": t0, "log": tmp / "log.txt", "proxy": proxy}
    yield state
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    log.close()
    proxy.stop()


def test_bad_input_corpus_each_rejected_or_normalised_none_lost(outage_run, clean_prepare, corpus_dir, figures):
    """24 kinds of bad/odd inputs next to 24 good images: every input is either a sample (exactly once) or a
    rejects.jsonl row with the expected reason; normalised ones are clean RGB samples; nothing crashes."""
    _, expect = corpus_dir
    st = open_storage(clean_prepare["out"])
    ids = source_ids(st)
    assert len(ids) == len(set(ids)), "a sample was written twice"
    rejects = {r["source_id"]: r["reason"] for r in schema.read_rejects(st)}
    man = schema.read_dataset_manifest(st)
    assert man["inputs"] == len(expect) == len(ids) + len(rejects)  # count in == out + rejected
    assert set(ids) | set(rejects) == set(expect) and not set(ids) & set(rejects)
    for sid, fate in expect.items():
        if fate in ("accept", "normalise"):
            assert sid in ids, (sid, rejects.get(sid))
        else:
            assert rejects.get(sid) == fate.split(":", 1)[1], (sid, fate, rejects.get(sid))
    # normalised samples really are clean: tokens at 64 px for the converted pixels, cleaned caption
    samples = {}
    for tar, _ in schema.committed_shards(st):
        with tarfile.open(fileobj=io.BytesIO(st.get_bytes(tar))) as tf:
            cur: dict[str, bytes] = {}
            for ti in tf:
                cur[ti.name] = tf.extractfile(ti).read()
        for name, data in cur.items():
            if name.endswith(".json"):
                meta = json.loads(data)
                key = name[: -len(".json")]
                samples[meta["source_id"]] = (meta, cur[f"{key}.txt"].decode("utf-8"))
    meta, cap = samples["bad/ctrl.png"]
    assert cap == "a blue wave [31mpattern here"  # NUL, BEL, ESC, zero-width space and CR/LF removed
    assert samples["bad/rotated.jpg"][0]["orig_size"] == [120, 72]  # EXIF orientation applied
    for sid in ("bad/cmyk.jpg", "bad/gray16.png", "bad/palette.png", "bad/gray_alpha.png", "bad/really_png.jpg"):
        assert "64" in samples[sid][0]["buckets"], sid
    bad = [c for c in corpus.bad_cases()]
    figures.record("5_bad_input", "folder_corpus", tried=len(bad), survived=len(bad), lost=0,
                   kinds=len({c.kind for c in bad}), inputs=man["inputs"], samples=len(ids), rejected=len(rejects),
                   normalised=sum(c.expect == "normalise" for c in bad),
                   reasons=dict(sorted(man["rejects"].items())))


def test_tar_input_traversal_absolute_and_link_members_never_touch_the_disk(tmp_path, figures):
    """The pipeline's tar input (scan task, as Ray runs it) on a tar with ../, absolute, symlink, hardlink and
    device members: each is rejected as unsafe_member, good samples pass, and nothing is written anywhere."""
    from pipelines.config import PrepareConfig
    from pipelines.stages import scan_unit

    outside = tmp_path / "outside" / "pwned.txt"
    tar = tmp_path / "in" / "evil.tar"
    tar.parent.mkdir()
    expect = corpus.evil_tar(tar, outside)
    before = {p for p in Path(tempfile.gettempdir()).rglob("pwned*")}
    cwd = os.getcwd()
    os.chdir(tmp_path / "in")  # a relative extraction would land here
    try:
        cfg = PrepareConfig.model_validate({"input": {"kind": "webdataset", "path": str(tar)},
                                            "filters": {"min_side": 64, "caption_min_words": 2}})
        res = scan_unit({"kind": "tar", "root": str(tar.parent), "key": tar.name}, cfg.model_dump_json())
    finally:
        os.chdir(cwd)
    got = {r["source_id"]: "accept" for r in res["rows"]}
    got.update({r["source_id"]: f"reject:{r['reason']}" for r in res["rejects"]})
    assert got == expect
    assert not outside.exists() and not outside.parent.exists()
    assert {p for p in Path(tempfile.gettempdir()).rglob("pwned*")} == before
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == ["evil.tar"]
    n_bad = sum(v.startswith("reject") for v in expect.values())
    figures.record("7_no_untrusted_code_or_paths", "tar_members", tried=n_bad, survived=n_bad, lost=0,
                   good_samples_kept=len(expect) - n_bad)
    figures.record("5_bad_input", "tar_members", tried=n_bad, survived=n_bad, lost=0)


def _kill_workers_once(root_pid: int, names: tuple[str, ...], stop: threading.Event, killed: list[str]) -> None:
    """SIGKILL the first Ray worker process of each name found under ``root_pid`` (a crashed worker)."""
    todo = set(names)
    while todo and not stop.is_set():
        try:
            procs = psutil.Process(root_pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for p in procs:
            try:
                title = " ".join(p.cmdline()) or p.name()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            for n in list(todo):
                if n in title and time.time() - p.create_time() > 0.5:
                    try:
                        p.send_signal(signal.SIGKILL)
                        killed.append(f"{n} pid {p.pid}")
                        todo.discard(n)
                    except psutil.NoSuchProcess:
                        pass
        time.sleep(0.05)


def test_s3_faults_and_worker_kills_give_the_clean_result(s3_env, tmp_path, clean_prepare, corpus_dir, tiny_vq,
                                                          figures):
    """Inputs read from and shards written to S3 through the fault proxy (15% of requests: 500, 503, reset,
    slow, lost reply, body cut), a scan worker and the tokenizer actor SIGKILLed mid-run, canary secrets in
    the environment: the run finishes, and its shards, samples and rejects equal the clean local run's."""
    s3_server = s3_env
    s3_server.make_bucket("flt-pin")
    s3_server.make_bucket("flt-pout2")
    n_in = upload_tree(s3_server, corpus_dir[0], "flt-pin", "in")
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths have a length limit
    env = clean_env(**{**s3_server.env(), "AWS_SECRET_ACCESS_KEY": CANARY_AWS}, MLFLOW_TRACKING_TOKEN=CANARY_MLFLOW,
                    RAY_TMPDIR=str(ray_tmp), **{COMMIT_DELAY_ENV: "0.3"})
    cfg = prepare_config(tmp_path / "p.yaml", "s3://flt-pin/in", "s3://flt-pout2/shards", tiny_vq)
    with S3FaultProxy(s3_server.endpoint, FaultConfig.mixed(0.15, seed=3, kinds=KINDS)) as px:
        env["AWS_ENDPOINT_URL"] = px.endpoint
        log = open(tmp_path / "log.txt", "wb")  # noqa: SIM115
        proc = subprocess.Popen([sys.executable, "-m", "sar_scale.cli", "data", "prepare", str(cfg)], env=env,
                                cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        killed: list[str] = []
        stop = threading.Event()
        killer = threading.Thread(target=_kill_workers_once, args=(proc.pid, ("scan_unit", "TokenizeActor"), stop,
                                                                  killed), daemon=True)
        killer.start()
        try:
            rc = proc.wait(300)
        finally:
            stop.set()
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.close()
        snap = px.snapshot()
    out = (tmp_path / "log.txt").read_text(errors="replace")
    try:
        assert rc == 0, out[-5000:]
        assert len(killed) == 2, (killed, out[-2000:])
        got = shard_set(s3_direct(s3_server, "s3://flt-pout2/shards"))
        ref = shard_set(open_storage(clean_prepare["out"]))
        assert got["tars"] == ref["tars"]  # byte-identical shards, same names: nothing lost, nothing twice
        assert got["samples"] == ref["samples"] and got["rejects"] == ref["rejects"]
        assert got["keys"] == ref["keys"]  # no orphan or temp objects
        assert not s3_server.client().list_multipart_uploads(Bucket="flt-pout2").get("Uploads")
        assert snap["injected"] >= 10 and snap["injected"] >= 0.1 * snap["requests"], snap
        # secrets: nowhere in the output, the written objects, or Ray's session logs
        leaks = [p for p in ray_tmp.rglob("*") if p.is_file() and CANARY_AWS.encode() in p.read_bytes()]
        objs = s3_direct(s3_server, "s3://flt-pout2/shards")
        leaks += [k for k in objs.list() if CANARY_AWS.encode() in objs.get_bytes(k)
                  or CANARY_MLFLOW.encode() in objs.get_bytes(k)]
        assert CANARY_AWS not in out and CANARY_MLFLOW not in out and not leaks, leaks
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    figures.record("4_object_storage_faults", "data_prepare_s3", tried=snap["injected"], survived=snap["injected"],
                   lost=0, requests=snap["requests"], inputs_on_s3=n_in, by_kind={k: snap[k] for k in KINDS})
    figures.record("3_pipeline_crash", "ray_worker_sigkill", tried=len(killed), survived=len(killed), lost=0,
                   killed=killed)
    figures.record("8_secrets", "data_prepare", tried=2, survived=2, lost=0,
                   checked="CLI output, every written object, Ray session logs")


def test_driver_sigkill_then_rerun_is_exactly_the_clean_result(s3_env, tmp_path, clean_prepare, figures):
    """SIGKILL the `data prepare` driver (only the driver) after its first shard commit on S3; the rerun
    writes the identical final set exactly once and leaves no orphan object or multipart upload."""
    s3_server = s3_env
    s3_server.make_bucket("flt-pkill")
    url = "s3://flt-pkill/shards"
    direct = s3_direct(s3_server, url)
    cfg = clean_prepare["config"]
    env = clean_env(**s3_server.env(), **{COMMIT_DELAY_ENV: "2"})
    log = open(tmp_path / "kill.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "sar_scale.cli", "data", "prepare", str(cfg), f"output.url={url}"],
                            env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and not direct.list():
            time.sleep(0.1)
        while time.time() < deadline and proc.poll() is None and \
                not any(k.endswith(".stats.json") for k in direct.list()):
            time.sleep(0.1)
        assert proc.poll() is None, (tmp_path / "kill.log").read_text()[-3000:]
        family = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGKILL)  # the driver only; Ray's processes must notice by themselves
        proc.wait(30)
    finally:
        log.close()
    committed_at_kill = sum(k.endswith(".stats.json") for k in direct.list())
    assert 1 <= committed_at_kill < len(schema.committed_shards(open_storage(clean_prepare["out"])))
    assert not direct.exists(schema.MANIFEST)
    # Ray's raylet, GCS and workers die with the driver; its DashboardAgent and RuntimeEnvAgent do not
    # (upstream Ray: they wait on the dead GCS). Recorded in the figures, then killed (we started them).
    orphans: list[str] = []
    for _ in range(150):
        orphans = []
        for p in family:
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    orphans.append(" ".join(p.cmdline())[:40] or p.name())
            except psutil.NoSuchProcess:
                pass
        if all("Agent" in o for o in orphans):
            break
        time.sleep(0.1)
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass

    rc, out, _ = run_cli(["data", "prepare", str(cfg), f"output.url={url}"], clean_env(**s3_server.env()), 240,
                         tmp_path / "rerun.log")
    assert rc == 0, out[-4000:]
    assert f"{committed_at_kill} already committed" in out
    ref_st = open_storage(clean_prepare["out"])
    got, ref = shard_set(direct), shard_set(ref_st)
    assert got["tars"] == ref["tars"] and got["samples"] == ref["samples"] and got["rejects"] == ref["rejects"]
    assert got["keys"] == ref["keys"]  # no orphans, no temp objects
    assert not s3_server.client().list_multipart_uploads(Bucket="flt-pkill").get("Uploads")
    for k in ref["keys"]:
        if k.endswith(".stats.json"):  # same config, same inputs: even the commit markers are identical
            assert direct.get_bytes(k) == ref_st.get_bytes(k), k
    figures.record("3_pipeline_crash", "driver_sigkill_rerun", tried=1, survived=1, lost=0,
                   shards_committed_before_kill=committed_at_kill, shards_total=len(ref["tars"]),
                   ray_processes_left_by_the_killed_driver=sorted(orphans))


def test_permanent_s3_outage_ends_data_prepare_with_a_clear_error(outage_run, figures):
    """The run started by the outage_run fixture (default retry budget) exits non-zero, naming the S3
    location and the error, within a bounded time; it never hangs and writes nothing."""
    proc = outage_run["proc"]
    try:
        rc = proc.wait(max(1.0, 200 - (time.time() - outage_run["t0"])))
    except subprocess.TimeoutExpired:
        pytest.fail("data prepare still running 200 s into a permanent outage (hang)")
    secs = time.time() - outage_run["t0"]
    out = outage_run["log"].read_text(errors="replace")
    assert rc == 1
    lines = [ln for ln in out.splitlines() if ln.startswith("sar-scale data prepare: storage failed:")]
    assert len(lines) == 1 and "Traceback" not in out, out[-3000:]
    last = lines[0]
    assert "s3://flt-pout/shards" in last and "SlowDown" in last, last
    attempts = outage_run["proxy"].snapshot()["permanent"]
    assert attempts == 9, attempts  # the first call + the 8 retries of the default budget
    figures.record("4_object_storage_faults", "data_prepare_outage", tried=1, survived=1, lost=0,
                   note="survived = exited with a clear error, no hang", seconds=round(secs, 1), last_line=last)


def test_input_tar_streamed_from_s3_survives_a_cut_download(s3_env, monkeypatch, figures):
    """The pipeline's tar input streams each tar (open_read); a cut in the middle of the body is resumed
    from where it stopped (closed gap G1), giving the same samples as a clean read."""
    from pipelines.config import PrepareConfig
    from pipelines.stages import scan_unit

    s3_env.make_bucket("flt-tarcut")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for i in range(4):
            img = io.BytesIO()
            corpus.photo(96, 96, 300 + i).save(img, "PNG")
            for name, data in ((f"s{i}.png", img.getvalue()), (f"s{i}.txt", f"a tar sample number {i}".encode())):
                ti = tarfile.TarInfo(name)
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    s3_env.client().put_object(Bucket="flt-tarcut", Key="in/a.tar", Body=buf.getvalue())
    cfg = PrepareConfig.model_validate({"input": {"kind": "webdataset", "path": "s3://flt-tarcut/in"},
                                        "filters": {"min_side": 64}})
    # seed 6: the first GET of the tar is cut mid-body, the next attempts pass
    with S3FaultProxy(s3_env.endpoint, FaultConfig(truncate=0.5, methods=["GET"], seed=6)) as px:
        monkeypatch.setenv("AWS_ENDPOINT_URL", px.endpoint)
        res = scan_unit({"kind": "tar", "root": "s3://flt-tarcut/in", "key": "a.tar"}, cfg.model_dump_json())
        assert px.snapshot()["truncate"] >= 1
    assert len(res["rows"]) == 4 and not res["rejects"]
    figures.record("4_object_storage_faults", "input_tar_cut_mid_body", tried=px.snapshot()["truncate"],
                   survived=px.snapshot()["truncate"], lost=0)
