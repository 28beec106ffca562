#!/usr/bin/env bash
# The GPU checks in one scripted run, for a machine with an NVIDIA GPU, nvcc and a CUDA build of
# torch (nothing is downloaded; torchjd / quadprog are not needed: their tests skip). Every step's
# output goes to $OUT (default /tmp/fastmtl_gpu_check): <step>.log, summary.txt, the benchmark JSON.
#
#   OUT=/tmp/out bench/gpu_check.sh                      # env build test_cuda test bench (~12 min)
#   STEPS="env build test_cuda" bench/gpu_check.sh       # a subset (steps run in the order given)
#   STEPS="sanitize" bench/gpu_check.sh                  # compute-sanitizer memcheck + racecheck
#
# Steps (each bounded by STEP_TIMEOUT seconds, default 540, so that none passes 10 minutes):
#   env        GPU, driver, torch, nvcc (seconds)
#   build      pip install --no-build-isolation with FASTMTL_CUDA=ON for this GPU's architecture
#              (unless TORCH_CUDA_ARCH_LIST is set), all cores, incremental in build/gpu (~3-5 min)
#   test_cuda  tests/test_cuda.py with both kernel choices (custom and portable; ~2 min)
#   test       the whole suite on the GPU machine, FASTMTL_KERNELS=custom (~3 min)
#   bench      bench/bench_cuda.py: custom kernels vs portable steps vs plain PyTorch (eager and
#              compiled), training step and engine, float32 and bfloat16 (~2 min)
#   sanitize   compute-sanitizer --tool memcheck, then racecheck, over a subset of test_cuda.py
# A failing step is recorded and the next one still runs; the exit status is the number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-${TMPDIR:-/tmp}/fastmtl_gpu_check}"
PYTHON="${PYTHON:-python3}"
STEPS="${STEPS:-env build test_cuda test bench}"
STEP_TIMEOUT="${STEP_TIMEOUT:-540}"
BENCH_ARGS="${BENCH_ARGS:-}"
JOBS="$(nproc)"
mkdir -p "$OUT"
failed=0

note() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/summary.txt"; }

run_step() {  # run_step NAME: output to $OUT/NAME.log, status and duration to the summary
  local name=$1 start rc
  start=$(date +%s)
  timeout --signal=TERM --kill-after=20 "$STEP_TIMEOUT" bash -c "$(declare -f "step_$name"); $(declare -p PYTHON OUT JOBS BENCH_ARGS); step_$name" \
    >"$OUT/$name.log" 2>&1
  rc=$?
  [ "$rc" -eq 124 ] && echo "step $name: timed out after $STEP_TIMEOUT s" >>"$OUT/$name.log"
  note "$name: exit $rc in $(($(date +%s) - start)) s (log: $name.log)"
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
  tail -n 5 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$OUT/summary.txt"
}

step_env() {
  nvidia-smi || true
  command -v nvcc && nvcc --version || echo "nvcc not on the PATH"
  command -v compute-sanitizer || echo "compute-sanitizer not on the PATH"
  "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); print(torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
  git log -1 --oneline 2>/dev/null || true
}

step_build() {
  local arch
  arch="${TORCH_CUDA_ARCH_LIST:-$("$PYTHON" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}"
  echo "TORCH_CUDA_ARCH_LIST=$arch, $JOBS jobs"
  TORCH_CUDA_ARCH_LIST="$arch" CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" MAX_JOBS="$JOBS" "$PYTHON" -m pip install \
    --no-build-isolation --no-deps -v . --config-settings=build-dir=build/gpu \
    --config-settings=cmake.define.FASTMTL_CUDA=ON --config-settings=build.tool-args=-j"$JOBS" &&
    (cd /tmp && "$PYTHON" -c "import fastmtl; info = fastmtl.build_info(); print(info); assert info['cuda'], 'no CUDA kernels'")
}

# Against the installed package (the repository root has no fastmtl/ of its own on sys.path).
step_test_cuda() { "$PYTHON" -m pytest tests/test_cuda.py -q -rs -p no:cacheprovider; }

step_test() { FASTMTL_KERNELS=custom "$PYTHON" -m pytest tests -q -rs -p no:cacheprovider; }

step_bench() {
  # shellcheck disable=SC2086  (BENCH_ARGS is a list of arguments)
  "$PYTHON" bench/bench_cuda.py --out "$OUT/bench_cuda.json" $BENCH_ARGS
}

step_sanitize() {
  local tool rc=0
  for tool in memcheck racecheck; do
    echo "== compute-sanitizer --tool $tool"
    FASTMTL_KERNELS=custom compute-sanitizer --tool "$tool" --error-exitcode 3 "$PYTHON" -m pytest \
      tests/test_cuda.py -q -x -p no:cacheprovider -k "every_op and float32 and custom and (relu or all)" || rc=$?
  done
  return "$rc"
}

note "gpu_check: steps '$STEPS', outputs in $OUT, $JOBS cores, step timeout $STEP_TIMEOUT s"
for step in $STEPS; do
  case "$step" in
    env | build | test_cuda | test | bench | sanitize) run_step "$step" ;;
    *) note "unknown step '$step' (env, build, test_cuda, test, bench, sanitize)"; failed=$((failed + 1)) ;;
  esac
done
note "gpu_check: $failed step(s) failed"
exit "$failed"
