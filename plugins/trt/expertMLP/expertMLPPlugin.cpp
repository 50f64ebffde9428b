#include "expertMLPPlugin.h"

namespace pimoe {
namespace trt {

namespace {
constexpr const char* kOP = contract::kEXPERTMLP_NAME;
// ParamRole values of pimoe_attrs.h (later values: roles of quantised modes, see role_name)
const char* const kROLE_NAMES[] = {"weight", "w_scale", "bias", "ln_gamma", "ln_beta", "act_smooth"};
constexpr int32_t kMAX_ROLES = 8;  // >= every ParamRole value; param_index() returns -1 for absent roles

const char* role_name(ParamRole role) {
  const auto index = static_cast<size_t>(role);
  return index < sizeof(kROLE_NAMES) / sizeof(kROLE_NAMES[0]) ? kROLE_NAMES[index] : "parameter";
}

// Limits of the CUDA kernels beyond the op contract's (empty when the attributes are within them).
std::string kernel_limits(const ExpertMLPAttrs& a) {
  if (a.num_group() > cuda::kMAX_GROUP)
    return msg(kOP, ": at most ", cuda::kMAX_GROUP, " experts per group, got ", a.num_group());
  if (a.quantized())
    for (int64_t l = 0; l < a.num_layers(); ++l)
      if (a.widths[static_cast<size_t>(l)] > cuda::kMAX_I8_WIDTH)
        return msg(kOP, ": quant_mode ", contract::kQUANTMODE_NAMES[static_cast<int32_t>(a.quant_mode)],
                   " supports layer input widths up to ", cuda::kMAX_I8_WIDTH,
                   " (the int32 accumulator of 127 * 127 * width must not overflow), layer ", l, " has ",
                   a.widths[static_cast<size_t>(l)]);
  return {};
}

}  // namespace

ExpertMLPPlugin::ExpertMLPPlugin(const ExpertMLPAttrs& attrs) : PluginBase(contract::kEXPERTMLP_NAME), mAttrs(attrs) {
  // the variadic parameter layout (schema.expert_mlp_param_layout), resolved once
  for (int64_t l = 0; l < mAttrs.num_layers(); ++l)
    for (int32_t r = 0; r < kMAX_ROLES; ++r) {
      const int64_t index = mAttrs.param_index(l, static_cast<ParamRole>(r));
      if (index < 0) continue;
      if (static_cast<size_t>(index) >= mRoles.size()) {
        mRoles.resize(static_cast<size_t>(index) + 1, ParamRole::kBIAS);
        mLayers.resize(static_cast<size_t>(index) + 1, 0);
      }
      mRoles[static_cast<size_t>(index)] = static_cast<ParamRole>(r);
      mLayers[static_cast<size_t>(index)] = l;
    }
}

nvinfer1::IPluginV3* ExpertMLPPlugin::clone() noexcept {
  try {
    auto* copy = new ExpertMLPPlugin(mAttrs);
    copy->mNbInputs = mNbInputs;
    return copy;
  } catch (...) {
    fail(msg(kOP, ": clone failed (out of memory)"));
    return nullptr;
  }
}

DataType ExpertMLPPlugin::param_type(int64_t index, DataType x_type) const {
  if (index < 0 || static_cast<size_t>(index) >= mRoles.size()) return DataType::kFLOAT;
  if (mRoles[static_cast<size_t>(index)] == ParamRole::kWEIGHT) return mAttrs.quantized() ? DataType::kINT8 : x_type;
  return DataType::kFLOAT;
}

std::string ExpertMLPPlugin::check_io(const std::vector<TensorInfo>& in, int32_t nbOutputs) const {
  const size_t want = 2 + static_cast<size_t>(mAttrs.num_params());
  if (in.size() != want)
    return msg(kOP, ": expected ", want, " inputs (x_sorted, offsets and ", mAttrs.num_params(), " parameters for ",
               mAttrs.num_layers(), " layers", mAttrs.layer_norm ? " with LayerNorm" : "", "), got ", in.size());
  if (nbOutputs != 1) return msg(kOP, ": expected 1 output (y_sorted), got ", nbOutputs);
  if (auto e = require_type(kOP, "x_sorted", in[0].type, {DataType::kFLOAT, DataType::kHALF}); !e.empty()) return e;
  if (auto e = require_type(kOP, "offsets", in[1].type, {DataType::kINT32}); !e.empty()) return e;
  std::vector<Dims> params;
  for (size_t i = 2; i < in.size(); ++i) {
    const int64_t index = static_cast<int64_t>(i) - 2;
    const DataType want_type = param_type(index, in[0].type);
    if (in[i].type != want_type)
      return msg(kOP, ": layer ", mLayers[static_cast<size_t>(index)], " ",
                 role_name(mRoles[static_cast<size_t>(index)]), " (input ", i, ") must be ",
                 dtype_name(want_type), ", got ", dtype_name(in[i].type),
                 want_type == DataType::kFLOAT  ? ""
                 : want_type == DataType::kINT8 ? "; quant_mode w8a8 needs the int8 weights of `pimoe-export quantize`"
                                                : "; export weights in the activation dtype");
    params.push_back(in[i].dims);
  }
  if (auto e = check_expert_mlp(mAttrs, in[0].dims, in[1].dims, params); !e.empty()) return e;
  return kernel_limits(mAttrs);
}

cuda::ExpertMLPShape ExpertMLPPlugin::kernel_shape(int64_t rows, int64_t experts, DataType dtype) const {
  cuda::ExpertMLPShape s;
  s.dtype = to_cuda(dtype);
  s.rows = rows;
  s.num_experts = experts;
  s.num_layers = static_cast<int32_t>(mAttrs.num_layers());
  for (size_t i = 0; i < mAttrs.widths.size() && i <= static_cast<size_t>(cuda::kMAX_LAYERS); ++i)
    s.widths[i] = static_cast<int32_t>(mAttrs.widths[i]);
  s.num_group = static_cast<int32_t>(mAttrs.num_group());
  for (int64_t g = 0; g < mAttrs.num_group() && g < cuda::kMAX_GROUP; ++g)
    s.expert_ids[g] = static_cast<int16_t>(mAttrs.expert_ids[static_cast<size_t>(g)]);
  s.activation = static_cast<int32_t>(mAttrs.activation);
  s.layer_norm = mAttrs.layer_norm;
  s.eps = mAttrs.eps;
  s.quant_mode = static_cast<int32_t>(mAttrs.quant_mode);
  s.gated = mAttrs.gated;
  s.bias = mAttrs.bias;
  s.alpha = mAttrs.alpha;
  s.limit = mAttrs.limit;
  return s;
}

int32_t ExpertMLPPlugin::getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, const DataType* inputTypes,
                                            int32_t nbInputs) const noexcept {
  try {
    const int32_t want = 2 + static_cast<int32_t>(mAttrs.num_params());
    if (nbOutputs != 1 || nbInputs != want)
      return fail(msg(kOP, ": expected ", want, " inputs (x_sorted, offsets, ", mAttrs.num_params(),
                      " parameters) and 1 output, got ", nbInputs, " and ", nbOutputs));
    if (auto e = require_type(kOP, "x_sorted", inputTypes[0], {DataType::kFLOAT, DataType::kHALF}); !e.empty())
      return fail(e);
    outputTypes[0] = inputTypes[0];
    return kOK;
  } catch (...) {
    return fail(msg(kOP, ": getOutputDataTypes failed"));
  }
}

int32_t ExpertMLPPlugin::getOutputShapes(const nvinfer1::DimsExprs* inputs, int32_t nbInputs,
                                         const nvinfer1::DimsExprs*, int32_t, nvinfer1::DimsExprs* outputs,
                                         int32_t nbOutputs, nvinfer1::IExprBuilder& exprBuilder) noexcept {
  try {
    const int32_t want = 2 + static_cast<int32_t>(mAttrs.num_params());
    if (nbOutputs != 1 || nbInputs != want)
      return fail(msg(kOP, ": expected ", want, " inputs and 1 output, got ", nbInputs, " and ", nbOutputs));
    if (inputs[0].nbDims != 2) return fail(msg(kOP, ": x_sorted must have rank 2 [R, H], got rank ", inputs[0].nbDims));
    const nvinfer1::IDimensionExpr* width = exprBuilder.constant(mAttrs.widths.back());
    if (width == nullptr) return fail(msg(kOP, ": IExprBuilder::constant failed"));
    outputs[0].nbDims = 2;  // y_sorted [R, widths[-1]]
    outputs[0].d[0] = inputs[0].d[0];
    outputs[0].d[1] = width;
    return kOK;
  } catch (...) {
    return fail(msg(kOP, ": getOutputShapes failed"));
  }
}

bool ExpertMLPPlugin::supportsFormatCombination(int32_t pos, const DynamicPluginTensorDesc* inOut, int32_t nbInputs,
                                                int32_t nbOutputs) noexcept {
  if (inOut == nullptr || nbOutputs != 1 || pos < 0 || pos >= nbInputs + nbOutputs) return false;
  if (nbInputs != 2 + mAttrs.num_params()) return false;
  const PluginTensorDesc& d = inOut[pos].desc;
  if (d.format != nvinfer1::TensorFormat::kLINEAR) return false;
  if (pos == 0) return is_float_io(d.type);                 // x_sorted
  if (pos == 1) return d.type == DataType::kINT32;          // offsets
  if (pos == nbInputs) return d.type == inOut[0].desc.type;  // y_sorted
  // W_l in x's dtype (int8 in w8a8 modes); w_scale, act_smooth, bias, LayerNorm fp32
  return d.type == param_type(pos - 2, inOut[0].desc.type);
}

size_t ExpertMLPPlugin::getWorkspaceSize(const DynamicPluginTensorDesc* inputs, int32_t nbInputs,
                                         const DynamicPluginTensorDesc*, int32_t) const noexcept {
  try {
    if (inputs == nullptr || nbInputs < 2 || inputs[0].max.nbDims != 2 || inputs[1].max.nbDims != 1)
      return cuda::kSTATUS_BYTES;
    const int64_t rows = inputs[0].max.d[0] > 0 ? inputs[0].max.d[0] : 0;
    const int64_t experts = inputs[1].max.d[0] - 1 > 0 ? inputs[1].max.d[0] - 1 : 1;
    return cuda::kSTATUS_BYTES + cuda::expert_mlp_workspace_size(kernel_shape(rows, experts, inputs[0].desc.type));
  } catch (...) {
    return cuda::kSTATUS_BYTES;
  }
}

int32_t ExpertMLPPlugin::enqueue(const PluginTensorDesc* inputDesc, const PluginTensorDesc* outputDesc,
                                 const void* const* inputs, void* const* outputs, void* workspace,
                                 cudaStream_t stream) noexcept {
  try {
    if (inputDesc == nullptr || outputDesc == nullptr || inputs == nullptr || outputs == nullptr)
      return fail(msg(kOP, ": enqueue called without tensors"));
    if (mNbInputs != 2 + mAttrs.num_params()) return fail(msg(kOP, ": enqueue called before onShapeChange"));
    const std::vector<TensorInfo> in = tensor_infos(inputDesc, mNbInputs);
    if (auto e = check_io(in, 1); !e.empty()) return fail(e);
    if (outputDesc[0].type != in[0].type) return fail(msg(kOP, ": y_sorted must have x_sorted's dtype"));
    const int64_t rows = in[0].dims[0], experts = in[1].dims[0] - 1;
    const cuda::ExpertMLPShape shape = kernel_shape(rows, experts, in[0].type);
    const size_t need = cuda::expert_mlp_workspace_size(shape);
    if (workspace == nullptr) return fail(msg(kOP, ": no workspace (", cuda::kSTATUS_BYTES + need, " bytes needed)"));
    for (int32_t i = 0; i < mNbInputs; ++i)
      if (inputs[i] == nullptr && (i != 0 || rows > 0)) return fail(msg(kOP, ": input ", i, " is a null pointer"));
    if (outputs[0] == nullptr && rows > 0) return fail(msg(kOP, ": null output pointer"));
    cuda::MLPLayer layers[cuda::kMAX_LAYERS];
    for (int64_t l = 0; l < mAttrs.num_layers(); ++l) {
      auto param = [&](ParamRole role) -> const void* {
        const int64_t index = mAttrs.param_index(l, role);
        return index < 0 ? nullptr : inputs[2 + index];
      };
      cuda::MLPLayer& layer = layers[l];
      layer.weight = param(ParamRole::kWEIGHT);
      layer.weight_dtype = to_cuda(in[static_cast<size_t>(2 + mAttrs.param_index(l, ParamRole::kWEIGHT))].type);
      layer.w_scale = static_cast<const float*>(param(ParamRole::kW_SCALE));
      layer.act_smooth = static_cast<const float*>(param(ParamRole::kACT_SMOOTH));
      if (mAttrs.quant_mode == contract::QuantMode::kW8A8)  // host values, passed to the kernels by value
        layer.act_scales = mAttrs.act_scales.data() + l * mAttrs.num_group();
      layer.bias = static_cast<const float*>(param(ParamRole::kBIAS));
      layer.ln_gamma = static_cast<const float*>(param(ParamRole::kLN_GAMMA));
      layer.ln_beta = static_cast<const float*>(param(ParamRole::kLN_BETA));
    }
    const cudaError_t err =
        cuda::expert_mlp(shape, layers, inputs[0], static_cast<const int32_t*>(inputs[1]), outputs[0],
                         kernel_workspace(workspace), need, status_of(workspace), stream);
    return finish_enqueue(err, status_of(workspace), stream);
  } catch (...) {
    return fail(msg(kOP, ": enqueue failed"));
  }
}

const PluginFieldCollection* ExpertMLPPlugin::getFieldsToSerialize() noexcept {
  try {
    mSerialized.clear();
    mSerialized.add_ints(contract::kATTR_EXPERT_IDS, mAttrs.expert_ids);
    mSerialized.add_ints(contract::kATTR_WIDTHS, mAttrs.widths);
    mSerialized.add_string(contract::kATTR_ACTIVATION,
                           contract::kACTIVATION_NAMES[static_cast<int32_t>(mAttrs.activation)]);
    mSerialized.add_int(contract::kATTR_LAYER_NORM, mAttrs.layer_norm ? 1 : 0);
    mSerialized.add_float(contract::kATTR_EPS, mAttrs.eps);
    mSerialized.add_string(contract::kATTR_QUANT_MODE,
                           contract::kQUANTMODE_NAMES[static_cast<int32_t>(mAttrs.quant_mode)]);
    mSerialized.add_floats(contract::kATTR_ACT_SCALES, mAttrs.act_scales);
    mSerialized.add_int(contract::kATTR_GATED, mAttrs.gated ? 1 : 0);
    mSerialized.add_int(contract::kATTR_BIAS, mAttrs.bias ? 1 : 0);
    mSerialized.add_float(contract::kATTR_ALPHA, mAttrs.alpha);
    mSerialized.add_float(contract::kATTR_LIMIT, mAttrs.limit);
    return mSerialized.collection();
  } catch (...) {
    fail(msg(kOP, ": getFieldsToSerialize failed"));
    return nullptr;
  }
}

ExpertMLPCreator::ExpertMLPCreator() : CreatorBase(contract::kEXPERTMLP_NAME) {
  mDeclarations.add(contract::kATTR_EXPERT_IDS, PluginFieldType::kINT32, 0);
  mDeclarations.add(contract::kATTR_WIDTHS, PluginFieldType::kINT32, 0);
  mDeclarations.add(contract::kATTR_ACTIVATION, PluginFieldType::kCHAR, 0);
  mDeclarations.add(contract::kATTR_LAYER_NORM, PluginFieldType::kINT32, 1);
  mDeclarations.add(contract::kATTR_EPS, PluginFieldType::kFLOAT32, 1);
  mDeclarations.add(contract::kATTR_QUANT_MODE, PluginFieldType::kCHAR, 0);
  mDeclarations.add(contract::kATTR_ACT_SCALES, PluginFieldType::kFLOAT32, 0);
  mDeclarations.add(contract::kATTR_GATED, PluginFieldType::kINT32, 1);
  mDeclarations.add(contract::kATTR_BIAS, PluginFieldType::kINT32, 1);
  mDeclarations.add(contract::kATTR_ALPHA, PluginFieldType::kFLOAT32, 1);
  mDeclarations.add(contract::kATTR_LIMIT, PluginFieldType::kFLOAT32, 1);
}

nvinfer1::IPluginV3* ExpertMLPCreator::createPlugin(const char*, const PluginFieldCollection* fc,
                                                    nvinfer1::TensorRTPhase) noexcept {
  try {
    FieldReader r(kOP, fc);
    r.warn_unknown({contract::kATTR_EXPERT_IDS, contract::kATTR_WIDTHS, contract::kATTR_ACTIVATION,
                    contract::kATTR_LAYER_NORM, contract::kATTR_EPS, contract::kATTR_QUANT_MODE,
                    contract::kATTR_ACT_SCALES, contract::kATTR_GATED, contract::kATTR_BIAS, contract::kATTR_ALPHA,
                    contract::kATTR_LIMIT});
    ExpertMLPAttrs a;
    a.expert_ids = r.get_ints(contract::kATTR_EXPERT_IDS, true);
    a.widths = r.get_ints(contract::kATTR_WIDTHS, true);
    const std::string activation = r.get_string(contract::kATTR_ACTIVATION, "gelu");
    const int64_t layer_norm = r.get_int(contract::kATTR_LAYER_NORM, 1, false);
    a.eps = r.get_float(contract::kATTR_EPS, 1e-5f);
    const std::string quant = r.get_string(contract::kATTR_QUANT_MODE, "none");
    a.act_scales = r.get_floats(contract::kATTR_ACT_SCALES);
    const int64_t gated = r.get_int(contract::kATTR_GATED, 0, false);
    const int64_t bias = r.get_int(contract::kATTR_BIAS, 1, false);
    a.alpha = r.get_float(contract::kATTR_ALPHA, contract::kSWIGLU_OAI_ALPHA);
    a.limit = r.get_float(contract::kATTR_LIMIT, contract::kSWIGLU_OAI_LIMIT);
    if (!r.problem().empty()) {
      fail(r.problem());
      return nullptr;
    }
    std::string flag_problem = parse_flag(kOP, contract::kATTR_LAYER_NORM, layer_norm, &a.layer_norm);
    if (flag_problem.empty()) flag_problem = parse_flag(kOP, contract::kATTR_GATED, gated, &a.gated);
    if (flag_problem.empty()) flag_problem = parse_flag(kOP, contract::kATTR_BIAS, bias, &a.bias);
    if (!flag_problem.empty()) {
      fail(flag_problem);
      return nullptr;
    }
    int32_t value = 0;
    if (!parse_enum(activation.c_str(), contract::kACTIVATION_NAMES, contract::kACTIVATION_COUNT, &value)) {
      fail(msg(kOP, ": unknown activation '", activation, "'; expected one of ",
               enum_choices(contract::kACTIVATION_NAMES, contract::kACTIVATION_COUNT)));
      return nullptr;
    }
    a.activation = static_cast<contract::Activation>(value);
    if (!parse_enum(quant.c_str(), contract::kQUANTMODE_NAMES, contract::kQUANTMODE_COUNT, &value)) {
      fail(msg(kOP, ": unknown quant_mode '", quant, "'; expected one of ",
               enum_choices(contract::kQUANTMODE_NAMES, contract::kQUANTMODE_COUNT)));
      return nullptr;
    }
    a.quant_mode = static_cast<contract::QuantMode>(value);
    if (auto e = validate_attrs(a); !e.empty()) {
      fail(e);
      return nullptr;
    }
    if (auto e = kernel_limits(a); !e.empty()) {
      fail(e);
      return nullptr;
    }
    if (a.quant_mode != contract::QuantMode::kW8A8 && !a.act_scales.empty())
      log(LogLevel::kWARNING, msg(kOP, ": act_scales (", a.act_scales.size(), " values) are ignored with quant_mode '",
                                  quant, "' (only w8a8 uses static activation scales)"));
    return new ExpertMLPPlugin(a);
  } catch (...) {
    fail(msg(kOP, ": createPlugin failed (out of memory)"));
    return nullptr;
  }
}

}  // namespace trt
}  // namespace pimoe
