// PiMoEExpertMLP on the CPU: weights packed once into 16-column panels; per call, every layer is one
// parallel GEMM over (expert segment x row block x panel block) tasks followed by one parallel epilogue
// (LayerNorm + activation) over rows. Each output element is computed by exactly one task with a fixed
// summation order, so results do not depend on the thread count. Every parallel region hands its tasks out in
// contiguous runs, one per core (Parallel::runs): a GEMM task prefetches the next task's weight panels, which then
// serve the same core, and the row stages find the rows their core's GEMM tasks just wrote.
//
// Gated (GLU) hidden layers (contract v2, rows [gate; up], h = GLU(gate, up)): the gate rows are packed as P =
// ceil(out / 16) panels and the up rows as the next P (each half zero-padded to whole panels, bias and weight scales
// alike), so gate panel p and up panel P + p hold the same 16 output columns. A GEMM task of such a layer takes a
// block of output panels, computes its gate and up panels with the table's plain GEMMs into a [rows x (gate | up)]
// tile on its stack (at most 48 x 128 floats: it stays in L1) and writes h = glu(gate, up) through the table's
// glu_row (simd_math.h) into the layer's out-wide output: the [rows, 2 * out] pre-activations never reach memory,
// and there is no separate pass or barrier for the GLU (w8a8 modes then quantise the h rows for the next layer in
// one row pass, as the dynamic scale needs the whole row). Every table gives the bits of its plain GEMM followed by
// glu(), so gated outputs keep the kernel sets' bit-identities (isa.h).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <mutex>
#include <vector>

#include "cpu_kernels.h"
#include "isa.h"

namespace pimoe {
namespace cpu {

namespace {

constexpr int64_t kRowBlock = 48;    // rows per GEMM task (multiple of the 6-row register block)
constexpr int64_t kPanelBlock = 8;   // 16-column panels per GEMM task (128 columns)
constexpr int64_t kMinGemmTasks = 64; // GEMM: smaller panel blocks while a layer has fewer tasks than this
constexpr int64_t kMinRowTasks = 16; // per-row stages: at least this many tasks when there are as many rows
constexpr int64_t kKBlock = 1024;    // fp32 GEMM: k values per block (no split up to 1024: fewer passes over C)
constexpr int64_t kGluPanelBlock = kPanelBlock / 2;  // gated layers: output panels per task (gate + up: kPanelBlock)

float to_float(const void* data, DType dtype, int64_t index) {
  return dtype == DType::kF16 ? half_to_float(static_cast<const uint16_t*>(data)[index])
                              : static_cast<const float*>(data)[index];
}

}  // namespace

struct ExpertMLP::State {
  ExpertMLPAttrs attrs;
  // per layer, per group member: packed fp32 panels (float modes) or packed int8 panels + per-column weight
  // scales (w8a8 modes), bias, LayerNorm gamma/beta (fp32)
  std::vector<std::vector<std::vector<float>>> packed, bias, gamma, beta, w_scale, act_smooth;
  std::vector<std::vector<char>> smooth_is_one;  // per layer, per member: skip the division when all ones
  std::vector<std::vector<std::vector<int8_t>>> packed_i8;
  std::vector<int64_t> panels;  // per layer

  // Activation buffers of one call, reused by later calls: fresh multi-megabyte buffers would be zero-filled and
  // page-faulted in on every call (about 5% of a 2048-row call). A call takes a workspace from the pool (or makes
  // one) and gives it back, so concurrent calls never share one; they are freed with the op.
  struct Workspace {
    template <typename T>
    struct Buffer {
      std::unique_ptr<T[]> data;
      size_t size = 0;
      T* get(size_t n) {  // uninitialised: every element read is written first in the same call
        if (n > size) {
          data.reset(new T[n]);
          size = n;
        }
        return data.get();
      }
    };
    Buffer<float> buf[2], input, row_scale;
    Buffer<uint8_t> codes;
  };
  mutable std::mutex pool_mutex;
  mutable std::vector<std::unique_ptr<Workspace>> pool;

