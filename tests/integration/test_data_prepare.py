"""`data prepare` end to end on Ray: bad inputs rejected with reasons, every good sample exactly once,
shards readable by upstream webdataset, crash (SIGKILL) + rerun == clean run, S3 in/out, manifests."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import webdataset as wds
import yaml

from pipelines.config import PrepareConfig
from pipelines.prepare import COMMIT_DELAY_ENV, run
from sar_scale.config import load_config
from sar_scale.data import schema
from sar_scale.data.storage import open_storage, register_webdataset_s3
from tests.conftest import REPO
from tests.data_inputs import build_folder, photo

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RES = [32, 64]


@pytest.fixture(scope="module")
def ray_env(s3_server):
    """One local Ray for the module; its workers see the loopback S3 endpoint + test credentials."""
    import ray

    saved = {k: os.environ.get(k) for k in s3_server.env()}
    os.environ.update(s3_server.env())
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield s3_server
    ray.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    import torch

    from sar_scale.tokenizers.vq import build_vq, save_vq

    torch.manual_seed(0)
    save_vq(build_vq("demo-small"), root / "vq")  # tiny random VQ: tokenization is exercised, not quality
    expected = build_folder(root / "inputs", n_shapes=24)
    cfg = {"defaults": str(REPO / "configs/data/shapes_demo.yaml"),
           "input": {"path": str(root / "inputs"), "files_per_unit": 16},
           "filters": {"min_side": 32},
           "tokenize": {"vq_path": str(root / "vq"), "resolutions": RES, "batch_size": 8},
           "output": {"url": str(root / "clean"), "samples_per_shard": 5},
           "ray": {"load_num_cpus": 0.25, "actor_num_cpus": 1.0}}
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return root, expected


def _cfg(root: Path, **over) -> PrepareConfig:
    return load_config(PrepareConfig, root / "cfg.yaml", [f"{k}={v}" for k, v in over.items()])


def _read_all(url: str) -> dict[str, dict]:
    st = open_storage(url)
    shards = schema.committed_shards(st, None)
    out: dict[str, dict] = {}
    for tar, _ in shards:
        for s in wds.WebDataset(st.url(tar), shardshuffle=False):
            meta = json.loads(s["json"])
            assert meta["source_id"] not in out, f"duplicate sample {meta['source_id']}"
            out[meta["source_id"]] = s
    return out


def _tar_digests(url: str) -> dict[str, str]:
    st = open_storage(url)
    return {k: hashlib.sha256(st.get_bytes(k)).hexdigest() for k in st.list() if k.endswith(".tar")}


@pytest.fixture(scope="module")
def clean_run(ray_env, data):
    root, expected = data
    summary = run(_cfg(root))
    return root, expected, summary


def test_local_end_to_end(clean_run):
    root, expected, summary = clean_run
    url = str(root / "clean")
    samples = _read_all(url)
    assert set(samples) == expected["good"]  # every good sample exactly once
    rejects = {r["source_id"]: r["reason"] for r in schema.read_rejects(open_storage(url))}
    assert rejects == expected["rejects"]
    man = schema.read_dataset_manifest(open_storage(url))
    assert man["samples"] == len(expected["good"]) == summary["samples"]
    # aspect-bucket shards: 3 buckets of 11, 11 and 8 samples at 5 per shard
    assert man["resolutions"] == RES and len(man["shards"]) == summary["shards"] == 8
    assert sorted(s["samples"] for s in man["shards"]) == [1, 1, 3, 5, 5, 5, 5, 5]
    assert sum(man["buckets"]["32"].values()) == len(expected["good"])
    assert summary["rejects"] == {r: list(expected["rejects"].values()).count(r)
                                  for r in set(expected["rejects"].values())}
    for sid, s in samples.items():
        meta = json.loads(s["json"])
        for r in RES:
            tok = np.load(io.BytesIO(s[f"tokens_{r}.npy"]))
            assert tok.dtype == np.int32 and list(tok.shape) == meta["buckets"][str(r)]
            assert tok.min() >= 0 and tok.max() < 1024
        # grids at 64 px are exactly twice those at 32 px (same aspect-ratio bucket)
        assert [2 * v for v in meta["buckets"]["32"]] == meta["buckets"]["64"]
    rot = json.loads(samples["special/rotated.jpg"]["json"])
    assert rot["orig_size"] == [112, 64] and rot["buckets"]["32"] == [3, 5]  # EXIF applied -> landscape
    assert samples["special/ctrl.png"]["txt"] == b"a red circle on the left"
    # every shard holds one aspect bucket; its index.npy ranges are whole samples (a loader's range read)
    st = open_storage(url)
    for entry in man["shards"]:
        index = schema.read_index(st, entry["index"])
        blob = st.get_range(entry["tar"], int(index["start"][0]), int(index["end"][0] - index["start"][0]))
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r|") as tf:
            members = {ti.name.split(".", 1)[1]: tf.extractfile(ti).read() for ti in tf}
        assert json.loads(members["json"])["buckets"] == entry["grids"]
        assert list(schema.decode_npy(members["tokens_64.npy"]).shape) == entry["grids"]["64"]
        for sample in wds.WebDataset(st.url(entry["tar"]), shardshuffle=False):
            assert json.loads(sample["json"])["buckets"] == entry["grids"]
        hashes = schema.read_hashes(st, schema.hashes_name("shapes", schema.parse_shard_name(entry["tar"])[1]))
        assert hashes["key"].tolist() == index["key"].tolist()


def test_rerun_skips_committed_and_is_identical(clean_run):
    root, _, _ = clean_run
    before = _tar_digests(str(root / "clean"))
    summary = run(_cfg(root))
    assert summary["shards_written"] == 0 and summary["shards_skipped"] == 8
    assert _tar_digests(str(root / "clean")) == before
    # a different config must not silently mix into the same output
    from sar_scale.config import ConfigError

    with pytest.raises(ConfigError, match="different config"):
        run(_cfg(root, **{"filters.caption_min_words": 3}))


def _kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL the driver and everything in its session (its local Ray too), like a node crash."""
    victims = [p for p in psutil.process_iter() if _sid(p.pid) == proc.pid]
    os.killpg(proc.pid, signal.SIGKILL)
    for p in victims:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(30)


