#include "dispatchPlugin.h"

namespace pimoe {
namespace trt {

namespace {
constexpr const char* kOP = contract::kDISPATCH_NAME;
}

std::string DispatchOp::check_counts(int32_t nbInputs, int32_t nbOutputs) const {
  if (nbInputs != 2) return msg(kOP, ": expected 2 inputs (x, ids), got ", nbInputs);
  if (nbOutputs != kNB_OUTPUTS)
    return msg(kOP, ": expected 3 outputs (x_sorted, offsets, flat_to_sorted), got ", nbOutputs);
  return {};
}

std::string DispatchOp::output_types(const DataType* in, DataType* out) const {
  if (auto e = require_type(kOP, "x", in[0], {DataType::kFLOAT, DataType::kHALF}); !e.empty()) return e;
  out[0] = in[0];
  out[1] = DataType::kINT32;
  out[2] = DataType::kINT32;
  return {};
}

std::string DispatchOp::output_shapes(const nvinfer1::DimsExprs* in, int32_t, nvinfer1::DimsExprs* out,
                                      nvinfer1::IExprBuilder& exprs) const {
  if (in[0].nbDims != 2 || in[1].nbDims != 2)
    return msg(kOP, ": x [N, H] and ids [N, k] must have rank 2, got ranks ", in[0].nbDims, " and ", in[1].nbDims);
  const nvinfer1::IDimensionExpr* pairs =
      exprs.operation(nvinfer1::DimensionOperation::kPROD, *in[0].d[0], *in[1].d[1]);
  const nvinfer1::IDimensionExpr* bounds = exprs.constant(attrs.num_experts + 1);
  if (pairs == nullptr || bounds == nullptr) return msg(kOP, ": IExprBuilder failed");
  out[0].nbDims = 2;  // x_sorted [N*k, H]
  out[0].d[0] = pairs;
  out[0].d[1] = in[0].d[1];
  out[1].nbDims = 1;  // offsets [E+1]
  out[1].d[0] = bounds;
  out[2].nbDims = 1;  // flat_to_sorted [N*k]
  out[2].d[0] = pairs;
  return {};
}

bool DispatchOp::supports(int32_t pos, const DynamicPluginTensorDesc* io, int32_t) const {
  const DataType t = io[pos].desc.type;
  if (pos == 0) return is_float_io(t);           // x
  if (pos == 2) return t == io[0].desc.type;     // x_sorted: x's dtype
  return t == DataType::kINT32;                  // ids, offsets, flat_to_sorted
}

// TensorRT hands every run the workspace of the profile's maximum, which covers the run's need because
// dispatch_workspace_size never decreases with N*k (tests/emu/test_emu.py checks both)
size_t DispatchOp::workspace_size(const DynamicPluginTensorDesc* in, int32_t nbInputs) const {
  if (nbInputs != 2 || in[1].max.nbDims != 2) return 0;
  const int64_t pairs = in[1].max.d[0] * in[1].max.d[1];  // maximum N*k of the profile
  return cuda::dispatch_workspace_size(pairs > 0 ? pairs : 0, attrs.num_experts);
}

std::string DispatchOp::check_io(const std::vector<TensorInfo>& in, int32_t nbOutputs) const {
  if (auto e = check_counts(static_cast<int32_t>(in.size()), nbOutputs); !e.empty()) return e;
  if (auto e = require_type(kOP, "x", in[0].type, {DataType::kFLOAT, DataType::kHALF}); !e.empty()) return e;
  if (auto e = require_type(kOP, "ids", in[1].type, {DataType::kINT32}); !e.empty()) return e;
  return check_dispatch(attrs, in[0].dims, in[1].dims);
}

DispatchOp::Plan DispatchOp::plan(const std::vector<TensorInfo>& in) const {
  Plan p;
  p.n = in[0].dims[0];
  p.h = in[0].dims[1];
  p.k = in[1].dims[1];
  p.dtype = to_cuda(in[0].type);
  p.workspace = cuda::dispatch_workspace_size(p.n * p.k, attrs.num_experts);
  return p;
}

cudaError_t DispatchOp::launch(const Plan& p, const void* const* in, void* const* out, void* workspace,
                               cuda::DeviceStatus* status, cudaStream_t stream) const {
  return cuda::dispatch(in[0], p.dtype, static_cast<const int32_t*>(in[1]), p.n, p.h, p.k, attrs.num_experts, out[0],
                        static_cast<int32_t*>(out[1]), static_cast<int32_t*>(out[2]), workspace, p.workspace, status,
                        stream);
}

template class Plugin<DispatchOp>;
template class Creator<DispatchOp>;

}  // namespace trt
}  // namespace pimoe