  std::unique_ptr<Workspace> take_workspace() const {
    std::lock_guard<std::mutex> lock(pool_mutex);
    if (pool.empty()) return std::make_unique<Workspace>();
    std::unique_ptr<Workspace> w = std::move(pool.back());
    pool.pop_back();
    return w;
  }
  void give_back(std::unique_ptr<Workspace> w) const {
    std::lock_guard<std::mutex> lock(pool_mutex);
    pool.push_back(std::move(w));
  }
};

namespace {

using State = ExpertMLP::State;
using Param = ExpertMLP::Param;

size_t at(int64_t i) { return static_cast<size_t>(i); }

// ------------------------------------------------------------------------------------------ prepare: packing
// Which weight row goes to each packed column of layer l (panels * 16 of them), -1 for padding: row c for a plain
// layer; for a gated one the out gate rows padded to P whole panels, then the out up rows (rows out..2*out) likewise.
std::vector<int64_t> packed_rows(const ExpertMLPAttrs& a, int64_t l, int64_t panels) {
  const int64_t out = a.widths[at(l) + 1];
  const int64_t half = a.is_gated(l) ? panels / 2 * isa::kPanel : panels * isa::kPanel;
  std::vector<int64_t> rows(at(panels * isa::kPanel), -1);
  for (int64_t c = 0; c < static_cast<int64_t>(rows.size()); ++c) {
    const int64_t o = c % half;
    if (o < out) rows[at(c)] = (c / half) * out + o;
  }
  return rows;
}

// int8 weights [rows, in] (member g's, at w) -> the kernel table's packed panels, zero-padded
std::vector<int8_t> pack_i8(const isa::Kernels& kern, const int8_t* w, const std::vector<int64_t>& rows, int64_t in,
                            int64_t panels) {
  std::vector<int8_t> gathered(rows.size() * at(in), 0);
  for (size_t c = 0; c < rows.size(); ++c)
    if (rows[c] >= 0) std::memcpy(gathered.data() + c * at(in), w + rows[c] * in, at(in));
  std::vector<int8_t> packed(at(panels * kern.i8_panel_bytes(in)));
  kern.pack_i8(gathered.data(), static_cast<int64_t>(rows.size()), in, packed.data());
  return packed;
}

// fp32/fp16 weights [rows, in] (member g of the group, from element base) -> fp32 16-column panels, zero-padded
std::vector<float> pack_f32(const Param& w, int64_t base, const std::vector<int64_t>& rows, int64_t in,
                            int64_t panels) {
  std::vector<float> packed(at(panels * in * isa::kPanel), 0.0f);
  for (int64_t c = 0; c < static_cast<int64_t>(rows.size()); ++c) {
    if (rows[at(c)] < 0) continue;
    float* dst = packed.data() + (c / isa::kPanel) * in * isa::kPanel + (c % isa::kPanel);
    for (int64_t i = 0; i < in; ++i) dst[i * isa::kPanel] = to_float(w.data, w.dtype, base + rows[at(c)] * in + i);
  }
  return packed;
}

// w8a8: the member's weight scales (padded to whole panels) and SmoothQuant divisors, both positive and finite
std::string prepare_scales(State& st, const std::vector<Param>& params, int64_t l, int64_t g,
                           const std::vector<int64_t>& rows) {
  const ExpertMLPAttrs& attrs = st.attrs;
  const int64_t in = attrs.widths[at(l)], out = attrs.rows(l);
  const int64_t expert = attrs.expert_ids[at(g)];
  const Param& s = params[at(attrs.param_index(l, ParamRole::kW_SCALE))];
  for (int64_t o = 0; o < out; ++o) {
    const float v = to_float(s.data, s.dtype, g * out + o);
    if (!(v > 0.0f) || !std::isfinite(v))  // quantize_weight writes max|W| / 127, or 1 for a zero row
      return msg("PiMoEExpertMLP: w_scale (layer ", l, ", expert ", expert, ", channel ", o,
                 ") must be positive and finite, got ", v);
  }
  std::vector<float> scales(rows.size(), 0.0f);
  for (size_t c = 0; c < rows.size(); ++c)
    if (rows[c] >= 0) scales[c] = to_float(s.data, s.dtype, g * out + rows[c]);
  st.w_scale[at(l)].push_back(std::move(scales));
  const Param& m = params[at(attrs.param_index(l, ParamRole::kACT_SMOOTH))];
  std::vector<float> smooth(at(in));
  bool ones = true;
  for (int64_t i = 0; i < in; ++i) {
    const float v = to_float(m.data, m.dtype, g * in + i);
    if (!(v > 0.0f) || !std::isfinite(v))
      return msg("PiMoEExpertMLP: act_smooth (layer ", l, ", expert ", expert, ") must be positive and finite, got ",
                 v);
    smooth[at(i)] = v;
    ones = ones && v == 1.0f;
  }
  st.act_smooth[at(l)].push_back(std::move(smooth));
  st.smooth_is_one[at(l)].push_back(ones ? 1 : 0);
  return {};
}

// bias (in packed column order, zero-padded; zeros for a bias-free node) and, for hidden layers with LayerNorm,
// gamma and beta of member g
void prepare_vectors(State& st, const std::vector<Param>& params, int64_t l, int64_t g,
                     const std::vector<int64_t>& rows) {
  const ExpertMLPAttrs& attrs = st.attrs;
  const int64_t out = attrs.widths[at(l) + 1];
  std::vector<float> bias(rows.size(), 0.0f);
  if (attrs.bias) {
    const Param& b = params[at(attrs.param_index(l, ParamRole::kBIAS))];
    for (size_t c = 0; c < rows.size(); ++c)
      if (rows[c] >= 0) bias[c] = to_float(b.data, b.dtype, g * attrs.rows(l) + rows[c]);
  }
  st.bias[at(l)].push_back(std::move(bias));
  if (!attrs.has_ln(l)) return;
  const Param& ga = params[at(attrs.param_index(l, ParamRole::kLN_GAMMA))];
  const Param& be = params[at(attrs.param_index(l, ParamRole::kLN_BETA))];
  std::vector<float> gv(at(out)), bv(at(out));
  for (int64_t o = 0; o < out; ++o) {
    gv[at(o)] = to_float(ga.data, ga.dtype, g * out + o);
    bv[at(o)] = to_float(be.data, be.dtype, g * out + o);
  }
  st.gamma[at(l)].push_back(std::move(gv));
  st.beta[at(l)].push_back(std::move(bv));
}

std::string prepare_layer(State& st, const std::vector<Param>& params, int64_t l) {
  const ExpertMLPAttrs& attrs = st.attrs;
  const int64_t in = attrs.widths[at(l)], out = attrs.rows(l);  // a gated layer's GEMM has 2*out columns
  const int64_t half = (attrs.widths[at(l) + 1] + isa::kPanel - 1) / isa::kPanel;
  const int64_t panels = attrs.is_gated(l) ? 2 * half : half;  // gated: gate panels, then as many up panels
  const std::vector<int64_t> rows = packed_rows(attrs, l, panels);
  const bool quantized = attrs.quantized();
  st.panels[at(l)] = panels;
  const Param& w = params[at(attrs.param_index(l, ParamRole::kWEIGHT))];
  if ((w.dtype == DType::kI8) != quantized)
    return msg("PiMoEExpertMLP: layer ", l, quantized ? " needs int8 weights for quant_mode w8a8"
                                                    : " has int8 weights but quant_mode is none");
  for (int64_t g = 0; g < attrs.num_group(); ++g) {
    const int64_t base = g * out * in;
    if (quantized) {
      st.packed_i8[at(l)].push_back(
          pack_i8(*isa::selected(), static_cast<const int8_t*>(w.data) + base, rows, in, panels));
      if (auto e = prepare_scales(st, params, l, g, rows); !e.empty()) return e;
    } else {
      st.packed[at(l)].push_back(pack_f32(w, base, rows, in, panels));
    }
    prepare_vectors(st, params, l, g, rows);
  }
  return {};
}

// ------------------------------------------------------------------------------------------ run: one call
// A member's rows, compacted: member g owns compact rows [compact, compact + count), sorted rows [row, row + count).
struct Segment {
  int64_t member, row, count, compact;
};

std::vector<Segment> plan_segments(const ExpertMLPAttrs& a, const int32_t* offsets, int64_t* compact_rows) {
  std::vector<Segment> segments;
  *compact_rows = 0;
  for (int64_t g = 0; g < a.num_group(); ++g) {
    const int64_t e = a.expert_ids[at(g)];
    const int64_t lo = offsets[e], hi = offsets[e + 1];
    if (hi > lo) {
      segments.push_back({g, lo, hi - lo, *compact_rows});
      *compact_rows += hi - lo;
    }
  }
  return segments;
}

// rows that belong to other groups' experts are 0 (the graph sums the groups)
void zero_other_rows(const std::vector<Segment>& segments, int64_t rows, int64_t width, size_t elem, void* y) {
  std::vector<char> mine(at(rows), 0);
  for (const Segment& s : segments) std::fill(mine.begin() + s.row, mine.begin() + s.row + s.count, 1);
  for (int64_t r = 0; r < rows; ++r)
    if (!mine[at(r)]) std::memset(static_cast<char*>(y) + at(r * width) * elem, 0, at(width) * elem);
}

// The group's layers over its compacted rows: activations in fp32, ping-ponging between two buffers.
class Pass {
 public:
  Pass(const State& st, const Parallel& parallel, std::vector<Segment> segments, int64_t compact_rows)
      : st_(st), a_(st.attrs), kern_(*isa::selected()), parallel_(parallel), segments_(std::move(segments)),
        rows_(compact_rows), ws_(st.take_workspace()) {
    int64_t width = 0;  // the widest layer output (a gated layer's is out wide: its GLU values)
    for (int64_t l = 0; l < a_.num_layers(); ++l) width = std::max(width, a_.widths[at(l) + 1]);
    buf_[0] = ws_->buf[0].get(at(rows_ * width));
    buf_[1] = ws_->buf[1].get(at(rows_ * width));
    if (a_.quantized()) row_scale_ = ws_->row_scale.get(at(rows_));
  }
  ~Pass() { st_.give_back(std::move(ws_)); }
  Pass(const Pass&) = delete;
  Pass& operator=(const Pass&) = delete;

