"""The work done inside Ray: scan (validate + hash, staged for dedup), and the shard writer actor
(read + decode + bucket-crop, tokenize, commit one shard through ``sar_scale.data.shards``).

Shape legend: B batch, H/W pixel height/width of a bucket, h/w token grid, L text length,
D text width.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from pipelines.config import PrepareConfig
from pipelines.dedup import grid_name, parse_grid_name
from pipelines.inputs import manifest_events, read_ref, scan_tar
from pipelines.staging import Staging, key_part, to_signed64, to_unsigned64
from pipelines.validate import check_image, clean_caption, perceptual_hash, pixel_hash
from sar_scale.data import schema
from sar_scale.data.buckets import bucket_table, grid_of, nearest_bucket, resize_center_crop
from sar_scale.data.decode import Reject, decode_image
from sar_scale.data.shards import commit_shard, hashes_array
from sar_scale.data.storage import Storage, StorageNotFound

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
            # always computed (cheap next to the decode): hashes.npy must serve later append runs
            "pixhash": pixel_hash(img), "phash": perceptual_hash(img)}


def scan_unit(unit: dict[str, Any], cfg_json: str) -> dict[str, list[dict[str, Any]]]:
    """Every record of a unit -> candidate rows + rejects (pure; :func:`scan_unit_task` stages them)."""
    cfg = PrepareConfig.model_validate_json(cfg_json)
    rejects: list[dict[str, Any]] = list(unit.get("rejects", []))
    if unit["kind"] == "tar":
        events = scan_tar(unit["root"], unit["key"])
    elif unit["kind"] in ("parquet", "jsonl"):
        events = manifest_events(cfg.input, unit)
    else:
        events = (("record", r) for r in unit["records"])
    rows = []
    for kind, rec in events:
        if kind == "reject":
            rejects.append(rec)
            continue
        try:
            rows.append(scan_record(rec, cfg))
        except Reject as r:
            rejects.append({"source_id": rec["source_id"], "reason": r.reason, "detail": r.detail})
    return {"rows": rows, "rejects": rejects}


def grids_of(w: int, h: int, table: dict[int, list[tuple[int, int]]], downsample: int) -> dict[int, tuple[int, int]]:
    """Token grid per resolution of a ``w x h`` image: the same aspect bucket at every resolution."""
    return {r: grid_of(nearest_bucket(w, h, buckets), downsample) for r, buckets in table.items()}


def scan_unit_task(u: int, unit: dict[str, Any], cfg_json: str, downsample: int, stg: Staging) -> dict[str, Any]:
    """Ray task: scan one unit, stage its rows by key range (``scan/p*/u{u}``) and its rejects.
    Returns counts only (the driver holds no per-sample state)."""
    cfg = PrepareConfig.model_validate_json(cfg_json)
    res = scan_unit(unit, cfg_json)
    table = bucket_table(cfg.tokenize.resolutions, downsample, cfg.tokenize.max_ratio)
    P = cfg.ray.partitions
    rows = []
    for i, r in enumerate(res["rows"]):
        rows.append({"key": schema.sample_key(r["source_id"]), "sid": r["source_id"], "u": u, "i": i,
                     "img": json.dumps(r["img"], sort_keys=True), "caption": r["caption"],
                     "extra": json.dumps(r["extra"], sort_keys=True) if r.get("extra") else "",
                     "w": r["w"], "h": r["h"], "sha": r["pixhash"],
                     "phash": to_signed64(r["phash"]), "base": False,
                     "grid": grid_name(grids_of(r["w"], r["h"], table, downsample))})
    stg.write_parts("scan", f"u{u:07d}", rows, lambda r: key_part(r["key"], P))
    stg.put_rejects(f"scan-u{u:07d}.jsonl", res["rejects"])
    return {"rows": len(rows), "rejects": dict(Counter(r["reason"] for r in res["rejects"]))}


def base_hashes_task(chunk: int, shard_keys: list[str], storage: Storage, stg: Staging, parts: int) -> int:
    """Ray task (append runs): the dataset's hashes.npy rows -> incumbent dedup rows, staged by key range."""
    rows = []
    for hk in shard_keys:
        for j, h in enumerate(schema.read_hashes(storage, hk)):
            rows.append({"key": h["key"].decode(), "sid": "", "u": -1, "i": j, "img": "", "caption": "",
                         "extra": "", "w": 0, "h": 0, "sha": h["sha"].ljust(16, b"\0").hex(),
                         "phash": to_signed64(int(h["phash"])), "base": True, "grid": ""})
    stg.write_parts("scan", f"b{chunk:07d}", rows, lambda r: key_part(r["key"], parts))
    return len(rows)


def plan_hash(source_ids: list[str], grid: str) -> str:
    """Fingerprint of a shard's assignment: a committed shard is reused only if it still matches."""
    h = hashlib.sha256(grid.encode() + b"\0")
    for s in source_ids:
        h.update(s.encode("utf-8") + b"\0")
    return h.hexdigest()[:16]


