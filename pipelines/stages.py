"""The work done inside Ray: scan (validate + hash), load (decode + bucket + resize), tokenize.

Shape legend: B batch, H/W pixel height/width of a bucket, h/w token grid, L text length,
D text width.
"""

from __future__ import annotations

import io
import json
import logging
import math
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from pipelines.config import PrepareConfig
from pipelines.inputs import read_ref, scan_tar
from pipelines.validate import (
    Reject,
    check_image,
    clean_caption,
    decode_image,
    perceptual_hash,
    pixel_hash,
)
from sar_scale.data.buckets import bucket_table, nearest_bucket, resize_center_crop

logger = logging.getLogger(__name__)


def _raw_caption(rec: dict[str, Any]) -> bytes | str | None:
    if rec.get("cap") is not None:
        try:
            return read_ref(rec["cap"])
        except Reject:
            return None
    return rec.get("caption")


def _flipped(img: Image.Image, ref: dict[str, Any]) -> Image.Image:
    """The horizontal-flip copy of an imagefolder input (``input.flip``) is the same file, mirrored."""
    return ImageOps.mirror(img) if ref.get("flip") else img


def scan_record(rec: dict[str, Any], cfg: PrepareConfig) -> dict[str, Any]:
    """Validate one record; returns a candidate row (small, no pixels) or raises :class:`Reject`."""
    caption = clean_caption(_raw_caption(rec), cfg.filters)
    data = rec["img_bytes"] if "img_bytes" in rec else read_ref(rec["img"])
    img = _flipped(decode_image(data, cfg.decode), rec["img"])
    check_image(img, cfg.filters)
    return {"source_id": rec["source_id"], "img": rec["img"], "caption": caption, "extra": rec.get("extra"),
            "w": img.size[0], "h": img.size[1],
            "pixhash": pixel_hash(img) if cfg.filters.exact_dedup else "",
            "phash": perceptual_hash(img) if cfg.filters.near_dedup else 0}


def scan_unit(unit: dict[str, Any], cfg_json: str) -> dict[str, list[dict[str, Any]]]:
    """One scan task: every record of a unit -> candidate rows + rejects."""
    cfg = PrepareConfig.model_validate_json(cfg_json)
    if unit["kind"] == "tar":
        events = scan_tar(unit["root"], unit["key"])
    else:
        events = (("record", r) for r in unit["records"])
    rows, rejects = [], []
    for kind, rec in events:
        if kind == "reject":
            rejects.append(rec)
            continue
        try:
            rows.append(scan_record(rec, cfg))
        except Reject as r:
            rejects.append({"source_id": rec["source_id"], "reason": r.reason, "detail": r.detail})
    return {"rows": rows, "rejects": rejects}


# ----------------------------------------------------------------------------- shard pass


def _obj(values: list[Any]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def load_batch(batch: dict[str, np.ndarray], cfg_json: str, downsample: int) -> dict[str, np.ndarray]:
    """Decode, bucket (same aspect ratio at every resolution) and resize/crop each image."""
    cfg = PrepareConfig.model_validate_json(cfg_json)
    table = bucket_table(cfg.tokenize.resolutions, downsample, cfg.tokenize.max_ratio)
    n = len(batch["source_id"])
    out: dict[str, list[Any]] = {k: [] for k in ("shard", "pos", "source_id", "caption", "extra", "orig_w",
                                                 "orig_h", "reject", "detail", "thumb")}
    for r in table:
        out |= {f"px_{r}": [], f"bh_{r}": [], f"bw_{r}": []}
    for i in range(n):
        for k in ("shard", "pos", "source_id", "caption", "extra"):
            out[k].append(batch[k][i])
        reject, detail, w, h, thumb = "", "", 0, 0, b""
        crops: dict[int, tuple[bytes, int, int]] = {r: (b"", 0, 0) for r in table}
        try:
            ref = json.loads(batch["ref"][i])
            img = _flipped(decode_image(read_ref(ref), cfg.decode), ref)
            w, h = img.size
            for r, buckets in table.items():
                bh, bw = nearest_bucket(w, h, buckets)
                crop = resize_center_crop(img, (bh, bw))
                crops[r] = (crop.tobytes(), bh, bw)
            if cfg.output.thumbnail_size:
                t = img.copy()
                s = cfg.output.thumbnail_size / min(w, h)
                t = t.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BICUBIC,
                             reducing_gap=3.0)
                buf = io.BytesIO()
                t.save(buf, "JPEG", quality=85)
                thumb = buf.getvalue()
        except Reject as rj:  # inputs changed between scan and load: recorded, never fatal
            reject, detail = rj.reason, rj.detail
        out["orig_w"].append(w)
        out["orig_h"].append(h)
        out["reject"].append(reject)
        out["detail"].append(detail)
        out["thumb"].append(thumb)
        for r, (px, bh, bw) in crops.items():
            out[f"px_{r}"].append(px)
            out[f"bh_{r}"].append(bh)
            out[f"bw_{r}"].append(bw)
    return {k: (_obj(v) if k in ("source_id", "caption", "extra", "reject", "detail", "thumb")
                or k.startswith("px_") else np.asarray(v, dtype=np.int64)) for k, v in out.items()}


