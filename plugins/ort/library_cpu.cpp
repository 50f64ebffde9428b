// libpimoe_ort: the CPU kernels of the four pimoe ops (see pimoe_ort.cpp).
#include "pimoe_ort_io.h"

namespace pimoe {
namespace ort {

void library_ops(OpList& ops) { add_cpu_ops(ops); }
const char* library_providers() { return "CPUExecutionProvider"; }

}  // namespace ort
}  // namespace pimoe
