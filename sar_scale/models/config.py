"""FMTConfig and the named model sizes.

Parameter budget per layer (width d, SwiGLU hidden ~8/3 d): encoder ~12 d^2 (attention + MLP),
decoder ~16 d^2 (self + cross attention + MLP). Sizes follow the SAR paper's FMT-B/L/XL
(~125M / 394M / 893M) and its 900M text-to-image model.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from sar_scale.config import StrictModel


class FMTConfig(StrictModel):
    """Fully Masked Transformer hyper-parameters (architecture only)."""

    name: str = Field("custom", description="named size this config came from")
    width: int = Field(768, ge=8, description="model width d")
    enc_layers: int = Field(6, ge=1, description="encoder blocks (set-causal self-attention)")
    dec_layers: int = Field(6, ge=1, description="decoder blocks (set self-attention + cross-attention)")
    heads: int = Field(12, ge=1)
    mlp_hidden: int | None = Field(None, description="SwiGLU hidden size; default 8/3 d rounded up to multiple_of")
    multiple_of: int = Field(256, ge=1)
    vocab_size: int = Field(16384, ge=2, description="image tokenizer codebook size")
    cond: Literal["class", "text"] = Field("class", description="class-conditional or text-conditional")
    num_classes: int = Field(1000, ge=1, description="classes (class cond); id -1 is the null class")
    text_dim: int = Field(2048, ge=1, description="text-encoder feature width (text cond)")
    max_text_len: int = Field(120, ge=1, description="longest text-feature sequence accepted")
    cond_dropout: float = Field(0.1, ge=0.0, le=1.0, description="condition dropout used in training for CFG")
    rope_base: float = Field(10000.0, gt=0)
    rope_scaling: Literal["none", "linear", "ntk"] = Field(
        "none", description="extrapolation past rope_train_grid: linear position interpolation or NTK base scaling")
    rope_train_grid: tuple[int, int] | None = Field(None, description="token grid trained on (for rope_scaling)")
    frac_pos: bool = Field(
        False, description="also embed each image token's fractional position ((row+0.5)/H, (col+0.5)/W), so "
        "'right' or 'bottom' name the same place in every aspect bucket (NaViT-style); absolute positions stay")
    norm_eps: float = Field(1e-5, gt=0)
    qk_norm: bool = Field(False, description="RMSNorm on queries and keys (stabilises large runs)")
    attn_impl: Literal["sdpa", "flex"] = Field("sdpa", description="torch SDPA with boolean masks, or flex attention block masks (CUDA)")
    init_std: float = Field(0.02, gt=0)

    @model_validator(mode="after")
    def _check(self) -> FMTConfig:
        if self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be divisible by heads ({self.heads})")
        if (self.width // self.heads) % 4:
            raise ValueError(f"head dim ({self.width // self.heads}) must be divisible by 4 for 2D RoPE")
        return self

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def hidden(self) -> int:
        if self.mlp_hidden:
            return self.mlp_hidden
        h = int(2 * 4 * self.width / 3)
        return self.multiple_of * ((h + self.multiple_of - 1) // self.multiple_of)


# name -> (overrides, expected parameter range in millions, excluding text encoder and tokenizer)
MODEL_SIZES: dict[str, tuple[dict, tuple[float, float]]] = {
    "debug": (dict(width=64, enc_layers=2, dec_layers=2, heads=4, vocab_size=64, num_classes=10,
                   text_dim=32, max_text_len=16, multiple_of=32), (0.05, 2.0)),
    "demo": (dict(width=256, enc_layers=4, dec_layers=4, heads=4, vocab_size=1024, cond="text",
                  text_dim=128, max_text_len=32, multiple_of=64), (3.0, 20.0)),
    "fmt-b": (dict(width=768, enc_layers=6, dec_layers=6, heads=12), (110.0, 140.0)),
    "fmt-l": (dict(width=1024, enc_layers=12, dec_layers=12, heads=16), (360.0, 420.0)),
    "fmt-xl": (dict(width=1280, enc_layers=18, dec_layers=18, heads=20), (840.0, 940.0)),
    "t2i-900m": (dict(width=1280, enc_layers=18, dec_layers=18, heads=20, cond="text", text_dim=2048,
                      max_text_len=120), (850.0, 950.0)),
}


def get_config(name_or_config: str | dict | FMTConfig, **overrides) -> FMTConfig:
    """A named size (plus overrides), a dict, or an FMTConfig."""
    if isinstance(name_or_config, FMTConfig):
        return name_or_config.model_copy(update=overrides) if overrides else name_or_config
    if isinstance(name_or_config, dict):
        data = dict(name_or_config)
        name = data.pop("name", None)
        if name in MODEL_SIZES:
            return get_config(name, **{**data, **overrides})
        return FMTConfig(**({"name": name} if name else {}), **data, **overrides)
    if name_or_config not in MODEL_SIZES:
        raise ValueError(f"unknown model size {name_or_config!r}; known: {sorted(MODEL_SIZES)}")
    base, _ = MODEL_SIZES[name_or_config]
    return FMTConfig(name=name_or_config, **{**base, **overrides})