  void run(const void* x, DType dtype, void* y) {
    gather_input(x, dtype);
    const int64_t layers = a_.num_layers();
    if (a_.quantized()) quantize_activations(0);
    for (int64_t l = 0; l < layers; ++l) {
      const int64_t out = a_.widths[at(l) + 1];  // a gated layer's GEMM writes its out GLU values
      const bool last = l == layers - 1;
      float* target = buf_[l % 2];
      const bool direct = last && dtype == DType::kF32;  // the last layer writes straight into an fp32 y
      gemm(l, direct ? static_cast<float*>(y) : target, direct);
      if (!last && !a_.is_gated(l))
        epilogue(l, target);  // w8a8: also quantises the rows for layer l + 1
      else if (last && !direct)
        for (const Segment& s : segments_)
          kern_.float_to_half_row(target + s.compact * out, static_cast<uint16_t*>(y) + s.row * out, s.count * out);
      current_ = target;
      current_ld_ = out;
      if (!last && a_.is_gated(l) && a_.quantized()) quantize_activations(l + 1);  // the GLU ran in the GEMM tasks
    }
  }

 private:
  int64_t member_of(int64_t r) const {
    for (const Segment& s : segments_)
      if (r >= s.compact && r < s.compact + s.count) return s.member;
    return 0;
  }

