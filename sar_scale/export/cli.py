"""`sar-scale export RUN_OR_CHECKPOINT OUT_DIR`: a training checkpoint -> a self-contained release.

RUN_OR_CHECKPOINT is a run folder (its newest complete checkpoint), a checkpoint root (``latest``),
one checkpoint folder (``stepNNNNNNNN/`` or DeepSpeed ``global_stepN/``, ZeRO 0-3 or universal), or an
``s3://`` checkpoint mirror. Examples::

    sar-scale export runs/demo/train exports/demo
    sar-scale export runs/demo/train/checkpoints/step00001800 exports/demo-ema --ema --dtype bf16
    sar-scale export s3://bucket/ckpts/demo exports/demo --register sar-demo --upload s3://bucket/exports/demo
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sar-scale export",
        description=(
            "Consolidate a DeepSpeed ZeRO checkpoint (any stage, any number of ranks) with DeepSpeed's own "
            "tools into OUT_DIR: model.safetensors (sharded with model.safetensors.index.json above "
            "--max-shard-size), config.json (model, tokenizer, text encoder, trained resolutions, default "
            "sampling plan), vq/ and text_encoder/ copies, and a README.md model card. The export is reloaded "
            "and its logits compared with the checkpoint's on a probe batch before config.json is written. "
            "Checkpoint files are read with torch's restricted (weights-only) unpickler."),
        epilog=__doc__.split("Examples::", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="RUN_OR_CHECKPOINT", help="run folder, checkpoint root/folder, or s3:// URL")
    p.add_argument("out_dir", metavar="OUT_DIR", help="export directory (created)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights (ema.safetensors of the checkpoint)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="weight dtype in the export (default fp32 = the master weights)")
    p.add_argument("--max-shard-size", default="5GB", help="shard the weights above this size (e.g. 2GB, 500MB)")
    p.add_argument("--vq", metavar="DIR", help="VQ tokenizer (default: mlflow.vq_path of the training config, "
                   "else the tokenize.vq_path recorded in the data manifest)")
    p.add_argument("--text-encoder", metavar="DIR", help="text encoder directory (text models; default: "
                   "data.text_encoder of the training config, else the data manifest's)")
    p.add_argument("--model-config", metavar="NAME|FILE", help="model architecture when the checkpoint has no "
                   "train_state.json (named size, FMTConfig YAML/JSON, or an export's config.json)")
    p.add_argument("--name", help="title of the model card")
    p.add_argument("--register", metavar="NAME", help="log the export to MLflow and register a model version")
    p.add_argument("--tracking-uri", help="MLflow store for --register (default: $MLFLOW_TRACKING_URI, else "
                   "the run folder's mlflow.db)")
    p.add_argument("--upload", metavar="URL", help="also copy the export to s3://bucket/prefix (or a directory)")
    p.add_argument("--download-dir", metavar="DIR", help="scratch space for s3:// checkpoints (default: $TMPDIR)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="unpickle DeepSpeed files without restriction (only for checkpoints you wrote)")
    p.add_argument("--sampling", nargs="+", metavar="KEY=VALUE", default=[],
                   help="default sampling settings the export carries, over those derived from training "
                        "(e.g. temperature=0.3 num_sets=8 cfg_scale=2): set the ones the model was evaluated with")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT_DIR")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("DeepSpeed", "deepspeed", "mlflow", "alembic", "botocore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from sar_scale.checkpoint.manager import CheckpointError
    from sar_scale.config import ConfigError
    from sar_scale.export.checkpoints import ExportError
    from sar_scale.export.release import export_checkpoint
    from sar_scale.utils.redact import install_log_filter

    install_log_filter()
    out = Path(args.out_dir)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        print(f"sar-scale export: {out} is not empty (pass --overwrite to replace an export there)", file=sys.stderr)
        return 2
    try:
        res = export_checkpoint(args.source, out, ema=args.ema, dtype=args.dtype, max_shard_size=args.max_shard_size,
                                vq=args.vq, text_encoder=args.text_encoder, model_config=args.model_config,
                                trust_checkpoint=args.trust_checkpoint, register=args.register,
                                tracking_uri=args.tracking_uri, upload=args.upload, download_dir=args.download_dir,
                                name=args.name, sampling=args.sampling)
    except (ExportError, CheckpointError, ConfigError, FileNotFoundError, ValueError) as e:
        print(f"sar-scale export: {e}", file=sys.stderr)
        return 1 if "verification failed" in str(e) else 2
    cfg = res.config
    v = cfg.verification
    print(f"\nexported {cfg.source.checkpoint} -> {res.out_dir}")
    print(f"  model      {cfg.model.get('name')} ({cfg.weights.num_parameters:,} params, {cfg.model.get('cond')}-"
          f"conditional), {cfg.weights.dtype}{' EMA' if cfg.weights.ema else ''}, "
          f"step {cfg.source.global_step}, {cfg.source.kind}")
    print(f"  weights    {', '.join(cfg.weights.files[:3])}{' ...' if len(cfg.weights.files) > 3 else ''}")
    print(f"  tokenizer  vq/ (downsample {cfg.vq.downsample}, codebook {cfg.vq.codebook_size})"
          + (f"; text_encoder/ ({cfg.text_encoder.dim}-d)" if cfg.text_encoder else ""))
    print(f"  verified   max |logit diff| {v.max_abs_logit_diff:.3g} on a {v.probe.get('grid')} probe")
    if res.registered:
        print(f"  registered {res.registered['name']} v{res.registered['version']} ({res.registered['source']})")
    if res.uploaded:
        print(f"  uploaded   {res.uploaded}")
    for n in res.notes:
        print(f"  note       {n}")
    print(f"  took       {res.seconds:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
