#!/usr/bin/env bash
# One command for a GPU machine (no network): the conformance suite on the GPU backends and on
# refopt.torch's Triton kernels, the GPU tests, and step times against AdamW(fused=True), within a
# 15-minute device budget (stage limits add up to 14 minutes at worst; a normal run takes
# about 6). Log: $OUT/gpu_check.log ($OUT defaults to ./gpu_check_out). Exit 0 all passed; 1 a stage
# failed; 2 a Python dependency is missing; 3 no GPU. GPU_CHECK_DRY_RUN=1 runs every stage on CPU
# stand-ins (a self-check of this script); GPU_CHECK_ONLY=REGEX runs only the stages whose names
# match (a rerun inside a budget). See backends/README.md (wheel folder .whl/, what each stage
# checks).
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-$ROOT/gpu_check_out}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
PY=${PYTHON:-python3}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
# JAX would otherwise reserve 75% of the GPU at first use, starving torch and CuPy in the same process.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
STARTED=$SECONDS
FAILED=()
stage() { echo; echo "=== $1 [$(date -u +%H:%M:%S), ${SECONDS}s]"; }
# run NAME LIMIT_S CMD...: runs one stage under a time limit and records a failure
run() {
  local name=$1 limit=$2; shift 2
  if ! [[ "$name" =~ ${GPU_CHECK_ONLY:-.} ]]; then echo; echo "=== $name: skipped (GPU_CHECK_ONLY)"; return 0; fi
  stage "$name"
  echo "+ $*"
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  [ $rc -eq 124 ] && echo "!! $name: timed out after ${limit}s"
  [ $rc -ne 0 ] && FAILED+=("$name (exit $rc)")
  return 0
}

stage "machine"
echo "repo: $ROOT ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo 'not a git checkout'))"
echo "$(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$PY" -c "import triton; print('triton', triton.__version__)" 2>/dev/null || echo "triton: not importable"

