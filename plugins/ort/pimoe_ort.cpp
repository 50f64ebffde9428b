// libpimoe_ort: the four pimoe ops as an ONNX Runtime custom-op library (domain "pimoe", CPU provider; op contract v2,
// which runs v1 graphs unchanged: every attribute v2 added defaults to v1).
// Compiled again with PIMOE_ORT_CUDA=1 (CMake target pimoe_ort_cuda, built where nvcc is) it is
// libpimoe_ort_cuda: the same CPU ops plus CUDA execution-provider kernels for the four ops (pimoe_ort_cuda.inc),
// on the CUDA launchers of plugins/kernels/cuda that the TensorRT plugins use.
//
// Load it with SessionOptions.register_custom_ops_library(path); the Python package does this for every
// session it creates (pimoe_export.runtime.ort). Kernels run on ONNX Runtime's intra-op thread pool, report
// bad inputs through ORT status codes (no exception crosses the C ABI), and pack PiMoEExpertMLP weights
// once at session creation when they are initializers.
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "cpu_kernels.h"
#include "pimoe_attrs.h"

#ifndef PIMOE_ORT_CUDA
#define PIMOE_ORT_CUDA 0
#endif
#ifndef PIMOE_ORT_CUDA_EMU  // 1: the CUDA kernels on plugins/emu, for the CPU provider (libpimoe_ort_cuda_emu, tests)
#define PIMOE_ORT_CUDA_EMU 0
#endif
#if PIMOE_ORT_CUDA
#include <cstdlib>
#include <cstring>

#include "cuda_kernels.h"
#endif

#define PIMOE_EXPORT extern "C" __attribute__((visibility("default")))

namespace pimoe {
namespace ort {
namespace {

const OrtApi* g_api = nullptr;

OrtStatusPtr error(const std::string& text) { return g_api->CreateStatus(ORT_INVALID_ARGUMENT, text.c_str()); }

constexpr ONNXTensorElementDataType kF32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
constexpr ONNXTensorElementDataType kF16 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
constexpr ONNXTensorElementDataType kI32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
constexpr ONNXTensorElementDataType kI8 = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
constexpr ONNXTensorElementDataType kAny = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;

const char* type_name(ONNXTensorElementDataType t) {
  switch (t) {
    case kF32: return "float32";
    case kF16: return "float16";
    case kI32: return "int32";
    case kI8: return "int8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "float64";
    default: return "another type";
  }
}

cpu::DType to_dtype(ONNXTensorElementDataType t) {
  return t == kF16 ? cpu::DType::kF16 : t == kI8 ? cpu::DType::kI8 : cpu::DType::kF32;
}

cpu::Parallel make_parallel(OrtKernelContext* context) {
  return cpu::Parallel(context, [](void* ctx, cpu::Parallel::Trampoline fn, size_t total, void* arg) {
    OrtStatus* status = g_api->KernelContext_ParallelFor(static_cast<OrtKernelContext*>(ctx), fn, total, 0, arg);
    if (status != nullptr) {  // no thread pool available: run serially, same results
      g_api->ReleaseStatus(status);
      for (size_t i = 0; i < total; ++i) fn(arg, i);
    }
  });
}

// Attribute readers that report a missing/ill-typed attribute as a message instead of throwing.
struct AttrReader {
  const OrtKernelInfo* info;
  std::string problem;

