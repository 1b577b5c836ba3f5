"""LlamaGen-compatible VQ image tokenizer (encoder, l2-normalised codebook, decoder).

The SAR paper tokenised images with LlamaGen's VQ-16, so a user with ``vq_ds16_t2i.pt`` /
``vq_ds16_c2i.pt`` must be able to load it strictly: module names and state-dict keys here
match FoundationVision/LlamaGen ``tokenizer/tokenizer_image/vq_model.py`` exactly (checked
against a key/shape list and a parity model in ``shared/fixtures/llamagen_vq``). The code is
our own; the small demo VQ that this project trains goes through the very same classes.

Shape legend: B batch, C channels, H/W pixel height/width, h/w token grid (H/ds, W/ds),
D codebook embedding dim, K codebook size, N = B*h*w flattened positions.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import field_validator, model_validator

from sar_scale.config import ConfigError, StrictModel, load_config
from sar_scale.utils.atomic import atomic_path, atomic_write_json

log = logging.getLogger(__name__)

# LlamaGen keeps a ring buffer of the last 65536 code ids (for usage stats) in its state dict.
_USAGE_BUFFER = 65536


class VQConfig(StrictModel):
    """Architecture of a LlamaGen-style VQ (field names follow LlamaGen's ``ModelArgs``)."""

    name: str | None = None
    """Named preset this config came from (informational)."""
    codebook_size: int = 16384
    """K: number of codebook entries."""
    codebook_embed_dim: int = 8
    """D: dimension of each codebook entry (LlamaGen uses a low 8-d code space)."""
    codebook_l2_norm: bool = True
    """l2-normalise latents and codebook before the nearest-neighbour lookup (cosine VQ)."""
    ch: int = 128
    """Base channel width of the conv encoder/decoder."""
    ch_mult: list[int] = [1, 1, 2, 2, 4]
    """Width multipliers per resolution level; downsample = 2 ** (len(ch_mult) - 1)."""
    z_channels: int = 256
    """Channels of the encoder output before the 1x1 ``quant_conv`` down to D."""
    num_res_blocks: int = 2
    """Residual blocks per encoder level (the decoder uses one more, as in LlamaGen)."""
    dropout: float = 0.0
    """Dropout inside residual blocks (training only)."""
    norm_groups: int = 32
    """GroupNorm groups; LlamaGen hard-codes 32, so ``ch`` must be a multiple of it."""
    commit_loss_beta: float = 0.25
    """Weight of the commitment loss (training only)."""
    entropy_loss_ratio: float = 0.0
    """Weight of LlamaGen's codebook entropy loss (training only; 0 disables)."""

    @field_validator("ch_mult")
    @classmethod
    def _check_mult(cls, v: list[int]) -> list[int]:
        if not v or any(m < 1 for m in v):
            raise ValueError("ch_mult must be a non-empty list of positive integers")
        return v

    @model_validator(mode="after")
    def _check_groups(self) -> VQConfig:
        for field, value in (("codebook_size", self.codebook_size),
                             ("codebook_embed_dim", self.codebook_embed_dim),
                             ("z_channels", self.z_channels), ("num_res_blocks", self.num_res_blocks)):
            if value < 1:
                raise ValueError(f"{field} must be >= 1, got {value}")
        if self.codebook_size > _USAGE_BUFFER * 4:
            raise ValueError(f"codebook_size {self.codebook_size} is unreasonably large")
        for m in self.ch_mult:
            if (self.ch * m) % self.norm_groups:
                raise ValueError(f"ch * ch_mult ({self.ch}*{m}) must be divisible by norm_groups "
                                 f"({self.norm_groups})")
        return self

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def named(cls, name: str) -> VQConfig:
        """One of :data:`VQ_CONFIGS` (``VQ-16``, ``VQ-8``, ``demo-small``)."""
        if name not in VQ_CONFIGS:
            raise ConfigError(f"unknown VQ config {name!r}; named configs: {sorted(VQ_CONFIGS)}")
        return cls.model_validate({**VQ_CONFIGS[name], "name": name})


VQ_CONFIGS: dict[str, dict[str, Any]] = {
    # LlamaGen's released tokenizers (vq_ds16_c2i.pt / vq_ds16_t2i.pt and vq_ds8_c2i.pt).
    "VQ-16": {"ch": 128, "ch_mult": [1, 1, 2, 2, 4], "z_channels": 256,
              "codebook_size": 16384, "codebook_embed_dim": 8},
    "VQ-8": {"ch": 128, "ch_mult": [1, 2, 2, 4], "z_channels": 256,
             "codebook_size": 16384, "codebook_embed_dim": 8},
    # Trained by this project on CPU in minutes (`sar-scale tokenizer train`); downsample 8 so
    # 64 px shapes images still get an 8x8 grid; one res block per level keeps a step ~0.3 s.
    # 8 GroupNorm groups keep LlamaGen's >= 4 channels per group: with 1 channel per group the
    # decoder's last norm fixes each output channel's per-image mean, and flat colours come out
    # averaged for hundreds of steps (measured on the shapes data).
    "demo-small": {"ch": 32, "ch_mult": [1, 1, 2, 2], "z_channels": 64, "num_res_blocks": 1,
                   "norm_groups": 8, "codebook_size": 1024, "codebook_embed_dim": 8},
}


def vq_config(name_or_path: str | Path | VQConfig | dict[str, Any],
              overrides: list[str] | None = None) -> VQConfig:
    """Resolve a named preset, a YAML/JSON file, a dict or a config, with dot-list overrides."""
    if isinstance(name_or_path, VQConfig):
        base: dict[str, Any] = name_or_path.model_dump()
    elif isinstance(name_or_path, dict):
        base = dict(name_or_path)
    elif str(name_or_path) in VQ_CONFIGS:
        base = VQConfig.named(str(name_or_path)).model_dump()
    else:
        path = Path(name_or_path)
        if path.suffix == ".json":
            if not path.exists():
                raise ConfigError(f"VQ config file not found: {path}")
            base = json.loads(path.read_text())
        else:
            return load_config(VQConfig, path, overrides)
    return load_config(VQConfig, base, overrides)


# ----------------------------------------------------------------------------------------------
# Building blocks. Names (conv1, norm1, nin_shortcut, q/k/v/proj_out, ...) are the state-dict
# contract with LlamaGen checkpoints; do not rename.


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = _norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _norm(c_out, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x_BCHW)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = x_BCHW if self.nin_shortcut is None else self.nin_shortcut(x_BCHW)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections (via torch SDPA)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x_BCHW.shape
        n = self.norm(x_BCHW)
        # [B, 1, hw, C]: one head of width C, so SDPA's default scale C**-0.5 is LlamaGen's.
        q, k, v = (m(n).reshape(b, 1, c, h * w).transpose(-1, -2) for m in (self.q, self.k, self.v))
        o = F.scaled_dot_product_attention(q, k, v)
        o_BCHW = o.transpose(-1, -2).reshape(b, c, h, w)
        return x_BCHW + self.proj_out(o_BCHW)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Asymmetric (right/bottom) zero padding, as in taming/LlamaGen; conv2d cannot express it.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ``res`` blocks, ``attn`` blocks (last level only), a resampler."""

    def __init__(self) -> None:
        super().__init__()
        self.res = nn.ModuleList()
        self.attn = nn.ModuleList()


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        g, ch, mult = cfg.norm_groups, cfg.ch, cfg.ch_mult
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        c_in = ch
        last = len(mult) - 1
        for i, m in enumerate(mult):
            level = _Level()
            c_out = ch * m
            for _ in range(cfg.num_res_blocks):
                level.res.append(ResnetBlock(c_in, c_out, cfg.dropout, g))
                c_in = c_out
                if i == last:
                    level.attn.append(AttnBlock(c_in, g))
            if i != last:
                level.downsample = Downsample(c_in)
            self.conv_blocks.append(level)
        self.mid = nn.ModuleList([ResnetBlock(c_in, c_in, cfg.dropout, g), AttnBlock(c_in, g),
                                  ResnetBlock(c_in, c_in, cfg.dropout, g)])
        self.norm_out = _norm(c_in, g)
        self.conv_out = nn.Conv2d(c_in, cfg.z_channels, 3, padding=1)

    def forward(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x_B3HW)
        for level in self.conv_blocks:
            for i, res in enumerate(level.res):
                h = res(h)
                if len(level.attn):
                    h = level.attn[i](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        g, ch, mult = cfg.norm_groups, cfg.ch, cfg.ch_mult
        c_in = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c_in, 3, padding=1)
        self.mid = nn.ModuleList([ResnetBlock(c_in, c_in, cfg.dropout, g), AttnBlock(c_in, g),
                                  ResnetBlock(c_in, c_in, cfg.dropout, g)])
        self.conv_blocks = nn.ModuleList()
        last = len(mult) - 1
        for i in reversed(range(len(mult))):
            level = _Level()
            c_out = ch * mult[i]
            for _ in range(cfg.num_res_blocks + 1):
                level.res.append(ResnetBlock(c_in, c_out, cfg.dropout, g))
                c_in = c_out
                if i == last:
                    level.attn.append(AttnBlock(c_in, g))
            if i != 0:
                level.upsample = Upsample(c_in)
            self.conv_blocks.append(level)
        self.norm_out = _norm(c_in, g)
        self.conv_out = nn.Conv2d(c_in, 3, 3, padding=1)

    def forward(self, z_BZhw: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z_BZhw)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            for i, res in enumerate(level.res):
                h = res(h)
                if len(level.attn):
                    h = level.attn[i](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook lookup; distances always in fp32 so bf16 runs pick the same
    codes wherever the fp32 latents would."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.l2_norm = cfg.codebook_l2_norm
        self.beta = cfg.commit_loss_beta
        self.entropy_loss_ratio = cfg.entropy_loss_ratio
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.codebook_embed_dim)
        with torch.no_grad():
            if not self.embedding.weight.is_meta:
                self.embedding.weight.uniform_(-1.0 / cfg.codebook_size, 1.0 / cfg.codebook_size)
                if self.l2_norm:
                    self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))
        # Kept for checkpoint compatibility (LlamaGen stores recent code ids here, as floats).
        self.register_buffer("codebook_used", torch.zeros(_USAGE_BUFFER))

    def codebook(self) -> torch.Tensor:
        """The [K, D] fp32 codebook as used for lookups (normalised when l2_norm)."""
        e_KD = self.embedding.weight.float()
        return F.normalize(e_KD, dim=-1) if self.l2_norm else e_KD

    def indices(self, z_ND: torch.Tensor) -> torch.Tensor:
        """Code id of each latent row (fp32 squared distance, same expansion as LlamaGen)."""
        e_KD = self.codebook()
        z_ND = z_ND.float()
        if self.l2_norm:
            z_ND = F.normalize(z_ND, dim=-1)
        d_NK = (z_ND.pow(2).sum(1, keepdim=True) + e_KD.pow(2).sum(1)
                - 2 * torch.einsum("nd,dk->nk", z_ND, e_KD.t()))
        return d_NK.argmin(dim=1)

    def forward(self, z_BDhw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Quantise; returns (z_q with straight-through gradient, codes_Bhw, losses)."""
        b, d, h, w = z_BDhw.shape
        z_BhwD = z_BDhw.permute(0, 2, 3, 1).float()
        if self.l2_norm:
            z_BhwD = F.normalize(z_BhwD, dim=-1)
        idx_N = self.indices(z_BhwD.reshape(-1, d))
        zq_BhwD = self.codebook()[idx_N].view(b, h, w, d)
        losses: dict[str, torch.Tensor] = {}
        if self.training:
            losses["codebook"] = F.mse_loss(zq_BhwD, z_BhwD.detach())
            losses["commit"] = self.beta * F.mse_loss(z_BhwD, zq_BhwD.detach())
            if self.entropy_loss_ratio > 0:
                losses["entropy"] = self.entropy_loss_ratio * _entropy_loss(z_BhwD.reshape(-1, d),
                                                                            self.codebook())
        if self.training:  # kept for dead-code restarts in the trainer (not part of the model)
            self.last_latents_ND = z_BhwD.detach().reshape(-1, d)
        zq_BhwD = z_BhwD + (zq_BhwD - z_BhwD).detach()
        return zq_BhwD.permute(0, 3, 1, 2).to(z_BDhw.dtype), idx_N.view(b, h, w), losses


def _entropy_loss(z_ND: torch.Tensor, e_KD: torch.Tensor, temperature: float = 0.01) -> torch.Tensor:
    """Per-sample entropy minus batch-average entropy of soft assignments (LlamaGen/MaskGIT):
    low per-sample entropy keeps codes decisive, high average entropy spreads usage."""
    logits = -torch.cdist(z_ND, e_KD).pow(2) / temperature
    p = logits.softmax(-1)
    sample_entropy = -(p * logits.log_softmax(-1)).sum(-1).mean()
    avg = p.mean(0)
    return sample_entropy + (avg * torch.log(avg + 1e-5)).sum()


class VQModel(nn.Module):
    """Image <-> code-grid tokenizer. ``encode``/``decode`` are inference APIs (no grad);
    ``forward`` is the training path (reconstruction + codes + VQ losses)."""

    def __init__(self, config: VQConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.codebook_embed_dim, config.z_channels, 1)

    @property
    def downsample(self) -> int:
        return self.config.downsample

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    def _check_images(self, images_B3HW: torch.Tensor) -> None:
        if images_B3HW.dim() != 4 or images_B3HW.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(images_B3HW.shape)}")
        h, w = images_B3HW.shape[-2:]
        ds = self.downsample
        if h % ds or w % ds:
            raise ValueError(f"image size {h}x{w} is not divisible by the VQ downsample factor {ds}")

    def quantize_latents(self, images_B3HW: torch.Tensor):
        """Encoder + quant_conv + codebook lookup (with gradients): (z_q_BDhw, codes_Bhw, losses)."""
        z = self.quant_conv(self.encoder(images_B3HW.to(self.dtype)))
        return self.quantize(z)

    def decode_latents(self, zq_BDhw: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(zq_BDhw.to(self.dtype)))

    def forward(self, images_B3HW: torch.Tensor):
        """Training path: (reconstruction_B3HW, codes_Bhw, vq_losses)."""
        self._check_images(images_B3HW)
        zq, codes, losses = self.quantize_latents(images_B3HW)
        return self.decode_latents(zq), codes, losses

    @torch.inference_mode()
    def encode(self, images_B3HW: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Images in [-1, 1] -> codes_Bhw (int64). ``dtype=torch.bfloat16`` runs the convs under
        autocast (the codebook lookup stays fp32)."""
        self._check_images(images_B3HW)
        with _autocast(images_B3HW.device, dtype):
            _, codes_Bhw, _ = self.quantize_latents(images_B3HW)
        return codes_Bhw.long()

    @torch.inference_mode()
    def decode(self, codes_Bhw: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """codes_Bhw (int) -> images_B3HW (fp32, roughly in [-1, 1]; not clamped)."""
        if codes_Bhw.dim() != 3:
            raise ValueError(f"codes must be [B, h, w], got shape {tuple(codes_Bhw.shape)}")
        k = self.config.codebook_size
        if codes_Bhw.numel() and (int(codes_Bhw.min()) < 0 or int(codes_Bhw.max()) >= k):
            raise ValueError(f"code ids must be in [0, {k}), got range "
                             f"[{int(codes_Bhw.min())}, {int(codes_Bhw.max())}]")
        zq_BDhw = self.quantize.codebook()[codes_Bhw.long()].permute(0, 3, 1, 2)
        with _autocast(codes_Bhw.device, dtype):
            out = self.decode_latents(zq_BDhw)
        return out.float()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def build_vq(config: VQConfig | str, device: str | torch.device | None = None) -> VQModel:
    """Build a VQModel from a config or preset name (``device="meta"`` builds with no memory)."""
    cfg = vq_config(config) if not isinstance(config, VQConfig) else config
    if device is not None:
        with torch.device(device):
            return VQModel(cfg)
    return VQModel(cfg)


# ----------------------------------------------------------------------------------------------
# Checkpoints

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def save_vq(model: VQModel, out_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (atomically, via rename) into ``out_dir``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(out / WEIGHTS_NAME) as tmp_w:
        save_file(state, str(tmp_w), metadata={"format": "pt", "arch": "llamagen-vq"})
    meta = {"arch": "llamagen-vq", "downsample": model.downsample, **(extra or {})}
    atomic_write_json(out / CONFIG_NAME, {"config": model.config.model_dump(), "meta": meta})
    return out


def _read_config_json(path: Path) -> VQConfig:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if isinstance(data, dict) and "config" in data and isinstance(data["config"], dict):
        data = data["config"]
    return load_config(VQConfig, data)


def infer_vq_config(state: dict[str, torch.Tensor]) -> VQConfig:
    """Recover the architecture from a LlamaGen-style state dict's key shapes.

    ``codebook_l2_norm`` cannot be read from weights; it is True as in all LlamaGen releases.
    """
    need = ["encoder.conv_in.weight", "quant_conv.weight", "quantize.embedding.weight"]
    missing = [k for k in need if k not in state]
    if missing:
        raise ValueError(f"cannot infer the VQ config: state dict lacks {missing} "
                         f"(is this a LlamaGen VQ checkpoint?)")
    ch = state["encoder.conv_in.weight"].shape[0]
    levels = sorted({int(m.group(1)) for k in state
                     if (m := re.match(r"encoder\.conv_blocks\.(\d+)\.", k))})
    ch_mult = [state[f"encoder.conv_blocks.{i}.res.0.conv1.weight"].shape[0] // ch for i in levels]
    n_res = len({int(m.group(1)) for k in state
                 if (m := re.match(r"encoder\.conv_blocks\.0\.res\.(\d+)\.", k))})
    k, d = state["quantize.embedding.weight"].shape
    return VQConfig(ch=ch, ch_mult=ch_mult, num_res_blocks=n_res,
                    z_channels=state["quant_conv.weight"].shape[1],
                    codebook_size=k, codebook_embed_dim=d)


def _load_torch_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    # LlamaGen training checkpoints also pickle the argparse Namespace under "args"; allow just
    # that class so weights_only loading still works on them.
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - re-raised with the file named
            raise ValueError(f"{path}: cannot read torch checkpoint with weights_only=True: {e}") from e
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: expected a dict checkpoint, got {type(ckpt).__name__}")
    # Same preference as LlamaGen's own demo loader: EMA weights, then "model", then "state_dict".
    for key in ("ema", "model", "state_dict"):
        if isinstance(ckpt.get(key), dict):
            log.info("loading VQ weights from %s[%r]", path, key)
            return ckpt[key]
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return ckpt
    raise ValueError(f"{path}: no VQ weights found (looked for keys 'ema', 'model', 'state_dict'; "
                     f"top-level keys: {sorted(ckpt)[:10]})")


def _strict_load(model: VQModel, state: dict[str, torch.Tensor], source: str) -> None:
    if state and all(k.startswith("module.") for k in state):  # saved from a DDP wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    expected = model.state_dict()
    if "quantize.codebook_used" not in state:  # LlamaGen with codebook_show_usage=False
        state = {**state, "quantize.codebook_used": torch.zeros(_USAGE_BUFFER)}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        parts = [f"VQ checkpoint {source} does not match the config "
                 f"(ch={model.config.ch}, ch_mult={model.config.ch_mult}, "
                 f"codebook={model.config.codebook_size}x{model.config.codebook_embed_dim}):"]
        if missing:
            parts.append(f"  missing keys ({len(missing)}): {missing[:5]}")
        if unexpected:
            parts.append(f"  unexpected keys ({len(unexpected)}): {unexpected[:5]}")
        if shapes:
            parts.append(f"  shape mismatches ({len(shapes)}): {shapes[:5]}")
        raise ValueError("\n".join(parts))
    model.load_state_dict(state, strict=True)


def load_vq(path: str | Path, config: VQConfig | str | None = None,
            device: str | torch.device = "cpu") -> VQModel:
    """Load a VQ strictly, in eval mode.

    ``path``: a directory (``config.json`` + ``model.safetensors``, as :func:`save_vq` writes),
    a LlamaGen ``.pt``/``.pth``/``.ckpt`` (weights under ``"model"``/``"ema"``), or a
    ``.safetensors`` file. ``config`` (a VQConfig or preset name) overrides ``config.json``;
    without either the architecture is inferred from the key shapes.
    """
    from safetensors.torch import load_file

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"VQ checkpoint not found: {p}")
    cfg_file: Path | None = None
    if p.is_dir():
        weights = p / WEIGHTS_NAME
        if not weights.exists():
            found = sorted(x.name for x in p.iterdir())[:10]
            raise FileNotFoundError(f"{p}: no {WEIGHTS_NAME} in this directory (found {found})")
        cfg_file = p / CONFIG_NAME if (p / CONFIG_NAME).exists() else None
        state = load_file(str(weights))
    elif p.suffix == ".safetensors":
        state = load_file(str(p))
        cfg_file = p.parent / CONFIG_NAME if (p.parent / CONFIG_NAME).exists() else None
    elif p.suffix in (".pt", ".pth", ".ckpt", ".bin"):
        state = _load_torch_checkpoint(p)
    else:
        raise ValueError(f"{p}: unknown VQ checkpoint format (want a directory, .safetensors or .pt)")

    if config is not None:
        cfg = vq_config(config)
    elif cfg_file is not None:
        cfg = _read_config_json(cfg_file)
    else:
        cfg = infer_vq_config(state)
        log.info("inferred VQ config from %s: %s", p, cfg.model_dump())
    model = build_vq(cfg)
    _strict_load(model, state, str(p))
    return model.to(device).eval()


__all__ = [
    "VQ_CONFIGS",
    "VQConfig",
    "VQModel",
    "build_vq",
    "infer_vq_config",
    "load_vq",
    "save_vq",
    "vq_config",
]
