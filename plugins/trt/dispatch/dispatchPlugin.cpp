#include "dispatchPlugin.h"

namespace pimoe {
namespace trt {

namespace {
constexpr const char* kOP = contract::kDISPATCH_NAME;
}

DispatchPlugin::DispatchPlugin(const DispatchAttrs& attrs) : PluginBase(contract::kDISPATCH_NAME), mAttrs(attrs) {}

nvinfer1::IPluginV3* DispatchPlugin::clone() noexcept {
  try {
    auto* copy = new DispatchPlugin(mAttrs);
    copy->mNbInputs = mNbInputs;
    return copy;
  } catch (...) {
    fail(msg(kOP, ": clone failed (out of memory)"));
    return nullptr;
  }
}

std::string DispatchPlugin::check_io(const std::vector<TensorInfo>& in, int32_t nbOutputs) const {
  if (in.size() != 2) return msg(kOP, ": expected 2 inputs (x, ids), got ", in.size());
  if (nbOutputs != 3) return msg(kOP, ": expected 3 outputs (x_sorted, offsets, flat_to_sorted), got ", nbOutputs);
  if (auto e = require_type(kOP, "x", in[0].type, {DataType::kFLOAT, DataType::kHALF}); !e.empty()) return e;
  if (auto e = require_type(kOP, "ids", in[1].type, {DataType::kINT32}); !e.empty()) return e;
  return check_dispatch(mAttrs, in[0].dims, in[1].dims);
}

int32_t DispatchPlugin::getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, const DataType* inputTypes,
                                           int32_t nbInputs) const noexcept {
  try {
    if (nbOutputs != 3 || nbInputs != 2)
      return fail(msg(kOP, ": expected 2 inputs and 3 outputs, got ", nbInputs, " and ", nbOutputs));
    if (auto e = require_type(kOP, "x", inputTypes[0], {DataType::kFLOAT, DataType::kHALF}); !e.empty())
      return fail(e);
    outputTypes[0] = inputTypes[0];
    outputTypes[1] = DataType::kINT32;
    outputTypes[2] = DataType::kINT32;
    return kOK;
  } catch (...) {
    return fail(msg(kOP, ": getOutputDataTypes failed"));
  }
}

int32_t DispatchPlugin::getOutputShapes(const nvinfer1::DimsExprs* inputs, int32_t nbInputs,
                                        const nvinfer1::DimsExprs*, int32_t, nvinfer1::DimsExprs* outputs,
                                        int32_t nbOutputs, nvinfer1::IExprBuilder& exprBuilder) noexcept {
  try {
    if (nbOutputs != 3 || nbInputs != 2)
      return fail(msg(kOP, ": expected 2 inputs and 3 outputs, got ", nbInputs, " and ", nbOutputs));
    if (inputs[0].nbDims != 2 || inputs[1].nbDims != 2)
      return fail(msg(kOP, ": x [N, H] and ids [N, k] must have rank 2, got ranks ", inputs[0].nbDims, " and ",
                      inputs[1].nbDims));
    const nvinfer1::IDimensionExpr* pairs =
        exprBuilder.operation(nvinfer1::DimensionOperation::kPROD, *inputs[0].d[0], *inputs[1].d[1]);
    const nvinfer1::IDimensionExpr* bounds = exprBuilder.constant(mAttrs.num_experts + 1);
    if (pairs == nullptr || bounds == nullptr) return fail(msg(kOP, ": IExprBuilder failed"));
    outputs[0].nbDims = 2;  // x_sorted [N*k, H]
    outputs[0].d[0] = pairs;
    outputs[0].d[1] = inputs[0].d[1];
    outputs[1].nbDims = 1;  // offsets [E+1]
    outputs[1].d[0] = bounds;
    outputs[2].nbDims = 1;  // flat_to_sorted [N*k]
    outputs[2].d[0] = pairs;
    return kOK;
  } catch (...) {
    return fail(msg(kOP, ": getOutputShapes failed"));
  }
}

bool DispatchPlugin::supportsFormatCombination(int32_t pos, const DynamicPluginTensorDesc* inOut, int32_t nbInputs,
                                               int32_t nbOutputs) noexcept {
  if (inOut == nullptr || nbInputs != 2 || nbOutputs != 3 || pos < 0 || pos >= 5) return false;
  const PluginTensorDesc& d = inOut[pos].desc;
  if (d.format != nvinfer1::TensorFormat::kLINEAR) return false;
  if (pos == 0) return is_float_io(d.type);             // x
  if (pos == 2) return d.type == inOut[0].desc.type;    // x_sorted: x's dtype
  return d.type == DataType::kINT32;                    // ids, offsets, flat_to_sorted
}

size_t DispatchPlugin::getWorkspaceSize(const DynamicPluginTensorDesc* inputs, int32_t nbInputs,
                                        const DynamicPluginTensorDesc*, int32_t) const noexcept {
  if (inputs == nullptr || nbInputs != 2 || inputs[1].max.nbDims != 2) return cuda::kSTATUS_BYTES;
  const int64_t pairs = inputs[1].max.d[0] * inputs[1].max.d[1];  // maximum N*k of the profile
  return cuda::kSTATUS_BYTES + cuda::dispatch_workspace_size(pairs > 0 ? pairs : 0, mAttrs.num_experts);
}

int32_t DispatchPlugin::enqueue(const PluginTensorDesc* inputDesc, const PluginTensorDesc* outputDesc,
                                const void* const* inputs, void* const* outputs, void* workspace,
                                cudaStream_t stream) noexcept {
  try {
    if (inputDesc == nullptr || outputDesc == nullptr || inputs == nullptr || outputs == nullptr)
      return fail(msg(kOP, ": enqueue called without tensors"));
    if (mNbInputs != 2) return fail(msg(kOP, ": enqueue called before onShapeChange"));
    const std::vector<TensorInfo> in = tensor_infos(inputDesc, 2);
    if (auto e = check_io(in, 3); !e.empty()) return fail(e);
    if (outputDesc[0].type != in[0].type) return fail(msg(kOP, ": x_sorted must have x's dtype"));
    const int64_t n = in[0].dims[0], h = in[0].dims[1], k = in[1].dims[1];
    // TensorRT's workspace is getWorkspaceSize of the profile's maximum, which covers this run's need because
    // dispatch_workspace_size never decreases with N*k (tests/test_emu.py checks both)
    const size_t need = cuda::kSTATUS_BYTES + cuda::dispatch_workspace_size(n * k, mAttrs.num_experts);
    if (workspace == nullptr) return fail(msg(kOP, ": no workspace (", need, " bytes needed)"));
    if (outputs[1] == nullptr || (n > 0 && (inputs[0] == nullptr || inputs[1] == nullptr || outputs[0] == nullptr ||
                                            outputs[2] == nullptr)))
      return fail(msg(kOP, ": null tensor pointer"));
    const cudaError_t err = cuda::dispatch(
        inputs[0], to_cuda(in[0].type), static_cast<const int32_t*>(inputs[1]), n, h, k, mAttrs.num_experts,
        outputs[0], static_cast<int32_t*>(outputs[1]), static_cast<int32_t*>(outputs[2]), kernel_workspace(workspace),
        need - cuda::kSTATUS_BYTES, status_of(workspace), stream);
    return finish_enqueue(err, status_of(workspace), stream);
  } catch (...) {
    return fail(msg(kOP, ": enqueue failed"));
  }
}

const PluginFieldCollection* DispatchPlugin::getFieldsToSerialize() noexcept {
  try {
    mSerialized.clear();
    mSerialized.add_int(contract::kATTR_NUM_EXPERTS, mAttrs.num_experts);
    return mSerialized.collection();
  } catch (...) {
    fail(msg(kOP, ": getFieldsToSerialize failed"));
    return nullptr;
  }
}

DispatchCreator::DispatchCreator() : CreatorBase(contract::kDISPATCH_NAME) {
  mDeclarations.add(contract::kATTR_NUM_EXPERTS, PluginFieldType::kINT32, 1);
}

nvinfer1::IPluginV3* DispatchCreator::createPlugin(const char*, const PluginFieldCollection* fc,
                                                   nvinfer1::TensorRTPhase) noexcept {
  try {
    FieldReader r(kOP, fc);
    r.warn_unknown({contract::kATTR_NUM_EXPERTS});
    DispatchAttrs attrs;
    attrs.num_experts = r.get_int(contract::kATTR_NUM_EXPERTS, 0, true);
    if (!r.problem().empty()) {
      fail(r.problem());
      return nullptr;
    }
    if (auto e = validate_attrs(attrs); !e.empty()) {
      fail(e);
      return nullptr;
    }
    return new DispatchPlugin(attrs);
  } catch (...) {
    fail(msg(kOP, ": createPlugin failed (out of memory)"));
    return nullptr;
  }
}

}  // namespace trt
}  // namespace pimoe
