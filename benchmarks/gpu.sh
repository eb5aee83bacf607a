#!/usr/bin/env bash
# GPU + CPU speed table of the unrolled networks (issue 5), in one call.
#
#   OUT=/some/folder bash benchmarks/gpu.sh
#
# 1. GPU: 12-iteration LPD (clinical preset, 5x5 kernels) on a 512^2, 90-angle parallel-beam
#    slice at batch 8 -- target < 5 ms per slice -- with LSPD / Sk-LSPD / FBP timed side by side;
#    fp32 (TF32 convolutions) and bf16 autocast; sparse-matrix and matrix-free projectors.
# 2. The ray-transform throughput table (benchmarks/operators.py), CUDA rows included.
# 3. CPU: the 64^2, 60-angle digits-preset table at batch 1 and 8 (one thread).
# Needs only Python 3 + torch + numpy (+ scipy for the sparse projector); run from anywhere.
# Prints the tables and writes $OUT/gpu512.json, $OUT/cpu64.json, $OUT/operators.json, $OUT/gpu.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-runs/bench}"
mkdir -p "$OUT"
# the sparse system matrices are cached here (not under $OUT: they are large)
export RECON_CACHE_DIR="${RECON_CACHE_DIR:-${TMPDIR:-/tmp}/recon_cache}"

python - <<'PY' | tee "$OUT/gpu.txt"
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__,
      "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"{p.total_memory / 2**30:.1f} GiB")
PY

methods="matrix_free"; cpu_method="matrix_free"
if python -c "import scipy" 2>/dev/null; then methods="sparse matrix_free"; cpu_method="sparse"; fi

# issue 4: forward + adjoint throughput of the ray transform (CUDA rows when a GPU is there;
# target < 0.25 ms per 512^2, 90-angle slice at batch 8); ODL/ASTRA rows only where installed
python benchmarks/operators.py --batches 1,8 --out "$OUT/operators.json"

if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  python benchmarks/unrolling.py --device cuda --size 512 --n-angles 90 --batch 8 \
      --preset clinical --subsets 4 --precision fp32 bf16 --method $methods \
      --repeats 20 --warmup 5 --target-ms 5 --out "$OUT" --tag gpu512
else
  echo "no CUDA device: skipping the GPU table" >&2
fi

python benchmarks/unrolling.py --device cpu --size 64 --n-angles 60 --batch 1 8 \
    --preset digits --subsets 4 --threads 1 --repeats 20 --method $cpu_method \
    --out "$OUT" --tag cpu64
