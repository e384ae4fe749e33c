#!/usr/bin/env bash
# The GPU benchmark, benchmarks/gpu.py (its docstring says what it measures), on
# one NVIDIA H100 or H200 where only jax (CUDA), flax, optax, orbax and chex are
# installed: no pip, no network, no data stack.
#
#   OUT=/some/dir bash benchmarks/gpu.sh          # the ~1B model, < 8 minutes in all
#   OUT=/tmp/q bash benchmarks/gpu.sh --quick     # arguments after the script go to gpu.py
#
# Writes $OUT/gpu.jsonl (default OUT=gpu_results): one JSON line per measurement,
# appended as each is made, so a run cut short keeps what it measured; and
# $OUT/gpu.log (the GPU's name and driver, then gpu.py's output). Compiled
# programs are cached in $JAX_COMPILATION_CACHE_DIR (default /tmp/mtcot_jax_xla_cache):
# a second run on the same machine skips most compiles. PYTHON overrides python3;
# LIMIT (seconds, default 470) is the one time limit over everything.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_results}"
LIMIT="${LIMIT:-470}"
mkdir -p "$OUT"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # the allocator grows as needed: peak use is real
export TF_CPP_MIN_LOG_LEVEL=2
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/mtcot_jax_xla_cache}"

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
} | tee -a "$OUT/gpu.log"
timeout --kill-after=10 "$LIMIT" "${PYTHON:-python3}" benchmarks/gpu.py --out "$OUT/gpu.jsonl" \
    "$@" 2>&1 | tee -a "$OUT/gpu.log"
status=$?
if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
  echo "gpu.py stopped at the ${LIMIT} s limit; $OUT/gpu.jsonl holds what it measured" \
      | tee -a "$OUT/gpu.log"
fi
exit "$status"
