// Portable inner kernels (any x86-64 or AArch64 compiler target): plain loops the compiler vectorises.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "cpu_kernels.h"
#include "isa.h"
#include "simd_math.h"

namespace pimoe {
namespace cpu {
namespace isa {
namespace {

void gemm_f32_panel(const float* a, int64_t lda, int64_t m, const float* panel, int64_t k, const float* bias,
                    float* c, int64_t ldc, int64_t n_valid, bool accumulate) {
  for (int64_t r = 0; r < m; ++r) {
    float acc[kPanel];
    for (int64_t j = 0; j < kPanel; ++j) acc[j] = 0.0f;
    const float* row = a + r * lda;
    for (int64_t kk = 0; kk < k; ++kk) {
      const float v = row[kk];
      const float* w = panel + kk * kPanel;
      for (int64_t j = 0; j < kPanel; ++j) acc[j] += v * w[j];
    }
    for (int64_t j = 0; j < n_valid; ++j) c[r * ldc + j] = accumulate ? c[r * ldc + j] + acc[j] : acc[j] + bias[j];
  }
}

void gemm_f32(const float* a, int64_t lda, int64_t m, const float* panels, int64_t panel_stride, int64_t np, int64_t k,
              const float* bias, float* c, int64_t ldc, int64_t n_valid, bool accumulate) {
  for (int64_t j = 0; j < np; ++j)
    gemm_f32_panel(a, lda, m, panels + j * panel_stride, k, bias + j * kPanel, c + j * kPanel, ldc,
                   std::min(kPanel, n_valid - j * kPanel), accumulate);
}

void gemm_i8_panel(const int16_t* qa, int64_t lda, int64_t m, const int8_t* panel, int64_t k2, const float* a_scale,
                   const float* w_scale, const float* bias, float* c, int64_t ldc, int64_t n_valid) {
  for (int64_t r = 0; r < m; ++r) {
    int32_t acc[kPanel] = {};
    const int16_t* row = qa + r * lda;
    for (int64_t kp = 0; kp < k2; ++kp) {
      const int32_t a0 = row[2 * kp], a1 = row[2 * kp + 1];
      const int8_t* w = panel + kp * 2 * kPanel;
      for (int64_t j = 0; j < kPanel; ++j) acc[j] += w[2 * j] * a0 + w[2 * j + 1] * a1;
    }
    for (int64_t j = 0; j < n_valid; ++j) {
      const float scale = a_scale[r] * w_scale[j];
      const float product = static_cast<float>(acc[j]) * scale;
      c[r * ldc + j] = product + bias[j];
    }
  }
}

// codes: int16 rows ("pairs" layout, isa.h), lda in bytes
void gemm_i8(const uint8_t* codes, int64_t lda, int64_t m, const int8_t* panels, int64_t np, int64_t /*np_after*/,
             int64_t k, const float* a_scale, const float* w_scale, const float* bias, float* c, int64_t ldc,
             int64_t n_valid) {
  const int64_t k2 = (k + 1) / 2, stride = pairs_panel_bytes(k);
  for (int64_t j = 0; j < np; ++j)
    gemm_i8_panel(reinterpret_cast<const int16_t*>(codes), lda / 2, m, panels + j * stride, k2, a_scale,
                  w_scale + j * kPanel, bias + j * kPanel, c + j * kPanel, ldc, std::min(kPanel, n_valid - j * kPanel));
}

void quantize_row(const float* x, int64_t n, const RowCodes& c) {
  const float* smooth = c.smooth;
  const float scale = c.scale;
  int16_t* q = reinterpret_cast<int16_t*>(c.codes);
  for (int64_t i = 0; i < n; ++i) {
    float v = (smooth != nullptr ? x[i] / smooth[i] : x[i]) / scale;
    if (std::isnan(v)) v = 0.0f;
    v = v < -127.0f ? -127.0f : (v > 127.0f ? 127.0f : v);
    q[i] = static_cast<int16_t>(std::nearbyint(v));
  }
  for (int64_t i = n; i < pairs_code_bytes(n) / 2; ++i) q[i] = 0;
}

void divide_row(const float* x, const float* d, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] / d[i];
}

// One lane of simd_math.h's operations: plain scalar IEEE arithmetic, std::fma for the fused ones
struct Scalar {
  using F = float;
  using M = bool;
  static float set(float v) { return v; }
  static float add(float a, float b) { return a + b; }
  static float sub(float a, float b) { return a - b; }
  static float mul(float a, float b) { return a * b; }
  static float div(float a, float b) { return a / b; }
  static float fma(float a, float b, float c) { return std::fma(a, b, c); }
  static float fnma(float a, float b, float c) { return std::fma(-a, b, c); }
  static float max(float a, float b) { return a > b ? a : b; }
  static float min(float a, float b) { return a < b ? a : b; }
  static float round(float a) { return std::nearbyint(a); }
  static void pow2(float n, float* s1, float* s2) {
    const int32_t ni = static_cast<int32_t>(n), h1 = ni >> 1, h2 = ni - h1;
    *s1 = from_bits(static_cast<uint32_t>(h1 + 127) << 23);
    *s2 = from_bits(static_cast<uint32_t>(h2 + 127) << 23);
  }
  static float sign(float a) { return from_bits(bits(a) & 0x80000000u); }
  static float abs(float a) { return from_bits(bits(a) & 0x7FFFFFFFu); }
  static float or_sign(float a, float s) { return from_bits(bits(a) | bits(s)); }
  static bool is_nan(float a) { return a != a; }
  static bool gt(float a, float b) { return a > b; }
  static bool lt(float a, float b) { return a < b; }
  static float select(bool m, float a, float b) { return m ? a : b; }

