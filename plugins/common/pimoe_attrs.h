// Attribute structs, attribute lists and argument validation for op contract v2, shared by every backend
// (ONNX Runtime custom ops, TensorRT plugins, the GPU harness). Header-only, no exceptions:
// every check returns an empty string when the arguments are valid, else one message that names the
// problem and what was expected.
//
// Attribute lists: visit_attrs(attrs, v) names every attribute of an op once, in contract order, as calls on a
// visitor `v` whose member functions are
//   integer(name, int64_t& member, Need)                  a required or optional int
//   flag(name, bool& member)                               an int that must be 0 or 1 (parse_flag)
//   real(name, float& member)                              an optional float
//   integers(name, std::vector<int64_t>& member, Need)     a list of ints
//   reals(name, std::vector<float>& member)                an optional list of floats
//   choice(name, Enum& member, names, count)               a string naming one value of a contract enum
// An optional attribute's default is the member's initial value. The backends implement the visitor (TensorRT:
// plugin-field declarations, reader and writer in plugins/trt/common; ONNX Runtime: the attribute reader in
// plugins/ort), so adding an attribute is: a member with its default in the struct, one line in its visit_attrs,
// its checks in validate_attrs, and its use in the kernels. Every backend then reads, declares and serialises it.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

#include "pimoe_contract.h"

namespace pimoe {

using Dims = std::vector<int64_t>;

inline std::string dims_str(const Dims& d) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < d.size(); ++i) os << (i ? ", " : "") << d[i];
  os << "]";
  return os.str();
}

template <typename... Parts>
std::string msg(Parts&&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  return os.str();
}

inline bool parse_enum(const char* text, const char* const* names, int32_t count, int32_t* out) {
  for (int32_t i = 0; i < count; ++i) {
    if (std::strcmp(text, names[i]) == 0) {
      *out = i;
      return true;
    }
  }
  return false;
}

// Boolean attributes (normalize, layer_norm) are ints that must be exactly 0 or 1: any other value is refused, not
// read as "true".
inline std::string parse_flag(const char* op, const char* name, int64_t value, bool* out) {
  if (value != 0 && value != 1) return msg(op, ": attribute ", name, " must be 0 or 1, got ", value);
  *out = value == 1;
  return {};
}

inline std::string enum_choices(const char* const* names, int32_t count) {
  std::string s;
  for (int32_t i = 0; i < count; ++i) s += (i ? ", " : "") + std::string(names[i]);
  return s;
}

enum class Need : int32_t { kOPTIONAL = 0, kREQUIRED = 1 };

// ------------------------------------------------------------------------------------------ PiMoERoute
// Every member added by contract v2 defaults to the v1 behaviour (docs/op_contract.md, "Semantics").
struct RouteAttrs {
  int64_t k = 1;
  bool normalize = false;
  contract::Scoring scoring = contract::Scoring::kSOFTMAX;
  int64_t num_groups = 1;   // grouped selection: E / num_groups consecutive experts per group
  int64_t groups_kept = 1;  // the best groups keep their keys; every other expert's key becomes 0
  contract::GroupScore group_score = contract::GroupScore::kMAX;
  float routed_scaling_factor = 1.0f;  // multiplies the final weights
  float normalize_eps = 0.0f;          // normalize: weights / (sum + normalize_eps)

  bool grouped() const { return num_groups > 1; }
  // sigmoid without a bias and without groups ranks the logits (fp32 sigmoid saturates at 1)
  bool ranks_logits(bool has_bias) const {
    return scoring == contract::Scoring::kSIGMOID && !has_bias && !grouped();
  }
};

template <class V>
void visit_attrs(RouteAttrs& a, V& v) {
  v.integer(contract::kATTR_K, a.k, Need::kREQUIRED);
  v.flag(contract::kATTR_NORMALIZE, a.normalize);
  v.choice(contract::kATTR_SCORING, a.scoring, contract::kSCORING_NAMES, contract::kSCORING_COUNT);
  v.integer(contract::kATTR_NUM_GROUPS, a.num_groups, Need::kOPTIONAL);
  v.integer(contract::kATTR_GROUPS_KEPT, a.groups_kept, Need::kOPTIONAL);
  v.choice(contract::kATTR_GROUP_SCORE, a.group_score, contract::kGROUPSCORE_NAMES, contract::kGROUPSCORE_COUNT);
  v.real(contract::kATTR_ROUTED_SCALING_FACTOR, a.routed_scaling_factor);
  v.real(contract::kATTR_NORMALIZE_EPS, a.normalize_eps);
}

