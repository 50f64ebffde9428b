#include "expertMLPPlugin.h"

namespace pimoe {
namespace trt {

namespace {
constexpr const char* kOP = contract::kEXPERTMLP_NAME;
// ParamRole values of pimoe_attrs.h
const char* const kROLE_NAMES[] = {"weight", "w_scale", "bias", "ln_gamma", "ln_beta", "act_smooth"};
static_assert(sizeof(kROLE_NAMES) / sizeof(kROLE_NAMES[0]) == kPARAM_ROLE_COUNT, "a name for every ParamRole");

const char* role_name(ParamRole role) { return kROLE_NAMES[static_cast<size_t>(role)]; }
}  // namespace

ExpertMLPOp::ExpertMLPOp(const Attrs& a) : attrs(a), index(a) {
  // the variadic parameter layout (schema.expert_mlp_param_layout), resolved once
  const auto count = static_cast<size_t>(a.num_params() > 0 ? a.num_params() : 0);
  roles.assign(count, ParamRole::kBIAS);
  layers.assign(count, 0);
  for (int64_t l = 0; l < a.num_layers() && l < cuda::kMAX_LAYERS; ++l)
    for (int32_t r = 0; r < kPARAM_ROLE_COUNT; ++r) {
      const int32_t i = index(l, static_cast<ParamRole>(r));
      if (i < 0 || static_cast<size_t>(i) >= count) continue;
      roles[static_cast<size_t>(i)] = static_cast<ParamRole>(r);
      layers[static_cast<size_t>(i)] = l;
    }
}

std::string ExpertMLPOp::validate(const Attrs& a) {
  if (auto e = validate_attrs(a); !e.empty()) return e;
  if (auto e = cuda::expert_mlp_kernel_limits(a); !e.empty()) return e;
  if (a.quant_mode != contract::QuantMode::kW8A8 && !a.act_scales.empty())
    log(LogLevel::kWARNING, msg(kOP, ": act_scales (", a.act_scales.size(), " values) are ignored with quant_mode '",
                                contract::kQUANTMODE_NAMES[static_cast<int32_t>(a.quant_mode)],
                                "' (only w8a8 uses static activation scales)"));
  return {};
}

DataType ExpertMLPOp::param_type(int64_t i, DataType x_type) const {
  if (i < 0 || static_cast<size_t>(i) >= roles.size()) return DataType::kFLOAT;
  if (roles[static_cast<size_t>(i)] == ParamRole::kWEIGHT) return attrs.quantized() ? DataType::kINT8 : x_type;
  return DataType::kFLOAT;
}

std::string ExpertMLPOp::check_counts(int32_t nbInputs, int32_t nbOutputs) const {
  const int64_t want = 2 + attrs.num_params();
  if (nbInputs != want)
    return msg(kOP, ": expected ", want, " inputs (x_sorted, offsets and ", attrs.num_params(), " parameters for ",
               attrs.num_layers(), " layers", attrs.layer_norm ? " with LayerNorm" : "",
               attrs.bias ? "" : " without bias", "), got ", nbInputs);
  if (nbOutputs != kNB_OUTPUTS) return msg(kOP, ": expected 1 output (y_sorted), got ", nbOutputs);
  return {};
}

std::string ExpertMLPOp::output_types(const DataType* in, DataType* out) const {
  if (auto e = require_type(kOP, "x_sorted", in[0], {DataType::kFLOAT, DataType::kHALF}); !e.empty()) return e;
  out[0] = in[0];
  return {};
}

std::string ExpertMLPOp::output_shapes(const nvinfer1::DimsExprs* in, int32_t, nvinfer1::DimsExprs* out,
                                       nvinfer1::IExprBuilder& exprs) const {
  if (in[0].nbDims != 2) return msg(kOP, ": x_sorted must have rank 2 [R, H], got rank ", in[0].nbDims);
  const nvinfer1::IDimensionExpr* width = exprs.constant(attrs.widths.back());
  if (width == nullptr) return msg(kOP, ": IExprBuilder::constant failed");
  out[0].nbDims = 2;  // y_sorted [R, widths[-1]]
  out[0].d[0] = in[0].d[0];
  out[0].d[1] = width;
  return {};
}

bool ExpertMLPOp::supports(int32_t pos, const DynamicPluginTensorDesc* io, int32_t nbInputs) const {
  const DataType t = io[pos].desc.type;
  if (pos == 0) return is_float_io(t);                 // x_sorted
  if (pos == 1) return t == DataType::kINT32;          // offsets
  if (pos == nbInputs) return t == io[0].desc.type;    // y_sorted
  // W_l in x's dtype (int8 in w8a8 modes); w_scale, act_smooth, bias, LayerNorm fp32
  return t == param_type(pos - 2, io[0].desc.type);
}

size_t ExpertMLPOp::workspace_size(const DynamicPluginTensorDesc* in, int32_t nbInputs) const {
  if (nbInputs < 2 || in[0].max.nbDims != 2 || in[1].max.nbDims != 1) return 0;
  const int64_t rows = in[0].max.d[0] > 0 ? in[0].max.d[0] : 0;
  const int64_t experts = in[1].max.d[0] - 1 > 0 ? in[1].max.d[0] - 1 : 1;
  return cuda::expert_mlp_workspace_size(cuda::expert_mlp_shape(attrs, rows, experts, to_cuda(in[0].desc.type)));
}

std::string ExpertMLPOp::check_io(const std::vector<TensorInfo>& in, int32_t nbOutputs) const {
  if (auto e = check_counts(static_cast<int32_t>(in.size()), nbOutputs); !e.empty()) return e;
  if (auto e = require_type(kOP, "x_sorted", in[0].type, {DataType::kFLOAT, DataType::kHALF}); !e.empty()) return e;
  if (auto e = require_type(kOP, "offsets", in[1].type, {DataType::kINT32}); !e.empty()) return e;
  std::vector<Dims> params;
  for (size_t i = 2; i < in.size(); ++i) {
    const auto p = static_cast<int64_t>(i) - 2;
    const DataType want = param_type(p, in[0].type);
    if (in[i].type != want)
      return msg(kOP, ": layer ", layers[static_cast<size_t>(p)], " ", role_name(roles[static_cast<size_t>(p)]),
                 " (input ", i, ") must be ", dtype_name(want), ", got ", dtype_name(in[i].type),
                 want == DataType::kFLOAT  ? ""
                 : want == DataType::kINT8 ? "; quant_mode w8a8 needs the int8 weights of `pimoe-export quantize`"
                                           : "; export weights in the activation dtype");
    params.push_back(in[i].dims);
  }
  return check_expert_mlp(attrs, in[0].dims, in[1].dims, params);
}

ExpertMLPOp::Plan ExpertMLPOp::plan(const std::vector<TensorInfo>& in) const {
  Plan p;
  p.shape = cuda::expert_mlp_shape(attrs, in[0].dims[0], in[1].dims[0] - 1, to_cuda(in[0].type));
  for (int64_t l = 0; l < attrs.num_layers() && l < cuda::kMAX_LAYERS; ++l)
    p.weight_dtypes[l] = to_cuda(in[static_cast<size_t>(2 + index(l, ParamRole::kWEIGHT))].type);
  p.workspace = cuda::expert_mlp_workspace_size(p.shape);
  return p;
}

cudaError_t ExpertMLPOp::launch(const Plan& p, const void* const* in, void* const* out, void* workspace,
                                cuda::DeviceStatus* status, cudaStream_t stream) const {
  cuda::MLPLayer mlp[cuda::kMAX_LAYERS];
  cuda::expert_mlp_layers(attrs, index, in + 2, p.weight_dtypes, mlp);
  return cuda::expert_mlp(p.shape, mlp, in[0], static_cast<const int32_t*>(in[1]), out[0], workspace, p.workspace,
                          status, stream);
}

template class Plugin<ExpertMLPOp>;
template class Creator<ExpertMLPOp>;

}  // namespace trt
}  // namespace pimoe