  int64_t get_int(const char* name, int64_t fallback, bool required) {
    int64_t v = fallback;
    OrtStatus* s = g_api->KernelInfoGetAttribute_int64(info, name, &v);
    if (s) {
      g_api->ReleaseStatus(s);
      if (required && problem.empty()) problem = msg("missing required int attribute '", name, "'");
      return fallback;
    }
    return v;
  }
  float get_float(const char* name, float fallback) {
    float v = fallback;
    OrtStatus* s = g_api->KernelInfoGetAttribute_float(info, name, &v);
    if (s) {
      g_api->ReleaseStatus(s);
      return fallback;
    }
    return v;
  }
  std::string get_string(const char* name, const std::string& fallback) {
    size_t size = 0;
    OrtStatus* s = g_api->KernelInfoGetAttribute_string(info, name, nullptr, &size);
    if (s) {
      g_api->ReleaseStatus(s);
      return fallback;
    }
    std::string out(size, '\0');
    s = g_api->KernelInfoGetAttribute_string(info, name, out.data(), &size);
    if (s) {
      g_api->ReleaseStatus(s);
      return fallback;
    }
    if (!out.empty() && out.back() == '\0') out.pop_back();
    return out;
  }
  template <typename T>
  std::vector<T> get_array(const char* name, bool required) {
    size_t size = 0;
    OrtStatus* s;
    if constexpr (std::is_same_v<T, float>)
      s = g_api->KernelInfoGetAttributeArray_float(info, name, nullptr, &size);
    else
      s = g_api->KernelInfoGetAttributeArray_int64(info, name, nullptr, &size);
    if (s) {
      g_api->ReleaseStatus(s);
      if (required && problem.empty()) problem = msg("missing required list attribute '", name, "'");
      return {};
    }
    std::vector<T> out(size);
    if (size == 0) return out;
    if constexpr (std::is_same_v<T, float>)
      s = g_api->KernelInfoGetAttributeArray_float(info, name, out.data(), &size);
    else
      s = g_api->KernelInfoGetAttributeArray_int64(info, name, out.data(), &size);
    if (s) g_api->ReleaseStatus(s);
    return out;
  }
};

#define PIMOE_RETURN_IF(status_expr)                   \
  do {                                                 \
    if (OrtStatusPtr pimoe_status_ = (status_expr)) return pimoe_status_; \
  } while (0)

// Thin, non-throwing views of kernel inputs/outputs.
struct Input {
  const OrtValue* value = nullptr;
  ONNXTensorElementDataType type = kAny;
  Dims dims;
  const void* data = nullptr;
};

OrtStatusPtr describe(const OrtValue* value, Input* in) {
  in->value = value;
  if (value == nullptr) return nullptr;
  OrtTensorTypeAndShapeInfo* info = nullptr;
  PIMOE_RETURN_IF(g_api->GetTensorTypeAndShape(value, &info));
  size_t rank = 0;
  OrtStatus* s = g_api->GetTensorElementType(info, &in->type);
  if (!s) s = g_api->GetDimensionsCount(info, &rank);
  if (!s) {
    in->dims.resize(rank);
    s = g_api->GetDimensions(info, in->dims.data(), rank);
  }
  g_api->ReleaseTensorTypeAndShapeInfo(info);
  if (s) return s;
  void* data = nullptr;
  PIMOE_RETURN_IF(g_api->GetTensorMutableData(const_cast<OrtValue*>(value), &data));
  in->data = data;
  return nullptr;
}

OrtStatusPtr get_input(OrtKernelContext* ctx, size_t index, Input* in) {
  const OrtValue* value = nullptr;
  if (OrtStatus* s = g_api->KernelContext_GetInput(ctx, index, &value)) return s;
  return describe(value, in);
}

OrtStatusPtr get_output(OrtKernelContext* ctx, size_t index, const Dims& dims, void** data) {
  OrtValue* value = nullptr;
  if (OrtStatus* s = g_api->KernelContext_GetOutput(ctx, index, dims.data(), dims.size(), &value)) return s;
  return g_api->GetTensorMutableData(value, data);
}


std::string require_type(const char* op, const char* what, ONNXTensorElementDataType got,
                         std::initializer_list<ONNXTensorElementDataType> allowed) {
  for (auto t : allowed)
    if (t == got) return {};
  std::string names;
  for (auto t : allowed) names += (names.empty() ? "" : " or ") + std::string(type_name(t));
  return msg(op, ": ", what, " must be ", names, ", got ", type_name(got));
}

// Every op checks its inputs and claims its outputs in one *_io function shared by the CPU kernels here and the
// CUDA kernels of pimoe_ort_cuda.inc (shapes are host values on both; only the data pointers differ). Kernel
// classes name their provider (kProvider, nullptr: CPU) and may finish their set-up in init().

// ------------------------------------------------------------------------------------------ PiMoERoute
struct RouteIO {
  Input logits, bias;
  int64_t n = 0, experts = 0;
  void* weights = nullptr;
  void* ids = nullptr;
};

OrtStatusPtr route_io(OrtKernelContext* ctx, const RouteAttrs& attrs, RouteIO* io) {
  PIMOE_RETURN_IF(get_input(ctx, 0, &io->logits));
  size_t count = 0;
  PIMOE_RETURN_IF(g_api->KernelContext_GetInputCount(ctx, &count));
  if (count > 1) PIMOE_RETURN_IF(get_input(ctx, 1, &io->bias));
  if (auto e = require_type("PiMoERoute", "logits", io->logits.type, {kF32, kF16}); !e.empty()) return error(e);
  if (io->bias.value) {
    if (auto e = require_type("PiMoERoute", "selection_bias", io->bias.type, {kF32}); !e.empty()) return error(e);
  }
  if (auto e = check_route(attrs, io->logits.dims, io->bias.value ? &io->bias.dims : nullptr); !e.empty())
    return error(e);
  io->n = io->logits.dims[0];
  io->experts = io->logits.dims[1];
  PIMOE_RETURN_IF(get_output(ctx, 0, {io->n, attrs.k}, &io->weights));
  return get_output(ctx, 1, {io->n, attrs.k}, &io->ids);
}

struct RouteKernel {
  static constexpr const char* kProvider = nullptr;
  RouteAttrs attrs;

