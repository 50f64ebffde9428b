// Shared code of the pimoe TensorRT plugins: logging and last-error bookkeeping, plugin-field reading, writing and
// declaring (visitors of pimoe_attrs.h's attribute lists), dtype helpers and PluginBase, the non-template half of
// every op plugin (pimoePlugin.h holds the template that the four op plugins instantiate).
//
// No exception crosses a TensorRT entry point: every virtual called by TensorRT is noexcept and catches
// everything (std::bad_alloc included), reports the problem through pimoe::trt::fail() and returns an error
// status (or nullptr / false).
//
// Logging goes to stderr through our own code, NOT through TensorRT's ILoggerFinder: these plugins are compiled
// against the TensorRT 10.14 headers, and ILogger's ABI changed in TensorRT 11, so calling findLogger()->log()
// from a TensorRT 11 process would be undefined behaviour. PIMOE_TRT_LOG=off|error|warning|info|verbose sets the
// level (default: warning).
#pragma once

#include <NvInferRuntime.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "cuda_kernels.h"
#include "pimoe_attrs.h"

namespace pimoe {
namespace trt {

using nvinfer1::DataType;
using nvinfer1::DynamicPluginTensorDesc;
using nvinfer1::PluginField;
using nvinfer1::PluginFieldCollection;
using nvinfer1::PluginFieldType;
using nvinfer1::PluginTensorDesc;

// ------------------------------------------------------------------------------------------ logging / errors
enum class LogLevel : int32_t { kERROR = 0, kWARNING = 1, kINFO = 2, kVERBOSE = 3 };

void log(LogLevel level, const std::string& text) noexcept;
// Records `text` as this thread's last error, logs it, returns the TensorRT failure status (-1).
int32_t fail(const std::string& text) noexcept;
int32_t fail(const char* text) noexcept;
// The calling thread's last error message ("" when none since clear_last_error()).
const char* last_error() noexcept;
void clear_last_error() noexcept;

constexpr int32_t kOK = 0;

// ------------------------------------------------------------------------------------------ dtypes / dims
const char* dtype_name(DataType type) noexcept;
bool is_float_io(DataType type) noexcept;  // kFLOAT or kHALF
cuda::DType to_cuda(DataType type) noexcept;
Dims to_dims(const nvinfer1::Dims& dims);
// What the checks of pimoe_attrs.h need to know about one tensor.
struct TensorInfo {
  Dims dims;
  DataType type;
};
// From build-time descriptions: the MAXIMUM dims of the optimisation profile (desc.dims may hold -1).
std::vector<TensorInfo> tensor_infos(const DynamicPluginTensorDesc* desc, int32_t count);
// From run-time descriptions: the actual dims.
std::vector<TensorInfo> tensor_infos(const PluginTensorDesc* desc, int32_t count);

// "<op>: <what> must be float32 or float16, got int8" style check; empty when the type is allowed
std::string require_type(const char* op, const char* what, DataType got, std::initializer_list<DataType> allowed);

// ------------------------------------------------------------------------------------------ plugin fields
// The three visitors of visit_attrs (pimoe_attrs.h) on TensorRT's side. FieldReader reads plugin fields as the ONNX
// parser delivers them (INT/INTS -> kINT32, FLOAT(S) -> kFLOAT32, STRING -> kCHAR) and also kINT64 / kFLOAT64
// where a caller builds the collection itself; the first problem (missing required field, wrong type or length,
// a flag other than 0/1, an unknown choice) is kept in problem(), and the member keeps its default.
class FieldReader {
 public:
  FieldReader(const char* op, const PluginFieldCollection* fc) : mOp(op), mFields(fc) {}

  template <class T>
  void integer(const char* name, T& member, Need need) {
    member = get_int(name, member, need == Need::kREQUIRED);
  }
  void flag(const char* name, bool& member);
  void real(const char* name, float& member) { member = get_float(name, member); }
  void integers(const char* name, std::vector<int64_t>& member, Need need) {
    std::vector<int64_t> values = get_ints(name, need == Need::kREQUIRED);
    if (find(name) != nullptr) member = std::move(values);
  }
  void reals(const char* name, std::vector<float>& member) {
    std::vector<float> values = get_floats(name);
    if (find(name) != nullptr) member = std::move(values);
  }
  template <class E>
  void choice(const char* name, E& member, const char* const* names, int32_t count) {
    int32_t value = static_cast<int32_t>(member);
    if (read_choice(name, names, count, &value)) member = static_cast<E>(value);
  }

  int64_t get_int(const char* name, int64_t fallback, bool required);
  std::vector<int64_t> get_ints(const char* name, bool required);
  float get_float(const char* name, float fallback);
  std::vector<float> get_floats(const char* name);
  std::string get_string(const char* name, const std::string& fallback);
  // fields of the collection that no visit read (reported as warnings, not errors)
  void warn_unknown() const;

  const std::string& problem() const { return mProblem; }

 private:
  const PluginField* find(const char* name);
  bool read_choice(const char* name, const char* const* names, int32_t count, int32_t* value);
  void set_problem(const std::string& text);

