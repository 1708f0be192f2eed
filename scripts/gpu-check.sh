#!/usr/bin/env bash
# gpu-check.sh OUT_DIR [--only selftest|demo|bench|peers] — every GPU check and
# benchmark, in one call on a bare GPU machine (no Rust, no network), from the
# repository root with gpu-dist/swift.xz built by scripts/build-gpu.sh.
#
# In order, each writing into OUT_DIR as soon as it has a result:
#   selftest  every CUDA kernel and the GPU model paths against the CPU
#             (swift selftest --gpu → selftest.jsonl)
#   demo      the demo pipeline with every stage on cuda:0 (demo.log)
#   bench     swift's GPU figures (swift bench gpu → bench.jsonl)
#   peers     PyTorch / transformers / PEFT on the same shapes (peers.jsonl)
# then a short table (summary.md). About 5 minutes on an H100 or H200.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:?usage: gpu-check.sh OUT_DIR [--only PART]}"
ONLY=""
[ "${2:-}" = "--only" ] && ONLY="${3:?--only needs a part}"
mkdir -p "$OUT"
want() { [ -z "$ONLY" ] || [ "$ONLY" = "$1" ]; }

# The CUDA 13 libraries swift links: PyTorch's pip wheels carry them.
PY="${PYTHON:-python3}"
LIBS="$("$PY" -c 'import os, nvidia; print(":".join(os.path.join(p, d, "lib") for p in nvidia.__path__ for d in ("cu13", "nccl") if os.path.isdir(os.path.join(p, d, "lib"))))')"
export LD_LIBRARY_PATH="$LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
SWIFT=/tmp/swift-gpu/swift
mkdir -p /tmp/swift-gpu
xz -dc gpu-dist/swift.xz > "$SWIFT" && chmod +x "$SWIFT" || { echo "gpu-dist/swift.xz missing: run scripts/build-gpu.sh first" >&2; exit 2; }
if ldd "$SWIFT" | grep "not found" >&2; then echo "(libcuda.so.1 comes with the NVIDIA driver)" >&2; exit 2; fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"

status=0
if want selftest; then
  echo "== selftest"
  timeout 240 "$SWIFT" selftest --gpu --out "$OUT" || status=1
fi
if want demo; then
  echo "== demo on cuda:0"
  ( time timeout 200 "$SWIFT" run pipelines/demo.toml --device cuda:0 --cache /tmp/swift-gpu/cache ) >"$OUT/demo.log" 2>&1 || status=1
  tail -n 25 "$OUT/demo.log"
fi
if want bench; then
  echo "== swift bench gpu"
  timeout 300 "$SWIFT" bench gpu --out "$OUT" || status=1
fi
if want peers; then
  echo "== peers (PyTorch, transformers, PEFT)"
  PYTHONUNBUFFERED=1 timeout 300 "$PY" scripts/gpu/peers.py --out "$OUT/peers.jsonl" || status=1
fi
echo "== summary"
"$PY" scripts/gpu/summary.py "$OUT"
exit $status
