#!/usr/bin/env bash
# Every GPU measurement of the project in one call (fits in about 8 minutes on an H100/H200):
#
#   OUT=/some/folder bash benchmarks/gpu.sh
#
# 1. benchmarks/gpu_fused.py: the fused matrix-free ray transform against the sparse matrix
#    (512^2/90 at batch 1/8/32, 1024^2/180 without a matrix), LPD / LSPD / Sk-LSPD inference
#    (fp32, bf16, channels-last, CUDA graphs, torch.compile) and training steps at 512^2,
#    batch 8, with the ratios and targets; its rows stop starting after 210 s.
# 2. the CUDA tests of the fused kernels and the fast wrappers (when pytest is installed).
# 3. benchmarks/distributed_cuda_check.py: HOAG, MAID and DDP training with 2 processes on
#    one GPU (gloo) against 1 process; over NCCL too where there are 2 GPUs (NCCL refuses two
#    ranks on one device).
# Needs Python 3 + torch + numpy + scipy (triton for the fused kernels; without it the fused
# rows run their torch reference) and installs nothing. Writes under $OUT: gpu.txt (versions),
# gpu_fused.json / gpu_fused.txt (tables), distributed_cuda_check.json, one .log per step and
# status.txt (the exit status of each step).
# Exit status: 0 when every step passed, and also when there is no CUDA device (it then says
# so and measures nothing); 1 when a step failed or ran out of time (see status.txt).
set -uo pipefail
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
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:
    print("triton not importable:", type(exc).__name__, exc)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"{p.total_memory / 2**30:.1f} GiB")
PY

if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA device: nothing to measure, exiting with status 0" \
       "(CPU smoke run of the same code: python benchmarks/gpu_fused.py --quick)" | tee -a "$OUT/gpu.txt"
  exit 0
fi

status=0
: > "$OUT/status.txt"
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log, record the exit status
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "$name rc=$rc" | tee -a "$OUT/status.txt"
  [ "$rc" -eq 0 ] || status=1
}

step gpu_fused 300 python benchmarks/gpu_fused.py --out "$OUT" --budget-s 210
if python -c "import pytest" 2>/dev/null; then
  step cuda_tests 60 python -m pytest -q -x -p no:cacheprovider tests/test_ct_fused.py \
      tests/test_fast_unrolled.py
else
  echo "cuda_tests skipped: pytest not installed" | tee -a "$OUT/status.txt"
fi
step distributed_cuda_check 90 python benchmarks/distributed_cuda_check.py \
    --out "$OUT/distributed_cuda_check.json"
# NCCL cannot put two ranks on one GPU: its run needs a second device
if python -c "import torch, sys; sys.exit(0 if torch.cuda.device_count() >= 2 else 1)"; then
  step distributed_cuda_check_nccl 90 python benchmarks/distributed_cuda_check.py \
      --backend nccl --out "$OUT/distributed_cuda_check_nccl.json"
else
  echo "distributed_cuda_check_nccl skipped: one GPU (NCCL needs one per rank)" | tee -a "$OUT/status.txt"
fi
exit $status
