#!/usr/bin/env bash
# One time-boxed validation on a lent GPU (see `rmt-kernels validate --help`):
#   bash benchmarks/gpu_validate.sh [--budget SECONDS]
# Installs this checkout without touching the machine's torch, then writes every result to $OUT
# (default: gpu_validate_out) as it goes; summary.txt is printed last. `python -m rmt_kernels.cli` is
# `rmt-kernels`, found without relying on where pip put its scripts.
set -euo pipefail
cd "$(dirname "$0")/.."
"${PYTHON:-python}" -m pip install --no-build-isolation --no-deps -e . >/dev/null
exec "${PYTHON:-python}" -m rmt_kernels.cli validate --out "${OUT:-gpu_validate_out}" "$@"
