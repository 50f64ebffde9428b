// libpimoe_ort_cuda: libpimoe_ort's CPU kernels plus CUDA execution-provider kernels (see pimoe_ort.cpp).
#include "pimoe_ort_io.h"

namespace pimoe {
namespace ort {

void library_ops(OpList& ops) {
  add_cpu_ops(ops);
  add_cuda_ops(ops, "CUDAExecutionProvider");
}
const char* library_providers() { return "CPUExecutionProvider,CUDAExecutionProvider"; }

}  // namespace ort
}  // namespace pimoe
