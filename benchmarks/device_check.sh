#!/usr/bin/env bash
# Device check (CUDA): collect vs plain forward, standard vs label-only SLAM step, full fine-tuning,
# on a randomly initialised model of Llama-2-7B's shape in bfloat16 (from_config, no download).
# Prints times, peak memory and ratios; about 2-4 minutes on one H100/H200, capped at 8.
#
#   bash benchmarks/device_check.sh                 # on the GPU machine, from the repository root
#   bash benchmarks/device_check.sh --tiny          # small shape, any machine (CPU test)
#   LAYERSELECT_DEVICE_CHECK_TINY=1 bash benchmarks/device_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
exec timeout 470 python3 benchmarks/device_check.py "$@"
