# Source lists shared by the CUDA build (trt/, harness/) and the emulated build (emu/): one list each, so the
# emulated GPU runs exactly the code the real one compiles. Paths are relative to plugins/.
set(PIMOE_CUDA_KERNEL_NAMES route dispatch combine expert_mlp gemm_f16_wmma gemm_f32_simt gemm_i8_wmma)  # kernels/cuda/<name>.cu
set(PIMOE_CUDA_HOST_SOURCES kernels/cuda/status.cpp)
set(PIMOE_TRT_PLUGIN_SOURCES
  trt/common/pimoePluginCommon.cpp
  trt/common/pimoeCreators.cpp
  trt/route/routePlugin.cpp
  trt/dispatch/dispatchPlugin.cpp
  trt/expertMLP/expertMLPPlugin.cpp
  trt/combine/combinePlugin.cpp)
set(PIMOE_TRT_PLUGIN_INCLUDES trt/common trt/route trt/dispatch trt/expertMLP trt/combine kernels/cuda common)
# route (softmax/normalise) and combine (weighted sum) must round like the PyTorch reference: no FMA contraction
set(PIMOE_CUDA_NO_FMAD_KERNELS route combine)
# ONNX Runtime libraries (plugins/ort): the registration and the shared I/O layer every library has, then each
# library's kernels and its library_*.cpp (which ops it registers): libpimoe_ort = CPU kernels, libpimoe_ort_cuda =
# CPU + CUDA kernels, libpimoe_ort_cuda_emu = the CUDA kernels on the emulator (plugins/emu).
set(PIMOE_ORT_COMMON_SOURCES ort/pimoe_ort.cpp ort/pimoe_ort_io.cpp)
set(PIMOE_ORT_CPU_SOURCES ort/pimoe_ort_cpu.cpp)
set(PIMOE_ORT_CUDA_SOURCES ort/pimoe_ort_cuda.cpp)
