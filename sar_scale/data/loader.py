"""Training reader: whole-shard streaming, bucketed, exactly resumable on any world size (format v2).

Start-up reads ``manifest.json`` only (per shard: tar, index, sample count, token grid); a shard's
``index.npy`` and its bytes are read when this rank is about to use them, as one ranged GET of a
contiguous run of samples ("piece", usually a whole shard), several in flight at once, optionally
kept in a size-bounded local disk cache. Memory is O(pieces in flight), not O(dataset).

The order of an epoch is a pure function of (manifest, resolution, seed, stage, epoch, slots):

- ``slots`` = micro-batches per global batch (grad_accum x world): the global batch, not the world
  size, defines the order, so 2 ranks x 2 micro-batches and 1 rank x 4 read the same samples in the
  same global slots, and a position saved by one continues on the other.
- Shards are grouped by their grid at the stage's resolution (aspect bucket; shards without the
  resolution are skipped and counted). Per bucket, the shard order is a seeded permutation; the
  bucket's samples in that order are cut into ``slots`` contiguous *lanes* of ``n_batches * mb``
  samples (``mb`` = micro batch of the bucket, from ``micro_batch`` or ``tokens_per_batch``;
  ``wrap`` repeats the bucket's start to fill the last global batch, ``drop`` drops it). A lane is
  a list of pieces; a bucket with fewer shards than slots splits shards into pieces, so no slot
  (rank) starves.
- Locality-aware shuffle: a lane's pieces are taken in windows of ``window`` pieces; the samples of
  a window are permuted by a seed of (seed, stage, epoch, bucket, lane, window). A bigger window is
  more random and keeps more pieces open.
- Global batch ``k`` of a bucket: slot ``s`` reads lane ``s``'s samples ``[k*mb, (k+1)*mb)``; the
  global batches of all buckets are interleaved by a seeded permutation that keeps each bucket's
  own order, so every rank is on the same bucket at every step.

Rank ``r`` reads slots ``m * world + r`` (micro step ``m``), i.e. only its own lanes: each piece is
read by one rank. The position ``(epoch, global batches consumed)`` is all a checkpoint needs.
Shape legend: B samples per rank, N = h*w tokens, L text tokens, D text width.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import io
import json
import logging
import os
import queue
import tarfile
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sar_scale.data import schema
from sar_scale.data.storage import Storage, open_storage
from sar_scale.utils.atomic import atomic_write

logger = logging.getLogger(__name__)

COND_MODES = ("class", "text_features", "text_encoder")


@dataclass(frozen=True)
class DataPosition:
    """Global batches consumed: ``batch`` within ``epoch`` of the current stage's order.

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


# ----------------------------------------------------------------------------- the dataset (manifest only)


