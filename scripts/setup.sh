#!/usr/bin/env bash
# Idempotent set-up used by both README commands and by .ci/run:
#   1. .venv in the project root (Python >= 3.10), torch 2.13.0 CPU wheel first (so nothing pulls a CUDA build)
#   2. the package with its dev extras (editable)
#   3. build-time headers (scripts/fetch_deps.sh -> build/deps) and the plugin libraries (build/plugins): the ONNX
#      Runtime op library, the emulated-GPU harness (plugins/emu) and its AddressSanitizer/ThreadSanitizer variants
#      (build/plugins-emu-asan, build/plugins-emu-tsan), and with nvcc the TensorRT plugins + GPU harness
# Re-running it only redoes what is missing or out of date.
# Environment: PYTHON (interpreter for the venv, default python3),
#              PIMOE_SETUP_EXTRAS (default "dev,tensorrt-cpu,hf,serve,llm-clients"; llm-clients is left out with
#              PIMOE_SETUP_ORT=gpu: onnxruntime-genai needs the CPU onnxruntime),
#              PIMOE_SKIP_PLUGINS=1 (Python only), PIMOE_SETUP_EMU_SANITIZERS=0 (no sanitizer builds),
#              PIMOE_SETUP_ORT_WHEELS=0 (no onnxruntime wheelhouse for tests/integration/test_packaging.py),
#              PIMOE_CUDA_ARCHITECTURES (nvcc targets), CMAKE_BUILD_PARALLEL_LEVEL (default: nproc),
#              PIMOE_SETUP_ORT: which ONNX Runtime, "cpu" (default: onnxruntime, extra `cpu`), "gpu" (onnxruntime-gpu,
#              extra `gpu`; replaces an installed onnxruntime) or "none" (keep whatever is installed)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
python=${PYTHON:-python3}
extras=${PIMOE_SETUP_EXTRAS:-dev,tensorrt-cpu,hf,serve,llm-clients}
step() { echo "==> $*"; }
fail() { echo "setup.sh: error: $*" >&2; exit 1; }

step "Python environment (.venv)"
"$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' \
  || fail "$python is older than Python 3.10; set PYTHON=/path/to/python3.10+"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv || fail "could not create .venv with $python (is the venv module installed?)"
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check "$@"; }
if ! .venv/bin/python -c 'import torch, sys; sys.exit(0 if torch.__version__.startswith("2.13.0") else 1)' 2>/dev/null; then
  step "torch 2.13.0 (CPU wheel, installed before anything can ask for a CUDA build)"
  pip install --quiet torch==2.13.0 || fail "pip install torch==2.13.0 failed"
fi
# ONNX Runtime is an extra, not a base dependency: onnxruntime and onnxruntime-gpu share one module and must not
# both be installed (the second overwrites the first's files)
ort_flavour=${PIMOE_SETUP_ORT:-cpu}
case $ort_flavour in
  cpu) ort_keep=onnxruntime; ort_drop=onnxruntime-gpu;;
  gpu) ort_keep=onnxruntime-gpu; ort_drop=onnxruntime;;
  none) ort_keep=; ort_drop=;;
  *) fail "PIMOE_SETUP_ORT=$ort_flavour: use cpu (onnxruntime), gpu (onnxruntime-gpu) or none";;
esac
if [ "$ort_flavour" = gpu ]; then
  extras=$(echo "$extras" | sed -e 's/\(^\|,\)llm-clients//g' -e 's/^,//')
fi
if [ -n "$ort_keep" ]; then
  extras="$extras,$ort_flavour"
  if pip show --quiet "$ort_drop" >/dev/null 2>&1; then
    step "replacing $ort_drop by $ort_keep (PIMOE_SETUP_ORT=$ort_flavour)"
    pip uninstall --quiet -y onnxruntime onnxruntime-gpu || fail "pip uninstall of $ort_drop failed"
    rm -f .venv/.pimoe-installed
  fi
fi
stamp=.venv/.pimoe-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ "$(cat "$stamp")" != "$extras" ]; then
  step "pimoe-export[$extras] (editable)"
  pip install --quiet -e ".[$extras]" || fail "pip install -e .[$extras] failed"
  echo "$extras" > "$stamp"
fi

if [ "${PIMOE_SKIP_PLUGINS:-0}" = "1" ]; then
  step "plugins skipped (PIMOE_SKIP_PLUGINS=1)"
  exit 0
fi

step "build-time headers"
PYTHON="$root/.venv/bin/python" scripts/fetch_deps.sh ort trt simde || fail "fetching the ONNX Runtime / TensorRT / SIMDe headers failed"
# the onnxruntime and onnxruntime-gpu wheels for the fresh-venv packaging tests (tests/integration/test_packaging.py; ~290 MB)
if [ "${PIMOE_SETUP_ORT_WHEELS:-1}" != "0" ]; then
  PYTHON="$root/.venv/bin/python" scripts/fetch_deps.sh ort-wheels || fail "fetching the onnxruntime wheels failed"
fi
ort_include=${ONNXRUNTIME_INCLUDE_DIR:-$root/build/deps/onnxruntime/include}

