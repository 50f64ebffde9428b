// Entry points of libpimoe_trt_plugins.so.
//
// Two ways for TensorRT to find our creators (docs/trt_plugins.md):
//
// 1. Dynamic loading (default): IPluginRegistry::loadLibrary(path), `trtexec --dynamicPlugins=path`, and
//    our own loader (pimoe_export/native/tensorrt_loader.py). TensorRT dlopen()s the library,
//    calls setLoggerFinder() and getCreators() and registers the creators itself. Both symbols must be exported:
//    without setLoggerFinder, loadLibrary silently registers nothing.
//
// 2. Static registration, opt-in with PIMOE_TRT_STATIC_REGISTRATION=1, for loaders that only dlopen() the
//    library and expect it to register itself: Polygraphy's `--plugins` / LoadPlugins (a plain ctypes.CDLL,
//    never loadLibrary), `trtexec --staticPlugins`, any ctypes.CDLL before building. A static initialiser finds getPluginRegistry() in the TensorRT library
//    already loaded in the process (dlopen RTLD_NOLOAD + dlsym: this library does not link libnvinfer) and
//    registers the four creators. It is opt-in because the two modes exclude each other: loadLibrary() of a
//    library whose creators are already registered fails ("creator already registered").
//
// IPluginRegistry is called through a vtable that changed between TensorRT 10 (deprecated IPluginCreator
// overloads first) and TensorRT 11 (removed); the static path picks the layout from getInferLibVersion() and
// refuses (with a message) when it does not know the version. TensorRT-RTX 1.x (getInferLibVersion() 1xxxx,
// e.g. 1.7.1 -> 10701) uses the TensorRT 11 layout.
#include <dlfcn.h>

#include <cstdlib>
#include <cstring>

#include "pimoeCreators.h"
#include "pimoePluginCommon.h"
#include "pimoe_contract.h"

#define PIMOE_TRT_EXPORT extern "C" __attribute__((visibility("default")))

namespace pimoe {
namespace trt {
namespace abi {

// The TensorRT 11 (and TensorRT-RTX 1.x) layout of IPluginRegistry's vtable, up to the methods we call
// (declaration order = slot order; the virtual destructor takes the first two slots). Only ever used through a
// pointer such a TensorRT handed out.
// Deliberately NOT in an anonymous namespace: for a class without definitions that no other translation unit
// can derive from, GCC concludes every call is a pure-virtual call and replaces it with __cxa_pure_virtual.
class RegistryAbi11 {
 public:
  virtual ~RegistryAbi11() noexcept = default;
  virtual void setErrorRecorder(void* recorder) noexcept = 0;
  virtual void* getErrorRecorder() const noexcept = 0;
  virtual bool isParentSearchEnabled() const = 0;
  virtual void setParentSearchEnabled(bool enabled) = 0;
  virtual void* loadLibrary(const char* path) noexcept = 0;
  virtual void deregisterLibrary(void* handle) noexcept = 0;
  virtual bool registerCreator(nvinfer1::IPluginCreatorInterface& creator, const char* ns) noexcept = 0;
  virtual nvinfer1::IPluginCreatorInterface* const* getAllCreators(int32_t* count) const noexcept = 0;
  virtual nvinfer1::IPluginCreatorInterface* getCreator(const char* name, const char* version,
                                                        const char* ns) noexcept = 0;
};

}  // namespace abi
}  // namespace trt
}  // namespace pimoe

