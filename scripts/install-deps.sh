#!/usr/bin/env bash
# Installs the Debian 12 packages longllama builds and tests with. Needs root (re-runs itself
# with sudo when it is not).
set -euo pipefail
if [ "$(id -u)" != 0 ]; then exec sudo "$0" "$@"; fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
  g++ cmake ninja-build ccache pkg-config \
  libopenblas-openmp-dev libsentencepiece-dev sentencepiece nlohmann-json3-dev libcli11-dev \
  libgtest-dev libbenchmark-dev libhwy-dev >/dev/null
echo "install-deps: done"
