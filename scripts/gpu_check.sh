#!/usr/bin/env bash
# The GPU check (rung 6 of the verification ladder, docs/verification.md) in ONE command that fits the device `run`
# tool's 10-minute limit on a machine with a CUDA GPU, no network and no TensorRT (H100/H200, Python 3.12, torch
# 2.11+cu130, onnx 1.23, onnxruntime 1.30 CPU-only, nvcc 13.0, CMake, compute-sanitizer).
#
# The call to make (repository root; first `scripts/gpu_check.sh --prepare` where there is network):
#   run(command="scripts/gpu_check.sh",
#       carry=["build/deps/tensorrt", "build/deps/onnxruntime", "build/deps/pywheels"],
#       timeout_s=560)
# It returns $OUT/summary.txt (one line per step) and $OUT/gpu_check.tar.gz (everything: summary, environment, every
# step's log, the pytest junit files, bench_gpu.json/.md, emu_vs_gpu.json/.md), two files of the eight that come
# back. The tar is rewritten after every step, so a run stopped from outside still returns all finished steps.
#
# Steps, in this order, each under `timeout` (seconds; the caps and the elastic benchmark fit a total budget of
# PIMOE_GPU_CHECK_BUDGET = 480 s, 80 s under the 560-s call: start of the command and the tar have margin):
#   build       cmake + build for this GPU's architecture only: TensorRT plugins, GPU harness, libpimoe_ort(_cuda)
#               when the ONNX Runtime headers came along, the emulated harness and the emulator's selftest  cap 110
#   gpu-tests   pytest -m gpu over tests/emu/test_gpu_layer.py and tests/ops/test_ops_backends.py, with
#               PIMOE_TESTS_NO_EXPORT=1 (no test depends on the exporter of this machine: the INT8 parameters are
#               computed in memory, nothing is exported, nothing ONNX is carried). A skipped test is a FAILURE (a
#               missing harness must not pass as "all skipped"); no test collected is a failure. The CUDA-provider
#               tests of tests/runtime/test_ort_cuda.py need onnxruntime-gpu: run when this Python has it, else the
#               summary says NOT RUN and why                                                                   cap 150
#   bench       scripts/bench_gpu.py, seed-512, qwen3-moe, mixtral-ffn (smallest first), every row written as soon as it
#               is measured; takes all the time the later steps do not need (at least 60 s)                   elastic
#   emu-self    the emulator checked by the GPU: plugins/emu/tests/selftest.cu built with nvcc and run on the
#               GPU, the same file on the emulator, and scripts/emu_vs_gpu.py (same plugin calls on both)       cap 50
#   memcheck,   compute-sanitizer over tests/emu/test_gpu_layer.py::test_sanitizer_case[trt-harness]. A machine that
#   racecheck   refuses compute-sanitizer (no ERROR SUMMARY, non-zero exit) is reported REFUSED and the run goes
#               on; REFUSED does not fail the run (it says so). Each is sure of 45 s and takes up to 120 s of
#               what the benchmark left                                                              45..120 each
# A step that runs out of time is TIMEOUT, one that has no time left SKIPPED: both fail the run. Exit 0 when every
# step passed (REFUSED / NOT RUN named in the summary), 1 otherwise.
#
# --dry-run (CI, tests/emu/test_gpu_check.py): the same script, order, limits, summary and tar on a CPU machine with the
# emulated harness of an existing build (PIMOE_GPU_CHECK_BUILD, default build/plugins of scripts/setup.sh): build
# = an incremental build of the emulated targets; gpu-tests = a small slice of the same test files under `-m emu`
# (with PIMOE_TESTS_NO_EXPORT=1); bench = bench_gpu.py --emulated (CPU milliseconds, marked as such); emu-self =
# the emulated selftest and emu_vs_gpu.py with the emulator on both sides; compute-sanitizer = whatever
# PIMOE_COMPUTE_SANITIZER names (usually missing: REFUSED).
#
# What the machine cannot download travels with the working tree, in git-ignored folders (--prepare fetches them):
#   build/deps/tensorrt     TensorRT headers (scripts/fetch_deps.sh trt)
#   build/deps/onnxruntime  ONNX Runtime headers (scripts/fetch_deps.sh ort; optional: libpimoe_ort_cuda)
#   build/deps/pywheels     wheels of Python packages the tests import that the machine lacks (hypothesis,
#                           sortedcontainers, safetensors), unpacked into build/gpu-pydeps when missing
# Environment: OUT (result folder, default gpu-results), PYTHON, PIMOE_GPU_CHECK_BUDGET, PIMOE_CUDA_ARCHITECTURES,
# PIMOE_COMPUTE_SANITIZER (default: compute-sanitizer on the GPU, none in a dry run), PIMOE_TRT_HARNESS_EMU,
# PIMOE_GPU_CHECK_BUILD (dry run), PIMOE_GPU_CHECK_SCALE (percent applied to the budget and every cap, default 100:
# tests/emu/test_gpu_check.py shrinks them to make a step time out).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

