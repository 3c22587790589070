#!/usr/bin/env bash
# Run jaxnet's benchmarks on a GPU in under 5 minutes and record the card.
#
#   bash benchmarks/run_gpu.sh [OUTDIR]      (default benchmarks/results/gpu)
#
# Needs a Python whose jax sees the GPU, optax, chex and the peers (flax, equinox, dm-haiku;
# a missing peer is reported as skipped) and optionally a CUDA build of torch. jaxnet itself
# need not be installed: the repository root is put on PYTHONPATH. Set PYTHON to choose the
# interpreter (default python3). Every step has its own time limit, and the whole script stops
# at 300 s; what finished is kept. The CPU numbers stay the README's baseline until this has
# been run on a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/gpu}
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
START=$(date +%s)
left() { echo $((300 - ($(date +%s) - START))); }
# seconds for the next step: at most $1 and what is left of the 300 s (at least 5: `timeout 0`
# would mean no limit at all)
lim() { local l; l=$(left); [ "$1" -lt "$l" ] && l=$1; [ "$l" -lt 5 ] && l=5; echo "$l"; }
step() { echo "[$(( $(date +%s) - START )) s] $*" >&2; }

backend=$($PY -c 'import jax; print(jax.default_backend())' 2>/dev/null)
if [ "$backend" != "gpu" ] && [ -z "${RUN_GPU_ANY_BACKEND:-}" ]; then
  echo "run_gpu.sh: jax's backend is '${backend:-unavailable}', not gpu; nothing run" >&2
  echo "(RUN_GPU_ANY_BACKEND=1 runs it anyway, to try the script on a CPU)" >&2
  exit 2
fi
{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader \
    2>/dev/null
  $PY -c 'import jax; print("jax", jax.__version__, jax.devices())'
  $PY -m pip list 2>/dev/null | grep -i -E '^(jax|jaxlib|jax-cuda[0-9]+-plugin|optax|flax|equinox|dm-haiku|torch|orbax-checkpoint) '
} | tee "$OUT/device.txt"

# 1. the peer benchmark without torch.compile (its compilation alone can take minutes): all
#    configurations, 5 interleaved rounds. Results are written after every configuration, so a
#    cut run keeps what it has.
step "peers.py"
timeout "$(lim 100)" $PY benchmarks/peers.py --rounds 5 --target-ms 50 --skip torch_compile \
  --json "$OUT/peers.json" --markdown "$OUT/peers.md" --plot "$OUT/peers.png" \
  2> "$OUT/peers.log" || echo "peers.py stopped early (see $OUT/peers.log)" >&2

# 1b. the small configuration again, where a step is mostly the cost of a call: jaxnet against
#     pure JAX and its A/A control only, 30 rounds, so that a few per cent are resolved.
step "peers.py small, 30 rounds"
timeout "$(lim 30)" $PY benchmarks/peers.py --rounds 30 --target-ms 30 --configs small,small_epoch \
  --variants pure_jax,pure_jax_again,jaxnet_auto,jaxnet_manual \
  --json "$OUT/peers_small.json" --markdown "$OUT/peers_small.md" \
  2> "$OUT/peers_small.log" || echo "small-config run stopped early" >&2

# 1c. the bigger nets of issue 13: the 2-d conv net (BatchNorm, pooling, batch 128) and the
#     4-block transformer (width 256, T = 256, batch 16), every variant but torch.compile.
step "peers.py cnn, transformer"
timeout "$(lim 60)" $PY benchmarks/peers.py --rounds 5 --target-ms 50 --configs cnn,transformer \
  --skip torch_compile --json "$OUT/peers_cnn_transformer.json" \
  --markdown "$OUT/peers_cnn_transformer.md" \
  2> "$OUT/peers_cnn_transformer.log" || echo "cnn/transformer run stopped early" >&2

# 1d. the per-call cost of the step's state: hand-written step, jaxnet's step, and the
#     whole-TrainState step it replaced for nets without randomness.
step "step_overhead.py"
timeout "$(lim 25)" $PY benchmarks/step_overhead.py --rounds 20 --target-ms 30 \
  --json "$OUT/step_overhead.json" --markdown "$OUT/step_overhead.md" \
  2> "$OUT/step_overhead.log" || echo "step_overhead.py stopped early" >&2

# 2. rematerialisation: XLA memory_analysis() of depth 32 and 64 steps, with and without.
step "remat_memory.py"
timeout "$(lim 40)" $PY benchmarks/remat_memory.py --depths 32,64 --width 1024 --batch 1024 \
  --json "$OUT/remat_memory.json" --markdown "$OUT/remat_memory.md" \
  2> "$OUT/remat_memory.log" || echo "remat_memory.py stopped early" >&2

# 3. the mixed-precision and remat tests on the GPU (bfloat16 matmuls are real there).
step "pytest"
timeout "$(lim 60)" $PY -m pytest tests/test_precision.py tests/test_remat.py -q -x \
  -p no:cacheprovider > "$OUT/tests.log" 2>&1 || echo "GPU tests failed or timed out" >&2
tail -3 "$OUT/tests.log" >&2

# 4. the manual backward pass against jax.grad (one axis at a time, batches ×16 to fill the
#    GPU), jitted only.
step "manual_vs_autodiff.py"
timeout "$(lim 45)" $PY benchmarks/manual_vs_autodiff.py --quick --device-scale 16 --budget 0.5 \
  --no-nojit --json "$OUT/manual_vs_autodiff.json" --plot "$OUT/manual_vs_autodiff.png" \
  > "$OUT/manual_vs_autodiff.txt" 2>&1 || echo "manual_vs_autodiff.py stopped early" >&2

# 5. torch.compile against pure JAX, with whatever time is left.
step "peers.py torch_compile"
timeout "$(lim 120)" $PY benchmarks/peers.py --rounds 5 --target-ms 50 \
  --variants pure_jax,torch_eager,torch_compile --configs small,deep,large \
  --json "$OUT/peers_torch_compile.json" --markdown "$OUT/peers_torch_compile.md" \
  2> "$OUT/peers_torch_compile.log" || echo "torch.compile run stopped early" >&2

step "done; results in $OUT"