  const char* mOp;
  const PluginFieldCollection* mFields;
  std::vector<const char*> mVisited;
  std::string mProblem;
};

// Owns the storage of a PluginFieldCollection for getFieldsToSerialize().
class FieldWriter {
 public:
  template <class T>
  void integer(const char* name, T& member, Need) {
    add_int(name, member);
  }
  void flag(const char* name, bool& member) { add_int(name, member ? 1 : 0); }
  void real(const char* name, float& member) { add_float(name, member); }
  void integers(const char* name, std::vector<int64_t>& member, Need) { add_ints(name, member); }
  void reals(const char* name, std::vector<float>& member) { add_floats(name, member); }
  template <class E>
  void choice(const char* name, E& member, const char* const* names, int32_t) {
    add_string(name, names[static_cast<int32_t>(member)]);
  }

  void clear();
  void add_int(const char* name, int64_t value);
  void add_ints(const char* name, const std::vector<int64_t>& values);
  void add_float(const char* name, float value);
  void add_floats(const char* name, const std::vector<float>& values);
  void add_string(const char* name, const std::string& value);
  const PluginFieldCollection* collection();

 private:
  std::vector<std::vector<int32_t>> mInts;
  std::vector<std::vector<float>> mFloats;
  std::vector<std::string> mStrings;
  std::vector<PluginField> mFields;
  PluginFieldCollection mCollection{};
};

// Declared fields of a creator (getFieldNames): only these are copied from ONNX node attributes by the parser.
class FieldDeclarations {
 public:
  template <class T>
  void integer(const char* name, T&, Need) {
    add(name, PluginFieldType::kINT32, 1);
  }
  void flag(const char* name, bool&) { add(name, PluginFieldType::kINT32, 1); }
  void real(const char* name, float&) { add(name, PluginFieldType::kFLOAT32, 1); }
  void integers(const char* name, std::vector<int64_t>&, Need) { add(name, PluginFieldType::kINT32, 0); }
  void reals(const char* name, std::vector<float>&) { add(name, PluginFieldType::kFLOAT32, 0); }
  template <class E>
  void choice(const char* name, E&, const char* const*, int32_t) {
    add(name, PluginFieldType::kCHAR, 0);
  }

  void add(const char* name, PluginFieldType type, int32_t length);
  const PluginFieldCollection* collection();

 private:
  std::vector<PluginField> mFields;
  PluginFieldCollection mCollection{};
};

// ------------------------------------------------------------------------------------------ plugin base
// IPluginV3 with the OneCore/OneBuild/OneRuntime capabilities: what does not depend on the op. Name, version ("1")
// and namespace ("") come from the op contract, so TensorRT's ONNX parser maps a `pimoe` node with op_type <name>
// to the plugin. Plugin<Op> (pimoePlugin.h) adds the op.
//
// Device status: each instance that runs owns a cuda::StatusBlock (allocated in attachToContext, or at the first
// onShapeChange of an instance TensorRT's builder runs for timing), where the kernels record and count inconsistent
// input data across runs. Nothing reads it on the enqueue path. What a user sees:
//   - by default: a warning at teardown (destruction of the execution context's plugin) naming how many
//     inconsistent entries the kernels met over the context's lifetime and the lowest offender of each kind;
//   - PIMOE_TRT_SYNC_CHECK=1: every enqueue synchronises its stream, reads the block, and fails with the message
//     (then clears it): a debugging aid that breaks CUDA-graph capture.
class PluginBase : public nvinfer1::IPluginV3,
                   public nvinfer1::IPluginV3OneCore,
                   public nvinfer1::IPluginV3OneBuild,
                   public nvinfer1::IPluginV3OneRuntime {
 public:
  explicit PluginBase(const char* name) : mName(name) {}
  ~PluginBase() override;

  // IPluginV3
  nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;

  // IPluginV3OneCore
  const char* getPluginName() const noexcept override { return mName; }
  const char* getPluginVersion() const noexcept override;
  const char* getPluginNamespace() const noexcept override;

  // IPluginV3OneRuntime: clone() + the device status block
  nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;

  // Synchronises `stream` and copies this instance's device status to *out (clearing it when `clear`); kOK, or the
  // failure status when the instance has no status block or CUDA fails. Used by the harness; not by TensorRT.
  int32_t read_status(cudaStream_t stream, cuda::DeviceStatus* out, bool clear) noexcept;

 protected:
  // Allocates the status block if this instance has none yet (errors are kept for enqueue to report).
  void ensure_status() noexcept;
  // Converts a launch error into a TensorRT status; with PIMOE_TRT_SYNC_CHECK=1 also synchronises the stream
  // and fails when the kernels recorded bad input data.
  int32_t finish_enqueue(cudaError_t launch, cudaStream_t stream) noexcept;
  // the status block's device pointer (nullptr when it could not be allocated: see status_error())
  cuda::DeviceStatus* status() const { return mStatus.get(); }
  const char* status_error() const { return mStatusError; }

  const char* mName;

 private:
  cuda::StatusBlock mStatus;
  const char* mStatusError = "no device status block (the plugin was never attached to a context)";
  bool mAttached = false;  // only attached instances report at teardown (the builder times on garbage data)
};

// Creator base: name/version/namespace from the contract, declared fields in mDeclarations.
class CreatorBase : public nvinfer1::IPluginCreatorV3One {
 public:
  explicit CreatorBase(const char* name) : mName(name) {}
  const char* getPluginName() const noexcept override { return mName; }
  const char* getPluginVersion() const noexcept override;
  const char* getPluginNamespace() const noexcept override;
  const PluginFieldCollection* getFieldNames() noexcept override { return mDeclarations.collection(); }

 protected:
  const char* mName;
  FieldDeclarations mDeclarations;
};

}  // namespace trt
}  // namespace pimoe
