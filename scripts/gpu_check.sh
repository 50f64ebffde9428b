#!/usr/bin/env bash
# Rung 6 of the verification ladder in one command, for a CUDA machine WITHOUT network and WITHOUT TensorRT
# (torch with CUDA, nvcc, CMake, compute-sanitizer, pytest, numpy, onnx, onnxruntime):
#   1. build libpimoe_trt_plugins.so + libpimoe_trt_harness.so with the local nvcc (for this GPU's architecture)
#   2. pytest -m gpu            (tests/emu/test_gpu_layer.py, tests/ops/test_ops_backends.py[trt-harness], ...; fp32, fp16
#                               and the int8 W8A8 kernels; tests/runtime/test_ort_cuda.py: libpimoe_ort_cuda's CUDA
#                               execution-provider kernels, built when build/deps/onnxruntime is carried, run when
#                               the Python has onnxruntime-gpu, else skipped with the reason)
#   3. compute-sanitizer memcheck and racecheck over tests/emu/test_gpu_layer.py::test_sanitizer_case
#   4. the emulator checked by the GPU: plugins/emu/tests/selftest.cu built with nvcc and run on the GPU (WMMA and
#      mma.sync fragment layouts, shuffles, cp.async against host references), and scripts/emu_vs_gpu.py: the same
#      plugin calls through the CUDA harness and the emulated one (built here with g++), outputs compared
#   5. scripts/bench_gpu.py     (plugins vs PyTorch eager, dense and sort + grouped_mm in a CUDA graph; the int8
#                               plugin paths vs the weight-streaming floor at the measured memory bandwidth;
#                               mixtral-ffn first, results written after each config)
# Everything lands in ${OUT:-gpu-results} (summary.txt, env.txt, build.log, pytest.log, sanitizer.log, emu.log,
# emu_vs_gpu.json/md, bench.log, bench_gpu.json, bench_gpu.md); a one-screen summary is printed at the end. Budget:
# under 8 minutes.
#
# What the GPU machine cannot download must travel with the working tree, in git-ignored folders:
#   build/deps/tensorrt   TensorRT headers (scripts/fetch_deps.sh trt)
#   build/deps/onnxruntime  ONNX Runtime headers (scripts/fetch_deps.sh ort; optional: libpimoe_ort_cuda)
#   build/deps/pywheels   wheels for Python packages the tests import but the machine lacks (hypothesis,
#                         sortedcontainers, safetensors), unpacked into build/gpu-pydeps when missing
# Prepare both on a machine with network:   scripts/gpu_check.sh --prepare
# and send them along (device `run` tool: carry ["build/deps/tensorrt", "build/deps/pywheels", "build/deps/onnxruntime"]).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

if [ "${1:-}" = "--prepare" ]; then
  set -e
  python=${PYTHON:-"$root/.venv/bin/python"}
  [ -x "$python" ] || python=python3
  PYTHON="$python" scripts/fetch_deps.sh trt ort
  mkdir -p build/deps/pywheels
  "$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any -d build/deps/pywheels \
    hypothesis==6.170.17 sortedcontainers==2.4.0 safetensors==0.8.0
  du -sh build/deps/tensorrt build/deps/pywheels
  exit 0
fi

out=${OUT:-gpu-results}
mkdir -p "$out"
out=$(cd "$out" && pwd)
summary="$out/summary.txt"
: > "$summary"
start=$(date +%s)
budget=${PIMOE_GPU_CHECK_BUDGET:-470}  # seconds for all steps (the caller's limit is 8 minutes)
python=${PYTHON:-python3}
note() { echo "$*" | tee -a "$summary"; }
left() { echo $(( budget - ($(date +%s) - start) )); }
# run a step with at most min(cap, time left - reserve) seconds
limit() { local cap=$1 reserve=$2 l; l=$(( $(left) - reserve )); [ "$l" -lt "$cap" ] && cap=$l; [ "$cap" -lt 10 ] && cap=10; echo "$cap"; }

