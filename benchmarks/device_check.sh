#!/usr/bin/env bash
# Device check (CUDA), on randomly initialised models of Llama-2-7B's shape (from_config, no download):
#  1. device_check.py: collect vs plain forward, standard vs label-only SLAM step, full fine-tuning,
#     in bfloat16 weights; times, peak memory and ratios;
#  2. bench_precision.py --shape llama2-7b --timing-only: the precision comparison of docs/training.md
#     (GEMM peak fp32/bf16, a selective and a full step in fp32 vs bf16 autocast over fp32 weights,
#     achieved GFLOP/s against the peak, padding with and without length grouping).
# About 4-6 minutes on one H100/H200, each part capped.
#
#   bash benchmarks/device_check.sh                 # on the GPU machine, from the repository root
#   bash benchmarks/device_check.sh --tiny          # small shapes, any machine (CPU test)
#   LAYERSELECT_DEVICE_CHECK_TINY=1 bash benchmarks/device_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
timeout 300 python3 benchmarks/device_check.py "$@"
shape=llama2-7b
if [[ " $* " == *" --tiny "* || "${LAYERSELECT_DEVICE_CHECK_TINY:-}" == 1 ]]; then shape=tiny; fi
# fp32 master weights of a 7B model: 27 GB, plus AdamW state for the full step (81 GB more); the
# full step is skipped unless the device has room for it.
full=()
python3 -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() and torch.cuda.get_device_properties(0).total_memory > 125e9 else 1)" \
    || full=(--skip-full)
exec timeout 300 python3 benchmarks/bench_precision.py --shape "$shape" --timing-only --seq 512 --rounds 3 "${full[@]}"
