// Shared code of the pimoe TensorRT plugins: logging and last-error bookkeeping, plugin-field reading and
// writing, dtype helpers and the IPluginV3 base class every op plugin derives from.
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
// True when every input/output of a call uses the linear format.
bool all_linear(const PluginTensorDesc* desc, int32_t count) noexcept;

// "<op>: <what> must be float32 or float16, got int8" style check; empty when the type is allowed
std::string require_type(const char* op, const char* what, DataType got, std::initializer_list<DataType> allowed);

// ------------------------------------------------------------------------------------------ plugin fields
// Reads plugin fields as the ONNX parser delivers them (INT/INTS -> kINT32, FLOAT(S) -> kFLOAT32,
// STRING -> kCHAR) and also kINT64 / kFLOAT64 where a caller builds the collection itself. The first problem
// (missing required field, wrong type or length) is kept in `problem`; getters then return the default.
class FieldReader {
 public:
  FieldReader(const char* op, const PluginFieldCollection* fc) : mOp(op), mFields(fc) {}

  int64_t get_int(const char* name, int64_t fallback, bool required);
  std::vector<int64_t> get_ints(const char* name, bool required);
  float get_float(const char* name, float fallback);
  std::vector<float> get_floats(const char* name);
  std::string get_string(const char* name, const std::string& fallback);
  // names present in the collection that `known` does not list (reported as a warning, not an error)
  void warn_unknown(std::initializer_list<const char*> known) const;

  const std::string& problem() const { return mProblem; }

 private:
  const PluginField* find(const char* name) const;
  void set_problem(const std::string& text);

  const char* mOp;
  const PluginFieldCollection* mFields;
  std::string mProblem;
};

// Owns the storage of a PluginFieldCollection for getFieldsToSerialize().
class FieldWriter {
 public:
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
  void add(const char* name, PluginFieldType type, int32_t length);
  const PluginFieldCollection* collection();

 private:
  std::vector<PluginField> mFields;
  PluginFieldCollection mCollection{};
};

// ------------------------------------------------------------------------------------------ plugin base
// IPluginV3 with the OneCore/OneBuild/OneRuntime capabilities. Name, version ("1") and namespace ("") come
// from the op contract, so TensorRT's ONNX parser maps a `pimoe` node with op_type <name> to this plugin.
class PluginBase : public nvinfer1::IPluginV3,
                   public nvinfer1::IPluginV3OneCore,
                   public nvinfer1::IPluginV3OneBuild,
                   public nvinfer1::IPluginV3OneRuntime {
 public:
  explicit PluginBase(const char* name) : mName(name) {}
  ~PluginBase() override = default;

  // IPluginV3
  nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;

  // IPluginV3OneCore
  const char* getPluginName() const noexcept override { return mName; }
  const char* getPluginVersion() const noexcept override;
  const char* getPluginNamespace() const noexcept override;

  // IPluginV3OneBuild / IPluginV3OneRuntime: both validate the I/O with check_io and record the input count
  int32_t configurePlugin(const DynamicPluginTensorDesc* in, int32_t nbInputs, const DynamicPluginTensorDesc* out,
                          int32_t nbOutputs) noexcept override;
  int32_t onShapeChange(const PluginTensorDesc* in, int32_t nbInputs, const PluginTensorDesc* out,
                        int32_t nbOutputs) noexcept override;

  // IPluginV3OneRuntime
  nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;

 protected:
  // empty when the inputs (dims, types) and the output count satisfy the op's contract, else the problem
  virtual std::string check_io(const std::vector<TensorInfo>& in, int32_t nbOutputs) const = 0;

  // Clears the status block at the start of this op's workspace; kernels record bad input data there.
  static cuda::DeviceStatus* status_of(void* workspace) { return static_cast<cuda::DeviceStatus*>(workspace); }
  static void* kernel_workspace(void* workspace) { return static_cast<char*>(workspace) + cuda::kSTATUS_BYTES; }
  // Converts a launch error into a TensorRT status; with PIMOE_TRT_SYNC_CHECK=1 also synchronises the stream
  // and fails when the kernels recorded bad input data (debugging aid: breaks CUDA-graph capture).
  int32_t finish_enqueue(cudaError_t launch, const cuda::DeviceStatus* status, cudaStream_t stream) const noexcept;

  const char* mName;
  int32_t mNbInputs = 0;  // from configurePlugin/onShapeChange (enqueue is not told)
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
