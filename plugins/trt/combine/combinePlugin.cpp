#include "combinePlugin.h"

namespace pimoe {
namespace trt {

namespace {
constexpr const char* kOP = contract::kCOMBINE_NAME;
}

CombinePlugin::CombinePlugin(const CombineAttrs& attrs) : PluginBase(contract::kCOMBINE_NAME), mAttrs(attrs) {}

nvinfer1::IPluginV3* CombinePlugin::clone() noexcept {
  try {
    auto* copy = new CombinePlugin(mAttrs);
    copy->mNbInputs = mNbInputs;
    return copy;
  } catch (...) {
    fail(msg(kOP, ": clone failed (out of memory)"));
    return nullptr;
  }
}

std::string CombinePlugin::check_io(const std::vector<TensorInfo>& in, int32_t nbOutputs) const {
  if (in.size() != 3) return msg(kOP, ": expected 3 inputs (y_sorted, flat_to_sorted, weights), got ", in.size());
  if (nbOutputs != 1) return msg(kOP, ": expected 1 output (y), got ", nbOutputs);
  if (auto e = require_type(kOP, "y_sorted", in[0].type, {DataType::kFLOAT, DataType::kHALF}); !e.empty()) return e;
  if (auto e = require_type(kOP, "flat_to_sorted", in[1].type, {DataType::kINT32}); !e.empty()) return e;
  if (auto e = require_type(kOP, "weights", in[2].type, {DataType::kFLOAT}); !e.empty()) return e;
  return check_combine(in[0].dims, in[1].dims, in[2].dims);
}

int32_t CombinePlugin::getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, const DataType* inputTypes,
                                          int32_t nbInputs) const noexcept {
  try {
    if (nbOutputs != 1 || nbInputs != 3)
      return fail(msg(kOP, ": expected 3 inputs and 1 output, got ", nbInputs, " and ", nbOutputs));
    if (auto e = require_type(kOP, "y_sorted", inputTypes[0], {DataType::kFLOAT, DataType::kHALF}); !e.empty())
      return fail(e);
    outputTypes[0] = inputTypes[0];
    return kOK;
  } catch (...) {
    return fail(msg(kOP, ": getOutputDataTypes failed"));
  }
}

int32_t CombinePlugin::getOutputShapes(const nvinfer1::DimsExprs* inputs, int32_t nbInputs,
                                       const nvinfer1::DimsExprs*, int32_t, nvinfer1::DimsExprs* outputs,
                                       int32_t nbOutputs, nvinfer1::IExprBuilder&) noexcept {
  try {
    if (nbOutputs != 1 || nbInputs != 3)
      return fail(msg(kOP, ": expected 3 inputs and 1 output, got ", nbInputs, " and ", nbOutputs));
    if (inputs[0].nbDims != 2 || inputs[2].nbDims != 2)
      return fail(msg(kOP, ": y_sorted [N*k, H] and weights [N, k] must have rank 2"));
    outputs[0].nbDims = 2;  // y [N, H]
    outputs[0].d[0] = inputs[2].d[0];
    outputs[0].d[1] = inputs[0].d[1];
    return kOK;
  } catch (...) {
    return fail(msg(kOP, ": getOutputShapes failed"));
  }
}

bool CombinePlugin::supportsFormatCombination(int32_t pos, const DynamicPluginTensorDesc* inOut, int32_t nbInputs,
                                              int32_t nbOutputs) noexcept {
  if (inOut == nullptr || nbInputs != 3 || nbOutputs != 1 || pos < 0 || pos >= 4) return false;
  const PluginTensorDesc& d = inOut[pos].desc;
  if (d.format != nvinfer1::TensorFormat::kLINEAR) return false;
  switch (pos) {
    case 0: return is_float_io(d.type);              // y_sorted
    case 1: return d.type == DataType::kINT32;       // flat_to_sorted
    case 2: return d.type == DataType::kFLOAT;       // weights
    default: return d.type == inOut[0].desc.type;    // y
  }
}

size_t CombinePlugin::getWorkspaceSize(const DynamicPluginTensorDesc*, int32_t, const DynamicPluginTensorDesc*,
                                       int32_t) const noexcept {
  return cuda::kSTATUS_BYTES;
}

int32_t CombinePlugin::enqueue(const PluginTensorDesc* inputDesc, const PluginTensorDesc* outputDesc,
                               const void* const* inputs, void* const* outputs, void* workspace,
                               cudaStream_t stream) noexcept {
  try {
    if (inputDesc == nullptr || outputDesc == nullptr || inputs == nullptr || outputs == nullptr)
      return fail(msg(kOP, ": enqueue called without tensors"));
    if (mNbInputs != 3) return fail(msg(kOP, ": enqueue called before onShapeChange"));
    const std::vector<TensorInfo> in = tensor_infos(inputDesc, 3);
    if (auto e = check_io(in, 1); !e.empty()) return fail(e);
    if (outputDesc[0].type != in[0].type) return fail(msg(kOP, ": y must have y_sorted's dtype"));
    if (workspace == nullptr) return fail(msg(kOP, ": no workspace (", cuda::kSTATUS_BYTES, " bytes needed)"));
    const int64_t n = in[2].dims[0], k = in[2].dims[1], h = in[0].dims[1];
    if (n * h > 0 && (inputs[0] == nullptr || inputs[1] == nullptr || inputs[2] == nullptr || outputs[0] == nullptr))
      return fail(msg(kOP, ": null tensor pointer"));
    const cudaError_t err = cuda::combine(inputs[0], to_cuda(in[0].type), static_cast<const int32_t*>(inputs[1]),
                                          static_cast<const float*>(inputs[2]), n, k, h, outputs[0],
                                          status_of(workspace), stream, mAttrs.order);
    return finish_enqueue(err, status_of(workspace), stream);
  } catch (...) {
    return fail(msg(kOP, ": enqueue failed"));
  }
}

const PluginFieldCollection* CombinePlugin::getFieldsToSerialize() noexcept {
  try {
    mSerialized.clear();
    mSerialized.add_string(contract::kATTR_ORDER, contract::kCOMBINEORDER_NAMES[static_cast<int32_t>(mAttrs.order)]);
    return mSerialized.collection();
  } catch (...) {
    fail(msg(kOP, ": getFieldsToSerialize failed"));
    return nullptr;
  }
}

CombineCreator::CombineCreator() : CreatorBase(contract::kCOMBINE_NAME) {
  mDeclarations.add(contract::kATTR_ORDER, PluginFieldType::kCHAR, 0);
}

nvinfer1::IPluginV3* CombineCreator::createPlugin(const char*, const PluginFieldCollection* fc,
                                                  nvinfer1::TensorRTPhase) noexcept {
  try {
    FieldReader r(kOP, fc);
    r.warn_unknown({contract::kATTR_ORDER});
    CombineAttrs attrs;
    const std::string order = r.get_string(contract::kATTR_ORDER, "slot");
    std::string e = r.problem();
    if (e.empty())
      e = parse_choice(kOP, contract::kATTR_ORDER, order, contract::kCOMBINEORDER_NAMES, contract::kCOMBINEORDER_COUNT,
                       &attrs.order);
    if (e.empty()) e = validate_attrs(attrs);
    if (!e.empty()) {
      fail(e);
      return nullptr;
    }
    return new CombinePlugin(attrs);
  } catch (...) {
    fail(msg(kOP, ": createPlugin failed (out of memory)"));
    return nullptr;
  }
}

}  // namespace trt
}  // namespace pimoe
