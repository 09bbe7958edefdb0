#!/usr/bin/env bash
# Issue 13's GPU measurements and issue 17's sd3_2b step in one command (< 8 min on one H100/H200), written to <out>/gpu_suite.{json,txt}:
#   bash bench/gpu_suite.sh                          # CUDA, sd3_256 model, largest batch that fits; out = $OUT
#   bash bench/gpu_suite.sh --out results/h100       # another output folder
#   bash bench/gpu_suite.sh --device cpu --tiny      # tiny model on the CPU in seconds (CI: keeps it from rotting)
# PYTHON picks the interpreter (default python3). Needs torch and PyYAML; diffusers and omegaconf are optional.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "${PYTHON:-python3}" "$here/gpu_suite.py" "$@"
