// PiMoERoute as a TensorRT IPluginV3: fp32 scores (softmax, softmax_topk or sigmoid) -> [grouped selection] ->
// top-k (ties to the lower index, NaN lowest) -> combine weights. See README.md in this folder for I/O, fields, formats and limits.
#pragma once

#include "pimoePluginCommon.h"

namespace pimoe {
namespace trt {

class RoutePlugin final : public PluginBase {
 public:
  explicit RoutePlugin(const RouteAttrs& attrs);

  nvinfer1::IPluginV3* clone() noexcept override;

  // IPluginV3OneBuild
  int32_t getNbOutputs() const noexcept override { return 2; }
  int32_t getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, const DataType* inputTypes,
                             int32_t nbInputs) const noexcept override;
  int32_t getOutputShapes(const nvinfer1::DimsExprs* inputs, int32_t nbInputs, const nvinfer1::DimsExprs* shapeInputs,
                          int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
                          nvinfer1::IExprBuilder& exprBuilder) noexcept override;
  bool supportsFormatCombination(int32_t pos, const DynamicPluginTensorDesc* inOut, int32_t nbInputs,
                                 int32_t nbOutputs) noexcept override;
  size_t getWorkspaceSize(const DynamicPluginTensorDesc* inputs, int32_t nbInputs,
                          const DynamicPluginTensorDesc* outputs, int32_t nbOutputs) const noexcept override;

  // IPluginV3OneRuntime
  int32_t enqueue(const PluginTensorDesc* inputDesc, const PluginTensorDesc* outputDesc, const void* const* inputs,
                  void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
  const PluginFieldCollection* getFieldsToSerialize() noexcept override;

 private:
  std::string check_io(const std::vector<TensorInfo>& in, int32_t nbOutputs) const override;

  RouteAttrs mAttrs;
  FieldWriter mSerialized;
};

class RouteCreator final : public CreatorBase {
 public:
  RouteCreator();
  nvinfer1::IPluginV3* createPlugin(const char* name, const PluginFieldCollection* fc,
                                    nvinfer1::TensorRTPhase phase) noexcept override;
};

}  // namespace trt
}  // namespace pimoe
