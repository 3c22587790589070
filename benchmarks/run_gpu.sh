#!/usr/bin/env bash
# Run jaxnet's benchmarks on a GPU in under 5 minutes and record the card.
#
#   bash benchmarks/run_gpu.sh [OUTDIR]      (default benchmarks/results/gpu)
#
# Needs a Python whose jax sees the GPU (jax[cuda12] of the same version as on the CPU
# machine), the peers (pip install -e '.[bench]') and optionally a CUDA build of torch 2.13.
# Set PYTHON to choose the interpreter. Every step has its own time limit, and the whole
# script stops at 290 s; what finished is kept. The CPU numbers stay the README's baseline
# until this has been run on a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/gpu}
PY=${PYTHON:-python}
mkdir -p "$OUT"
START=$(date +%s)
left() { echo $((290 - ($(date +%s) - START))); }
# seconds for the next step: at most $1 and what is left of the 290 s (at least 5: `timeout 0`
# would mean no limit at all)
lim() { local l; l=$(left); [ "$1" -lt "$l" ] && l=$1; [ "$l" -lt 5 ] && l=5; echo "$l"; }

backend=$($PY -c 'import jax; print(jax.default_backend())' 2>/dev/null)
if [ "$backend" != "gpu" ]; then
  echo "run_gpu.sh: jax's backend is '${backend:-unavailable}', not gpu; nothing run" >&2
  exit 2
fi
{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  $PY -c 'import jax; print("jax", jax.__version__, jax.devices())'
} | tee "$OUT/device.txt"

# 1. the peer benchmark: all configurations, 5 interleaved rounds (about 2 minutes; at most
#    200 s: results are written after every configuration, so a cut run keeps what it has).
timeout "$(lim 200)" $PY benchmarks/peers.py --rounds 5 --target-ms 50 \
  --json "$OUT/peers.json" --markdown "$OUT/peers.md" --plot "$OUT/peers.png" \
  2> "$OUT/peers.log" || echo "peers.py stopped early (see $OUT/peers.log)" >&2

# 2. rematerialisation: XLA memory_analysis() of depth 32 and 64 steps, with and without.
timeout "$(lim 60)" $PY benchmarks/remat_memory.py --depths 32,64 --width 1024 --batch 1024 \
  --json "$OUT/remat_memory.json" --markdown "$OUT/remat_memory.md" \
  2> "$OUT/remat_memory.log" || echo "remat_memory.py stopped early" >&2

# 3. the mixed-precision and remat tests on the GPU (bfloat16 matmuls are real there).
timeout "$(lim 290)" $PY -m pytest tests/test_precision.py tests/test_remat.py -q -x \
  > "$OUT/tests.log" 2>&1 || echo "GPU tests failed or timed out (see $OUT/tests.log)" >&2

echo "done in $(( $(date +%s) - START )) s; results in $OUT"