  // parallel over blocks of compact rows: kRowBlock rows, fewer when there are few rows (at least kMinRowTasks
  // tasks where there are as many rows), so that a small batch's per-row work (quantisation, LayerNorm,
  // activation) is still shared by every thread
  template <typename F>
  void for_row_blocks(F&& body) const {
    const int64_t block = std::clamp<int64_t>((rows_ + kMinRowTasks - 1) / kMinRowTasks, 1, kRowBlock);
    parallel_.runs(at((rows_ + block - 1) / block), [&](size_t task) {
      const int64_t r0 = static_cast<int64_t>(task) * block;
      body(r0, std::min(rows_, r0 + block));
    });
  }

  // the layer-0 input as compact fp32 rows (fp32 rows already in compact order, e.g. a group of consecutive
  // experts, are used in place)
  void gather_input(const void* x, DType dtype) {
    const int64_t w = a_.widths.front();
    current_ld_ = w;
    const int64_t shift = segments_[0].row - segments_[0].compact;
    if (dtype == DType::kF32 &&
        std::all_of(segments_.begin(), segments_.end(), [&](const Segment& s) { return s.row - s.compact == shift; })) {
      current_ = static_cast<const float*>(x) + shift * w;
      return;
    }
    float* input = ws_->input.get(at(rows_ * w));
    for (const Segment& s : segments_) {
      if (dtype == DType::kF32)
        std::memcpy(input + s.compact * w, static_cast<const float*>(x) + s.row * w,
                    at(s.count * w) * sizeof(float));
      else
        kern_.half_to_float_row(static_cast<const uint16_t*>(x) + s.row * w, input + s.compact * w,
                                s.count * w);
    }
    current_ = input;
  }

