"""The training reader on shard format v2: manifest-only start-up, the pure epoch plan (buckets, lanes,
windows, world-independent global batches), piece streaming with a bounded number of open pieces,
exact resume, content, disk cache, errors."""

from __future__ import annotations

import io
import json
import tarfile
import threading

import numpy as np
import pytest

from sar_scale.data import schema
from sar_scale.data.loader import DataPosition, DatasetIndex, StageStream, micro_batch_for, plan_epoch
from sar_scale.data.shards import commit_shard
from sar_scale.data.storage import LocalStorage
from sar_scale.training.debug_data import write_debug_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    write_debug_shards(root, num_samples=37, resolutions=(64, 128), samples_per_shard=6, text_dim=8, seed=3)
    return str(root)


def one_bucket(root, n_shards: int, per_shard: int, grid=(4, 4), res: int = 64) -> str:
    """A dataset of one aspect bucket: ``n_shards`` shards of ``per_shard`` samples."""
    st = LocalStorage(root)
    entries = []
    for i in range(n_shards):
        samples = sorted((schema.make_sample(f"s/{i}/{j}", f"c {i} {j}", {res: np.full(grid, j % 7, np.int32)},
                                             (64, 64), extra={"class_id": j % 3}) for j in range(per_shard)),
                         key=lambda s: s["__key__"])
        entries.append(schema.shard_entry(commit_shard(st, "b", i, samples, {res: grid})))
    schema.write_dataset_manifest(st, schema.make_dataset_manifest(entries, [res], False, "t", {}, []))
    return str(root)


def _take(stream, n):
    it = iter(stream)
    out = [next(it) for _ in range(n)]
    it.close()
    return out


def test_startup_reads_the_manifest_only(shards):
    calls = []

    class Counting(LocalStorage):
        def get_bytes(self, key):
            calls.append(key)
            return super().get_bytes(key)

        def get_range(self, key, offset, length):
            calls.append(key)
            return super().get_range(key, offset, length)

    s = StageStream(shards, 64, 0, 1, seed=0, stage=0, cond="class", micro_batch=2, storage=Counting(shards))
    assert s.steps_per_epoch > 0 and calls == ["manifest.json"]


def test_plan_buckets_determinism_and_coverage(shards):
    refs = DatasetIndex(shards).shards(64)
    assert len({r.grid for r in refs}) >= 2  # several aspect buckets, one grid per shard
    total = sum(r.samples for r in refs)
    plan = plan_epoch(refs, slots=4, seed=1, stage=0, epoch=0, micro_batch=3)

    def ids(p):
        return [[(sh, row) for s in range(p.slots) for _, sh, row in p.slot_samples(j, s)] for j in range(len(p))]

    again = plan_epoch(refs, 4, 1, 0, 0, micro_batch=3)
    assert ids(plan) == ids(again)
    assert ids(plan) != ids(plan_epoch(refs, 4, 1, 0, 1, micro_batch=3))  # reshuffled per epoch
    seen = [x for batch in ids(plan) for x in batch]
    assert set(seen) == {(i, r) for i, ref in enumerate(refs) for r in range(ref.samples)}  # wrap: all seen
    for j, batch in enumerate(ids(plan)):
        assert len(batch) == 3 * 4 and len({refs[sh].grid for sh, _ in batch}) == 1  # one bucket per batch
    dropped = [x for batch in ids(plan_epoch(refs, 4, 1, 0, 0, micro_batch=3, last_batch="drop")) for x in batch]
    assert len(dropped) == len(set(dropped)) < total  # no repeats, partial batches dropped


