"""Tiny token shards for training smoke runs, tests and benchmarks (no images, no VQ needed).

Written exactly like the real pipeline's output (shard format v2, docs/shard-format.md: aspect-bucket
shards committed by :func:`sar_scale.data.shards.commit_shard` - tar, index.npy, stats.json last -
and the manifest last), so the training loader is exercised end to end. Tokens are a learnable function of the class id and position plus noise, so the
loss visibly falls in a few dozen steps.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from sar_scale.data import schema
from sar_scale.data.buckets import bucket_table, nearest_bucket
from sar_scale.data.shards import commit_shard
from sar_scale.data.storage import Storage, open_storage

logger = logging.getLogger(__name__)


def write_debug_shards(url: str | Path, num_samples: int = 64, resolutions: tuple[int, ...] = (64, 128),
                       samples_per_shard: int = 16, vocab_size: int = 64, num_classes: int = 10,
                       text_dim: int | None = None, downsample: int = 16, max_ratio: float = 2.0,
                       seed: int = 0, name: str = "debug", noise: float = 0.1) -> Storage:
    """Write ``num_samples`` samples as format-v2 shards under ``url`` (local dir or s3://); returns the storage.

    Each sample gets a random aspect ratio, hence a bucket per resolution (aligned across
    resolutions), ``extra.class_id``, a caption, and ``text.npy`` features when ``text_dim`` is set.
    Samples are grouped by bucket (one grid per shard and resolution), at most ``samples_per_shard``
    per shard, committed with :func:`sar_scale.data.shards.commit_shard`; the manifest is written last.
    """
    store = open_storage(str(url))
    rng = np.random.default_rng(seed)
    table = bucket_table(resolutions, downsample=downsample, max_ratio=max_ratio)
    ratios = [0.5, 1.0, 1.0, 1.0, 2.0]  # most samples square, some tall/wide: several buckets
    by_bucket: dict[tuple, list[dict]] = {}
    for j in range(num_samples):
        cls = int(rng.integers(num_classes))
        ratio = ratios[int(rng.integers(len(ratios)))]
        w_px, h_px = int(256 * ratio), 256
        tokens = {}
        for r in resolutions:
            bh, bw = nearest_bucket(w_px, h_px, table[r])
            h, w = bh // downsample, bw // downsample
            base = (cls * 7 + np.arange(h * w) * 3) % vocab_size
            flip = rng.random(h * w) < noise
            tokens[r] = np.where(flip, rng.integers(vocab_size, size=h * w), base).reshape(h, w).astype(np.int32)
        feats = (rng.standard_normal((int(rng.integers(3, 8)), text_dim)).astype(np.float16)
                 if text_dim else None)
        sample = schema.make_sample(f"debug/{seed}/{j}", f"class {cls} sample {j}", tokens, (w_px, h_px),
                                    scores={"aesthetic": float(rng.random())}, text_features=feats,
                                    extra={"class_id": cls})
        grids = tuple((r, tokens[r].shape) for r in resolutions)
        by_bucket.setdefault(grids, []).append(sample)
    entries = []
    for grids in sorted(by_bucket):
        group = sorted(by_bucket[grids], key=lambda s: s["__key__"])
        for start in range(0, len(group), samples_per_shard):
            stats = commit_shard(store, name, len(entries), group[start:start + samples_per_shard], dict(grids),
                                 run=f"debug-{seed}")
            entries.append(schema.shard_entry(stats))
    schema.write_dataset_manifest(store, schema.make_dataset_manifest(
        entries, resolutions, text_dim is not None, f"debug-{seed}", {"sar_scale": "debug"},
        [{"run": f"debug-{seed}", "shards": [0, len(entries) - 1], "inputs": num_samples, "kept": num_samples}]))
    logger.info("wrote %d debug samples in %d shards to %s", num_samples, len(entries), store.url())
    return store


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m sar_scale.training.debug_data",
                                description="Write tiny class-conditional token shards for `sar-scale train` "
                                "smoke runs (configs/train/debug.yaml reads runs/debug-shards).")
    p.add_argument("out", nargs="?", default="runs/debug-shards", help="local dir or s3://bucket/prefix")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--resolutions", type=int, nargs="+", default=[64, 128])
    p.add_argument("--vocab-size", type=int, default=64)
    p.add_argument("--text-dim", type=int, default=None, help="also write text.npy features of this width")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    store = write_debug_shards(a.out, a.samples, tuple(a.resolutions), vocab_size=a.vocab_size,
                               text_dim=a.text_dim, seed=a.seed)
    print(f"wrote {a.samples} samples to {store.url()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
