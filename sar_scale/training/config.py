"""TrainConfig: the one typed, strict description of a training run.

Layering: class defaults < YAML (``defaults: base.yaml`` chains) < ``key.sub=value`` overrides,
loaded with :func:`sar_scale.config.load_config`. Each section belongs to one component and is the
only thing that component sees (the DeepSpeed section goes to
:func:`sar_scale.distributed.deepspeed_config`, the checkpoint section to the checkpoint manager,
and so on). The resolved config is written to the run folder, with secrets redacted.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from sar_scale.config import StrictModel
from sar_scale.sar.plan import PlanDistribution


class ModelSection(StrictModel):
    """Which FMT to train."""

    name: str = Field("debug", description="named size (debug, demo, fmt-b, fmt-l, fmt-xl, t2i-900m)")
    overrides: dict[str, Any] = Field(default_factory=dict,
                                      description="FMTConfig field overrides, e.g. {vocab_size: 1024}")
    activation_checkpointing: bool = Field(False, description="recompute each block in backward")
    compile: bool = Field(False, description="torch.compile each encoder/decoder block (torchtitan-style "
                          "per-block compile; shapes are static per bucket, so a bucket compiles once); "
                          "flex attention is compiled inside the blocks (CUDA; on the CPU forward only)")


class DataSection(StrictModel):
    """Where the shards are and how a batch becomes a model input."""

    url: str | None = Field(None, description="shard root: local dir or s3://bucket/prefix (stage may override)")
    cond: Literal["auto", "class", "text_features", "text_encoder"] = Field(
        "auto", description="class ids from the sample json, stored text.npy features, or encode captions "
        "on the fly with text_encoder; auto = class for class models, else features if the manifest "
        "has them, else the encoder")
    text_encoder: str | None = Field(None, description="local TextEncoder directory (cond=text_encoder)")
    class_field: str = Field("extra.class_id", description="dotted path of the class id in the sample json")
    num_workers: int = Field(4, ge=0, description="threads per rank fetching shard pieces concurrently "
                             "(0 = fetch in the training thread, no read-ahead)")
    prefetch_factor: int = Field(2, ge=1, description="micro-batches assembled ahead by a background thread")
    window: int = Field(4, ge=1, description="shuffle window: samples are shuffled within windows of this "
                        "many consecutive shards (pieces) of a rank's lane; bigger = more random, more open")
    prefetch_shards: int = Field(4, ge=0, description="pieces (usually whole shards) fetched ahead of the "
                                 "windows in use; a rank holds at most (aspect buckets x grad_accum) x 2 x "
                                 "window + this many pieces (logged at each stage start)")
    piece_bytes: int | None = Field(256 * 2**20, ge=1 << 16, description="most bytes of a shard read by one "
                                    "request and held while its window is open (a 10k-sample shard of 900M "
                                    "samples is ~5 GB); smaller shards are read whole; null = whole shards")
    cache_dir: str | None = Field(None, description="local disk cache of fetched shard pieces (per rank "
                                  "subfolder), reused by later epochs and restarts; off when unset")
    cache_bytes: int = Field(0, ge=0, description="size bound of cache_dir per rank (least recently used "
                             "pieces evicted; 0 = no cache)")
    last_batch: Literal["wrap", "drop"] = Field(
        "wrap", description="a bucket's last partial global batch: fill it from the start of the "
        "bucket's shuffled order (every sample seen each epoch) or drop it")


class OptimSection(StrictModel):
    """AdamW + learning-rate schedule defaults (a stage may override lr/warmup/schedule)."""

    lr: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = Field(0.05, ge=0)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0, description="global grad-norm clip (0 = off)")
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    decay_1d: bool = Field(False, description="apply weight decay to 1-D params (norms, biases) too")
    implementation: Literal["auto", "fused", "foreach", "for-loop"] = Field(
        "auto", description="torch AdamW kernel: auto = fused (one kernel over all tensors; on CUDA and the "
        "CPU), foreach = batched per-tensor ops, for-loop = one tensor at a time")

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError(f"betas must be in [0, 1), got {v}")
        return v


class DeepSpeedSection(StrictModel):
    """DeepSpeed engine settings; :func:`sar_scale.distributed.deepspeed_config` turns them into JSON."""

    zero_stage: Literal[0, 1, 2, 3] = Field(1, description="ZeRO stage 0/1/2/3")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto = bf16 on CUDA with bf16 support, fp32 on CPU (bf16 is slower there)")
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="auto = nccl on CUDA, gloo on CPU")
    timeout_s: float = Field(600.0, gt=0, description="collective timeout: a dead rank makes the others "
                             "fail after at most this long instead of hanging")
    overlap_comm: bool = Field(False, description="overlap gradient reduction with backward (GPU)")
    reduce_bucket_size: int = Field(50_000_000, ge=1)
    contiguous_gradients: bool | None = Field(
        None, description="copy gradients into one contiguous buffer during backward (avoids memory "
        "fragmentation on GPUs); unset = on for CUDA, off on the CPU, where the per-parameter copies cost "
        "~5% of a step and there is no allocator fragmentation to avoid")
    offload_optimizer: Literal["none", "cpu"] = Field("none", description="ZeRO-Offload of optimizer state")
    gather_16bit_weights_on_model_save: bool = Field(
        True, description="ZeRO-3: also save a consolidated 16-bit state dict (for exports)")
    extra: dict[str, Any] = Field(default_factory=dict,
                                  description="raw DeepSpeed JSON merged over the generated config")


class EMASection(StrictModel):
    enabled: bool = False
    decay: float = Field(0.9999, gt=0, lt=1)
    every: int = Field(1, ge=1, description="update every N optimizer steps")


class StageConfig(StrictModel):
    """One curriculum stage: a resolution trained for ``steps`` optimizer steps."""

    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    resolution: int = Field(..., gt=0, description="base resolution: the loader reads tokens_{resolution}.npy")
    steps: int = Field(..., ge=1, description="optimizer steps in this stage")
    micro_batch: int | None = Field(None, ge=1, description="samples per rank per micro step")
    tokens_per_batch: int | None = Field(None, ge=1, description="tokens per rank per micro step: the "
                                         "micro batch of a bucket is tokens_per_batch // (h*w)")
    grad_accum: int = Field(1, ge=1)
    lr: float | None = Field(None, gt=0, description="peak lr (default optim.lr)")
    warmup: int | None = Field(None, ge=0, description="warmup steps (default optim.warmup_steps)")
    schedule: Literal["cosine", "constant"] | None = None
    data_url: str | None = Field(None, description="shard root for this stage (default data.url)")
    rope_scaling: Literal["none", "linear", "ntk"] | None = Field(
        None, description="RoPE extrapolation for this stage (default: the model's), e.g. ntk at a higher "
        "resolution than rope_train_grid")
    rope_train_grid: tuple[int, int] | None = Field(None, description="token grid RoPE was trained on")
    optimizer_state: Literal["reset", "keep"] = Field(
        "reset", description="at the start of this stage: fresh AdamW moments or the previous stage's")

    @model_validator(mode="after")
    def _batch(self) -> StageConfig:
        if (self.micro_batch is None) == (self.tokens_per_batch is None):
            raise ValueError(f"stage {self.name!r}: set exactly one of micro_batch or tokens_per_batch")
        return self


class CurriculumSection(StrictModel):
    stages: list[StageConfig] = Field(..., min_length=1)

    @field_validator("stages")
    @classmethod
    def _unique(cls, v: list[StageConfig]) -> list[StageConfig]:
        names = [s.name for s in v]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        return v


class CheckpointSection(StrictModel):
    dir: str | None = Field(None, description="default RUN_DIR/checkpoints; must be visible to rank 0 of "
                            "every node (shared filesystem) in multi-node runs")
    every_steps: int = Field(0, ge=0, description="save every N global steps (0 = only at stage ends)")
    keep_last: int = Field(3, ge=1, description="keep the newest K complete checkpoints")
    keep_stage_ends: bool = Field(True, description="never prune the checkpoint that ends a stage")
    allow_world_size_change: bool = Field(
        True, description="resume a checkpoint written by a different number of ranks (ZeRO 0-2): the "
        "optimizer state is resharded through a DeepSpeed universal checkpoint (converted once, kept under "
        "CHECKPOINT_DIR/universal/), weights, EMA, LR schedule and data position carry over; false = refuse")
    elastic_grad_accum: bool = Field(
        True, description="on a resume with another world size, set the stage's grad_accum to keep the "
        "checkpoint's global batch (grad_accum x world micro-batches) when it divides evenly, so the same "
        "global batches continue; false = use the config's grad_accum (the global batch changes, logged)")
    lease_stale_s: float = Field(
        60.0, gt=0, description="a run directory's lease (RUN_DIR/lease.json, one job writes a run directory) "
        "whose heartbeat is older than this is stale and may be taken over; a holder on this host whose "
        "process is gone is stale at once")
    mirror_url: str | None = Field(None, description="also upload each complete checkpoint here "
                                   "(s3://bucket/prefix or a dir); --resume auto downloads from it "
                                   "when no local checkpoint is good")


class MLflowSection(StrictModel):
    enabled: bool = True
    tracking_uri: str | None = Field(None, description="default: $MLFLOW_TRACKING_URI, else "
                                     "sqlite:///RUN_DIR/mlflow.db (embedded, no server)")
    experiment: str = "sar-scale"
    run_name: str | None = None
    log_every: int = Field(1, ge=1, description="log metrics every N steps")
    system_metrics: bool = Field(False, description="MLflow system metrics (CPU/GPU/memory) sampling")
    vq_path: str | None = Field(None, description="VQ tokenizer dir: decode sample grids at stage ends")
    sample_count: int = Field(4, ge=1, description="images per sample grid")
    sample_num_sets: int = Field(8, ge=1, description="K of the sampling plan (random-K-cosine)")
    sample_cfg_scale: float = Field(1.5, ge=1.0)
    peak_flops: float | None = Field(None, gt=0, description="device peak FLOP/s for the MFU metric")


class TrainConfig(StrictModel):
    """A whole training run (see configs/train/debug.yaml for an annotated example)."""

    run_dir: str = Field("runs/train", description="output folder: config, checkpoints, logs, mlflow.db")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    plan: PlanDistribution = Field(default_factory=PlanDistribution)
    optim: OptimSection = Field(default_factory=OptimSection)
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection)
    ema: EMASection = Field(default_factory=EMASection)
    curriculum: CurriculumSection
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    mlflow: MLflowSection = Field(default_factory=MLflowSection)
    log_every: int = Field(1, ge=1, description="console/metrics.jsonl logging interval (steps)")
    log_data_order: bool = Field(False, description="write each rank's sample keys per step to "
                                 "RUN_DIR/data_order/rank{r}.jsonl (to audit exact resume)")

    @model_validator(mode="after")
    def _data_urls(self) -> TrainConfig:
        for s in self.curriculum.stages:
            if s.data_url is None and self.data.url is None:
                raise ValueError(f"data.url is required (stage {s.name!r} has no data_url)")
        if self.data.cond == "text_encoder" and not self.data.text_encoder:
            raise ValueError("data.text_encoder must be a local directory when data.cond=text_encoder")
        return self

    @model_validator(mode="after")
    def _trainable(self) -> TrainConfig:
        """Refuse, at load time, model/device/compile combinations that cannot take a training step."""
        from sar_scale.models import get_config

        try:
            model_cfg = get_config(self.model.name, **self.model.overrides)
        except ValueError as e:
            raise ValueError(f"model: {e}") from None
        if model_cfg.attn_impl == "flex" and self.on_cpu():
            raise ValueError(
                "model.overrides.attn_impl=flex cannot train on the CPU: torch has no flex-attention backward "
                "there, eager ('FlexAttention does not support backward on CPU') or compiled (inductor's CPU "
                "flex kernels are forward only). Use model.overrides.attn_impl=sdpa (the same logits; "
                "model.compile=true compiles it), or device=cuda")
        if self.model.compile and self.deepspeed.zero_stage == 3:
            raise ValueError(
                "model.compile=true with deepspeed.zero_stage=3 is not supported: ZeRO-3 gathers each "
                "block's parameters in module hooks that would run inside the compiled block graphs. "
                "Use deepspeed.zero_stage 0, 1 or 2 with compile, or model.compile=false with ZeRO-3")
        return self

    def on_cpu(self) -> bool:
        """Whether this run's device resolves to the CPU (``auto`` without CUDA)."""
        from sar_scale.distributed.init import resolve_device

        return self.device != "cuda" and resolve_device(self.device) == "cpu"

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.curriculum.stages)

    def stage_lr(self, i: int) -> float:
        s = self.curriculum.stages[i]
        return s.lr if s.lr is not None else self.optim.lr

    def stage_warmup(self, i: int) -> int:
        s = self.curriculum.stages[i]
        return s.warmup if s.warmup is not None else self.optim.warmup_steps

    def stage_schedule(self, i: int) -> str:
        s = self.curriculum.stages[i]
        return s.schedule or self.optim.schedule

    def stage_data_url(self, i: int) -> str:
        s = self.curriculum.stages[i]
        url = s.data_url or self.data.url
        assert url is not None  # checked by the validator
        return url
