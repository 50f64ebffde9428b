// PiMoEDispatch as a TensorRT IPluginV3: deterministic stable counting sort of the (token, slot) pairs by expert
// id. See README.md in this folder for I/O, fields, formats and limits; pimoePlugin.h for what an op description
// provides.
#pragma once

#include "pimoePlugin.h"

namespace pimoe {
namespace trt {

struct DispatchOp {
  static constexpr const char* kNAME = contract::kDISPATCH_NAME;
  static constexpr int32_t kNB_OUTPUTS = 3;  // x_sorted, offsets, flat_to_sorted
  using Attrs = DispatchAttrs;
  struct Plan {
    int64_t n = 0, h = 0, k = 0;
    cuda::DType dtype = cuda::DType::kF32;
    size_t workspace = 0;
  };

  Attrs attrs;
  explicit DispatchOp(const Attrs& a) : attrs(a) {}

  static std::string validate(const Attrs& a) { return validate_attrs(a); }
  std::string check_counts(int32_t nbInputs, int32_t nbOutputs) const;
  std::string output_types(const DataType* in, DataType* out) const;
  std::string output_shapes(const nvinfer1::DimsExprs* in, int32_t nbInputs, nvinfer1::DimsExprs* out,
                            nvinfer1::IExprBuilder& exprs) const;
  bool supports(int32_t pos, const DynamicPluginTensorDesc* io, int32_t nbInputs) const;
  size_t workspace_size(const DynamicPluginTensorDesc* in, int32_t nbInputs) const;
  std::string check_io(const std::vector<TensorInfo>& in, int32_t nbOutputs) const;
  Plan plan(const std::vector<TensorInfo>& in) const;
  cudaError_t launch(const Plan& p, const void* const* in, void* const* out, void* workspace,
                     cuda::DeviceStatus* status, cudaStream_t stream) const;
};

using DispatchPlugin = Plugin<DispatchOp>;
using DispatchCreator = Creator<DispatchOp>;

}  // namespace trt
}  // namespace pimoe
