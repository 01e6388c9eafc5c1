#!/usr/bin/env bash
# Builds the passkey model's tokenizer (BPE, 1024 pieces, digits split) from the Debian
# `fortunes` text plus the passkey prompt's sentences, into $1 (default runs/passkey).
# Needs: apt-get install fortunes sentencepiece
set -euo pipefail
out="${1:-runs/passkey}"
mkdir -p "$out"
files=$(ls /usr/share/games/fortunes/* | grep -v -e '\.dat$' -e '\.u8$' | sort)
{
  cat $files
  for i in $(seq 1 200); do
    echo "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will quiz you about the important information there."
    echo "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
    echo "The pass key is $((i * 257 % 50000 + 1)). Remember it. $((i * 257 % 50000 + 1)) is the pass key."
    echo "What is the pass key? The pass key is $((i * 257 % 50000 + 1))"
  done
} > "$out/corpus.txt"
spm_train --input="$out/corpus.txt" --model_prefix="$out/tok" --vocab_size=1024 --model_type=bpe \
  --bos_id=1 --eos_id=2 --unk_id=0 --pad_id=-1 --byte_fallback=true --split_digits=true \
  --character_coverage=1.0 --minloglevel=2 >/dev/null
ls "$out"/tok.model "$out"/corpus.txt
