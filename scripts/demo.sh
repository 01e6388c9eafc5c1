#!/usr/bin/env bash
# The main job on a model made here: until a trained model ships in models/ (issue 5), a small
# random LongLLaMA with a tokenizer trained on this repository's text. It loads a document of
# ~1M tokens (this repository's sources, repeated) into memory, then generates from a prompt.
set -euo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp)
scripts/build.sh >"$log" 2>&1 || { cat "$log"; exit 1; }
rm -f "$log"
demo=build/demo
mkdir -p "$demo"
if [ ! -f "$demo/model/config.json" ]; then
  cat README.md src/*/*.h src/*/*.cpp > "$demo/corpus.txt"
  spm_train --input="$demo/corpus.txt" --model_prefix="$demo/tok" --vocab_size=1000 --model_type=bpe \
    --byte_fallback=true --character_coverage=1.0 --minloglevel=2 >/dev/null 2>&1
  build/longllama init-random --config models/demo-random.json --seed 1 -o "$demo/model" --tokenizer "$demo/tok.model"
fi
for i in $(seq 23); do cat "$demo/corpus.txt"; done > "$demo/doc.txt"  # ~1M tokens
build/longllama generate -m "$demo/model" --doc "$demo/doc.txt" -p "The memory layers" -n 32 --temp 0.7 --seed 1
