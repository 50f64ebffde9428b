// The CUDA kernels' view of the op attributes, shared by their two callers (the TensorRT plugins, plugins/trt, and
// the ONNX Runtime CUDA execution-provider kernels, plugins/ort/pimoe_ort_cuda.cpp): the limits the kernels add to
// the op contract, and the ExpertMLPShape / MLPLayer descriptions built from the attributes. Header-only.
#pragma once

#include <string>

#include "cuda_kernels.h"
#include "pimoe_attrs.h"

namespace pimoe {
namespace cuda {

// Empty when the CUDA kernels run these attributes; else the limit they exceed (checked once, at plugin or
// kernel creation, after validate_attrs).
inline std::string expert_mlp_kernel_limits(const ExpertMLPAttrs& a) {
  const char* op = contract::kEXPERTMLP_NAME;
  if (a.num_group() > kMAX_GROUP) return msg(op, ": at most ", kMAX_GROUP, " experts per group, got ", a.num_group());
  if (a.quantized())
    for (int64_t l = 0; l < a.num_layers(); ++l)
      if (a.widths[static_cast<size_t>(l)] > kMAX_I8_WIDTH)
        return msg(op, ": quant_mode ", contract::kQUANTMODE_NAMES[static_cast<int32_t>(a.quant_mode)],
                   " supports layer input widths up to ", kMAX_I8_WIDTH,
                   " (the int32 accumulator of 127 * 127 * width must not overflow), layer ", l, " has ",
                   a.widths[static_cast<size_t>(l)]);
  return {};
}

// The kernel description of one call: attributes + rows R, experts E and the activation storage dtype.
inline ExpertMLPShape expert_mlp_shape(const ExpertMLPAttrs& a, int64_t rows, int64_t experts, DType dtype) {
  ExpertMLPShape s;
  s.dtype = dtype;
  s.rows = rows;
  s.num_experts = experts;
  s.num_layers = static_cast<int32_t>(a.num_layers());
  for (size_t i = 0; i < a.widths.size() && i <= static_cast<size_t>(kMAX_LAYERS); ++i)
    s.widths[i] = static_cast<int32_t>(a.widths[i]);
  s.num_group = static_cast<int32_t>(a.num_group());
  for (int64_t g = 0; g < a.num_group() && g < kMAX_GROUP; ++g)
    s.expert_ids[g] = static_cast<int16_t>(a.expert_ids[static_cast<size_t>(g)]);
  s.activation = static_cast<int32_t>(a.activation);
  s.layer_norm = a.layer_norm;
  s.eps = a.eps;
  s.quant_mode = static_cast<int32_t>(a.quant_mode);
  s.gated = a.gated;
  s.bias = a.bias;
  s.alpha = a.alpha;
  s.limit = a.limit;
  return s;
}

// Where each layer's parameters are among the variadic inputs (schema.expert_mlp_param_layout), resolved once per
// set of attributes: param[l][role] is the 0-based index after x_sorted and offsets, or -1 when the layer has no
// such parameter.
struct ExpertMLPParamIndex {
  int32_t param[kMAX_LAYERS][kPARAM_ROLE_COUNT];

  explicit ExpertMLPParamIndex(const ExpertMLPAttrs& a) {
    for (int32_t l = 0; l < kMAX_LAYERS; ++l)
      for (int32_t r = 0; r < kPARAM_ROLE_COUNT; ++r)
        param[l][r] = l < a.num_layers() ? static_cast<int32_t>(a.param_index(l, static_cast<ParamRole>(r))) : -1;
  }
  int32_t operator()(int64_t layer, ParamRole role) const { return param[layer][static_cast<int32_t>(role)]; }
};

// The kernels' per-layer arguments from the variadic parameter pointers `params` (device memory, in input order)
// and the weight dtype of each layer; no allocation.
inline void expert_mlp_layers(const ExpertMLPAttrs& a, const ExpertMLPParamIndex& index, const void* const* params,
                              const DType* weight_dtypes, MLPLayer* layers) {
  for (int64_t l = 0; l < a.num_layers() && l < kMAX_LAYERS; ++l) {
    auto param = [&](ParamRole role) -> const void* {
      const int32_t i = index(l, role);
      return i < 0 ? nullptr : params[i];
    };
    MLPLayer& layer = layers[l];
    layer.weight = param(ParamRole::kWEIGHT);
    layer.weight_dtype = weight_dtypes[l];
    layer.w_scale = static_cast<const float*>(param(ParamRole::kW_SCALE));
    layer.act_smooth = static_cast<const float*>(param(ParamRole::kACT_SMOOTH));
    // host values, passed to the kernels by value
    layer.act_scales = a.quant_mode == contract::QuantMode::kW8A8 ? a.act_scales.data() + l * a.num_group() : nullptr;
    layer.bias = static_cast<const float*>(param(ParamRole::kBIAS));
    layer.ln_gamma = static_cast<const float*>(param(ParamRole::kLN_GAMMA));
    layer.ln_beta = static_cast<const float*>(param(ParamRole::kLN_BETA));
  }
}

}  // namespace cuda
}  // namespace pimoe
