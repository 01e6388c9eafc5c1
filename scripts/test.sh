#!/usr/bin/env bash
# Builds and runs the whole test suite, then the file readers and the engine's numerical tests
# again under AddressSanitizer (malformed and malicious files must give errors, never memory bugs).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build.sh
(cd build && ctest --output-on-failure)
cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=Debug -DLONGLLAMA_SANITIZE=address -DLONGLLAMA_BENCH=OFF -DLONGLLAMA_NATIVE=OFF >/dev/null
cmake --build build-asan -j"$(nproc)" --target test_io test_gguf test_ops test_model longllama
(cd build-asan && ctest --output-on-failure -L "test_io|test_gguf|test_ops|test_model")