namespace {

nvinfer1::ILoggerFinder* g_logger_finder = nullptr;  // kept, never called (see pimoePluginCommon.h)

using GetRegistryFn = void* (*)();
using GetVersionFn = int32_t (*)();

// Libraries whose registry we may use, in order of preference (first already-loaded one wins).
const char* const kTRT_LIBRARIES[] = {"libnvinfer.so.11",          "libnvinfer.so.10",
                                      "libnvinfer_lean.so.11",     "libnvinfer_lean.so.10",
                                      "libnvinfer_dispatch.so.11", "libnvinfer_dispatch.so.10",
                                      "libtensorrt_rtx.so.1",      "libnvinfer.so"};

bool register_statically() {
  using pimoe::trt::LogLevel;
  void* lib = nullptr;
  const char* found = nullptr;
  for (const char* name : kTRT_LIBRARIES) {
    lib = dlopen(name, RTLD_LAZY | RTLD_NOLOAD);
    if (lib != nullptr) {
      found = name;
      break;
    }
  }
  if (lib == nullptr) {
    pimoe::trt::log(LogLevel::kWARNING,
                    "PIMOE_TRT_STATIC_REGISTRATION=1 but no TensorRT library is loaded in this process yet; import "
                    "TensorRT (or load libnvinfer) before loading libpimoe_trt_plugins.so");
    return false;
  }
  auto get_registry = reinterpret_cast<GetRegistryFn>(dlsym(lib, "getPluginRegistry"));
  auto get_version = reinterpret_cast<GetVersionFn>(dlsym(lib, "getInferLibVersion"));
  if (get_registry == nullptr || get_version == nullptr) {
    pimoe::trt::log(LogLevel::kWARNING, pimoe::msg(found, " exports no getPluginRegistry/getInferLibVersion; "
                                                   "static registration skipped"));
    dlclose(lib);
    return false;
  }
  const int32_t version = get_version();
  void* registry = get_registry();
  int32_t registered = 0;
  int32_t count = 0;
  nvinfer1::IPluginCreatorInterface* const* list = pimoe::trt::all_creators(&count);
  if (registry != nullptr && list != nullptr) {
    // TensorRT 11.x (110000..119999) and TensorRT-RTX 1.x (10000..19999): the layout without the deprecated
    // IPluginCreator overloads (verified on TensorRT 11.4 lean and TensorRT-RTX 1.7: 15 vtable slots)
    if ((version >= 110000 && version < 120000) || (version >= 10000 && version < 20000)) {
      auto* r = static_cast<pimoe::trt::abi::RegistryAbi11*>(registry);
      for (int32_t i = 0; i < count; ++i)
        if (r->registerCreator(*list[i], pimoe::contract::kPLUGIN_NAMESPACE)) ++registered;
    } else if (version >= 100000 && version < 110000) {  // TensorRT 10.x: the layout of the headers we compile with
      auto* r = static_cast<nvinfer1::IPluginRegistry*>(registry);
      for (int32_t i = 0; i < count; ++i)
        if (r->registerCreator(*list[i], pimoe::contract::kPLUGIN_NAMESPACE)) ++registered;
    } else {
      pimoe::trt::log(LogLevel::kWARNING,
                      pimoe::msg(found, " reports version ", version,
                                 ", whose plugin-registry ABI this library does not know; use dynamic loading "
                                 "(IPluginRegistry::loadLibrary / trtexec --dynamicPlugins) instead"));
    }
  }
  pimoe::trt::log(LogLevel::kINFO, pimoe::msg("static registration through ", found, " (version ", version, "): ",
                                               registered, " of ", count, " creators registered"));
  dlclose(lib);  // drops only the reference RTLD_NOLOAD added
  return registered == count;
}

struct StaticRegistration {
  StaticRegistration() {
    const char* flag = std::getenv("PIMOE_TRT_STATIC_REGISTRATION");
    if (flag == nullptr || std::strcmp(flag, "1") != 0) return;
    try {
      register_statically();
    } catch (...) {
      pimoe::trt::fail("PIMOE_TRT_STATIC_REGISTRATION: registration failed");
    }
  }
};

const StaticRegistration g_static_registration;

}  // namespace

// ---- dynamic loading: IPluginRegistry::loadLibrary / trtexec --dynamicPlugins ----
PIMOE_TRT_EXPORT void setLoggerFinder(nvinfer1::ILoggerFinder* finder) { g_logger_finder = finder; }

PIMOE_TRT_EXPORT nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
  return pimoe::trt::all_creators(&nbCreators);
}

// ---- identification for pimoe_export.build.tensorrt (ctypes) ----
PIMOE_TRT_EXPORT int pimoe_trt_contract_version() { return pimoe::contract::kCONTRACT_VERSION; }
PIMOE_TRT_EXPORT int pimoe_trt_header_version() { return NV_TENSORRT_VERSION; }
// The calling thread's last plugin error ("" if none): TensorRT reports only that a plugin call failed.
PIMOE_TRT_EXPORT const char* pimoe_trt_last_error() { return pimoe::trt::last_error(); }
PIMOE_TRT_EXPORT void pimoe_trt_clear_last_error() { pimoe::trt::clear_last_error(); }