  OrtStatusPtr init(const OrtKernelInfo*) { return nullptr; }
  OrtStatusPtr ComputeV2(OrtKernelContext* ctx) {
    RouteIO io;
    PIMOE_RETURN_IF(route_io(ctx, attrs, &io));
    cpu::route(attrs, io.logits.data, to_dtype(io.logits.type),
               io.bias.value ? static_cast<const float*>(io.bias.data) : nullptr, io.n, io.experts,
               static_cast<float*>(io.weights), static_cast<int32_t*>(io.ids), make_parallel(ctx));
    return nullptr;
  }
};

template <class Kernel>
struct RouteOp : Ort::CustomOpBase<RouteOp<Kernel>, Kernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    AttrReader r{info, {}};
    auto k = std::make_unique<Kernel>();
    RouteAttrs& a = k->attrs;
    a.k = r.get_int(contract::kATTR_K, 0, true);
    const int64_t normalize = r.get_int(contract::kATTR_NORMALIZE, 0, false);
    const std::string scoring = r.get_string(contract::kATTR_SCORING, "softmax");
    a.num_groups = r.get_int(contract::kATTR_NUM_GROUPS, 1, false);
    a.groups_kept = r.get_int(contract::kATTR_GROUPS_KEPT, 1, false);
    const std::string group_score = r.get_string(contract::kATTR_GROUP_SCORE, "max");
    a.routed_scaling_factor = r.get_float(contract::kATTR_ROUTED_SCALING_FACTOR, 1.0f);
    a.normalize_eps = r.get_float(contract::kATTR_NORMALIZE_EPS, 0.0f);
    if (!r.problem.empty()) return error(msg("PiMoERoute: ", r.problem));
    if (auto e = parse_flag("PiMoERoute", contract::kATTR_NORMALIZE, normalize, &a.normalize); !e.empty())
      return error(e);
    int32_t value = 0;
    if (!parse_enum(scoring.c_str(), contract::kSCORING_NAMES, contract::kSCORING_COUNT, &value))
      return error(msg("PiMoERoute: unknown scoring '", scoring, "'; expected one of ",
                       enum_choices(contract::kSCORING_NAMES, contract::kSCORING_COUNT)));
    a.scoring = static_cast<contract::Scoring>(value);
    if (!parse_enum(group_score.c_str(), contract::kGROUPSCORE_NAMES, contract::kGROUPSCORE_COUNT, &value))
      return error(msg("PiMoERoute: unknown group_score '", group_score, "'; expected one of ",
                       enum_choices(contract::kGROUPSCORE_NAMES, contract::kGROUPSCORE_COUNT)));
    a.group_score = static_cast<contract::GroupScore>(value);
    if (auto e = validate_attrs(a); !e.empty()) return error(e);
    PIMOE_RETURN_IF(k->init(info));
    *kernel = k.release();
    return nullptr;
  }
  const char* GetName() const { return contract::kROUTE_NAME; }
  const char* GetExecutionProviderType() const { return Kernel::kProvider; }
  size_t GetInputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetInputType(size_t i) const { return i == 0 ? kAny : kF32; }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i == 0 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
  size_t GetOutputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetOutputType(size_t i) const { return i == 0 ? kF32 : kI32; }
};

// ------------------------------------------------------------------------------------------ PiMoEDispatch
struct DispatchIO {
  Input x, ids;
  int64_t n = 0, h = 0, k = 0;
  void *x_sorted = nullptr, *offsets = nullptr, *f2s = nullptr;
};

OrtStatusPtr dispatch_io(OrtKernelContext* ctx, const DispatchAttrs& attrs, DispatchIO* io) {
  PIMOE_RETURN_IF(get_input(ctx, 0, &io->x));
  PIMOE_RETURN_IF(get_input(ctx, 1, &io->ids));
  if (auto e = require_type("PiMoEDispatch", "x", io->x.type, {kF32, kF16}); !e.empty()) return error(e);
  if (auto e = require_type("PiMoEDispatch", "ids", io->ids.type, {kI32}); !e.empty()) return error(e);
  if (auto e = check_dispatch(attrs, io->x.dims, io->ids.dims); !e.empty()) return error(e);
  io->n = io->x.dims[0];
  io->h = io->x.dims[1];
  io->k = io->ids.dims[1];
  PIMOE_RETURN_IF(get_output(ctx, 0, {io->n * io->k, io->h}, &io->x_sorted));
  PIMOE_RETURN_IF(get_output(ctx, 1, {attrs.num_experts + 1}, &io->offsets));
  return get_output(ctx, 2, {io->n * io->k}, &io->f2s);
}

struct DispatchKernel {
  static constexpr const char* kProvider = nullptr;
  DispatchAttrs attrs;