class ClipScorer:
    """Cosine similarity of CLIP image and caption embeddings (transformers, local weights)."""

    name = "clip"

    def __init__(self, model_path: str, device: str = "cpu"):
        import torch
        from transformers import AutoProcessor, CLIPModel

        self.torch, self.device = torch, torch.device(device)
        self.model = CLIPModel.from_pretrained(model_path, local_files_only=True).eval().to(self.device)
        self.processor = AutoProcessor.from_pretrained(model_path, local_files_only=True)

    def __call__(self, images: list[Image.Image], captions: list[str]) -> list[float]:
        torch = self.torch
        with torch.inference_mode():
            inputs = self.processor(text=captions, images=images, return_tensors="pt", padding=True,
                                    truncation=True).to(self.device)
            out = self.model(**inputs)
            img = torch.nn.functional.normalize(out.image_embeds, dim=-1)
            txt = torch.nn.functional.normalize(out.text_embeds, dim=-1)
            return (img * txt).sum(-1).tolist()


SCORERS = {"clip": ClipScorer}


def _thumbnail(img: Image.Image, size: int) -> bytes:
    w, h = img.size
    s = size / min(w, h)
    t = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BICUBIC, reducing_gap=3.0)
    buf = io.BytesIO()
    t.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def load_row(row: dict[str, Any], cfg: PrepareConfig, grids: dict[int, tuple[int, int]],
             downsample: int) -> dict[str, Any]:
    """Read + decode + bucket-crop one planned row (a thread of the writer actor). Failures become a
    ``reject`` field: inputs can change between scan and write; that is recorded, never fatal."""
    out: dict[str, Any] = {"row": row, "reject": "", "detail": ""}
    try:
        ref = json.loads(row["img"])
        img = _flipped(decode_image(read_ref(ref), cfg.decode), ref)
        if img.size != (row["w"], row["h"]):
            raise Reject("changed_since_scan", f"size {img.size[0]}x{img.size[1]}, scanned {row['w']}x{row['h']}")
        out["crops"] = {r: np.asarray(resize_center_crop(img, (gh * downsample, gw * downsample)))
                        for r, (gh, gw) in grids.items()}
        out["thumb"] = _thumbnail(img, cfg.output.thumbnail_size) if cfg.output.thumbnail_size else None
    except Reject as rj:
        out["reject"], out["detail"] = rj.reason, rj.detail
    return out


COMMIT_DELAY_ENV = "SAR_SCALE_FAULT_COMMIT_DELAY_S"  # fault tests: sleep after each shard commit


