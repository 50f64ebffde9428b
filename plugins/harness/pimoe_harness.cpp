// libpimoe_trt_harness.so: see pimoe_harness.h. Links the plugin objects (not libnvinfer): everything TensorRT
// would provide to a plugin is provided here: field collections, tensor descriptions, an IExprBuilder for
// constant dimensions, device pointers, a workspace and a stream.
#include "pimoe_harness.h"

#include <cuda_runtime_api.h>

#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "pimoeCreators.h"
#include "pimoePluginCommon.h"
#include "pimoe_contract.h"

#define PIMOE_HARNESS_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

using namespace nvinfer1;
using pimoe::msg;

thread_local std::string t_error;

int error(const std::string& text) noexcept {
  try {
    t_error = text;
  } catch (...) {
  }
  return -1;
}

// the plugin's own message when it has one, else `what`
int plugin_error(const char* what) noexcept {
  const char* detail = pimoe::trt::last_error();
  try {
    return error(detail != nullptr && detail[0] != '\0' ? std::string(detail) : std::string(what));
  } catch (...) {
    return -1;
  }
}

// ------------------------------------------------------------------------------------------ IExprBuilder
// TensorRT's IExprBuilder/IDimensionExpr forward to implementation interfaces (apiv::VExprBuilder,
// apiv::VDimensionExpr); the harness supplies implementations that only know constants, which is all a plugin
// sees once every input dimension is known. Non-constant operands make operation() return nullptr.
class ConstantImpl final : public apiv::VDimensionExpr {
 public:
  explicit ConstantImpl(int64_t value) : mValue(value) {}
  bool isConstant() const override { return true; }
  int64_t getConstantValue() const override { return mValue; }
  bool isSizeTensor() const override { return false; }

 private:
  int64_t mValue;
};

class Constant final : public IDimensionExpr {
 public:
  explicit Constant(int64_t value) : mValueImpl(value) { mImpl = &mValueImpl; }
  ~Constant() noexcept override = default;

 private:
  ConstantImpl mValueImpl;
};

class BuilderImpl final : public apiv::VExprBuilder {
 public:
  const IDimensionExpr* constant(int64_t value) override {
    try {
      mExprs.emplace_back(std::make_unique<Constant>(value));
      return mExprs.back().get();
    } catch (...) {
      return nullptr;
    }
  }
  const IDimensionExpr* operation(DimensionOperation op, const IDimensionExpr& first,
                                  const IDimensionExpr& second) override {
    if (!first.isConstant() || !second.isConstant()) return nullptr;
    const int64_t a = first.getConstantValue(), b = second.getConstantValue();
    switch (op) {
      case DimensionOperation::kSUM: return constant(a + b);
      case DimensionOperation::kPROD: return constant(a * b);
      case DimensionOperation::kMAX: return constant(a > b ? a : b);
      case DimensionOperation::kMIN: return constant(a < b ? a : b);
      case DimensionOperation::kSUB: return constant(a - b);
      case DimensionOperation::kEQUAL: return constant(a == b ? 1 : 0);
      case DimensionOperation::kLESS: return constant(a < b ? 1 : 0);
      case DimensionOperation::kFLOOR_DIV: {
        if (b == 0) return nullptr;
        int64_t q = a / b;
        if ((a % b != 0) && ((a < 0) != (b < 0))) --q;
        return constant(q);
      }
      case DimensionOperation::kCEIL_DIV: {
        if (b == 0) return nullptr;
        int64_t q = a / b;
        if ((a % b != 0) && ((a < 0) == (b < 0))) ++q;
        return constant(q);
      }
    }
    return nullptr;
  }
  const IDimensionExpr* declareSizeTensor(int32_t, const IDimensionExpr&, const IDimensionExpr&) override {
    return nullptr;  // our plugins have no data-dependent shapes
  }

 private:
  std::deque<std::unique_ptr<Constant>> mExprs;
};

class ExprBuilder final : public IExprBuilder {
 public:
  ExprBuilder() { mImpl = &mBuilder; }
  ~ExprBuilder() noexcept override = default;

 private:
  BuilderImpl mBuilder;
};