  OrtStatusPtr init(const OrtKernelInfo*) { return nullptr; }
  OrtStatusPtr ComputeV2(OrtKernelContext* ctx) {
    DispatchIO io;
    PIMOE_RETURN_IF(dispatch_io(ctx, attrs, &io));
    auto e = cpu::dispatch(io.x.data, to_dtype(io.x.type), static_cast<const int32_t*>(io.ids.data), io.n, io.h,
                           io.k, attrs.num_experts, io.x_sorted, static_cast<int32_t*>(io.offsets),
                           static_cast<int32_t*>(io.f2s), make_parallel(ctx));
    return e.empty() ? nullptr : error(e);
  }
};

template <ONNXTensorElementDataType T, class Kernel>
struct DispatchOp : Ort::CustomOpBase<DispatchOp<T, Kernel>, Kernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    AttrReader r{info, {}};
    auto k = std::make_unique<Kernel>();
    k->attrs.num_experts = r.get_int(contract::kATTR_NUM_EXPERTS, 0, true);
    if (!r.problem.empty()) return error(msg("PiMoEDispatch: ", r.problem));
    if (auto e = validate_attrs(k->attrs); !e.empty()) return error(e);
    PIMOE_RETURN_IF(k->init(info));
    *kernel = k.release();
    return nullptr;
  }
  const char* GetName() const { return contract::kDISPATCH_NAME; }
  const char* GetExecutionProviderType() const { return Kernel::kProvider; }
  size_t GetInputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetInputType(size_t i) const { return i == 0 ? T : kI32; }
  size_t GetOutputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetOutputType(size_t i) const { return i == 0 ? T : kI32; }
};

// ------------------------------------------------------------------------------------------ PiMoECombine
struct CombineIO {
  Input y_sorted, f2s, weights;
  int64_t n = 0, k = 0, h = 0;
  void* y = nullptr;
};

OrtStatusPtr combine_io(OrtKernelContext* ctx, CombineIO* io) {
  PIMOE_RETURN_IF(get_input(ctx, 0, &io->y_sorted));
  PIMOE_RETURN_IF(get_input(ctx, 1, &io->f2s));
  PIMOE_RETURN_IF(get_input(ctx, 2, &io->weights));
  if (auto e = require_type("PiMoECombine", "y_sorted", io->y_sorted.type, {kF32, kF16}); !e.empty())
    return error(e);
  if (auto e = require_type("PiMoECombine", "flat_to_sorted", io->f2s.type, {kI32}); !e.empty()) return error(e);
  if (auto e = require_type("PiMoECombine", "weights", io->weights.type, {kF32}); !e.empty()) return error(e);
  if (auto e = check_combine(io->y_sorted.dims, io->f2s.dims, io->weights.dims); !e.empty()) return error(e);
  io->n = io->weights.dims[0];
  io->k = io->weights.dims[1];
  io->h = io->y_sorted.dims[1];
  return get_output(ctx, 0, {io->n, io->h}, &io->y);
}

