#!/usr/bin/env bash
# Forward and decode benchmarks on an NVIDIA GPU with JAX already installed (no pip, no network).
#
#   bash benchmarks/gpu.sh            # writes ${OUT:-gpu_results}/{env,forward,decode}.txt (+ decode.json)
#
# Runs from the checkout (PYTHONPATH=.); uses .venv/bin/python when it exists, else `python`.
# Each benchmark has its own time limit so the whole script stays under ~5 minutes.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_results}"
mkdir -p "$OUT"
PY=python
[ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONPATH=.
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # leave GPU memory to whoever else needs it
export TF_CPP_MIN_LOG_LEVEL=2

{
  date -u
  echo "python: $(command -v $PY)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
  $PY -c "import jax; print('jax', jax.__version__, jax.default_backend(), jax.devices())" 2>&1
} > "$OUT/env.txt"
cat "$OUT/env.txt"

status=0
echo "== forward benchmark (limit 130 s)"
timeout 130 $PY benchmarks/forward.py > "$OUT/forward.txt" 2>&1 || { echo "forward.py exit $?"; status=1; }
tail -n 40 "$OUT/forward.txt"

echo "== decode benchmark, with fractions of the bandwidth bound (limit 200 s)"
# HF transformers is skipped (no installs on the GPU machine; torch there would be another build).
timeout 200 $PY benchmarks/decode.py --models 25m demo --batch 1 8 --ks 0 1 3 5 \
    --max-cot 128 --max-answer 128 --repeats 3 --no-hf --json "$OUT/decode.json" \
    > "$OUT/decode.txt" 2>&1 || { echo "decode.py exit $?"; status=1; }
grep -v -i "warning" "$OUT/decode.txt" | tail -n 60
exit $status