  static uint32_t bits(float a) {
    uint32_t u;
    std::memcpy(&u, &a, sizeof u);
    return u;
  }
  static float from_bits(uint32_t u) {
    float a;
    std::memcpy(&a, &u, sizeof a);
    return a;
  }
};

// the canonical LayerNorm (isa.h): 32 lanes, element i into lane i % 32, then halving
template <typename Term>
float lane_sum(int64_t n, Term term) {
  constexpr int64_t kLanes = math::kNormLanes;
  float lanes[kLanes] = {};
  for (int64_t i0 = 0; i0 < n; i0 += kLanes)
    for (int64_t j = 0; j < kLanes && i0 + j < n; ++j) lanes[j] = term(lanes[j], i0 + j);
  for (int64_t w = kLanes / 2; w >= 1; w /= 2)
    for (int64_t j = 0; j < w; ++j) lanes[j] += lanes[j + w];
  return lanes[0];
}

void row_epilogue(float* row, int64_t n, const float* gamma, const float* beta, float eps, int32_t activation,
                  const RowCodes* codes, const float* /*next_row*/) {
  if (gamma != nullptr) {
    const float mean = lane_sum(n, [&](float acc, int64_t i) { return acc + row[i]; }) / static_cast<float>(n);
    const float sq = lane_sum(n, [&](float acc, int64_t i) {
      const float d = row[i] - mean;
      return std::fma(d, d, acc);
    });
    const float rstd = 1.0f / std::sqrt(sq / static_cast<float>(n) + eps);
    for (int64_t i = 0; i < n; ++i) row[i] = std::fma((row[i] - mean) * rstd, gamma[i], beta[i]);
  }
  if (activation >= 0)
    for (int64_t i = 0; i < n; ++i) row[i] = math::activate<Scalar>(row[i], activation);
  if (codes != nullptr) quantize_row(row, n, *codes);
}

void glu_row(const float* gate, const float* up, float* h, int64_t n, const Glu& glu) {
  math::with_activation(glu.activation, [&](auto act) {
    constexpr int32_t kAct = decltype(act)::value;
    for (int64_t i = 0; i < n; ++i) h[i] = math::glu<Scalar>(gate[i], up[i], kAct, glu.alpha, glu.limit);
  });
}

void half_to_float_row(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = half_to_float(src[i]);
}

void float_to_half_row(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = float_to_half(src[i]);
}

}  // namespace

int64_t pairs_panel_bytes(int64_t k) { return (k + 1) / 2 * 2 * kPanel; }
int64_t pairs_code_bytes(int64_t k) { return (k + 1) / 2 * 2 * static_cast<int64_t>(sizeof(int16_t)); }

void pack_i8_pairs(const int8_t* w, int64_t out, int64_t in, int8_t* packed) {
  const int64_t panels = (out + kPanel - 1) / kPanel, panel_bytes = pairs_panel_bytes(in);
  std::memset(packed, 0, static_cast<size_t>(panels * panel_bytes));
  for (int64_t o = 0; o < out; ++o) {
    int8_t* dst = packed + (o / kPanel) * panel_bytes + (o % kPanel) * 2;
    for (int64_t i = 0; i < in; ++i) dst[(i / 2) * 2 * kPanel + (i % 2)] = w[o * in + i];
  }
}

const Kernels& generic_kernels() {
  static const Kernels kernels{"generic",     gemm_f32, pairs_panel_bytes, pairs_code_bytes,  pack_i8_pairs,
                               quantize_row,  gemm_i8,  glu_row,           divide_row,        row_epilogue,
                               half_to_float_row, float_to_half_row};
  return kernels;
}

}  // namespace isa
}  // namespace cpu
}  // namespace pimoe