def _sid(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def test_crash_mid_job_then_rerun_equals_clean_run(clean_run):
    root, expected, _ = clean_run
    out = root / "crash"
    env = {**os.environ, COMMIT_DELAY_ENV: "1.5", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "sar_scale.cli", "data", "prepare", str(root / "cfg.yaml"), f"output.url={out}",
           "ray.num_cpus=2"]
    log = open(root / "crash.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if out.exists() and len(list(out.glob("*.stats.json"))) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, (root / "crash.log").read_text()[-3000:]
        _kill_session(proc)
    finally:
        if proc.poll() is None:
            _kill_session(proc)
        log.close()
    committed = len(list(out.glob("*.stats.json")))
    assert 2 <= committed < 7 and not (out / "manifest.json").exists()
    # worst case on disk: the next shard's tar without stats, and a torn temp file
    tars = sorted(out.glob("*.tar"))
    missing = sorted(i for i in range(8) if not (out / schema.stats_name("shapes", i)).exists())
    (out / schema.tar_name("shapes", missing[-1])).write_bytes(tars[0].read_bytes()[:1000])
    (out / (schema.tar_name("shapes", missing[0]) + ".tmp-deadbeef")).write_bytes(b"partial")
    # a commit marker of another shard's plan must not make a wrong shard look committed
    (out / schema.stats_name("shapes", missing[0])).write_bytes(sorted(out.glob("*.stats.json"))[0].read_bytes())
    (out / schema.tar_name("shapes", 9)).write_bytes(b"outside the plan")

    summary = run(_cfg(root, **{"output.url": str(out)}))
    assert summary["shards_skipped"] == committed and summary["shards_written"] == 8 - committed
    assert _tar_digests(str(out)) == _tar_digests(str(root / "clean"))  # byte-identical shards
    assert set(_read_all(str(out))) == expected["good"]
    assert not [p for p in out.iterdir() if ".tmp-" in p.name or p.name.startswith("_staging")]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (root / "clean").iterdir())
    assert all((out / (t.name[:-4] + ".stats.json")).exists() for t in out.glob("*.tar"))
    assert (schema.read_rejects(open_storage(out)) == schema.read_rejects(open_storage(root / "clean")))


def _wds_tar(path: Path, samples: list[tuple[str, bytes, bytes]], extra_members=()) -> None:
    with tarfile.open(path, "w") as tf:
        for key, png, cap in samples:
            for ext, data in (("png", png), ("txt", cap)):
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
        for name, data in extra_members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


def _png(seed: int) -> bytes:
    b = io.BytesIO()
    photo(96, 64, seed).save(b, "PNG")
    return b.getvalue()


def test_s3_tar_inputs_to_s3_shards(clean_run, tmp_path):
    root, _, _ = clean_run
    import boto3

    client = boto3.client("s3")
    client.create_bucket(Bucket="prep-in")
    client.create_bucket(Bucket="prep-out")
    for t in range(2):
        p = tmp_path / f"in-{t}.tar"
        _wds_tar(p, [(f"s{t}_{i}", _png(100 + 10 * t + i), f"photo number {t} {i}".encode()) for i in range(4)],
                 extra_members=[("../escape.txt", b"evil")] if t == 0 else [])
        client.upload_file(str(p), "prep-in", f"raw/in-{t}.tar")
    summary = run(_cfg(root, **{"input.kind": "webdataset", "input.path": "s3://prep-in/raw",
                                "output.url": "s3://prep-out/shards", "output.samples_per_shard": 3}))
    assert summary["samples"] == 8 and summary["shards"] == 3
    assert summary["rejects"] == {"unsafe_member": 1}
    register_webdataset_s3()
    st = open_storage("s3://prep-out/shards")
    man = schema.read_dataset_manifest(st)
    keys = [s["__key__"] for s in wds.WebDataset(st.url(schema.brace_pattern("shapes", 3)), shardshuffle=False)]
    assert sorted(keys) == sorted(schema.sample_key(f"in-{t}.tar/s{t}_{i}") for t in range(2) for i in range(4))
    assert man["samples"] == 8 and [s["samples"] for s in man["shards"]] == [3, 3, 2]
    assert not any(".tmp-" in k for k in st.list())


def test_manifest_input_with_text_features_and_thumbnails(clean_run, tmp_path):
    root, _, _ = clean_run
    from sar_scale.tokenizers.text import build_tiny_text_encoder

    enc = build_tiny_text_encoder(tmp_path / "t5", kind="t5", width=32)
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(5):
        (tmp_path / "img" / f"{i}.png").write_bytes(_png(200 + i))
        rows.append({"image": f"img/{i}.png", "caption": f"a red circle number {i}", "uid": f"u{i}",
                     "license": "cc-by"})
    rows.append({"image": "img/missing.png", "caption": "file is not there", "uid": "u9"})
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = run(_cfg(root, **{"input.kind": "manifest", "input.path": str(tmp_path / "m.jsonl"),
                                "input.id_column": "uid", "output.url": str(tmp_path / "out"),
                                "tokenize.text_encoder_path": str(enc), "output.thumbnail_size": 24}))
    assert summary["samples"] == 5 and summary["rejects"] == {"read_error": 1}
    samples = _read_all(str(tmp_path / "out"))
    assert set(samples) == {f"u{i}" for i in range(5)}
    s = samples["u3"]
    meta = json.loads(s["json"])
    assert meta["extra"] == {"license": "cc-by"}
    text = np.load(io.BytesIO(s["text.npy"]))
    assert text.dtype == np.float16 and text.shape[1] == 32 and 1 <= text.shape[0] <= 8
    from PIL import Image

    assert min(Image.open(io.BytesIO(s["jpg"])).size) == 24
    assert schema.read_dataset_manifest(open_storage(tmp_path / "out"))["text_features"] is True


def test_imagefolder_class_conditional_with_flips(clean_run, tmp_path):
    """ImageNet-layout class folders: class ids in the sample json, classes.json at the root, flip copies."""
    root, _, _ = clean_run
    for cls, seeds in (("b_cat", (301, 302)), ("a_dog", (303,))):
        (tmp_path / "in" / cls).mkdir(parents=True)
        for s in seeds:
            (tmp_path / "in" / cls / f"{s}.png").write_bytes(_png(s))
    (tmp_path / "in" / "loose.png").write_bytes(_png(304))
    summary = run(_cfg(root, **{"input.kind": "imagefolder", "input.path": str(tmp_path / "in"), "input.flip": "true",
                                "output.url": str(tmp_path / "out"), "filters.caption_min_words": 1}))
    assert summary["samples"] == 6 and summary["rejects"] == {"class_missing": 1}
    samples = _read_all(str(tmp_path / "out"))
    assert set(samples) == {"a_dog/303.png", "a_dog/303.png#flip", "b_cat/301.png", "b_cat/301.png#flip",
                            "b_cat/302.png", "b_cat/302.png#flip"}
    meta = json.loads(samples["b_cat/302.png#flip"]["json"])
    assert samples["b_cat/302.png#flip"]["txt"] == b"b_cat"  # the class name is the caption
    assert meta["extra"] == {"class_id": 1, "class_name": "b_cat", "flip": True}
    a, b = (np.load(io.BytesIO(samples[k]["tokens_32.npy"])) for k in ("b_cat/302.png", "b_cat/302.png#flip"))
    assert a.shape == b.shape and not np.array_equal(a, b)
    classes = json.loads(open_storage(tmp_path / "out").get_bytes("classes.json"))
    assert classes == {"num_classes": 2, "classes": {"a_dog": 0, "b_cat": 1}}


def test_append_run_adds_shards_dedups_against_the_dataset_and_rerun_is_a_noop(clean_run, tmp_path):
    root, expected, _ = clean_run
    import shutil

    from sar_scale.config import ConfigError

    ds = tmp_path / "ds"
    shutil.copytree(root / "clean", ds)
    before = {k: v for k, v in _tar_digests(str(ds)).items()}
    old_objects = {p.name: p.read_bytes() for p in ds.iterdir() if p.name != "manifest.json"}
    # a new crawl: 5 new photos, a re-encoded copy of a dataset image under a new name, and a file whose
    # source id the dataset already has
    new = tmp_path / "crawl"
    (new / "special").mkdir(parents=True)
    for i in range(5):
        photo(96, 64, 500 + i).save(new / f"new{i}.png")
        (new / f"new{i}.txt").write_text(f"a new photo number {i}")
    ctrl = root / "inputs" / "special" / "ctrl.png"
    (new / "copy_of_ctrl.png").write_bytes(ctrl.read_bytes())
    (new / "copy_of_ctrl.txt").write_text("the same pixels under another name")
    (new / "special" / "rotated.jpg").write_bytes((root / "inputs" / "special" / "rotated.jpg").read_bytes())
    (new / "special" / "rotated.txt").write_text("listed again by the new crawl")
    over = {"output.url": str(ds), "output.mode": "append", "input.path": str(new)}
    summary = run(_cfg(root, **over))
    man = schema.read_dataset_manifest(open_storage(ds))
    assert summary["run_samples"] == 5 and man["samples"] == len(expected["good"]) + 5
    assert summary["rejects"] == {"duplicate": 1, "duplicate_source_id": 1}
    assert [r["shards"] for r in man["runs"]] == [[0, 7], [8, 8 + summary["run_shards"] - 1]]
    assert len(man["shards"]) == 8 + summary["run_shards"] and summary["shards_written"] == summary["run_shards"]
    # committed objects untouched; the new run's rejects in their own file
    assert all((ds / k).read_bytes() == v for k, v in old_objects.items())
    assert {k: v for k, v in _tar_digests(str(ds)).items() if k in before} == before
    rej = [json.loads(line) for line in (ds / man["runs"][1]["rejects"]).read_text().splitlines()]
    assert {(r["source_id"], r["reason"]) for r in rej} == {("copy_of_ctrl.png", "duplicate"),
                                                            ("special/rotated.jpg", "duplicate_source_id")}
    assert len(_read_all(str(ds))) == len(expected["good"]) + 5  # every sample once across both runs
    # the same append again: nothing changes at all
    snapshot = {p.name: p.read_bytes() for p in ds.iterdir()}
    again = run(_cfg(root, **over))
    assert again["noop"] and again["shards_written"] == 0
    assert {p.name: p.read_bytes() for p in ds.iterdir()} == snapshot
    # appending with another tokenization would make the dataset inconsistent: refused
    with pytest.raises(ConfigError, match="append needs the dataset's"):
        run(_cfg(root, **over, **{"tokenize.resolutions": "[32]"}))