@dataclass(frozen=True)
class ShardRef:
    """One committed shard as the manifest describes it, at one resolution."""

    tar: str
    index: str
    samples: int
    grid: tuple[int, int]
    bytes: int = 0  # the tar's size (manifest); 0 = unknown

    def rows_per_piece(self, piece_bytes: int | None) -> int:
        """Most rows one piece of this shard may span so that it holds about ``piece_bytes`` (whole shard
        when unbounded or unknown): a rank holds W + P pieces in memory, not W + P whole shards."""
        if not piece_bytes or self.bytes <= piece_bytes or self.samples <= 1:
            return max(self.samples, 1)
        return max(1, self.samples * piece_bytes // self.bytes)


class DatasetIndex:
    """A dataset's committed shards from ``manifest.json`` alone (O(shards) memory, one GET)."""

    def __init__(self, url: str, storage: Storage | None = None):
        self.url = url
        self.storage = storage or open_storage(url)
        self.manifest = schema.read_dataset_manifest(self.storage)
        if not self.manifest["shards"]:
            raise schema.SchemaError(f"{self.storage.url(schema.MANIFEST)}: the manifest lists no shards")

    @property
    def text_features(self) -> bool:
        return bool(self.manifest.get("text_features"))

    @property
    def num_samples(self) -> int:
        return int(self.manifest["samples"])

    def shards(self, resolution: int) -> list[ShardRef]:
        """Shards with a token grid at ``resolution``; raises naming the URL if there are none."""
        res = str(int(resolution))
        out, skipped, skipped_samples = [], 0, 0
        for s in self.manifest["shards"]:
            hw = s["grids"].get(res)
            if hw is None:
                skipped += 1
                skipped_samples += int(s["samples"])
                continue
            if int(s["samples"]) > 0:
                out.append(ShardRef(s["tar"], s["index"], int(s["samples"]), (int(hw[0]), int(hw[1])),
                                    int(s.get("bytes") or 0)))
        if not out:
            raise schema.SchemaError(
                f"{self.storage.url()}: no shard has tokens at resolution {res} (resolutions in the manifest: "
                f"{self.manifest.get('resolutions')}); check the stage's resolution")
        if skipped:
            logger.warning("%s: %d shards (%d samples) have no %s and are not used at this resolution",
                           self.storage.url(), skipped, skipped_samples, schema.tokens_member(res))
        return out


def micro_batch_for(grid: tuple[int, int], micro_batch: int | None, tokens_per_batch: int | None) -> int:
    """Per-rank micro batch of a bucket: fixed, or ``tokens_per_batch // (h*w)`` (at least 1)."""
    if micro_batch is not None:
        return micro_batch
    if tokens_per_batch is None:
        raise ValueError("set micro_batch or tokens_per_batch")
    return max(1, tokens_per_batch // (grid[0] * grid[1]))


# ----------------------------------------------------------------------------- the order (pure)


@dataclass(frozen=True)
class Piece:
    """Rows ``[lo, hi)`` of shard ``shard`` (an index into the stage's shard list)."""

    shard: int
    lo: int
    hi: int

    def __len__(self) -> int:
        return self.hi - self.lo


@dataclass
class Lane:
    """One slot's sample sequence in one bucket: pieces in order, shuffled within windows."""

    pieces: list[Piece]
    window: int  # pieces per window
    seed: tuple[int, ...]

    def __post_init__(self) -> None:
        sizes = np.array([len(p) for p in self.pieces], np.int64)
        self.piece_start = np.concatenate([[0], np.cumsum(sizes)])  # lane position of each piece
        self.windows = [(w, min(w + self.window, len(self.pieces))) for w in range(0, len(self.pieces), self.window)]
        self.window_start = np.array([self.piece_start[a] for a, _ in self.windows] + [self.piece_start[-1]])
        self._perm: dict[int, np.ndarray] = {}

    def window_of(self, pos: int) -> int:
        return int(np.searchsorted(self.window_start, pos, side="right") - 1)

    def window_pieces(self, w: int) -> range:
        a, b = self.windows[w]
        return range(a, b)

    def locate(self, pos: int) -> tuple[int, int]:
        """Lane position -> (piece number in the lane, row in its shard), after the window shuffle."""
        w = self.window_of(pos)
        ws, we = int(self.window_start[w]), int(self.window_start[w + 1])
        perm = self._perm.get(w)
        if perm is None:
            if len(self._perm) > 4:
                self._perm.clear()
            perm = self._perm[w] = np.random.default_rng([*self.seed, w]).permutation(we - ws)
        q = ws + int(perm[pos - ws])
        j = int(np.searchsorted(self.piece_start, q, side="right") - 1)
        return j, self.pieces[j].lo + (q - int(self.piece_start[j]))


@dataclass
class BucketPlan:
    grid: tuple[int, int]
    mb: int
    n_batches: int
    lanes: list[Lane]


@dataclass
class EpochPlan:
    """The global batches of one epoch: ``order[j]`` = bucket of global batch ``j``, ``k[j]`` = its
    batch number within the bucket."""

    shards: list[ShardRef]
    slots: int
    buckets: list[BucketPlan]
    order: np.ndarray  # [n] bucket index per global batch
    k: np.ndarray  # [n] batch number within its bucket
    skipped_buckets: int = 0

    def __len__(self) -> int:
        return len(self.order)

    def slot_samples(self, j: int, slot: int) -> list[tuple[int, int, int]]:
        """(piece-holder lane key, shard, row) of the samples of ``slot`` in global batch ``j``."""
        b = int(self.order[j])
        bp = self.buckets[b]
        lane = bp.lanes[slot]
        k = int(self.k[j])
        out = []
        for pos in range(k * bp.mb, (k + 1) * bp.mb):
            pj, row = lane.locate(pos)
            out.append((pj, lane.pieces[pj].shard, row))
        return out


def _lane_pieces(stream_shards: list[int], counts: np.ndarray, cum: np.ndarray, start: int,
                 stop: int, caps: np.ndarray | None = None) -> list[Piece]:
    """Pieces of the cyclic sample stream (shards ``stream_shards`` with ``counts`` samples, in order;
    ``cum`` their cumulative sum from 0) between stream positions ``[start, stop)``. ``caps``: most rows
    per piece of each stream shard; a piece never crosses a multiple of its cap, so lanes that meet in a
    shard share its pieces."""
    total = int(cum[-1])
    out: list[Piece] = []
    t = start
    while t < stop:
        u = t % total
        i = int(np.searchsorted(cum, u, side="right") - 1)
        lo = u - int(cum[i])
        n = min(int(counts[i]) - lo, stop - t)
        if caps is not None:
            n = min(n, (lo // int(caps[i]) + 1) * int(caps[i]) - lo)
        out.append(Piece(stream_shards[i], lo, lo + n))
        t += n
    return out


def plan_epoch(shards: list[ShardRef], slots: int, seed: int, stage: int, epoch: int,
               micro_batch: int | None = None, tokens_per_batch: int | None = None, last_batch: str = "wrap",
               window: int = 4, piece_bytes: int | None = None) -> EpochPlan:
    """The epoch's global batches (pure function of its arguments; identical on every rank and for every
    split of ``slots`` into ranks x accumulation steps). O(shards + global batches) memory.
    ``piece_bytes`` bounds a piece (one GET, held while its window is open) to about that many bytes
    of a shard; None = whole-shard pieces."""
    if last_batch not in ("wrap", "drop"):
        raise ValueError(f"last_batch must be 'wrap' or 'drop', got {last_batch!r}")
    if slots < 1 or window < 1:
        raise ValueError(f"slots and window must be >= 1, got {slots}, {window}")
    by_grid: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(shards):
        by_grid.setdefault(s.grid, []).append(i)
    buckets: list[BucketPlan] = []
    skipped = 0
    for h, w in sorted(by_grid):
        ids = by_grid[(h, w)]
        perm = np.random.default_rng([seed, stage, epoch, h, w]).permutation(len(ids))
        order = [ids[i] for i in perm]
        counts = np.array([shards[i].samples for i in order], np.int64)
        n = int(counts.sum())
        mb = micro_batch_for((h, w), micro_batch, tokens_per_batch)
        per_batch = mb * slots
        n_batches = -(-n // per_batch) if last_batch == "wrap" else n // per_batch
        if n_batches == 0:
            skipped += 1
            continue
        lane_len = n_batches * mb
        cum = np.concatenate([[0], np.cumsum(counts)])
        caps = np.array([shards[i].rows_per_piece(piece_bytes) for i in order], np.int64) if piece_bytes else None
        lanes = [Lane(_lane_pieces(order, counts, cum, s * lane_len, (s + 1) * lane_len, caps), window,
                      (seed, stage, epoch, h, w, s)) for s in range(slots)]
        buckets.append(BucketPlan((h, w), mb, n_batches, lanes))
    labels = np.concatenate([np.full(b.n_batches, i, np.int32) for i, b in enumerate(buckets)]) \
        if buckets else np.zeros(0, np.int32)
    labels = labels[np.random.default_rng([seed, stage, epoch, 1 << 30]).permutation(len(labels))]
    k = np.zeros(len(labels), np.int64)
    seen = np.zeros(len(buckets), np.int64)
    for j, b in enumerate(labels):  # the j-th batch of bucket b is its seen[b]-th: bucket order kept
        k[j] = seen[b]
        seen[b] += 1
    return EpochPlan(shards, slots, buckets, labels, k, skipped)


# ----------------------------------------------------------------------------- reading pieces


def _lookup(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(obj, dict) or part not in obj:
            raise KeyError(dotted)
        obj = obj[part]
    return obj


class DiskCache:
    """Pieces kept on local disk under ``root`` up to ``max_bytes`` (least recently used evicted)."""

    def __init__(self, root: str | Path, max_bytes: int):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = int(max_bytes)
        self._lock = threading.Lock()
        self._evict()  # a smaller bound than the last run's applies at once

    def _path(self, name: str) -> Path:
        return self.root / hashlib.sha256(name.encode()).hexdigest()[:32]

    def get(self, name: str) -> bytes | None:
        p = self._path(name)
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            return None
        os.utime(p)  # recently used
        return data

    def put(self, name: str, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        atomic_write(self._path(name), data, fsync=False)  # a cache: a lost file is fetched again
        self._evict()

    def _evict(self) -> None:
        with self._lock:
            files = []
            for f in self.root.iterdir():
                if not f.name.startswith("."):
                    try:
                        st = f.stat()
                    except FileNotFoundError:
                        continue
                    files.append((st.st_mtime, st.st_size, f))
            total = sum(sz for _, sz, _ in files)
            for _, sz, f in sorted(files, key=lambda x: x[0]):
                if total <= self.max_bytes:
                    break
                f.unlink(missing_ok=True)
                total -= sz


class PieceReader:
    """Reads pieces (one ranged GET each) and decodes their samples. Thread-safe; opens its storage
    lazily per process."""

    def __init__(self, url: str, shards: list[ShardRef], resolution: int, cond: str,
                 class_field: str = "extra.class_id", max_text_len: int | None = None,
                 vocab_size: int | None = None, cache: DiskCache | None = None, storage: Storage | None = None):
        if cond not in COND_MODES:
            raise ValueError(f"cond must be one of {COND_MODES}, got {cond!r}")
        self.url, self.shards, self.resolution, self.cond = url, shards, int(resolution), cond
        self.class_field, self.max_text_len, self.vocab_size = class_field, max_text_len, vocab_size
        self.cache = cache
        self._storage, self._pid = storage, os.getpid() if storage is not None else -1
        self._indexes: OrderedDict[int, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.requests = 0  # GETs issued (index files + pieces), for benchmarks

    @property
    def storage(self) -> Storage:
        if self._storage is None or self._pid != os.getpid():
            self._storage, self._pid = open_storage(self.url), os.getpid()
        return self._storage

    def index(self, shard: int) -> np.ndarray:
        with self._lock:
            idx = self._indexes.get(shard)
            if idx is not None:
                self._indexes.move_to_end(shard)
                return idx
        ref = self.shards[shard]
        stats = {"samples": ref.samples, "bytes": 1 << 62}
        try:
            arr = schema.decode_npy(self.storage.get_bytes(ref.index))
        except (ValueError, OSError, EOFError) as e:
            raise schema.SchemaError(f"{self.storage.url(ref.index)}: not a valid .npy: {e}") from None
        idx = schema.validate_index(arr, stats, self.storage.url(ref.index))
        with self._lock:
            self.requests += 1
            self._indexes[shard] = idx
            while len(self._indexes) > 64:
                self._indexes.popitem(last=False)
        return idx

    def fetch(self, piece: Piece) -> tuple[int, bytes, np.ndarray]:
        """(byte offset of the data, the bytes of rows [lo, hi), their index rows)."""
        ref = self.shards[piece.shard]
        rows = self.index(piece.shard)[piece.lo:piece.hi]
        lo, hi = int(rows["start"][0]), int(rows["end"][-1])
        name = f"{self.url}/{ref.tar}#{lo}-{hi}"
        data = self.cache.get(name) if self.cache is not None else None
        if data is None or len(data) != hi - lo:
            data = self.storage.get_range(ref.tar, lo, hi - lo)
            with self._lock:
                self.requests += 1
            if len(data) != hi - lo:
                raise schema.SchemaError(f"{self.storage.url(ref.tar)}: read {len(data)} bytes at {lo}, want "
                                         f"{hi - lo} (tar shorter than its index.npy says)")
            if self.cache is not None:
                self.cache.put(name, data)
        return lo, data, rows

    def decode(self, shard: int, row: int, held: tuple[int, bytes, np.ndarray], piece: Piece) -> dict[str, Any]:
        """Sample ``row`` of ``shard`` out of a fetched piece."""
        base, data, rows = held
        r = rows[row - piece.lo]
        key = r["key"].decode("ascii")
        ref = self.shards[shard]
        where = f"{self.storage.url(ref.tar)}#{key}"
        raw: dict[str, bytes | memoryview] = {}
        span = memoryview(data)[int(r["start"]) - base:int(r["end"]) - base]
        for name, payload in _tar_members(span, where):
            k, _, ext = name.rsplit("/", 1)[-1].partition(".")
            if k != key:
                raise schema.SchemaError(f"{where}: member {name!r} inside the sample's byte range "
                                         "(index.npy does not match the tar)")
            raw[ext] = payload
        tok_member = schema.tokens_member(self.resolution)
        need = [tok_member] + ([schema.JSON] if self.cond == "class" else []) + \
            ([schema.TEXT_FEATURES] if self.cond == "text_features" else [])
        for m in need:
            if m not in raw:
                raise schema.SchemaError(f"{where}: member '{m}' is missing (needed for cond={self.cond})")
        try:
            tokens = schema.decode_npy(raw[tok_member])
        except ValueError as e:
            raise schema.SchemaError(f"{where}: unreadable tokens: {e}") from None
        if tokens.shape != ref.grid:
            raise schema.SchemaError(f"{where}: tokens have shape {tokens.shape}, the manifest says {ref.grid}")
        if self.vocab_size is not None and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise schema.SchemaError(f"{where}: token ids outside [0, {self.vocab_size}) - shards made with a "
                                     "different tokenizer than model.vocab_size?")
        out: dict[str, Any] = {"key": key, "tokens": tokens.reshape(-1),
                               "caption": bytes(raw.get(schema.TXT, b"")).decode("utf-8", errors="replace")}
        if self.cond == "class":
            try:
                out["class_id"] = int(_lookup(json.loads(bytes(raw[schema.JSON])), self.class_field))
            except (KeyError, ValueError, TypeError):
                raise schema.SchemaError(f"{where}: sample json has no integer '{self.class_field}' "
                                         "(data.class_field)") from None
        if self.cond == "text_features":
            feats = schema.decode_npy(raw[schema.TEXT_FEATURES])
            if feats.ndim != 2:
                raise schema.SchemaError(f"{where}: text.npy must be [len, D], got {feats.shape}")
            out["text"] = feats[: self.max_text_len] if self.max_text_len else feats
        return out


_EXTENDED = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
             tarfile.GNUTYPE_LONGLINK, tarfile.GNUTYPE_SPARSE)


def _tar_members(span: memoryview, where: str) -> list[tuple[str, bytes | memoryview]]:
    """(name, payload) of the regular files in one sample's byte range of a tar.

    Headers are parsed by ``tarfile.TarInfo.frombuf`` (checksums, octal/base-256 fields); payloads are
    slices of ``span``, not copies. A tarfile stream read costs several Python-level copies of each
    member, which bounded the reader at a few hundred 0.5 MB samples/s per core; ranges holding an
    extended header (pax, GNU long names) go through tarfile's full reader instead.
    """
    out: list[tuple[str, bytes | memoryview]] = []
    off, n = 0, len(span)
    while off + tarfile.BLOCKSIZE <= n:
        block = bytes(span[off:off + tarfile.BLOCKSIZE])
        if block.count(0) == tarfile.BLOCKSIZE:
            break  # end-of-archive zeros (a range that ends a shard)
        try:
            ti = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except tarfile.HeaderError as e:
            raise schema.SchemaError(f"{where}: bad tar header at +{off} ({e})") from None
        if ti.type in _EXTENDED:
            return _tar_members_slow(span, where)
        lo = off + tarfile.BLOCKSIZE
        if lo + ti.size > n:
            raise schema.SchemaError(f"{where}: member {ti.name!r} runs past the sample's byte range")
        if ti.isfile():
            out.append((ti.name, span[lo:lo + ti.size]))
        off = lo + -(-ti.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    if off < n and bytes(span[off:]).count(0) != n - off:
        raise schema.SchemaError(f"{where}: the sample's byte range ends inside a tar header (+{off})")
    return out


def _tar_members_slow(span: memoryview, where: str) -> list[tuple[str, bytes | memoryview]]:
    out: list[tuple[str, bytes | memoryview]] = []
    try:
        with tarfile.open(fileobj=io.BytesIO(span), mode="r|") as tf:
            for ti in tf:
                if ti.isfile():
                    f = tf.extractfile(ti)
                    out.append((ti.name, f.read() if f is not None else b""))
    except tarfile.TarError as e:
        raise schema.SchemaError(f"{where}: unreadable tar range ({e})") from None
    return out


def collate(samples: list[dict[str, Any]], grid: tuple[int, int], cond: str) -> dict[str, Any]:
    """Samples of one bucket -> a micro-batch (tokens ``[B, N]``, class ids or padded text + mask)."""
    batch: dict[str, Any] = {
        "tokens": torch.from_numpy(np.stack([s["tokens"] for s in samples]).astype(np.int64)),
        "grid": grid, "keys": [s["key"] for s in samples], "captions": [s["caption"] for s in samples]}
    if cond == "class":
        batch["class_ids"] = torch.tensor([s["class_id"] for s in samples], dtype=torch.long)
    if cond == "text_features":
        lmax = max(max(s["text"].shape[0] for s in samples), 1)
        d = samples[0]["text"].shape[1]
        # kept in the stored dtype (fp16 for the 900M run): the model's dtype is applied on the device
        # (Condition.from_batch), so the host neither widens nor copies twice what the GPU converts for free
        text = np.zeros((len(samples), lmax, d), np.result_type(*(s["text"].dtype for s in samples)))
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


# ----------------------------------------------------------------------------- the stream


@dataclass(frozen=True)
class _Window:
    bucket: int
    slot: int
    w: int
    first: int  # first global batch that reads it
    last: int  # last global batch that reads it


def _rank_windows(plan: EpochPlan, my_slots: list[int]) -> list[_Window]:
    """The windows this rank's slots read in ``plan``, sorted by first use."""
    j_of = [np.flatnonzero(plan.order == b) for b in range(len(plan.buckets))]
    out = []
    for b, bp in enumerate(plan.buckets):
        for s in my_slots:
            lane = bp.lanes[s]
            for w in range(len(lane.windows)):
                ws, we = int(lane.window_start[w]), int(lane.window_start[w + 1])
                if we <= ws:
                    continue
                out.append(_Window(b, s, w, int(j_of[b][ws // bp.mb]), int(j_of[b][(we - 1) // bp.mb])))
    return sorted(out, key=lambda x: (x.first, x.bucket, x.slot, x.w))


class StageStream:
    """This rank's micro-batches for one curriculum stage, epoch after epoch, from a saved position.

    Yields ``grad_accum`` micro-batches per global batch (slots ``m * world + rank``); ``position`` names
    the next global batch once the last micro-batch of one has been handed out, so saving it after an
    optimizer step and passing it back on resume continues exactly - on any world size with the same
    ``grad_accum * world`` (prefetched, unconsumed batches are not counted).

    A background thread assembles micro-batches (``prefetch_factor`` ahead); ``num_workers`` threads fetch
    pieces, at most ``prefetch_shards`` ahead of the windows in use (0 workers: fetch in the consumer).
    """

    def __init__(self, url: str, resolution: int, rank: int, world: int, seed: int, stage: int,
                 cond: str, micro_batch: int | None = None, tokens_per_batch: int | None = None,
                 position: DataPosition | None = None, class_field: str = "extra.class_id",
                 max_text_len: int | None = None, vocab_size: int | None = None, num_workers: int = 4,
                 prefetch_factor: int = 2, last_batch: str = "wrap", index: DatasetIndex | None = None,
                 grad_accum: int = 1, window: int = 4, prefetch_shards: int = 4, piece_bytes: int | None = None,
                 cache_dir: str | None = None, cache_bytes: int = 0, storage: Storage | None = None):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world {world}")
        self.url, self.rank, self.world, self.seed, self.stage = url, rank, world, seed, stage
        self.resolution = int(resolution)
        self.grad_accum = grad_accum
        self.slots = world * grad_accum
        self.cond = cond
        self.micro_batch, self.tokens_per_batch, self.last_batch = micro_batch, tokens_per_batch, last_batch
        self.window, self.prefetch_shards, self.piece_bytes = window, prefetch_shards, piece_bytes
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.position = (position or DataPosition()).rescaled(self.slots)
        self.index = index or DatasetIndex(url, storage)
        self.shards = self.index.shards(resolution)
        cache = DiskCache(Path(cache_dir) / f"rank{rank}", cache_bytes) if cache_dir and cache_bytes else None
        self.reader = PieceReader(url, self.shards, resolution, cond, class_field, max_text_len, vocab_size,
                                  cache, storage=storage if storage is not None else self.index.storage)
        self._plans: dict[int, EpochPlan] = {}
        self.open_pieces = 0  # pieces fetched or in flight and not released (locality audit)
        self.max_open_pieces = 0
        self.open_log: list[tuple[int, int, int]] = []  # (epoch, batch, open) when audit is on
        self.audit = False

    def plan(self, epoch: int) -> EpochPlan:
        if epoch not in self._plans:
            self._plans = {e: p for e, p in self._plans.items() if e == epoch - 1}  # the one being finished
            self._plans[epoch] = (plan_epoch(self.shards, self.slots, self.seed, self.stage, epoch,
                                             self.micro_batch, self.tokens_per_batch, self.last_batch,
                                             self.window, self.piece_bytes))
            if not len(self._plans[epoch]):
                raise ValueError(f"{self.url}: no full global batch at resolution {self.resolution} "
                                 f"({sum(s.samples for s in self.shards)} samples, {self.slots} micro-batches "
                                 "per global batch, last_batch=drop)")
        return self._plans[epoch]

    def held_bound(self) -> tuple[int, int]:
        """(pieces, bytes) a rank holds at most while streaming.

        Every bucket has its own lanes, and the global batches interleave buckets, so each of this rank's
        lanes (buckets x grad_accum slots) keeps its window open; a micro-batch that straddles two windows
        of a lane holds both for one batch: ``lanes * 2 * window + prefetch_shards`` pieces, each at most
        ``piece_bytes`` (or its whole shard when smaller). Lower ``window``/``piece_bytes`` when datasets
        have many aspect buckets (17 at 256 px).
        """
        buckets = len({s.grid for s in self.shards})
        pieces = buckets * self.grad_accum * 2 * self.window + self.prefetch_shards
        biggest = max((s.bytes for s in self.shards), default=0)
        per = min(biggest, self.piece_bytes) if self.piece_bytes else biggest
        return pieces, pieces * per

    @property
    def steps_per_epoch(self) -> int:
        """Global batches (optimizer steps) per epoch."""
        return len(self.plan(self.position.epoch))

    def nominal_micro_batch(self) -> int:
        """The micro batch of the bucket with most samples (DeepSpeed's batch-size bookkeeping)."""
        counts: dict[tuple[int, int], int] = {}
        for s in self.shards:
            counts[s.grid] = counts.get(s.grid, 0) + s.samples
        grid = max(counts.items(), key=lambda kv: (kv[1], kv[0]))[0]
        return micro_batch_for(grid, self.micro_batch, self.tokens_per_batch)

    def global_batch(self, epoch: int, j: int) -> dict[str, Any]:
        """All slots of global batch ``j`` as one batch (read here, synchronously: sample grids, tests)."""
        plan = self.plan(epoch)
        samples = []
        for slot in range(plan.slots):
            samples += self._read_slot(plan, j, slot, {})
        b = plan.buckets[int(plan.order[j])]
        return {**collate(samples, b.grid, self.cond), "epoch": epoch, "batch": j}

    def _read_slot(self, plan: EpochPlan, j: int, slot: int, held: dict) -> list[dict[str, Any]]:
        lane = plan.buckets[int(plan.order[j])].lanes[slot]
        out = []
        for pj, shard, row in plan.slot_samples(j, slot):
            piece = lane.pieces[pj]
            got = held.get(piece)
            if got is None:
                got = held[piece] = self.reader.fetch(piece)
            elif isinstance(got, cf.Future):
                got = held[piece] = got.result()
            out.append(self.reader.decode(shard, row, got, piece))
        return out

    def _epoch_batches(self, epoch: int, start: int, pool: cf.ThreadPoolExecutor | None,
                       stop: threading.Event) -> Iterator[dict[str, Any]]:
        """This rank's micro-batches of ``epoch`` from global batch ``start``, fetching ahead."""
        plan = self.plan(epoch)
        my_slots = [m * self.world + self.rank for m in range(self.grad_accum)]
        windows = [w for w in _rank_windows(plan, my_slots) if w.last >= start]
        held: dict[Piece, Any] = {}  # piece -> Future or fetched tuple
        owners: dict[Piece, int] = {}  # piece -> windows holding it
        nxt = 0  # next window to open

        def pieces_of(win: _Window) -> list[Piece]:
            lane = plan.buckets[win.bucket].lanes[win.slot]
            return [lane.pieces[i] for i in lane.window_pieces(win.w)]

        def open_window(win: _Window) -> None:
            for p in pieces_of(win):
                owners[p] = owners.get(p, 0) + 1
                if p not in held:
                    held[p] = pool.submit(self.reader.fetch, p) if pool is not None else self.reader.fetch(p)
            self.open_pieces = len(held)
            self.max_open_pieces = max(self.max_open_pieces, self.open_pieces)

        def close_window(win: _Window) -> None:
            for p in pieces_of(win):
                owners[p] -= 1
                if not owners[p]:
                    del owners[p]
                    held.pop(p, None)
            self.open_pieces = len(held)

        active: list[_Window] = []
        for j in range(start, len(plan)):
            if stop.is_set():
                return
            # open what batch j needs, then prefetch whole windows while at most prefetch_shards
            # pieces are held only for later batches
            now = {p for win in active if win.first <= j for p in pieces_of(win)}
            ahead = {p for win in active if win.first > j for p in pieces_of(win)} - now
            while nxt < len(windows):
                win = windows[nxt]
                if win.first > j:
                    new = {p for p in pieces_of(win) if p not in now}
                    if pool is None or len(ahead | new) > self.prefetch_shards:
                        break
                    ahead |= new
                else:
                    now.update(pieces_of(win))
                open_window(win)
                active.append(win)
                nxt += 1
            if self.audit:
                self.open_log.append((epoch, j, len(held)))
            b = plan.buckets[int(plan.order[j])]
            last = j == len(plan) - 1
            for m, slot in enumerate(my_slots):
                samples = self._read_slot(plan, j, slot, held)
                yield {**collate(samples, b.grid, self.cond), "epoch": epoch, "batch": j, "micro": m, "slot": slot,
                       "last_of_epoch": last}
            for win in [w for w in active if w.last <= j]:
                close_window(win)
                active.remove(win)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        stop = threading.Event()
        pool = cf.ThreadPoolExecutor(self.num_workers, thread_name_prefix="shard-fetch") if self.num_workers else None
        th: threading.Thread | None = None

        def produce() -> Iterator[dict[str, Any]]:
            epoch, start = self.position.epoch, self.position.batch
            # stop is checked here too: a closed iterator must end its thread, not plan epochs forever
            while not stop.is_set():
                if start < len(self.plan(epoch)):
                    yield from self._epoch_batches(epoch, start, pool, stop)
                epoch, start = epoch + 1, 0

        try:
            if not self.num_workers:
                for batch in produce():
                    self._advance(batch)
                    yield batch
                return
            q: queue.Queue = queue.Queue(maxsize=max(1, self.prefetch_factor))
            done = object()

            def run() -> None:
                try:
                    for batch in produce():
                        hand_over(batch)
                        if stop.is_set():
                            return
                except BaseException as e:  # noqa: BLE001 - handed to the consumer
                    hand_over(e)
                hand_over(done)

            def hand_over(item: Any) -> None:  # gives up once the consumer has gone
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.2)
                        return
                    except queue.Full:
                        continue

            th = threading.Thread(target=run, name="batch-assembly", daemon=True)
            th.start()
            while True:
                item = q.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                self._advance(item)
                yield item
        finally:
            stop.set()
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
            if th is not None:  # it sees stop within one put timeout (or one piece fetch)
                th.join(timeout=5.0)

    def _advance(self, batch: dict[str, Any]) -> None:
        if batch["micro"] == self.grad_accum - 1:
            self.position = (DataPosition(batch["epoch"] + 1, 0, self.slots) if batch["last_of_epoch"]
                             else DataPosition(batch["epoch"], batch["batch"] + 1, self.slots))


__all__ = ["COND_MODES", "DataPosition", "DatasetIndex", "DiskCache", "EpochPlan", "Piece", "PieceReader",
           "ShardRef", "StageStream", "collate", "micro_batch_for", "plan_epoch"]
