#!/usr/bin/env bash
# Refresh requirements-lock.txt: every transitive version of sar-scale and its test extras, resolved
# by uv for Linux x86_64 / Python 3.11 (the CI platform). scripts/setup.sh installs with it.
# torch is resolved from its CPU build (so no CUDA-only packages enter the lock) and then left out of
# the file: setup.sh installs the pinned CPU torch first, GPU clusters keep their own CUDA build.
# Versions already in the lock are kept unless a requirement moved; pass --upgrade to re-resolve all.
# Needs uv (`pip install uv==0.13.8`). TORCH_CPU_WHEELS: a folder or page listing CPU torch wheels.
# Usage: scripts/lock.sh [--upgrade]
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_CPU_WHEELS=${TORCH_CPU_WHEELS:-https://download.pytorch.org/whl/cpu/torch/}
pin=$(mktemp) && trap 'rm -f "$pin"' EXIT
echo "torch==2.13.0+cpu" > "$pin"
uv pip compile pyproject.toml --extra test --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
  --find-links "$TORCH_CPU_WHEELS" --constraint "$pin" --no-emit-package torch \
  --custom-compile-command scripts/lock.sh --annotation-style line --quiet \
  --output-file requirements-lock.txt "$@"