inline std::string validate_attrs(const RouteAttrs& a) {
  if (a.k < 1 || a.k > contract::kMAX_TOP_K)
    return msg("PiMoERoute: attribute k must be in [1, ", contract::kMAX_TOP_K, "], got ", a.k);
  if (static_cast<int32_t>(a.scoring) < 0 || static_cast<int32_t>(a.scoring) >= contract::kSCORING_COUNT)
    return "PiMoERoute: unknown scoring";
  if (static_cast<int32_t>(a.group_score) < 0 || static_cast<int32_t>(a.group_score) >= contract::kGROUPSCORE_COUNT)
    return "PiMoERoute: unknown group_score";
  if (a.num_groups < 1 || a.num_groups > contract::kMAX_EXPERTS)
    return msg("PiMoERoute: attribute num_groups must be in [1, ", contract::kMAX_EXPERTS, "], got ", a.num_groups);
  if (a.groups_kept < 1 || a.groups_kept > a.num_groups)
    return msg("PiMoERoute: attribute groups_kept must be in [1, num_groups=", a.num_groups, "], got ", a.groups_kept);
  if (a.grouped() && a.scoring == contract::Scoring::kSOFTMAX_TOPK)
    return "PiMoERoute: grouped selection (num_groups > 1) needs scoring softmax or sigmoid, not softmax_topk";
  if (!(a.routed_scaling_factor > 0.0f) || !std::isfinite(a.routed_scaling_factor))
    return msg("PiMoERoute: attribute routed_scaling_factor must be a positive number, got ", a.routed_scaling_factor);
  if (!(a.normalize_eps >= 0.0f) || !std::isfinite(a.normalize_eps))
    return msg("PiMoERoute: attribute normalize_eps must be a number >= 0, got ", a.normalize_eps);
  return {};
}

// logits [N, E]; bias: nullptr when the node has no selection_bias, else its dims, which must be exactly [E] (a
// scalar or any other shape is refused: the kernels read E values)
inline std::string check_route(const RouteAttrs& a, const Dims& logits, const Dims* bias) {
  if (auto e = validate_attrs(a); !e.empty()) return e;
  if (logits.size() != 2) return msg("PiMoERoute: logits must have rank 2 [N, E], got shape ", dims_str(logits));
  const int64_t n = logits[0], experts = logits[1];
  if (experts < 1 || experts > contract::kMAX_EXPERTS)
    return msg("PiMoERoute: number of experts (logits dim 1) must be in [1, ", contract::kMAX_EXPERTS, "], got ",
               experts);
  if (a.k > experts)
    return msg("PiMoERoute: k=", a.k, " exceeds the number of experts E=", experts, "; export with top_k <= E");
  if (experts % a.num_groups != 0)
    return msg("PiMoERoute: num_groups=", a.num_groups, " does not divide the number of experts E=", experts);
  const int64_t group_size = experts / a.num_groups;
  if (a.grouped() && a.group_score == contract::GroupScore::kSUM_TOP2 && group_size < 2)
    return msg("PiMoERoute: group_score sum_top2 needs at least 2 experts per group, got E/num_groups=", group_size);
  if (a.k > a.groups_kept * group_size)
    return msg("PiMoERoute: k=", a.k, " exceeds the experts of the kept groups, groups_kept * E/num_groups = ",
               a.groups_kept * group_size);
  if (n < 0) return msg("PiMoERoute: negative token count ", n);
  if (n * a.k >= contract::kINT32_LIMIT || n * experts >= contract::kINT32_LIMIT)
    return msg("PiMoERoute: N*E = ", n * experts, " exceeds the int32 indexing limit; split the batch");
  if (bias != nullptr && !(bias->size() == 1 && (*bias)[0] == experts))
    return msg("PiMoERoute: selection_bias must have shape [", experts, "], got ", dims_str(*bias));
  return {};
}