def test_piece_bytes_bounds_what_one_request_reads_and_a_rank_holds(tmp_path):
    """Shards bigger than ``piece_bytes`` are read in row ranges of about that size (a 900M-shape shard
    is ~5 GB): same samples per epoch, every piece within its bound, pieces aligned so lanes share them."""
    url = one_bucket(tmp_path, n_shards=3, per_shard=40)
    refs = DatasetIndex(url).shards(64)
    assert all(r.bytes > 0 for r in refs)
    bound = refs[0].bytes // 7  # ~7 pieces per shard
    whole = plan_epoch(refs, slots=2, seed=3, stage=0, epoch=0, micro_batch=4)
    split = plan_epoch(refs, slots=2, seed=3, stage=0, epoch=0, micro_batch=4, piece_bytes=bound)
    assert plan_epoch(refs, 2, 3, 0, 0, micro_batch=4, piece_bytes=refs[0].bytes * 2).buckets[0].lanes[0].pieces == \
        whole.buckets[0].lanes[0].pieces  # shards within the bound: whole-shard pieces, as before

    def samples(p):
        return sorted((sh, row) for j in range(len(p)) for s in range(p.slots) for _, sh, row in p.slot_samples(j, s))

    assert samples(split) == samples(whole)
    cap = refs[0].rows_per_piece(bound)
    assert 1 <= cap < 40
    pieces = [p for lane in split.buckets[0].lanes for p in lane.pieces]
    assert max(len(p) for p in pieces) <= cap and all(p.lo // cap == (p.hi - 1) // cap for p in pieces)
    assert len(pieces) > 2 * len(whole.buckets[0].lanes[0].pieces)
    # the stream reads them: one ranged GET per piece, at most W + P of them held
    st = StageStream(url, 64, 0, 1, seed=3, stage=0, cond="class", micro_batch=4, window=2, prefetch_shards=1,
                     piece_bytes=bound, num_workers=2)
    keys = [k for b in _take(st, st.steps_per_epoch) for k in b["keys"]]
    assert len(set(keys)) == 120 and st.max_open_pieces <= 2 + 1 + 1  # + the window being closed


def test_tokens_per_batch_scales_micro_batch(shards):
    refs = DatasetIndex(shards).shards(128)
    plan = plan_epoch(refs, 1, 0, 0, 0, tokens_per_batch=200)
    for j in range(len(plan)):
        b = plan.buckets[int(plan.order[j])]
        assert len(plan.slot_samples(j, 0)) == b.mb == max(1, 200 // (b.grid[0] * b.grid[1]))
    assert micro_batch_for((8, 8), None, 200) == 3 and micro_batch_for((8, 8), 5, None) == 5


def test_global_batches_do_not_depend_on_the_world_size(shards):
    """2 ranks x 2 micro-batches and 1 rank x 4 read the same samples in the same global slots, on the same
    bucket at every step; a position saved by one continues on the other."""
    kw = dict(url=shards, resolution=64, seed=5, stage=0, cond="class", micro_batch=2, num_workers=0)

    def slots_of(streams, n_batches):
        out, grids = {}, {}
        its = [iter(s) for s in streams]
        for _ in range(n_batches * streams[0].grad_accum):
            for it in its:
                b = next(it)
                out[(b["epoch"], b["batch"], b["slot"])] = b["keys"]
                grids.setdefault(b["batch"], set()).add(b["grid"])
        assert all(len(g) == 1 for g in grids.values())  # rank-synchronized buckets
        return out

    two = [StageStream(**kw, rank=r, world=2, grad_accum=2) for r in range(2)]
    one = [StageStream(**kw, rank=0, world=1, grad_accum=4)]
    a, b = slots_of(two, 3), slots_of(one, 3)
    assert a == b and len(a) == 12
    assert two[0].position == one[0].position == DataPosition(0, 3, 4)
    resumed = StageStream(**kw, rank=0, world=1, grad_accum=4, position=two[0].position)
    cont = slots_of([resumed], 2)
    full = slots_of([StageStream(**kw, rank=0, world=1, grad_accum=4)], 5)
    assert cont == {k: v for k, v in full.items() if k[1] >= 3}
    assert DataPosition(0, 3, 4).rescaled(2) == DataPosition(0, 6, 2)
    assert DataPosition(0, 3, 4).rescaled(8) == DataPosition(0, 1, 8)


def test_batch_content_matches_the_tar(shards):
    kw = dict(url=shards, resolution=128, rank=0, world=1, seed=0, stage=0, micro_batch=4, num_workers=0)
    feats = _take(StageStream(**kw, cond="text_features"), 3)
    cls = _take(StageStream(**kw, cond="class"), 3)
    st = LocalStorage(shards)
    truth = {}
    for key in st.list():
        if key.endswith(".tar"):
            with tarfile.open(fileobj=io.BytesIO(st.get_bytes(key))) as tf:
                for m in tf.getmembers():
                    k, ext = m.name.split(".", 1)
                    truth.setdefault(k, {})[ext] = tf.extractfile(m).read()
    for fb, cb in zip(feats, cls):
        assert fb["keys"] == cb["keys"]
        for j, key in enumerate(cb["keys"]):
            tok = schema.decode_npy(truth[key]["tokens_128.npy"])
            assert cb["grid"] == tok.shape and cb["tokens"][j].tolist() == tok.reshape(-1).tolist()
            assert cb["class_ids"][j] == json.loads(truth[key]["json"])["extra"]["class_id"]
            assert cb["captions"][j] == truth[key]["txt"].decode()
            text = schema.decode_npy(truth[key]["text.npy"]).astype(np.float32)
            n = text.shape[0]
            assert fb["text_mask"][j].sum() == n and not fb["text_mask"][j, n:].any()
            np.testing.assert_array_equal(fb["text"][j, :n].numpy(), text)


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_resume_continues_exactly_across_epochs(shards, workers):
    kw = dict(url=shards, resolution=64, rank=1, world=2, seed=7, stage=1, cond="class", micro_batch=2)
    full = StageStream(**kw, num_workers=0)
    n = full.steps_per_epoch + 5  # crosses an epoch boundary
    reference = [b["keys"] for b in _take(full, n)]
    first = StageStream(**kw, num_workers=workers)
    head = [b["keys"] for b in _take(first, 4)]
    assert first.position == DataPosition(0, 4, 2)
    resumed = StageStream(**kw, num_workers=workers, position=first.position)
    got = [b["keys"] for b in _take(resumed, n - 4)]
    assert head + got == reference
    assert resumed.position.epoch == 1


def test_closing_the_stream_ends_its_threads(shards, monkeypatch):
    """A consumer that stops early (end of a stage, an error, a test) must not leave the assembly
    thread planning epochs in the background: it would hold a core for the life of the process."""
    before = {t.ident for t in threading.enumerate()}
    for _ in range(3):
        _take(StageStream(shards, 64, 0, 1, 0, 0, "class", micro_batch=2, num_workers=2), 2)
    # the race: the consumer closes after the thread handed a batch over and resumed the epoch, so
    # the epoch's own stop check ends it without a yield; the epoch loop must then stop as well
    orig = StageStream._epoch_batches

    def closed_mid_epoch(self, epoch, start, pool, stop):
        for b in orig(self, epoch, start, pool, stop):
            yield b
            stop.wait(10)
            if stop.is_set():
                return

    monkeypatch.setattr(StageStream, "_epoch_batches", closed_mid_epoch)
    _take(StageStream(shards, 64, 0, 1, 0, 0, "class", micro_batch=2, num_workers=1), 1)
    left = [t for t in threading.enumerate() if t.ident not in before and t.is_alive()
            and t.name.startswith(("batch-assembly", "shard-fetch"))]
    for t in left:
        t.join(timeout=5)
    assert not [t.name for t in left if t.is_alive()]


@pytest.mark.parametrize("window, prefetch", [(1, 1), (2, 2), (3, 6)])
def test_open_pieces_stay_within_window_plus_prefetch(tmp_path, window, prefetch):
    """Locality: with a window of W shards and P prefetched, a rank never holds more than W + P pieces
    (one lane per rank here; shards and lanes hold whole micro-batches, so no batch straddles windows)."""
    url = one_bucket(tmp_path, n_shards=24, per_shard=4)
    for rank in (0, 1):
        s = StageStream(url, 64, rank, 2, seed=0, stage=0, cond="class", micro_batch=2, window=window,
                        prefetch_shards=prefetch, num_workers=2)
        s.audit = True
        batches = _take(s, s.steps_per_epoch)
        assert len({k for b in batches for k in b["keys"]}) == 24 * 4 // 2  # half the dataset per rank
        opened = [o for _, _, o in s.open_log]
        assert max(opened) <= window + prefetch and min(opened) >= 1, opened
        if prefetch >= window:
            assert max(opened) > window  # it does read ahead
        # one GET per shard + one for its index.npy (plus the read-ahead into the next epoch)
        assert 24 <= s.reader.requests <= 24 + 2 * (window + prefetch)


@pytest.mark.parametrize("ga, window, prefetch", [(1, 1, 1), (2, 1, 2), (2, 2, 3)])
def test_open_pieces_stay_within_the_bound_with_several_buckets_and_slots(tmp_path, ga, window, prefetch):
    """Locality with many lanes: 3 aspect buckets interleaved in the global batches, grad_accum slots per
    rank, shard sizes that do not divide the micro batch (batches straddle windows): what a rank holds
    never exceeds ``held_bound()`` (lanes x 2W + P), and every sample is read exactly once per epoch."""
    st = LocalStorage(tmp_path)
    entries = []
    grids = [(4, 4), (2, 8), (8, 2)]
    for i in range(21):
        g = grids[i % 3]
        samples = sorted((schema.make_sample(f"s/{i}/{j}", "c", {64: np.full(g, j % 7, np.int32)}, (64, 64),
                                             extra={"class_id": 0}) for j in range(5)), key=lambda s: s["__key__"])
        entries.append(schema.shard_entry(commit_shard(st, "b", i, samples, {64: g})))
    schema.write_dataset_manifest(st, schema.make_dataset_manifest(entries, [64], False, "t", {}, []))
    seen = []
    for rank in (0, 1):
        s = StageStream(str(tmp_path), 64, rank, 2, seed=0, stage=0, cond="class", micro_batch=2, window=window,
                        prefetch_shards=prefetch, num_workers=2, grad_accum=ga, last_batch="drop")
        s.audit = True
        seen += [k for b in _take(s, s.steps_per_epoch * ga) for k in b["keys"]]
        pieces, nbytes = s.held_bound()
        assert pieces == 3 * ga * 2 * window + prefetch and nbytes == pieces * max(e["bytes"] for e in entries)
        opened = [o for _, _, o in s.open_log]
        assert max(opened) <= pieces, (max(opened), pieces)
    assert len(seen) == len(set(seen))  # nothing read twice across ranks and slots in the epoch


def test_no_rank_starves_when_a_bucket_has_fewer_shards_than_ranks(tmp_path):
    url = one_bucket(tmp_path, n_shards=1, per_shard=5)
    world = 4
    out: dict[int, list] = {}

    def rank(r):
        s = StageStream(url, 64, r, world, seed=0, stage=0, cond="class", micro_batch=2, num_workers=1)
        out[r] = [b["keys"] for b in _take(s, 3)]  # 3 global batches: wraps around the 5 samples

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(out) == list(range(world)) and all(len(b) == 3 and all(len(k) == 2 for k in b)
                                                     for b in out.values())
    first = sorted(k for r in range(world) for k in out[r][0])
    assert set(first) == {k for r in range(world) for k in out[r][0]} and len(set(first)) == 5  # all 5 seen


def test_disk_cache_serves_repeat_reads_within_its_bound(tmp_path):
    url = one_bucket(tmp_path / "d", n_shards=6, per_shard=4)
    kw = dict(url=url, resolution=64, rank=0, world=1, seed=0, stage=0, cond="class", micro_batch=2,
              cache_dir=str(tmp_path / "cache"), num_workers=0)
    a = StageStream(**kw, cache_bytes=1 << 30)
    first = [b["keys"] for b in _take(a, a.steps_per_epoch)]
    b = StageStream(**kw, cache_bytes=1 << 30)
    assert [x["keys"] for x in _take(b, b.steps_per_epoch)] == first
    assert b.reader.requests == 6  # the index files only: every piece came from the cache
    piece = max(f.stat().st_size for f in (tmp_path / "cache" / "rank0").iterdir())
    small = StageStream(**kw, cache_bytes=2 * piece)  # room for 2 of the 6 shards
    assert [x["keys"] for x in _take(small, small.steps_per_epoch)] == first
    sizes = [f.stat().st_size for f in (tmp_path / "cache" / "rank0").iterdir()]
    assert 0 < sum(sizes) <= 2 * piece


def test_clear_errors_for_bad_data(shards, tmp_path):
    with pytest.raises(schema.SchemaError, match=r"resolution 256 .*resolutions in the manifest: \[64, 128\]"):
        StageStream(shards, 256, 0, 1, 0, 0, "class", micro_batch=2)
    with pytest.raises(schema.SchemaError, match=r"debug-0000\d\d\.tar#.*token ids outside \[0, 4\)"):
        _take(StageStream(shards, 64, 0, 1, 0, 0, "class", micro_batch=2, vocab_size=4, num_workers=0), 1)
    with pytest.raises(schema.SchemaError, match="data.class_field"):
        _take(StageStream(shards, 64, 0, 1, 0, 0, "class", micro_batch=2, class_field="extra.nope",
                          num_workers=2), 1)
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        DatasetIndex(str(tmp_path))
    # v1 data: told to re-run the data command
    old = tmp_path / "v1"
    old.mkdir()
    (old / "manifest.json").write_text(json.dumps({"schema_version": 1, "shards": []}))
    with pytest.raises(schema.SchemaError, match="re-run"):
        DatasetIndex(str(old))
    # an index.npy that does not match its tar is named
    bad = tmp_path / "bad"
    st = LocalStorage(shards)
    for k in st.list():
        (bad / k).parent.mkdir(parents=True, exist_ok=True)
        (bad / k).write_bytes(st.get_bytes(k))
    idx_key = sorted(k for k in st.list() if k.endswith(".index.npy"))[0]
    idx = schema.decode_npy((bad / idx_key).read_bytes()).copy()
    idx["key"][0] = b"0" * 20
    (bad / idx_key).write_bytes(schema.encode_npy(np.sort(idx, order="key")))
    with pytest.raises(schema.SchemaError, match="index.npy does not match the tar|keys are not"):
        s = StageStream(str(bad), 64, 0, 1, 0, 0, "class", micro_batch=1, num_workers=0, window=100)
        _take(s, s.steps_per_epoch)


def test_tar_members_are_sliced_without_copies_and_extended_headers_fall_back_to_tarfile():
    from sar_scale.data.loader import _tar_members

    def tar_of(members: dict[str, bytes], fmt=tarfile.USTAR_FORMAT) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
            for name, data in members.items():
                ti = tarfile.TarInfo(name)
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
        return buf.getvalue()

    members = {"k1.txt": b"a caption", "k1.text.npy": schema.encode_npy(np.ones((3, 5), np.float16)),
               "k1.json": b"{}", "k1.empty": b""}
    got = _tar_members(memoryview(tar_of(members)), "x")
    assert [(n, bytes(p)) for n, p in got] == list(members.items())
    assert all(isinstance(p, memoryview) for _, p in got)  # views into the fetched piece, no copies
    assert schema.decode_npy(got[1][1]).dtype == np.float16
    # a pax header (long name) is read through tarfile's own reader, with the same result
    long = {("d" * 120) + "/k2.txt": b"long", "k2.json": b"[]"}
    assert [(n, bytes(p)) for n, p in _tar_members(memoryview(tar_of(long, tarfile.PAX_FORMAT)), "x")] == \
        list(long.items())
    # a range cut inside a member, or garbage, is a clear SchemaError naming the place
    data = tar_of(members)
    with pytest.raises(schema.SchemaError, match=r"x: member 'k1.text.npy' runs past"):
        _tar_members(memoryview(data[:1024 + 512 + 100]), "x")
    with pytest.raises(schema.SchemaError, match=r"x: the sample's byte range ends inside a tar header"):
        _tar_members(memoryview(data[:1024 + 300]), "x")
    with pytest.raises(schema.SchemaError, match="x: bad tar header"):
        _tar_members(memoryview(b"\x01" * 1024), "x")


def test_text_features_reach_the_batch_in_their_stored_dtype(tmp_path):
    """fp16 features stay fp16 on the host (the model's dtype is applied on the device): same values."""
    from sar_scale.data.loader import collate

    a = {"key": "a", "tokens": np.zeros(4, np.int32), "caption": "", "text": np.ones((2, 3), np.float16)}
    b = {"key": "b", "tokens": np.zeros(4, np.int32), "caption": "", "text": np.full((1, 3), 0.5, np.float16)}
    batch = collate([a, b], (2, 2), "text_features")
    assert batch["text"].dtype == torch_dtype("float16") and batch["text"].shape == (2, 2, 3)
    assert batch["text_mask"].tolist() == [[True, True], [True, False]]
    assert batch["text"][1, 0, 0].item() == 0.5 and batch["text"][1, 1].abs().sum().item() == 0


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)