class TokenizeActor:
    """Ray actor that writes whole shards: VQ (+ text encoder, scorer) loaded once on its device;
    per shard it reads the planned rows from staging, loads images in ``tokenize.load_threads`` threads
    ahead of the encoder, tokenizes in ``tokenize.batch_size`` batches (one aspect bucket per shard, so
    every batch is one shape) and commits through :func:`sar_scale.data.shards.commit_shard`."""

    def __init__(self, cfg_json: str, storage: Storage, stg: Staging, downsample: int):
        import torch

        from sar_scale.tokenizers.vq import load_vq

        self.cfg = PrepareConfig.model_validate_json(cfg_json)
        self.torch, self.storage, self.stg, self.downsample = torch, storage, stg, downsample
        want = self.cfg.tokenize.device
        has_gpu = torch.cuda.is_available() and self.cfg.ray.actor_num_gpus > 0
        if want == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("tokenize.device=cuda but this Ray worker sees no GPU (set ray.actor_num_gpus)")
        self.device = torch.device("cuda" if want == "cuda" or (want == "auto" and has_gpu) else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, math.ceil(self.cfg.ray.actor_num_cpus)))
        self.vq = load_vq(self.cfg.tokenize.vq_path).to(self.device).eval()
        self.dtype = torch.bfloat16 if self.cfg.tokenize.dtype == "bfloat16" else None
        self.res = self.cfg.tokenize.resolutions
        self.text = None
        if self.cfg.tokenize.text_encoder_path:
            from sar_scale.tokenizers.text import TextEncoder

            self.text = TextEncoder.from_pretrained(self.cfg.tokenize.text_encoder_path,
                                                    max_length=self.cfg.tokenize.text_max_length, device=self.device)
        sc = self.cfg.filters.scorer
        self.scorer = SCORERS[sc.kind](sc.model_path, str(self.device)) if sc.model_path else None
        self.pool = ThreadPoolExecutor(self.cfg.tokenize.load_threads)
        self._cache: tuple[str, list[dict[str, Any]]] | None = None
        # imported here, with the models, not by the first shard's staging read (pyarrow's dataset module
        # alone took ~0.5 s there: 4% of a small benchmark's tokenize time in a py-spy profile)
        import pyarrow.dataset  # noqa: F401
        import pyarrow.parquet  # noqa: F401

    def device_info(self) -> dict[str, Any]:
        return {"device": str(self.device), "dtype": str(self.dtype), "pid": os.getpid()}

    def _rows(self, grid: str, slices: list[list[int]]) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for p, lo, hi in slices:
            key = self.stg.key("assign", grid, f"p{p:05d}.parquet")
            if self._cache is None or self._cache[0] != key:  # neighbouring shards share partition files
                self._cache = (key, self.stg.get_rows(key))
            rows += self._cache[1][lo:hi]
        return rows

    def _encode(self, crops: list[np.ndarray]) -> list[np.ndarray]:
        torch = self.torch
        x_BHW3 = torch.from_numpy(np.stack(crops)).to(self.device)
        x_B3HW = x_BHW3.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        codes_Bhw = self.vq.encode(x_B3HW, dtype=self.dtype)
        return [c.cpu().numpy().astype(np.int32) for c in codes_Bhw]

    def _tokenize(self, batch: list[dict[str, Any]]) -> None:
        """Fill ``tokens`` / ``text`` / ``scores`` of the loaded rows of one batch (rejects skipped)."""
        ok = [b for b in batch if not b["reject"]]
        if self.scorer is not None and ok:
            r0 = self.res[0]
            vals = self.scorer([Image.fromarray(b["crops"][r0]) for b in ok], [b["row"]["caption"] for b in ok])
            min_score = self.cfg.filters.scorer.min_score
            for b, v in zip(ok, vals):
                b["scores"] = {self.scorer.name: float(v)}
                if min_score is not None and v < min_score:
                    b["reject"], b["detail"] = "low_score", f"{self.scorer.name}={v:.4f} < {min_score}"
            ok = [b for b in ok if not b["reject"]]
        if not ok:
            return
        for r in self.res:
            for b, codes_hw in zip(ok, self._encode([b["crops"][r] for b in ok])):
                b.setdefault("tokens", {})[r] = codes_hw
        if self.text is not None:
            emb_BLD, mask_BL = self.text([b["row"]["caption"] for b in ok])
            for j, b in enumerate(ok):
                b["text"] = emb_BLD[j][mask_BL[j]].float().cpu().numpy().astype(np.float16)

    def write(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Write shard ``spec["index"]`` (or keep it when already committed with the same plan)."""
        name, i = self.cfg.output.name, spec["index"]
        rows = self._rows(spec["grid"], spec["slices"])
        ph = plan_hash([r["sid"] for r in rows], spec["grid"])
        try:
            old = schema.read_shard_stats(self.storage, schema.stats_name(name, i))
        except (StorageNotFound, schema.SchemaError):
            old = None
        if old and old.get("config_hash") == spec["config_hash"] and old.get("plan_hash") == ph \
                and self.storage.exists(schema.tar_name(name, i)):
            stats, skipped = old, True
        else:
            stats, skipped = self._write(spec, rows, ph), False
        self.stg.put_rejects(f"write-s{i:06d}.jsonl", stats.get("reject_ids", []))
        return {"index": i, "skipped": skipped, "stats": {k: v for k, v in stats.items() if k != "reject_ids"}}

    def _write(self, spec: dict[str, Any], rows: list[dict[str, Any]], ph: str) -> dict[str, Any]:
        cfg, name, i = self.cfg, self.cfg.output.name, spec["index"]
        grids = parse_grid_name(spec["grid"])
        bs = cfg.tokenize.batch_size
        batches = [rows[s: s + bs] for s in range(0, len(rows), bs)]
        # loads run ahead of the encoder: batch k+1 (and k+2) decode while batch k is tokenized
        futures = [[self.pool.submit(load_row, r, cfg, grids, self.downsample) for r in b] for b in batches[:2]]
        done: list[dict[str, Any]] = []
        for k in range(len(batches)):
            if k + 2 < len(batches):
                futures.append([self.pool.submit(load_row, r, cfg, grids, self.downsample) for r in batches[k + 2]])
            batch = [f.result() for f in futures[k]]
            futures[k] = []
            self._tokenize(batch)
            for b in batch:
                b.pop("crops", None)
            done += batch
        good = [b for b in done if not b["reject"]]
        rejected = [{"source_id": b["row"]["sid"], "reason": b["reject"], "detail": b["detail"]}
                    for b in done if b["reject"]]

        def samples():
            for b in good:
                row = b["row"]
                yield schema.make_sample(row["sid"], row["caption"], b["tokens"], (row["w"], row["h"]),
                                         scores=b.get("scores"), text_features=b.get("text"),
                                         thumbnail_jpg=b.get("thumb"),
                                         extra=json.loads(row["extra"]) if row["extra"] else None)

        hashes = hashes_array((b["row"]["key"], b["row"]["sha"], to_unsigned64(b["row"]["phash"])) for b in good)
        stats = commit_shard(self.storage, name, i, samples(), grids, hashes=hashes,
                             rejects=Counter(r["reason"] for r in rejected), run=spec["run"],
                             extra={"config_hash": spec["config_hash"], "plan_hash": ph, "reject_ids": rejected})
        delay = float(os.environ.get(COMMIT_DELAY_ENV, "0") or 0)
        if delay:
            time.sleep(delay)
        return stats
