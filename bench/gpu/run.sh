#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
#
# GPU decode benchmark, side by side in one run (needs an NVIDIA GPU, nvcc and PyTorch):
#   1. builds bench/gpu/decode_bench.cu (or uses $OSCAR_BENCH_BIN if it is an executable),
#   2. runs it: OSCAR FP2+ decode + append, and the device copy bandwidth,
#   3. runs PyTorch's scaled_dot_product_attention(enable_gqa=True) in fp16 on the same shapes,
#   4. prints one markdown table joining both (bench/gpu/table.py).
# Usage: bench/gpu/run.sh [output directory]   (default: build/gpu-bench)
# Environment: OSCAR_BENCH_ITERS (default 30), OSCAR_BENCH_SHAPES (default the issue's four),
#              CUDA_ARCH (default 90), NVCC (default nvcc on PATH or /usr/local/cuda/bin/nvcc).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
out=${1:-$repo/build/gpu-bench}
mkdir -p "$out"
iters=${OSCAR_BENCH_ITERS:-30}
shapes=${OSCAR_BENCH_SHAPES:-1x32768,1x131072,4x131072,16x32768}
nvcc=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}

bin=${OSCAR_BENCH_BIN:-}
if [[ -z $bin || ! -x $bin ]]; then
  bin=$out/oscar-gpu-decode-bench
  echo "+ building $bin"
  "$nvcc" -O3 -std=c++20 -arch=sm_${CUDA_ARCH:-90} -I"$repo/include" \
    "$repo/bench/gpu/decode_bench.cu" -o "$bin"
fi

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader || true
echo "+ $bin --iters $iters --shapes $shapes"
"$bin" --iters "$iters" --shapes "$shapes" | tee "$out/oscar.txt"
echo "+ python3 bench/gpu/sdpa.py --iters $iters --shapes $shapes"
python3 "$repo/bench/gpu/sdpa.py" --iters "$iters" --shapes "$shapes" | tee "$out/sdpa.txt"
echo
cat "$out/oscar.txt" "$out/sdpa.txt" | python3 "$repo/bench/gpu/table.py" | tee "$out/table.md"
