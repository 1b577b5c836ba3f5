"""SARPipeline: an exported SAR model + its VQ tokenizer + text encoder, as one callable.

    pipe = SARPipeline.from_pretrained("exports/demo")            # or s3://bucket/exports/demo
    images = pipe(["a red circle"], height=128, width=96, steps=16, seed=0)
    edited = pipe.edit(image, mask, "a blue square", steps=8)       # mask: white = regenerate

Reproducibility: batch ``i`` (images ``i*batch_size ...``) draws its order, set sizes and tokens
from ``derive_seed(seed, first image index)``, so the same call gives the same images, different
seeds give different images, and with ``batch_size=1`` each image depends only on (seed, index).
Editing keeps the tokens of every patch that lies fully in the kept (black) region exactly: they
form a first, given set that is encoded once and never resampled (``sample(known_tokens=...)``).
Shape legend: B images, h x w token grid, H x W pixels.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sar_scale.export.config import CONFIG_NAME, ExportConfig, read_export_config
from sar_scale.export.weights import check_state_dict, load_state_dict
from sar_scale.sar import Condition, Recipe, SetPlan, sample

if TYPE_CHECKING:
    from PIL import Image

    from sar_scale.models import FullyMaskedTransformer
    from sar_scale.tokenizers.text import TextEncoder
    from sar_scale.tokenizers.vq import VQModel

logger = logging.getLogger(__name__)

ImageLike = Any  # PIL.Image.Image | str | Path | np.ndarray [H, W, 3] uint8


def derive_seed(seed: int, index: int) -> int:
    """A 63-bit seed for item ``index`` of a call seeded with ``seed`` (unrelated streams per index)."""
    s = int(seed)
    ss = np.random.SeedSequence([s & 0xFFFFFFFF, (s >> 32) & 0xFFFFFFFF, int(index) & 0xFFFFFFFF, 0x5A12])
    return int(ss.generate_state(1, np.uint64)[0] >> np.uint64(1))


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(export_dir: str | Path, cfg: ExportConfig | None = None, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = torch.float32) -> FullyMaskedTransformer:
    """The FMT of an export, strictly checked against its config; ``dtype=None`` keeps the file dtype."""
    from sar_scale.models import FullyMaskedTransformer

    d = Path(export_dir)
    cfg = cfg or read_export_config(d)
    fmt = cfg.fmt_config()
    with torch.device("meta"):
        model = FullyMaskedTransformer(fmt)
    state = load_state_dict(d)
    check_state_dict(model, state, str(d))
    model.load_state_dict(state, strict=True, assign=True)
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model.eval().requires_grad_(False)


def _download_export(url: str, cache_dir: Path | None) -> Path:
    """Mirror an uploaded export from ``s3://`` into a local cache (config.json last = complete)."""
    from sar_scale.data.storage import open_storage

    store = open_storage(url)
    keys = store.list("")
    if CONFIG_NAME not in keys:
        from sar_scale.utils.redact import redact_text

        raise FileNotFoundError(f"{redact_text(url)}: no {CONFIG_NAME} (not an export, or its upload is incomplete)")
    root = cache_dir or Path.home() / ".cache" / "sar-scale" / "exports"
    local = root / hashlib.sha256(url.encode()).hexdigest()[:16]
    cfg_local = local / CONFIG_NAME
    ordered = [k for k in keys if k != CONFIG_NAME] + [CONFIG_NAME]
    if cfg_local.is_file() and all((local / k).is_file() and (local / k).stat().st_size == store.size(k)
                                   for k in ordered):
        return local
    cfg_local.unlink(missing_ok=True)
    for k in ordered:
        store.get_file(k, local / k)
    return local


@dataclass
class EditResult:
    tokens: torch.Tensor  # [B, h, w] generated grids
    known: torch.Tensor  # [h, w] bool: tokens kept from the input image
    source_tokens: torch.Tensor  # [h, w] the input image's tokens


