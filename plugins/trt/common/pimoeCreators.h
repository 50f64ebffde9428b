// The four creators of this library, shared by the TensorRT entry points (pimoeRegistration.cpp) and the
// GPU harness (plugins/harness), which creates plugins through them without TensorRT.
#pragma once

#include <NvInferRuntime.h>

#include <cstdint>

namespace pimoe {
namespace trt {

// Process-lifetime creators (PiMoERoute, PiMoEDispatch, PiMoEExpertMLP, PiMoECombine), never destroyed.
nvinfer1::IPluginCreatorInterface* const* all_creators(int32_t* count) noexcept;
// nullptr when `name` is not one of ours
nvinfer1::IPluginCreatorV3One* find_creator(const char* name) noexcept;

}  // namespace trt
}  // namespace pimoe