// ------------------------------------------------------------------------------------------ PiMoEDispatch
struct DispatchAttrs {
  int64_t num_experts = 0;
};

template <class V>
void visit_attrs(DispatchAttrs& a, V& v) {
  v.integer(contract::kATTR_NUM_EXPERTS, a.num_experts, Need::kREQUIRED);
}

inline std::string validate_attrs(const DispatchAttrs& a) {
  if (a.num_experts < 1 || a.num_experts > contract::kMAX_EXPERTS)
    return msg("PiMoEDispatch: attribute num_experts must be in [1, ", contract::kMAX_EXPERTS, "], got ",
               a.num_experts);
  return {};
}

inline std::string check_dispatch(const DispatchAttrs& a, const Dims& x, const Dims& ids) {
  if (auto e = validate_attrs(a); !e.empty()) return e;
  if (x.size() != 2) return msg("PiMoEDispatch: x must have rank 2 [N, H], got shape ", dims_str(x));
  if (ids.size() != 2) return msg("PiMoEDispatch: ids must have rank 2 [N, k], got shape ", dims_str(ids));
  if (ids[0] != x[0])
    return msg("PiMoEDispatch: ids has ", ids[0], " rows but x has ", x[0], "; both must be [N, ...]");
  if (ids[1] < 1 || ids[1] > contract::kMAX_TOP_K || ids[1] > a.num_experts)
    return msg("PiMoEDispatch: ids dim 1 (k) must be in [1, min(E, ", contract::kMAX_TOP_K, ")], got ", ids[1]);
  if (x[0] * ids[1] * (x[1] > 0 ? x[1] : 1) >= contract::kINT32_LIMIT)
    return msg("PiMoEDispatch: N*k*H = ", x[0] * ids[1] * x[1], " exceeds the int32 indexing limit; split the batch");
  return {};
}

// ------------------------------------------------------------------------------------------ PiMoECombine
struct CombineAttrs {
  // slot (v1): acc = w_0*y_0 + ... in slot order; expert: acc = 0 + ... by ascending sorted row (= expert id)
  contract::CombineOrder order = contract::CombineOrder::kSLOT;
};

template <class V>
void visit_attrs(CombineAttrs& a, V& v) {
  v.choice(contract::kATTR_ORDER, a.order, contract::kCOMBINEORDER_NAMES, contract::kCOMBINEORDER_COUNT);
}

inline std::string validate_attrs(const CombineAttrs& a) {
  if (static_cast<int32_t>(a.order) < 0 || static_cast<int32_t>(a.order) >= contract::kCOMBINEORDER_COUNT)
    return "PiMoECombine: unknown order";
  return {};
}

inline std::string check_combine(const Dims& y_sorted, const Dims& flat_to_sorted, const Dims& weights) {
  if (y_sorted.size() != 2)
    return msg("PiMoECombine: y_sorted must have rank 2 [N*k, H], got shape ", dims_str(y_sorted));
  if (flat_to_sorted.size() != 1)
    return msg("PiMoECombine: flat_to_sorted must have rank 1 [N*k], got shape ", dims_str(flat_to_sorted));
  if (weights.size() != 2) return msg("PiMoECombine: weights must have rank 2 [N, k], got shape ", dims_str(weights));
  const int64_t rows = weights[0] * weights[1];
  if (weights[1] < 1 || weights[1] > contract::kMAX_TOP_K)
    return msg("PiMoECombine: weights dim 1 (k) must be in [1, ", contract::kMAX_TOP_K, "], got ", weights[1]);
  if (flat_to_sorted[0] != rows || y_sorted[0] != rows)
    return msg("PiMoECombine: y_sorted ", dims_str(y_sorted), " and flat_to_sorted ", dims_str(flat_to_sorted),
               " must both have N*k = ", rows, " rows (weights ", dims_str(weights), ")");
  if (rows * (y_sorted[1] > 0 ? y_sorted[1] : 1) >= contract::kINT32_LIMIT)
    return msg("PiMoECombine: N*k*H exceeds the int32 indexing limit; split the batch");
  return {};
}

