"""`sar-scale train CONFIG.yaml [key=value ...]`: train under any launcher, or alone.

Examples::

    sar-scale train configs/train/debug.yaml                        # one process (CPU, gloo)
    torchrun --nproc_per_node 2 -m sar_scale.cli train configs/train/debug.yaml deepspeed.zero_stage=3
    deepspeed --num_gpus 8 --module sar_scale.training configs/train/t2i_900m.yaml
    srun --ntasks-per-node 8 sar-scale train cfg.yaml                # Slurm: SLURM_* fallbacks
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from sar_scale.config import ConfigError, load_config

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sar-scale train",
        description=(
            "Train a SAR (Fully Masked Transformer) model with DeepSpeed ZeRO through a resolution "
            "curriculum, with exact resume and MLflow tracking. Rank/world come from the launcher's "
            "environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT; Slurm's SLURM_* as "
            "fallback); without a launcher it runs as a single process. Outputs go to run_dir: "
            "config.yaml (resolved, secrets redacted), ds_config.<stage>.json, checkpoints/, "
            "metrics.jsonl, logs/rank<r>.log, status/rank<r>.json, mlflow.db (embedded MLflow)."),
        epilog=__doc__.split("Examples::", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="training YAML (see configs/train/debug.yaml); may start with "
                   "'defaults: other.yaml'")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="config overrides, e.g. deepspeed.zero_stage=3 run_dir=runs/x; lists are replaced "
                   "whole (YAML flow syntax: 'curriculum.stages=[{name: a, resolution: 256, steps: 5, "
                   "micro_batch: 2}]')")
    p.add_argument("--resume", default="auto", metavar="auto|PATH|none",
                   help="auto (default): newest complete checkpoint whose checksums verify, falling back "
                   "to older ones (and the mirror); PATH: that checkpoint folder; none: start fresh")
    p.add_argument("--deepspeed-config", metavar="JSON", default=None,
                   help="raw DeepSpeed JSON (file or inline) merged over the generated config")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config and stage-1 DeepSpeed JSON (secrets redacted) and exit")
    # the `deepspeed` launcher appends --local_rank=N; the value also arrives as LOCAL_RANK
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def _read_ds_override(arg: str | None) -> dict | None:
    if not arg:
        return None
    text = Path(arg).read_text() if Path(arg).is_file() else arg
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--deepspeed-config: not a JSON file or inline JSON object: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError("--deepspeed-config: must be a JSON object")
    return data


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    from sar_scale.training.config import TrainConfig

    try:
        cfg = load_config(TrainConfig, args.config, args.overrides)
        ds_override = _read_ds_override(args.deepspeed_config)
    except (ConfigError, OSError) as e:
        print(f"sar-scale train: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        from sar_scale.distributed.ds_config import deepspeed_config
        from sar_scale.distributed.env import get_dist_env
        from sar_scale.distributed.init import resolve_device
        from sar_scale.utils.redact import collect_secret_values, redact_obj

        secrets = collect_secret_values(cfg.model_dump())
        st = cfg.curriculum.stages[0]
        # the device this machine would train on (a config asking for cuda on a CPU machine prints the
        # CUDA variant: it is the config the job will run with)
        device = "cuda" if cfg.device == "cuda" else resolve_device(cfg.device)
        ds = deepspeed_config(cfg, get_dist_env().world_size, 0, st.micro_batch or 1, device, ds_override)
        print(yaml.safe_dump(redact_obj(cfg.model_dump(mode="json"), secrets), sort_keys=False))
        print(json.dumps(redact_obj(ds, secrets), indent=1))
        return 0
    from sar_scale.training.trainer import Trainer

    try:
        result = Trainer(cfg, resume=args.resume, ds_override=ds_override).run()
    except ConfigError as e:
        print(f"sar-scale train: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - logged with the rank by the trainer; exit non-zero
        print(f"sar-scale train: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if result.rank == 0:
        loss = f"{result.last_loss:.4f}" if result.last_loss is not None else "n/a"
        print(f"done: {result.global_step} steps, last loss {loss}, run dir {result.run_dir}, "
              f"last checkpoint {result.last_checkpoint}, MLflow run {result.mlflow_run_id}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