mode=gpu
case "${1:-}" in
  --prepare)
    set -e
    python=${PYTHON:-"$root/.venv/bin/python"}
    [ -x "$python" ] || python=python3
    PYTHON="$python" scripts/fetch_deps.sh trt ort
    mkdir -p build/deps/pywheels
    "$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any -d build/deps/pywheels \
      hypothesis==6.170.17 sortedcontainers==2.4.0 safetensors==0.8.0
    du -sh build/deps/tensorrt build/deps/onnxruntime build/deps/pywheels
    exit 0;;
  --dry-run) mode=dry;;
  "") ;;
  *) echo "usage: scripts/gpu_check.sh [--prepare | --dry-run]" >&2; exit 2;;
esac

out=${OUT:-gpu-results}
mkdir -p "$out"
out=$(cd "$out" && pwd)
work="$root/build/gpu-check"  # everything the tar holds; build/ is git-ignored
rm -rf "$work"
mkdir -p "$work"
summary="$work/summary.txt"
: > "$summary"
start=$(date +%s)
scale=${PIMOE_GPU_CHECK_SCALE:-100}
cap() { echo $(( $1 * scale / 100 )); }
budget=$(cap "${PIMOE_GPU_CHECK_BUDGET:-480}")
cap_build=$(cap 110) cap_tests=$(cap 150) min_bench=$(cap 60) cap_emu=$(cap 50) min_sanitizer=$(cap 45)
max_sanitizer=$(cap 120)
if [ "$mode" = dry ]; then python=${PYTHON:-"$root/.venv/bin/python"}; else python=${PYTHON:-python3}; fi
[ -x "$(command -v "$python")" ] || python=python3
export PYTHON_BIN="$python" PYTHONUNBUFFERED=1
failed=0

note() { echo "$*" | tee -a "$summary"; }
left() { echo $(( budget - ($(date +%s) - start) )); }
pack() {  # the one tar, rewritten after every step (and a plain copy of the summary)
  cp "$summary" "$out/summary.txt"
  tar -czf "$out/.gpu_check.tar.gz.partial" -C "$work" . 2>/dev/null && mv "$out/.gpu_check.tar.gz.partial" "$out/gpu_check.tar.gz"
}

# run_step NAME CAP RESERVE FUNCTION: runs FUNCTION (exported) under `timeout`, for at most min(CAP, time left -
# RESERVE) seconds (CAP 0: no cap); RESERVE is what the later steps are sure of. FUNCTION writes its verdict line ("PASS ...",
# "FAIL ...", "REFUSED ...", "NOT RUN ...") to $work/<NAME>.verdict; the log is $work/<NAME>.log.
run_step() {
  local name=$1 cap=$2 reserve=$3 fn=$4 limit rc verdict t0
  limit=$(( $(left) - reserve ))
  [ "$cap" -gt 0 ] && [ "$limit" -gt "$cap" ] && limit=$cap
  if [ "$limit" -lt 10 ]; then
    note "step $name: SKIPPED (no time left: ${limit} s); counts as a failure"
    failed=1
    pack
    return
  fi
  t0=$(date +%s)
  rm -f "$work/$name.verdict"
  timeout -k 5 "$limit" bash -c "$fn" > "$work/$name.log" 2>&1
  rc=$?
  verdict=$(cat "$work/$name.verdict" 2>/dev/null)
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    verdict="TIMEOUT after $limit s${verdict:+ (last: $verdict)}"
  elif [ -z "$verdict" ]; then
    verdict="FAIL (exit $rc, no verdict: see $name.log)"
  fi
  case "$verdict" in PASS*|REFUSED*|NOT\ RUN*) ;; *) failed=1;; esac
  note "step $name: $verdict ($(( $(date +%s) - t0 )) s of $limit s; $name.log)"
  pack
}

# pytest's junit counts -> "PASS n passed" or "FAIL ..." (skipped and an empty selection count as failures)
export JUNIT_VERDICT='
import sys, xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except Exception as exc:
    print(f"FAIL (no junit report: {exc})"); raise SystemExit