stage "python dependencies"
MODULES="numpy array_api_compat array_api_strict hypothesis mpmath ml_dtypes pytest"
missing() { "$PY" - "$@" <<'EOF'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
EOF
}
MISSING=$(missing $MODULES)
if [ -n "$MISSING" ] && compgen -G ".whl/*.whl" >/dev/null; then
  echo "missing: $MISSING; installing from .whl/ (no index)"
  "$PY" -m pip install --no-index --no-deps --find-links .whl -q .whl/*.whl || true
  MISSING=$(missing $MODULES)
fi
if [ -n "$MISSING" ]; then
  echo "!! missing Python modules: $MISSING"
  echo "   put their wheels in $ROOT/.whl/ (download command: backends/README.md) and rerun"
  exit 2
fi
"$PY" -c "import refopt, numpy; print('refopt', refopt.__version__, 'from', refopt.__file__, '| numpy', numpy.__version__)" || exit 2

stage "GPU libraries"
# Prints the refopt check backends that have a GPU here; exit 3 when there is none.
BACKENDS=$("$PY" - <<'EOF'
import sys
found, notes = [], []
try:
    import torch
    if torch.cuda.is_available():
        found.append("torch-cuda"); notes.append(f"torch {torch.__version__}: {torch.cuda.get_device_name()}")
    else:
        notes.append(f"torch {torch.__version__}: no CUDA device")
except Exception as e:
    notes.append(f"torch: {e}")
try:
    import cupy
    n = cupy.cuda.runtime.getDeviceCount()
    notes.append(f"cupy {cupy.__version__}: {n} device(s)")
    if n:
        found.append("cupy")
except Exception as e:
    notes.append(f"cupy: {type(e).__name__}: {e}")
try:
    import jax
    notes.append(f"jax {jax.__version__}: default backend {jax.default_backend()}")
    if jax.default_backend() == "gpu":
        found.append("jax")  # refopt check's JAX backend (jitted) uses JAX's default device
except Exception as e:
    notes.append(f"jax: {e}")
print("\n".join(notes), file=sys.stderr)
print(" ".join(found))
sys.exit(0 if found else 3)
EOF
)
HAVE_GPU=$?
DEVICE=cuda
WORKLOADS=big
TRITON_IDS=()   # every vector on the GPU; a sample in the dry run (Triton's interpreter is slow)
if [ "${GPU_CHECK_DRY_RUN:-0}" = 1 ]; then
  # Self-check of this script on a machine without a GPU: every stage, on CPU stand-ins.
  echo "GPU_CHECK_DRY_RUN=1: running the stages on CPU stand-ins (numpy backend, tiny workload,"
  echo "  Triton's interpreter on CPU tensors for the Triton stages)"
  BACKENDS=numpy DEVICE=cpu WORKLOADS=tiny
  export TRITON_INTERPRET=1 REFOPT_TRITON_ON_CPU=1
  TRITON_IDS=(--no-multi-tensor --ids "$("$PY" -c "from refopt.conformance import load, runner
print(','.join(v.id for v in runner.sample(load(dtype=['float32']), per_group=1)))")")
elif [ $HAVE_GPU -ne 0 ] || [ -z "$BACKENDS" ]; then
  echo "!! no GPU: none of torch-cuda, cupy, jax-gpu is usable here; nothing to check"
  echo "   (GPU_CHECK_DRY_RUN=1 runs the stages on CPU stand-ins to check this script)"
  exit 3
fi
echo "backends: $BACKENDS"

# Stages in order of what matters most, so that a run cut short by a device budget loses the least:
# the core on the GPU libraries, refopt.torch's Triton kernels (correctness, then the issue-13 speed
# target), the GPU tests, then JAX's compiled check and the quick all-library benchmark.
# torch-cuda and CuPy run every vector.
EAGER=()
for b in $BACKENDS; do [ "$b" != jax ] && EAGER+=(--backend "$b"); done
if [ ${#EAGER[@]} -gt 0 ]; then
  run "conformance (refopt check ${EAGER[*]})" 60 "$PY" -m refopt.cli check -q "${EAGER[@]}" \
    --report "$OUT/check_gpu.json"
fi
# refopt.torch's fused path on CUDA: Triton kernels, compiled first for every vector's configuration
# in parallel (~600 compilations of 1-3 s each; the check then reads Triton's cache), then every
# vector through them (fused=True ports: a parameter they cannot take fails rather than stepping
# eagerly), alone and in the multi-tensor run.
run "Triton kernels: compile for every vector" 180 "$PY" backends/triton_warmup.py --device "$DEVICE"
run "refopt.torch on $DEVICE through the Triton kernels (refopt check)" 120 "$PY" -m refopt.cli check -q \
  --port torch:backends/triton_ports.py:DOPEFused --port torch:backends/triton_ports.py:SAVEUSFused \
  --device "$DEVICE" --report "$OUT/check_triton.json" "${TRITON_IDS[@]}"
# The issue-13 target on a GPU: refopt.torch DOPE <= 3x torch.optim.AdamW(fused=True), full-size
# workloads (one 4096x4096 tensor; a 121-tensor transformer), interleaved rounds in one process.
run "refopt.torch against AdamW(fused=True), full size" 120 "$PY" benchmarks/run.py --device "$DEVICE" \
  --libraries torch --workloads "$( [ "$DEVICE" = cuda ] && echo big,transformer || echo tiny )" --rounds 5 \
  --no-check --timeout 100
# Where that time goes: host (Python, launches) against device (kernels) for one 4096x4096 step.
run "refopt.torch on $DEVICE: host and device time of one step" 60 "$PY" backends/triton_profile.py \
  --device "$DEVICE" $( [ "$DEVICE" = cuda ] || echo --steps 3 )
# The Triton tests compile a few dozen kernel sets of their own: in parallel where pytest-xdist is.
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 8)
run "GPU tests" 120 "$PY" -m pytest -q -p no:cacheprovider -rs "${XDIST[@]}" tests/adapters/test_gpu.py \
  tests/adapters/test_triton.py --junitxml "$OUT/test_gpu.xml"
# JAX compiles each configuration/shape/dtype (~0.5-1 s), so within the budget it runs the float32
# vectors (~50); `refopt check --backend jax` runs them all.
if [[ " $BACKENDS " == *" jax "* ]]; then
  run "conformance (refopt check --backend jax --dtype float32)" 75 "$PY" -m refopt.cli check -q \
    --backend jax --dtype float32 --report "$OUT/check_jax_gpu.json"
fi
run "bandwidth and step time, every library" 90 "$PY" benchmarks/run.py --quick --device "$DEVICE" --no-check \
  --workloads "$WORKLOADS" --timeout 40

stage "summary"
echo "took $((SECONDS - STARTED)) s; log $OUT/gpu_check.log"
if [ ${#FAILED[@]} -gt 0 ]; then
  printf '!! failed: %s\n' "${FAILED[@]}"
  exit 1
fi
echo "all stages passed"