  // w8a8: activation codes for layer l, static per-(layer, expert) or dynamic per-row scales
  void quantize_activations(int64_t l) {
    prepare_codes(l);
    for_row_blocks([&](int64_t begin, int64_t end) {
      std::vector<float> smoothed;
      for (int64_t r = begin; r < end; ++r) quantize_row(l, r, current_ + r * current_ld_, smoothed);
    });
  }

  // w8a8: the code buffer for layer l's input, before a parallel pass fills it (the previous layer's codes are done)
  void prepare_codes(int64_t l) {
    code_bytes_ = kern_.i8_code_bytes(a_.widths[at(l)]);
    codes_ = ws_->codes.get(at(rows_ * code_bytes_));
  }

  // layer l's input codes of compact row r of member g with the given scale: SmoothQuant's divisors (none when they
  // are all ones: x / 1 is x)
  isa::RowCodes row_codes(int64_t l, size_t member, int64_t r, float scale) const {
    return {st_.smooth_is_one[at(l)][member] ? nullptr : st_.act_smooth[at(l)][member].data(), scale,
            codes_ + r * code_bytes_};
  }

  // w8a8: compact row r's codes and scale for layer l from its fp32 values
  void quantize_row(int64_t l, int64_t r, const float* row, std::vector<float>& smoothed) const {
    const int64_t in = a_.widths[at(l)];
    const size_t member = at(member_of(r));
    isa::RowCodes codes;
    if (a_.quant_mode == contract::QuantMode::kW8A8) {  // static scale: x / act_smooth / scale in one pass
      codes = row_codes(l, member, r, a_.act_scales[at(l * a_.num_group()) + member]);
    } else {  // dynamic: the scale is the smoothed row's max
      if (!st_.smooth_is_one[at(l)][member]) {
        smoothed.resize(at(in));
        kern_.divide_row(row, st_.act_smooth[at(l)][member].data(), smoothed.data(), in);
        row = smoothed.data();
      }
      codes = {nullptr, dynamic_scale(row, in), codes_ + r * code_bytes_};
    }
    row_scale_[at(r)] = codes.scale;
    kern_.quantize_row(row, in, codes);
  }