class SARPipeline:
    """Text- or class-conditional image generation and editing with an exported SAR model."""

    def __init__(self, model: FullyMaskedTransformer, vq: VQModel, text_encoder: TextEncoder | None,
                 config: ExportConfig, device: str | torch.device = "cpu"):
        self.model, self.vq, self.text_encoder, self.config = model, vq, text_encoder, config
        self.device = torch.device(device)
        self.downsample = int(vq.downsample)
        if vq.config.codebook_size != model.config.vocab_size:
            raise ValueError(f"VQ codebook ({vq.config.codebook_size}) != model vocab ({model.config.vocab_size})")
        if model.config.cond == "text":
            if text_encoder is None:
                raise ValueError("a text-conditional model needs a text encoder")
            if text_encoder.dim != model.config.text_dim:
                raise ValueError(f"text encoder width {text_encoder.dim} != model text_dim {model.config.text_dim}")

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = torch.float32, cache_dir: str | Path | None = None) -> SARPipeline:
        """Load an export directory (or an ``s3://`` copy made by ``sar-scale export --upload``)."""
        from sar_scale.tokenizers.vq import load_vq

        if str(path).startswith("s3://"):
            path = _download_export(str(path), Path(cache_dir) if cache_dir else None)
        d = Path(path)
        cfg = read_export_config(d)
        device = torch.device(device or default_device())
        model = load_model(d, cfg, device, dtype)
        vq_dir = d / cfg.vq.path
        vq = load_vq(vq_dir, device=device)
        if vq.downsample != cfg.vq.downsample or vq.config.codebook_size != cfg.vq.codebook_size:
            raise ValueError(f"{vq_dir}: VQ (downsample {vq.downsample}, codebook {vq.config.codebook_size}) does "
                             f"not match {d / CONFIG_NAME} ({cfg.vq.downsample}, {cfg.vq.codebook_size})")
        text = None
        if cfg.text_encoder is not None:
            from sar_scale.tokenizers.text import TextEncoder

            te = cfg.text_encoder
            text = TextEncoder.from_pretrained(d / te.path, max_length=te.max_length,
                                               padding_side=te.padding_side, device=device)
        logger.info("loaded %s (%s, %.2fM params) on %s", d, cfg.model.get("name"),
                    model.num_parameters() / 1e6, device)
        return cls(model, vq, text, cfg, device)

    @property
    def is_class_conditional(self) -> bool:
        return self.model.config.cond == "class"

    # ------------------------------------------------------------------ helpers
    def token_grid(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """(h, w) tokens for an image size (default: the export's resolution); errors name the bad side."""
        return self._grid(height, width)

    def _grid(self, height: int | None, width: int | None) -> tuple[int, int]:
        default = self.config.default_resolution or (self.config.resolutions[0] if self.config.resolutions else None)
        height = height or default
        width = width or default
        if not height or not width:
            raise ValueError("height and width are required (the export has no default resolution)")
        ds = self.downsample
        for name, v in (("height", height), ("width", width)):
            if int(v) != v or v <= 0 or v % ds:
                lo, hi = max(ds, (int(v) // ds) * ds), (int(v) // ds + 1) * ds
                raise ValueError(f"{name}={v} must be a positive multiple of the VQ downsample factor {ds} "
                                 f"(e.g. {lo} or {hi})")
        return int(height) // ds, int(width) // ds

    def resolve_settings(self, steps: int | None = None, order: str | None = None, intervals: str | None = None,
                         cfg_scale: float | None = None, cfg_schedule: str | None = None,
                         temperature: float | None = None, top_k: int | None = None,
                         top_p: float | None = None) -> dict[str, Any]:
        """Explicit options over the export's defaults, validated (errors name the option)."""
        d = self.config.sampling
        s = {"steps": d.num_sets if steps is None else int(steps), "order": order or d.order,
             "intervals": intervals or d.intervals, "cfg_scale": d.cfg_scale if cfg_scale is None else float(cfg_scale),
             "cfg_schedule": cfg_schedule or d.cfg_schedule,
             "temperature": d.temperature if temperature is None else float(temperature),
             "top_k": d.top_k if top_k is None else int(top_k), "top_p": d.top_p if top_p is None else float(top_p)}
        Recipe(s["order"], s["steps"], s["intervals"])  # validates order, steps, intervals
        if s["cfg_schedule"] not in ("constant", "linear"):
            raise ValueError(f"cfg_schedule must be 'constant' or 'linear', got {s['cfg_schedule']!r}")
        if s["cfg_scale"] < 0:
            raise ValueError(f"cfg_scale must be >= 0, got {s['cfg_scale']}")
        if s["temperature"] < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {s['temperature']}")
        if s["top_k"] < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {s['top_k']}")
        if not 0 < s["top_p"] <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {s['top_p']}")
        return s

    def _conditions(self, prompts, class_ids) -> list:
        """One condition item per image request (a caption or a class id)."""
        if self.is_class_conditional:
            if prompts is not None:
                raise ValueError("this model is class-conditional: pass class_ids, not prompts")
            if class_ids is None:
                raise ValueError("this model is class-conditional: class_ids is required (-1 = unconditional)")
            ids = [int(class_ids)] if isinstance(class_ids, (int, np.integer)) else [int(c) for c in class_ids]
            n = self.model.config.num_classes
            bad = [c for c in ids if not -1 <= c < n]
            if bad:
                raise ValueError(f"class_ids must be in [-1, {n - 1}] (-1 = unconditional), got {bad}")
            return ids
        if class_ids is not None:
            raise ValueError("this model is text-conditional: pass prompts, not class_ids")
        if prompts is None:
            raise ValueError("prompts are required for a text-conditional model ('' = unconditional)")
        items = [prompts] if isinstance(prompts, str) else list(prompts)
        bad = [type(p).__name__ for p in items if not isinstance(p, str)]
        if bad:
            raise TypeError(f"prompts must be strings, got {bad[0]}")
        return items

    def _condition(self, items: list) -> Condition:
        batch = {"class_ids": items} if self.is_class_conditional else {"captions": items}
        return Condition.from_batch(batch, text_encoder=self.text_encoder, max_text_len=self.model.config.max_text_len,
                                    device=self.device, dtype=self.model.tok_emb.weight.dtype)

    def _plan(self, grid: tuple[int, int], s: dict, seed: int, batch: int) -> SetPlan:
        d = self.config.sampling
        # a fixed_random order is the one the model was trained with: its seed comes from training
        return Recipe(s["order"], s["steps"], s["intervals"]).build(
            grid, batch, seed, fixed_order_seed=d.fixed_order_seed, stride=d.subsample_stride)

    def _sample(self, cond: Condition, plan: SetPlan, s: dict, seed: int, kv_cache: bool, progress,
                known_tokens=None, known_mask=None) -> torch.Tensor:
        gen = torch.Generator(device=self.device).manual_seed(seed)
        return sample(self.model, cond, plan, cfg_scale=s["cfg_scale"], cfg_schedule=s["cfg_schedule"],
                      temperature=s["temperature"], top_k=s["top_k"], top_p=s["top_p"], kv_cache=kv_cache,
                      generator=gen, known_tokens=known_tokens, known_mask=known_mask, progress=progress)

    # ------------------------------------------------------------------ generation
    @torch.inference_mode()
    def generate_tokens(self, prompts: str | Sequence[str] | None = None, height: int | None = None,
                        width: int | None = None, steps: int | None = None, order: str | None = None,
                        cfg_scale: float | None = None, cfg_schedule: str | None = None,
                        temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                        seed: int = 0, batch_size: int = 8, class_ids: int | Sequence[int] | None = None,
                        intervals: str | None = None, num_images_per_prompt: int = 1, kv_cache: bool = True,
                        progress: Callable[[int, int, int, int], None] | None = None) -> torch.Tensor:
        """Token grids ``[B, h, w]``; ``progress(batch, num_batches, step, num_steps)`` is called per step."""
        grid = self._grid(height, width)
        s = self.resolve_settings(steps, order, intervals, cfg_scale, cfg_schedule, temperature, top_k, top_p)
        if batch_size < 1 or num_images_per_prompt < 1:
            raise ValueError("batch_size and num_images_per_prompt must be >= 1")
        items = [c for c in self._conditions(prompts, class_ids) for _ in range(num_images_per_prompt)]
        out = []
        nb = (len(items) + batch_size - 1) // batch_size
        for bi in range(nb):
            chunk = items[bi * batch_size:(bi + 1) * batch_size]
            bseed = derive_seed(seed, bi * batch_size)
            cb = (lambda step, total, bi=bi: progress(bi, nb, step, total)) if progress else None
            tokens_BN = self._sample(self._condition(chunk), self._plan(grid, s, bseed, len(chunk)), s, bseed,
                                     kv_cache, cb)
            out.append(tokens_BN.view(len(chunk), *grid).cpu())
        return torch.cat(out) if out else torch.empty(0, *grid, dtype=torch.long)

    @torch.inference_mode()
    def decode(self, tokens_Bhw: torch.Tensor, batch_size: int = 8) -> list[Image.Image]:
        """Token grids -> PIL images (VQ decode in chunks)."""
        from PIL import Image

        images = []
        for i in range(0, tokens_Bhw.shape[0], batch_size):
            x = self.vq.decode(tokens_Bhw[i:i + batch_size].to(self.device))
            arr = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            images += [Image.fromarray(a) for a in arr]
        return images

    def __call__(self, prompts: str | Sequence[str] | None = None, height: int | None = None,
                 width: int | None = None, steps: int | None = None, order: str | None = None,
                 cfg_scale: float | None = None, cfg_schedule: str | None = None, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0, batch_size: int = 8,
                 class_ids: int | Sequence[int] | None = None, **kwargs: Any) -> list[Image.Image]:
        """Generate images: one per prompt (or class id) x ``num_images_per_prompt``; see generate_tokens."""
        tokens = self.generate_tokens(prompts, height, width, steps, order, cfg_scale, cfg_schedule, temperature,
                                      top_k, top_p, seed, batch_size, class_ids, **kwargs)
        return self.decode(tokens, batch_size)

    # ------------------------------------------------------------------ editing
    @staticmethod
    def load_image(image: ImageLike) -> Image.Image:
        from PIL import Image

        if isinstance(image, (str, Path)):
            p = Path(image)
            if not p.is_file():
                raise FileNotFoundError(f"image not found: {p}")
            image = Image.open(p)
        elif isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        return image

    @torch.inference_mode()
    def encode_image(self, image: ImageLike) -> torch.Tensor:
        """An RGB image whose sides are multiples of the downsample -> tokens ``[h, w]``."""
        img = self.load_image(image).convert("RGB")
        self._grid(img.height, img.width)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1)[None] / 127.5 - 1.0
        return self.vq.encode(x.to(self.device))[0].cpu()

    def known_mask(self, mask: ImageLike, size: tuple[int, int]) -> torch.Tensor:
        """``[h, w]`` bool: True where the whole patch is kept (mask < 128 everywhere in it)."""
        m = self.load_image(mask).convert("L")
        if m.size != size:
            raise ValueError(f"mask is {m.size[0]}x{m.size[1]} but the image is {size[0]}x{size[1]} (W x H): "
                             "they must match")
        ds = self.downsample
        regen = np.asarray(m) >= 128
        h, w = regen.shape[0] // ds, regen.shape[1] // ds
        return torch.from_numpy(~regen.reshape(h, ds, w, ds).any(axis=(1, 3)))

    @torch.inference_mode()
    def edit_tokens(self, image: ImageLike, mask: ImageLike, prompt: str | None = None, class_id: int | None = None,
                    steps: int | None = None, order: str | None = None, cfg_scale: float | None = None,
                    cfg_schedule: str | None = None, temperature: float | None = None, top_k: int | None = None,
                    top_p: float | None = None, seed: int = 0, num_images: int = 1, intervals: str | None = None,
                    kv_cache: bool = True, progress: Callable[[int, int], None] | None = None) -> EditResult:
        """Inpaint/outpaint in token space; mask white = regenerate, black = keep."""
        img = self.load_image(image).convert("RGB")
        grid = self._grid(img.height, img.width)
        s = self.resolve_settings(steps, order, intervals, cfg_scale, cfg_schedule, temperature, top_k, top_p)
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        known_hw = self.known_mask(mask, img.size)
        if bool(known_hw.all()):
            raise ValueError("the mask marks nothing to regenerate (white = regenerate, black = keep)")
        if not bool(known_hw.any()):
            logger.warning("no patch lies fully in the kept region: this is plain generation")
        src_hw = self.encode_image(img)
        if self.is_class_conditional:  # no class / no prompt = unconditional inpainting
            items = self._conditions(None, -1 if class_id is None else class_id)
        else:
            items = self._conditions("" if prompt is None else prompt, class_id)
        items = items * num_images
        seed_ = derive_seed(seed, 0)
        plan = self._plan(grid, s, seed_, num_images)
        n = grid[0] * grid[1]
        known_tokens = src_hw.flatten()[None].expand(num_images, n).to(self.device)
        known_mask = known_hw.flatten().to(self.device) if known_hw.any() else None
        out = self._sample(self._condition(items), plan, s, seed_, kv_cache, progress,
                           known_tokens if known_mask is not None else None, known_mask)
        return EditResult(out.view(num_images, *grid).cpu(), known_hw, src_hw)

    def edit(self, image: ImageLike, mask: ImageLike, prompt: str | None = None, **kwargs: Any) -> list[Image.Image]:
        """Edited images (see edit_tokens for the options)."""
        return self.decode(self.edit_tokens(image, mask, prompt, **kwargs).tokens)

    @staticmethod
    def outpaint_canvas(image: ImageLike, left: int = 0, top: int = 0, right: int = 0, bottom: int = 0,
                        fill: tuple[int, int, int] = (127, 127, 127)) -> tuple[Image.Image, Image.Image]:
        """Place ``image`` on a larger canvas; returns (canvas, mask) with the new area white."""
        from PIL import Image

        if min(left, top, right, bottom) < 0:
            raise ValueError(f"outpaint margins must be >= 0, got {(left, top, right, bottom)}")
        img = SARPipeline.load_image(image).convert("RGB")
        size = (img.width + left + right, img.height + top + bottom)
        canvas = Image.new("RGB", size, fill)
        canvas.paste(img, (left, top))
        mask = Image.new("L", size, 255)
        mask.paste(0, (left, top, left + img.width, top + img.height))
        return canvas, mask


__all__ = ["EditResult", "SARPipeline", "default_device", "derive_seed", "load_model"]