// ------------------------------------------------------------------------------------------ PiMoEExpertMLP
// kACT_SMOOTH (w8a8 modes): per-input-channel smoothing divisor of the layer input (SmoothQuant); the int8
// weights already carry the matching per-column multiplication.
enum class ParamRole : int32_t { kWEIGHT = 0, kW_SCALE = 1, kBIAS = 2, kLN_GAMMA = 3, kLN_BETA = 4, kACT_SMOOTH = 5 };
constexpr int32_t kPARAM_ROLE_COUNT = 6;

struct ExpertMLPAttrs {
  std::vector<int64_t> expert_ids;
  std::vector<int64_t> widths;
  contract::Activation activation = contract::Activation::kGELU;
  bool layer_norm = true;
  float eps = 1e-5f;
  contract::QuantMode quant_mode = contract::QuantMode::kNONE;
  std::vector<float> act_scales;
  // contract v2 (defaults: v1)
  bool gated = false;  // every hidden layer is a GLU over its 2*out rows [gate; up]
  bool bias = true;    // false: the layers have no bias inputs
  float alpha = contract::kSWIGLU_OAI_ALPHA;  // swiglu_oai
  float limit = contract::kSWIGLU_OAI_LIMIT;

  int64_t num_layers() const { return static_cast<int64_t>(widths.size()) - 1; }
  int64_t num_group() const { return static_cast<int64_t>(expert_ids.size()); }
  bool quantized() const { return quant_mode != contract::QuantMode::kNONE; }
  bool has_ln(int64_t layer) const { return layer_norm && layer < num_layers() - 1; }
  bool is_gated(int64_t layer) const { return gated && layer < num_layers() - 1; }
  // rows of layer l's weight, w_scale and bias: 2*out for a gated hidden layer ([gate; up]), else out
  int64_t rows(int64_t layer) const { return widths[static_cast<size_t>(layer) + 1] * (is_gated(layer) ? 2 : 1); }

  // index of (layer, role) among the variadic params (0-based, after x_sorted and offsets); -1 if absent
  int64_t param_index(int64_t layer, ParamRole role) const {
    int64_t index = 0;
    for (int64_t l = 0; l < num_layers(); ++l) {
      // contract order: weight, [w_scale, act_smooth], bias, [ln_gamma, ln_beta]
      const ParamRole roles[] = {ParamRole::kWEIGHT, ParamRole::kW_SCALE, ParamRole::kACT_SMOOTH, ParamRole::kBIAS,
                                 ParamRole::kLN_GAMMA, ParamRole::kLN_BETA};
      for (ParamRole r : roles) {
        const bool present = r == ParamRole::kWEIGHT || (r == ParamRole::kBIAS && bias) ||
                             ((r == ParamRole::kW_SCALE || r == ParamRole::kACT_SMOOTH) && quantized()) ||
                             ((r == ParamRole::kLN_GAMMA || r == ParamRole::kLN_BETA) && has_ln(l));
        if (!present) continue;
        if (l == layer && r == role) return index;
        ++index;
      }
    }
    return -1;
  }

  int64_t num_params() const {
    int64_t n = 0;
    for (int64_t l = 0; l < num_layers(); ++l) n += 1 + (bias ? 1 : 0) + (quantized() ? 2 : 0) + (has_ln(l) ? 2 : 0);
    return n;
  }

  // expected shape of a param
  Dims param_dims(int64_t layer, ParamRole role) const {
    const int64_t g = num_group(), out = widths[layer + 1], in = widths[layer];
    if (role == ParamRole::kWEIGHT) return {g, rows(layer), in};
    if (role == ParamRole::kACT_SMOOTH) return {g, in};
    if (role == ParamRole::kW_SCALE || role == ParamRole::kBIAS) return {g, rows(layer)};
    return {g, out};
  }

