"""Typed config of `sar-scale data prepare` (strict: unknown keys are errors)."""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import Field, field_validator, model_validator

from sar_scale.config import StrictModel
from sar_scale.data.decode import DecodeConfig


class InputConfig(StrictModel):
    """Where the raw image-text pairs are."""

    kind: Literal["folder", "manifest", "webdataset", "imagefolder"] = "folder"
    """folder: images + same-stem .txt (recursive); manifest: JSONL/Parquet rows; webdataset: tars;
    imagefolder: class-conditional ``root/<class_name>/<image>`` (ImageNet train layout), the class
    name as caption and ``extra.class_id`` in each sample's json, ``classes.json`` in the output."""
    path: str = ""
    """Folder (local or s3://bucket/prefix), manifest file (.jsonl/.parquet, local or s3://), or tars: a
    directory/prefix holding *.tar, one .tar, or a brace pattern like data-{000000..000009}.tar."""
    image_column: str = "image"
    """Manifest column with the image path (relative to the manifest's folder) or s3:// URL; http(s)
    URLs are rejected (download them first)."""
    caption_column: str = "caption"
    """Manifest column with the caption."""
    id_column: str | None = None
    """Manifest column with a unique source id (default: the image path)."""
    class_map: str | None = None
    """imagefolder: a class-id mapping file, JSON ``{"class_name": id}`` or text with one class name per
    line (id = line number from 0); folders not in it are rejected (unknown_class). Default: ids from the
    sorted class folder names."""
    flip: bool = False
    """imagefolder: also tokenize a horizontally flipped copy of every image as an extra sample
    (``<id>#flip``, ``extra.flip``), as LlamaGen/MAR pre-tokenize flips. Off for data where left/right
    is part of the label (shapes positions)."""
    files_per_unit: int = Field(256, ge=1)
    """Inputs per scan task for folders; one task per tar (webdataset) and per Parquet row group."""
    manifest_chunk_bytes: int = Field(8 << 20, ge=1)
    """JSONL manifests are scanned in byte ranges of this size (one scan task each)."""


class ScorerConfig(StrictModel):
    """Optional model-based score (e.g. CLIP image-text similarity); skipped when model_path is unset."""

    kind: Literal["clip"] = "clip"
    """Scorer type: clip = cosine similarity of CLIP image and text embeddings."""
    model_path: str | None = None
    """Local directory of a transformers CLIPModel + processor; None disables the stage."""
    min_score: float | None = None
    """Reject samples scoring below this (low_score); None = only record the score."""


class FilterConfig(StrictModel):
    """Per-sample filters; each rejection is counted under its reason."""

    min_side: int = Field(64, ge=1)
    """Reject images whose shorter side (after EXIF rotation) is below this (too_small)."""
    max_aspect: float = Field(4.0, ge=1.0)
    """Reject images with long/short side above this (aspect_ratio)."""
    caption_min_words: int = Field(1, ge=0)
    """Reject captions with fewer words (caption_too_short)."""
    caption_min_chars: int = Field(1, ge=0)
    """Reject captions with fewer characters (caption_too_short)."""
    caption_max_chars: int = Field(1000, ge=1)
    """Reject captions longer than this after cleaning (caption_too_long)."""
    exact_dedup: bool = True
    """Drop exact duplicates (same decoded pixels) - the first source id in sorted order is kept."""
    near_dedup: bool = True
    """Drop near duplicates by perceptual hash (imagehash.phash)."""
    phash_max_distance: int = Field(4, ge=0, le=20)
    """Hamming distance (of 64 bits) at or below which two images are near duplicates."""
    scorer: ScorerConfig = ScorerConfig()


class TokenizeConfig(StrictModel):
    """VQ tokenization per base resolution (+ optional text features)."""

    vq_path: str | None = None
    """VQ checkpoint (directory with config.json + model.safetensors, or LlamaGen .pt). Required."""
    resolutions: list[int] = [256]
    """Base resolutions (e.g. the curriculum's 256 and 512); each multiple of the smallest."""
    max_ratio: float = Field(4.0, ge=1.0)
    """Largest bucket aspect ratio (long/short)."""
    batch_size: int = Field(16, ge=1)
    """Images per VQ forward in a tokenizer actor."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the tokenizer actors run the VQ / text encoder / scorer: auto = cuda when the actor was
    given a GPU (ray.actor_num_gpus > 0) and torch sees one, else cpu."""
    load_threads: int = Field(2, ge=1)
    """Threads per tokenizer actor that read + decode + resize the next batch while one is encoded."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Autocast dtype of the VQ encoder convs (the codebook lookup is always fp32)."""
    text_encoder_path: str | None = None
    """Local text encoder dir (TextEncoder.from_pretrained); writes text.npy float16 features when set."""
    text_max_length: int = Field(120, ge=1)
    """Maximum caption tokens for text features."""

    @field_validator("resolutions")
    @classmethod
    def _res(cls, v: list[int]) -> list[int]:
        if not v or any(r <= 0 for r in v):
            raise ValueError("resolutions must be a non-empty list of positive integers")
        v = sorted(set(v))
        for r in v:
            if r % v[0]:
                raise ValueError(f"resolution {r} must be an integer multiple of the smallest ({v[0]}) "
                                 "so buckets are scaled copies")
        return v


