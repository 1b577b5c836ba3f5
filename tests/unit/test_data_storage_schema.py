"""Local storage atomicity, shard schema helpers, tar index offsets, buckets."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from sar_scale.data import buckets as B
from sar_scale.data import schema as S
from sar_scale.data.storage import LocalStorage, StorageNotFound, open_storage


def test_local_storage_roundtrip_and_atomic(tmp_path):
    st = open_storage(tmp_path / "root")
    assert isinstance(st, LocalStorage)
    st.put_bytes(b"hello world", "a/b.bin")
    assert st.get_bytes("a/b.bin") == b"hello world"
    assert st.get_range("a/b.bin", 6, 5) == b"world"
    assert st.exists("a/b.bin") and not st.exists("a/c.bin") and st.size("a/b.bin") == 11
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 1000)
    st.put_file(src, "f.bin")
    assert st.get_file("f.bin", tmp_path / "dl.bin").read_bytes() == b"x" * 1000
    # a crashed writer's temp object is invisible to list() and removed by clean_temp()
    (tmp_path / "root" / "g.tar.tmp-dead").write_bytes(b"partial")
    assert st.list() == ["a/b.bin", "f.bin"]
    assert st.list("a/") == ["a/b.bin"]
    assert st.clean_temp() == 1
    st.delete("f.bin")
    st.delete("f.bin")  # idempotent
    assert not st.exists("f.bin")
    with pytest.raises(StorageNotFound, match="f.bin"):
        st.get_bytes("f.bin")
    with pytest.raises(ValueError, match="invalid storage key"):
        st.put_bytes(b"", "../escape")
    with pytest.raises(ValueError, match="unsupported storage URL"):
        open_storage("gs://bucket/x")


def test_local_iter_list_is_sorted_like_s3_and_delete_prefix(tmp_path):
    st = LocalStorage(tmp_path / "r")
    keys = ["b.txt", "a.k.jpg", "a.jpg", "a/x.png", "a/y/z.txt", "a-b.png", "a.txt", "ab/c"]
    for k in keys:
        st.put_bytes(b"x", k)
    (tmp_path / "r" / "a.jpg.tmp-1234").write_bytes(b"partial")
    assert list(st.iter_list()) == sorted(keys) == st.list()  # code point order, temp files hidden
    assert list(st.iter_list("a/")) == ["a/x.png", "a/y/z.txt"] and list(st.iter_list("a.")) == ["a.jpg", "a.k.jpg", "a.txt"]
    assert st.delete_prefix("a/") == 2 and not (tmp_path / "r" / "a").exists()  # no empty folders left
    with pytest.raises(ValueError, match="whole storage root"):
        st.delete_prefix("")


def test_local_put_failure_leaves_nothing(tmp_path):
    st = LocalStorage(tmp_path)
    with pytest.raises(FileNotFoundError):
        st.put_file(tmp_path / "missing", "x.tar")
    assert list(tmp_path.iterdir()) == []


def test_names_and_keys():
    assert S.tar_name("shapes", 3) == "shapes-000003.tar"
    assert S.stats_name("shapes", 3) == "shapes-000003.stats.json"
    assert S.parse_shard_name("p/shapes-000003.stats.json") == ("shapes", 3, "stats.json")
    assert S.parse_shard_name("manifest.json") is None
    assert S.brace_pattern("s", 4) == "s-{000000..000003}.tar"
    k = S.sample_key("dir/img.01.png")
    assert k == S.sample_key("dir/img.01.png") and k != S.sample_key("dir/img.02.png")
    assert len(k) == S.KEY_LEN and "." not in k
    assert S.tokens_member(256) == "tokens_256.npy"
    with pytest.raises(ValueError, match="shard name"):
        S.tar_name("bad/name", 0)


def _write_tar(path, n=3):
    with wds.TarWriter(str(path), mtime=0) as tw:
        for i in range(n):
            tok = np.arange(12, dtype=np.int32).reshape(3, 4) + i
            tw.write(S.make_sample(f"src/{i}.png", f"caption {i}", {64: tok, 128: np.zeros((6, 8), np.int64)},
                                   orig_size=(40, 30), scores={"a": 0.5},
                                   text_features=np.ones((2, 4), np.float32)))


def test_sample_tar_index_offsets_match_members(tmp_path):
    tar = tmp_path / "x-000000.tar"
    _write_tar(tar)
    index = S.build_index(tar)
    assert [e["key"] for e in index] == [S.sample_key(f"src/{i}.png") for i in range(3)]
    raw = tar.read_bytes()
    e = index[1]
    assert e["buckets"] == {"64": [3, 4], "128": [6, 8]}
    off, size = e["members"]["tokens_64.npy"]
    tok = S.decode_npy(raw[off: off + size])
    assert tok.dtype == np.int32 and tok.tolist() == (np.arange(12).reshape(3, 4) + 1).tolist()
    off, size = e["members"]["text.npy"]
    assert S.decode_npy(raw[off: off + size]).dtype == np.float16
    off, size = e["members"]["json"]
    meta = json.loads(raw[off: off + size])
    assert meta["source_id"] == "src/1.png" and meta["orig_size"] == [40, 30]
    # and the upstream reader sees the same samples
    got = list(wds.WebDataset(str(tar), shardshuffle=False))
    assert [g["__key__"] for g in got] == [e["key"] for e in index]
    assert got[2]["txt"] == b"caption 2"


def test_committed_shards_and_rejects_roundtrip(tmp_path):
    from sar_scale.data.shards import commit_shard

    st = LocalStorage(tmp_path)
    commit_shard(st, "s", 0, [], {64: (3, 4)})
    # shard 1 has a tar but no stats -> not committed; a stats without tar -> not committed
    (tmp_path / S.tar_name("s", 1)).write_bytes(b"")
    st.put_bytes(st.get_bytes(S.stats_name("s", 0)), S.stats_name("s", 2))
    assert S.committed_shards(st, "s") == [(S.tar_name("s", 0), S.stats_name("s", 0))]
    S.write_rejects(st, [{"source_id": "b", "reason": "x"}, {"source_id": "a", "reason": "y"}])
    assert [r["source_id"] for r in S.read_rejects(st)] == ["a", "b"]
    st.put_bytes(b"{nope", "manifest.json")
    with pytest.raises(S.SchemaError, match="invalid JSON"):
        S.read_dataset_manifest(st)


def test_buckets_constant_budget_and_consistent_across_resolutions():
    table = B.bucket_table([512, 256], downsample=16, max_ratio=4.0)
    for res, lst in table.items():
        g = res // 16
        for h, w in lst:
            assert h % 16 == 0 and w % 16 == 0
            ht, wt = h // 16, w // 16
            assert 0.75 * g * g <= ht * wt <= g * g
            assert max(ht / wt, wt / ht) <= 4.0
        assert (res, res) in lst
    # same index -> same aspect ratio, 512 grid is exactly 2x the 256 grid
    for (h1, w1), (h2, w2) in zip(table[256], table[512]):
        assert (h2, w2) == (2 * h1, 2 * w1)
    for w, h in [(500, 300), (300, 500), (1000, 990), (4000, 900), (100, 700)]:
        i = B.bucket_index(w, h, table[256])
        assert B.bucket_index(w, h, table[512]) == i
    small = B.bucket_list(64, downsample=8, max_ratio=2.0)
    assert small == [(80, 48), (72, 56), (64, 64), (56, 72), (48, 80)]
    assert B.nearest_bucket(300, 500, small) == (80, 48)  # 3:5 portrait
    assert B.nearest_bucket(500, 300, small) == (48, 80)
    assert B.nearest_bucket(64, 64, small) == (64, 64)
    # nearest by log ratio: the chosen bucket minimises |log ratio difference|
    w, h = 700, 333
    best = B.nearest_bucket(w, h, table[256])
    assert all(abs(math.log(best[0] / best[1]) - math.log(h / w)) <= abs(math.log(b[0] / b[1]) - math.log(h / w)) + 1e-12
               for b in table[256])
    with pytest.raises(ValueError, match="ref_res"):
        B.bucket_list(384, 16, ref_res=256)
    with pytest.raises(ValueError, match="downsample"):
        B.bucket_list(100, 16)


def test_resize_center_crop_keeps_center():
    img = Image.new("RGB", (300, 100), (255, 255, 255))
    img.paste((255, 0, 0), (140, 40, 160, 60))  # a red square in the center
    out = B.resize_center_crop(img, (64, 64))
    assert out.size == (64, 64)
    assert out.getpixel((32, 32))[0] > 200 and out.getpixel((32, 32))[1] < 60
    out2 = B.resize_center_crop(Image.new("RGB", (10, 7)), (80, 48))
    assert out2.size == (48, 80)
    buf = io.BytesIO()
    out.save(buf, "PNG")
