"""`sar-scale data prepare`: image-text inputs -> validated, deduplicated, tokenized webdataset shards.

Two passes on Ray:

1. **scan** (Ray tasks): read + validate every input (decode, caption, size filters) and hash it.
   Only small rows come back. The driver then deduplicates (exact by pixel hash, near by pHash)
   in sorted source-id order - the first occurrence wins, so the result never depends on task
   timing - and assigns the accepted samples to shards in ``sample_key`` order (a deterministic
   shuffle): shard ``i`` = samples ``[i*S, (i+1)*S)``.
2. **shards** (Ray Data): decode + bucket + resize (fractional-CPU tasks) -> tokenize in an
   ``ActorPoolStrategy`` pool (VQ loaded once per actor) -> the driver writes each shard once all
   its rows are in: tar via webdataset's TarWriter, atomic upload, then ``stats.json`` last.

Exactly once: names and contents are a function of (inputs, config); a rerun skips shards whose
stats exist and match (config hash + plan hash), deletes stale uncommitted tars, redoes the rest.
Ray Data's own writers are not used because they name files with uuids (rerun = duplicates).
The writer runs in the driver because tokens are small (a few KB per sample) and Ray Data cannot
align its blocks with our deterministic shards.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipelines.config import PrepareConfig
from pipelines.inputs import enumerate_inputs
from pipelines.validate import NearDupIndex
from pipelines.writer import plan_hash, write_shard
from sar_scale.config import ConfigError, load_config
from sar_scale.data import schema
from sar_scale.data.buckets import bucket_name, bucket_table
from sar_scale.data.storage import Storage, StorageError, open_storage

logger = logging.getLogger(__name__)

# Fault-injection hook for the crash test: sleep this long after each shard commit.
COMMIT_DELAY_ENV = "SAR_SCALE_FAULT_COMMIT_DELAY_S"


# ----------------------------------------------------------------------------- helpers


def _file_fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()[:16]


def resolve_vq(cfg: PrepareConfig) -> tuple[int, str]:
    """(downsample, weights fingerprint) of the configured VQ, with clear errors."""
    from sar_scale.tokenizers import vq as vqmod

    if not cfg.tokenize.vq_path:
        raise ConfigError("tokenize.vq_path is required: a VQ directory (config.json + model.safetensors) "
                          "or a LlamaGen .pt (train one with `sar-scale tokenizer train`)")
    p = Path(cfg.tokenize.vq_path)
    if not p.exists():
        raise ConfigError(f"tokenize.vq_path: not found: {p}")
    if p.is_dir() and (p / vqmod.CONFIG_NAME).exists():
        data = json.loads((p / vqmod.CONFIG_NAME).read_text())
        downsample = vqmod.vq_config(data.get("config", data)).downsample
    else:
        try:
            downsample = vqmod.load_vq(p).downsample
        except (OSError, ValueError) as e:
            raise ConfigError(f"tokenize.vq_path: cannot load a VQ from {p}: {e}") from None
    for r in cfg.tokenize.resolutions:
        if r % downsample:
            raise ConfigError(f"tokenize.resolutions: {r} is not a multiple of the VQ downsample {downsample}")
    return downsample, _file_fingerprint(p)


def versions() -> dict[str, str]:
    import PIL
    import ray
    import torch
    import webdataset

    import sar_scale

    return {"sar_scale": sar_scale.__version__, "torch": torch.__version__, "ray": ray.__version__,
            "webdataset": webdataset.__version__, "pillow": PIL.__version__}


def init_ray(cfg: PrepareConfig):
    import ray

    if ray.is_initialized():
        return ray
    if cfg.ray.address:
        import pipelines
        import sar_scale

        # ship our code to a remote cluster (its workers may not have this checkout)
        env = {"py_modules": [str(Path(sar_scale.__file__).parent), str(Path(pipelines.__file__).parent)]}
        ray.init(address=cfg.ray.address, runtime_env=env, log_to_driver=False)
    else:
        # address="local": never silently join some other cluster found on this machine
        ray.init(address="local", num_cpus=cfg.ray.num_cpus or os.cpu_count(), include_dashboard=False,
                 log_to_driver=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = cfg.ray.progress_bars
    return ray


def _check_cpu_budget(ray, cfg: PrepareConfig) -> None:
    total = float(ray.cluster_resources().get("CPU", 0))
    need = cfg.ray.tokenize_actors * cfg.ray.actor_num_cpus + cfg.ray.load_num_cpus
    if need > total + 1e-9:
        raise ConfigError(f"ray.tokenize_actors ({cfg.ray.tokenize_actors}) x ray.actor_num_cpus "
                          f"({cfg.ray.actor_num_cpus}) + ray.load_num_cpus ({cfg.ray.load_num_cpus}) = {need} "
                          f"CPUs, but the cluster has {total}: the load stage could never run (deadlock)")


# ----------------------------------------------------------------------------- scan + plan


def scan(ray, cfg: PrepareConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    from pipelines.stages import scan_unit

    units, rejects = enumerate_inputs(cfg.input)
    task = ray.remote(scan_unit).options(num_cpus=cfg.ray.scan_num_cpus)
    cj = cfg.model_dump_json()
    pending = [task.remote(u, cj) for u in units]
    rows: list[dict[str, Any]] = []
    with tqdm(total=len(pending), desc="scan", unit="unit") as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            res = ray.get(done[0])
            rows += res["rows"]
            rejects += res["rejects"]
            bar.update(1)
            bar.set_postfix(ok=len(rows), rejected=len(rejects))
    return rows, rejects, len(rows) + len(rejects)


def plan_shards(rows: list[dict[str, Any]], cfg: PrepareConfig) -> tuple[list[list[dict[str, Any]]],
                                                                          list[dict[str, Any]]]:
    """Deduplicate deterministically, then chunk the survivors into shards by sample key."""
    rejects = []
    seen_ids: set[str] = set()
    exact: dict[str, str] = {}
    near = NearDupIndex(cfg.filters.phash_max_distance) if cfg.filters.near_dedup else None
    kept = []
    for r in sorted(rows, key=lambda r: r["source_id"]):
        sid = r["source_id"]
        if sid in seen_ids:
            rejects.append({"source_id": sid, "reason": "duplicate_source_id"})
            continue
        seen_ids.add(sid)
        if cfg.filters.exact_dedup:
            if r["pixhash"] in exact:
                rejects.append({"source_id": sid, "reason": "duplicate", "detail": f"of {exact[r['pixhash']]}"})
                continue
            exact[r["pixhash"]] = sid
        if near is not None:
            other = near.query(r["phash"])
            if other is not None:
                rejects.append({"source_id": sid, "reason": "near_duplicate", "detail": f"of {other}"})
                continue
            near.add(r["phash"], sid)
        kept.append(r)
    kept.sort(key=lambda r: (schema.sample_key(r["source_id"]), r["source_id"]))
    n = cfg.output.samples_per_shard
    return [kept[i: i + n] for i in range(0, len(kept), n)], rejects


# ----------------------------------------------------------------------------- resume state


def reconcile(storage: Storage, cfg: PrepareConfig, config_hash: str,
              plan_hashes: list[str]) -> tuple[set[int], dict[int, dict[str, Any]]]:
    """Find committed shards that match this plan; delete stale/partial objects. Returns
    (indices to (re)do, stats of the kept committed shards)."""
    name = cfg.output.name
    removed_tmp = storage.clean_temp()
    if removed_tmp:
        logger.info("removed %d temp objects left by an interrupted run", removed_tmp)
    keys = set(storage.list())
    committed: dict[int, dict[str, Any]] = {}
    foreign: list[str] = []
    for tar_key, stats_key in schema.committed_shards(storage, name):
        _, idx, _ = schema.parse_shard_name(tar_key)
        try:
            st = schema.read_stats(storage, stats_key)
        except schema.SchemaError as e:
            logger.warning("unreadable %s (%s): shard will be redone", stats_key, e)
            storage.delete(stats_key)
            continue
        ok = (st.get("config_hash") == config_hash and idx < len(plan_hashes)
              and st.get("plan_hash") == plan_hashes[idx])
        if ok:
            committed[idx] = st
        else:
            foreign.append(stats_key)
    if foreign and not cfg.output.overwrite:
        raise ConfigError(
            f"{storage.url()} already holds {len(foreign)} committed shard(s) from a different config or "
            f"different inputs (e.g. {foreign[0]}); write to a new output.url or set output.overwrite=true")
    for stats_key in foreign:  # overwrite: stats first, so a crash here leaves nothing committed
        storage.delete(stats_key)
        storage.delete(stats_key[: -len(".stats.json")] + ".tar")
    # uncommitted tars (crash between tar and stats, or outside the plan) are never left behind
    stale = 0
    for k in keys:
        parsed = schema.parse_shard_name(k)
        if parsed and parsed[0] == name and parsed[2] == "tar" and parsed[1] not in committed:
            storage.delete(k)
            stale += 1
        elif parsed and parsed[0] == name and parsed[2] == "stats.json" and parsed[1] >= len(plan_hashes):
            storage.delete(k)
    if stale:
        logger.info("deleted %d uncommitted shard tar(s)", stale)
    todo = {i for i in range(len(plan_hashes)) if i not in committed}
    for i in todo:  # a stats without its tar must not pair with the tar we are about to write
        if schema.stats_name(name, i) in keys:
            storage.delete(schema.stats_name(name, i))
    return todo, committed


# ----------------------------------------------------------------------------- shard pass


def shard_pass(ray, cfg: PrepareConfig, storage: Storage, shards: list[list[dict[str, Any]]], todo: set[int],
               downsample: int, extra_stats: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    from ray.data import ActorPoolStrategy

    from pipelines.stages import TokenizeActor, load_batch

    items = [{"shard": i, "pos": j, "source_id": r["source_id"], "ref": json.dumps(r["img"]),
              "caption": r["caption"], "extra": json.dumps(r["extra"]) if r.get("extra") else ""}
             for i in sorted(todo) for j, r in enumerate(shards[i])]
    written: dict[int, dict[str, Any]] = {}
    if not items:
        return written
    bs = cfg.tokenize.batch_size
    cj = cfg.model_dump_json()
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // bs, 512)))
    ds = ds.map_batches(load_batch, fn_kwargs={"cfg_json": cj, "downsample": downsample}, batch_size=bs,
                        batch_format="numpy", num_cpus=cfg.ray.load_num_cpus)
    ds = ds.map_batches(TokenizeActor, fn_constructor_kwargs={"cfg_json": cj}, batch_size=bs,
                        batch_format="numpy", compute=ActorPoolStrategy(size=cfg.ray.tokenize_actors),
                        num_cpus=cfg.ray.actor_num_cpus)
    expected = {i: len(shards[i]) for i in todo}
    pending: dict[int, list[dict[str, Any]]] = defaultdict(list)
    delay = float(os.environ.get(COMMIT_DELAY_ENV, "0") or 0)
    res = cfg.tokenize.resolutions
    with tempfile.TemporaryDirectory(prefix="sar-shards-") as tmp, \
            tqdm(total=len(items), desc="tokenize+write", unit="img") as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            keys = list(batch)
            for j in range(len(batch["shard"])):
                row = {k: batch[k][j] for k in keys}
                i = int(row["shard"])
                pending[i].append(row)
                if len(pending[i]) == expected[i]:
                    written[i] = write_shard(storage, cfg.output.name, i, pending.pop(i), res, tmp,
                                             extra_stats[i])
                    bar.set_postfix(shards=f"{len(written)}/{len(todo)}")
                    if delay:
                        time.sleep(delay)
            bar.update(len(batch["shard"]))
    missing = set(todo) - set(written)
    if missing:  # Ray Data returned fewer rows than planned: a bug, never silently accepted
        raise RuntimeError(f"shards {sorted(missing)[:5]} did not receive all their rows")
    return written


# ----------------------------------------------------------------------------- driver


def run(cfg: PrepareConfig) -> dict[str, Any]:
    """Run the whole job; returns the summary (also printed by :func:`main`).

    Uses the Ray already initialised in this process if any, else starts one (left running for
    the caller to ``ray.shutdown()``; :func:`main` does).
    """
    t0 = time.time()
    src = cfg.input.path
    if not src.startswith("s3://") and "{" not in src and not Path(src).expanduser().exists():
        raise ConfigError(f"input.path: not found: {src}")  # before paying for a Ray start
    downsample, vq_fp = resolve_vq(cfg)
    text_fp = _file_fingerprint(Path(cfg.tokenize.text_encoder_path)) if cfg.tokenize.text_encoder_path else ""
    config_hash = hashlib.sha256(f"{cfg.content_hash()}|{vq_fp}|{text_fp}".encode()).hexdigest()[:16]
    storage = open_storage(cfg.output.url)
    ray = init_ray(cfg)
    _check_cpu_budget(ray, cfg)

    rows, rejects, n_inputs = scan(ray, cfg)
    shards, dup_rejects = plan_shards(rows, cfg)
    rejects += dup_rejects
    hashes = [plan_hash([r["source_id"] for r in s]) for s in shards]
    todo, committed = reconcile(storage, cfg, config_hash, hashes)
    logger.info("%d inputs -> %d accepted in %d shards (%d already committed, %d to write)",
                n_inputs, sum(len(s) for s in shards), len(shards), len(committed), len(todo))
    extra = {i: {"config_hash": config_hash, "plan_hash": hashes[i]} for i in todo}
    t1 = time.time()
    written = shard_pass(ray, cfg, storage, shards, todo, downsample, extra)
    t_shards = time.time() - t1
    all_stats = {**committed, **written}

    # manifest + rejects, from the committed stats (so a resumed run reports the whole job)
    table = bucket_table(cfg.tokenize.resolutions, downsample, cfg.tokenize.max_ratio)
    bucket_counts: dict[str, Counter] = {str(r): Counter() for r in table}
    entries = []
    for i in range(len(shards)):
        st = all_stats[i]
        for e in st["index"]:
            for r, hw in e["buckets"].items():
                bucket_counts[r][bucket_name(tuple(hw))] += 1
        entries.append({"tar": schema.tar_name(cfg.output.name, i),
                        "stats": schema.stats_name(cfg.output.name, i), "samples": st["samples"]})
        rejects += st.get("reject_ids", [])
    reject_counts = Counter(r["reason"] for r in rejects)
    man = schema.make_manifest(
        entries, cfg.tokenize.resolutions, {r: dict(sorted(c.items())) for r, c in bucket_counts.items()},
        config_hash, {**versions(), "vq": vq_fp, "text_encoder": text_fp}, bool(cfg.tokenize.text_encoder_path),
        extra={"name": cfg.output.name, "downsample": downsample, "inputs": n_inputs,
               "rejects": dict(sorted(reject_counts.items())),
               "config": json.loads(cfg.model_dump_json(exclude={"ray"}))})
    schema.write_rejects(storage, rejects)
    if cfg.input.kind == "imagefolder":  # class id -> name for samplers, evaluators and `generate --class-id`
        from pipelines.inputs import class_index

        classes = class_index(cfg.input)
        storage.put_bytes(json.dumps({"num_classes": max(classes.values()) + 1, "classes": classes},
                                     indent=1).encode(), "classes.json")
    schema.write_manifest(storage, man)
    n_written = sum(s["samples"] for s in written.values())
    return {"output": storage.url(), "inputs": n_inputs, "samples": man["samples"],
            "rejects": dict(sorted(reject_counts.items())), "shards": len(shards),
            "shards_written": len(written), "shards_skipped": len(committed),
            "buckets": man["buckets"], "seconds": round(time.time() - t0, 2),
            "tokenize_images_per_s": round(n_written / t_shards, 2) if n_written and t_shards > 0 else 0.0,
            "config_hash": config_hash}


def format_summary(s: dict[str, Any]) -> str:
    lines = [f"data prepare -> {s['output']}",
             f"  inputs           {s['inputs']}",
             f"  samples written  {s['samples']}",
             f"  shards           {s['shards']} ({s['shards_written']} written now, "
             f"{s['shards_skipped']} already committed)",
             f"  time             {s['seconds']} s ({s['tokenize_images_per_s']} img/s tokenize+write)"]
    lines.append(f"  rejects          {sum(s['rejects'].values())}")
    lines += [f"    {k:<22} {v}" for k, v in s["rejects"].items()]
    for r, counts in s["buckets"].items():
        lines.append(f"  buckets @{r}px     " + ", ".join(f"{k}: {v}" for k, v in counts.items()))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="sar-scale data prepare",
        description="Validate, filter, deduplicate, bucket and VQ-tokenize image-text data into "
                    "webdataset shards (local dir or s3://) on Ray. Safe to rerun: committed shards are "
                    "skipped, interrupted ones redone, the result is the same as one clean run.",
        epilog="example: sar-scale data prepare configs/data/shapes_demo.yaml input.path=data/shapes "
               "tokenize.vq_path=runs/vq output.url=s3://bucket/shards")
    p.add_argument("config", help="YAML config (see configs/data/)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. output.samples_per_shard=500")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster instead of starting a local one: auto, HOST:6379 or ray://HOST:10001")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides = list(a.overrides) + ([f"ray.address={a.ray_address}"] if a.ray_address else [])
    try:
        cfg = load_config(PrepareConfig, a.config, overrides)
        summary = run(cfg)
    except (ConfigError, ValueError) as e:
        print(f"sar-scale data prepare: {e}", file=sys.stderr)
        return 2
    except StorageError as e:  # object store down or refusing us after the retry budget: say so, no traceback
        print(f"sar-scale data prepare: storage failed: {e}", file=sys.stderr)
        return 1
    finally:
        if "ray" in sys.modules:
            import ray

            if ray.is_initialized():
                ray.shutdown()
    print(format_summary(summary))
    return 0