suites = [root] if root.tag == "testsuite" else list(root)
n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
tests, failures, errors, skipped = n["tests"], n["failures"], n["errors"], n["skipped"]
passed = tests - failures - errors - skipped
ok = tests > 0 and failures == errors == skipped == 0 and int(sys.argv[2]) == 0
text = f"{passed} passed, {failures} failed, {errors} errors, {skipped} skipped"
print(("PASS " if ok else "FAIL ") + text + ("" if skipped == 0 else " (skipped tests count as failures)")
      + ("" if tests else " (no test collected)") + ("" if ok or failures or errors or skipped or not tests
                                                     else f" (pytest exit {sys.argv[2]})"))
'

# ---------------------------------------------------------------------------------------------- environment
note "pimoe gpu_check ($mode) $(date -u '+%Y-%m-%d %H:%M UTC') on $(hostname), budget $budget s"
{
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv
  "$python" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available() and torch.cuda.get_device_name())'
  "$python" -c 'import onnx, onnxruntime as o; print("onnx", onnx.__version__, "onnxruntime", o.__version__, o.get_available_providers())'
  (command -v nvcc >/dev/null && nvcc --version | tail -n 2) || /usr/local/cuda/bin/nvcc --version 2>&1 | tail -n 2
  cmake --version | head -n 1
  lscpu 2>/dev/null | grep -m1 "Model name"
  (command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer) 2>&1
} > "$work/env.txt" 2>&1
[ "$mode" = gpu ] && note "gpu: $(nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader 2>/dev/null | head -n 1)"

# Python packages the machine may lack (no network): unpack the carried wheels
pydeps="$root/build/gpu-pydeps"
missing=$("$python" -c 'import importlib.util as u; print(" ".join(m for m in ("hypothesis", "sortedcontainers", "safetensors") if u.find_spec(m) is None))' 2>/dev/null)
for m in $missing; do
  whl=$(ls build/deps/pywheels/${m}-*.whl 2>/dev/null | head -n 1)
  if [ -n "$whl" ]; then mkdir -p "$pydeps" && "$python" -m zipfile -e "$whl" "$pydeps" && note "python: unpacked $(basename "$whl")"
  else note "python: $m missing and no wheel in build/deps/pywheels (scripts/gpu_check.sh --prepare, then carry it)"; fi
done

export ROOT="$root" WORK="$work" MODE="$mode" PYTHONPATH="$root:$pydeps${PYTHONPATH:+:$PYTHONPATH}"
export PIMOE_TRT_LOG=off  # the bad-argument tests trigger plugin errors on purpose
if [ "$mode" = gpu ]; then
  export BUILD="$root/build/gpu-plugins"
  export PIMOE_TRT_HARNESS="$BUILD/harness/libpimoe_trt_harness.so" PIMOE_TRT_PLUGINS="$BUILD/trt/libpimoe_trt_plugins.so"
else
  export BUILD="$root/${PIMOE_GPU_CHECK_BUILD:-build/plugins}"
fi
export PIMOE_TRT_HARNESS_EMU=${PIMOE_TRT_HARNESS_EMU:-$BUILD/emu/libpimoe_trt_harness_emu.so}
export ORT_INCLUDE=${ONNXRUNTIME_INCLUDE_DIR:-$root/build/deps/onnxruntime/include}
if [ "$mode" = gpu ] && [ -f "$ORT_INCLUDE/onnxruntime_cxx_api.h" ]; then
  export PIMOE_ORT_LIBRARY="$BUILD/libpimoe_ort.so" PIMOE_ORT_CUDA_LIBRARY="$BUILD/libpimoe_ort_cuda.so"
fi
export NVCC=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .')
export ARCH=${PIMOE_CUDA_ARCHITECTURES:-${arch:-90}}
if [ "$mode" = dry ]; then export SANITIZER=${PIMOE_COMPUTE_SANITIZER:-"none (dry run)"}
else export SANITIZER=${PIMOE_COMPUTE_SANITIZER:-$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)}; fi

