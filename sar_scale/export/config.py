"""``config.json`` of an export: everything a loader needs besides the weights, strictly typed.

An export directory is self-contained::

    config.json                      this file (ExportConfig)
    model.safetensors                weights, or model-0000i-of-0000n.safetensors + model.safetensors.index.json
    vq/                              the image tokenizer (sar_scale.tokenizers.vq.save_vq layout)
    text_encoder/                    transformers model + tokenizer (text-conditional models only)
    README.md                        model card

A loader refuses a config.json with unknown keys or a newer ``format_version`` (no silent guessing).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from sar_scale.config import ConfigError, StrictModel, load_config
from sar_scale.sar.intervals import INTERVALS, Intervals
from sar_scale.sar.orders import ORDERS, Order
from sar_scale.sar.recipe import Recipe
from sar_scale.utils.atomic import atomic_write_json

if TYPE_CHECKING:
    from sar_scale.models import FMTConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_PATTERN = "model{suffix}.safetensors"
FORMAT = "sar-scale"
FORMAT_VERSION = 1
DTYPES = ("fp32", "bf16", "fp16")


class SamplingDefaults(StrictModel):
    """The sampling recipe a pipeline uses when the caller does not say otherwise."""

    order: Order = Field("random", description=f"sequence order, one of {ORDERS}")
    num_sets: int = Field(16, ge=1, description="steps K (clipped to the number of tokens)")
    intervals: Intervals = Field("cosine", description=f"set sizes rule, one of {INTERVALS}")
    cfg_scale: float = Field(1.0, ge=0.0, description="classifier-free guidance (1 = off)")
    cfg_schedule: Literal["constant", "linear"] = "constant"
    temperature: float = Field(1.0, ge=0.0, description="0 = greedy")
    top_k: int = Field(0, ge=0, description="0 = off")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="1 = off")
    fixed_order_seed: int = Field(0, description="seed of the 'fixed_random' order used in training")
    subsample_stride: int = Field(2, ge=1, description="stride of the 'subsample' order")

    @property
    def recipe(self) -> Recipe:
        return Recipe(self.order, self.num_sets, self.intervals)


class VQRef(StrictModel):
    path: str = Field("vq", description="directory relative to the export")
    downsample: int = Field(..., ge=1)
    codebook_size: int = Field(..., ge=2)
    source: str | None = Field(None, description="where it was copied from (redacted)")


class TextEncoderRef(StrictModel):
    path: str = Field("text_encoder", description="directory relative to the export")
    dim: int = Field(..., ge=1)
    max_length: int = Field(..., ge=1, description="tokenizer truncation length used in training; the "
                            "pipeline then keeps the first model.max_text_len features")
    padding_side: Literal["right", "left"] = "right"
    source: str | None = None


class WeightsInfo(StrictModel):
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    ema: bool = Field(False, description="EMA weights rather than the raw trained weights")
    sharded: bool = False
    files: list[str] = Field(default_factory=list)
    num_parameters: int = 0


class SourceInfo(StrictModel):
    """Where the weights came from (never secrets: URLs are redacted)."""

    checkpoint: str | None = None
    kind: str | None = Field(None, description="zero (zero_to_fp32), universal, stage0, or state_dict")
    global_step: int | None = None
    zero_stage: int | None = None
    world_size: int | None = None
    precision: str | None = None
    mlflow_run_id: str | None = None
    stages: list[dict[str, Any]] = Field(default_factory=list)
    last_loss: float | None = None


class Verification(StrictModel):
    probe: dict[str, Any] = Field(default_factory=dict)
    max_abs_logit_diff: float | None = Field(None, description="reloaded export vs checkpoint, same dtype")
    max_abs_logit_diff_vs_fp32: float | None = Field(None, description="export dtype vs fp32 master weights")
    passed: bool = False


class ExportConfig(StrictModel):
    format: Literal["sar-scale"] = FORMAT
    format_version: int = FORMAT_VERSION
    model: dict[str, Any] = Field(..., description="FMTConfig of the model (model_dump)")
    vq: VQRef
    text_encoder: TextEncoderRef | None = None
    resolutions: list[int] = Field(default_factory=list, description="base resolutions trained on (px)")
    default_resolution: int | None = Field(None, description="height = width used when none is given")
    sampling: SamplingDefaults = Field(default_factory=SamplingDefaults)
    weights: WeightsInfo = Field(default_factory=WeightsInfo)
    source: SourceInfo = Field(default_factory=SourceInfo)
    verification: Verification | None = None
    sar_scale_version: str | None = None
    created: str | None = None

    @field_validator("format_version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v > FORMAT_VERSION:
            raise ValueError(f"format_version {v} is newer than this sar-scale understands ({FORMAT_VERSION}); "
                             "upgrade sar-scale")
        return v

    @model_validator(mode="after")
    def _check(self) -> ExportConfig:
        from sar_scale.models import get_config

        cfg = get_config(self.model)
        if cfg.vocab_size != self.vq.codebook_size:
            raise ValueError(f"model.vocab_size ({cfg.vocab_size}) != vq.codebook_size ({self.vq.codebook_size})")
        if cfg.cond == "text":
            if self.text_encoder is None:
                raise ValueError("a text-conditional model needs a 'text_encoder' entry")
            if self.text_encoder.dim != cfg.text_dim:
                raise ValueError(f"text_encoder.dim ({self.text_encoder.dim}) != model.text_dim ({cfg.text_dim})")
        return self

    def fmt_config(self) -> FMTConfig:
        from sar_scale.models import get_config

        return get_config(self.model)


def read_export_config(export_dir: str | Path) -> ExportConfig:
    """Load and validate ``export_dir/config.json``; errors name the file and the field."""
    path = Path(export_dir) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (is {export_dir} a sar-scale export? "
                                f"create one with `sar-scale export`)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ConfigError(f"{path}: not a sar-scale export config (format={data.get('format')!r} "
                          f"if a dict, expected {FORMAT!r})" if isinstance(data, dict)
                          else f"{path}: top level must be a JSON object")
    try:
        return load_config(ExportConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def write_export_config(cfg: ExportConfig, export_dir: str | Path) -> Path:
    return atomic_write_json(Path(export_dir) / CONFIG_NAME, cfg.model_dump(mode="json"))


__all__ = ["CONFIG_NAME", "DTYPES", "FORMAT", "FORMAT_VERSION", "WEIGHTS_INDEX_NAME", "WEIGHTS_NAME",
           "WEIGHTS_PATTERN", "ExportConfig", "SamplingDefaults", "SourceInfo", "TextEncoderRef", "VQRef",
           "Verification", "WeightsInfo", "read_export_config", "write_export_config"]