  // max |x| / 127 of a row (1 for an all-zero row); a NaN row gets scale 1 and codes 0, like torch.amax's NaN
  static float dynamic_scale(const float* row, int64_t n) {
    float m = 0.0f;
    for (int64_t i = 0; i < n; ++i) {
      if (std::isnan(row[i])) {
        m = std::nanf("");
        break;
      }
      m = std::max(m, std::fabs(row[i]));
    }
    return m > 0.0f ? m / 127.0f : 1.0f;
  }

  // layer l's GEMM + bias over (segment x row block x panel block) tasks into c (compact rows, or y's rows).
  // Panel blocks of kPanelBlock panels, halved (down to 2) while there are fewer than kMinGemmTasks tasks: a small
  // batch has few rows per expert, and a few large tasks of unequal size leave a thread idle at the end. A gated
  // layer's tasks take blocks of its output panels (kGluPanelBlock, down to 1), each with as many gate and up panels.
  void gemm(int64_t l, float* c, bool rows_of_y) const {
    struct Task {
      int64_t segment, row0, rows, p0, p_end;
    };
    const bool gated = a_.is_gated(l);
    const int64_t panels = gated ? st_.panels[at(l)] / 2 : st_.panels[at(l)];  // gated: output (gate) panels
    int64_t row_blocks = 0;
    for (const Segment& s : segments_) row_blocks += (s.count + kRowBlock - 1) / kRowBlock;
    int64_t block = gated ? kGluPanelBlock : kPanelBlock, min_block = gated ? 1 : 2;
    while (block > min_block && row_blocks * ((panels + block - 1) / block) < kMinGemmTasks) block /= 2;
    std::vector<Task> tasks;
    for (int64_t s = 0; s < static_cast<int64_t>(segments_.size()); ++s)
      for (int64_t r0 = 0; r0 < segments_[at(s)].count; r0 += kRowBlock)
        for (int64_t p0 = 0; p0 < panels; p0 += block)
          tasks.push_back({s, r0, std::min(kRowBlock, segments_[at(s)].count - r0), p0, std::min(panels, p0 + block)});
    parallel_.runs(tasks.size(), [&](size_t index) {
      const Task& t = tasks[index];
      const Segment& s = segments_[at(t.segment)];
      const int64_t out = a_.widths[at(l) + 1];
      float* c_rows = c + ((rows_of_y ? s.row : s.compact) + t.row0) * out;
      if (gated)
        gemm_glu_block(l, s, t.row0, t.rows, t.p0, t.p_end, c_rows);
      else if (a_.quantized())
        gemm_i8_block(l, s, t.row0, t.rows, t.p0, t.p_end, c_rows);
      else
        gemm_f32_block(l, s, t.row0, t.rows, t.p0, t.p_end, c_rows);
    });
  }

  void gemm_i8_block(int64_t l, const Segment& s, int64_t row0, int64_t rows, int64_t p0, int64_t p_end,
                     float* c_rows) const {
    const int64_t in = a_.widths[at(l)], out = a_.widths[at(l) + 1];
    const size_t li = at(l), mi = at(s.member);
    const int64_t r0 = s.compact + row0;
    kern_.gemm_i8(codes_ + r0 * code_bytes_, code_bytes_, rows,
                  st_.packed_i8[li][mi].data() + p0 * kern_.i8_panel_bytes(in), p_end - p0,
                  st_.panels[li] - p_end,  // the next task's panels follow: the table may prefetch them
                  in, row_scale_ + r0,
                  st_.w_scale[li][mi].data() + p0 * isa::kPanel, st_.bias[li][mi].data() + p0 * isa::kPanel,
                  c_rows + p0 * isa::kPanel, out, std::min((p_end - p0) * isa::kPanel, out - p0 * isa::kPanel));
  }

