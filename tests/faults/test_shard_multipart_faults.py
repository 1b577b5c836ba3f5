"""Shards big enough for multipart uploads (>= 2 parts) commit exactly once through the S3 fault proxy:
byte-identical to a clean commit, and no incomplete multipart upload is ever left behind."""

from __future__ import annotations

import numpy as np
import pytest

from sar_scale.data import schema as S
from sar_scale.data.shards import commit_shard, hashes_array
from sar_scale.data.storage import S3Storage, StorageError
from sar_scale.testing.s3_fault_proxy import KINDS, FaultConfig

pytestmark = [pytest.mark.faults, pytest.mark.integration]

GRIDS = {256: (16, 16)}
PART = 5 << 20  # the S3 minimum part size


def _big_samples(n: int = 12) -> list[dict]:
    """~1 MiB per sample (T5-XL-sized text features), so a shard is ~12 MiB = 3 parts of 5 MiB."""
    rng = np.random.default_rng(0)
    out = [S.make_sample(f"big/{i}", f"caption {i}", {256: rng.integers(0, 16384, (16, 16)).astype(np.int32)},
                         (256, 256), text_features=rng.standard_normal((256, 2048)).astype(np.float16))
           for i in range(n)]
    return sorted(out, key=lambda s: s["__key__"])


def _objects(client, bucket: str) -> dict[str, bytes]:
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    return {k: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def _uploads(client, bucket: str) -> list[str]:
    return [u["Key"] for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


def test_multipart_shard_commits_exactly_once_under_faults(s3_server, fault_proxy, monkeypatch, figures):
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    samples = _big_samples()
    hashes = hashes_array((s["__key__"], bytes(16), i) for i, s in enumerate(samples))
    direct = s3_server.client()

    clean = s3_server.make_bucket("mp-clean")
    st = S3Storage(f"s3://{clean}/ds", multipart_threshold=PART, multipart_chunksize=PART)
    stats = commit_shard(st, "big", 0, samples, GRIDS, hashes=hashes, run="r")
    assert stats["bytes"] >= 2 * PART  # really a multipart upload (3 parts)
    want = _objects(direct, clean)

    fault_proxy.configure(FaultConfig.mixed(0.2, seed=3, kinds=("error_500", "slowdown_503", "reset",
                                                                 "lost_reply")))
    faulty = s3_server.make_bucket("mp-faulty")
    st = S3Storage(f"s3://{faulty}/ds", endpoint_url=fault_proxy.endpoint, multipart_threshold=PART,
                   multipart_chunksize=PART)
    for attempt in range(1, 6):  # what a Ray task retry does: the same shard, written again
        try:
            commit_shard(st, "big", 0, samples, GRIDS, hashes=hashes, run="r")
            break
        except StorageError:
            continue
    snap = fault_proxy.snapshot()
    assert snap["injected"] >= 3, snap
    got = _objects(direct, faulty)
    assert {k.replace(faulty, clean): v for k, v in got.items()} == want  # byte-identical, nothing extra
    assert _uploads(direct, faulty) == []  # no incomplete multipart upload left behind
    assert S.read_index(S3Storage(f"s3://{faulty}/ds"), "big-000000.index.npy")["key"].tolist() == \
        [s["__key__"].encode() for s in samples]
    figures.record("4_object_storage_faults", "multipart_shard_commit", tried=snap["injected"],
                   survived=snap["injected"], lost=0, attempts=attempt, requests=snap["requests"],
                   by_kind={k: snap[k] for k in KINDS})


def test_failed_multipart_upload_is_aborted_and_nothing_commits(s3_server, fault_proxy, monkeypatch):
    """Every part upload fails for good: the commit raises StorageError, the incomplete upload is aborted
    (not left to cost storage), and no tar / index / stats object exists."""
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    bucket = s3_server.make_bucket("mp-outage")
    fault_proxy.configure(FaultConfig(permanent="500", methods=["PUT"]))  # UploadPart fails, Abort works
    st = S3Storage(f"s3://{bucket}/ds", endpoint_url=fault_proxy.endpoint, multipart_threshold=PART,
                   multipart_chunksize=PART, max_attempts=2)
    with pytest.raises(StorageError, match="big-000000.tar"):
        commit_shard(st, "big", 0, _big_samples(), GRIDS)
    direct = s3_server.client()
    assert _uploads(direct, bucket) == []
    assert direct.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0


def test_lost_reply_to_the_multipart_complete_still_commits(s3_server, fault_proxy, monkeypatch, tmp_path):
    """S3 completes the upload but its reply is lost, so the retried Complete finds no such upload: the
    object's multipart ETag shows it is this shard's upload, and the commit goes on (no rerun needed)."""
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    samples = _big_samples()
    clean = s3_server.make_bucket("mp-lost-clean")
    commit_shard(S3Storage(f"s3://{clean}/ds", multipart_threshold=PART, multipart_chunksize=PART),
                 "big", 0, samples, GRIDS, run="r")
    fault_proxy.configure(FaultConfig(lost_reply=1.0, methods=["POST"], queries=["uploadId"]))
    bucket = s3_server.make_bucket("mp-lost")
    st = S3Storage(f"s3://{bucket}/ds", endpoint_url=fault_proxy.endpoint, multipart_threshold=PART,
                   multipart_chunksize=PART, max_attempts=2)
    commit_shard(st, "big", 0, samples, GRIDS, run="r")
    assert fault_proxy.snapshot()["lost_reply"] >= 1
    direct = s3_server.client()
    got, want = _objects(direct, bucket), _objects(direct, clean)
    assert {k.replace(bucket, clean): v for k, v in got.items()} == want
    assert _uploads(direct, bucket) == []
    # a different file under that key is not mistaken for this one
    other = S3Storage(f"s3://{bucket}/ds", multipart_threshold=PART, multipart_chunksize=PART)
    (tmp_path / "other.bin").write_bytes(b"x" * (2 * PART + 1))
    assert other._holds_upload_of(tmp_path / "other.bin", "big-000000.tar") is False