struct CombineKernel {
  static constexpr const char* kProvider = nullptr;
  CombineAttrs attrs;

  OrtStatusPtr init(const OrtKernelInfo*) { return nullptr; }
  OrtStatusPtr ComputeV2(OrtKernelContext* ctx) {
    CombineIO io;
    PIMOE_RETURN_IF(combine_io(ctx, &io));
    auto e = cpu::combine(io.y_sorted.data, to_dtype(io.y_sorted.type), static_cast<const int32_t*>(io.f2s.data),
                          static_cast<const float*>(io.weights.data), io.n, io.k, io.h, io.y, make_parallel(ctx),
                          attrs.order);
    return e.empty() ? nullptr : error(e);
  }
};

template <ONNXTensorElementDataType T, class Kernel>
struct CombineOp : Ort::CustomOpBase<CombineOp<T, Kernel>, Kernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    AttrReader r{info, {}};
    auto k = std::make_unique<Kernel>();
    const std::string order = r.get_string(contract::kATTR_ORDER, "slot");
    int32_t value = 0;
    if (!parse_enum(order.c_str(), contract::kCOMBINEORDER_NAMES, contract::kCOMBINEORDER_COUNT, &value))
      return error(msg("PiMoECombine: unknown order '", order, "'; expected one of ",
                       enum_choices(contract::kCOMBINEORDER_NAMES, contract::kCOMBINEORDER_COUNT)));
    k->attrs.order = static_cast<contract::CombineOrder>(value);
    if (auto e = validate_attrs(k->attrs); !e.empty()) return error(e);
    PIMOE_RETURN_IF(k->init(info));
    *kernel = k.release();
    return nullptr;
  }
  const char* GetName() const { return contract::kCOMBINE_NAME; }
  const char* GetExecutionProviderType() const { return Kernel::kProvider; }
  size_t GetInputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetInputType(size_t i) const { return i == 0 ? T : i == 1 ? kI32 : kF32; }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return T; }
};

// ------------------------------------------------------------------------------------------ PiMoEExpertMLP
std::string check_param_types(const ExpertMLPAttrs& a, const std::vector<ONNXTensorElementDataType>& types,
                              ONNXTensorElementDataType x_type) {
  for (int64_t l = 0; l < a.num_layers(); ++l) {
    const auto w = types[static_cast<size_t>(a.param_index(l, ParamRole::kWEIGHT))];
    if (a.quantized()) {
      if (w != kI8) return msg("PiMoEExpertMLP: quant_mode w8a8 needs int8 weights (layer ", l, "), got ", type_name(w));
      const auto s = types[static_cast<size_t>(a.param_index(l, ParamRole::kW_SCALE))];
      if (s != kF32) return msg("PiMoEExpertMLP: w_scale (layer ", l, ") must be float32, got ", type_name(s));
      const auto m = types[static_cast<size_t>(a.param_index(l, ParamRole::kACT_SMOOTH))];
      if (m != kF32) return msg("PiMoEExpertMLP: act_smooth (layer ", l, ") must be float32, got ", type_name(m));
    } else if (w != x_type) {
      return msg("PiMoEExpertMLP: layer ", l, " weight is ", type_name(w), " but x_sorted is ", type_name(x_type),
                 "; export weights in the activation dtype");
    }
    for (ParamRole r : {ParamRole::kBIAS, ParamRole::kLN_GAMMA, ParamRole::kLN_BETA}) {
      const int64_t index = a.param_index(l, r);
      if (index >= 0 && types[static_cast<size_t>(index)] != kF32)
        return msg("PiMoEExpertMLP: layer ", l, " bias/LayerNorm parameters must be float32, got ",
                   type_name(types[static_cast<size_t>(index)]));
    }
  }
  return {};
}

struct MLPIO {
  Input x, offsets;
  std::vector<Input> params;
  int64_t rows = 0, num_experts = 0;
  void* y = nullptr;
};