  // K in cache-sized blocks: a block of the panels (kKBlock x 16 floats each) and of the rows stays in L1/L2 across
  // the panels of this task; fixed block order, so results stay deterministic
  void gemm_f32_block(int64_t l, const Segment& s, int64_t row0, int64_t rows, int64_t p0, int64_t p_end,
                      float* c_rows) const {
    const int64_t in = a_.widths[at(l)], out = a_.widths[at(l) + 1];
    const size_t li = at(l), mi = at(s.member);
    const float* a_rows = current_ + (s.compact + row0) * current_ld_;
    const float* packed = st_.packed[li][mi].data() + p0 * in * isa::kPanel;
    const int64_t n_valid = std::min((p_end - p0) * isa::kPanel, out - p0 * isa::kPanel);
    for (int64_t k0 = 0; k0 < in; k0 += kKBlock)
      kern_.gemm_f32(a_rows + k0, current_ld_, rows, packed + k0 * isa::kPanel, in * isa::kPanel, p_end - p0,
                     std::min(kKBlock, in - k0), st_.bias[li][mi].data() + p0 * isa::kPanel, c_rows + p0 * isa::kPanel,
                     out, n_valid, k0 > 0);
  }

  // A gated layer's task: output panels [p0, p_end) of rows [row0, row0 + rows) of segment s. The gate panels p and
  // up panels P + p go through the plain GEMMs into a tile [rows x (gate | up)] on this thread's stack (K blocks
  // accumulate there), then h = glu(gate, up) row by row into the out-wide h_rows.
  void gemm_glu_block(int64_t l, const Segment& s, int64_t row0, int64_t rows, int64_t p0, int64_t p_end,
                      float* h_rows) const {
    constexpr int64_t kTileCols = kGluPanelBlock * isa::kPanel;
    alignas(64) float tile[kRowBlock * 2 * kTileCols];
    const int64_t in = a_.widths[at(l)], out = a_.widths[at(l) + 1], half = st_.panels[at(l)] / 2;
    const int64_t np = p_end - p0, cols = np * isa::kPanel, ld = 2 * cols;
    const size_t li = at(l), mi = at(s.member);
    const float* bias = st_.bias[li][mi].data();
    if (a_.quantized()) {
      const int64_t r0 = s.compact + row0;
      for (int64_t part = 0; part < 2; ++part) {  // gate panels p0.., then up panels half + p0..
        const int64_t p = p0 + part * half;
        kern_.gemm_i8(codes_ + r0 * code_bytes_, code_bytes_, rows,
                      st_.packed_i8[li][mi].data() + p * kern_.i8_panel_bytes(in), np, half - p_end, in,
                      row_scale_ + r0,
                      st_.w_scale[li][mi].data() + p * isa::kPanel, bias + p * isa::kPanel, tile + part * cols, ld,
                      cols);
      }
    } else {
      const float* a_rows = current_ + (s.compact + row0) * current_ld_;
      for (int64_t k0 = 0; k0 < in; k0 += kKBlock)  // a K block of the rows serves the gate and the up panels
        for (int64_t part = 0; part < 2; ++part) {
          const int64_t p = p0 + part * half;
          kern_.gemm_f32(a_rows + k0, current_ld_, rows, st_.packed[li][mi].data() + (p * in + k0) * isa::kPanel,
                         in * isa::kPanel, np, std::min(kKBlock, in - k0), bias + p * isa::kPanel, tile + part * cols,
                         ld, cols, k0 > 0);
        }
    }
    const isa::Glu glu{static_cast<int32_t>(a_.activation), a_.alpha, a_.limit};
    const int64_t n = std::min(cols, out - p0 * isa::kPanel);
    for (int64_t r = 0; r < rows; ++r)
      kern_.glu_row(tile + r * ld, tile + r * ld + cols, h_rows + r * out + p0 * isa::kPanel, n, glu);
  }

