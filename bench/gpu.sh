#!/usr/bin/env bash
# The GPU figures in one go (<= 8 minutes on one H100/H200-class GPU), as JSON lines on stdout and
# in OUTDIR/gpu.jsonl:
#   1. the CUDA tests (pytest -m gpu): augmentation CUDA == CPU, the loss on CUDA, nvjpeg decode
#   2. bench_gpu: nvjpeg batch decode vs PIL over every core; decode + 2 views at 224 px; ViT-S/16
#      vs ResNet-50 cacr_moco steps (bf16); loss + gather at 32k negatives vs the ResNet-50 step;
#      our augmentation vs Kornia, both on the GPU
#   3. bench_step --quick: the pipeline's worker (Ray Train, data.decode=worker, bf16,
#      channels_last) vs a bare PyTorch loop, ResNet-50 224 px V=2 (its CPU pair runs first)
# Usage (from anywhere, in the project's environment): bash bench/gpu.sh [OUTDIR]
# Never needed by CI; needs a CUDA build of torch and one visible GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-bench-gpu-out}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
log() { echo "$1" | tee -a "$out/gpu.jsonl"; }

if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    log '{"name": "gpu.sh", "error": "no CUDA GPU visible to torch"}'
    exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/nvidia-smi.txt"
t0=$SECONDS

timeout 180 python -m pytest -m gpu -q -p no:cacheprovider tests >"$out/pytest_gpu.log" 2>&1
rc=$?
summary=$(tail -n 1 "$out/pytest_gpu.log" | tr -d '"=')
log "{\"name\": \"pytest -m gpu\", \"exit_code\": $rc, \"summary\": \"$summary\"}"

timeout 240 python bench/run.py --quick gpu --out "$out/gpu.jsonl" 2>"$out/bench_gpu.err"
log "{\"name\": \"bench gpu\", \"exit_code\": $?}"

timeout 240 python bench/run.py --quick step --out "$out/gpu.jsonl" 2>"$out/bench_step.err"
log "{\"name\": \"bench step\", \"exit_code\": $?, \"seconds_total\": $((SECONDS - t0))}"