// ------------------------------------------------------------------------------------------ helpers
struct PluginDeleter {
  void operator()(IPluginV3* p) const noexcept { delete p; }
};
using PluginPtr = std::unique_ptr<IPluginV3, PluginDeleter>;

Dims64 to_trt_dims(const PimoeTensorDesc& d) {
  Dims64 out{};
  out.nbDims = d.rank;
  for (int32_t i = 0; i < d.rank && i < Dims64::MAX_DIMS; ++i) out.d[i] = d.dims[i];
  return out;
}

PluginTensorDesc to_desc(const PimoeTensorDesc& d) {
  PluginTensorDesc out{};
  out.dims = to_trt_dims(d);
  out.type = static_cast<DataType>(d.dtype);
  out.format = TensorFormat::kLINEAR;
  out.scale = -1.0f;
  return out;
}

DynamicPluginTensorDesc to_dynamic(const PluginTensorDesc& d) {
  DynamicPluginTensorDesc out{};
  out.desc = d;
  out.min = d.dims;
  out.opt = d.dims;
  out.max = d.dims;
  return out;
}

}  // namespace

struct PimoeHarnessPlugin {
  PluginPtr build;
  PluginPtr runtime;
  std::vector<PluginTensorDesc> inputs;
  std::vector<PluginTensorDesc> outputs;
  size_t workspace = 0;
};

