// The I/O layer of the pimoe ONNX Runtime kernels: see pimoe_ort_io.h.
#include "pimoe_ort_io.h"

namespace pimoe {
namespace ort {

const OrtApi* g_registered_api = nullptr;

namespace {
thread_local const OrtApi* t_api = nullptr;
}  // namespace

const OrtApi* api() { return t_api != nullptr ? t_api : g_registered_api; }

ApiScope::ApiScope(const OrtApi* table) : mPrevious(t_api) { t_api = table; }
ApiScope::~ApiScope() { t_api = mPrevious; }

OrtStatusPtr error(const std::string& text) { return api()->CreateStatus(ORT_INVALID_ARGUMENT, text.c_str()); }

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

// ------------------------------------------------------------------------------------------ AttrReader
void AttrReader::set_problem(const std::string& text) {
  if (mProblem.empty()) mProblem = msg(mOp, ": ", text);
}

int64_t AttrReader::get_int(const char* name, int64_t fallback, bool required) {
  int64_t v = fallback;
  if (OrtStatus* s = api()->KernelInfoGetAttribute_int64(mInfo, name, &v)) {
    api()->ReleaseStatus(s);
    if (required) set_problem(msg("missing required int attribute '", name, "'"));
    return fallback;
  }
  return v;
}

void AttrReader::flag(const char* name, bool& member) {
  const int64_t value = get_int(name, member ? 1 : 0, false);
  if (auto e = parse_flag(mOp, name, value, &member); !e.empty() && mProblem.empty()) mProblem = e;
}

void AttrReader::real(const char* name, float& member) {
  float v = member;
  if (OrtStatus* s = api()->KernelInfoGetAttribute_float(mInfo, name, &v)) {
    api()->ReleaseStatus(s);
    return;
  }
  member = v;
}

namespace {

template <typename T>
bool get_array(const OrtKernelInfo* info, const char* name, std::vector<T>* out) {
  size_t size = 0;
  OrtStatus* s;
  if constexpr (std::is_same_v<T, float>)
    s = api()->KernelInfoGetAttributeArray_float(info, name, nullptr, &size);
  else
    s = api()->KernelInfoGetAttributeArray_int64(info, name, nullptr, &size);
  if (s) {
    api()->ReleaseStatus(s);
    return false;
  }
  out->assign(size, T{});
  if (size == 0) return true;
  if constexpr (std::is_same_v<T, float>)
    s = api()->KernelInfoGetAttributeArray_float(info, name, out->data(), &size);
  else
    s = api()->KernelInfoGetAttributeArray_int64(info, name, out->data(), &size);
  if (s) api()->ReleaseStatus(s);
  return true;
}

bool get_string(const OrtKernelInfo* info, const char* name, std::string* out) {
  size_t size = 0;
  OrtStatus* s = api()->KernelInfoGetAttribute_string(info, name, nullptr, &size);
  if (s) {
    api()->ReleaseStatus(s);
    return false;
  }
  out->assign(size, '\0');
  s = api()->KernelInfoGetAttribute_string(info, name, out->data(), &size);
  if (s) {
    api()->ReleaseStatus(s);
    return false;
  }
  if (!out->empty() && out->back() == '\0') out->pop_back();
  return true;
}

}  // namespace

void AttrReader::integers(const char* name, std::vector<int64_t>& member, Need need) {
  if (!get_array(mInfo, name, &member) && need == Need::kREQUIRED)
    set_problem(msg("missing required list attribute '", name, "'"));
}

void AttrReader::reals(const char* name, std::vector<float>& member) { get_array(mInfo, name, &member); }

bool AttrReader::read_choice(const char* name, const char* const* names, int32_t count, int32_t* value) {
  std::string text;
  if (!get_string(mInfo, name, &text)) return false;
  if (!parse_enum(text.c_str(), names, count, value)) {
    set_problem(msg("unknown ", name, " '", text, "'; expected one of ", enum_choices(names, count)));
    return false;
  }
  return true;
}

// ------------------------------------------------------------------------------------------ tensors
OrtStatusPtr describe(const OrtValue* value, Input* in) {
  in->value = value;
  if (value == nullptr) return nullptr;
  OrtTensorTypeAndShapeInfo* info = nullptr;
  PIMOE_RETURN_IF(api()->GetTensorTypeAndShape(value, &info));
  size_t rank = 0;
  OrtStatus* s = api()->GetTensorElementType(info, &in->type);
  if (!s) s = api()->GetDimensionsCount(info, &rank);
  if (!s) {
    in->dims.resize(rank);
    s = api()->GetDimensions(info, in->dims.data(), rank);
  }
  api()->ReleaseTensorTypeAndShapeInfo(info);
  if (s) return s;
  void* data = nullptr;
  PIMOE_RETURN_IF(api()->GetTensorMutableData(const_cast<OrtValue*>(value), &data));
  in->data = data;
  return nullptr;
}

OrtStatusPtr get_input(OrtKernelContext* ctx, size_t index, Input* in) {
  const OrtValue* value = nullptr;
  if (OrtStatus* s = api()->KernelContext_GetInput(ctx, index, &value)) return s;
  return describe(value, in);
}

OrtStatusPtr get_output(OrtKernelContext* ctx, size_t index, const Dims& dims, void** data) {
  OrtValue* value = nullptr;
  if (OrtStatus* s = api()->KernelContext_GetOutput(ctx, index, dims.data(), dims.size(), &value)) return s;
  return api()->GetTensorMutableData(value, data);
}

std::string require_type(const char* op, const char* what, ONNXTensorElementDataType got,
                         std::initializer_list<ONNXTensorElementDataType> allowed) {
  for (auto t : allowed)
    if (t == got) return {};
  std::string names;
  for (auto t : allowed) names += (names.empty() ? "" : " or ") + std::string(type_name(t));
  return msg(op, ": ", what, " must be ", names, ", got ", type_name(got));
}

// ------------------------------------------------------------------------------------------ per-op I/O
OrtStatusPtr route_io(OrtKernelContext* ctx, const RouteAttrs& attrs, RouteIO* io) {
  PIMOE_RETURN_IF(get_input(ctx, 0, &io->logits));
  size_t count = 0;
  PIMOE_RETURN_IF(api()->KernelContext_GetInputCount(ctx, &count));
  if (count > 1) PIMOE_RETURN_IF(get_input(ctx, 1, &io->bias));
  if (auto e = require_type(contract::kROUTE_NAME, "logits", io->logits.type, {kF32, kF16}); !e.empty())
    return error(e);
  if (io->bias.value) {
    if (auto e = require_type(contract::kROUTE_NAME, "selection_bias", io->bias.type, {kF32}); !e.empty())
      return error(e);
  }
  if (auto e = check_route(attrs, io->logits.dims, io->bias.value ? &io->bias.dims : nullptr); !e.empty())
    return error(e);
  io->n = io->logits.dims[0];
  io->experts = io->logits.dims[1];
  PIMOE_RETURN_IF(get_output(ctx, 0, {io->n, attrs.k}, &io->weights));
  return get_output(ctx, 1, {io->n, attrs.k}, &io->ids);
}

OrtStatusPtr dispatch_io(OrtKernelContext* ctx, const DispatchAttrs& attrs, DispatchIO* io) {
  PIMOE_RETURN_IF(get_input(ctx, 0, &io->x));
  PIMOE_RETURN_IF(get_input(ctx, 1, &io->ids));
  if (auto e = require_type(contract::kDISPATCH_NAME, "x", io->x.type, {kF32, kF16}); !e.empty()) return error(e);
  if (auto e = require_type(contract::kDISPATCH_NAME, "ids", io->ids.type, {kI32}); !e.empty()) return error(e);
  if (auto e = check_dispatch(attrs, io->x.dims, io->ids.dims); !e.empty()) return error(e);
  io->n = io->x.dims[0];
  io->h = io->x.dims[1];
  io->k = io->ids.dims[1];
  PIMOE_RETURN_IF(get_output(ctx, 0, {io->n * io->k, io->h}, &io->x_sorted));
  PIMOE_RETURN_IF(get_output(ctx, 1, {attrs.num_experts + 1}, &io->offsets));
  return get_output(ctx, 2, {io->n * io->k}, &io->f2s);
}

OrtStatusPtr combine_io(OrtKernelContext* ctx, CombineIO* io) {
  PIMOE_RETURN_IF(get_input(ctx, 0, &io->y_sorted));
  PIMOE_RETURN_IF(get_input(ctx, 1, &io->f2s));
  PIMOE_RETURN_IF(get_input(ctx, 2, &io->weights));
  if (auto e = require_type(contract::kCOMBINE_NAME, "y_sorted", io->y_sorted.type, {kF32, kF16}); !e.empty())
    return error(e);
  if (auto e = require_type(contract::kCOMBINE_NAME, "flat_to_sorted", io->f2s.type, {kI32}); !e.empty())
    return error(e);
  if (auto e = require_type(contract::kCOMBINE_NAME, "weights", io->weights.type, {kF32}); !e.empty()) return error(e);
  if (auto e = check_combine(io->y_sorted.dims, io->f2s.dims, io->weights.dims); !e.empty()) return error(e);
  io->n = io->weights.dims[0];
  io->k = io->weights.dims[1];
  io->h = io->y_sorted.dims[1];
  return get_output(ctx, 0, {io->n, io->h}, &io->y);
}

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

OrtStatusPtr expert_mlp_io(OrtKernelContext* ctx, const ExpertMLPAttrs& attrs, MLPIO* io,
                           const ConstantParams* constant) {
  size_t count = 0;
  PIMOE_RETURN_IF(api()->KernelContext_GetInputCount(ctx, &count));
  PIMOE_RETURN_IF(get_input(ctx, 0, &io->x));
  PIMOE_RETURN_IF(get_input(ctx, 1, &io->offsets));
  if (auto e = require_type(contract::kEXPERTMLP_NAME, "x_sorted", io->x.type, {kF32, kF16}); !e.empty())
    return error(e);
  if (auto e = require_type(contract::kEXPERTMLP_NAME, "offsets", io->offsets.type, {kI32}); !e.empty())
    return error(e);
  std::vector<Dims> dims;
  std::vector<ONNXTensorElementDataType> types;
  if (constant == nullptr) {
    io->params.resize(count >= 2 ? count - 2 : 0);
    for (size_t i = 0; i < io->params.size(); ++i) {
      PIMOE_RETURN_IF(get_input(ctx, i + 2, &io->params[i]));
      dims.push_back(io->params[i].dims);
      types.push_back(io->params[i].type);
    }
  }
  const std::vector<Dims>& param_dims = constant != nullptr ? constant->dims : dims;
  const std::vector<ONNXTensorElementDataType>& param_types = constant != nullptr ? constant->types : types;
  if (auto e = check_expert_mlp(attrs, io->x.dims, io->offsets.dims, param_dims); !e.empty()) return error(e);
  if (auto e = check_param_types(attrs, param_types, io->x.type); !e.empty()) return error(e);
  io->rows = io->x.dims[0];
  io->num_experts = io->offsets.dims[0] - 1;
  return get_output(ctx, 0, {io->rows, attrs.widths.back()}, &io->y);
}

}  // namespace ort
}  // namespace pimoe