  // the widest row any layer reads or writes (a gated layer's GEMM writes 2*out columns)
  int64_t max_width() const {
    int64_t m = widths.front();
    for (int64_t l = 0; l < num_layers(); ++l) m = rows(l) > m ? rows(l) : m;
    return m;
  }
};

template <class V>
void visit_attrs(ExpertMLPAttrs& a, V& v) {
  v.integers(contract::kATTR_EXPERT_IDS, a.expert_ids, Need::kREQUIRED);
  v.integers(contract::kATTR_WIDTHS, a.widths, Need::kREQUIRED);
  v.choice(contract::kATTR_ACTIVATION, a.activation, contract::kACTIVATION_NAMES, contract::kACTIVATION_COUNT);
  v.flag(contract::kATTR_LAYER_NORM, a.layer_norm);
  v.real(contract::kATTR_EPS, a.eps);
  v.choice(contract::kATTR_QUANT_MODE, a.quant_mode, contract::kQUANTMODE_NAMES, contract::kQUANTMODE_COUNT);
  v.reals(contract::kATTR_ACT_SCALES, a.act_scales);
  v.flag(contract::kATTR_GATED, a.gated);
  v.flag(contract::kATTR_BIAS, a.bias);
  v.real(contract::kATTR_ALPHA, a.alpha);
  v.real(contract::kATTR_LIMIT, a.limit);
}

inline std::string validate_attrs(const ExpertMLPAttrs& a, int64_t num_experts = -1) {
  if (a.expert_ids.empty() || static_cast<int64_t>(a.expert_ids.size()) > contract::kMAX_EXPERTS)
    return msg("PiMoEExpertMLP: expert_ids must list 1..", contract::kMAX_EXPERTS, " experts, got ",
               a.expert_ids.size());
  for (size_t i = 0; i < a.expert_ids.size(); ++i) {
    const int64_t e = a.expert_ids[i];
    if (e < 0 || e >= contract::kMAX_EXPERTS || (num_experts > 0 && e >= num_experts))
      return msg("PiMoEExpertMLP: expert_ids[", i, "]=", e, " is outside [0, ",
                 num_experts > 0 ? num_experts : contract::kMAX_EXPERTS, ")");
    for (size_t j = 0; j < i; ++j)
      if (a.expert_ids[j] == e) return msg("PiMoEExpertMLP: expert_ids lists expert ", e, " twice");
  }
  if (a.widths.size() < 2 || static_cast<int64_t>(a.widths.size()) > contract::kMAX_LAYERS + 1)
    return msg("PiMoEExpertMLP: widths must hold 2..", contract::kMAX_LAYERS + 1, " entries (layers + 1), got ",
               a.widths.size());
  for (int64_t w : a.widths)
    if (w < 1 || w >= contract::kINT32_LIMIT)
      return msg("PiMoEExpertMLP: every width must be >= 1, got ", dims_str(a.widths));
  if (static_cast<int32_t>(a.activation) < 0 || static_cast<int32_t>(a.activation) >= contract::kACTIVATION_COUNT)
    return "PiMoEExpertMLP: unknown activation";
  if (!(a.eps > 0.0f) || !std::isfinite(a.eps)) return msg("PiMoEExpertMLP: eps must be a positive number, got ", a.eps);
  if (a.gated && a.layer_norm) return "PiMoEExpertMLP: gated layers have no LayerNorm: set layer_norm=0";
  if (a.gated && a.num_layers() < 2)
    return "PiMoEExpertMLP: gated needs at least one hidden layer (widths with 3 or more entries)";
  if (a.activation == contract::Activation::kSWIGLU_OAI && !a.gated)
    return "PiMoEExpertMLP: activation swiglu_oai is for gated layers only: set gated=1";
  if (!std::isfinite(a.alpha)) return msg("PiMoEExpertMLP: alpha must be a finite number, got ", a.alpha);
  if (!(a.limit > 0.0f) || !std::isfinite(a.limit))
    return msg("PiMoEExpertMLP: limit must be a positive number, got ", a.limit);
  if (a.quant_mode == contract::QuantMode::kW8A8) {
    const size_t want = static_cast<size_t>(a.num_layers() * a.num_group());
    if (a.act_scales.size() != want)
      return msg("PiMoEExpertMLP: quant_mode=w8a8 needs act_scales with layers*G = ", want, " entries, got ",
                 a.act_scales.size(), "; re-run `pimoe-export quantize`");
    for (float s : a.act_scales)
      if (!(s > 0.0f) || !std::isfinite(s))
        return msg("PiMoEExpertMLP: act_scales must be positive finite numbers, got ", s);
  }
  for (int64_t l = 0; l + 1 < static_cast<int64_t>(a.widths.size()); ++l)
    if (a.num_group() * a.widths[l] * a.rows(l) >= contract::kINT32_LIMIT)
      return msg("PiMoEExpertMLP: layer ", l, " weight has >= 2^31 elements; split the group");
  return {};
}