note "pimoe gpu_check $(date -u '+%Y-%m-%d %H:%M UTC') on $(hostname)"
{
  nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv 2>&1
  "$python" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available() and torch.cuda.get_device_name())' 2>&1
  (command -v nvcc >/dev/null && nvcc --version | tail -n 2) || /usr/local/cuda/bin/nvcc --version 2>&1 | tail -n 2
  cmake --version | head -n 1
  (command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer) 2>&1
} > "$out/env.txt" 2>&1
note "gpu: $(nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader 2>/dev/null | head -n 1)"

# ---- Python packages the machine may lack (no network): unpack the carried wheels
pydeps="$root/build/gpu-pydeps"
missing=$("$python" - <<'EOF'
import importlib.util
print(" ".join(m for m in ("hypothesis", "sortedcontainers", "safetensors") if importlib.util.find_spec(m) is None))
EOF
)
if [ -n "$missing" ]; then
  mkdir -p "$pydeps"
  for m in $missing; do
    whl=$(ls build/deps/pywheels/${m}-*.whl 2>/dev/null | head -n 1)
    if [ -n "$whl" ]; then "$python" -m zipfile -e "$whl" "$pydeps" && note "python: unpacked $(basename "$whl")"
    else note "python: $m missing and no wheel in build/deps/pywheels (run scripts/gpu_check.sh --prepare where there is network)"; fi
  done
fi
export PYTHONPATH="$root:$pydeps${PYTHONPATH:+:$PYTHONPATH}"
export PIMOE_TRT_HARNESS="$root/build/gpu-plugins/harness/libpimoe_trt_harness.so"
export PIMOE_TRT_PLUGINS="$root/build/gpu-plugins/trt/libpimoe_trt_plugins.so"
export PIMOE_TRT_LOG=off  # the bad-argument tests trigger plugin errors on purpose
# libpimoe_ort + libpimoe_ort_cuda (CUDA execution-provider kernels) when the ONNX Runtime headers came along
ort_include=${ONNXRUNTIME_INCLUDE_DIR:-$root/build/deps/onnxruntime/include}
build_ort=OFF
if [ -f "$ort_include/onnxruntime_cxx_api.h" ]; then
  build_ort=ON
  export PIMOE_ORT_LIBRARY="$root/build/gpu-plugins/libpimoe_ort.so"
  export PIMOE_ORT_CUDA_LIBRARY="$root/build/gpu-plugins/libpimoe_ort_cuda.so"
fi

# ---- 1. build
nvcc_bin=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .')
arch=${PIMOE_CUDA_ARCHITECTURES:-${arch:-90}}
generator=(); command -v ninja >/dev/null && generator=(-G Ninja)
build_start=$(date +%s)
if [ ! -f build/deps/tensorrt/include/NvInferRuntime.h ] && [ -z "${TENSORRT_ROOT:-}" ]; then
  note "build: FAILED - no TensorRT headers in build/deps/tensorrt (run scripts/gpu_check.sh --prepare and carry build/deps/tensorrt)"
  build_ok=0
else
  timeout "$(limit 200 240)" bash -c "cmake -S plugins -B build/gpu-plugins ${generator[*]} -DCMAKE_BUILD_TYPE=Release \
      -DPIMOE_BUILD_ORT=$build_ort -DONNXRUNTIME_INCLUDE_DIR='$ort_include' \
      -DPIMOE_BUILD_TRT=ON -DCMAKE_CUDA_COMPILER='$nvcc_bin' -DCMAKE_CUDA_ARCHITECTURES='$arch' \
    && cmake --build build/gpu-plugins --parallel \$(nproc)" > "$out/build.log" 2>&1
  build_ok=$([ $? -eq 0 ] && [ -f "$PIMOE_TRT_HARNESS" ] && echo 1 || echo 0)
  note "build: $([ "$build_ok" = 1 ] && echo ok || echo FAILED) (sm_$arch, $(( $(date +%s) - build_start )) s; build.log)"
fi
if [ "$build_ok" != 1 ]; then
  tail -n 20 "$out/build.log" 2>/dev/null
  cat "$summary"
  exit 1
fi

# ---- 2. pytest -m gpu
status=0
pytest_start=$(date +%s)
# the files holding gpu tests (collecting the whole suite would import CPU-only dependencies this machine lacks)
timeout "$(limit 200 200)" "$python" -m pytest -m gpu -q -p no:cacheprovider -o addopts="" --durations=15 \
  tests/emu/test_gpu_layer.py tests/ops/test_ops_backends.py tests/runtime/test_ort_cuda.py > "$out/pytest.log" 2>&1