class OutputConfig(StrictModel):
    """Where and how shards are written."""

    url: str = "shards"
    """Local directory (default) or s3://bucket/prefix."""
    name: str = "data"
    """Shard name prefix: {name}-000000.tar."""
    samples_per_shard: int = Field(1000, ge=1)
    """Accepted samples per shard (the last shard may be smaller)."""
    thumbnail_size: int = Field(0, ge=0)
    """Short side of an optional JPEG thumbnail per sample (0 = none)."""
    overwrite: bool = False
    """Delete shards written by a different config instead of refusing to mix them."""
    mode: Literal["create", "append"] = "create"
    """create: the output holds this config's dataset (a rerun resumes / is a no-op); append: add this
    run's inputs as new shards to the existing dataset, deduplicated against it (committed shards are
    never touched; the same append rerun is a no-op)."""
    s3_multipart_mb: int = Field(64, ge=5)
    """S3 output: shards above this size are uploaded in parts of this size (S3's minimum is 5 MiB)."""


class RayConfig(StrictModel):
    """Cluster and parallelism."""

    address: str | None = None
    """Join this Ray cluster as ``ray.init`` takes it: ``auto`` (on a node of the cluster), ``HOST:6379``
    or ``ray://HOST:10001`` (Ray Client); None = start a local one. Not the dashboard's http:// address,
    which is for `sar-scale submit --backend ray`."""
    num_cpus: int | None = None
    """CPUs of the local Ray (None = all of this machine's)."""
    tokenize_actors: int = Field(1, ge=1)
    """Tokenizer actors (each loads the VQ once)."""
    actor_num_cpus: float = Field(1.0, gt=0)
    """CPUs reserved per tokenizer (shard writer) actor (also its torch thread count, rounded up)."""
    actor_num_gpus: float = Field(0.0, ge=0)
    """GPUs per tokenizer actor (e.g. 1, or 0.5 to pack two on a GPU); 0 = CPU."""
    load_num_cpus: float = Field(0.25, gt=0)
    """CPUs per dedup / planning task (the staging shuffles); fractional so they schedule on busy nodes."""
    scan_num_cpus: float = Field(0.5, gt=0)
    """CPUs per scan (read + validate + hash) task."""
    partitions: int = Field(4, ge=1, le=4096)
    """Hash/range partitions of the dedup and planning stages (one task each per stage); about
    samples / 100k at scale."""
    max_inflight: int = Field(0, ge=0)
    """Scan tasks in flight at once (0 = 2 x the cluster's CPUs): bounds the driver's memory."""
    progress_bars: bool = False
    """Show Ray Data's own progress bars (ours are always shown)."""

    @field_validator("address")
    @classmethod
    def _not_dashboard(cls, v: str | None) -> str | None:
        if v and v.startswith(("http://", "https://")):
            raise ValueError(f"ray.address {v!r} is a dashboard / Jobs API URL, which ray.init does not join: "
                             "use auto, HOST:6379 or ray://HOST:10001, or submit the job with "
                             "`sar-scale submit --backend ray -- data prepare ...`")
        return v


class PrepareConfig(StrictModel):
    """`sar-scale data prepare`: inputs -> validate/filter -> bucket -> tokenize -> shards."""

    input: InputConfig = InputConfig()
    decode: DecodeConfig = DecodeConfig()
    filters: FilterConfig = FilterConfig()
    tokenize: TokenizeConfig = TokenizeConfig()
    output: OutputConfig = OutputConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _check(self) -> PrepareConfig:
        if not self.input.path:
            raise ValueError("input.path is required (a folder, manifest file or tar location)")
        if self.input.kind != "imagefolder" and (self.input.class_map or self.input.flip):
            raise ValueError("input.class_map and input.flip apply to input.kind: imagefolder only")
        return self

    def content_hash(self) -> str:
        """Hash of everything that changes shard contents (not where they go or how fast)."""
        data = json.loads(self.model_dump_json(exclude={"ray": True, "output": {"url", "overwrite"}}))
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
