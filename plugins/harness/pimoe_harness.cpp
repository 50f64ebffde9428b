// libpimoe_trt_harness.so / libpimoe_trt_harness_emu.so: see pimoe_harness.h. Links the plugin objects (not
// libnvinfer): everything TensorRT would provide to a plugin is provided here: field collections, tensor
// descriptions for an optimisation profile, an IExprBuilder with symbolic dimensions, device pointers, a workspace
// sized at build time and a stream.
#include "pimoe_harness.h"

#include <cuda_runtime_api.h>
#include <dlfcn.h>

#include <deque>
#include <memory>
#include <string>
#include <unordered_set>
#include <vector>

#include "pimoeCreators.h"
#include "pimoePlugin.h"
#include "pimoe_contract.h"

#define PIMOE_HARNESS_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

using namespace nvinfer1;
using pimoe::msg;

thread_local std::string t_error;

int error(const std::string& text) noexcept {
  try {
    t_error = text;
  } catch (...) {
  }
  return -1;
}

// the plugin's own message when it has one, else `what`
int plugin_error(const char* what) noexcept {
  const char* detail = pimoe::trt::last_error();
  try {
    return error(detail != nullptr && detail[0] != '\0' ? std::string(detail) : std::string(what));
  } catch (...) {
    return -1;
  }
}

// ------------------------------------------------------------------------------------------ IExprBuilder
// TensorRT's IExprBuilder/IDimensionExpr forward to implementation interfaces (apiv::VExprBuilder,
// apiv::VDimensionExpr). A node here is a constant, a run-time input dimension (one that differs between the
// profile's min and max: symbolic, as TensorRT hands it to getOutputShapes) or an operation on two nodes. Operations
// on constants fold to constants, as in TensorRT. The output expressions are evaluated for every run shape.
class Node final : public apiv::VDimensionExpr {
 public:
  enum class Kind { kCONSTANT, kINPUT, kOPERATION };
  static Node constant(int64_t value) { return Node(Kind::kCONSTANT, value, -1, -1, DimensionOperation::kSUM, nullptr, nullptr); }
  static Node input(int32_t tensor, int32_t dim) {
    return Node(Kind::kINPUT, 0, tensor, dim, DimensionOperation::kSUM, nullptr, nullptr);
  }
  static Node operation(DimensionOperation op, const Node* a, const Node* b) {
    return Node(Kind::kOPERATION, 0, -1, -1, op, a, b);
  }
  bool isConstant() const override { return mKind == Kind::kCONSTANT; }
  int64_t getConstantValue() const override { return mKind == Kind::kCONSTANT ? mValue : -1; }
  bool isSizeTensor() const override { return false; }

  // Value for the given input shapes; false when an operation is undefined (division by zero) or out of range.
  bool evaluate(const std::vector<Dims64>& shapes, int64_t* out) const {
    switch (mKind) {
      case Kind::kCONSTANT: *out = mValue; return true;
      case Kind::kINPUT:
        if (mTensor < 0 || static_cast<size_t>(mTensor) >= shapes.size() || mDim >= shapes[static_cast<size_t>(mTensor)].nbDims)
          return false;
        *out = shapes[static_cast<size_t>(mTensor)].d[mDim];
        return true;
      case Kind::kOPERATION: {
        int64_t a = 0, b = 0;
        return mA->evaluate(shapes, &a) && mB->evaluate(shapes, &b) && apply(mOp, a, b, out);
      }
    }
    return false;
  }

  static bool apply(DimensionOperation op, int64_t a, int64_t b, int64_t* out) {
    switch (op) {
      case DimensionOperation::kSUM: *out = a + b; return true;
      case DimensionOperation::kPROD: *out = a * b; return true;
      case DimensionOperation::kMAX: *out = a > b ? a : b; return true;
      case DimensionOperation::kMIN: *out = a < b ? a : b; return true;
      case DimensionOperation::kSUB: *out = a - b; return true;
      case DimensionOperation::kEQUAL: *out = a == b ? 1 : 0; return true;
      case DimensionOperation::kLESS: *out = a < b ? 1 : 0; return true;
      case DimensionOperation::kFLOOR_DIV: {
        if (b == 0) return false;
        int64_t q = a / b;
        if ((a % b != 0) && ((a < 0) != (b < 0))) --q;
        *out = q;
        return true;
      }
      case DimensionOperation::kCEIL_DIV: {
        if (b == 0) return false;
        int64_t q = a / b;
        if ((a % b != 0) && ((a < 0) == (b < 0))) ++q;
        *out = q;
        return true;
      }
    }
    return false;
  }

