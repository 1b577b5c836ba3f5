"""Tiny export parts shared by the export and generation-pipeline tests (a helper module, not tests)."""

from __future__ import annotations

from pathlib import Path

import torch

from sar_scale.export.release import write_export
from sar_scale.models import build_model

TEXT_WIDTH = 32


def build_parts(root: Path) -> dict:
    """Tiny random parts: demo-small VQ (codebook 1024, downsample 8), a 1-layer T5 text encoder,
    a text-conditional and a class-conditional debug FMT with vocab 1024."""
    from sar_scale.tokenizers.text import build_tiny_text_encoder
    from sar_scale.tokenizers.vq import build_vq, save_vq

    torch.manual_seed(0)
    vq_dir = save_vq(build_vq("demo-small"), root / "vq_src")
    te_dir = build_tiny_text_encoder(root / "te_src", kind="t5", width=TEXT_WIDTH, layers=1, heads=2, max_length=16)
    text_model = build_model("debug", cond="text", vocab_size=1024, text_dim=TEXT_WIDTH, max_text_len=16)
    class_model = build_model("debug", vocab_size=1024)
    return {"vq": vq_dir, "te": te_dir, "text_model": text_model, "class_model": class_model}


def export_tiny(parts: dict, out: Path, cond: str = "text", **kw):
    model = parts[f"{cond}_model"]
    return write_export(out, model.state_dict(), model.config, vq=parts["vq"],
                        text_encoder=parts["te"] if cond == "text" else None,
                        resolutions=kw.pop("resolutions", [64, 128]), default_resolution=kw.pop("default_resolution", 64),
                        **kw)
