"""Tiny token shards for training smoke runs, tests and benchmarks (no images, no VQ needed).

Written exactly like the real pipeline's output (webdataset TarWriter + :mod:`sar_scale.data.schema`
helpers, stats.json committed after its tar, manifest last), so the training loader is exercised
end to end. Tokens are a learnable function of the class id and position plus noise, so the
loss visibly falls in a few dozen steps.
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
from pathlib import Path

import numpy as np

from sar_scale.data import schema
from sar_scale.data.buckets import bucket_table, nearest_bucket
from sar_scale.data.storage import Storage, open_storage

logger = logging.getLogger(__name__)


def write_debug_shards(url: str | Path, num_samples: int = 64, resolutions: tuple[int, ...] = (64, 128),
                       samples_per_shard: int = 16, vocab_size: int = 64, num_classes: int = 10,
                       text_dim: int | None = None, downsample: int = 16, max_ratio: float = 2.0,
                       seed: int = 0, name: str = "debug", noise: float = 0.1) -> Storage:
    """Write ``num_samples`` samples into shards under ``url`` (local dir or s3://); returns the storage.

    Each sample gets a random aspect ratio, hence a bucket per resolution (aligned across
    resolutions), ``extra.class_id``, a caption, and ``text.npy`` features when ``text_dim`` is set.
    """
    import webdataset as wds

    store = open_storage(str(url))
    rng = np.random.default_rng(seed)
    table = bucket_table(resolutions, downsample=downsample, max_ratio=max_ratio)
    ratios = [0.5, 1.0, 1.0, 1.0, 2.0]  # most samples square, some tall/wide: several buckets
    shards, counts = [], {str(r): {} for r in resolutions}
    for si, start in enumerate(range(0, num_samples, samples_per_shard)):
        buf = io.BytesIO()
        n = min(samples_per_shard, num_samples - start)
        with wds.TarWriter(buf) as tw:
            for j in range(start, start + n):
                cls = int(rng.integers(num_classes))
                ratio = ratios[int(rng.integers(len(ratios)))]
                w_px, h_px = int(256 * ratio), 256
                tokens = {}
                for r in resolutions:
                    bh, bw = nearest_bucket(w_px, h_px, table[r])
                    h, w = bh // downsample, bw // downsample
                    base = (cls * 7 + np.arange(h * w) * 3) % vocab_size
                    flip = rng.random(h * w) < noise
                    tok = np.where(flip, rng.integers(vocab_size, size=h * w), base).reshape(h, w)
                    tokens[r] = tok.astype(np.int32)
                    counts[str(r)][f"{h}x{w}"] = counts[str(r)].get(f"{h}x{w}", 0) + 1
                feats = (rng.standard_normal((int(rng.integers(3, 8)), text_dim)).astype(np.float16)
                         if text_dim else None)
                tw.write(schema.make_sample(f"debug/{seed}/{j}", f"class {cls} sample {j}", tokens,
                                            (w_px, h_px), scores={"aesthetic": float(rng.random())},
                                            text_features=feats, extra={"class_id": cls}))
        data = buf.getvalue()
        store.put_bytes(data, schema.tar_name(name, si))
        index = schema.build_index(io.BytesIO(data))
        schema.write_stats(store, name, si, schema.make_stats(name, si, n, {}, len(data), index))
        shards.append({"tar": schema.tar_name(name, si), "stats": schema.stats_name(name, si), "samples": n})
    schema.write_manifest(store, schema.make_manifest(shards, resolutions, counts, f"debug-{seed}",
                                                      {"sar_scale": "debug"}, text_dim is not None))
    logger.info("wrote %d debug samples in %d shards to %s", num_samples, len(shards), store.url())
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
