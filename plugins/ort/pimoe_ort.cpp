// The ONNX Runtime entry point of the pimoe custom-op libraries (domain "pimoe"; op contract v2, which runs v1
// graphs unchanged: every attribute v2 added defaults to v1): RegisterCustomOps and the
// identification functions the Python loader reads. Which ops a library registers is its library_*.cpp:
//   libpimoe_ort           library_cpu.cpp       the CPU kernels (pimoe_ort_cpu.cpp)
//   libpimoe_ort_cuda      library_cuda.cpp      the CPU kernels + the CUDA execution-provider kernels
//                                                (pimoe_ort_cuda.cpp, on plugins/kernels/cuda; built where nvcc is)
//   libpimoe_ort_cuda_emu  library_cuda_emu.cpp  the CUDA kernels on the CPU CUDA emulator, registered for the CPU
//                                                provider (tests only)
//
// Load it with SessionOptions.register_custom_ops_library(path); the Python package does this for every
// session it creates (pimoe_export.runtime.ort). Kernels report bad inputs through ORT status codes (no exception
// crosses the C ABI).
#include <mutex>
#include <string>
#include <vector>

#include "cpu_kernels.h"
#include "pimoe_ort_io.h"

#define PIMOE_EXPORT extern "C" __attribute__((visibility("default")))

namespace pimoe {
namespace ort {
namespace {

struct Registry {
  std::mutex mutex;
  // One domain per registration. They must outlive every session that uses them, and ONNX Runtime may
  // already be torn down when this library's static destructors run, so they are deliberately never
  // released (a few hundred bytes per registered session options object).
  std::vector<OrtCustomOpDomain*> domains;
};

Registry& registry() {
  static Registry r;
  return r;
}

}  // namespace
}  // namespace ort
}  // namespace pimoe

PIMOE_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {
    // An ONNX Runtime older than the C API we are built against (ORT_API_VERSION). Return an error through the
    // oldest API (CreateStatus exists since API 1); some ORT versions drop a registration status without a word,
    // so the Python package also checks onnxruntime.__version__ before registering (runtime/ort.py).
    const OrtApi* oldest = api_base->GetApi(1);
    if (oldest == nullptr) return nullptr;
    const std::string text = std::string("libpimoe_ort needs ONNX Runtime with C API ") +
                             std::to_string(ORT_API_VERSION) + " (onnxruntime >= 1." +
                             std::to_string(ORT_API_VERSION) + "); this process has ONNX Runtime " +
                             api_base->GetVersionString() + ": upgrade onnxruntime";
    return oldest->CreateStatus(ORT_FAIL, text.c_str());
  }
  pimoe::ort::g_registered_api = api;
  Ort::InitApi(api);
  auto& reg = pimoe::ort::registry();
  std::lock_guard<std::mutex> lock(reg.mutex);
  pimoe::ort::OpList ops;
  pimoe::ort::library_ops(ops);
  OrtCustomOpDomain* domain = nullptr;
  if (OrtStatus* s = api->CreateCustomOpDomain(pimoe::contract::kDOMAIN, &domain)) return s;
  for (OrtCustomOp* op : ops) {
    if (OrtStatus* s = api->CustomOpDomain_Add(domain, op)) {
      api->ReleaseCustomOpDomain(domain);
      return s;
    }
  }
  if (OrtStatus* s = api->AddCustomOpDomain(options, domain)) {
    api->ReleaseCustomOpDomain(domain);
    return s;
  }
  reg.domains.push_back(domain);
  return nullptr;
}

// Identification for the Python loader: op-contract version and the CPU ISA the kernels selected.
PIMOE_EXPORT int pimoe_ort_contract_version() { return pimoe::contract::kCONTRACT_VERSION; }
PIMOE_EXPORT const char* pimoe_ort_cpu_isa() { return pimoe::cpu::active_isa(); }
// The execution providers this build has kernels for (libpimoe_ort_cuda adds CUDAExecutionProvider).
PIMOE_EXPORT const char* pimoe_ort_providers() { return pimoe::ort::library_providers(); }