OrtStatusPtr expert_mlp_io(OrtKernelContext* ctx, const ExpertMLPAttrs& attrs, MLPIO* io) {
  size_t count = 0;
  PIMOE_RETURN_IF(g_api->KernelContext_GetInputCount(ctx, &count));
  PIMOE_RETURN_IF(get_input(ctx, 0, &io->x));
  PIMOE_RETURN_IF(get_input(ctx, 1, &io->offsets));
  if (auto e = require_type("PiMoEExpertMLP", "x_sorted", io->x.type, {kF32, kF16}); !e.empty()) return error(e);
  if (auto e = require_type("PiMoEExpertMLP", "offsets", io->offsets.type, {kI32}); !e.empty()) return error(e);
  io->params.resize(count >= 2 ? count - 2 : 0);
  std::vector<Dims> dims;
  std::vector<ONNXTensorElementDataType> types;
  for (size_t i = 0; i < io->params.size(); ++i) {
    PIMOE_RETURN_IF(get_input(ctx, i + 2, &io->params[i]));
    dims.push_back(io->params[i].dims);
    types.push_back(io->params[i].type);
  }
  if (auto e = check_expert_mlp(attrs, io->x.dims, io->offsets.dims, dims); !e.empty()) return error(e);
  if (auto e = check_param_types(attrs, types, io->x.type); !e.empty()) return error(e);
  io->rows = io->x.dims[0];
  io->num_experts = io->offsets.dims[0] - 1;
  return get_output(ctx, 0, {io->rows, attrs.widths.back()}, &io->y);
}

struct ExpertMLPKernel {
  static constexpr const char* kProvider = nullptr;
  ExpertMLPAttrs attrs;
  std::unique_ptr<cpu::ExpertMLP> packed;  // set when every parameter is a constant initializer

  // Pack the weights now if they are all constant initializers (the normal exported graph).
  OrtStatusPtr init(const OrtKernelInfo* info, ONNXTensorElementDataType x_type) {
    const ExpertMLPAttrs& a = attrs;
    size_t inputs = 0;
    PIMOE_RETURN_IF(g_api->KernelInfo_GetInputCount(info, &inputs));
    std::vector<Input> params(inputs >= 2 ? inputs - 2 : 0);
    bool all_constant = !params.empty();
    for (size_t i = 0; i < params.size() && all_constant; ++i) {
      int is_constant = 0;
      const OrtValue* value_ptr = nullptr;
      OrtStatus* s = g_api->KernelInfoGetConstantInput_tensor(info, i + 2, &is_constant, &value_ptr);
      if (s) {
        g_api->ReleaseStatus(s);
        all_constant = false;
      } else if (!is_constant || value_ptr == nullptr) {
        all_constant = false;
      } else {
        PIMOE_RETURN_IF(describe(value_ptr, &params[i]));
      }
    }
    if (!all_constant) return nullptr;
    std::vector<Dims> dims;
    std::vector<ONNXTensorElementDataType> types;
    for (const Input& p : params) {
      dims.push_back(p.dims);
      types.push_back(p.type);
    }
    // check shapes against a nominal x (rows unknown yet) and offsets for the largest expert id
    int64_t max_id = 0;
    for (int64_t id : a.expert_ids) max_id = id > max_id ? id : max_id;
    if (auto e = check_expert_mlp(a, {0, a.widths.front()}, {max_id + 2}, dims); !e.empty()) return error(e);
    if (auto e = check_param_types(a, types, x_type); !e.empty()) return error(e);
    std::vector<cpu::ExpertMLP::Param> raw;
    for (const Input& p : params) raw.push_back({p.data, to_dtype(p.type)});
    packed = std::make_unique<cpu::ExpertMLP>();
    if (auto e = packed->prepare(a, raw); !e.empty()) return error(e);
    return nullptr;
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* ctx) {
    MLPIO io;
    PIMOE_RETURN_IF(expert_mlp_io(ctx, attrs, &io));
    const cpu::ExpertMLP* mlp = packed.get();
    cpu::ExpertMLP local;
    if (mlp == nullptr) {  // weights are graph inputs: pack for this call only
      std::vector<cpu::ExpertMLP::Param> raw;
      for (const Input& p : io.params) raw.push_back({p.data, to_dtype(p.type)});
      if (auto e = local.prepare(attrs, raw); !e.empty()) return error(e);
      mlp = &local;
    }
    auto e = mlp->run(io.x.data, to_dtype(io.x.type), io.rows, static_cast<const int32_t*>(io.offsets.data),
                      io.num_experts, io.y, make_parallel(ctx));
    return e.empty() ? nullptr : error(e);
  }
};