# ---------------------------------------------------------------------------------------- CPU + emulated GPU
# libpimoe_ort.so (CPU kernels, ONNX Runtime) and libpimoe_trt_harness_emu.so (the CUDA kernels, TensorRT plugins and
# harness on the CPU CUDA emulator of plugins/emu: needs only the host compiler, python and the TensorRT headers)
step "plugins (CMake, build/plugins): ONNX Runtime op library + emulated-GPU harness"
command -v cmake >/dev/null || fail "cmake is not installed (Debian: apt-get install cmake)"
command -v c++ >/dev/null || fail "no C++ compiler (Debian: apt-get install g++)"
jobs=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
configure_and_build() {  # folder log-name cmake-args...
  local dir=$1 log=$2
  shift 2
  cmake -S plugins -B "$dir" -DCMAKE_BUILD_TYPE=Release "$@" > "build/$log-configure.log" 2>&1 \
    || { tail -n 30 "build/$log-configure.log" >&2; fail "CMake configure of $dir failed (log: build/$log-configure.log)"; }
  cmake --build "$dir" --parallel "$jobs" > "build/$log-build.log" 2>&1 \
    || { grep -E "error|Error" "build/$log-build.log" | head -n 30 >&2; fail "build of $dir failed (log: build/$log-build.log)"; }
}
mkdir -p build
configure_and_build build/plugins plugins -DONNXRUNTIME_INCLUDE_DIR="$ort_include" -DPIMOE_BUILD_EMU=ON ${PIMOE_CMAKE_ARGS:-}
.venv/bin/python -c 'from pimoe_export.runtime.ort import find_ort_library, check_ort_library; print("    ", check_ort_library(str(find_ort_library())))' \
  || fail "the built ONNX Runtime op library does not load"
.venv/bin/python -c 'from pimoe_export.testing.harness import Harness, find_harness; h = Harness(find_harness(emulated=True)); print("     emulated harness:", h.path)' \
  || fail "the emulated-GPU harness does not load"

# The emulated harness again under AddressSanitizer (+ UBSan alignment) and ThreadSanitizer, for the sanitizer runs
# of the test suite (tests/emu/test_emu.py). PIMOE_SETUP_EMU_SANITIZERS=0 skips them.
if [ "${PIMOE_SETUP_EMU_SANITIZERS:-1}" != "0" ]; then
  for san in address thread; do
    dir=build/plugins-emu-$([ "$san" = address ] && echo asan || echo tsan)
    step "emulated-GPU harness under ${san} sanitizer ($dir)"
    configure_and_build "$dir" "plugins-emu-$san" -DPIMOE_BUILD_ORT=OFF -DPIMOE_BUILD_EMU=ON -DPIMOE_EMU_SANITIZER="$san"
  done
fi

# ---------------------------------------------------------------------------------------- TensorRT plugins (CUDA)
# With nvcc (PATH or /usr/local/cuda/bin): the CUDA kernels, libpimoe_trt_plugins.so and the GPU harness
# libpimoe_trt_harness.so into build/plugins (CUDA architectures from PIMOE_CUDA_ARCHITECTURES, default: the list in
# plugins/cmake/cuda_architectures.txt). The TensorRT wheels usable without a GPU (11.4 lean runtime, TensorRT-RTX 1.7
# builder) come with the `tensorrt-cpu` extra above. Without nvcc the CUDA build is skipped.
nvcc_bin=$(command -v nvcc || true)
[ -n "$nvcc_bin" ] || { [ -x /usr/local/cuda/bin/nvcc ] && nvcc_bin=/usr/local/cuda/bin/nvcc; } || true
if [ -z "$nvcc_bin" ]; then
  step "TensorRT plugins skipped: no nvcc on PATH or in /usr/local/cuda/bin (install the CUDA toolkit to build"
  echo "    libpimoe_trt_plugins.so; the CPU path, ONNX Runtime + libpimoe_ort, is complete without it)"
else
  step "TensorRT plugins + GPU harness (nvcc: $nvcc_bin)"
  trt_start=$(date +%s)
  archs=()
  [ -n "${PIMOE_CUDA_ARCHITECTURES:-}" ] && archs=(-DCMAKE_CUDA_ARCHITECTURES="$PIMOE_CUDA_ARCHITECTURES")
  configure_and_build build/plugins plugins-trt -DPIMOE_BUILD_TRT=ON -DCMAKE_CUDA_COMPILER="$nvcc_bin" "${archs[@]}"
  echo "    built in $(( $(date +%s) - trt_start )) s"
  .venv/bin/python -c 'from pimoe_export.native.libraries import find_plugin_library, check_plugin_library; print("    ", check_plugin_library(str(find_plugin_library())))' \
    || fail "the built TensorRT plugin library does not load"
  .venv/bin/python -c 'from pimoe_export.native.libraries import find_ort_cuda_library, check_ort_library; print("    ", check_ort_library(str(find_ort_cuda_library())))' \
    || fail "the built libpimoe_ort_cuda (CUDA execution-provider kernels) does not load"
fi
step "done: activate with 'source .venv/bin/activate' or call .venv/bin/pimoe-export"