class ClipScorer:
    """Cosine similarity of CLIP image and caption embeddings (transformers, local weights)."""

    name = "clip"

    def __init__(self, model_path: str):
        import torch
        from transformers import AutoProcessor, CLIPModel

        self.torch = torch
        self.model = CLIPModel.from_pretrained(model_path, local_files_only=True).eval()
        self.processor = AutoProcessor.from_pretrained(model_path, local_files_only=True)

    def __call__(self, images: list[Image.Image], captions: list[str]) -> list[float]:
        torch = self.torch
        with torch.inference_mode():
            inputs = self.processor(text=captions, images=images, return_tensors="pt", padding=True,
                                    truncation=True)
            out = self.model(**inputs)
            img = torch.nn.functional.normalize(out.image_embeds, dim=-1)
            txt = torch.nn.functional.normalize(out.text_embeds, dim=-1)
            return (img * txt).sum(-1).tolist()


SCORERS = {"clip": ClipScorer}


class TokenizeActor:
    """Ray actor: VQ (and text encoder, scorer) loaded once; encodes batches per bucket shape."""

    def __init__(self, cfg_json: str):
        import torch

        from sar_scale.tokenizers.vq import load_vq

        self.cfg = PrepareConfig.model_validate_json(cfg_json)
        self.torch = torch
        torch.set_num_threads(max(1, math.ceil(self.cfg.ray.actor_num_cpus)))
        self.vq = load_vq(self.cfg.tokenize.vq_path)
        self.dtype = torch.bfloat16 if self.cfg.tokenize.dtype == "bfloat16" else None
        self.res = self.cfg.tokenize.resolutions
        self.text = None
        if self.cfg.tokenize.text_encoder_path:
            from sar_scale.tokenizers.text import TextEncoder

            self.text = TextEncoder.from_pretrained(self.cfg.tokenize.text_encoder_path,
                                                    max_length=self.cfg.tokenize.text_max_length)
        sc = self.cfg.filters.scorer
        self.scorer = SCORERS[sc.kind](sc.model_path) if sc.model_path else None

    def _encode(self, px: list[bytes], hw: tuple[int, int]) -> list[np.ndarray]:
        torch = self.torch
        h, w = hw
        out = []
        bs = self.cfg.tokenize.batch_size
        for s in range(0, len(px), bs):
            x_BHW3 = np.stack([np.frombuffer(p, np.uint8).reshape(h, w, 3) for p in px[s: s + bs]])
            x_B3HW = torch.from_numpy(x_BHW3).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
            codes_Bhw = self.vq.encode(x_B3HW, dtype=self.dtype)
            out += [c.numpy().astype(np.int32) for c in codes_Bhw]
        return out

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["source_id"])
        ok = [i for i in range(n) if not batch["reject"][i]]
        reject = list(batch["reject"])
        detail = list(batch["detail"])
        scores: list[dict[str, float]] = [{} for _ in range(n)]
        if self.scorer is not None and ok:
            r0 = self.res[0]
            imgs = [Image.frombytes("RGB", (int(batch[f"bw_{r0}"][i]), int(batch[f"bh_{r0}"][i])),
                                    batch[f"px_{r0}"][i]) for i in ok]
            vals = self.scorer(imgs, [str(batch["caption"][i]) for i in ok])
            min_score = self.cfg.filters.scorer.min_score
            for i, v in zip(ok, vals):
                scores[i][self.scorer.name] = float(v)
                if min_score is not None and v < min_score:
                    reject[i], detail[i] = "low_score", f"{self.scorer.name}={v:.4f} < {min_score}"
            ok = [i for i in ok if not reject[i]]
        out: dict[str, Any] = {k: batch[k] for k in ("shard", "pos", "source_id", "caption", "extra",
                                                     "orig_w", "orig_h", "thumb")}
        for r in self.res:
            toks: list[bytes] = [b""] * n
            gh, gw = [0] * n, [0] * n
            groups: dict[tuple[int, int], list[int]] = {}
            for i in ok:
                groups.setdefault((int(batch[f"bh_{r}"][i]), int(batch[f"bw_{r}"][i])), []).append(i)
            for hw, idx in sorted(groups.items()):
                for i, codes_hw in zip(idx, self._encode([batch[f"px_{r}"][i] for i in idx], hw)):
                    toks[i] = codes_hw.tobytes()
                    gh[i], gw[i] = codes_hw.shape
            out[f"tok_{r}"], out[f"gh_{r}"], out[f"gw_{r}"] = _obj(toks), np.asarray(gh), np.asarray(gw)
        text, tlen, tdim = [b""] * n, [0] * n, [0] * n
        if self.text is not None and ok:
            emb_BLD, mask_BL = self.text([str(batch["caption"][i]) for i in ok])
            for j, i in enumerate(ok):
                valid_LD = emb_BLD[j][mask_BL[j]].float().numpy().astype(np.float16)
                text[i], tlen[i], tdim[i] = valid_LD.tobytes(), valid_LD.shape[0], valid_LD.shape[1]
        out |= {"text": _obj(text), "text_len": np.asarray(tlen), "text_dim": np.asarray(tdim),
                "reject": _obj(reject), "detail": _obj(detail),
                "scores": _obj([json.dumps(s, sort_keys=True) for s in scores])}
        return out