 private:
  Node(Kind kind, int64_t value, int32_t tensor, int32_t dim, DimensionOperation op, const Node* a, const Node* b)
      : mKind(kind), mValue(value), mTensor(tensor), mDim(dim), mOp(op), mA(a), mB(b) {}
  Kind mKind;
  int64_t mValue;
  int32_t mTensor, mDim;
  DimensionOperation mOp;
  const Node* mA;
  const Node* mB;
};

class Expr final : public IDimensionExpr {
 public:
  explicit Expr(const Node& node) : mNode(node) { mImpl = &mNode; }
  ~Expr() noexcept override = default;
  const Node& node() const { return mNode; }

 private:
  Node mNode;
};

class BuilderImpl final : public apiv::VExprBuilder {
 public:
  const IDimensionExpr* constant(int64_t value) override { return add(Node::constant(value)); }
  const IDimensionExpr* operation(DimensionOperation op, const IDimensionExpr& first,
                                  const IDimensionExpr& second) override {
    const Expr* a = find(&first);
    const Expr* b = find(&second);
    if (a == nullptr || b == nullptr) return nullptr;  // not an expression of this builder
    int64_t folded = 0;
    if (first.isConstant() && second.isConstant() &&
        Node::apply(op, first.getConstantValue(), second.getConstantValue(), &folded))
      return constant(folded);
    return add(Node::operation(op, &a->node(), &b->node()));
  }
  const IDimensionExpr* declareSizeTensor(int32_t, const IDimensionExpr&, const IDimensionExpr&) override {
    return nullptr;  // our plugins have no data-dependent shapes
  }
  const IDimensionExpr* input(int32_t tensor, int32_t dim) { return add(Node::input(tensor, dim)); }
  // The expression object behind `e` when this builder made it (plugins must only return those).
  const Expr* find(const IDimensionExpr* e) const {
    return e != nullptr && mKnown.count(e) != 0 ? static_cast<const Expr*>(e) : nullptr;
  }

 private:
  const IDimensionExpr* add(const Node& node) {
    try {
      mExprs.emplace_back(std::make_unique<Expr>(node));
      mKnown.insert(mExprs.back().get());
      return mExprs.back().get();
    } catch (...) {
      return nullptr;
    }
  }
  std::deque<std::unique_ptr<Expr>> mExprs;
  std::unordered_set<const IDimensionExpr*> mKnown;
};

class ExprBuilder final : public IExprBuilder {
 public:
  ExprBuilder() { mImpl = &mBuilder; }
  ~ExprBuilder() noexcept override = default;
  BuilderImpl& impl() { return mBuilder; }

 private:
  BuilderImpl mBuilder;
};

// ------------------------------------------------------------------------------------------ helpers
struct PluginDeleter {
  void operator()(IPluginV3* p) const noexcept { delete p; }
};
using PluginPtr = std::unique_ptr<IPluginV3, PluginDeleter>;

Dims64 to_trt_dims(const PimoeTensorDesc& d) {
  Dims64 out{};
  out.nbDims = d.rank;
  for (int32_t i = 0; i < d.rank && i < Dims64::MAX_DIMS; ++i) out.d[i] = d.dims[i];
  return out;
}

PluginTensorDesc make_desc(const Dims64& dims, DataType type) {
  PluginTensorDesc out{};
  out.dims = dims;
  out.type = type;
  out.format = TensorFormat::kLINEAR;
  out.scale = -1.0f;
  return out;
}

std::string dims_text(const Dims64& d) {
  std::string s = "[";
  for (int32_t i = 0; i < d.nbDims; ++i) s += (i ? ", " : "") + std::to_string(d.d[i]);
  return s + "]";
}

}  // namespace

struct PimoeHarnessPlugin {
  PluginPtr build;
  PluginPtr runtime;
  ExprBuilder exprs;                        // owns the output expressions
  std::vector<DataType> in_types, out_types;
  std::vector<Dims64> in_min, in_max;       // the profile
  std::vector<std::vector<const Expr*>> out_exprs;
  std::vector<PluginTensorDesc> inputs;     // current run shapes (after set_input_shapes)
  std::vector<PluginTensorDesc> outputs;
  bool shaped = false;
  size_t workspace = 0;
};

