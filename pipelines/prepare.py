"""`sar-scale data prepare`: image-text inputs -> validated, deduplicated, tokenized webdataset shards
(format v2, docs/shard-format.md), on a Ray cluster, with O(shards) state in the driver.

Stages (details in pipelines/dedup.py and pipelines/staging.py):

1. **scan** (Ray tasks, one per input unit, bounded in flight): inputs are enumerated lazily (folders
   and tar prefixes page by page, manifests by Parquet row group / JSONL byte range); each task reads,
   validates and hashes its records and stages the small rows under ``_staging/`` by key range.
2. **dedup** (Ray tasks per partition): same source id, exact pixels (by hash partition), near pHash
   (LSH bands, then label-propagation rounds per key range); winners depend on source ids only. In append runs the
   dataset's ``hashes.npy`` rows take part as incumbents that always win.
3. **assign** (per key range): survivors grouped by aspect bucket, sorted by key; the driver turns
   per-bucket counts into shards (``samples_per_shard`` each, one bucket per shard).
4. **write** (``TokenizeActor`` pool): each shard is read + decoded + tokenized + committed by one actor
   through ``sar_scale.data.shards.commit_shard`` (tar, index.npy, hashes.npy, stats.json last).
5. the rejects file (one task) and the manifest (driver, from per-shard stats), written last.

Exactly once: shard names and bytes are a function of (inputs, config); a rerun re-plans, keeps shards
whose stats match (config hash + plan hash), rewrites the rest, deletes what is outside the plan.
Append runs (``output.mode=append``) add shards after the manifest's, never touch committed ones, and
are a no-op when the manifest already lists the run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipelines import dedup
from pipelines.config import PrepareConfig
from pipelines.inputs import iter_units
from pipelines.stages import COMMIT_DELAY_ENV, TokenizeActor, base_hashes_task, scan_unit_task
from pipelines.staging import Staging
from sar_scale.config import ConfigError, load_config
from sar_scale.data import schema
from sar_scale.data.shards import uncommit_shard
from sar_scale.data.storage import Storage, StorageError, StorageNotFound, open_storage

logger = logging.getLogger(__name__)

__all__ = ["COMMIT_DELAY_ENV", "run", "main"]


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
    res = ray.cluster_resources()
    total, gpus = float(res.get("CPU", 0)), float(res.get("GPU", 0))
    need = cfg.ray.tokenize_actors * cfg.ray.actor_num_cpus
    if need > total + 1e-9:
        raise ConfigError(f"ray.tokenize_actors ({cfg.ray.tokenize_actors}) x ray.actor_num_cpus "
                          f"({cfg.ray.actor_num_cpus}) = {need} CPUs, but the cluster has {total}: the writer "
                          "actors could never all start (deadlock)")
    if cfg.ray.actor_num_gpus and cfg.ray.tokenize_actors * cfg.ray.actor_num_gpus > gpus + 1e-9:
        raise ConfigError(f"ray.tokenize_actors x ray.actor_num_gpus = "
                          f"{cfg.ray.tokenize_actors * cfg.ray.actor_num_gpus} GPUs, but the cluster has {gpus}")


def _dataset_hash(cfg: PrepareConfig, vq_fp: str, text_fp: str) -> str:
    """What every shard of one dataset must share (append runs check it): name, tokenization, VQ, text encoder."""
    t = cfg.tokenize
    data = {"name": cfg.output.name, "resolutions": t.resolutions, "max_ratio": t.max_ratio, "dtype": t.dtype,
            "text_max_length": t.text_max_length, "thumbnail": cfg.output.thumbnail_size, "vq": vq_fp,
            "text": text_fp}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _open_output(cfg: PrepareConfig) -> Storage:
    if cfg.output.url.startswith("s3://"):
        mb = cfg.output.s3_multipart_mb << 20
        return open_storage(cfg.output.url, multipart_threshold=mb, multipart_chunksize=mb)
    return open_storage(cfg.output.url)


def _existing_manifest(storage: Storage, cfg: PrepareConfig) -> dict[str, Any] | None:
    try:
        return schema.read_dataset_manifest(storage)
    except StorageNotFound:
        return None
    except schema.SchemaError as e:
        if cfg.output.overwrite and cfg.output.mode == "create":
            return None
        raise ConfigError(f"{storage.url()}: {e}; or write to a new output.url / set output.overwrite=true") from None


def _check_committed(storage: Storage, cfg: PrepareConfig, first: int, config_hash: str) -> None:
    """Refuse (create mode, no overwrite) to mix with committed shards of another config at index >= first."""
    if cfg.output.overwrite or cfg.output.mode == "append":
        return  # overwrite: replaced by the writers / deleted; append: shards outside the manifest are leftovers
    for k in storage.iter_list(cfg.output.name + "-"):
        parsed = schema.parse_shard_name(k)
        if not parsed or parsed[0] != cfg.output.name or parsed[2] != "stats.json" or parsed[1] < first:
            continue
        try:
            ok = schema.read_shard_stats(storage, k).get("config_hash") == config_hash
        except schema.SchemaError:
            ok = False
        if not ok:
            raise ConfigError(
                f"{storage.url()} already holds committed shard(s) from a different config or different inputs "
                f"(e.g. {k}); write to a new output.url, set output.overwrite=true, or use output.mode=append")


# ----------------------------------------------------------------------------- stages


def _scan(ray, cfg: PrepareConfig, stg: Staging, downsample: int) -> tuple[int, int]:
    """Submit one scan task per unit as the units are enumerated, at most ``max_inflight`` at once.
    Returns (inputs, units); per-unit rows and rejects stay in staging."""
    task = ray.remote(scan_unit_task).options(num_cpus=cfg.ray.scan_num_cpus)
    cj = cfg.model_dump_json()
    limit = cfg.ray.max_inflight or max(2, int(2 * ray.cluster_resources().get("CPU", 1)))
    pending: list[Any] = []
    n_inputs = n_units = 0
    with tqdm(desc="scan", unit="unit") as bar:
        def collect(n: int) -> None:
            nonlocal pending, n_inputs
            done, pending = ray.wait(pending, num_returns=n)
            for res in _get(ray, done):
                n_inputs += res["rows"] + sum(res["rejects"].values())
                bar.update(1)
            bar.set_postfix(inputs=n_inputs)

        for u, unit in enumerate(iter_units(cfg.input)):
            if len(pending) >= limit:
                collect(1)
            pending.append(task.remote(u, unit, cj, downsample, stg))
            n_units += 1
        if pending:
            collect(len(pending))
    return n_inputs, n_units


def _get(ray, refs: list[Any]) -> list[Any]:
    """``ray.get`` that re-raises a task's ValueError / StorageError as itself (a clear CLI message, not
    a remote traceback)."""
    from ray.exceptions import RayTaskError

    try:
        return ray.get(refs)
    except RayTaskError as e:
        if isinstance(e.cause, (ValueError, StorageError)):
            raise e.cause from None
        raise


def _stage(ray, fn, cfg: PrepareConfig, stg: Staging, opts: dict[str, Any], desc: str) -> list[Any]:
    task = ray.remote(fn).options(num_cpus=cfg.ray.load_num_cpus)
    refs = [task.remote(stg, p, opts) for p in range(opts["parts"])]
    out = _get(ray, refs)
    logger.info("%s: %d partitions", desc, len(out))
    return out


def _dedup_and_plan(ray, cfg: PrepareConfig, stg: Staging, storage: Storage, base: list[dict[str, Any]],
                    first: int) -> list[dict[str, Any]]:
    P = cfg.ray.partitions
    if base:  # the dataset being appended to: its hashes take part as incumbents
        keys = [schema.hashes_name(cfg.output.name, i) for i in range(len(base))]
        task = ray.remote(base_hashes_task).options(num_cpus=cfg.ray.load_num_cpus)
        chunk = max(1, math.ceil(len(keys) / (4 * P)))
        ray.get([task.remote(c, keys[s: s + chunk], storage, stg, P)
                 for c, s in enumerate(range(0, len(keys), chunk))])
    opts = {"parts": P, "exact": cfg.filters.exact_dedup, "near": cfg.filters.near_dedup,
            "max_distance": cfg.filters.phash_max_distance}
    _stage(ray, dedup.sid_stage, cfg, stg, opts, "dedup: source ids")
    if opts["exact"]:
        _stage(ray, dedup.exact_stage, cfg, stg, opts, "dedup: exact")
    if opts["near"]:
        _stage(ray, dedup.near_stage, cfg, stg, opts, "dedup: near (LSH bands)")
        task = ray.remote(dedup.label_round).options(num_cpus=cfg.ray.load_num_cpus)
        rounds = dedup.components(lambda k: _get(ray, [task.remote(stg, p, {**opts, "round": k}) for p in range(P)]))
        logger.info("dedup: near-duplicate components after %d label rounds", rounds)
    counts: dict[str, dict[int, int]] = {}
    for p, per_grid in enumerate(_stage(ray, dedup.assign_stage, cfg, stg, opts, "assign")):
        for g, n in per_grid.items():
            counts.setdefault(g, {})[p] = n
    return dedup.plan_shards(counts, cfg.output.samples_per_shard, first)


def _write(ray, cfg: PrepareConfig, storage: Storage, stg: Staging, plan: list[dict[str, Any]], downsample: int,
           run_id: str, config_hash: str) -> tuple[dict[int, dict[str, Any]], float]:
    """(per-shard results, seconds of writing after the actors were up)."""
    from ray.util import ActorPool

    if not plan:
        return {}, 0.0
    n = min(cfg.ray.tokenize_actors, len(plan))
    cls = ray.remote(TokenizeActor).options(num_cpus=cfg.ray.actor_num_cpus, num_gpus=cfg.ray.actor_num_gpus,
                                            max_restarts=-1, max_task_retries=-1)
    cj = cfg.model_dump_json()
    actors = [cls.remote(cj, storage, stg, downsample) for _ in range(n)]
    devices = ray.get([a.device_info.remote() for a in actors])  # models loaded: from here on, writing
    logger.info("%d tokenizer actors on %s", n, sorted({d["device"] for d in devices}))
    t0 = time.time()
    pool = ActorPool(actors)
    specs = [{**s, "run": run_id, "config_hash": config_hash} for s in plan]
    out: dict[int, dict[str, Any]] = {}
    try:
        with tqdm(total=sum(s["samples"] for s in plan), desc="tokenize+write", unit="img") as bar:
            for res in pool.map_unordered(lambda a, s: a.write.remote(s), specs):
                out[res["index"]] = res
                bar.update(res["stats"]["samples"])
                bar.set_postfix(shards=f"{len(out)}/{len(plan)}")
    finally:
        for a in actors:
            ray.kill(a)
    return out, time.time() - t0


def _merge_rejects(stg: Staging, storage: Storage, key: str) -> dict[str, int]:
    """Ray task: concatenate the staged reject files (name order; each sorted) into ``key``; reason counts."""
    counts: Counter = Counter()
    with tempfile.NamedTemporaryFile("wb", suffix=".jsonl", delete=False) as f:
        for k in stg.reject_files():
            data = storage.get_bytes(k)
            f.write(data)
            counts.update(json.loads(line)["reason"] for line in data.splitlines() if line.strip())
    try:
        storage.put_file(f.name, key)
    finally:
        os.unlink(f.name)
    return dict(sorted(counts.items()))


def _remove_outside(storage: Storage, name: str, keep: range) -> int:
    """Delete shard objects of ``name`` at indices >= ``keep.start`` outside ``keep`` (stats first)."""
    found: set[int] = set()
    for k in storage.iter_list(name + "-"):
        parsed = schema.parse_shard_name(k)
        if parsed and parsed[0] == name:
            found.add(parsed[1])
    n = 0
    for i in sorted(found):
        if i not in keep and i >= keep.start:
            uncommit_shard(storage, name, i)
            n += 1
    return n


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
    dataset_hash = _dataset_hash(cfg, vq_fp, text_fp)
    name = cfg.output.name
    storage = _open_output(cfg)
    existing = _existing_manifest(storage, cfg)
    base: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    if cfg.output.mode == "append" and existing is not None:
        if existing.get("dataset_hash") != dataset_hash:
            raise ConfigError(f"{storage.url()}: output.mode=append needs the dataset's name, resolutions, "
                              "bucket ratio, VQ, text encoder and thumbnails unchanged (they differ)")
        done = [r for r in existing["runs"] if r.get("config_hash") == config_hash]
        if done:  # this very append already ran to the end: nothing to do
            logger.info("run %s is already in the manifest: nothing to do", config_hash)
            return _summary(storage, existing, done[0], t0, written=0, skipped=0, noop=True)
        base, runs = existing["shards"], list(existing["runs"])
    elif existing is not None and not cfg.output.overwrite and \
            [r.get("config_hash") for r in existing["runs"]] != [config_hash]:
        raise ConfigError(f"{storage.url()} already holds a dataset from a different config or different inputs; "
                          "write to a new output.url, set output.overwrite=true, or use output.mode=append")
    first = len(base)
    _check_committed(storage, cfg, first, config_hash)
    removed_tmp = storage.clean_temp()
    if removed_tmp:
        logger.info("removed %d temp objects left by an interrupted run", removed_tmp)
    ray = init_ray(cfg)
    _check_cpu_budget(ray, cfg)
    stg = Staging(storage)
    stg.clear()  # whatever a killed run left half done is redone

    n_inputs, n_units = _scan(ray, cfg, stg, downsample)
    plan = _dedup_and_plan(ray, cfg, stg, storage, base, first)
    logger.info("%d inputs in %d units -> %d samples in %d shards (from index %d)", n_inputs, n_units,
                sum(s["samples"] for s in plan), len(plan), first)
    results, t_write = _write(ray, cfg, storage, stg, plan, downsample, config_hash, config_hash)
    removed = _remove_outside(storage, name, range(first, first + len(plan)))
    if removed:
        logger.info("deleted %d shard(s) outside this run's plan", removed)
    rejects_key = schema.REJECTS if first == 0 else f"rejects-{config_hash}.jsonl"
    reject_counts = ray.get(ray.remote(_merge_rejects).options(num_cpus=cfg.ray.load_num_cpus)
                            .remote(stg, storage, rejects_key))

    new = [schema.shard_entry(results[s["index"]]["stats"]) for s in plan]
    kept = sum(e["samples"] for e in new)
    this_run = {"run": config_hash, "config_hash": config_hash, "inputs": n_inputs, "kept": kept,
                "shards": [first, first + len(plan) - 1] if plan else [], "rejects": rejects_key,
                "reject_counts": reject_counts}
    runs = [r for r in runs if r.get("config_hash") != config_hash] + [this_run]
    total_rejects: Counter = Counter()
    for r in runs:
        total_rejects.update(r.get("reject_counts", {}))
    man = schema.make_dataset_manifest(
        list(base) + new, cfg.tokenize.resolutions, bool(cfg.tokenize.text_encoder_path), dataset_hash,
        {**versions(), "vq": vq_fp, "text_encoder": text_fp}, runs,
        extra={"name": name, "downsample": downsample, "dataset_hash": dataset_hash,
               "inputs": sum(int(r.get("inputs", 0)) for r in runs), "rejects": dict(sorted(total_rejects.items())),
               # what made the data, not where it went or how fast (a copied dataset's manifest stays true)
               "config": json.loads(cfg.model_dump_json(exclude={"ray": True, "output": {"url", "overwrite"}}))})
    if cfg.input.kind == "imagefolder":  # class id -> name for samplers, evaluators and `generate --class-id`
        from pipelines.inputs import class_index

        classes = class_index(cfg.input)
        storage.put_bytes(json.dumps({"num_classes": max(classes.values()) + 1, "classes": classes},
                                     indent=1).encode(), "classes.json")
    schema.write_dataset_manifest(storage, man)  # last: the run is complete
    stg.clear()
    n_written = sum(r["stats"]["samples"] for r in results.values() if not r["skipped"])
    summary = _summary(storage, man, this_run, t0, written=sum(not r["skipped"] for r in results.values()),
                       skipped=sum(r["skipped"] for r in results.values()))
    summary["tokenize_images_per_s"] = round(n_written / t_write, 2) if n_written and t_write > 0 else 0.0
    return summary


def _summary(storage: Storage, man: dict[str, Any], this_run: dict[str, Any], t0: float, written: int,
             skipped: int, noop: bool = False) -> dict[str, Any]:
    sh = this_run["shards"]
    return {"output": storage.url(), "inputs": this_run["inputs"], "samples": man["samples"],
            "run_samples": this_run["kept"], "rejects": this_run.get("reject_counts", {}),
            "shards": len(man["shards"]), "run_shards": (sh[1] - sh[0] + 1) if sh else 0,
            "shards_written": written, "shards_skipped": skipped if not noop else ((sh[1] - sh[0] + 1) if sh else 0),
            "buckets": man["buckets"], "seconds": round(time.time() - t0, 2), "tokenize_images_per_s": 0.0,
            "config_hash": this_run["config_hash"], "noop": noop}


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
