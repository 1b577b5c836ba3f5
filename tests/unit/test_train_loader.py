"""The training reader: deterministic bucketed schedule, rank slices, exact resume, content, errors."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest

from sar_scale.data import schema
from sar_scale.data.loader import (
    BatchReader,
    DataPosition,
    ShardIndex,
    StageStream,
    build_schedule,
    micro_batch_for,
)
from sar_scale.training.debug_data import write_debug_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    write_debug_shards(root, num_samples=37, resolutions=(64, 128), samples_per_shard=10, text_dim=8, seed=3)
    return str(root)


def test_schedule_buckets_determinism_and_coverage(shards):
    table = ShardIndex(shards).table(64)
    assert len(table) == 37 and len(table.buckets()) >= 2  # several aspect-ratio buckets
    world, mb = 2, 3
    s0 = build_schedule(table.grid, world, seed=1, stage=0, epoch=0, micro_batch=mb)
    assert [b.tolist() for b in s0] == [b.tolist() for b in
                                        build_schedule(table.grid, world, 1, 0, 0, micro_batch=mb)]
    s1 = build_schedule(table.grid, world, seed=1, stage=0, epoch=1, micro_batch=mb)
    assert [b.tolist() for b in s0] != [b.tolist() for b in s1]  # reshuffled per epoch
    seen = np.concatenate(s0)
    assert set(seen.tolist()) == set(range(37))  # wrap: every sample at least once per epoch
    for b in s0:
        assert len(b) == mb * world
        assert len({tuple(table.grid[i]) for i in b}) == 1  # one bucket per global batch
    dropped = build_schedule(table.grid, world, 1, 0, 0, micro_batch=mb, last_batch="drop")
    ids = np.concatenate(dropped)
    assert len(ids) == len(set(ids.tolist())) < 37  # no repeats, partial batches dropped


def test_tokens_per_batch_scales_micro_batch(shards):
    table = ShardIndex(shards).table(128)
    sched = build_schedule(table.grid, 1, 0, 0, 0, tokens_per_batch=200)
    for b in sched:
        h, w = table.grid[b[0]]
        assert len(b) == max(1, 200 // (h * w))
    assert micro_batch_for((8, 8), None, 200) == 3 and micro_batch_for((8, 8), 5, None) == 5


def test_rank_slices_partition_the_global_batch(shards):
    index = ShardIndex(shards)
    table = index.table(64)
    sched = build_schedule(table.grid, 2, 0, 0, 0, micro_batch=2)
    r0 = BatchReader(shards, table, sched, 0, 2, "class")[0]
    r1 = BatchReader(shards, table, sched, 1, 2, "class")[0]
    assert r0["grid"] == r1["grid"] and r0["tokens"].shape == (2, r0["grid"][0] * r0["grid"][1])
    assert r0["keys"] + r1["keys"] == [table.keys[i] for i in sched[0]]


def test_batch_content_matches_the_tar(shards):
    index = ShardIndex(shards)
    table = index.table(128)
    sched = build_schedule(table.grid, 1, 0, 0, 0, micro_batch=4)
    feats = BatchReader(shards, table, sched, 0, 1, "text_features")[0]
    cls = BatchReader(shards, table, sched, 0, 1, "class")[0]
    truth = {}
    for tar in index.tar_keys:
        with tarfile.open(fileobj=io.BytesIO(index.storage.get_bytes(tar))) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                truth.setdefault(key, {})[ext] = tf.extractfile(m).read()
    for j, key in enumerate(cls["keys"]):
        tok = schema.decode_npy(truth[key]["tokens_128.npy"])
        assert cls["tokens"][j].tolist() == tok.reshape(-1).tolist()
        assert cls["class_ids"][j] == json.loads(truth[key]["json"])["extra"]["class_id"]
        assert cls["captions"][j] == truth[key]["txt"].decode()
        text = schema.decode_npy(truth[key]["text.npy"]).astype(np.float32)
        n = text.shape[0]
        assert feats["text_mask"][j].sum() == n and not feats["text_mask"][j, n:].any()
        np.testing.assert_array_equal(feats["text"][j, :n].numpy(), text)


def _take(stream, n):
    it = iter(stream)
    out = [next(it)["keys"] for _ in range(n)]
    it.close()
    return out


@pytest.mark.parametrize("workers", [0, 1])
def test_stream_resume_continues_exactly_across_epochs(shards, workers):
    kw = dict(url=shards, resolution=64, rank=1, world=2, seed=7, stage=1, cond="class", micro_batch=2)
    full = StageStream(**kw, num_workers=0)
    per_epoch = full.steps_per_epoch
    n = per_epoch + 5  # crosses an epoch boundary
    reference = _take(full, n)
    first = StageStream(**kw, num_workers=workers)
    head = _take(first, 4)
    pos = first.position
    assert pos == DataPosition(0, 4, 2)  # 4 global batches of 2 slots (world 2 x grad_accum 1)
    resumed = StageStream(**kw, num_workers=workers, position=pos, index=first.index)
    assert head + _take(resumed, n - 4) == reference
    assert resumed.position.epoch == 1  # second epoch reached


def test_global_batches_do_not_depend_on_the_world_size(shards):
    """2 ranks x 2 micro-batches and 1 rank x 4 read the same samples in the same global slots, and a
    position saved by one continues on the other."""
    kw = dict(url=shards, resolution=64, seed=5, stage=0, cond="class", micro_batch=2, num_workers=0)

    def slots_of(streams, n_batches):
        out = {}
        its = [iter(s) for s in streams]
        for _ in range(n_batches * streams[0].grad_accum):
            for it in its:
                b = next(it)
                out[(b["epoch"], b["batch"], b["slot"])] = b["keys"]
        return out

    two = [StageStream(**kw, rank=r, world=2, grad_accum=2) for r in range(2)]
    one = [StageStream(**kw, rank=0, world=1, grad_accum=4)]
    a, b = slots_of(two, 3), slots_of(one, 3)
    assert a == b and len(a) == 12
    assert two[0].position == one[0].position == DataPosition(0, 3, 4)
    # 2 -> 1 rank mid-epoch: the single rank continues with global batch 3
    resumed = StageStream(**kw, rank=0, world=1, grad_accum=4, position=two[0].position)
    cont = slots_of([resumed], 2)
    full = slots_of([StageStream(**kw, rank=0, world=1, grad_accum=4)], 5)
    assert cont == {k: v for k, v in full.items() if k[1] >= 3}
    # a changed global batch re-counts the position (about the same samples consumed)
    assert DataPosition(0, 3, 4).rescaled(2) == DataPosition(0, 6, 2)
    assert DataPosition(0, 3, 4).rescaled(8) == DataPosition(0, 1, 8)


def test_clear_errors_for_bad_data(shards, tmp_path):
    with pytest.raises(schema.SchemaError, match=r"tokens_256\.npy.*resolutions in the manifest: \[64, 128\]"):
        ShardIndex(shards).table(256)
    index = ShardIndex(shards)
    table = index.table(64)
    sched = build_schedule(table.grid, 1, 0, 0, 0, micro_batch=2)
    with pytest.raises(schema.SchemaError, match=r"debug-0000\d\d\.tar#.*token ids outside \[0, 4\)"):
        BatchReader(shards, table, sched, 0, 1, "class", vocab_size=4)[0]
    with pytest.raises(schema.SchemaError, match="data.class_field"):
        BatchReader(shards, table, sched, 0, 1, "class", class_field="extra.nope")[0]
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        ShardIndex(str(tmp_path))
    # a stats.json that disagrees with the manifest is named
    store = index.storage
    man = json.loads(store.get_bytes("manifest.json"))
    man["shards"][0]["samples"] += 1
    bad = tmp_path / "bad"
    for k in store.list():
        (bad / k).parent.mkdir(parents=True, exist_ok=True)
        (bad / k).write_bytes(store.get_bytes(k))
    (bad / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(schema.SchemaError, match="debug-000000.stats.json.*manifest.json says"):
        ShardIndex(str(bad))
