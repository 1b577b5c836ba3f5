#!/usr/bin/env bash
# Set up sar-scale in ./.venv (idempotent). Installs torch==2.13.0 (CPU build on these machines)
# first unless a torch is already importable, then the package with every transitive version pinned
# by requirements-lock.txt (a full lock; refresh it with scripts/lock.sh). `--test` also installs the test extras and the Debian packages
# the integration tests use (Slurm + munge, Chromium + chromedriver) when apt is usable.
set -euo pipefail
cd "$(dirname "$0")/.."
WITH_TEST=0
for a in "$@"; do [[ "$a" == "--test" ]] && WITH_TEST=1; done
PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then "$PY" -m venv .venv; fi
VPY=.venv/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing torch==2.13.0"
  "$VPY" -m pip install -q -c requirements-lock.txt torch==2.13.0  # its dependencies pinned too
fi
EXTRAS=""
[[ $WITH_TEST == 1 ]] && EXTRAS="[test]"
if ! "$VPY" -c "import sar_scale, deepspeed, ray, mlflow, webdataset" >/dev/null 2>&1 || [[ $WITH_TEST == 1 ]]; then
  echo "[setup] installing sar-scale$EXTRAS and pinned dependencies"
  DS_BUILD_OPS=0 "$VPY" -m pip install -q -c requirements-lock.txt -e ".$EXTRAS" 2>&1 | grep -v "is ignored: it is neither" || true
  "$VPY" -c "import sar_scale, deepspeed, ray, mlflow, webdataset" || { echo "[setup] install failed"; exit 1; }
fi
if [[ $WITH_TEST == 1 ]]; then
  bash scripts/setup_system.sh || echo "[setup] system packages unavailable; tests that need them will skip with the reason"
fi
echo "[setup] ok: $("$VPY" -c 'import torch; print("torch", torch.__version__)')"