template <ONNXTensorElementDataType T, class Kernel>
struct ExpertMLPOp : Ort::CustomOpBase<ExpertMLPOp<T, Kernel>, Kernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    AttrReader r{info, {}};
    auto k = std::make_unique<Kernel>();
    ExpertMLPAttrs& a = k->attrs;
    a.expert_ids = r.get_array<int64_t>(contract::kATTR_EXPERT_IDS, true);
    a.widths = r.get_array<int64_t>(contract::kATTR_WIDTHS, true);
    const std::string activation = r.get_string(contract::kATTR_ACTIVATION, "gelu");
    const int64_t layer_norm = r.get_int(contract::kATTR_LAYER_NORM, 1, false);
    a.eps = r.get_float(contract::kATTR_EPS, 1e-5f);
    const std::string quant = r.get_string(contract::kATTR_QUANT_MODE, "none");
    a.act_scales = r.get_array<float>(contract::kATTR_ACT_SCALES, false);
    const int64_t gated = r.get_int(contract::kATTR_GATED, 0, false);
    const int64_t bias = r.get_int(contract::kATTR_BIAS, 1, false);
    a.alpha = r.get_float(contract::kATTR_ALPHA, contract::kSWIGLU_OAI_ALPHA);
    a.limit = r.get_float(contract::kATTR_LIMIT, contract::kSWIGLU_OAI_LIMIT);
    if (!r.problem.empty()) return error(msg("PiMoEExpertMLP: ", r.problem));
    if (auto e = parse_flag("PiMoEExpertMLP", contract::kATTR_LAYER_NORM, layer_norm, &a.layer_norm); !e.empty())
      return error(e);
    if (auto e = parse_flag("PiMoEExpertMLP", contract::kATTR_GATED, gated, &a.gated); !e.empty()) return error(e);
    if (auto e = parse_flag("PiMoEExpertMLP", contract::kATTR_BIAS, bias, &a.bias); !e.empty()) return error(e);
    int32_t value = 0;
    if (!parse_enum(activation.c_str(), contract::kACTIVATION_NAMES, contract::kACTIVATION_COUNT, &value))
      return error(msg("PiMoEExpertMLP: unknown activation '", activation, "'; expected one of ",
                       enum_choices(contract::kACTIVATION_NAMES, contract::kACTIVATION_COUNT)));
    a.activation = static_cast<contract::Activation>(value);
    if (!parse_enum(quant.c_str(), contract::kQUANTMODE_NAMES, contract::kQUANTMODE_COUNT, &value))
      return error(msg("PiMoEExpertMLP: unknown quant_mode '", quant, "'; expected one of ",
                       enum_choices(contract::kQUANTMODE_NAMES, contract::kQUANTMODE_COUNT)));
    a.quant_mode = static_cast<contract::QuantMode>(value);
    if (auto e = validate_attrs(a); !e.empty()) return error(e);
    PIMOE_RETURN_IF(k->init(info, T));
    *kernel = k.release();
    return nullptr;
  }
  const char* GetName() const { return contract::kEXPERTMLP_NAME; }
  const char* GetExecutionProviderType() const { return Kernel::kProvider; }
  size_t GetInputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetInputType(size_t i) const { return i == 0 ? T : i == 1 ? kI32 : kAny; }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i == 2 ? INPUT_OUTPUT_VARIADIC : INPUT_OUTPUT_REQUIRED;
  }
  int GetVariadicInputMinArity() const { return 1; }  // one bias-free layer: its weight alone
  bool GetVariadicInputHomogeneity() const { return false; }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return T; }
};

#if PIMOE_ORT_CUDA
#include "pimoe_ort_cuda.inc"  // CUDA kernels: RouteCuda, DispatchCuda, CombineCuda, ExpertMLPCuda
#endif

