// libpimoe_ort_cuda_emu (tests only): the CUDA execution-provider kernels on the CPU CUDA emulator, registered for
// the CPU provider (nullptr), so that CI runs their wrapper code (see pimoe_ort.cpp and pimoe_ort_cuda.cpp).
#include "pimoe_ort_io.h"

namespace pimoe {
namespace ort {

void library_ops(OpList& ops) { add_cuda_ops(ops, nullptr); }
const char* library_providers() { return "CPUExecutionProvider"; }

}  // namespace ort
}  // namespace pimoe
