#!/usr/bin/env bash
# Issue 13's and 14's GPU measurements and issue 17's sd3_2b step in one command (< 8 min on one H100/H200),
# written to <out>/:
#   bash bench/gpu_suite.sh                          # CUDA, sd3_256 model, largest batch that fits; out = $OUT
#   bash bench/gpu_suite.sh --out results/h100       # another output folder
#   bash bench/gpu_suite.sh --device cpu --tiny      # tiny model on the CPU in seconds (CI: keeps it from rotting)
# Step 1, gpu_suite.py: model-rank step variants -> gpu_suite.{json,txt} (variant budget 330 s; --budget_s overrides).
# Step 2, loader_throughput.py: one loader's encoders (real-size Gemma-2-2B, ModernBERT-large, CLIP-L, SD3 VAE
# encoder, random weights) against step 1's measured model step -> loader_throughput.json, ~1-2 min on a GPU.
# PYTHON picks the interpreter (default python3). Needs torch, transformers and PyYAML; diffusers (the VAE and
# the diffusers comparison) and omegaconf are optional: without diffusers the loader figures are text-only.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="${PYTHON:-python3}"
"$py" "$here/gpu_suite.py" --budget_s 330 "$@"
out="${OUT:-bench_results}"
loader=()
args=("$@")
for i in "${!args[@]}"; do
  case "${args[$i]}" in
    --out) out="${args[$((i + 1))]}" ;;
    --out=*) out="${args[$i]#--out=}" ;;
    --device) loader+=(--device "${args[$((i + 1))]}") ;;
    --device=*) loader+=("${args[$i]}") ;;
    --tiny) loader+=(--tiny --threads 1) ;;
  esac
done
exec "$py" "$here/loader_throughput.py" ${loader[@]+"${loader[@]}"} --model_json "$out/gpu_suite.json" --out "$out"