# ---------------------------------------------------------------------------------------------- steps
step_build() {
  if [ "$MODE" = dry ]; then
    [ -f "$BUILD/CMakeCache.txt" ] || { echo "FAIL (no build in $BUILD: run scripts/setup.sh)" > "$WORK/build.verdict"; exit 1; }
    cmake --build "$BUILD" --target pimoe_trt_harness_emu pimoe_emu_selftest pimoe_emu_alloc_counter \
      --parallel "$(nproc)" && echo "PASS (emulated targets of $BUILD)" > "$WORK/build.verdict"
    return
  fi
  local ort=OFF gen=()
  [ -f "$ORT_INCLUDE/onnxruntime_cxx_api.h" ] && ort=ON
  command -v ninja >/dev/null && gen=(-G Ninja)
  if [ ! -f build/deps/tensorrt/include/NvInferRuntime.h ] && [ -z "${TENSORRT_ROOT:-}" ]; then
    echo "FAIL (no TensorRT headers in build/deps/tensorrt: --prepare, then carry it)" > "$WORK/build.verdict"
    exit 1
  fi
  cmake -S plugins -B "$BUILD" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DPIMOE_BUILD_ORT=$ort \
    -DONNXRUNTIME_INCLUDE_DIR="$ORT_INCLUDE" -DPIMOE_BUILD_TRT=ON -DPIMOE_BUILD_EMU=ON \
    -DCMAKE_CUDA_COMPILER="$NVCC" -DCMAKE_CUDA_ARCHITECTURES="$ARCH" \
    && cmake --build "$BUILD" --parallel "$(nproc)" && [ -f "$PIMOE_TRT_HARNESS" ] \
    && echo "PASS (sm_$ARCH; libpimoe_ort_cuda: $ort)" > "$WORK/build.verdict"
}

step_gpu_tests() {
  local rc selection=(tests/emu/test_gpu_layer.py tests/ops/test_ops_backends.py) marker=gpu keep=()
  if [ "$MODE" = dry ]; then
    marker=emu
    selection=(tests/emu/test_gpu_layer.py)
    keep=(-k "sanitizer_case or unchecked_faults or int8_two_runs")
  fi
  PIMOE_TESTS_NO_EXPORT=1 "$PYTHON_BIN" -m pytest -m "$marker" -q -p no:cacheprovider -o addopts="" -rs \
    --durations=10 --junitxml="$WORK/gpu-tests.xml" "${keep[@]}" "${selection[@]}"
  rc=$?
  "$PYTHON_BIN" -c "$JUNIT_VERDICT" "$WORK/gpu-tests.xml" $rc > "$WORK/gpu-tests.verdict"
  [ "$MODE" = dry ] && return
  # the CUDA execution-provider tests need onnxruntime-gpu (not a wheel this machine has by default)
  if "$PYTHON_BIN" -c 'import onnxruntime as o, sys; sys.exit("CUDAExecutionProvider" not in o.get_available_providers())'; then
    "$PYTHON_BIN" -m pytest -m gpu -q -p no:cacheprovider -o addopts="" -rs --junitxml="$WORK/ort-cuda-tests.xml" \
      tests/runtime/test_ort_cuda.py
    "$PYTHON_BIN" -c "$JUNIT_VERDICT" "$WORK/ort-cuda-tests.xml" $? > "$WORK/ort-cuda.verdict"
  else
    echo "NOT RUN (onnxruntime $("$PYTHON_BIN" -c 'import onnxruntime as o; print(o.__version__)' 2>&1) has no" \
         "CUDAExecutionProvider here: the CUDA-provider tests of tests/runtime/test_ort_cuda.py need onnxruntime-gpu)" \
         > "$WORK/ort-cuda.verdict"
  fi
}

step_bench() {
  local rc args=(--configs seed-512,qwen3-moe,mixtral-ffn --out "$WORK")
  [ "$MODE" = dry ] && args=(--emulated --configs seed-512 --tokens 1,4 --iters 2 --out "$WORK")
  "$PYTHON_BIN" scripts/bench_gpu.py "${args[@]}"
  rc=$?
  local rows
  rows=$("$PYTHON_BIN" -c 'import json, sys; print(len(json.load(open(sys.argv[1]))["records"]))' "$WORK/bench_gpu.json" 2>/dev/null)
  if [ $rc -eq 0 ]; then echo "PASS (${rows:-0} rows; bench_gpu.md)" > "$WORK/bench.verdict"
  else echo "FAIL (exit $rc, ${rows:-0} rows written; bench_gpu.md)" > "$WORK/bench.verdict"; fi
}

