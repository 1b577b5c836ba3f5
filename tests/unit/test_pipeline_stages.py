"""The Ray stage functions called directly (no Ray): load/bucket/resize, VQ tokenize, CLIP scorer, shard writer."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from pipelines.config import PrepareConfig
from pipelines.stages import ClipScorer, TokenizeActor, load_batch
from pipelines.writer import write_shard
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


def _batch(tmp_path, n=4):
    rows = {k: [] for k in ("shard", "pos", "source_id", "ref", "caption", "extra")}
    for i in range(n):
        sizes = [(96, 64), (64, 96), (80, 80), (100, 60)]
        photo(*sizes[i % 4], seed=i).save(tmp_path / f"{i}.png")
        rows["shard"].append(0)
        rows["pos"].append(i)
        rows["source_id"].append(f"{i}.png")
        rows["ref"].append(json.dumps({"root": str(tmp_path), "key": f"{i}.png"}))
        rows["caption"].append(["a red circle", "a blue square", "a green triangle", "a purple circle"][i % 4])
        rows["extra"].append("")
    rows["ref"][-1] = json.dumps({"root": str(tmp_path), "key": "gone.png"})  # vanished after the scan
    return {k: np.array(v, dtype=object) for k, v in rows.items()}


def test_load_tokenize_score_write(models, tmp_path):
    base = {"input": {"path": str(tmp_path)},
            "tokenize": {"vq_path": str(models / "vq"), "resolutions": [32, 64], "max_ratio": 2.0,
                         "batch_size": 2},
            "filters": {"scorer": {"model_path": str(models / "clip")}}}
    cfg = load_config(PrepareConfig, base)
    batch = _batch(tmp_path)
    loaded = load_batch(batch, cfg.model_dump_json(), downsample=8)
    assert list(loaded["reject"]) == ["", "", "", "read_error"]
    table = bucket_table([32, 64], 8, 2.0)
    img0 = Image.open(tmp_path / "0.png").convert("RGB")
    b64 = nearest_bucket(96, 64, table[64])
    assert (loaded["bh_64"][0], loaded["bw_64"][0]) == b64
    assert loaded["px_64"][0] == resize_center_crop(img0, b64).tobytes()

    out = TokenizeActor(cfg.model_dump_json())(loaded)
    # tokens are exactly the VQ codes of the crop
    from sar_scale.tokenizers.vq import load_vq

    vq = load_vq(models / "vq")
    x = torch.from_numpy(np.array(resize_center_crop(img0, b64))).permute(2, 0, 1)[None].float() / 127.5 - 1
    want = vq.encode(x)[0].numpy().astype(np.int32)
    got = np.frombuffer(out["tok_64"][0], np.int32).reshape(out["gh_64"][0], out["gw_64"][0])
    np.testing.assert_array_equal(got, want)
    assert (out["gh_32"][0] * 2, out["gw_32"][0] * 2) == (out["gh_64"][0], out["gw_64"][0])
    scores = [json.loads(s).get("clip") for s in out["scores"]]
    assert all(isinstance(s, float) for s in scores[:3]) and scores[3] is None

    # min_score rejects the lowest-scoring samples, recorded with the reason
    cut = sorted(scores[:3])[1]
    cfg2 = load_config(PrepareConfig, base, [f"filters.scorer.min_score={cut}"])
    out2 = TokenizeActor(cfg2.model_dump_json())(load_batch(batch, cfg2.model_dump_json(), downsample=8))
    low = [i for i in range(3) if scores[i] < cut]
    assert [i for i in range(4) if out2["reject"][i] == "low_score"] == low

    # the writer: tar + stats (rejects counted), readable by webdataset
    rows = [{k: out2[k][i] for k in out2} for i in range(4)]
    st = LocalStorage(tmp_path / "out")
    stats = write_shard(st, "t", 0, rows, [32, 64], tmp_path, {"config_hash": "x", "plan_hash": "y"})
    assert stats["samples"] == 3 - len(low)
    assert stats["rejects"] == {"low_score": len(low), "read_error": 1}
    got = list(wds.WebDataset(st.url(schema.tar_name("t", 0)), shardshuffle=False))
    assert len(got) == stats["samples"]
    meta = json.loads(got[0]["json"])
    assert "clip" in meta["scores"]
    assert np.load(io.BytesIO(got[0]["tokens_32.npy"])).dtype == np.int32


def test_clip_scorer_returns_one_cosine_per_pair(models):
    s = ClipScorer(str(models / "clip"))
    vals = s([Image.new("RGB", (40, 30), (255, 0, 0))] * 2, ["a red circle", "a blue square"])
    assert len(vals) == 2 and all(-1.0 <= v <= 1.0 for v in vals)
