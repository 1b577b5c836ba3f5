"""Shard format v2: the commit function (tar -> index.npy -> hashes.npy -> stats.json last), the
compact index's byte ranges, validation of stats/index/manifest, and v1 data refused clearly."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import numpy as np
import pytest
import webdataset as wds

from sar_scale.data import schema as S
from sar_scale.data.shards import commit_shard, hashes_array, uncommit_shard
from sar_scale.data.storage import LocalStorage

GRIDS = {32: (2, 3), 64: (4, 6)}


def _samples(n: int, grids=GRIDS, seed: int = 0, prefix: str = "src") -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        toks = {r: rng.integers(0, 1024, size=hw).astype(np.int32) for r, hw in grids.items()}
        out.append(S.make_sample(f"{prefix}/{i}.jpg", f"caption {i}", toks, (60, 40),
                                 text_features=rng.standard_normal((3 + i, 8)).astype(np.float16)))
    return sorted(out, key=lambda s: s["__key__"])


def _hashes(samples: list[dict]) -> np.ndarray:
    return hashes_array((s["__key__"], hashlib.sha256(s["txt"]).digest(), i * 7919) for i, s in enumerate(samples))


def test_commit_writes_tar_index_hashes_then_stats_and_ranges_are_exact(tmp_path):
    st = LocalStorage(tmp_path / "out")
    samples = _samples(5)
    stats = commit_shard(st, "d", 3, iter(samples), GRIDS, hashes=_hashes(samples), rejects={"too_small": 2},
                         run="r1", extra={"plan_hash": "abc"})
    assert st.list() == ["d-000003.hashes.npy", "d-000003.index.npy", "d-000003.stats.json", "d-000003.tar"]
    got = S.read_shard_stats(st, "d-000003.stats.json")
    assert got == stats and got["samples"] == 5 and got["grids"] == {"32": [2, 3], "64": [4, 6]}
    assert got["rejects"] == {"too_small": 2} and got["plan_hash"] == "abc" and got["run"] == "r1"
    assert got["bytes"] == st.size("d-000003.tar") and got["hashes"] == "d-000003.hashes.npy"
    idx = S.read_index(st, got["index"])
    assert [k.decode() for k in idx["key"]] == [s["__key__"] for s in samples]
    # each [start, end) is exactly one sample's members, parseable with tarfile in stream mode
    for row, s in zip(idx, samples):
        blob = st.get_range("d-000003.tar", int(row["start"]), int(row["end"] - row["start"]))
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r|") as tf:
            members = {ti.name: tf.extractfile(ti).read() for ti in tf}
        assert members == {f"{s['__key__']}.{k}": v for k, v in s.items() if k != "__key__"}
    # a run of consecutive samples is one range too
    blob = st.get_range("d-000003.tar", int(idx["start"][1]), int(idx["end"][3] - idx["start"][1]))
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r|") as tf:
        assert len({ti.name.split(".")[0] for ti in tf}) == 3
    h = S.read_hashes(st, got["hashes"])
    assert list(h["phash"]) == [i * 7919 for i in range(5)]
    # upstream webdataset reads the tar; rewriting the same shard gives the same bytes
    assert [x["__key__"] for x in wds.WebDataset(st.url("d-000003.tar"), shardshuffle=False)] == \
        [s["__key__"] for s in samples]
    before = {k: st.get_bytes(k) for k in st.list()}
    commit_shard(st, "d", 3, samples, GRIDS, hashes=_hashes(samples), rejects={"too_small": 2}, run="r1",
                 extra={"plan_hash": "abc"})
    assert {k: st.get_bytes(k) for k in st.list()} == before
    uncommit_shard(st, "d", 3)
    assert st.list() == []


def test_commit_refuses_bad_samples_before_uploading(tmp_path):
    st = LocalStorage(tmp_path / "out")
    samples = _samples(3)
    with pytest.raises(S.SchemaError, match="strictly increasing"):
        commit_shard(st, "d", 0, samples[::-1], GRIDS)
    other = _samples(1, grids={32: (3, 2), 64: (6, 4)}, prefix="other")
    with pytest.raises(S.SchemaError, match="one aspect bucket per shard"):
        commit_shard(st, "d", 0, sorted(samples + other, key=lambda s: s["__key__"]), GRIDS)
    with pytest.raises(S.SchemaError, match="hashes keys differ"):
        commit_shard(st, "d", 0, samples, GRIDS, hashes=_hashes(samples[::-1]))
    with pytest.raises(S.SchemaError, match="bad sample key"):
        commit_shard(st, "d", 0, [{**samples[0], "__key__": "a.b"}], GRIDS)
    assert st.list() == []  # nothing uploaded, no temp left
    assert not list(tmp_path.glob("**/*.tar"))


def test_empty_shard_and_no_hashes(tmp_path):
    st = LocalStorage(tmp_path)
    stats = commit_shard(st, "e", 0, [], {256: (16, 16)})
    assert stats["samples"] == 0 and stats["hashes"] is None
    assert len(S.read_index(st, "e-000000.index.npy")) == 0
    with tarfile.open(st.url("e-000000.tar")) as tf:
        assert tf.getmembers() == []


def test_read_index_validates_against_stats(tmp_path):
    st = LocalStorage(tmp_path)
    stats = commit_shard(st, "d", 0, _samples(3), GRIDS)
    good = S.read_index(st, "d-000000.index.npy")

    def bad(arr, match, **stats_over):
        st.put_bytes(S.encode_npy(arr), "d-000000.index.npy")
        with pytest.raises(S.SchemaError, match=match):
            S.read_index(st, "d-000000.index.npy", {**stats, **stats_over})

    bad(good[:2], "2 rows but stats 'samples' is 3")
    ov = good.copy()
    ov["start"][2] = ov["start"][1]
    bad(ov, "overlap")
    bad(good, "beyond the tar", bytes=int(good["end"][-1]) - 1)
    bad(good[[1, 0, 2]], "overlap|not strictly increasing")
    bad(np.zeros(3, dtype=[("key", "S20"), ("start", "<u4"), ("end", "<u4")]), "dtype")
    st.put_bytes(b"not npy", "d-000000.index.npy")
    with pytest.raises(S.SchemaError, match="not a valid .npy"):
        S.read_index(st, "d-000000.index.npy")


def test_v2_manifest_buckets_from_shard_grids_and_v1_refused(tmp_path):
    st = LocalStorage(tmp_path)
    a = commit_shard(st, "d", 0, _samples(3), GRIDS)
    b = commit_shard(st, "d", 1, _samples(2, grids={32: (3, 2), 64: (6, 4)}, seed=1), {32: (3, 2), 64: (6, 4)})
    man = S.make_dataset_manifest([S.shard_entry(a), S.shard_entry(b)], [32, 64], True, "cfg", {"x": "1"},
                                  runs=[{"run": "r1", "shards": [0, 1], "inputs": 7, "kept": 5,
                                         "rejects": "rejects.jsonl"}])
    assert man["samples"] == 5 and man["schema_version"] == S.SCHEMA_VERSION == 2
    assert man["buckets"] == {"32": {"2x3": 3, "3x2": 2}, "64": {"4x6": 3, "6x4": 2}}
    assert man["shards"][1] == {"tar": "d-000001.tar", "stats": "d-000001.stats.json",
                                "index": "d-000001.index.npy", "samples": 2, "bytes": b["bytes"],
                                "grids": {"32": [3, 2], "64": [6, 4]}}
    S.write_dataset_manifest(st, man)
    assert S.read_dataset_manifest(st) == man
    with pytest.raises(S.SchemaError, match="'samples' is 6 but the shards hold 5"):
        S.validate_dataset_manifest({**man, "samples": 6})
    # v1 files: a clear error that says what to do
    v1_stats = {"shard": "d-000000", "samples": 1, "rejects": {}, "bytes": 10, "index": [{"key": "k"}],
                "schema_version": 1}
    st.put_bytes(json.dumps(v1_stats).encode(), "old-000000.stats.json")
    with pytest.raises(S.SchemaError, match="format v1.*re-run `sar-scale data prepare`"):
        S.read_shard_stats(st, "old-000000.stats.json")
    v1_man = {k: v for k, v in man.items() if k != "runs"} | {"schema_version": 1}
    st.put_bytes(json.dumps(v1_man).encode(), S.MANIFEST)
    with pytest.raises(S.SchemaError, match="format v1"):
        S.read_dataset_manifest(st)
    st.put_bytes(json.dumps({**man, "schema_version": 3}).encode(), S.MANIFEST)
    with pytest.raises(S.SchemaError, match="schema_version 3 is not supported"):
        S.read_dataset_manifest(st)


def test_sidecar_names_parse():
    assert S.index_name("d", 7) == "d-000007.index.npy" and S.hashes_name("d", 7) == "d-000007.hashes.npy"
    assert S.parse_shard_name("p/d-000007.index.npy") == ("d", 7, "index.npy")
    assert S.parse_shard_name("d-000007.hashes.npy") == ("d", 7, "hashes.npy")
    assert S.INDEX_DTYPE.itemsize == 36 and S.HASHES_DTYPE.itemsize == 44