step_emu_self() {
  local gpu_rc=0 emu_rc vs_rc
  local gpu="not run (dry run)"
  if [ "$MODE" = gpu ]; then
    "$NVCC" -std=c++17 -O2 -arch="sm_$ARCH" -o "$WORK/selftest_gpu" plugins/emu/tests/selftest.cu && "$WORK/selftest_gpu"
    gpu_rc=$?
    gpu="rc=$gpu_rc"
    echo "gpu selftest rc=$gpu_rc"
  fi
  "$BUILD/emu/pimoe_emu_selftest"
  emu_rc=$?
  echo "emulated selftest rc=$emu_rc"
  if [ "$MODE" = gpu ]; then
    "$PYTHON_BIN" scripts/emu_vs_gpu.py --cuda "$PIMOE_TRT_HARNESS" --emu "$PIMOE_TRT_HARNESS_EMU" --out "$WORK"
  else
    "$PYTHON_BIN" scripts/emu_vs_gpu.py --dry-run --cuda "$PIMOE_TRT_HARNESS_EMU" --emu "$PIMOE_TRT_HARNESS_EMU" --out "$WORK"
  fi
  vs_rc=$?
  local agree
  agree=$(grep -E "cases agree" "$WORK/emu-self.log" 2>/dev/null | tail -n 1)
  if [ $gpu_rc -eq 0 ] && [ $emu_rc -eq 0 ] && [ $vs_rc -eq 0 ]; then
    echo "PASS (selftest GPU $gpu, emulator rc=$emu_rc; emu_vs_gpu: $agree)" > "$WORK/emu-self.verdict"
  else
    echo "FAIL (selftest GPU $gpu, emulator rc=$emu_rc; emu_vs_gpu rc=$vs_rc: ${agree:-no result})" > "$WORK/emu-self.verdict"
  fi
}

sanitize() {  # sanitize TOOL
  local tool=$1 rc backend=trt-harness
  [ "$MODE" = dry ] && backend=emu
  if [ ! -x "$(command -v "$SANITIZER")" ]; then
    echo "REFUSED (no compute-sanitizer: $SANITIZER); the run goes on" > "$WORK/$tool.verdict"
    return
  fi
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" --error-exitcode 86 --target-processes all \
    "$PYTHON_BIN" -m pytest -q -p no:cacheprovider -o addopts="" "tests/emu/test_gpu_layer.py::test_sanitizer_case[$backend]"
  rc=$?
  local errors
  errors=$(grep -Eo "ERROR SUMMARY: [0-9]+ error" "$WORK/$tool.log" | tail -n 1)
  if [ -z "$errors" ] && [ $rc -ne 0 ]; then
    echo "REFUSED (compute-sanitizer did not run here, exit $rc: $(grep -m1 -iE 'error|refused|not supported' "$WORK/$tool.log" | cut -c1-160)); the run goes on" \
      > "$WORK/$tool.verdict"
  elif [ $rc -eq 0 ]; then echo "PASS ($errors)" > "$WORK/$tool.verdict"
  else echo "FAIL (exit $rc, ${errors:-no summary})" > "$WORK/$tool.verdict"; fi
}
step_memcheck() { sanitize memcheck; }
step_racecheck() { sanitize racecheck; }
export -f step_build step_gpu_tests step_bench step_emu_self sanitize step_memcheck step_racecheck

# each step's reserve: the time the later steps keep for themselves (their caps; the benchmark its minimum)
late=$(( cap_emu + 2 * min_sanitizer ))
run_step build "$cap_build" $(( cap_tests + min_bench + late )) step_build
if grep -q "^step build: PASS" "$summary"; then
  run_step gpu-tests "$cap_tests" $(( min_bench + late )) step_gpu_tests
  [ -f "$work/ort-cuda.verdict" ] && { v=$(cat "$work/ort-cuda.verdict"); case "$v" in PASS*|NOT\ RUN*) ;; *) failed=1;; esac
                                       note "step ort-cuda-tests: $v"; pack; }
  run_step bench 0 "$late" step_bench
  run_step emu-self "$cap_emu" $(( 2 * min_sanitizer )) step_emu_self
  run_step memcheck "$max_sanitizer" "$min_sanitizer" step_memcheck
  run_step racecheck "$max_sanitizer" 0 step_racecheck
else
  note "later steps not run: the build failed (build.log)"
  tail -n 30 "$work/build.log" 2>/dev/null
fi
[ -f "$work/bench_gpu.md" ] && tee -a "$summary" < "$work/bench_gpu.md"
note "total $(( $(date +%s) - start )) s; overall $([ $failed -eq 0 ] && echo PASS || echo FAIL); results: $out/gpu_check.tar.gz"
pack
exit $failed
