#include "routePlugin.h"

namespace pimoe {
namespace trt {

namespace {
constexpr const char* kOP = contract::kROUTE_NAME;
}

std::string RouteOp::check_counts(int32_t nbInputs, int32_t nbOutputs) const {
  if (nbInputs != 1 && nbInputs != 2)
    return msg(kOP, ": expected 1 or 2 inputs (logits, selection_bias), got ", nbInputs);
  if (nbOutputs != kNB_OUTPUTS) return msg(kOP, ": expected 2 outputs (weights, ids), got ", nbOutputs);
  return {};
}

std::string RouteOp::output_types(const DataType* in, DataType* out) const {
  if (auto e = require_type(kOP, "logits", in[0], {DataType::kFLOAT, DataType::kHALF}); !e.empty()) return e;
  out[0] = DataType::kFLOAT;
  out[1] = DataType::kINT32;
  return {};
}

std::string RouteOp::output_shapes(const nvinfer1::DimsExprs* in, int32_t, nvinfer1::DimsExprs* out,
                                   nvinfer1::IExprBuilder& exprs) const {
  if (in[0].nbDims != 2) return msg(kOP, ": logits must have rank 2 [N, E], got rank ", in[0].nbDims);
  if (in[0].d[1]->isConstant() && in[0].d[1]->getConstantValue() < attrs.k)
    return msg(kOP, ": k=", attrs.k, " exceeds the number of experts E=", in[0].d[1]->getConstantValue());
  const nvinfer1::IDimensionExpr* k = exprs.constant(attrs.k);
  if (k == nullptr) return msg(kOP, ": IExprBuilder::constant failed");
  for (int32_t o = 0; o < kNB_OUTPUTS; ++o) {  // weights, ids [N, k]
    out[o].nbDims = 2;
    out[o].d[0] = in[0].d[0];
    out[o].d[1] = k;
  }
  return {};
}

bool RouteOp::supports(int32_t pos, const DynamicPluginTensorDesc* io, int32_t nbInputs) const {
  const DataType t = io[pos].desc.type;
  if (pos == 0) return is_float_io(t);                                  // logits
  if (pos < nbInputs) return t == DataType::kFLOAT;                     // selection_bias
  return t == (pos == nbInputs ? DataType::kFLOAT : DataType::kINT32);  // weights, ids
}

std::string RouteOp::check_io(const std::vector<TensorInfo>& in, int32_t nbOutputs) const {
  if (auto e = check_counts(static_cast<int32_t>(in.size()), nbOutputs); !e.empty()) return e;
  if (auto e = require_type(kOP, "logits", in[0].type, {DataType::kFLOAT, DataType::kHALF}); !e.empty()) return e;
  if (in.size() == 2)
    if (auto e = require_type(kOP, "selection_bias", in[1].type, {DataType::kFLOAT}); !e.empty()) return e;
  return check_route(attrs, in[0].dims, in.size() == 2 ? &in[1].dims : nullptr);
}

RouteOp::Plan RouteOp::plan(const std::vector<TensorInfo>& in) const {
  Plan p;
  p.n = in[0].dims[0];
  p.e = in[0].dims[1];
  p.dtype = to_cuda(in[0].type);
  p.bias = in.size() == 2;
  return p;
}

cudaError_t RouteOp::launch(const Plan& p, const void* const* in, void* const* out, void*, cuda::DeviceStatus*,
                            cudaStream_t stream) const {
  return cuda::route(attrs, in[0], p.dtype, p.bias ? static_cast<const float*>(in[1]) : nullptr, p.n, p.e,
                     static_cast<float*>(out[0]), static_cast<int32_t*>(out[1]), stream);
}

template class Plugin<RouteOp>;
template class Creator<RouteOp>;

}  // namespace trt
}  // namespace pimoe
