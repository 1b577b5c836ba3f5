"""LlamaGen VQ compatibility: exact key/shape match, parity with reference outputs, load/save."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sar_scale.config import ConfigError
from sar_scale.tokenizers.vq import (
    VQConfig,
    build_vq,
    infer_vq_config,
    load_vq,
    save_vq,
    vq_config,
)

FIXTURE = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "llamagen_vq"
ARCH_KEYS = ["codebook_size", "codebook_embed_dim", "codebook_l2_norm", "ch", "ch_mult",
             "z_channels", "num_res_blocks"]


@pytest.fixture(scope="module")
def fixture_dir() -> Path:
    if not (FIXTURE / "small_vq_io.safetensors").exists():
        pytest.skip(f"LlamaGen parity fixture not found at {FIXTURE}")
    return FIXTURE


@pytest.fixture(scope="module")
def small_cfg(fixture_dir) -> VQConfig:
    raw = json.loads((fixture_dir / "small_vq_config.json").read_text())
    return VQConfig(**{k: raw[k] for k in ARCH_KEYS})


@pytest.fixture(scope="module")
def small_model(fixture_dir, small_cfg):
    return load_vq(fixture_dir / "small_vq_weights.safetensors", config=small_cfg)


@pytest.fixture(scope="module")
def io_tensors(fixture_dir):
    return load_file(str(fixture_dir / "small_vq_io.safetensors"))


def test_vq16_keys_and_shapes_match_llamagen(fixture_dir):
    ref = json.loads((fixture_dir / "vq16_state_dict_shapes.json").read_text())
    model = build_vq("VQ-16", device="meta")
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == ref["state_dict_shapes"]
    assert model.num_params() == ref["n_params"]
    assert model.downsample == 16
    for k in ("codebook_size", "codebook_embed_dim", "ch", "ch_mult", "z_channels"):
        assert getattr(model.config, k) == ref["config"][k]


def test_vq8_is_llamagen_vq8_layout():
    model = build_vq("VQ-8", device="meta")
    assert model.downsample == 8
    sd = model.state_dict()
    # Four levels; attention only at the last one; shortcut where width changes (1 -> 2).
    assert "encoder.conv_blocks.3.attn.1.q.weight" in sd
    assert "encoder.conv_blocks.4.res.0.conv1.weight" not in sd
    assert "encoder.conv_blocks.3.downsample.conv.weight" not in sd
    assert sd["encoder.conv_blocks.1.res.0.nin_shortcut.weight"].shape == (256, 128, 1, 1)
    assert sd["quantize.embedding.weight"].shape == (16384, 8)


def test_parity_codes_exact_and_reconstruction(small_model, io_tensors):
    x = io_tensors["input"]
    codes = small_model.encode(x)
    assert codes.dtype == torch.int64
    assert codes.shape == io_tensors["codes"].shape == (2, 4, 6)
    torch.testing.assert_close(codes, io_tensors["codes"], rtol=0, atol=0)
    with torch.no_grad():
        zq, _, _ = small_model.quantize_latents(x)
        torch.testing.assert_close(zq, io_tensors["quant"], rtol=1e-4, atol=1e-4)
        rec_from_quant = small_model.decode_latents(io_tensors["quant"])
    torch.testing.assert_close(rec_from_quant, io_tensors["reconstruction"], rtol=1e-4, atol=2e-4)
    torch.testing.assert_close(small_model.decode(codes), io_tensors["reconstruction"],
                               rtol=1e-4, atol=2e-4)


def test_batched_equals_one_by_one(small_model, io_tensors):
    x = io_tensors["input"]
    codes = small_model.encode(x)
    for i in range(len(x)):
        assert torch.equal(small_model.encode(x[i:i + 1])[0], codes[i])
    rec = small_model.decode(codes)
    torch.testing.assert_close(small_model.decode(codes[1:2])[0], rec[1], rtol=1e-4, atol=1e-4)


def test_bf16_close_to_fp32(small_model, io_tensors):
    x = io_tensors["input"]
    codes32 = small_model.encode(x)
    codes16 = small_model.encode(x, dtype=torch.bfloat16)
    assert codes16.dtype == torch.int64
    assert (codes16 == codes32).float().mean() >= 0.8  # near-ties may flip in bf16
    rec16 = small_model.decode(codes32, dtype=torch.bfloat16)
    assert rec16.dtype == torch.float32
    ref = io_tensors["reconstruction"]
    assert (rec16 - ref).abs().mean() < 0.1 * ref.abs().mean()  # bf16: ~3 significant digits
    # bf16 weights (not just autocast) also work.
    m16 = build_vq(small_model.config)
    m16.load_state_dict(small_model.state_dict())
    m16 = m16.to(torch.bfloat16).eval()
    assert (m16.encode(x) == codes32).float().mean() >= 0.8


def test_any_size_divisible_by_downsample(small_model):
    ds = small_model.downsample
    assert ds == 16
    for h, w in [(16, 16), (32, 80), (48, 16)]:
        codes = small_model.encode(torch.rand(1, 3, h, w) * 2 - 1)
        assert codes.shape == (1, h // ds, w // ds)
        assert small_model.decode(codes).shape == (1, 3, h, w)
    with pytest.raises(ValueError, match="divisible by the VQ downsample factor 16"):
        small_model.encode(torch.zeros(1, 3, 40, 32))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        small_model.encode(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="code ids must be in"):
        small_model.decode(torch.full((1, 2, 2), 256))


def test_encode_is_inference_only(small_model, io_tensors):
    codes = small_model.encode(io_tensors["input"])
    assert codes.is_inference() and not codes.requires_grad


def test_save_load_dir_roundtrip(tmp_path, small_model, io_tensors):
    save_vq(small_model, tmp_path / "vq")
    assert sorted(p.name for p in (tmp_path / "vq").iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_vq(tmp_path / "vq")
    assert loaded.config.model_dump() == small_model.config.model_dump()
    assert not loaded.training
    for k, v in small_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert torch.equal(loaded.encode(io_tensors["input"]), io_tensors["codes"])


def test_load_llamagen_pt_with_args_and_inferred_config(tmp_path, small_model, small_cfg, io_tensors):
    # LlamaGen's train script saves {"model", "optimizer", "steps", "args": Namespace, ...}.
    ckpt = {"model": small_model.state_dict(), "steps": 10, "args": argparse.Namespace(lr=1e-4)}
    torch.save(ckpt, tmp_path / "0000010.pt")
    inferred = load_vq(tmp_path / "0000010.pt")
    assert infer_vq_config(small_model.state_dict()).model_dump() == small_cfg.model_dump()
    assert torch.equal(inferred.encode(io_tensors["input"]), io_tensors["codes"])
    # DDP-prefixed keys and a missing usage buffer (codebook_show_usage=False) load too.
    sd = {f"module.{k}": v for k, v in small_model.state_dict().items() if "codebook_used" not in k}
    torch.save({"model": sd}, tmp_path / "ddp.pt")
    assert torch.equal(load_vq(tmp_path / "ddp.pt", config=small_cfg).encode(io_tensors["input"]),
                       io_tensors["codes"])


def test_load_refuses_pickled_code(tmp_path, small_model):
    torch.save({"model": small_model.state_dict(), "evil": Path("x")}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="weights_only"):
        load_vq(tmp_path / "bad.pt")


def test_mismatched_checkpoint_is_a_clear_error(tmp_path, small_model, fixture_dir):
    with pytest.raises(ValueError, match=r"does not match the config[\s\S]*shape mismatches"):
        load_vq(fixture_dir / "small_vq_weights.safetensors", config="VQ-16")
    sd = dict(small_model.state_dict())
    sd.pop("decoder.conv_out.bias")
    sd["extra.weight"] = torch.zeros(1)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "broken.safetensors"))
    with pytest.raises(ValueError, match=r"missing keys \(1\): \['decoder.conv_out.bias'\]"
                                         r"[\s\S]*unexpected keys \(1\): \['extra.weight'\]"):
        load_vq(tmp_path / "broken.safetensors", config=small_model.config)
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_vq(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_vq(tmp_path / "nope.pt")


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="unknown VQ config 'VQ-32'"):
        VQConfig.named("VQ-32")
    with pytest.raises(ConfigError, match="norm_groups"):
        vq_config("demo-small", ["ch=36"])
    with pytest.raises(ConfigError, match="codebook_sise"):
        vq_config("demo-small", ["codebook_sise=5"])
    cfg = vq_config("demo-small", ["codebook_size=512"])
    assert cfg.codebook_size == 512 and cfg.downsample == 8
    yaml_file = tmp_path / "vq.yaml"
    yaml_file.write_text("ch: 64\nch_mult: [1, 2]\ncodebook_size: 64\n")
    assert vq_config(yaml_file).downsample == 2


def test_named_configs():
    for name, ds in [("VQ-16", 16), ("VQ-8", 8), ("demo-small", 8)]:
        cfg = VQConfig.named(name)
        assert cfg.name == name and cfg.downsample == ds and cfg.codebook_l2_norm
    small = build_vq("demo-small")
    assert small.num_params() < 2_000_000