rc=$?
[ $rc -ne 0 ] && status=1
note "pytest -m gpu: rc=$rc, $(grep -E ' in [0-9.]+s' "$out/pytest.log" | tail -n 1 | tr -d '=' | xargs) ($(( $(date +%s) - pytest_start )) s; pytest.log)"
grep -E "^(FAILED|ERROR)" "$out/pytest.log" | head -n 8 | tee -a "$summary"

# ---- 3. compute-sanitizer (memcheck, racecheck) over one harness test
sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
: > "$out/sanitizer.log"
for tool in memcheck racecheck; do
  t0=$(date +%s)
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$(limit 90 110)" "$sanitizer" --tool "$tool" --error-exitcode 86 \
    --target-processes all "$python" -m pytest -q -p no:cacheprovider -o addopts="" \
    "tests/emu/test_gpu_layer.py::test_sanitizer_case[trt-harness]" >> "$out/sanitizer.log" 2>&1
  rc=$?
  errors=$(grep -Eo "ERROR SUMMARY: [0-9]+ error" "$out/sanitizer.log" | tail -n 1)
  [ $rc -ne 0 ] && status=1
  note "compute-sanitizer $tool: rc=$rc ${errors:-no summary} ($(( $(date +%s) - t0 )) s; sanitizer.log)"
done

# ---- 4. the emulator against the GPU
t0=$(date +%s)
emu_lib="$root/build/gpu-emu/emu/libpimoe_trt_harness_emu.so"
{
  echo "== emulated build (g++)"
  cmake -S plugins -B build/gpu-emu -DCMAKE_BUILD_TYPE=Release -DPIMOE_BUILD_ORT=OFF -DPIMOE_BUILD_EMU=ON \
    && cmake --build build/gpu-emu --parallel "$(nproc)"
  echo "== selftest.cu on the GPU (nvcc, sm_$arch)"
  "$nvcc_bin" -std=c++17 -O2 -arch="sm_$arch" -o build/gpu-emu/selftest_gpu plugins/emu/tests/selftest.cu \
    && build/gpu-emu/selftest_gpu
  echo "gpu selftest rc=$?"
  echo "== selftest.cu on the emulator"
  build/gpu-emu/emu/pimoe_emu_selftest
  echo "emulated selftest rc=$?"
} > "$out/emu.log" 2>&1
gpu_self=$(grep -E "^[0-9]+ passed, [0-9]+ failed" "$out/emu.log" | head -n 1)
emu_self=$(grep -E "^[0-9]+ passed, [0-9]+ failed" "$out/emu.log" | tail -n 1)
grep -q "gpu selftest rc=0" "$out/emu.log" && grep -q "emulated selftest rc=0" "$out/emu.log" || status=1
note "emulator selftest: GPU ${gpu_self:-not run}; emulator ${emu_self:-not run} (emu.log)"
timeout "$(limit 60 150)" "$python" scripts/emu_vs_gpu.py --cuda "$PIMOE_TRT_HARNESS" --emu "$emu_lib" --out "$out" \
  >> "$out/emu.log" 2>&1
rc=$?
[ $rc -ne 0 ] && status=1
note "emu_vs_gpu.py: rc=$rc, $(tail -n 1 "$out/emu.log") ($(( $(date +%s) - t0 )) s; emu_vs_gpu.md)"

# ---- 5. benchmark
t0=$(date +%s)
timeout "$(limit 150 5)" "$python" scripts/bench_gpu.py --configs mixtral-ffn,seed-512 --out "$out" \
  > "$out/bench.log" 2>&1
rc=$?
[ $rc -ne 0 ] && status=1
note "bench_gpu.py: rc=$rc ($(( $(date +%s) - t0 )) s; bench.log, bench_gpu.md, bench_gpu.json)"
[ -f "$out/bench_gpu.md" ] && cat "$out/bench_gpu.md" | tee -a "$summary"

note "total $(( $(date +%s) - start )) s; overall $([ $status -eq 0 ] && echo PASS || echo FAIL); results in $out"
exit $status
