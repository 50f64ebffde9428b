// PiMoEExpertMLP as a TensorRT IPluginV3: grouped expert MLP (WMMA fp16 / SIMT fp32 GEMM, fused bias,
// LayerNorm, activation; quant_mode w8a8 / w8a8_dynamic: int8 WMMA GEMM with int32 accumulation and a dequantising
// epilogue). See README.md in this folder for I/O, fields, formats and limits; pimoePlugin.h for what an op
// description provides.
#pragma once

#include "cuda_attrs.h"
#include "pimoePlugin.h"

namespace pimoe {
namespace trt {

struct ExpertMLPOp {
  static constexpr const char* kNAME = contract::kEXPERTMLP_NAME;
  static constexpr int32_t kNB_OUTPUTS = 1;  // y_sorted
  using Attrs = ExpertMLPAttrs;
  struct Plan {
    cuda::ExpertMLPShape shape;                 // rows R, experts E, dtype of this run
    cuda::DType weight_dtypes[cuda::kMAX_LAYERS] = {};
    size_t workspace = 0;
  };

  Attrs attrs;
  cuda::ExpertMLPParamIndex index;  // (layer, role) -> variadic parameter
  std::vector<ParamRole> roles;     // role of each variadic parameter, in input order
  std::vector<int64_t> layers;      // its layer
  explicit ExpertMLPOp(const Attrs& a);

  // the contract, the CUDA kernels' limits, and a warning for act_scales that quant_mode ignores
  static std::string validate(const Attrs& a);
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

 private:
  // dtype the contract requires for variadic parameter `index` (0-based after x_sorted and offsets)
  DataType param_type(int64_t index, DataType x_type) const;
};

using ExpertMLPPlugin = Plugin<ExpertMLPOp>;
using ExpertMLPCreator = Creator<ExpertMLPOp>;

}  // namespace trt
}  // namespace pimoe
