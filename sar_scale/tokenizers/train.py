"""Train (and evaluate) a small LlamaGen-architecture VQ on CPU in minutes.

Weights cannot be downloaded on the project's machines, so the demo and CI use a VQ that this
project trains itself on the synthetic "shapes" images. It goes through exactly the classes and
checkpoint format a LlamaGen VQ-16 uses (``vq.VQModel``/``save_vq``); only the config differs.

Losses: L2 + L1 pixel reconstruction, codebook loss and commitment loss (beta 0.25), optional
LlamaGen entropy loss. LlamaGen's adversarial (PatchGAN) and perceptual (LPIPS/VGG) losses are
left out on purpose: the VGG weights cannot be downloaded here, a GAN needs far more steps than a
CPU budget allows, and flat-coloured synthetic shapes do not need them to reconstruct well.

Shape legend: B batch, S image side (pixels), N images.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import model_validator
from tqdm.auto import tqdm

from sar_scale.config import StrictModel
from sar_scale.tokenizers.vq import VQ_CONFIGS, VQModel, build_vq, save_vq, vq_config

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
_TAR_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


class VQTrainConfig(StrictModel):
    """Everything `sar-scale tokenizer train` needs; written to ``<out>/train_config.json``."""

    data: str
    """Image folder (recursive jpg/png/webp), a webdataset .tar, or a brace pattern of tars."""
    out: str
    """Output directory: config.json + model.safetensors (loadable with vq.load_vq)."""
    vq_preset: str = "demo-small"
    """Named VQ architecture (VQ-16, VQ-8, demo-small) or a YAML/JSON file with a VQConfig."""
    vq: dict[str, Any] = {}
    """Field overrides on top of ``vq_preset`` (e.g. {codebook_size: 512})."""
    image_size: int = 64
    """Training/eval images are resized (short side) and centre-cropped to this square size."""
    steps: int = 1500
    batch_size: int = 16
    lr: float = 2e-3
    """Peak AdamW learning rate (higher than LlamaGen's 1e-4: tiny model, few steps)."""
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup_steps: int = 50
    grad_clip: float = 1.0
    l2_weight: float = 1.0
    l1_weight: float = 1.0
    holdout: float = 0.1
    """Fraction of images held out for the final metrics (at least 1 image)."""
    max_images: int | None = None
    flip: bool = True
    """Random horizontal flips (augmentation)."""
    seed: int = 0
    eval_batch_size: int = 32
    restart_dead_codes_every: int = 50
    """Every N steps, codes unused since the last check are re-seeded from this batch's encoder
    latents (0 disables). Not in LlamaGen; it makes short CPU runs use the codebook far better."""
    threads: int | None = None
    """torch intra-op threads (None: torch's default). 1 is faster on a CPU shared with others."""

    @model_validator(mode="after")
    def _check(self) -> VQTrainConfig:
        for name in ("image_size", "steps", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.holdout < 1.0:
            raise ValueError(f"holdout must be in (0, 1), got {self.holdout}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        ds = self.vq_config().downsample
        if self.image_size % ds:
            raise ValueError(f"image_size {self.image_size} must be divisible by the VQ downsample {ds}")
        return self

    def vq_config(self):
        preset: Any = self.vq_preset if self.vq_preset in VQ_CONFIGS else Path(self.vq_preset)
        base = vq_config(preset)
        return vq_config({**base.model_dump(), **self.vq})


# ----------------------------------------------------------------------------------------------
# Data


@dataclass
class ImageSet:
    """Images decoded once into memory (uint8 [N, 3, S, S]) plus what could not be read."""

    images_N3SS: torch.Tensor
    names: list[str]
    rejects: dict[str, str] = field(default_factory=dict)


def _square(img: Image.Image, size: int) -> np.ndarray:
    """Resize the short side to ``size`` (bicubic) and centre-crop to a square, as uint8 HWC."""
    img = img.convert("RGB")
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


def _iter_folder(root: Path):
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    for p in files:
        yield str(p.relative_to(root)), lambda p=p: p.read_bytes()


def _iter_tars(urls: str):
    import webdataset as wds

    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    for sample in ds:
        key = sample.get("__key__", "?")
        data = next((sample[k] for k in _TAR_IMAGE_KEYS if k in sample), None)
        if data is None:
            yield f"{key} (no image member; keys {sorted(sample)})", None
        else:
            yield key, lambda data=data: data


def load_images(source: str | Path, size: int, max_images: int | None = None,
                progress: bool = True) -> ImageSet:
    """Decode a folder (recursive) or webdataset tars into [N, 3, size, size] uint8.

    Every file goes through `data prepare`'s decoder and its rules (sar_scale/data/decode.decode_image:
    decompression bombs, truncated or undecodable files, oversized files); a hostile file is recorded
    in ``rejects`` (name -> reason) and logged on one line, never fatal; finding no usable image at
    all is an error naming the source.
    """
    from sar_scale.data.decode import DecodeConfig, Reject, decode_image

    decode_cfg = DecodeConfig(animated="first_frame")  # a VQ learns from any still frame
    src = str(source)
    path = Path(src)
    if path.is_dir():
        items = list(_iter_folder(path))
        if not items and any(path.rglob("*.tar")):
            items = list(_iter_tars(sorted(str(p) for p in path.rglob("*.tar"))))
    elif src.endswith(".tar") or "{" in src:
        if "{" not in src and not path.exists():
            raise FileNotFoundError(f"data source not found: {src}")
        items = list(_iter_tars(src))
    else:
        raise FileNotFoundError(f"data source not found or not a folder/.tar: {src}")
    if max_images is not None:
        items = items[:max_images]
    arrays, names, rejects = [], [], {}
    for name, read in tqdm(items, desc="decode images", unit="img", disable=not progress):
        if read is None:
            rejects[name] = "no image"
            continue
        try:
            arrays.append(_square(decode_image(read(), decode_cfg), size))
            names.append(name)
        except Reject as e:
            rejects[name] = str(e)
            log.warning("skipped %s: %s", name, e)
    if rejects:
        log.warning("skipped %d of %d images (reasons above)", len(rejects), len(items))
    if not arrays:
        raise ValueError(f"no usable images in {src} (looked for {sorted(IMAGE_SUFFIXES)} files or "
                         f"webdataset tars with {list(_TAR_IMAGE_KEYS)}; {len(rejects)} rejected)")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return ImageSet(images, names, rejects)


def to_model_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1], the VQ's input range."""
    return images_uint8.float().div(127.5).sub(1.0)


def to_uint8(images_m11: torch.Tensor) -> torch.Tensor:
    return images_m11.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)


# ----------------------------------------------------------------------------------------------
# Metrics


@torch.inference_mode()
def evaluate_vq(model: VQModel, images_N3SS: torch.Tensor, batch_size: int = 32,
                progress: bool = False) -> dict[str, float]:
    """Reconstruction error and codebook usage of ``model`` on uint8 images.

    mse is on the [0, 1] pixel scale of the uint8-quantised reconstruction; psnr = 10 log10(1/mse).
    usage = distinct codes used / codebook size; perplexity = exp(entropy of code frequencies).
    """
    was_training = model.training
    model.eval()
    se, n_px = 0.0, 0
    counts = torch.zeros(model.config.codebook_size, dtype=torch.long)
    for i in tqdm(range(0, len(images_N3SS), batch_size), desc="eval", disable=not progress):
        x_u8 = images_N3SS[i:i + batch_size]
        codes = model.encode(to_model_range(x_u8))
        rec_u8 = to_uint8(model.decode(codes))
        se += (rec_u8.float() - x_u8.float()).div(255).pow(2).sum().item()
        n_px += x_u8.numel()
        counts += torch.bincount(codes.flatten(), minlength=counts.numel())
    model.train(was_training)
    mse = se / max(n_px, 1)
    p = counts.float() / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    return {
        "mse": mse,
        "psnr": 10 * math.log10(1.0 / mse) if mse > 0 else float("inf"),
        "codebook_usage": (counts > 0).sum().item() / counts.numel(),
        "codes_used": int((counts > 0).sum().item()),
        "perplexity": math.exp(entropy),
        "images": int(len(images_N3SS)),
    }


def save_recon_grid(model: VQModel, images_N3SS: torch.Tensor, path: Path, n: int = 8) -> Path:
    """PNG with originals (top row) over reconstructions (bottom row): a quick look for people."""
    x_u8 = images_N3SS[:n]
    rec_u8 = to_uint8(model.decode(model.encode(to_model_range(x_u8))))
    top = torch.cat(list(x_u8), dim=2)
    bottom = torch.cat(list(rec_u8), dim=2)
    grid = torch.cat([top, bottom], dim=1).permute(1, 2, 0).numpy()
    Image.fromarray(grid).save(path)
    return path


# ----------------------------------------------------------------------------------------------
# Training


def split_holdout(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic (seeded) train / held-out index split; at least one image on each side
    when there are two or more images."""
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    n_hold = min(max(1, round(n * fraction)), n - 1) if n > 1 else 0
    return sorted(idx[n_hold:]), sorted(idx[:n_hold])


@torch.no_grad()
def restart_dead_codes(model: VQModel, used_K: torch.Tensor, gen: torch.Generator) -> int:
    """Re-seed unused codebook entries with random latents of the last training batch (plus a
    little noise), so they get picked and trained; returns how many were re-seeded."""
    latents_ND = getattr(model.quantize, "last_latents_ND", None)
    dead = (~used_K).nonzero().flatten()
    if latents_ND is None or not len(dead):
        return 0
    pick = torch.randint(len(latents_ND), (len(dead),), generator=gen)
    new_KD = latents_ND[pick] + 0.01 * torch.randn(len(dead), latents_ND.shape[1], generator=gen)
    if model.config.codebook_l2_norm:
        new_KD = F.normalize(new_KD, dim=-1)
    weight = model.quantize.embedding.weight
    weight[dead] = new_KD.to(weight.dtype)
    return len(dead)


def train_vq(cfg: VQTrainConfig, progress: bool = True) -> dict[str, Any]:
    """Train a VQ per ``cfg``, save it to ``cfg.out`` and return a summary (metrics, timings)."""
    t0 = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    data = load_images(cfg.data, cfg.image_size, cfg.max_images, progress=progress)
    train_idx, hold_idx = split_holdout(len(data.images_N3SS), cfg.holdout, cfg.seed)
    if not hold_idx:
        log.warning("only one image: it is used for training and evaluation")
        hold_idx = train_idx
    train_u8, hold_u8 = data.images_N3SS[train_idx], data.images_N3SS[hold_idx]
    vcfg = cfg.vq_config()
    model = build_vq(vcfg)
    model.train()
    log.info("VQ %s: %.2fM params, downsample %d, codebook %dx%d; %d train / %d held-out images",
             vcfg.name or "custom", model.num_params() / 1e6, vcfg.downsample, vcfg.codebook_size,
             vcfg.codebook_embed_dim, len(train_u8), len(hold_u8))

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)

    def lr_at(step: int) -> float:  # linear warmup, cosine decay to 10 %
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    history: list[dict[str, float]] = []
    used_K = torch.zeros(vcfg.codebook_size, dtype=torch.bool)
    restarts = 0
    bar = tqdm(range(cfg.steps), desc="train VQ", unit="step", disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        pick = torch.randint(len(train_u8), (min(cfg.batch_size, len(train_u8)),), generator=gen)
        x_B3SS = to_model_range(train_u8[pick])
        if cfg.flip:
            flip_B = torch.rand(len(x_B3SS), generator=gen) < 0.5
            x_B3SS = torch.where(flip_B[:, None, None, None], x_B3SS.flip(-1), x_B3SS)
        rec_B3SS, codes_Bhw, vq_losses = model(x_B3SS)
        used_K[codes_Bhw.flatten()] = True
        rec_l2 = F.mse_loss(rec_B3SS, x_B3SS)
        rec_l1 = F.l1_loss(rec_B3SS, x_B3SS)
        loss = cfg.l2_weight * rec_l2 + cfg.l1_weight * rec_l1 + sum(vq_losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"VQ training diverged at step {step} (loss {loss.item()}); "
                                     f"try a lower lr than {cfg.lr}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        every = cfg.restart_dead_codes_every
        if every and (step + 1) % every == 0 and step + 1 < cfg.steps:
            restarts += restart_dead_codes(model, used_K, gen)
            used_K.zero_()
        if step % 25 == 0 or step == cfg.steps - 1:
            rec = {"step": step, "loss": loss.item(), "l2": rec_l2.item(), "l1": rec_l1.item(),
                   **{k: v.item() for k, v in vq_losses.items()}}
            history.append(rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", l2=f"{rec['l2']:.4f}")
    train_s = time.time() - t0

    model.eval()
    metrics = evaluate_vq(model, hold_u8, cfg.eval_batch_size, progress=progress)
    out = Path(cfg.out)
    summary = {
        "heldout": metrics,
        "train_images": len(train_u8),
        "rejects": len(data.rejects),
        "steps": cfg.steps,
        "train_seconds": round(train_s, 1),
        "params": model.num_params(),
        "downsample": vcfg.downsample,
        "final_loss": history[-1]["loss"] if history else None,
        "dead_code_restarts": restarts,
    }
    save_vq(model, out, extra={"trained_by": "sar-scale tokenizer train", "image_size": cfg.image_size,
                               "heldout": metrics})
    (out / "train_config.json").write_text(cfg.model_dump_json(indent=2))
    (out / "train_summary.json").write_text(json.dumps({**summary, "history": history,
                                                        "rejected": data.rejects}, indent=2))
    save_recon_grid(model, hold_u8, out / "heldout_reconstructions.png")
    return summary


__all__ = [
    "ImageSet",
    "VQTrainConfig",
    "evaluate_vq",
    "load_images",
    "save_recon_grid",
    "split_holdout",
    "to_model_range",
    "to_uint8",
    "train_vq",
]
