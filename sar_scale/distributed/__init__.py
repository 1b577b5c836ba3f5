"""The one home of distributed code: rank/world discovery, process-group init, DeepSpeed JSON."""

from sar_scale.distributed.ds_config import deepspeed_config, resolve_precision
from sar_scale.distributed.env import (
           DistEnv,
           expand_hostlist,
           get_dist_env,
           set_cpu_threads,
           threads_per_rank,
)
from sar_scale.distributed.init import destroy_distributed, init_distributed

__all__ = ["DistEnv", "deepspeed_config", "destroy_distributed", "expand_hostlist", "get_dist_env",
           "init_distributed", "resolve_precision", "set_cpu_threads", "threads_per_rank"]
