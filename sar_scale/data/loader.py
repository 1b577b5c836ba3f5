"""Training reader: deterministic, bucketed, resumable batches from committed shards (local or s3://).

Why not stream the tars with webdataset: a stream cannot resume mid-epoch (webdataset #177/#271)
and ranks with fewer shards than workers starve (#188). Instead every rank reads the same small
index (``manifest.json`` + each shard's ``stats.json``, which record every member's byte range) and
computes the same *schedule* - a pure function of (index, resolution, seed, stage, epoch, slots):

1. samples with a token grid at the stage's resolution are grouped by grid (bucket);
2. each bucket is shuffled with a seed of (seed, stage, epoch, h, w) and cut into global batches
   of ``micro_batch(h, w) * slots`` (``tokens_per_batch`` keeps tokens per batch constant); the
   last partial batch wraps around to the bucket's start (or is dropped);
3. the batches of all buckets are interleaved by one more seeded permutation.

Global batch ``i`` (one optimizer step) is then one bucket on every rank; it holds ``slots`` =
grad_accum x world micro-batches and rank ``r`` reads slots ``m * world + r`` (one GET per sample).
The position ``(epoch, global batches consumed)`` is all a checkpoint needs to continue exactly, on
any world size that keeps ``slots``. Shape legend: B samples per rank, N = h*w tokens, L text tokens, D text width.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from sar_scale.data import schema
from sar_scale.data.storage import Storage, open_storage

logger = logging.getLogger(__name__)

COND_MODES = ("class", "text_features", "text_encoder")


@dataclass(frozen=True)
class DataPosition:
    """Global batches consumed: ``batch`` within ``epoch`` of the current stage's schedule.

    World-independent: a global batch is ``slots`` micro-batches (``grad_accum x world``), whoever
    reads them, so the same position continues the same order on any number of ranks that keeps
    ``slots``. ``slots`` records the global batch the position was counted in (see :meth:`rescaled`).
    """

    epoch: int = 0
    batch: int = 0
    slots: int | None = None

    def as_dict(self) -> dict[str, int | None]:
        return {"epoch": self.epoch, "batch": self.batch, "slots": self.slots}

    def rescaled(self, slots: int) -> DataPosition:
        """The same position counted in global batches of ``slots`` micro-batches: about the same
        number of samples consumed (``batch * old / new``, rounded down), same epoch."""
        if self.slots is None or self.slots == slots:
            return DataPosition(self.epoch, self.batch, slots)
        return DataPosition(self.epoch, self.batch * self.slots // slots, slots)


@dataclass
class SampleTable:
    """Every sample usable at one resolution, as flat arrays (index = sample id within the table)."""

    resolution: int
    shard_keys: list[str]  # tar keys; ``shard`` indexes this list
    shard: np.ndarray  # [S] int32
    keys: list[str]  # [S] sample __key__
    grid: np.ndarray  # [S, 2] int32 token grid (h, w)
    members: list[dict[str, list[int]]]  # [S] member ext -> [offset, size] inside the tar
    missing: int  # samples in the index without tokens at this resolution

    def __len__(self) -> int:
        return len(self.keys)

    def buckets(self) -> dict[tuple[int, int], int]:
        return dict(Counter(map(tuple, self.grid.tolist())))


class ShardIndex:
    """The dataset's committed shards and their per-sample byte-range index (read once per run)."""

    def __init__(self, url: str, storage: Storage | None = None, threads: int = 8):
        self.url = url
        self.storage = storage or open_storage(url)
        self.manifest = schema.read_manifest(self.storage)
        shards = self.manifest["shards"]
        if not shards:
            raise schema.SchemaError(f"{self.storage.url(schema.MANIFEST)}: the manifest lists no shards")

        def load(s: dict[str, Any]) -> dict[str, Any]:
            stats = schema.read_stats(self.storage, s["stats"])
            if stats["samples"] != s["samples"]:
                raise schema.SchemaError(f"{self.storage.url(s['stats'])}: {stats['samples']} samples but "
                                         f"manifest.json says {s['samples']}")
            return stats

        with cf.ThreadPoolExecutor(min(threads, len(shards))) as pool:
            self.stats = list(pool.map(load, shards))
        self.tar_keys = [s["tar"] for s in shards]

    @property
    def text_features(self) -> bool:
        return bool(self.manifest.get("text_features"))

    @property
    def num_samples(self) -> int:
        return sum(s["samples"] for s in self.stats)

    def table(self, resolution: int) -> SampleTable:
        """Samples that have ``tokens_{resolution}.npy``; raises naming the URL if there are none."""
        member = schema.tokens_member(resolution)
        res = str(int(resolution))
        shard, keys, grid, members = [], [], [], []
        missing = 0
        for si, stats in enumerate(self.stats):
            for e in stats["index"]:
                hw = e.get("buckets", {}).get(res)
                if member not in e["members"] or hw is None:
                    missing += 1
                    continue
                shard.append(si)
                keys.append(e["key"])
                grid.append((int(hw[0]), int(hw[1])))
                members.append(e["members"])
        if not keys:
            raise schema.SchemaError(
                f"{self.storage.url()}: no sample has {member} (resolutions in the manifest: "
                f"{self.manifest.get('resolutions')}); check the stage's resolution")
        if missing:
            logger.warning("%s: %d of %d samples have no %s and are not used at this resolution",
                           self.storage.url(), missing, missing + len(keys), member)
        return SampleTable(int(resolution), self.tar_keys, np.asarray(shard, np.int32), keys,
                           np.asarray(grid, np.int32).reshape(-1, 2), members, missing)


