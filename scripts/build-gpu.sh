#!/usr/bin/env bash
# build-gpu.sh — build swift with CUDA on a machine without a GPU, and pack it
# for a GPU machine that has no Rust toolchain.
#
#   bash scripts/build-gpu.sh            # → gpu-dist/swift.xz (git-ignored)
#
# Installs the CUDA 13.0 toolchain from PyPI once (scripts/cuda-toolchain.sh),
# builds `--release --features cuda` into target/cuda (apart from the CPU
# build, so neither rebuilds the other), and compresses the binary with xz.
# CUDA_COMPUTE_CAP picks the GPU generation (default 90: Hopper). The GPU
# machine then runs `bash scripts/gpu-check.sh OUT_DIR` from the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/cuda-toolchain.sh >/dev/null
eval "$(bash scripts/cuda-toolchain.sh --exports-only)"
cargo build --release --features cuda --target-dir target/cuda
mkdir -p gpu-dist
xz -T2 -6 -c target/cuda/release/swift > gpu-dist/swift.xz.tmp
mv gpu-dist/swift.xz.tmp gpu-dist/swift.xz
ls -l gpu-dist/swift.xz