// x [R, widths[0]], offsets [E+1], params: dims of every variadic input in order
inline std::string check_expert_mlp(const ExpertMLPAttrs& a, const Dims& x, const Dims& offsets,
                                    const std::vector<Dims>& params) {
  if (offsets.size() != 1 || offsets[0] < 2)
    return msg("PiMoEExpertMLP: offsets must have shape [E+1] with E >= 1, got ", dims_str(offsets));
  const int64_t num_experts = offsets[0] - 1;
  if (num_experts > contract::kMAX_EXPERTS)
    return msg("PiMoEExpertMLP: offsets has ", offsets[0], " entries, so E = ", num_experts, " exceeds the contract's ",
               contract::kMAX_EXPERTS, " experts");
  if (auto e = validate_attrs(a, num_experts); !e.empty()) return e;
  if (x.size() != 2) return msg("PiMoEExpertMLP: x_sorted must have rank 2 [R, H], got shape ", dims_str(x));
  if (x[1] != a.widths[0])
    return msg("PiMoEExpertMLP: x_sorted hidden size ", x[1], " does not match widths[0]=", a.widths[0]);
  if (x[0] * a.max_width() >= contract::kINT32_LIMIT)
    return msg("PiMoEExpertMLP: R*max(width) = ", x[0] * a.max_width(), " exceeds the int32 indexing limit");
  if (static_cast<int64_t>(params.size()) != a.num_params())
    return msg("PiMoEExpertMLP: expected ", a.num_params(), " parameter inputs for ", a.num_layers(), " layers",
               a.layer_norm ? " with LayerNorm" : "", a.bias ? "" : " without bias", a.quantized() ? " (w8a8)" : "",
               ", got ", params.size());
  const char* role_names[] = {"weight", "w_scale", "bias", "ln_gamma", "ln_beta", "act_smooth"};
  for (int64_t l = 0; l < a.num_layers(); ++l) {
    for (int32_t r = 0; r < kPARAM_ROLE_COUNT; ++r) {
      const int64_t index = a.param_index(l, static_cast<ParamRole>(r));
      if (index < 0) continue;
      const Dims want = a.param_dims(l, static_cast<ParamRole>(r));
      if (params[static_cast<size_t>(index)] != want)
        return msg("PiMoEExpertMLP: layer ", l, " ", role_names[r], " (input ", index + 2, ") must have shape ",
                   dims_str(want), ", got ", dims_str(params[static_cast<size_t>(index)]));
    }
  }
  return {};
}

// offsets values must be a monotone partition of [0, R]; checked by the CPU kernels on the host
inline std::string check_offsets_values(const int32_t* offsets, int64_t num_experts, int64_t rows) {
  if (offsets[0] != 0) return msg("PiMoEExpertMLP: offsets[0] must be 0, got ", offsets[0]);
  for (int64_t e = 0; e < num_experts; ++e)
    if (offsets[e + 1] < offsets[e])
      return msg("PiMoEExpertMLP: offsets must be non-decreasing (offsets[", e + 1, "]=", offsets[e + 1], " < ",
                 offsets[e], ")");
  if (offsets[num_experts] != rows)
    return msg("PiMoEExpertMLP: offsets[E]=", offsets[num_experts], " must equal the number of rows ", rows,
               "; offsets must come from PiMoEDispatch over the same x_sorted");
  return {};
}

}  // namespace pimoe
