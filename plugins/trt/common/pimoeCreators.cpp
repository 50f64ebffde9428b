#include "pimoeCreators.h"

#include <cstring>
#include <new>

#include "combinePlugin.h"
#include "dispatchPlugin.h"
#include "expertMLPPlugin.h"
#include "routePlugin.h"

namespace pimoe {
namespace trt {

namespace {

struct Creators {
  RouteCreator route;
  DispatchCreator dispatch;
  ExpertMLPCreator expert_mlp;
  CombineCreator combine;
  nvinfer1::IPluginCreatorInterface* list[4] = {&route, &dispatch, &expert_mlp, &combine};
};

Creators* creators() noexcept {
  // constructed on first use and deliberately never destroyed: TensorRT may hold the pointers until after this
  // library's static destructors would have run
  static Creators* instance = new (std::nothrow) Creators();
  return instance;
}

}  // namespace

nvinfer1::IPluginCreatorInterface* const* all_creators(int32_t* count) noexcept {
  Creators* c = creators();
  if (c == nullptr) {
    if (count != nullptr) *count = 0;
    return nullptr;
  }
  if (count != nullptr) *count = 4;
  return c->list;
}

nvinfer1::IPluginCreatorV3One* find_creator(const char* name) noexcept {
  Creators* c = creators();
  if (c == nullptr || name == nullptr) return nullptr;
  nvinfer1::IPluginCreatorV3One* candidates[] = {&c->route, &c->dispatch, &c->expert_mlp, &c->combine};
  for (nvinfer1::IPluginCreatorV3One* creator : candidates)
    if (std::strcmp(creator->getPluginName(), name) == 0) return creator;
  return nullptr;
}

}  // namespace trt
}  // namespace pimoe