  // hidden layers: [LayerNorm] + activation in place, per row; in w8a8 modes each row is quantised for the next
  // layer in the same pass, while it is in cache; with static scales straight from the epilogue's registers (the
  // row's values are not stored: the next layer reads only its codes)
  void epilogue(int64_t l, float* target) {
    const int64_t out = a_.widths[at(l) + 1];
    const bool ln = a_.has_ln(l), quantize_next = a_.quantized();
    const bool static_codes = a_.quant_mode == contract::QuantMode::kW8A8;
    if (quantize_next) prepare_codes(l + 1);
    for_row_blocks([&](int64_t begin, int64_t end) {
      std::vector<float> smoothed;
      for (int64_t r = begin; r < end; ++r) {
        const size_t member = at(member_of(r));
        isa::RowCodes codes{};
        if (static_codes) {
          codes = row_codes(l + 1, member, r, a_.act_scales[at((l + 1) * a_.num_group()) + member]);
          row_scale_[at(r)] = codes.scale;
        }
        kern_.row_epilogue(target + r * out, out, ln ? st_.gamma[at(l)][member].data() : nullptr,
                           ln ? st_.beta[at(l)][member].data() : nullptr, a_.eps,
                           static_cast<int32_t>(a_.activation), static_codes ? &codes : nullptr,
                           r + 1 < end ? target + (r + 1) * out : nullptr);
        if (quantize_next && !static_codes) quantize_row(l + 1, r, target + r * out, smoothed);
      }
    });
  }

  const State& st_;
  const ExpertMLPAttrs& a_;
  const isa::Kernels& kern_;
  const Parallel& parallel_;
  const std::vector<Segment> segments_;
  const int64_t rows_;
  std::unique_ptr<State::Workspace> ws_;
  float* buf_[2] = {nullptr, nullptr};
  float* row_scale_ = nullptr;
  uint8_t* codes_ = nullptr;  // w8a8: quantised activations in the kernel table's layout
  int64_t code_bytes_ = 0;    // bytes per row of codes_
  const float* current_ = nullptr;
  int64_t current_ld_ = 0;
};

}  // namespace

ExpertMLP::ExpertMLP() = default;
ExpertMLP::~ExpertMLP() = default;

bool ExpertMLP::prepared() const { return state_ != nullptr; }

std::string ExpertMLP::prepare(const ExpertMLPAttrs& attrs, const std::vector<Param>& params) {
  if (static_cast<int64_t>(params.size()) != attrs.num_params())
    return msg("PiMoEExpertMLP: expected ", attrs.num_params(), " parameter inputs, got ", params.size());
  if (isa::selected() == nullptr) return msg("PiMoEExpertMLP: ", isa::selection_error());
  auto state = std::make_unique<State>();
  state->attrs = attrs;
  const size_t layers = at(attrs.num_layers());
  for (auto* v : {&state->packed, &state->bias, &state->gamma, &state->beta, &state->w_scale, &state->act_smooth})
    v->resize(layers);
  state->smooth_is_one.resize(layers);
  state->packed_i8.resize(layers);
  state->panels.resize(layers);
  for (int64_t l = 0; l < attrs.num_layers(); ++l)
    if (auto e = prepare_layer(*state, params, l); !e.empty()) return e;
  state_ = std::move(state);
  return {};
}

std::string ExpertMLP::run(const void* x, DType dtype, int64_t rows, const int32_t* offsets, int64_t num_experts,
                           void* y, const Parallel& parallel) const {
  if (!state_) return "PiMoEExpertMLP: weights were not prepared";
  if (auto e = check_offsets_values(offsets, num_experts, rows); !e.empty()) return e;
  int64_t compact_rows = 0;
  std::vector<Segment> segments = plan_segments(state_->attrs, offsets, &compact_rows);
  zero_other_rows(segments, rows, state_->attrs.widths.back(), dtype == DType::kF16 ? 2 : 4, y);
  if (compact_rows > 0) Pass(*state_, parallel, std::move(segments), compact_rows).run(x, dtype, y);
  return {};
}

}  // namespace cpu
}  // namespace pimoe
