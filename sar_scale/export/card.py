"""README.md model card of an export: what it is, how to use it, how it was trained.

Everything shown comes from the (already redacted) training config and checkpoint metadata and
goes through ``redact_text`` once more; environment variables and credentials are never read here.
"""

from __future__ import annotations

from typing import Any

from sar_scale.export.config import ExportConfig
from sar_scale.utils.redact import redact_text


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return redact_text(str(v)) if v is not None else "n/a"


def model_card(cfg: ExportConfig, data: list[dict[str, Any]] | None = None,
               metrics: dict[str, dict[str, float]] | None = None, name: str | None = None) -> str:
    """Markdown with a small YAML front matter (library, tags), as model hubs expect."""
    m = cfg.fmt_config()
    src, w, s = cfg.source, cfg.weights, cfg.sampling
    title = name or f"SAR {m.name} ({m.cond}-conditional)"
    cond_arg = '--prompt "..."' if m.cond == "text" else "--class-id 0"
    res = cfg.default_resolution or (cfg.resolutions[-1] if cfg.resolutions else 256)
    lines = [
        "---",
        "library_name: sar-scale",
        *(["pipeline_tag: text-to-image"] if m.cond == "text" else []),
        "tags: [set-autoregressive, sar, fully-masked-transformer, image-generation]",
        "---",
        "",
        f"# {title}",
        "",
        "A Set AutoRegressive (SAR, Liu et al. 2024, arXiv 2410.10511) image generator: a Fully Masked "
        "Transformer over VQ image tokens that generates a token grid in a few *sets* (any order, any "
        "number of steps) with a KV cache. Exported by `sar-scale export`; self-contained (weights, "
        "tokenizer" + (", text encoder" if m.cond == "text" else "") + ").",
        "",
        "## Use",
        "",
        "```python",
        "from sar_scale import SARPipeline",
        "pipe = SARPipeline.from_pretrained(\"THIS_DIR\")",
    ]
    if m.cond == "text":
        lines.append(f"images = pipe([\"a red circle on a blue background\"], height={res}, width={res}, "
                     f"steps={s.num_sets}, seed=0)")
    else:
        lines.append(f"images = pipe(class_ids=[0, 1], height={res}, width={res}, steps={s.num_sets}, seed=0)")
    lines += [
        "images[0].save(\"out.png\")",
        "```",
        "",
        "```",
        f"sar-scale generate --model THIS_DIR {cond_arg} --steps {s.num_sets} --height {res} --width {res} --seed 0 --out samples/",
        f"sar-scale edit --model THIS_DIR --image in.png --mask mask.png {cond_arg} --out edited.png",
        "```",
        "",
        "## Model",
        "",
        "| | |",
        "|---|---|",
        f"| architecture | FMT `{m.name}`: width {m.width}, {m.enc_layers} encoder + {m.dec_layers} decoder "
        f"layers, {m.heads} heads |",
        f"| parameters | {w.num_parameters:,} |",
        f"| condition | {m.cond}" + (f" ({m.num_classes} classes)" if m.cond == "class" else
                                     f" (text features {m.text_dim}-d, up to {m.max_text_len} tokens)") + " |",
        f"| image tokenizer | VQ, downsample {cfg.vq.downsample}, codebook {cfg.vq.codebook_size} (`{cfg.vq.path}/`) |",
    ]
    if cfg.text_encoder is not None:
        lines.append(f"| text encoder | {cfg.text_encoder.dim}-d, max {cfg.text_encoder.max_length} tokens "
                     f"(`{cfg.text_encoder.path}/`) |")
    lines += [
        f"| weights | {w.dtype}{', EMA' if w.ema else ''}, {len(w.files)} safetensors file(s) |",
        f"| trained resolutions | {', '.join(f'{r} px' for r in cfg.resolutions) or 'n/a'} "
        f"(any size divisible by {cfg.vq.downsample} can be sampled) |",
        f"| default sampling | {s.order}-{s.num_sets}-{s.intervals}, cfg {s.cfg_scale} ({s.cfg_schedule}), "
        f"temperature {s.temperature}, top-k {s.top_k}, top-p {s.top_p} |",
        "",
        "## Training",
        "",
        "| | |",
        "|---|---|",
        f"| checkpoint | `{_fmt(src.checkpoint)}` ({_fmt(src.kind)}) |",
        f"| global step | {_fmt(src.global_step)} |",
        f"| ZeRO stage / ranks / precision | {_fmt(src.zero_stage)} / {_fmt(src.world_size)} / {_fmt(src.precision)} |",
        f"| MLflow run id | {_fmt(src.mlflow_run_id)} |",
        f"| last training loss | {_fmt(src.last_loss)} |",
        "",
    ]
    if src.stages:
        lines += ["### Stages", "", "| stage | resolution | steps | final loss |", "|---|---|---|---|"]
        for st in src.stages:
            fl = (metrics or {}).get(st.get("name", ""), {}).get("final_loss")
            lines.append(f"| {_fmt(st.get('name'))} | {_fmt(st.get('resolution'))} px | {_fmt(st.get('steps'))} | "
                         f"{_fmt(fl)} |")
        lines.append("")
    if data:
        lines += ["### Data", "", "| stage | shards | samples | text features |", "|---|---|---|---|"]
        for d in data:
            lines.append(f"| {_fmt(d.get('stage'))} | `{_fmt(d.get('url'))}` | {_fmt(d.get('samples'))} | "
                         f"{_fmt(d.get('text_features'))} |")
        lines.append("")
    v = cfg.verification
    if v is not None:
        lines += ["## Export check", "",
                  f"Reloaded from these files, the model's logits on a probe batch ({_fmt(v.probe.get('plan'))}, "
                  f"grid {_fmt(v.probe.get('grid'))}) differ from the checkpoint's by at most "
                  f"{_fmt(v.max_abs_logit_diff)}"
                  + (f"; casting to {w.dtype} moves them by at most {_fmt(v.max_abs_logit_diff_vs_fp32)} "
                     "vs the fp32 weights" if v.max_abs_logit_diff_vs_fp32 is not None else "")
                  + f". Passed: {v.passed}.", ""]
    lines += [f"Created {_fmt(cfg.created)} with sar-scale {_fmt(cfg.sar_scale_version)}.", ""]
    return "\n".join(lines)


__all__ = ["model_card"]
