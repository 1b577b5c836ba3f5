#!/usr/bin/env bash
# Debian packages used by integration tests: Slurm (slurm-wlm + munge) and headless Chromium.
set -uo pipefail
need=()
command -v slurmctld >/dev/null 2>&1 || need+=(slurm-wlm munge)
command -v chromium >/dev/null 2>&1 || need+=(chromium chromium-driver)
[[ ${#need[@]} -eq 0 ]] && exit 0
SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo -n"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null 2>&1 || true
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null 2>&1