namespace {

int prepare(const char* op, const PimoeField* fields, int32_t nb_fields, const PimoeTensorDesc* inputs,
            int32_t nb_inputs, PimoeHarnessPlugin** out) {
  pimoe::trt::clear_last_error();
  if (out == nullptr) return error("pimoe_harness_prepare: out is null");
  *out = nullptr;
  if (nb_inputs < 0 || nb_inputs > 64 || (nb_inputs > 0 && inputs == nullptr) || nb_fields < 0 ||
      (nb_fields > 0 && fields == nullptr))
    return error("pimoe_harness_prepare: bad argument counts");
  for (int32_t i = 0; i < nb_inputs; ++i)
    if (inputs[i].rank < 0 || inputs[i].rank > 8) return error(msg("input ", i, ": rank must be 0..8"));
  IPluginCreatorV3One* creator = pimoe::trt::find_creator(op);
  if (creator == nullptr) return error(msg("no pimoe plugin creator named '", op ? op : "(null)", "'"));

  std::vector<PluginField> field_list;
  for (int32_t i = 0; i < nb_fields; ++i)
    field_list.emplace_back(fields[i].name, fields[i].data, static_cast<PluginFieldType>(fields[i].type),
                            fields[i].length);
  PluginFieldCollection fc{static_cast<int32_t>(field_list.size()), field_list.data()};
  auto h = std::make_unique<PimoeHarnessPlugin>();
  h->build.reset(creator->createPlugin("harness", &fc, TensorRTPhase::kBUILD));
  if (!h->build) return plugin_error("createPlugin(kBUILD) returned null");
  auto* core = static_cast<IPluginV3OneCore*>(h->build->getCapabilityInterface(PluginCapabilityType::kCORE));
  auto* build = static_cast<IPluginV3OneBuild*>(h->build->getCapabilityInterface(PluginCapabilityType::kBUILD));
  if (core == nullptr || build == nullptr) return error("plugin lacks the CORE/BUILD capability");
  if (std::string(core->getPluginName()) != op || std::string(core->getPluginVersion()) != "1")
    return error("plugin reports another name or version than its creator");

  for (int32_t i = 0; i < nb_inputs; ++i) h->inputs.push_back(to_desc(inputs[i]));
  const int32_t nb_outputs = build->getNbOutputs();
  if (nb_outputs < 1 || nb_outputs > 8) return error("plugin reports a bad number of outputs");

  // output dtypes and shapes
  std::vector<DataType> in_types, out_types(static_cast<size_t>(nb_outputs), DataType::kFLOAT);
  for (const PluginTensorDesc& d : h->inputs) in_types.push_back(d.type);
  if (build->getOutputDataTypes(out_types.data(), nb_outputs, in_types.data(), nb_inputs) != 0)
    return plugin_error("getOutputDataTypes failed");
  ExprBuilder exprs;
  std::vector<DimsExprs> in_exprs(static_cast<size_t>(nb_inputs)), out_exprs(static_cast<size_t>(nb_outputs));
  for (int32_t i = 0; i < nb_inputs; ++i) {
    in_exprs[static_cast<size_t>(i)].nbDims = h->inputs[static_cast<size_t>(i)].dims.nbDims;
    for (int32_t j = 0; j < in_exprs[static_cast<size_t>(i)].nbDims; ++j)
      in_exprs[static_cast<size_t>(i)].d[j] = exprs.constant(h->inputs[static_cast<size_t>(i)].dims.d[j]);
  }
  if (build->getOutputShapes(in_exprs.data(), nb_inputs, nullptr, 0, out_exprs.data(), nb_outputs, exprs) != 0)
    return plugin_error("getOutputShapes failed");
  for (int32_t o = 0; o < nb_outputs; ++o) {
    PluginTensorDesc d{};
    d.type = out_types[static_cast<size_t>(o)];
    d.format = TensorFormat::kLINEAR;
    d.scale = -1.0f;
    const DimsExprs& e = out_exprs[static_cast<size_t>(o)];
    if (e.nbDims < 0 || e.nbDims > 8) return error(msg("output ", o, ": bad rank ", e.nbDims));
    d.dims.nbDims = e.nbDims;
    for (int32_t j = 0; j < e.nbDims; ++j) {
      if (e.d[j] == nullptr || !e.d[j]->isConstant()) return error(msg("output ", o, ": dimension ", j, " is not constant"));
      d.dims.d[j] = e.d[j]->getConstantValue();
    }
    h->outputs.push_back(d);
  }

  // formats: every position must accept the (linear) types derived above, as TensorRT would ask
  std::vector<DynamicPluginTensorDesc> io;
  for (const PluginTensorDesc& d : h->inputs) io.push_back(to_dynamic(d));
  for (const PluginTensorDesc& d : h->outputs) io.push_back(to_dynamic(d));
  for (int32_t pos = 0; pos < nb_inputs + nb_outputs; ++pos)
    if (!build->supportsFormatCombination(pos, io.data(), nb_inputs, nb_outputs)) {
      // TensorRT would only say that no format combination fits; the plugin's own checks say why
      pimoe::trt::clear_last_error();
      const bool configured = build->configurePlugin(io.data(), nb_inputs, io.data() + nb_inputs, nb_outputs) == 0;
      const std::string detail = configured ? std::string() : std::string(pimoe::trt::last_error());
      const PluginTensorDesc& d = io[static_cast<size_t>(pos)].desc;
      return error(msg(op, ": supportsFormatCombination rejects position ", pos, " (",
                       pos < nb_inputs ? "input " : "output ", pos < nb_inputs ? pos : pos - nb_inputs, ", ",
                       pimoe::trt::dtype_name(d.type), ")", detail.empty() ? "" : ": ", detail));
    }
  if (build->configurePlugin(io.data(), nb_inputs, io.data() + nb_inputs, nb_outputs) != 0)
    return plugin_error("configurePlugin failed");
  h->workspace = build->getWorkspaceSize(io.data(), nb_inputs, io.data() + nb_inputs, nb_outputs);

  // serialise -> deserialise -> runtime plugin, as an engine would
  auto* build_runtime =
      static_cast<IPluginV3OneRuntime*>(h->build->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
  if (build_runtime == nullptr) return error("plugin lacks the RUNTIME capability");
  const PluginFieldCollection* serialized = build_runtime->getFieldsToSerialize();
  if (serialized == nullptr) return plugin_error("getFieldsToSerialize failed");
  PluginPtr deserialized(creator->createPlugin("harness", serialized, TensorRTPhase::kRUNTIME));
  if (!deserialized) return plugin_error("createPlugin(kRUNTIME) from the serialised fields returned null");
  auto* runtime =
      static_cast<IPluginV3OneRuntime*>(deserialized->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
  if (runtime == nullptr) return error("plugin lacks the RUNTIME capability");
  h->runtime.reset(runtime->attachToContext(nullptr));
  if (!h->runtime) return plugin_error("attachToContext returned null");
  auto* attached = static_cast<IPluginV3OneRuntime*>(h->runtime->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
  if (attached == nullptr) return error("attached plugin lacks the RUNTIME capability");
  if (attached->onShapeChange(h->inputs.data(), nb_inputs, h->outputs.data(), nb_outputs) != 0)
    return plugin_error("onShapeChange failed");
  *out = h.release();
  return 0;
}

}  // namespace

PIMOE_HARNESS_EXPORT int pimoe_harness_contract_version(void) { return pimoe::contract::kCONTRACT_VERSION; }

PIMOE_HARNESS_EXPORT const char* pimoe_harness_last_error(void) { return t_error.c_str(); }

PIMOE_HARNESS_EXPORT int pimoe_harness_prepare(const char* op, const PimoeField* fields, int32_t nb_fields,
                                               const PimoeTensorDesc* inputs, int32_t nb_inputs,
                                               PimoeHarnessPlugin** out) {
  try {
    return prepare(op, fields, nb_fields, inputs, nb_inputs, out);
  } catch (...) {
    return error("pimoe_harness_prepare: out of host memory");
  }
}

PIMOE_HARNESS_EXPORT int pimoe_harness_num_outputs(const PimoeHarnessPlugin* plugin) {
  return plugin == nullptr ? -1 : static_cast<int>(plugin->outputs.size());
}

PIMOE_HARNESS_EXPORT int pimoe_harness_output_desc(const PimoeHarnessPlugin* plugin, int32_t index,
                                                   PimoeTensorDesc* desc) {
  if (plugin == nullptr || desc == nullptr || index < 0 || static_cast<size_t>(index) >= plugin->outputs.size())
    return error("pimoe_harness_output_desc: bad arguments");
  const PluginTensorDesc& d = plugin->outputs[static_cast<size_t>(index)];
  desc->dtype = static_cast<int32_t>(d.type);
  desc->rank = d.dims.nbDims;
  for (int32_t i = 0; i < 8; ++i) desc->dims[i] = i < d.dims.nbDims ? d.dims.d[i] : 0;
  return 0;
}

PIMOE_HARNESS_EXPORT size_t pimoe_harness_workspace_size(const PimoeHarnessPlugin* plugin) {
  return plugin == nullptr ? 0 : plugin->workspace;
}

PIMOE_HARNESS_EXPORT int pimoe_harness_enqueue(PimoeHarnessPlugin* plugin, const void* const* inputs,
                                               void* const* outputs, void* workspace, void* stream) {
  pimoe::trt::clear_last_error();
  if (plugin == nullptr || !plugin->runtime || inputs == nullptr || outputs == nullptr)
    return error("pimoe_harness_enqueue: bad arguments");
  auto* runtime =
      static_cast<IPluginV3OneRuntime*>(plugin->runtime->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
  if (runtime == nullptr) return error("plugin lacks the RUNTIME capability");
  if (runtime->enqueue(plugin->inputs.data(), plugin->outputs.data(), inputs, outputs, workspace,
                       static_cast<cudaStream_t>(stream)) != 0)
    return plugin_error("enqueue failed");
  return 0;
}

PIMOE_HARNESS_EXPORT int pimoe_harness_check_status(void* workspace, void* stream) {
  if (workspace == nullptr) return error("pimoe_harness_check_status: no workspace");
  pimoe::cuda::DeviceStatus host{};
  const auto s = static_cast<cudaStream_t>(stream);
  cudaError_t err = cudaMemcpyAsync(&host, workspace, sizeof host, cudaMemcpyDeviceToHost, s);
  if (err == cudaSuccess) err = cudaStreamSynchronize(s);
  if (err != cudaSuccess) return error(msg("CUDA error: ", cudaGetErrorString(err)));
  try {
    const std::string problem = pimoe::cuda::describe_status(host);
    if (problem.empty()) return 0;
    error(problem);
    return 1;
  } catch (...) {
    return error("pimoe_harness_check_status: out of host memory");
  }
}

PIMOE_HARNESS_EXPORT void pimoe_harness_release(PimoeHarnessPlugin* plugin) { delete plugin; }
