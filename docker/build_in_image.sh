#!/usr/bin/env bash
# scripts/setup.sh, adapted to an NVIDIA TensorRT image; run by docker/server/Dockerfile and docker/jetson/Dockerfile
# from the project root during `docker build` (never run by CI: there is no Docker engine there).
#   1. require the image's TensorRT Python module, major version PIMOE_REQUIRE_TRT_MAJOR (default 11; empty = any)
#   2. .venv with --system-site-packages, so the image's `tensorrt` module (full TensorRT) is importable from it
#   3. keep only the CUDA architectures this image's nvcc knows (PIMOE_CUDA_ARCHITECTURES, e.g. "87;110")
#   4. TensorRT headers: PIMOE_TRT_HEADERS=image (default: the image's own, found by scripts/fetch_deps.sh and
#      plugins/trt/CMakeLists.txt) or "fetched" (the TensorRT 10.14 headers CI compiles against, from PyPI)
#   5. scripts/setup.sh with PIMOE_SETUP_EXTRAS (default "dev"): torch, the package, ONNX Runtime headers, plugins/
#      (libpimoe_ort + libpimoe_trt_plugins + GPU harness for the kept architectures)
#   6. try to register our four plugin creators with the image's TensorRT (a warning if that needs a GPU)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
step() { echo "==> $*"; }
fail() { echo "build_in_image.sh: error: $*" >&2; exit 1; }
python=${PYTHON:-python3}
[ -n "${PIP_EXTRA_INDEX_URL:-}" ] || unset PIP_EXTRA_INDEX_URL  # an empty build argument means "PyPI only"

step "TensorRT in this image"
if ! "$python" -c 'import tensorrt' 2>/dev/null && [ -x /opt/tensorrt/python/python_setup.sh ]; then
  /opt/tensorrt/python/python_setup.sh >/dev/null || true  # older NGC TensorRT images install the bindings on demand
fi
trt_version=$("$python" -c 'import tensorrt; print(tensorrt.__version__)' 2>/dev/null) \
  || fail "the base image has no TensorRT Python module ('import tensorrt' fails for $python); use an NVIDIA TensorRT image"
echo "    TensorRT $trt_version"
want=${PIMOE_REQUIRE_TRT_MAJOR-11}
if [ -n "$want" ] && [ "${trt_version%%.*}" != "$want" ]; then
  fail "the base image has TensorRT $trt_version, this recipe wants TensorRT $want.x: pick a base image tag that ships it (docker/README.md), or build with --build-arg PIMOE_REQUIRE_TRT_MAJOR=${trt_version%%.*} (not checked by CI)"
fi

step "virtual environment (.venv, with the image's site-packages)"
[ -x .venv/bin/python ] || "$python" -m venv --system-site-packages .venv \
  || fail "python3 -m venv failed (install python3-venv)"
.venv/bin/python -c 'import tensorrt' || fail ".venv cannot import the image's tensorrt module"

step "CUDA architectures"
nvcc_bin=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
[ -x "$nvcc_bin" ] || fail "no nvcc in this image (PATH or /usr/local/cuda/bin): the TensorRT plugins need the CUDA toolkit"
known=$("$nvcc_bin" --list-gpu-arch 2>/dev/null | tr '\n' ' ')
archs=""
[ -n "${PIMOE_CUDA_ARCHITECTURES:-}" ] \
  || fail "PIMOE_CUDA_ARCHITECTURES is not set: the Dockerfile's build argument gives each image's targets"
IFS=';' read -r -a requested <<< "$PIMOE_CUDA_ARCHITECTURES"
for arch in "${requested[@]}"; do
  [ -n "$arch" ] || continue
  if [[ " $known " == *" compute_$arch "* ]]; then archs="${archs:+$archs;}$arch"
  else echo "    dropping sm_$arch: $nvcc_bin does not know compute_$arch"; fi
done
[ -n "$archs" ] || fail "none of PIMOE_CUDA_ARCHITECTURES=${PIMOE_CUDA_ARCHITECTURES:-} is known to $nvcc_bin ($known)"
echo "    building for $archs"

case ${PIMOE_TRT_HEADERS:-image} in
  image) ;;
  fetched)
    step "TensorRT 10.14 headers from PyPI (kernel-lens 2.0.1 wheel, what CI compiles against)"
    mkdir -p build/deps/dl build/deps/tensorrt
    .venv/bin/python -m pip download --quiet --no-deps --only-binary=:all: -d build/deps/dl kernel-lens==2.0.1
    .venv/bin/python -m zipfile -e build/deps/dl/kernel_lens-2.0.1-*.whl build/deps/dl/kernel-lens
    rm -rf build/deps/tensorrt/include && cp -r build/deps/dl/kernel-lens/kernel_lens/include/tensorrt build/deps/tensorrt/include
    export TENSORRT_ROOT="$root/build/deps/tensorrt"
    ;;
  *) fail "PIMOE_TRT_HEADERS must be 'image' or 'fetched', got '${PIMOE_TRT_HEADERS}'";;
esac

step "scripts/setup.sh"
PIMOE_SETUP_EXTRAS=${PIMOE_SETUP_EXTRAS:-dev} PIMOE_CUDA_ARCHITECTURES="$archs" scripts/setup.sh

step "the image's TensorRT registers our plugin creators (global registry; no GPU at build time)"
.venv/bin/python - <<'EOF' || echo "    WARNING: the registration check failed here (TensorRT may need a GPU for it); the container's 'check' command exercises it on a GPU"
from pimoe_export.native import tensorrt_loader as T
trt = T.import_tensorrt("tensorrt")
registry = trt.get_plugin_registry()
T.load_plugin_library(trt, T.find_plugin_library(), registry=registry)
print("    TensorRT", trt.__version__, "registered", T._registered(registry))
EOF
step "done"
