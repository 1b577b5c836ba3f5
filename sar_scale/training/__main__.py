"""``python -m sar_scale.training CONFIG ...`` (= ``sar-scale train``): for ``deepspeed --module`` and torchrun -m."""

import sys

from sar_scale.training.cli import main

raise SystemExit(main(sys.argv[1:]))
