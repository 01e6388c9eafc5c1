#!/usr/bin/env bash
# The main job on the model shipped in models/passkey (trained here with `longllama train`, see
# docs/tasks.md): a passkey hidden at a random depth of a 1M-token prompt. The first ~1M tokens
# go to memory (progress on stderr), then the model reads the question and answers from memory.
set -euo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp)
scripts/build.sh >"$log" 2>&1 || { cat "$log"; exit 1; }
rm -f "$log"
build/longllama eval passkey -m models/passkey --tokens 1000000 --top-k 32 --seeds "${SEEDS:-1,2}"
