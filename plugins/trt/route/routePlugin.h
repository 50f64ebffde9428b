// PiMoERoute as a TensorRT IPluginV3: fp32 scores (softmax, softmax_topk or sigmoid) -> [grouped selection] ->
// top-k (ties to the lower index, NaN lowest) -> combine weights. See README.md in this folder for I/O, fields,
// formats and limits; pimoePlugin.h for what an op description provides.
#pragma once

#include "pimoePlugin.h"

namespace pimoe {
namespace trt {

struct RouteOp {
  static constexpr const char* kNAME = contract::kROUTE_NAME;
  static constexpr int32_t kNB_OUTPUTS = 2;  // weights, ids
  using Attrs = RouteAttrs;
  struct Plan {
    int64_t n = 0, e = 0;
    cuda::DType dtype = cuda::DType::kF32;
    bool bias = false;
    size_t workspace = 0;
  };

  Attrs attrs;
  explicit RouteOp(const Attrs& a) : attrs(a) {}

  static std::string validate(const Attrs& a) { return validate_attrs(a); }
  std::string check_counts(int32_t nbInputs, int32_t nbOutputs) const;
  std::string output_types(const DataType* in, DataType* out) const;
  std::string output_shapes(const nvinfer1::DimsExprs* in, int32_t nbInputs, nvinfer1::DimsExprs* out,
                            nvinfer1::IExprBuilder& exprs) const;
  bool supports(int32_t pos, const DynamicPluginTensorDesc* io, int32_t nbInputs) const;
  size_t workspace_size(const DynamicPluginTensorDesc*, int32_t) const { return 0; }
  std::string check_io(const std::vector<TensorInfo>& in, int32_t nbOutputs) const;
  Plan plan(const std::vector<TensorInfo>& in) const;
  cudaError_t launch(const Plan& p, const void* const* in, void* const* out, void*, cuda::DeviceStatus*,
                     cudaStream_t stream) const;
};

using RoutePlugin = Plugin<RouteOp>;
using RouteCreator = Creator<RouteOp>;

}  // namespace trt
}  // namespace pimoe