// ------------------------------------------------------------------------------------------ registration
struct Registry {
  RouteOp<RouteKernel> route;
  DispatchOp<kF32, DispatchKernel> dispatch_f32;
  DispatchOp<kF16, DispatchKernel> dispatch_f16;
  CombineOp<kF32, CombineKernel> combine_f32;
  CombineOp<kF16, CombineKernel> combine_f16;
  ExpertMLPOp<kF32, ExpertMLPKernel> mlp_f32;
  ExpertMLPOp<kF16, ExpertMLPKernel> mlp_f16;
#if PIMOE_ORT_CUDA
  RouteOp<RouteCuda> route_cuda;
  DispatchOp<kF32, DispatchCuda> dispatch_f32_cuda;
  DispatchOp<kF16, DispatchCuda> dispatch_f16_cuda;
  CombineOp<kF32, CombineCuda> combine_f32_cuda;
  CombineOp<kF16, CombineCuda> combine_f16_cuda;
  ExpertMLPOp<kF32, ExpertMLPCuda> mlp_f32_cuda;
  ExpertMLPOp<kF16, ExpertMLPCuda> mlp_f16_cuda;
#endif
  std::mutex mutex;
  // One domain per registration. They must outlive every session that uses them, and ONNX Runtime may
  // already be torn down when this library's static destructors run, so they are deliberately never
  // released (a few hundred bytes per registered session options object).
  std::vector<OrtCustomOpDomain*> domains;
};

Registry& registry() {
  static Registry r;
  return r;
}

}  // namespace
}  // namespace ort
}  // namespace pimoe

using pimoe::ort::g_api;

PIMOE_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {
    // An ONNX Runtime older than the C API we are built against (ORT_API_VERSION). Return an error through the
    // oldest API (CreateStatus exists since API 1); some ORT versions drop a registration status without a word,
    // so the Python package also checks onnxruntime.__version__ before registering (runtime/ort.py).
    const OrtApi* oldest = api_base->GetApi(1);
    if (oldest == nullptr) return nullptr;
    const std::string text = std::string("libpimoe_ort needs ONNX Runtime with C API ") +
                             std::to_string(ORT_API_VERSION) + " (onnxruntime >= 1." +
                             std::to_string(ORT_API_VERSION) + "); this process has ONNX Runtime " +
                             api_base->GetVersionString() + ": upgrade onnxruntime";
    return oldest->CreateStatus(ORT_FAIL, text.c_str());
  }
  g_api = api;
  Ort::InitApi(api);
  auto& reg = pimoe::ort::registry();
  std::lock_guard<std::mutex> lock(reg.mutex);
  OrtCustomOpDomain* domain = nullptr;
  if (OrtStatus* s = api->CreateCustomOpDomain(pimoe::contract::kDOMAIN, &domain)) return s;
  OrtCustomOp* ops[] = {
#if !PIMOE_ORT_CUDA_EMU  // the emulated build registers only the CUDA kernels (for the CPU provider)
                        &reg.route, &reg.dispatch_f32, &reg.dispatch_f16, &reg.combine_f32,
                        &reg.combine_f16, &reg.mlp_f32, &reg.mlp_f16,
#endif
#if PIMOE_ORT_CUDA
                        &reg.route_cuda, &reg.dispatch_f32_cuda, &reg.dispatch_f16_cuda, &reg.combine_f32_cuda,
                        &reg.combine_f16_cuda, &reg.mlp_f32_cuda, &reg.mlp_f16_cuda,
#endif
  };
  for (OrtCustomOp* op : ops) {
    if (OrtStatus* s = api->CustomOpDomain_Add(domain, op)) {
      api->ReleaseCustomOpDomain(domain);
      return s;
    }
  }
  if (OrtStatus* s = api->AddCustomOpDomain(options, domain)) {
    api->ReleaseCustomOpDomain(domain);
    return s;
  }
  reg.domains.push_back(domain);
  return nullptr;
}

// Identification for the Python loader: op-contract version and the CPU ISA the kernels selected.
PIMOE_EXPORT int pimoe_ort_contract_version() { return pimoe::contract::kCONTRACT_VERSION; }
PIMOE_EXPORT const char* pimoe_ort_cpu_isa() { return pimoe::cpu::active_isa(); }
// The execution providers this build has kernels for (libpimoe_ort_cuda adds CUDAExecutionProvider).
PIMOE_EXPORT const char* pimoe_ort_providers() {
  return PIMOE_ORT_CUDA && !PIMOE_ORT_CUDA_EMU ? "CPUExecutionProvider,CUDAExecutionProvider" : "CPUExecutionProvider";
}