def micro_batch_for(grid: tuple[int, int], micro_batch: int | None, tokens_per_batch: int | None) -> int:
    """Per-rank micro batch of a bucket: fixed, or ``tokens_per_batch // (h*w)`` (at least 1)."""
    if micro_batch is not None:
        return micro_batch
    if tokens_per_batch is None:
        raise ValueError("set micro_batch or tokens_per_batch")
    return max(1, tokens_per_batch // (grid[0] * grid[1]))


def build_schedule(grid_S2: np.ndarray, slots: int, seed: int, stage: int, epoch: int,
                   micro_batch: int | None = None, tokens_per_batch: int | None = None,
                   last_batch: str = "wrap") -> list[np.ndarray]:
    """Global batches of one epoch: a list of sample-id arrays, each of one bucket, each
    ``micro_batch(bucket) * slots`` long (``slots`` = micro-batches per optimizer step over all
    ranks = grad_accum x world). Identical on every rank and for every split of ``slots`` into
    ranks and accumulation steps (pure function of its arguments)."""
    if last_batch not in ("wrap", "drop"):
        raise ValueError(f"last_batch must be 'wrap' or 'drop', got {last_batch!r}")
    batches: list[np.ndarray] = []
    grids = sorted({(int(h), int(w)) for h, w in grid_S2.tolist()})
    for h, w in grids:
        idx = np.flatnonzero((grid_S2[:, 0] == h) & (grid_S2[:, 1] == w))
        perm = idx[np.random.default_rng([seed, stage, epoch, h, w]).permutation(len(idx))]
        g = micro_batch_for((h, w), micro_batch, tokens_per_batch) * slots
        full, rem = divmod(len(perm), g)
        batches += [perm[i * g:(i + 1) * g] for i in range(full)]
        if rem and last_batch == "wrap":
            # the tail plus the bucket's first samples again (cyclically if the bucket is tiny)
            batches.append(np.resize(perm, (full + 1) * g)[full * g:])
    order = np.random.default_rng([seed, stage, epoch, 1 << 30]).permutation(len(batches))
    return [batches[i] for i in order]


def _lookup(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(obj, dict) or part not in obj:
            raise KeyError(dotted)
        obj = obj[part]
    return obj


class BatchReader(Dataset):
    """Map-style dataset: item ``i * grad_accum + m`` = this rank's micro-batch ``m`` of global batch ``i``.

    A global batch holds ``slots = grad_accum * world`` micro-batches; micro-batch ``m`` of rank ``r``
    is slot ``m * world + r``. Opens its storage lazily per process, so DataLoader workers get their
    own S3 clients.
    """

    def __init__(self, url: str, table: SampleTable, schedule: list[np.ndarray], rank: int, world: int,
                 cond: str, epoch: int = 0, class_field: str = "extra.class_id", max_text_len: int | None = None,
                 vocab_size: int | None = None, grad_accum: int = 1):
        if cond not in COND_MODES:
            raise ValueError(f"cond must be one of {COND_MODES}, got {cond!r}")
        self.url, self.table, self.schedule = url, table, schedule
        self.rank, self.world, self.cond, self.epoch = rank, world, cond, epoch
        self.grad_accum = grad_accum
        self.class_field, self.max_text_len, self.vocab_size = class_field, max_text_len, vocab_size
        self._storage: Storage | None = None
        self._pid = -1

    @property
    def storage(self) -> Storage:
        if self._storage is None or self._pid != os.getpid():
            self._storage, self._pid = open_storage(self.url), os.getpid()
        return self._storage

    def __len__(self) -> int:
        return len(self.schedule) * self.grad_accum

    def _read_sample(self, sid: int) -> dict[str, Any]:
        t = self.table
        tar = t.shard_keys[int(t.shard[sid])]
        key = t.keys[sid]
        where = f"{self.storage.url(tar)}#{key}"
        members = t.members[sid]
        want = [schema.tokens_member(t.resolution), schema.TXT]
        if self.cond == "class":
            want.append(schema.JSON)
        if self.cond == "text_features":
            want.append(schema.TEXT_FEATURES)
        for m in want:
            if m not in members and m != schema.TXT:
                raise schema.SchemaError(f"{where}: member '{m}' is missing (needed for cond={self.cond})")
        spans = [members[m] for m in want if m in members]
        lo = min(o for o, _ in spans)
        hi = max(o + s for o, s in spans)
        needed = sum(s for _, s in spans)
        if hi - lo <= 4 * needed + 4096:  # members sit together in the tar: one ranged GET
            blob = self.storage.get_range(tar, lo, hi - lo)
            raw = {m: blob[members[m][0] - lo: members[m][0] - lo + members[m][1]] for m in want if m in members}
        else:
            raw = {m: self.storage.get_range(tar, *members[m]) for m in want if m in members}
        try:
            tokens = schema.decode_npy(raw[schema.tokens_member(t.resolution)])
        except ValueError as e:
            raise schema.SchemaError(f"{where}: unreadable tokens: {e}") from None
        h, w = (int(x) for x in t.grid[sid])
        if tokens.shape != (h, w):
            raise schema.SchemaError(f"{where}: tokens have shape {tokens.shape}, the index says ({h}, {w})")
        if self.vocab_size is not None and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise schema.SchemaError(f"{where}: token ids outside [0, {self.vocab_size}) - shards made with a "
                                     "different tokenizer than model.vocab_size?")
        out: dict[str, Any] = {"key": key, "tokens": tokens.reshape(-1),
                               "caption": raw.get(schema.TXT, b"").decode("utf-8", errors="replace")}
        if self.cond == "class":
            try:
                out["class_id"] = int(_lookup(json.loads(raw[schema.JSON]), self.class_field))
            except (KeyError, ValueError, TypeError):
                raise schema.SchemaError(f"{where}: sample json has no integer '{self.class_field}' "
                                         "(data.class_field)") from None
        if self.cond == "text_features":
            feats = schema.decode_npy(raw[schema.TEXT_FEATURES])
            if feats.ndim != 2:
                raise schema.SchemaError(f"{where}: text.npy must be [len, D], got {feats.shape}")
            out["text"] = feats[: self.max_text_len] if self.max_text_len else feats
        return out

    def __getitem__(self, item: int) -> dict[str, Any]:
        i, m = divmod(item, self.grad_accum)
        ids = self.schedule[i]
        slots = self.world * self.grad_accum
        mb = len(ids) // slots
        slot = m * self.world + self.rank
        mine = ids[slot * mb:(slot + 1) * mb]
        samples = [self._read_sample(int(s)) for s in mine]
        h, w = (int(x) for x in self.table.grid[int(mine[0])])
        batch: dict[str, Any] = {
            "tokens": torch.from_numpy(np.stack([s["tokens"] for s in samples]).astype(np.int64)),
            "grid": (h, w), "keys": [s["key"] for s in samples], "captions": [s["caption"] for s in samples],
            "epoch": self.epoch, "batch": i, "micro": m, "slot": slot,
        }
        if self.cond == "class":
            batch["class_ids"] = torch.tensor([s["class_id"] for s in samples], dtype=torch.long)
        if self.cond == "text_features":
            lmax = max(max(s["text"].shape[0] for s in samples), 1)
            d = samples[0]["text"].shape[1]
            text = np.zeros((len(samples), lmax, d), np.float32)
            mask = np.zeros((len(samples), lmax), bool)
            for j, s in enumerate(samples):
                if s["text"].shape[1] != d:
                    raise schema.SchemaError(f"sample {s['key']}: text width {s['text'].shape[1]} != {d}")
                n = s["text"].shape[0]
                text[j, :n] = s["text"]
                mask[j, :n] = True
            batch["text"] = torch.from_numpy(text)
            batch["text_mask"] = torch.from_numpy(mask)
        return batch


class StageStream:
    """This rank's micro-batches for one curriculum stage, epoch after epoch, from a saved position.

    Yields ``grad_accum`` micro-batches per global batch (slots ``m * world + rank``). ``position``
    names the next global batch once the last micro-batch of one has been handed out, so saving it
    after an optimizer step and passing it back on resume continues exactly - on any world size
    with the same ``grad_accum * world`` (prefetched, unconsumed batches are not counted).
    """

    def __init__(self, url: str, resolution: int, rank: int, world: int, seed: int, stage: int,
                 cond: str, micro_batch: int | None = None, tokens_per_batch: int | None = None,
                 position: DataPosition | None = None, class_field: str = "extra.class_id",
                 max_text_len: int | None = None, vocab_size: int | None = None, num_workers: int = 1,
                 prefetch_factor: int = 2, last_batch: str = "wrap", index: ShardIndex | None = None,
                 index_threads: int = 8, grad_accum: int = 1):
        self.url, self.rank, self.world, self.seed, self.stage = url, rank, world, seed, stage
        self.grad_accum = grad_accum
        self.slots = world * grad_accum
        self.cond = cond
        self.micro_batch, self.tokens_per_batch = micro_batch, tokens_per_batch
        self.position = (position or DataPosition()).rescaled(self.slots)
        self.reader_kw = dict(class_field=class_field, max_text_len=max_text_len, vocab_size=vocab_size)
        self.num_workers, self.prefetch_factor, self.last_batch = num_workers, prefetch_factor, last_batch
        self.index = index or ShardIndex(url, threads=index_threads)
        self.table = self.index.table(resolution)
        self._schedules: dict[int, list[np.ndarray]] = {}

    def schedule(self, epoch: int) -> list[np.ndarray]:
        if epoch not in self._schedules:
            self._schedules = {epoch: build_schedule(self.table.grid, self.slots, self.seed, self.stage, epoch,
                                                     self.micro_batch, self.tokens_per_batch, self.last_batch)}
            if not self._schedules[epoch]:
                raise ValueError(f"{self.url}: no full global batch at resolution {self.table.resolution} "
                                 f"({len(self.table)} samples, {self.slots} micro-batches per global batch, "
                                 "last_batch=drop)")
        return self._schedules[epoch]

    @property
    def steps_per_epoch(self) -> int:
        """Global batches (optimizer steps) per epoch."""
        return len(self.schedule(self.position.epoch))

    def nominal_micro_batch(self) -> int:
        """The micro batch of the most common bucket (DeepSpeed's batch-size bookkeeping)."""
        grid = max(self.table.buckets().items(), key=lambda kv: kv[1])[0]
        return micro_batch_for(grid, self.micro_batch, self.tokens_per_batch)

    def reader(self, epoch: int) -> BatchReader:
        return BatchReader(self.url, self.table, self.schedule(epoch), self.rank, self.world, self.cond,
                           epoch=epoch, grad_accum=self.grad_accum, **self.reader_kw)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            epoch, start = self.position.epoch, self.position.batch
            reader = self.reader(epoch)
            ga = self.grad_accum
            if start * ga < len(reader):
                loader = DataLoader(reader, batch_size=None, sampler=range(start * ga, len(reader)),
                                    num_workers=self.num_workers,
                                    prefetch_factor=self.prefetch_factor if self.num_workers else None)
                for batch in loader:
                    if batch["micro"] == ga - 1:
                        self.position = DataPosition(epoch, batch["batch"] + 1, self.slots)
                    yield batch
            self.position = DataPosition(epoch + 1, 0, self.slots)
