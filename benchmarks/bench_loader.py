"""Training-reader benchmark (prints JSON): scale, throughput under S3 latency, data wait in training.

Parts (``--part``, default all):

* ``scale``: a synthetic format-v2 manifest of ``--shards`` x ``--per-shard`` samples (default
  2,000 x 10,000 = 20M; index files only, hard-linked to one file, no tars - start-up reads none):
  per-rank start-up time (manifest + epoch plan + this rank's first window of index files) and RSS
  growth, measured in a fresh process. The same for the previous reader (the per-sample
  ``ShardIndex`` + ``table()`` of commit 12c1b5f, loaded from git) at ``--old-samples`` (100k) on
  v1 ``stats.json`` files with a per-sample index of 7 members + 3 buckets, and its per-sample cost
  extrapolated to the large manifest.
* ``throughput``: loopback S3 (moto_server) behind the project's fault proxy with every request
  slowed by 20 ms (``slow=1.0 slow_s=0.02``); samples of the 900M run's shape (16x16 tokens + a
  120 x 2048 fp16 text feature); one process: samples/s of one rank reading a whole epoch, requests
  per epoch (counted at the proxy), and the previous reader (one ranged GET per sample) on the same
  data and proxy in the same run; ratio; and the new rate over the ~237 samples/s per GPU that
  ``sar-scale plan configs/t2i_900m/ --profile configs/cluster/h100-slurm.yaml`` gives for stage 1.
  ``--tokens-only`` drops the text feature: small samples, where latency per request, not bandwidth,
  bounds the per-sample reader.
* ``train``: ``sar-scale train`` of the demo-size model, 2 ranks (gloo, CPU), reading text-feature
  shards from that slowed S3: the share of step time spent waiting for data (steps 3+).

    python benchmarks/bench_loader.py                      # all parts, a few minutes on 2 busy cores
    python benchmarks/bench_loader.py --part scale --shards 200   # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
OLD_READER_COMMIT = "12c1b5f"  # the per-sample reader before the streaming rewrite
PLAN_STAGE1_SAMPLES_PER_GPU = 237.0  # `sar-scale plan configs/t2i_900m/ --profile configs/cluster/h100-slurm.yaml`


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# ----------------------------------------------------------------------------- scale


def make_v2_manifest(root: Path, shards: int, per_shard: int) -> None:
    import numpy as np

    from sar_scale.data import schema

    root.mkdir(parents=True, exist_ok=True)
    keys = np.array([f"{i:020d}".encode() for i in range(per_shard)], dtype="S20")
    size = 1000
    idx = np.zeros(per_shard, schema.INDEX_DTYPE)
    idx["key"], idx["start"], idx["end"] = keys, np.arange(per_shard) * size, np.arange(1, per_shard + 1) * size
    proto = root / "proto.index.npy"
    proto.write_bytes(schema.encode_npy(idx))
    grids = [(16, 16), (12, 20), (20, 12), (14, 18), (18, 14)]
    entries = []
    for i in range(shards):
        stem = schema.shard_stem("big", i)
        os.link(proto, root / f"{stem}.index.npy")
        g = grids[0] if i % 2 == 0 else grids[1 + (i // 2) % 4]  # half the shards square
        entries.append({"tar": f"{stem}.tar", "stats": f"{stem}.stats.json", "index": f"{stem}.index.npy",
                        "samples": per_shard, "bytes": per_shard * size, "grids": {"256": list(g)}})
    man = schema.make_dataset_manifest(entries, [256], True, "bench", {}, [])
    (root / "manifest.json").write_text(json.dumps(man))


def make_v1_stats(root: Path, shards: int, per_shard: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(shards):
        stem = f"old-{i:06d}"
        index = []
        off = 0
        for j in range(per_shard):
            members = {}
            for ext in ("txt", "json", "tokens_256.npy", "tokens_512.npy", "text.npy", "jpg", "extra.json"):
                members[ext] = [off + 512, 300]
                off += 1024
            index.append({"key": f"{i:06d}{j:014d}", "members": members,
                          "buckets": {"256": [16, 16], "512": [32, 32], "1024": [64, 64]}})
        stats = {"shard": stem, "samples": per_shard, "rejects": {}, "bytes": off, "index": index,
                 "schema_version": 1}
        (root / f"{stem}.stats.json").write_text(json.dumps(stats))
        entries.append({"tar": f"{stem}.tar", "stats": f"{stem}.stats.json", "samples": per_shard})
    man = {"shards": entries, "resolutions": [256, 512, 1024], "buckets": {}, "samples": shards * per_shard,
           "config_hash": "bench", "versions": {}, "text_features": True, "schema_version": 1}
    (root / "manifest.json").write_text(json.dumps(man))


def _old_module(name: str, path: str, replace: dict[str, str] | None = None):
    """``path`` of this repository at OLD_READER_COMMIT as module ``name`` (its own history, not a download)."""
    import types

    src = subprocess.run(["git", "-C", str(REPO), "show", f"{OLD_READER_COMMIT}:{path}"],
                         capture_output=True, text=True, check=True).stdout
    for a, b in (replace or {}).items():
        if a not in src:
            raise RuntimeError(f"{path}@{OLD_READER_COMMIT}: expected {a!r}")
        src = src.replace(a, b)
    mod = types.ModuleType(name)
    mod.__file__ = f"{name}@{OLD_READER_COMMIT}"
    sys.modules[name] = mod  # dataclasses look their module up
    exec(compile(src, mod.__file__, "exec"), mod.__dict__)  # noqa: S102 - this repository's own history
    return mod


def old_schema():
    """The schema helpers of the per-sample format (v1: a JSON index per sample in stats.json)."""
    return sys.modules.get("old_schema") or _old_module("old_schema", "sar_scale/data/schema.py")


def load_old_loader():
    """The previous reader's module, from git, with the v1 schema helpers it was written against."""
    old_schema()
    return _old_module("old_loader", "sar_scale/data/loader.py",
                       {"from sar_scale.data import schema\n": "import old_schema as schema\n"})


