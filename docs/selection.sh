#!/usr/bin/env bash
# Reproduces docs/selection.md: layer selection, stability and figures for the two real models on MGSM.
# Needs the statistics written by `layerselect analyze` (see the commands in docs/selection.md).
set -euo pipefail
cd "$(dirname "$0")/.."
for model in gemma-3-270m smollm2-135m; do
  stats="runs/stats-${model}-mgsm"
  [ -f "$stats/stats.json" ] || { echo "skip $model: $stats missing"; continue; }
  mkdir -p docs/selection
  layerselect select "$stats" --criterion msd --stability 200 --seed 0 \
    --out "docs/selection/${model}-mgsm.json" | tee "docs/selection/${model}-mgsm.txt"
  layerselect plot "$stats" --out "docs/figures/${model}-mgsm" --format png
done
