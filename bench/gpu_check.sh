#!/usr/bin/env bash
# The GPU checks of issue 3 in one scripted run, for a machine with an NVIDIA GPU, nvcc and a CUDA
# build of torch (nothing is downloaded): build fastmtl with its CUDA kernels, run the CUDA tests
# and the whole test suite, run the CUDA benchmark in float32 and bfloat16. Every step's output
# goes to $OUT (default /tmp/fastmtl_gpu_check): <step>.log, summary.txt, the benchmark JSON files.
#
#   OUT=/tmp/out bench/gpu_check.sh                      # everything
#   STEPS="env build test_cuda" bench/gpu_check.sh       # a subset (steps run in the order given)
#   BENCH_ARGS="--repeats 10 --no-compile" STEPS=bench bench/gpu_check.sh
#
# Steps: env (GPU, torch, nvcc), build (pip install --no-build-isolation with FASTMTL_CUDA=ON, for
# this GPU's architecture unless TORCH_CUDA_ARCH_LIST is set; incremental in build/gpu), test_cuda
# (test_cuda.py and every test parametrised on the cuda device), test (the whole suite), bench.
# A failing step is recorded and the next one still runs; the exit status is the number of failed steps.
# Where one call has a time limit, split the run: STEPS="env build test_cuda test", then STEPS=bench
# (the benchmark compiles the torch.compile baselines of two sizes in two dtypes: the longest step).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-${TMPDIR:-/tmp}/fastmtl_gpu_check}"
PYTHON="${PYTHON:-python}"
STEPS="${STEPS:-env build test_cuda test bench}"
BENCH_ARGS="${BENCH_ARGS:-}"
mkdir -p "$OUT"
failed=0

note() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/summary.txt"; }

run_step() {  # run_step NAME COMMAND...: output to $OUT/NAME.log, status and duration to the summary
  local name=$1 start rc
  shift
  start=$(date +%s)
  "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  note "$name: exit $rc in $(($(date +%s) - start)) s (log: $name.log)"
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
  tail -n 5 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$OUT/summary.txt"
}

step_env() {
  nvidia-smi || true
  command -v nvcc && nvcc --version || echo "nvcc not on the PATH"
  "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); print(torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
}

step_build() {
  local arch
  arch="${TORCH_CUDA_ARCH_LIST:-$("$PYTHON" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}"
  echo "TORCH_CUDA_ARCH_LIST=$arch"
  TORCH_CUDA_ARCH_LIST="$arch" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "$PYTHON" -m pip install --no-build-isolation \
    --no-deps -v . --config-settings=build-dir=build/gpu --config-settings=cmake.define.FASTMTL_CUDA=ON &&
    (cd /tmp && "$PYTHON" -c "import fastmtl; info = fastmtl.build_info(); print(info); assert info['cuda'], 'no CUDA kernels'")
}

step_test_cuda() { "$PYTHON" -m pytest tests -q -rs -k cuda; }

step_test() { "$PYTHON" -m pytest tests -q -rs; }

step_bench() {
  local dtype rc=0
  for dtype in float32 bfloat16; do
    # shellcheck disable=SC2086  (BENCH_ARGS is a list of arguments)
    "$PYTHON" bench/bench_step.py --device cuda --dtype "$dtype" --out "$OUT/bench_step-cuda-$dtype.json" $BENCH_ARGS ||
      rc=$?
  done
  return "$rc"
}

note "gpu_check: steps '$STEPS', outputs in $OUT"
for step in $STEPS; do
  case "$step" in
    env | build | test_cuda | test | bench) run_step "$step" "step_$step" ;;
    *) note "unknown step '$step' (env, build, test_cuda, test, bench)"; failed=$((failed + 1)) ;;
  esac
done
note "gpu_check: $failed step(s) failed"
exit "$failed"