def child_scale(kind: str, url: str, world: int) -> dict:
    import numpy as np  # noqa: F401 - imported before the baseline like the reader's own deps

    from sar_scale.data import loader  # noqa: F401

    base = rss_mb()
    t0 = time.perf_counter()
    if kind == "new":
        from sar_scale.data.loader import StageStream, _rank_windows

        s = StageStream(url, 256, rank=0, world=world, seed=0, stage=0, cond="text_features", micro_batch=64,
                        window=4)
        plan = s.plan(0)
        wins = _rank_windows(plan, [s.rank])
        first = wins[0]
        lane = plan.buckets[first.bucket].lanes[first.slot]
        for i in lane.window_pieces(first.w):
            s.reader.index(lane.pieces[i].shard)
        out = {"global_batches": len(plan), "windows_this_rank": len(wins), "index_files_read": s.reader.requests}
    else:
        old = load_old_loader()
        table = old.ShardIndex(url).table(256)
        out = {"samples": len(table)}
    out.update(startup_s=round(time.perf_counter() - t0, 3), rss_growth_mb=round(rss_mb() - base, 1))
    return out


def run_child(*args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, env=env)
    if p.returncode:
        return {"error": p.stderr[-1500:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def part_scale(a, tmp: Path) -> dict:
    make_v2_manifest(tmp / "v2", a.shards, a.per_shard)
    new = run_child("scale", "new", str(tmp / "v2"), str(a.world))
    old_shards = max(1, a.old_samples // 10_000)
    make_v1_stats(tmp / "v1", old_shards, a.old_samples // old_shards)
    old = run_child("scale", "old", str(tmp / "v1"), "1")
    out = {"samples": a.shards * a.per_shard, "shards": a.shards, "world": a.world, "new": new,
           "old_at": a.old_samples, "old": old}
    if "rss_growth_mb" in old:
        per = old["rss_growth_mb"] * 1024 / a.old_samples
        out["old_per_sample_kb"] = round(per, 3)
        out["old_projected_at_new_scale"] = {
            "rss_gb": round(per * a.shards * a.per_shard / 1024 / 1024, 1),
            "startup_s": round(old["startup_s"] / a.old_samples * a.shards * a.per_shard, 0)}
    return out


# ----------------------------------------------------------------------------- throughput


def _moto(tmp: Path):
    from tests.conftest import S3Server

    srv = S3Server(tmp)
    for k, v in srv.env().items():
        os.environ[k] = v
    return srv


def write_900m_shape(url: str, endpoint: str, shards: int, per_shard: int, v1: bool, text: bool = True) -> None:
    """Samples of the 900M run's shape: 16x16 int32 tokens + a 120 x 2048 fp16 text feature (``text``)."""
    import io

    import numpy as np
    import webdataset as wds

    from sar_scale.data import schema
    from sar_scale.data.shards import commit_shard
    from sar_scale.data.storage import S3Storage

    st = S3Storage(url, endpoint_url=endpoint)
    rng = np.random.default_rng(0)
    entries = []
    for i in range(shards):
        samples = sorted((schema.make_sample(f"b/{i}/{j}", f"caption {j}",
                                             {256: rng.integers(0, 16384, (16, 16)).astype(np.int32)}, (256, 256),
                                             text_features=(rng.standard_normal((120, 2048)).astype(np.float16)
                                                            if text else None),
                                             extra={"class_id": j % 10}) for j in range(per_shard)),
                         key=lambda s: s["__key__"])
        if v1:
            v1s = old_schema()
            buf = io.BytesIO()
            with wds.TarWriter(buf) as tw:
                for s in samples:
                    tw.write(s)
            data = buf.getvalue()
            st.put_bytes(data, v1s.tar_name("old", i))
            index = v1s.build_index(io.BytesIO(data))
            v1s.write_stats(st, "old", i, v1s.make_stats("old", i, per_shard, {}, len(data), index))
            entries.append({"tar": v1s.tar_name("old", i), "stats": v1s.stats_name("old", i),
                            "samples": per_shard})
        else:
            entries.append(schema.shard_entry(commit_shard(st, "b", i, samples, {256: (16, 16)})))
    if v1:
        v1s = old_schema()
        v1s.write_manifest(st, v1s.make_manifest(entries, [256], {"256": {"16x16": shards * per_shard}},
                                                 "b", {}, True))
    else:
        schema.write_dataset_manifest(st, schema.make_dataset_manifest(entries, [256], True, "b", {}, []))


def read_epoch(a, url: str, cond: str, storage, workers: int | None = None) -> tuple[int, float]:
    """One epoch of rank 0 of 1 through the training reader: (samples, seconds incl. start-up)."""
    from sar_scale.data.loader import StageStream

    t0 = time.perf_counter()
    s = StageStream(url, 256, 0, 1, seed=0, stage=0, cond=cond, micro_batch=8,
                    num_workers=a.workers if workers is None else workers,
                    window=a.window, prefetch_shards=a.prefetch, storage=storage)
    it = iter(s)
    got = 0
    for _ in range(s.steps_per_epoch):
        got += len(next(it)["keys"])
    dt = time.perf_counter() - t0
    it.close()
    return got, dt


def part_throughput(a, tmp: Path) -> dict:
    from sar_scale.data.storage import S3Storage
    from sar_scale.testing.s3_fault_proxy import FaultConfig, S3FaultProxy

    srv = _moto(tmp)
    try:
        srv.make_bucket("bench")
        text = not a.tokens_only
        cond = "text_features" if text else "class"
        write_900m_shape("s3://bench/v2", srv.endpoint, a.tp_shards, a.tp_per_shard, v1=False, text=text)
        write_900m_shape("s3://bench/v1", srv.endpoint, 1, a.old_read, v1=True, text=text)
        proxy = S3FaultProxy(srv.endpoint, FaultConfig(slow=1.0, slow_s=0.02)).start()
        os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint  # readers open their own clients
        try:
            n = a.tp_shards * a.tp_per_shard
            st = S3Storage("s3://bench/v2", endpoint_url=proxy.endpoint)
            got, dt = read_epoch(a, "s3://bench/v2", cond, st)
            # requests of exactly one epoch: fetching in the consumer (0 workers), nothing reads ahead
            # into the next epoch once its last batch is taken (the timed run above does)
            proxy.reset_counts()
            read_epoch(a, "s3://bench/v2", cond, st, workers=0)
            new_req = proxy.counts["requests"]
            # the reader's own ceiling (tar parsing, npy decoding, batching) without the network: the same
            # shards in a local directory (page cache)
            local = tmp / "local_v2"
            local.mkdir()
            for k in st.list():
                st.get_file(k, local / k)
            got_local, dt_local = read_epoch(a, str(local), cond, None)
            # the ceiling of this loopback S3 + proxy: the same shards GET whole, 4 at a time, no decoding
            import concurrent.futures as cf

            tars = [k for k in st.list() if k.endswith(".tar")]
            t0 = time.perf_counter()
            with cf.ThreadPoolExecutor(a.workers) as pool:
                nbytes = sum(len(b) for b in pool.map(st.get_bytes, tars))
            raw_dt = time.perf_counter() - t0
            new = {"samples": got, "seconds": round(dt, 2), "samples_per_s": round(got / dt, 1),
                   "requests_per_epoch": new_req, "shards": a.tp_shards,
                   "requests_bound_1.1x_shards_plus_index": round(1.1 * a.tp_shards + a.tp_shards + 1, 1),
                   "raw_whole_shard_get_samples_per_s": round(n / raw_dt, 1),
                   "raw_get_mb_per_s": round(nbytes / raw_dt / 1e6, 1),
                   "share_of_raw_get_rate": round(got / dt / (n / raw_dt), 2),
                   "local_dir_samples_per_s": round(got_local / dt_local, 1)}
            # the previous reader: one ranged GET per sample, on the same proxy, in the same run
            old = load_old_loader()
            proxy.reset_counts()
            t0 = time.perf_counter()
            index = old.ShardIndex("s3://bench/v1")
            table = index.table(256)
            sched = old.build_schedule(table.grid, 1, 0, 0, 0, micro_batch=8)
            reader = old.BatchReader("s3://bench/v1", table, sched, 0, 1, cond)
            m = 0
            t1 = time.perf_counter()
            for i in range(len(reader)):
                m += len(reader[i]["keys"])
            dt_old = time.perf_counter() - t1
            old_res = {"samples": m, "seconds": round(dt_old, 2), "samples_per_s": round(m / dt_old, 1),
                       "requests_per_sample": round((proxy.counts["requests"] - 2) / m, 2),
                       "startup_s": round(t1 - t0, 2)}
        finally:
            proxy.stop()
    finally:
        srv.stop()
    return {"latency_s": 0.02, "sample_bytes": 16 * 16 * 4 + (120 * 2048 * 2 if text else 0), "new": new, "old": old_res,
            "ratio_new_over_old": round(new["samples_per_s"] / old_res["samples_per_s"], 1),
            "over_plan_stage1_per_gpu": round(new["samples_per_s"] / PLAN_STAGE1_SAMPLES_PER_GPU, 2)}


# ----------------------------------------------------------------------------- training


def part_train(a, tmp: Path) -> dict:
    import yaml

    from sar_scale.data.storage import S3Storage  # noqa: F401
    from sar_scale.testing.s3_fault_proxy import FaultConfig, S3FaultProxy
    from sar_scale.training.debug_data import write_debug_shards
    from sar_scale.utils.net import free_port

    srv = _moto(tmp)
    try:
        srv.make_bucket("train")
        write_debug_shards("s3://train/shards", num_samples=a.train_samples, resolutions=(64,), samples_per_shard=32,
                           vocab_size=1024, text_dim=128, seed=0)
        proxy = S3FaultProxy(srv.endpoint, FaultConfig(slow=1.0, slow_s=0.02)).start()
        try:
            cfg = {"run_dir": str(tmp / "run"), "seed": 0, "device": "cpu",
                   "model": {"name": "demo", "overrides": {"width": 96, "enc_layers": 2, "dec_layers": 2,
                                                           "heads": 4}},
                   "data": {"url": "s3://train/shards", "cond": "text_features", "num_workers": 4, "window": 2,
                            "prefetch_shards": 4},
                   "plan": {"orders": {"random": 1.0}, "num_sets": [16], "intervals": {"cosine": 1.0}},
                   "deepspeed": {"zero_stage": 1, "precision": "fp32", "timeout_s": 300},
                   "curriculum": {"stages": [{"name": "s64", "resolution": 64, "steps": a.train_steps,
                                              "tokens_per_batch": 512}]},
                   "checkpoint": {"every_steps": 0}, "mlflow": {"enabled": False}}
            path = tmp / "train.yaml"
            path.write_text(yaml.safe_dump(cfg))
            port = free_port()
            procs = []
            for r in range(2):
                env = dict(os.environ, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), LOCAL_WORLD_SIZE="2",
                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                           PYTHONPATH=str(REPO), AWS_ENDPOINT_URL=proxy.endpoint, MLFLOW_DISABLE_TELEMETRY="true")
                procs.append(subprocess.Popen([sys.executable, "-m", "sar_scale.cli", "train", str(path),
                                               "--resume", "none"], env=env, cwd=REPO,
                                              stdout=subprocess.DEVNULL, stderr=open(tmp / f"r{r}.log", "wb")))  # noqa: SIM115
            codes = [p.wait(1800) for p in procs]
            if codes != [0, 0]:
                return {"error": f"exit codes {codes}", "log": (tmp / "r0.log").read_text()[-2000:]}
        finally:
            proxy.stop()
    finally:
        srv.stop()
    recs = [json.loads(x) for x in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in recs if r["step"] >= 3]
    wait = sum(r["data_wait_s"] for r in steady)
    step = sum(r["step_time_s"] for r in steady)
    return {"model": "demo (width 96, 2+2 layers)", "ranks": 2, "steps": len(recs), "latency_s": 0.02,
            "data_wait_share_steps_3_plus": round(wait / step, 4), "mean_step_s": round(step / len(steady), 3),
            "first_step_data_wait_s": round(recs[0]["data_wait_s"], 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=["scale", "throughput", "train", "all"], default="all")
    p.add_argument("--shards", type=int, default=2000)
    p.add_argument("--per-shard", type=int, default=10_000)
    p.add_argument("--world", type=int, default=32, help="ranks of the scale plan (this process is rank 0)")
    p.add_argument("--old-samples", type=int, default=100_000)
    p.add_argument("--tp-shards", type=int, default=4)
    p.add_argument("--tp-per-shard", type=int, default=64)
    p.add_argument("--old-read", type=int, default=48, help="samples the per-sample reader reads")
    p.add_argument("--tokens-only", action="store_true", help="throughput: samples without text features "
                   "(the request-latency-bound regime instead of the bandwidth-bound one)")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--window", type=int, default=2)
    p.add_argument("--prefetch", type=int, default=4)
    p.add_argument("--train-samples", type=int, default=256)
    p.add_argument("--train-steps", type=int, default=12)
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child_scale(a.child[1], a.child[2], int(a.child[3]))))
        return 0
    out: dict = {"bench": "loader"}
    tmp = Path(tempfile.mkdtemp(prefix="bench-loader-"))
    try:
        for part, fn in (("scale", part_scale), ("throughput", part_throughput), ("train", part_train)):
            if a.part in (part, "all"):
                d = tmp / part
                d.mkdir()
                out[part] = fn(a, d)
                print(json.dumps({part: out[part]}), file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
