# TensorRT headers for the plugins (real CUDA build and emulated build):
#   TENSORRT_ROOT (cache or env) -> $TENSORRT_ROOT/include, else the system headers, else
#   build/deps/tensorrt/include (scripts/fetch_deps.sh trt: TensorRT 10.14 headers from a PyPI wheel).
# Nothing links against TensorRT: the plugin library receives everything at run time.
set(_pimoe_trt_root "${TENSORRT_ROOT}")
if(NOT _pimoe_trt_root AND DEFINED ENV{TENSORRT_ROOT})
  set(_pimoe_trt_root "$ENV{TENSORRT_ROOT}")
endif()
find_path(TENSORRT_INCLUDE_DIR NvInferRuntime.h
  HINTS "${_pimoe_trt_root}/include"
  PATHS /usr/include/x86_64-linux-gnu /usr/include/aarch64-linux-gnu /usr/include
        "${CMAKE_CURRENT_LIST_DIR}/../../build/deps/tensorrt/include"
  NO_DEFAULT_PATH)
if(NOT TENSORRT_INCLUDE_DIR)
  message(FATAL_ERROR "TensorRT headers (NvInferRuntime.h) not found: set TENSORRT_ROOT, install TensorRT, or run "
                      "scripts/fetch_deps.sh trt (fetches them into build/deps/tensorrt/include)")
endif()
