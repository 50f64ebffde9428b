// PiMoEExpertMLP on the CPU: weights packed once into 16-column panels; per call, every layer is one
// parallel GEMM over (expert segment x row block x panel block) tasks followed by one parallel epilogue
// (LayerNorm + activation) over rows. Each output element is computed by exactly one task with a fixed
// summation order, so results do not depend on the thread count.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cpu_kernels.h"
#include "isa.h"

namespace pimoe {
namespace cpu {

namespace {

bool cpu_has_avx2() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

const isa::Kernels& select_kernels() {
  static const isa::Kernels* chosen = [] {
    const char* forced = std::getenv("PIMOE_CPU_ISA");
    const bool force_generic = forced != nullptr && std::strcmp(forced, "generic") == 0;
#ifdef PIMOE_HAVE_AVX2
    if (!force_generic && cpu_has_avx2()) return isa::avx2_kernels();
#endif
    (void)force_generic;
    return &isa::generic_kernels();
  }();
  return *chosen;
}

constexpr int64_t kRowBlock = 48;    // rows per GEMM task (multiple of the 6-row register block)
constexpr int64_t kPanelBlock = 8;   // 16-column panels per GEMM task (128 columns)
constexpr int64_t kKBlock = 256;     // fp32 GEMM: k values per cache block

float to_float(const void* data, DType dtype, int64_t index) {
  return dtype == DType::kF16 ? half_to_float(static_cast<const uint16_t*>(data)[index])
                              : static_cast<const float*>(data)[index];
}

}  // namespace

const char* active_isa() { return select_kernels().name; }

struct ExpertMLP::State {
  ExpertMLPAttrs attrs;
  // per layer, per group member: packed fp32 panels (float modes) or packed int8 panels + per-column weight
  // scales (w8a8 modes), bias, LayerNorm gamma/beta (fp32)
  std::vector<std::vector<std::vector<float>>> packed, bias, gamma, beta, w_scale, act_smooth;
  std::vector<std::vector<char>> smooth_is_one;  // per layer, per member: skip the division when all ones
  std::vector<std::vector<std::vector<int8_t>>> packed_i8;
  std::vector<int64_t> panels;  // per layer
};

ExpertMLP::ExpertMLP() = default;
ExpertMLP::~ExpertMLP() = default;

bool ExpertMLP::prepared() const { return state_ != nullptr; }

std::string ExpertMLP::prepare(const ExpertMLPAttrs& attrs, const std::vector<Param>& params) {
  if (static_cast<int64_t>(params.size()) != attrs.num_params())
    return msg("PiMoEExpertMLP: expected ", attrs.num_params(), " parameter inputs, got ", params.size());
  auto state = std::make_unique<State>();
  state->attrs = attrs;
  const int64_t layers = attrs.num_layers(), groups = attrs.num_group();
  const bool quantized = attrs.quantized();
  for (auto* v : {&state->packed, &state->bias, &state->gamma, &state->beta, &state->w_scale, &state->act_smooth})
    v->resize(static_cast<size_t>(layers));
  state->smooth_is_one.resize(static_cast<size_t>(layers));
  state->packed_i8.resize(static_cast<size_t>(layers));
  state->panels.resize(static_cast<size_t>(layers));
  for (int64_t l = 0; l < layers; ++l) {
    const int64_t in = attrs.widths[static_cast<size_t>(l)], out = attrs.widths[static_cast<size_t>(l) + 1];
    const int64_t panels = (out + isa::kPanel - 1) / isa::kPanel;
    const int64_t k2 = (in + 1) / 2;
    state->panels[static_cast<size_t>(l)] = panels;
    const Param& w = params[static_cast<size_t>(attrs.param_index(l, ParamRole::kWEIGHT))];
    const Param& b = params[static_cast<size_t>(attrs.param_index(l, ParamRole::kBIAS))];
    if ((w.dtype == DType::kI8) != quantized)
      return msg("PiMoEExpertMLP: layer ", l, quantized ? " needs int8 weights for quant_mode w8a8"
                                                      : " has int8 weights but quant_mode is none");
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t base = g * out * in;
      if (quantized) {
        std::vector<int8_t> packed(static_cast<size_t>(panels * k2 * 2 * isa::kPanel), 0);
        const int8_t* src = static_cast<const int8_t*>(w.data) + base;
        for (int64_t o = 0; o < out; ++o) {
          int8_t* dst = packed.data() + (o / isa::kPanel) * k2 * 2 * isa::kPanel + (o % isa::kPanel) * 2;
          for (int64_t i = 0; i < in; ++i) dst[(i / 2) * 2 * isa::kPanel + (i % 2)] = src[o * in + i];
        }
        state->packed_i8[static_cast<size_t>(l)].push_back(std::move(packed));
        const Param& s = params[static_cast<size_t>(attrs.param_index(l, ParamRole::kW_SCALE))];
        std::vector<float> scales(static_cast<size_t>(panels * isa::kPanel), 0.0f);
        for (int64_t o = 0; o < out; ++o) {
          const float v = to_float(s.data, s.dtype, g * out + o);
          if (!(v > 0.0f) || !std::isfinite(v))  // quantize_weight writes max|W| / 127, or 1 for a zero row
            return msg("PiMoEExpertMLP: w_scale (layer ", l, ", expert ", attrs.expert_ids[static_cast<size_t>(g)],
                       ", channel ", o, ") must be positive and finite, got ", v);
          scales[static_cast<size_t>(o)] = v;
        }
        state->w_scale[static_cast<size_t>(l)].push_back(std::move(scales));
        const Param& m = params[static_cast<size_t>(attrs.param_index(l, ParamRole::kACT_SMOOTH))];
        std::vector<float> smooth(static_cast<size_t>(in));
        bool ones = true;
        for (int64_t i = 0; i < in; ++i) {
          smooth[static_cast<size_t>(i)] = to_float(m.data, m.dtype, g * in + i);
          if (!(smooth[static_cast<size_t>(i)] > 0.0f) || !std::isfinite(smooth[static_cast<size_t>(i)]))
            return msg("PiMoEExpertMLP: act_smooth (layer ", l, ", expert ", attrs.expert_ids[static_cast<size_t>(g)],
                       ") must be positive and finite, got ", smooth[static_cast<size_t>(i)]);
          ones = ones && smooth[static_cast<size_t>(i)] == 1.0f;
        }
        state->act_smooth[static_cast<size_t>(l)].push_back(std::move(smooth));
        state->smooth_is_one[static_cast<size_t>(l)].push_back(ones ? 1 : 0);
      } else {
        std::vector<float> packed(static_cast<size_t>(panels * in * isa::kPanel), 0.0f);
        for (int64_t o = 0; o < out; ++o) {
          float* dst = packed.data() + (o / isa::kPanel) * in * isa::kPanel + (o % isa::kPanel);
          for (int64_t i = 0; i < in; ++i) dst[i * isa::kPanel] = to_float(w.data, w.dtype, base + o * in + i);
        }
        state->packed[static_cast<size_t>(l)].push_back(std::move(packed));
      }
      std::vector<float> bias(static_cast<size_t>(panels * isa::kPanel), 0.0f);
      for (int64_t o = 0; o < out; ++o) bias[static_cast<size_t>(o)] = to_float(b.data, b.dtype, g * out + o);
      state->bias[static_cast<size_t>(l)].push_back(std::move(bias));
      if (attrs.has_ln(l)) {
        const Param& ga = params[static_cast<size_t>(attrs.param_index(l, ParamRole::kLN_GAMMA))];
        const Param& be = params[static_cast<size_t>(attrs.param_index(l, ParamRole::kLN_BETA))];
        std::vector<float> gv(static_cast<size_t>(out)), bv(static_cast<size_t>(out));
        for (int64_t o = 0; o < out; ++o) {
          gv[static_cast<size_t>(o)] = to_float(ga.data, ga.dtype, g * out + o);
          bv[static_cast<size_t>(o)] = to_float(be.data, be.dtype, g * out + o);
        }
        state->gamma[static_cast<size_t>(l)].push_back(std::move(gv));
        state->beta[static_cast<size_t>(l)].push_back(std::move(bv));
      }
    }
  }
  state_ = std::move(state);
  return {};
}

std::string ExpertMLP::run(const void* x, DType dtype, int64_t rows, const int32_t* offsets, int64_t num_experts,
                           void* y, const Parallel& parallel) const {
  if (!state_) return "PiMoEExpertMLP: weights were not prepared";
  const ExpertMLPAttrs& a = state_->attrs;
  if (auto e = check_offsets_values(offsets, num_experts, rows); !e.empty()) return e;
  const isa::Kernels& kern = select_kernels();
  const int64_t layers = a.num_layers(), out_width = a.widths.back(), in_width = a.widths.front();
  const size_t out_elem = dtype == DType::kF16 ? 2 : 4;

  // segments of this group's experts, compacted: member g owns compact rows [start, start + count)
  struct Segment {
    int64_t member, row, count, compact;
  };
  std::vector<Segment> segments;
  int64_t compact_rows = 0;
  for (int64_t g = 0; g < a.num_group(); ++g) {
    const int64_t e = a.expert_ids[static_cast<size_t>(g)];
    const int64_t lo = offsets[e], hi = offsets[e + 1];
    if (hi > lo) {
      segments.push_back({g, lo, hi - lo, compact_rows});
      compact_rows += hi - lo;
    }
  }
  // rows that belong to other groups' experts are 0 (the graph sums the groups)
  std::vector<char> mine(static_cast<size_t>(rows), 0);
  for (const Segment& s : segments) std::fill(mine.begin() + s.row, mine.begin() + s.row + s.count, 1);
  for (int64_t r = 0; r < rows; ++r)
    if (!mine[static_cast<size_t>(r)])
      std::memset(static_cast<char*>(y) + static_cast<size_t>(r * out_width) * out_elem, 0,
                  static_cast<size_t>(out_width) * out_elem);
  if (compact_rows == 0) return {};

  // activations: compact fp32 buffers (input, then ping-pong between two hidden buffers)
  const int64_t max_w = a.max_width();
  std::vector<float> input, buf_a(static_cast<size_t>(compact_rows * max_w)),
      buf_b(static_cast<size_t>(compact_rows * max_w));
  const float* current = nullptr;
  int64_t current_ld = in_width;
  if (dtype == DType::kF32 && segments.size() == 1) {
    current = static_cast<const float*>(x) + segments[0].row * in_width;  // one contiguous segment: no copy
  } else {
    input.resize(static_cast<size_t>(compact_rows * in_width));
    for (const Segment& s : segments) {
      if (dtype == DType::kF32)
        std::memcpy(input.data() + s.compact * in_width, static_cast<const float*>(x) + s.row * in_width,
                    static_cast<size_t>(s.count * in_width) * sizeof(float));
      else
        kern.half_to_float_row(static_cast<const uint16_t*>(x) + s.row * in_width,
                               input.data() + s.compact * in_width, s.count * in_width);
    }
    current = input.data();
  }

  const bool quantized = a.quantized();
  std::vector<int16_t> codes;     // w8a8: quantised activations, rows padded to an even length
  std::vector<float> row_scale;   // w8a8: activation scale of every compact row
  if (quantized) row_scale.resize(static_cast<size_t>(compact_rows));
  auto member_of = [&](int64_t r) {
    for (const Segment& s : segments)
      if (r >= s.compact && r < s.compact + s.count) return s.member;
    return int64_t{0};
  };

  for (int64_t l = 0; l < layers; ++l) {
    const int64_t in = a.widths[static_cast<size_t>(l)], out = a.widths[static_cast<size_t>(l) + 1];
    const bool last = l == layers - 1;
    const int64_t k2 = (in + 1) / 2;
    if (quantized) {  // activation codes for this layer: static per-(layer, expert) or dynamic per-row scales
      codes.resize(static_cast<size_t>(compact_rows * k2 * 2));
      const float* src = current;
      const int64_t src_ld = current_ld;
      const size_t row_tasks = static_cast<size_t>((compact_rows + kRowBlock - 1) / kRowBlock);
      parallel(row_tasks, [&](size_t task) {
        const int64_t r_end = std::min(compact_rows, static_cast<int64_t>(task + 1) * kRowBlock);
        std::vector<float> smoothed;
        for (int64_t r = static_cast<int64_t>(task) * kRowBlock; r < r_end; ++r) {
          const float* row = src + r * src_ld;
          const size_t member = static_cast<size_t>(member_of(r));
          if (!state_->smooth_is_one[static_cast<size_t>(l)][member]) {  // SmoothQuant: x / act_smooth
            const float* sm = state_->act_smooth[static_cast<size_t>(l)][member].data();
            smoothed.resize(static_cast<size_t>(in));
            for (int64_t i = 0; i < in; ++i) smoothed[static_cast<size_t>(i)] = row[i] / sm[i];
            row = smoothed.data();
          }
          float scale;
          if (a.quant_mode == contract::QuantMode::kW8A8) {
            scale = a.act_scales[static_cast<size_t>(l * a.num_group() + static_cast<int64_t>(member))];
          } else {  // dynamic: max |x| / 127 of this row (1 for an all-zero row)
            float m = 0.0f;
            for (int64_t i = 0; i < in; ++i) {
              if (std::isnan(row[i])) {  // NaN row: like torch.amax, the max is NaN -> scale 1, codes 0
                m = std::nanf("");
                break;
              }
              m = std::max(m, std::fabs(row[i]));
            }
            scale = m > 0.0f ? m / 127.0f : 1.0f;
          }
          row_scale[static_cast<size_t>(r)] = scale;
          kern.quantize_row(row, in, scale, codes.data() + r * k2 * 2, k2 * 2);
        }
      });
    }
    // the last layer writes straight into y when y is fp32 (segment rows are contiguous in y)
    const bool direct = last && dtype == DType::kF32;
    float* target = (l % 2 == 0) ? buf_a.data() : buf_b.data();
    const int64_t panels = state_->panels[static_cast<size_t>(l)];
    const int64_t panel_blocks = (panels + kPanelBlock - 1) / kPanelBlock;
    struct Task {
      int64_t segment, row0, rows, block;
    };
    std::vector<Task> tasks;
    for (int64_t s = 0; s < static_cast<int64_t>(segments.size()); ++s)
      for (int64_t r0 = 0; r0 < segments[static_cast<size_t>(s)].count; r0 += kRowBlock)
        for (int64_t pb = 0; pb < panel_blocks; ++pb)
          tasks.push_back({s, r0, std::min(kRowBlock, segments[static_cast<size_t>(s)].count - r0), pb});
    parallel(tasks.size(), [&](size_t index) {
      const Task& t = tasks[index];
      const Segment& s = segments[static_cast<size_t>(t.segment)];
      const float* a_rows = current + (s.compact + t.row0) * current_ld;
      float* c_rows;
      int64_t ldc;
      if (direct) {
        c_rows = static_cast<float*>(y) + (s.row + t.row0) * out;
        ldc = out;
      } else {
        c_rows = target + (s.compact + t.row0) * out;
        ldc = out;
      }
      const size_t li = static_cast<size_t>(l), mi = static_cast<size_t>(s.member);
      const std::vector<float>& bias = state_->bias[li][mi];
      const int64_t p_end = std::min(panels, (t.block + 1) * kPanelBlock);
      for (int64_t p = t.block * kPanelBlock; p < p_end && quantized; ++p) {
        const int64_t n_valid = std::min(isa::kPanel, out - p * isa::kPanel);
        {
          const int64_t r0 = s.compact + t.row0;
          kern.gemm_i8_panel(codes.data() + r0 * k2 * 2, k2 * 2, t.rows,
                             state_->packed_i8[li][mi].data() + p * k2 * 2 * isa::kPanel, k2,
                             row_scale.data() + r0, state_->w_scale[li][mi].data() + p * isa::kPanel,
                             bias.data() + p * isa::kPanel, c_rows + p * isa::kPanel, ldc, n_valid);
        }
      }
      if (!quantized) {
        // K in cache-sized blocks: a block of the panel (kKBlock x 16 floats) and of the rows stays in L1/L2
        // across the row blocks and panels of this task; fixed block order, so results stay deterministic
        const float* packed = state_->packed[li][mi].data();
        for (int64_t k0 = 0; k0 < in; k0 += kKBlock) {
          const int64_t kc = std::min(kKBlock, in - k0);
          for (int64_t p = t.block * kPanelBlock; p < p_end; ++p) {
            const int64_t n_valid = std::min(isa::kPanel, out - p * isa::kPanel);
            kern.gemm_f32_panel(a_rows + k0, current_ld, t.rows, packed + p * in * isa::kPanel + k0 * isa::kPanel,
                                kc, bias.data() + p * isa::kPanel, c_rows + p * isa::kPanel, ldc, n_valid, k0 > 0);
          }
        }
      }
    });
    if (!last) {
      const bool ln = a.has_ln(l);
      const size_t row_tasks = static_cast<size_t>((compact_rows + kRowBlock - 1) / kRowBlock);
      parallel(row_tasks, [&](size_t task) {
        const int64_t r_end = std::min(compact_rows, static_cast<int64_t>(task + 1) * kRowBlock);
        for (int64_t r = static_cast<int64_t>(task) * kRowBlock; r < r_end; ++r) {
          const int64_t member = member_of(r);
          kern.row_epilogue(target + r * out, out,
                            ln ? state_->gamma[static_cast<size_t>(l)][static_cast<size_t>(member)].data() : nullptr,
                            ln ? state_->beta[static_cast<size_t>(l)][static_cast<size_t>(member)].data() : nullptr,
                            a.eps, static_cast<int32_t>(a.activation));
        }
      });
    } else if (!direct) {
      for (const Segment& s : segments)
        kern.float_to_half_row(target + s.compact * out, static_cast<uint16_t*>(y) + s.row * out, s.count * out);
    }
    current = target;
    current_ld = out;
  }
  return {};
}

}  // namespace cpu
}  // namespace pimoe