namespace {

// Output dims of `h` for the given input dims; "" or the problem.
std::string evaluate_outputs(const PimoeHarnessPlugin& h, const std::vector<Dims64>& in, std::vector<Dims64>* out) {
  out->clear();
  for (size_t o = 0; o < h.out_exprs.size(); ++o) {
    Dims64 d{};
    d.nbDims = static_cast<int32_t>(h.out_exprs[o].size());
    for (size_t j = 0; j < h.out_exprs[o].size(); ++j) {
      int64_t v = 0;
      if (!h.out_exprs[o][j]->node().evaluate(in, &v) || v < 0)
        return msg("output ", o, " dimension ", j, " evaluates to no valid size for inputs ", in.empty() ? "" : dims_text(in[0]));
      d.d[j] = v;
    }
    out->push_back(d);
  }
  return {};
}

int check_profile(const PimoeTensorDesc* min, const PimoeTensorDesc* opt, const PimoeTensorDesc* max, int32_t n) {
  for (int32_t i = 0; i < n; ++i) {
    if (min[i].rank < 0 || min[i].rank > 8) return error(msg("input ", i, ": rank must be 0..8"));
    if (opt[i].rank != min[i].rank || max[i].rank != min[i].rank || opt[i].dtype != min[i].dtype ||
        max[i].dtype != min[i].dtype)
      return error(msg("input ", i, ": min, opt and max must have the same rank and dtype"));
    for (int32_t j = 0; j < min[i].rank; ++j)
      if (min[i].dims[j] < 0 || min[i].dims[j] > opt[i].dims[j] || opt[i].dims[j] > max[i].dims[j])
        return error(msg("input ", i, " dimension ", j, ": the profile needs 0 <= min <= opt <= max, got ",
                         min[i].dims[j], ", ", opt[i].dims[j], ", ", max[i].dims[j]));
  }
  return 0;
}

int build_plugin(const char* op, const PimoeField* fields, int32_t nb_fields, const PimoeTensorDesc* min,
                 const PimoeTensorDesc* opt, const PimoeTensorDesc* max, int32_t nb_inputs, PimoeHarnessPlugin* h) {
  IPluginCreatorV3One* creator = pimoe::trt::find_creator(op);
  if (creator == nullptr) return error(msg("no pimoe plugin creator named '", op ? op : "(null)", "'"));
  std::vector<PluginField> field_list;
  for (int32_t i = 0; i < nb_fields; ++i)
    field_list.emplace_back(fields[i].name, fields[i].data, static_cast<PluginFieldType>(fields[i].type),
                            fields[i].length);
  PluginFieldCollection fc{static_cast<int32_t>(field_list.size()), field_list.data()};
  h->build.reset(creator->createPlugin("harness", &fc, TensorRTPhase::kBUILD));
  if (!h->build) return plugin_error("createPlugin(kBUILD) returned null");
  auto* core = static_cast<IPluginV3OneCore*>(h->build->getCapabilityInterface(PluginCapabilityType::kCORE));
  auto* build = static_cast<IPluginV3OneBuild*>(h->build->getCapabilityInterface(PluginCapabilityType::kBUILD));
  if (core == nullptr || build == nullptr) return error("plugin lacks the CORE/BUILD capability");
  if (std::string(core->getPluginName()) != op || std::string(core->getPluginVersion()) != "1")
    return error("plugin reports another name or version than its creator");

  for (int32_t i = 0; i < nb_inputs; ++i) {
    h->in_types.push_back(static_cast<DataType>(min[i].dtype));
    h->in_min.push_back(to_trt_dims(min[i]));
    h->in_max.push_back(to_trt_dims(max[i]));
  }
  const int32_t nb_outputs = build->getNbOutputs();
  if (nb_outputs < 1 || nb_outputs > 8) return error("plugin reports a bad number of outputs");
  h->out_types.assign(static_cast<size_t>(nb_outputs), DataType::kFLOAT);
  if (build->getOutputDataTypes(h->out_types.data(), nb_outputs, h->in_types.data(), nb_inputs) != 0)
    return plugin_error("getOutputDataTypes failed");

  // input dimension expressions: constants where the profile fixes the size, symbolic where it varies
  BuilderImpl& exprs = h->exprs.impl();
  std::vector<DimsExprs> in_exprs(static_cast<size_t>(nb_inputs)), out_exprs(static_cast<size_t>(nb_outputs));
  for (int32_t i = 0; i < nb_inputs; ++i) {
    DimsExprs& e = in_exprs[static_cast<size_t>(i)];
    e.nbDims = min[i].rank;
    for (int32_t j = 0; j < e.nbDims; ++j)
      e.d[j] = min[i].dims[j] == max[i].dims[j] ? exprs.constant(min[i].dims[j]) : exprs.input(i, j);
  }
  if (build->getOutputShapes(in_exprs.data(), nb_inputs, nullptr, 0, out_exprs.data(), nb_outputs, h->exprs) != 0)
    return plugin_error("getOutputShapes failed");
  for (int32_t o = 0; o < nb_outputs; ++o) {
    const DimsExprs& e = out_exprs[static_cast<size_t>(o)];
    if (e.nbDims < 0 || e.nbDims > 8) return error(msg("output ", o, ": bad rank ", e.nbDims));
    std::vector<const Expr*> dims;
    for (int32_t j = 0; j < e.nbDims; ++j) {
      const Expr* x = exprs.find(e.d[j]);
      if (x == nullptr) return error(msg("output ", o, ": dimension ", j, " is not an expression of the builder"));
      dims.push_back(x);
    }
    h->out_exprs.push_back(dims);
  }

  // the profile's input and output descriptions, as the builder passes them (desc.dims -1 where dynamic)
  std::vector<Dims64> mins, opts, maxs, out_min, out_opt, out_max;
  for (int32_t i = 0; i < nb_inputs; ++i) {
    mins.push_back(to_trt_dims(min[i]));
    opts.push_back(to_trt_dims(opt[i]));
    maxs.push_back(to_trt_dims(max[i]));
  }
  for (const auto& pair : {std::make_pair(&mins, &out_min), std::make_pair(&opts, &out_opt), std::make_pair(&maxs, &out_max)})
    if (auto problem = evaluate_outputs(*h, *pair.first, pair.second); !problem.empty()) return error(problem);
  auto dynamic = [](const Dims64& lo, const Dims64& mid, const Dims64& hi, DataType type) {
    DynamicPluginTensorDesc d{};
    Dims64 dims = lo;
    for (int32_t j = 0; j < dims.nbDims; ++j)
      if (lo.d[j] != hi.d[j]) dims.d[j] = -1;
    d.desc = make_desc(dims, type);
    d.min = lo;
    d.opt = mid;
    d.max = hi;
    return d;
  };
  std::vector<DynamicPluginTensorDesc> io;
  for (int32_t i = 0; i < nb_inputs; ++i)
    io.push_back(dynamic(mins[static_cast<size_t>(i)], opts[static_cast<size_t>(i)], maxs[static_cast<size_t>(i)],
                         h->in_types[static_cast<size_t>(i)]));
  for (int32_t o = 0; o < nb_outputs; ++o)
    io.push_back(dynamic(out_min[static_cast<size_t>(o)], out_opt[static_cast<size_t>(o)],
                         out_max[static_cast<size_t>(o)], h->out_types[static_cast<size_t>(o)]));

  // formats: every position must accept the (linear) types derived above, as TensorRT would ask
  for (int32_t pos = 0; pos < nb_inputs + nb_outputs; ++pos)
    if (!build->supportsFormatCombination(pos, io.data(), nb_inputs, nb_outputs)) {
      // TensorRT would only say that no format combination fits; the plugin's own checks say why
      pimoe::trt::clear_last_error();
      const bool configured = build->configurePlugin(io.data(), nb_inputs, io.data() + nb_inputs, nb_outputs) == 0;
      const std::string detail = configured ? std::string() : std::string(pimoe::trt::last_error());
      const PluginTensorDesc& d = io[static_cast<size_t>(pos)].desc;
      return error(msg(op, ": supportsFormatCombination rejects position ", pos, " (",
                       pos < nb_inputs ? "input " : "output ", pos < nb_inputs ? pos : pos - nb_inputs, ", ",
                       pimoe::trt::dtype_name(d.type), ")", detail.empty() ? "" : ": ", detail));
    }
  if (build->configurePlugin(io.data(), nb_inputs, io.data() + nb_inputs, nb_outputs) != 0)
    return plugin_error("configurePlugin failed");
  h->workspace = build->getWorkspaceSize(io.data(), nb_inputs, io.data() + nb_inputs, nb_outputs);

  // serialise -> deserialise -> runtime plugin, as an engine would
  auto* build_runtime =
      static_cast<IPluginV3OneRuntime*>(h->build->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
  if (build_runtime == nullptr) return error("plugin lacks the RUNTIME capability");
  const PluginFieldCollection* serialized = build_runtime->getFieldsToSerialize();
  if (serialized == nullptr) return plugin_error("getFieldsToSerialize failed");
  PluginPtr deserialized(creator->createPlugin("harness", serialized, TensorRTPhase::kRUNTIME));
  if (!deserialized) return plugin_error("createPlugin(kRUNTIME) from the serialised fields returned null");
  auto* runtime =
      static_cast<IPluginV3OneRuntime*>(deserialized->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
  if (runtime == nullptr) return error("plugin lacks the RUNTIME capability");
  h->runtime.reset(runtime->attachToContext(nullptr));
  if (!h->runtime) return plugin_error("attachToContext returned null");
  // before the first run shape, the outputs read -1 where they depend on it (like desc.dims above)
  for (int32_t o = 0; o < nb_outputs; ++o) h->outputs.push_back(io[static_cast<size_t>(nb_inputs + o)].desc);
  for (int32_t i = 0; i < nb_inputs; ++i) h->inputs.push_back(io[static_cast<size_t>(i)].desc);
  return 0;
}

int set_shapes(PimoeHarnessPlugin* h, const PimoeTensorDesc* inputs, int32_t nb_inputs) {
  pimoe::trt::clear_last_error();
  if (h == nullptr || !h->runtime || (nb_inputs > 0 && inputs == nullptr))
    return error("pimoe_harness_set_input_shapes: bad arguments");
  if (static_cast<size_t>(nb_inputs) != h->in_types.size())
    return error(msg("pimoe_harness_set_input_shapes: the plugin was built for ", h->in_types.size(), " inputs, got ",
                     nb_inputs));
  std::vector<Dims64> dims;
  for (int32_t i = 0; i < nb_inputs; ++i) {
    const Dims64 d = to_trt_dims(inputs[i]);
    const Dims64& lo = h->in_min[static_cast<size_t>(i)];
    const Dims64& hi = h->in_max[static_cast<size_t>(i)];
    if (static_cast<DataType>(inputs[i].dtype) != h->in_types[static_cast<size_t>(i)] || d.nbDims != lo.nbDims)
      return error(msg("input ", i, ": dtype or rank differs from the built profile"));
    for (int32_t j = 0; j < d.nbDims; ++j)
      if (d.d[j] < lo.d[j] || d.d[j] > hi.d[j])  // TensorRT refuses shapes outside the profile
        return error(msg("input ", i, " shape ", dims_text(d), " is outside the profile ", dims_text(lo), " .. ",
                         dims_text(hi)));
    dims.push_back(d);
  }
  std::vector<Dims64> out_dims;
  if (auto problem = evaluate_outputs(*h, dims, &out_dims); !problem.empty()) return error(problem);
  std::vector<PluginTensorDesc> in_desc, out_desc;
  for (int32_t i = 0; i < nb_inputs; ++i) in_desc.push_back(make_desc(dims[static_cast<size_t>(i)], h->in_types[static_cast<size_t>(i)]));
  for (size_t o = 0; o < out_dims.size(); ++o) out_desc.push_back(make_desc(out_dims[o], h->out_types[o]));
  auto* attached = static_cast<IPluginV3OneRuntime*>(h->runtime->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
  if (attached == nullptr) return error("attached plugin lacks the RUNTIME capability");
  h->shaped = false;
  if (attached->onShapeChange(in_desc.data(), nb_inputs, out_desc.data(), static_cast<int32_t>(out_desc.size())) != 0)
    return plugin_error("onShapeChange failed");
  h->inputs = std::move(in_desc);
  h->outputs = std::move(out_desc);
  h->shaped = true;
  return 0;
}

int prepare_profile(const char* op, const PimoeField* fields, int32_t nb_fields, const PimoeTensorDesc* min,
                    const PimoeTensorDesc* opt, const PimoeTensorDesc* max, int32_t nb_inputs,
                    PimoeHarnessPlugin** out) {
  pimoe::trt::clear_last_error();
  if (out == nullptr) return error("pimoe_harness_prepare_profile: out is null");
  *out = nullptr;
  if (nb_inputs < 0 || nb_inputs > 64 || (nb_inputs > 0 && (min == nullptr || opt == nullptr || max == nullptr)) ||
      nb_fields < 0 || (nb_fields > 0 && fields == nullptr))
    return error("pimoe_harness_prepare_profile: bad argument counts");
  if (check_profile(min, opt, max, nb_inputs) != 0) return -1;
  auto h = std::make_unique<PimoeHarnessPlugin>();
  if (build_plugin(op, fields, nb_fields, min, opt, max, nb_inputs, h.get()) != 0) return -1;
  *out = h.release();
  return 0;
}

}  // namespace

PIMOE_HARNESS_EXPORT int pimoe_harness_contract_version(void) { return pimoe::contract::kCONTRACT_VERSION; }

PIMOE_HARNESS_EXPORT int pimoe_harness_is_emulated(void) {
#ifdef __CUDA_EMU__
  return 1;
#else
  return 0;
#endif
}

PIMOE_HARNESS_EXPORT const char* pimoe_harness_last_error(void) { return t_error.c_str(); }

PIMOE_HARNESS_EXPORT int pimoe_harness_prepare_profile(const char* op, const PimoeField* fields, int32_t nb_fields,
                                                       const PimoeTensorDesc* min, const PimoeTensorDesc* opt,
                                                       const PimoeTensorDesc* max, int32_t nb_inputs,
                                                       PimoeHarnessPlugin** out) {
  try {
    return prepare_profile(op, fields, nb_fields, min, opt, max, nb_inputs, out);
  } catch (...) {
    return error("pimoe_harness_prepare_profile: out of host memory");
  }
}

PIMOE_HARNESS_EXPORT int pimoe_harness_prepare(const char* op, const PimoeField* fields, int32_t nb_fields,
                                               const PimoeTensorDesc* inputs, int32_t nb_inputs,
                                               PimoeHarnessPlugin** out) {
  try {
    if (prepare_profile(op, fields, nb_fields, inputs, inputs, inputs, nb_inputs, out) != 0) return -1;
    if (set_shapes(*out, inputs, nb_inputs) != 0) {
      delete *out;
      *out = nullptr;
      return -1;
    }
    return 0;
  } catch (...) {
    return error("pimoe_harness_prepare: out of host memory");
  }
}

PIMOE_HARNESS_EXPORT int pimoe_harness_set_input_shapes(PimoeHarnessPlugin* plugin, const PimoeTensorDesc* inputs,
                                                        int32_t nb_inputs) {
  try {
    return set_shapes(plugin, inputs, nb_inputs);
  } catch (...) {
    return error("pimoe_harness_set_input_shapes: out of host memory");
  }
}

PIMOE_HARNESS_EXPORT int pimoe_harness_num_outputs(const PimoeHarnessPlugin* plugin) {
  return plugin == nullptr ? -1 : static_cast<int>(plugin->outputs.size());
}

PIMOE_HARNESS_EXPORT int pimoe_harness_output_desc(const PimoeHarnessPlugin* plugin, int32_t index,
                                                   PimoeTensorDesc* desc) {
  if (plugin == nullptr || desc == nullptr || index < 0 || static_cast<size_t>(index) >= plugin->outputs.size())
    return error("pimoe_harness_output_desc: bad arguments");
  const PluginTensorDesc& d = plugin->outputs[static_cast<size_t>(index)];
  desc->dtype = static_cast<int32_t>(d.type);
  desc->rank = d.dims.nbDims;
  for (int32_t i = 0; i < 8; ++i) desc->dims[i] = i < d.dims.nbDims ? d.dims.d[i] : 0;
  return 0;
}

PIMOE_HARNESS_EXPORT size_t pimoe_harness_workspace_size(const PimoeHarnessPlugin* plugin) {
  return plugin == nullptr ? 0 : plugin->workspace;
}

PIMOE_HARNESS_EXPORT int pimoe_harness_enqueue(PimoeHarnessPlugin* plugin, const void* const* inputs,
                                               void* const* outputs, void* workspace, void* stream) {
  // no allocation on the success path: pimoe_harness_enqueue_counting_allocations counts this whole function
  pimoe::trt::clear_last_error();
  if (plugin == nullptr || !plugin->runtime || inputs == nullptr || outputs == nullptr)
    return error("pimoe_harness_enqueue: bad arguments");
  if (!plugin->shaped) return error("pimoe_harness_enqueue: no run shapes set (pimoe_harness_set_input_shapes)");
  auto* runtime =
      static_cast<IPluginV3OneRuntime*>(plugin->runtime->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
  if (runtime == nullptr) return error("plugin lacks the RUNTIME capability");
  if (runtime->enqueue(plugin->inputs.data(), plugin->outputs.data(), inputs, outputs, workspace,
                       static_cast<cudaStream_t>(stream)) != 0)
    return plugin_error("enqueue failed");
  return 0;
}

PIMOE_HARNESS_EXPORT int pimoe_harness_check_status(PimoeHarnessPlugin* plugin, void* stream) {
  pimoe::trt::clear_last_error();
  if (plugin == nullptr || !plugin->runtime) return error("pimoe_harness_check_status: no plugin");
  // every runtime plugin of this library is a PluginBase (Plugin<Op>)
  auto* base = static_cast<pimoe::trt::PluginBase*>(plugin->runtime.get());
  pimoe::cuda::DeviceStatus host{};
  if (base->read_status(static_cast<cudaStream_t>(stream), &host, true) != 0)
    return plugin_error("pimoe_harness_check_status: reading the device status failed");
  try {
    const std::string problem = pimoe::cuda::describe_status(host);
    if (problem.empty()) return 0;
    error(problem);
    return 1;
  } catch (...) {
    return error("pimoe_harness_check_status: out of host memory");
  }
}

PIMOE_HARNESS_EXPORT void pimoe_harness_release(PimoeHarnessPlugin* plugin) { delete plugin; }

PIMOE_HARNESS_EXPORT int pimoe_harness_enqueue_counting_allocations(PimoeHarnessPlugin* plugin,
                                                                    const void* const* inputs, void* const* outputs,
                                                                    void* workspace, void* stream,
                                                                    long long* allocations) {
  using Counter = unsigned long long (*)();
  static const auto counter = reinterpret_cast<Counter>(dlsym(RTLD_DEFAULT, "pimoe_alloc_counter_thread_count"));
  if (allocations == nullptr) return error("pimoe_harness_enqueue_counting_allocations: allocations is null");
  *allocations = -1;
  if (counter == nullptr)
    return error("pimoe_harness_enqueue_counting_allocations: the counting allocator is not loaded (LD_PRELOAD="
                 "libpimoe_alloc_counter.so)");
  pimoe::trt::clear_last_error();  // its storage exists before counting starts
  const unsigned long long before = counter();
  const int rc = pimoe_harness_enqueue(plugin, inputs, outputs, workspace, stream);
  const unsigned long long after = counter();
  *allocations = static_cast<long long>(after - before);
  return rc;
}

PIMOE_HARNESS_EXPORT int pimoe_harness_emulator_diagnostics(void) {
#ifdef __CUDA_EMU__
  static int seen = 0;
  const int now = emu::error_count() + emu::warning_count();
  const int fresh = now - seen;
  seen = now;
  if (fresh > 0) cudaDeviceReset();
  return fresh;
#else
  return 0;
#endif
}

PIMOE_HARNESS_EXPORT int pimoe_harness_device_alloc(size_t bytes, void** ptr) {
  if (ptr == nullptr) return error("pimoe_harness_device_alloc: ptr is null");
  *ptr = nullptr;
  const cudaError_t err = cudaMalloc(ptr, bytes > 0 ? bytes : 1);
  return err == cudaSuccess ? 0 : error(msg("cudaMalloc(", bytes, "): ", cudaGetErrorString(err)));
}

PIMOE_HARNESS_EXPORT int pimoe_harness_device_free(void* ptr) {
  const cudaError_t err = cudaFree(ptr);
  return err == cudaSuccess ? 0 : error(msg("cudaFree: ", cudaGetErrorString(err)));
}

PIMOE_HARNESS_EXPORT int pimoe_harness_copy(void* dst, const void* src, size_t bytes, int32_t direction) {
  if (direction < 1 || direction > 3) return error("pimoe_harness_copy: direction must be 1, 2 or 3");
  if (bytes == 0) return 0;
  if (dst == nullptr || src == nullptr) return error("pimoe_harness_copy: null pointer");
  const cudaMemcpyKind kind = direction == 1 ? cudaMemcpyHostToDevice
                              : direction == 2 ? cudaMemcpyDeviceToHost
                                               : cudaMemcpyDeviceToDevice;
  const cudaError_t err = cudaMemcpy(dst, src, bytes, kind);
  return err == cudaSuccess ? 0 : error(msg("cudaMemcpy: ", cudaGetErrorString(err)));
}
