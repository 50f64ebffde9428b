#include "combinePlugin.h"

namespace pimoe {
namespace trt {

namespace {
constexpr const char* kOP = contract::kCOMBINE_NAME;
}

std::string CombineOp::check_counts(int32_t nbInputs, int32_t nbOutputs) const {
  if (nbInputs != 3) return msg(kOP, ": expected 3 inputs (y_sorted, flat_to_sorted, weights), got ", nbInputs);
  if (nbOutputs != kNB_OUTPUTS) return msg(kOP, ": expected 1 output (y), got ", nbOutputs);
  return {};
}

std::string CombineOp::output_types(const DataType* in, DataType* out) const {
  if (auto e = require_type(kOP, "y_sorted", in[0], {DataType::kFLOAT, DataType::kHALF}); !e.empty()) return e;
  out[0] = in[0];
  return {};
}

std::string CombineOp::output_shapes(const nvinfer1::DimsExprs* in, int32_t, nvinfer1::DimsExprs* out,
                                     nvinfer1::IExprBuilder&) const {
  if (in[0].nbDims != 2 || in[2].nbDims != 2)
    return msg(kOP, ": y_sorted [N*k, H] and weights [N, k] must have rank 2");
  out[0].nbDims = 2;  // y [N, H]
  out[0].d[0] = in[2].d[0];
  out[0].d[1] = in[0].d[1];
  return {};
}

bool CombineOp::supports(int32_t pos, const DynamicPluginTensorDesc* io, int32_t) const {
  const DataType t = io[pos].desc.type;
  switch (pos) {
    case 0: return is_float_io(t);              // y_sorted
    case 1: return t == DataType::kINT32;       // flat_to_sorted
    case 2: return t == DataType::kFLOAT;       // weights
    default: return t == io[0].desc.type;       // y
  }
}

std::string CombineOp::check_io(const std::vector<TensorInfo>& in, int32_t nbOutputs) const {
  if (auto e = check_counts(static_cast<int32_t>(in.size()), nbOutputs); !e.empty()) return e;
  if (auto e = require_type(kOP, "y_sorted", in[0].type, {DataType::kFLOAT, DataType::kHALF}); !e.empty()) return e;
  if (auto e = require_type(kOP, "flat_to_sorted", in[1].type, {DataType::kINT32}); !e.empty()) return e;
  if (auto e = require_type(kOP, "weights", in[2].type, {DataType::kFLOAT}); !e.empty()) return e;
  return check_combine(in[0].dims, in[1].dims, in[2].dims);
}

CombineOp::Plan CombineOp::plan(const std::vector<TensorInfo>& in) const {
  Plan p;
  p.n = in[2].dims[0];
  p.k = in[2].dims[1];
  p.h = in[0].dims[1];
  p.dtype = to_cuda(in[0].type);
  return p;
}

cudaError_t CombineOp::launch(const Plan& p, const void* const* in, void* const* out, void*,
                              cuda::DeviceStatus* status, cudaStream_t stream) const {
  return cuda::combine(in[0], p.dtype, static_cast<const int32_t*>(in[1]), static_cast<const float*>(in[2]), p.n, p.k,
                       p.h, out[0], status, stream, attrs.order);
}

template class Plugin<CombineOp>;
template class Creator<CombineOp>;

}  // namespace trt
}  // namespace pimoe
