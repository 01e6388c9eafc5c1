#!/bin/bash
# The dictionary recipe grown wide after B' (session 27): B' as shipped, then W (init_widen: hidden
# 256, 8 heads of 32, FFN 768, 3.45M parameters, the same function), then the shipped stages C' to T
# unchanged, each fed the previous stage's model. Outputs in runs/dict-wide/STAGE/model. A stage
# whose model exists is skipped; an interrupted stage continues from its checkpoints. ~4 hours on
# a 2-vCPU Zen 3 VM (the wide stages cost 2.5-3x the narrow ones per token).
# Usage (from the repository root): models/dict-recipe/run-wide.sh [THREADS]
set -euo pipefail
cd "$(dirname "$0")/../.."
threads=${1:-2}
out=runs/dict-wide
mkdir -p "$out"
prev=models/dict-recipe/symbols8-spread-model
for stage in B:stageB-spread W:stageW-widen C:stageC-fot-spread E:stageE-fot-spread F:stageF-fot G:stageG-fot \
             M:stageM-fot N:stageN-fot T:stageT-fot; do
  name=${stage%%:*} config=models/dict-recipe/${stage#*:}.json
  if [ ! -f "$out/$name/model/config.json" ]; then
    resume=()
    [ -d "$out/$name/checkpoints" ] && [ -n "$(ls -A "$out/$name/checkpoints")" ] && resume=(--resume)
    echo "== $name: $config (init $prev)" >&2
    build/longllama train --config "$config" --init "$prev" --output "$out/$name" --threads "$threads" "${resume[@]}"
  fi
  prev=$out/$name/model
done
echo "wide model: $prev" >&2
