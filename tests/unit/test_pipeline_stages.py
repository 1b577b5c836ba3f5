"""The Ray stage code called directly (no Ray): the shard writer actor (load/bucket/resize, VQ tokenize, CLIP
scorer, commit) and the scorer."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from pipelines.config import PrepareConfig
from pipelines.dedup import grid_name
from pipelines.stages import ClipScorer, TokenizeActor, grids_of
from pipelines.staging import Staging, to_signed64
from pipelines.validate import perceptual_hash, pixel_hash
from sar_scale.config import load_config
from sar_scale.data import schema
from sar_scale.data.buckets import bucket_table, nearest_bucket, resize_center_crop
from sar_scale.data.storage import LocalStorage
from tests.data_inputs import photo


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from sar_scale.tokenizers.text import build_tiny_text_encoder
    from sar_scale.tokenizers.vq import build_vq, save_vq

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    save_vq(build_vq("demo-small"), root / "vq")
    tok = AutoTokenizer.from_pretrained(build_tiny_text_encoder(root / "txt", kind="clip", width=32))
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=120, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8), projection_dim=16)
    CLIPModel(cfg).save_pretrained(root / "clip")
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                     crop_size={"height": 32, "width": 32}),
                  tokenizer=tok).save_pretrained(root / "clip")
    return root


def _plan(tmp_path, st: LocalStorage, cfg: PrepareConfig, n=5) -> tuple[Staging, dict]:
    """A planned shard as the assign stage stages it: one aspect bucket, rows sorted by key."""
    table = bucket_table([32, 64], 8, 2.0)
    grid = grid_name(grids_of(96, 64, table, 8))
    rows = []
    for i in range(n):
        img = photo(96, 64, seed=i)
        img.save(tmp_path / f"{i}.png")
        rows.append({"key": schema.sample_key(f"{i}.png"), "sid": f"{i}.png", "u": 0, "i": i,
                     "img": json.dumps({"root": str(tmp_path), "key": f"{i}.png"}),
                     "caption": ["a red circle", "a blue square", "a green triangle", "a purple circle"][i % 4],
                     "extra": json.dumps({"license": "cc"}) if i == 0 else "", "w": 96, "h": 64,
                     "sha": pixel_hash(img), "phash": to_signed64(perceptual_hash(img)), "base": False, "grid": grid})
    rows[3]["img"] = json.dumps({"root": str(tmp_path), "key": "gone.png"})  # vanished after the scan
    photo(80, 64, seed=4).save(tmp_path / "4.png")  # replaced by another size after the scan
    rows.sort(key=lambda r: r["key"])
    stg = Staging(st)
    stg.put_rows(stg.key("assign", grid, "p00000.parquet"), rows)
    return stg, {"index": 0, "grid": grid, "slices": [[0, 0, n]], "samples": n, "run": "r1", "config_hash": "c1"}


def test_writer_actor_loads_tokenizes_scores_and_commits_a_shard(models, tmp_path):
    base = {"input": {"path": str(tmp_path)}, "output": {"name": "t"},
            "tokenize": {"vq_path": str(models / "vq"), "resolutions": [32, 64], "max_ratio": 2.0,
                         "batch_size": 2, "load_threads": 2},
            "filters": {"scorer": {"model_path": str(models / "clip")}}}
    cfg = load_config(PrepareConfig, base)
    st = LocalStorage(tmp_path / "out")
    stg, spec = _plan(tmp_path, st, cfg)
    actor = TokenizeActor(cfg.model_dump_json(), st, stg, 8)
    assert actor.device_info()["device"] == "cpu"  # tokenize.device=auto without a GPU
    if not torch.cuda.is_available():  # asking for cuda where there is none: a clear error, not a CPU run
        cuda = load_config(PrepareConfig, base, ["tokenize.device=cuda"])
        with pytest.raises(RuntimeError, match="tokenize.device=cuda but this Ray worker sees no GPU"):
            TokenizeActor(cuda.model_dump_json(), st, stg, 8)
    res = actor.write(spec)
    stats = schema.read_shard_stats(st, schema.stats_name("t", 0))
    assert not res["skipped"] and stats["samples"] == 3 and stats["grids"] == {"32": [3, 5], "64": [6, 10]}
    assert stats["rejects"] == {"changed_since_scan": 1, "read_error": 1}
    got = {s["__key__"]: s for s in wds.WebDataset(st.url(schema.tar_name("t", 0)), shardshuffle=False)}
    # tokens are exactly the VQ codes of the bucket crop
    from sar_scale.tokenizers.vq import load_vq

    vq = load_vq(models / "vq")
    img0 = Image.open(tmp_path / "0.png").convert("RGB")
    b64 = nearest_bucket(96, 64, bucket_table([32, 64], 8, 2.0)[64])
    x = torch.from_numpy(np.array(resize_center_crop(img0, b64))).permute(2, 0, 1)[None].float() / 127.5 - 1
    s0 = got[schema.sample_key("0.png")]
    np.testing.assert_array_equal(np.load(io.BytesIO(s0["tokens_64.npy"])), vq.encode(x)[0].numpy().astype(np.int32))
    meta = json.loads(s0["json"])
    assert meta["extra"] == {"license": "cc"} and isinstance(meta["scores"]["clip"], float)
    hashes = schema.read_hashes(st, schema.hashes_name("t", 0))
    assert hashes["key"].tolist() == schema.read_index(st, schema.index_name("t", 0))["key"].tolist()
    assert stg.storage.exists(stg.key("rejects", "write-s000000.jsonl"))
    # same plan + config again: the committed shard is kept as it is
    before = st.get_bytes(schema.tar_name("t", 0))
    assert actor.write(spec)["skipped"] and st.get_bytes(schema.tar_name("t", 0)) == before
    assert not actor.write({**spec, "config_hash": "other"})["skipped"]

    # min_score rejects the lowest-scoring samples, recorded with the reason
    scores = sorted(json.loads(s["json"])["scores"]["clip"] for s in got.values())
    cfg2 = load_config(PrepareConfig, base, [f"filters.scorer.min_score={scores[1]}"])
    TokenizeActor(cfg2.model_dump_json(), st, stg, 8).write({**spec, "config_hash": "c2"})
    stats2 = schema.read_shard_stats(st, schema.stats_name("t", 0))
    assert stats2["samples"] == 2 and stats2["rejects"]["low_score"] == 1
    assert {r["reason"] for r in stats2["reject_ids"]} == {"low_score", "read_error", "changed_since_scan"}


def test_clip_scorer_returns_one_cosine_per_pair(models):
    s = ClipScorer(str(models / "clip"))
    vals = s([Image.new("RGB", (40, 30), (255, 0, 0))] * 2, ["a red circle", "a blue square"])
    assert len(vals) == 2 and all(-1.0 <= v <= 1.0 for v in vals)
