#include "routePlugin.h"

namespace pimoe {
namespace trt {

namespace {
constexpr const char* kOP = contract::kROUTE_NAME;
}

RoutePlugin::RoutePlugin(const RouteAttrs& attrs) : PluginBase(contract::kROUTE_NAME), mAttrs(attrs) {}

nvinfer1::IPluginV3* RoutePlugin::clone() noexcept {
  try {
    auto* copy = new RoutePlugin(mAttrs);
    copy->mNbInputs = mNbInputs;
    return copy;
  } catch (...) {
    fail(msg(kOP, ": clone failed (out of memory)"));
    return nullptr;
  }
}

std::string RoutePlugin::check_io(const std::vector<TensorInfo>& in, int32_t nbOutputs) const {
  if (in.size() != 1 && in.size() != 2)
    return msg(kOP, ": expected 1 or 2 inputs (logits, selection_bias), got ", in.size());
  if (nbOutputs != 2) return msg(kOP, ": expected 2 outputs (weights, ids), got ", nbOutputs);
  if (auto e = require_type(kOP, "logits", in[0].type, {DataType::kFLOAT, DataType::kHALF}); !e.empty()) return e;
  if (in.size() == 2)
    if (auto e = require_type(kOP, "selection_bias", in[1].type, {DataType::kFLOAT}); !e.empty()) return e;
  return check_route(mAttrs, in[0].dims, in.size() == 2 ? &in[1].dims : nullptr);
}

int32_t RoutePlugin::getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, const DataType* inputTypes,
                                        int32_t nbInputs) const noexcept {
  try {
    if (nbOutputs != 2 || (nbInputs != 1 && nbInputs != 2))
      return fail(msg(kOP, ": expected 1-2 inputs and 2 outputs, got ", nbInputs, " and ", nbOutputs));
    if (auto e = require_type(kOP, "logits", inputTypes[0], {DataType::kFLOAT, DataType::kHALF}); !e.empty())
      return fail(e);
    outputTypes[0] = DataType::kFLOAT;
    outputTypes[1] = DataType::kINT32;
    return kOK;
  } catch (...) {
    return fail(msg(kOP, ": getOutputDataTypes failed"));
  }
}

int32_t RoutePlugin::getOutputShapes(const nvinfer1::DimsExprs* inputs, int32_t nbInputs, const nvinfer1::DimsExprs*,
                                     int32_t, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
                                     nvinfer1::IExprBuilder& exprBuilder) noexcept {
  try {
    if (nbOutputs != 2 || (nbInputs != 1 && nbInputs != 2))
      return fail(msg(kOP, ": expected 1-2 inputs and 2 outputs, got ", nbInputs, " and ", nbOutputs));
    if (inputs[0].nbDims != 2) return fail(msg(kOP, ": logits must have rank 2 [N, E], got rank ", inputs[0].nbDims));
    if (inputs[0].d[1]->isConstant() && inputs[0].d[1]->getConstantValue() < mAttrs.k)
      return fail(msg(kOP, ": k=", mAttrs.k, " exceeds the number of experts E=", inputs[0].d[1]->getConstantValue()));
    const nvinfer1::IDimensionExpr* k = exprBuilder.constant(mAttrs.k);
    if (k == nullptr) return fail(msg(kOP, ": IExprBuilder::constant failed"));
    for (int32_t o = 0; o < 2; ++o) {
      outputs[o].nbDims = 2;
      outputs[o].d[0] = inputs[0].d[0];
      outputs[o].d[1] = k;
    }
    return kOK;
  } catch (...) {
    return fail(msg(kOP, ": getOutputShapes failed"));
  }
}

bool RoutePlugin::supportsFormatCombination(int32_t pos, const DynamicPluginTensorDesc* inOut, int32_t nbInputs,
                                            int32_t nbOutputs) noexcept {
  if (inOut == nullptr || pos < 0 || pos >= nbInputs + nbOutputs || nbOutputs != 2) return false;
  const PluginTensorDesc& d = inOut[pos].desc;
  if (d.format != nvinfer1::TensorFormat::kLINEAR) return false;
  if (pos == 0) return is_float_io(d.type);                          // logits
  if (pos < nbInputs) return d.type == DataType::kFLOAT;              // selection_bias
  return d.type == (pos == nbInputs ? DataType::kFLOAT : DataType::kINT32);  // weights, ids
}

size_t RoutePlugin::getWorkspaceSize(const DynamicPluginTensorDesc*, int32_t, const DynamicPluginTensorDesc*,
                                     int32_t) const noexcept {
  return cuda::kSTATUS_BYTES;
}

int32_t RoutePlugin::enqueue(const PluginTensorDesc* inputDesc, const PluginTensorDesc* outputDesc,
                             const void* const* inputs, void* const* outputs, void* workspace,
                             cudaStream_t stream) noexcept {
  try {
    if (inputDesc == nullptr || outputDesc == nullptr || inputs == nullptr || outputs == nullptr)
      return fail(msg(kOP, ": enqueue called without tensors"));
    // the bias is optional: how many inputs the node has is known from onShapeChange
    const int32_t nb_inputs = mNbInputs;
    if (nb_inputs != 1 && nb_inputs != 2) return fail(msg(kOP, ": enqueue called before onShapeChange"));
    const std::vector<TensorInfo> in = tensor_infos(inputDesc, nb_inputs);
    if (auto e = check_io(in, 2); !e.empty()) return fail(e);
    if (outputDesc[0].type != DataType::kFLOAT || outputDesc[1].type != DataType::kINT32)
      return fail(msg(kOP, ": outputs must be float32 weights and int32 ids"));
    const int64_t n = in[0].dims[0], e = in[0].dims[1];
    if (n > 0 && (inputs[0] == nullptr || outputs[0] == nullptr || outputs[1] == nullptr))
      return fail(msg(kOP, ": null tensor pointer"));
    const cudaError_t err = cuda::route(mAttrs, inputs[0], to_cuda(in[0].type),
                                        nb_inputs == 2 ? static_cast<const float*>(inputs[1]) : nullptr, n, e,
                                        static_cast<float*>(outputs[0]), static_cast<int32_t*>(outputs[1]),
                                        workspace != nullptr ? status_of(workspace) : nullptr, stream);
    return finish_enqueue(err, workspace != nullptr ? status_of(workspace) : nullptr, stream);
  } catch (...) {
    return fail(msg(kOP, ": enqueue failed"));
  }
}

const PluginFieldCollection* RoutePlugin::getFieldsToSerialize() noexcept {
  try {
    mSerialized.clear();
    mSerialized.add_int(contract::kATTR_K, mAttrs.k);
    mSerialized.add_int(contract::kATTR_NORMALIZE, mAttrs.normalize ? 1 : 0);
    mSerialized.add_string(contract::kATTR_SCORING, contract::kSCORING_NAMES[static_cast<int32_t>(mAttrs.scoring)]);
    mSerialized.add_int(contract::kATTR_NUM_GROUPS, mAttrs.num_groups);
    mSerialized.add_int(contract::kATTR_GROUPS_KEPT, mAttrs.groups_kept);
    mSerialized.add_string(contract::kATTR_GROUP_SCORE,
                           contract::kGROUPSCORE_NAMES[static_cast<int32_t>(mAttrs.group_score)]);
    mSerialized.add_float(contract::kATTR_ROUTED_SCALING_FACTOR, mAttrs.routed_scaling_factor);
    mSerialized.add_float(contract::kATTR_NORMALIZE_EPS, mAttrs.normalize_eps);
    return mSerialized.collection();
  } catch (...) {
    fail(msg(kOP, ": getFieldsToSerialize failed"));
    return nullptr;
  }
}

RouteCreator::RouteCreator() : CreatorBase(contract::kROUTE_NAME) {
  mDeclarations.add(contract::kATTR_K, PluginFieldType::kINT32, 1);
  mDeclarations.add(contract::kATTR_NORMALIZE, PluginFieldType::kINT32, 1);
  mDeclarations.add(contract::kATTR_SCORING, PluginFieldType::kCHAR, 0);
  mDeclarations.add(contract::kATTR_NUM_GROUPS, PluginFieldType::kINT32, 1);
  mDeclarations.add(contract::kATTR_GROUPS_KEPT, PluginFieldType::kINT32, 1);
  mDeclarations.add(contract::kATTR_GROUP_SCORE, PluginFieldType::kCHAR, 0);
  mDeclarations.add(contract::kATTR_ROUTED_SCALING_FACTOR, PluginFieldType::kFLOAT32, 1);
  mDeclarations.add(contract::kATTR_NORMALIZE_EPS, PluginFieldType::kFLOAT32, 1);
}

nvinfer1::IPluginV3* RouteCreator::createPlugin(const char*, const PluginFieldCollection* fc,
                                                nvinfer1::TensorRTPhase) noexcept {
  try {
    FieldReader r(kOP, fc);
    r.warn_unknown({contract::kATTR_K, contract::kATTR_NORMALIZE, contract::kATTR_SCORING, contract::kATTR_NUM_GROUPS,
                    contract::kATTR_GROUPS_KEPT, contract::kATTR_GROUP_SCORE, contract::kATTR_ROUTED_SCALING_FACTOR,
                    contract::kATTR_NORMALIZE_EPS});
    RouteAttrs attrs;
    attrs.k = r.get_int(contract::kATTR_K, 0, true);
    const int64_t normalize = r.get_int(contract::kATTR_NORMALIZE, 0, false);
    const std::string scoring = r.get_string(contract::kATTR_SCORING, "softmax");
    attrs.num_groups = r.get_int(contract::kATTR_NUM_GROUPS, 1, false);
    attrs.groups_kept = r.get_int(contract::kATTR_GROUPS_KEPT, 1, false);
    const std::string group_score = r.get_string(contract::kATTR_GROUP_SCORE, "max");
    attrs.routed_scaling_factor = r.get_float(contract::kATTR_ROUTED_SCALING_FACTOR, 1.0f);
    attrs.normalize_eps = r.get_float(contract::kATTR_NORMALIZE_EPS, 0.0f);
    if (!r.problem().empty()) {
      fail(r.problem());
      return nullptr;
    }
    std::string e = parse_flag(kOP, contract::kATTR_NORMALIZE, normalize, &attrs.normalize);
    if (e.empty())
      e = parse_choice(kOP, contract::kATTR_SCORING, scoring, contract::kSCORING_NAMES, contract::kSCORING_COUNT,
                       &attrs.scoring);
    if (e.empty())
      e = parse_choice(kOP, contract::kATTR_GROUP_SCORE, group_score, contract::kGROUPSCORE_NAMES,
                       contract::kGROUPSCORE_COUNT, &attrs.group_score);
    if (e.empty()) e = validate_attrs(attrs);
    if (!e.empty()) {
      fail(e);
      return nullptr;
    }
    return new RoutePlugin(attrs);
  } catch (...) {
    fail(msg(kOP, ": createPlugin failed (out of memory)"));
    return nullptr;
  }
}

}  // namespace trt
}  // namespace pimoe
