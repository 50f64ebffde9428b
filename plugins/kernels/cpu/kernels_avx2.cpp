// AVX2 + FMA + F16C inner kernels. This file alone is compiled with -mavx2 -mfma -mf16c; it is only
// called after a run-time CPU check (kernels_select.cpp), so the library still loads on older CPUs.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "isa.h"
#include "simd_math.h"

namespace pimoe {
namespace cpu {
namespace isa {
namespace {

// ------------------------------------------------------------------------------------------ GEMM
// Rows of the next register block when `left` rows remain: blocks of 6, but the last two blocks share their rows
// evenly (7 rows -> 4 + 3, not 6 + 1): a 1- or 2-row block re-reads the whole panel for little work. Every row's
// sum runs the same k order in any block, so the split does not change results.
inline int64_t block_rows(int64_t left) {
  if (left <= 6) return left;
  if (left >= 12) return 6;
  return (left + 1) / 2;
}

// body(first_row, std::integral_constant<int, MR>) for each register block of m rows
template <typename F>
inline void for_register_blocks(int64_t m, F&& body) {
  for (int64_t r = 0; r < m;) {
    const int64_t mr = block_rows(m - r);
    switch (mr) {
      case 6: body(r, std::integral_constant<int, 6>{}); break;
      case 5: body(r, std::integral_constant<int, 5>{}); break;
      case 4: body(r, std::integral_constant<int, 4>{}); break;
      case 3: body(r, std::integral_constant<int, 3>{}); break;
      case 2: body(r, std::integral_constant<int, 2>{}); break;
      default: body(r, std::integral_constant<int, 1>{}); break;
    }
    r += mr;
  }
}

// Register block: MR rows x 16 columns (2 ymm); MR <= 6 keeps 12 accumulators + 2 B + 1 A in 16 registers.
// The accumulators are named variables (not an array) so the compiler keeps them in registers.
template <int MR>
inline void micro_kernel(const float* a, int64_t lda, const float* panel, int64_t k, const float* bias, float* c,
                         int64_t ldc, int64_t n_valid, bool accumulate) {
  __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps(), c10 = _mm256_setzero_ps(),
         c11 = _mm256_setzero_ps(), c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps(),
         c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps(), c40 = _mm256_setzero_ps(),
         c41 = _mm256_setzero_ps(), c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps();
  const float* a0 = a;
  const float* a1 = a + lda;
  const float* a2 = a + 2 * lda;
  const float* a3 = a + 3 * lda;
  const float* a4 = a + 4 * lda;
  const float* a5 = a + 5 * lda;
#define PIMOE_ROW(r, ar)                                   \
  if constexpr (MR > r) {                                  \
    const __m256 av = _mm256_broadcast_ss(ar + kk);        \
    c##r##0 = _mm256_fmadd_ps(av, b0, c##r##0);            \
    c##r##1 = _mm256_fmadd_ps(av, b1, c##r##1);            \
  }
  for (int64_t kk = 0; kk < k; ++kk) {
    const __m256 b0 = _mm256_loadu_ps(panel + kk * kPanel);
    const __m256 b1 = _mm256_loadu_ps(panel + kk * kPanel + 8);
    PIMOE_ROW(0, a0)
    PIMOE_ROW(1, a1)
    PIMOE_ROW(2, a2)
    PIMOE_ROW(3, a3)
    PIMOE_ROW(4, a4)
    PIMOE_ROW(5, a5)
  }
#undef PIMOE_ROW
  const __m256 acc[6][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  if (n_valid == kPanel) {
    for (int r = 0; r < MR; ++r) {
      const __m256 base0 = accumulate ? _mm256_loadu_ps(c + r * ldc) : _mm256_loadu_ps(bias);
      const __m256 base1 = accumulate ? _mm256_loadu_ps(c + r * ldc + 8) : _mm256_loadu_ps(bias + 8);
      _mm256_storeu_ps(c + r * ldc, _mm256_add_ps(base0, acc[r][0]));
      _mm256_storeu_ps(c + r * ldc + 8, _mm256_add_ps(base1, acc[r][1]));
    }
  } else {
    alignas(32) float tmp[kPanel];
    for (int r = 0; r < MR; ++r) {
      _mm256_store_ps(tmp, acc[r][0]);
      _mm256_store_ps(tmp + 8, acc[r][1]);
      for (int64_t j = 0; j < n_valid; ++j)
        c[r * ldc + j] = accumulate ? c[r * ldc + j] + tmp[j] : bias[j] + tmp[j];
    }
  }
}

void gemm_f32(const float* a, int64_t lda, int64_t m, const float* panels, int64_t panel_stride, int64_t np, int64_t k,
              const float* bias, float* c, int64_t ldc, int64_t n_valid, bool acc) {
  for (int64_t j = 0; j < np; ++j) {
    const int64_t valid = std::min(kPanel, n_valid - j * kPanel);
    for_register_blocks(m, [&](int64_t r, auto mr) {
      micro_kernel<decltype(mr)::value>(a + r * lda, lda, panels + j * panel_stride, k, bias + j * kPanel,
                                        c + r * ldc + j * kPanel, ldc, valid, acc);
    });
  }
}

// ------------------------------------------------------------------------------------------ int8 GEMM
// Weights stay int8 in memory (a quarter of fp32: seed-512's experts fit the L3 cache) and are sign-extended
// to int16 per k-pair; activations are int16 codes; vpmaddwd forms w[c,k0]*a[k0] + w[c,k1]*a[k1] exactly.
template <int MR>
inline void micro_kernel_i8(const int16_t* qa, int64_t lda, const int8_t* panel, int64_t k2, const float* a_scale,
                            const float* w_scale, const float* bias, float* c, int64_t ldc, int64_t n_valid) {
  __m256i c00 = _mm256_setzero_si256(), c01 = _mm256_setzero_si256(), c10 = _mm256_setzero_si256(),
          c11 = _mm256_setzero_si256(), c20 = _mm256_setzero_si256(), c21 = _mm256_setzero_si256(),
          c30 = _mm256_setzero_si256(), c31 = _mm256_setzero_si256(), c40 = _mm256_setzero_si256(),
          c41 = _mm256_setzero_si256(), c50 = _mm256_setzero_si256(), c51 = _mm256_setzero_si256();
  const int16_t* a0 = qa;
  const int16_t* a1 = qa + lda;
  const int16_t* a2 = qa + 2 * lda;
  const int16_t* a3 = qa + 3 * lda;
  const int16_t* a4 = qa + 4 * lda;
  const int16_t* a5 = qa + 5 * lda;
#define PIMOE_ROW_I8(r, ar)                                                   \
  if constexpr (MR > r) {                                                     \
    int32_t pair;                                                             \
    std::memcpy(&pair, ar + 2 * kp, sizeof pair);                             \
    const __m256i av = _mm256_set1_epi32(pair);                               \
    c##r##0 = _mm256_add_epi32(c##r##0, _mm256_madd_epi16(w0, av));           \
    c##r##1 = _mm256_add_epi32(c##r##1, _mm256_madd_epi16(w1, av));           \
  }
  for (int64_t kp = 0; kp < k2; ++kp) {
    const int8_t* w = panel + kp * 2 * kPanel;
    const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
    const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 16)));
    PIMOE_ROW_I8(0, a0)
    PIMOE_ROW_I8(1, a1)
    PIMOE_ROW_I8(2, a2)
    PIMOE_ROW_I8(3, a3)
    PIMOE_ROW_I8(4, a4)
    PIMOE_ROW_I8(5, a5)
  }
#undef PIMOE_ROW_I8
  const __m256i acc[6][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  alignas(32) float tmp[kPanel];
  for (int r = 0; r < MR; ++r) {
    // separate multiply and add, like the PyTorch reference (acc * (a_scale * w_scale) + bias)
    const __m256 as = _mm256_set1_ps(a_scale[r]);
    const __m256 s0 = _mm256_mul_ps(as, _mm256_loadu_ps(w_scale));
    const __m256 s1 = _mm256_mul_ps(as, _mm256_loadu_ps(w_scale + 8));
    const __m256 y0 = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(acc[r][0]), s0), _mm256_loadu_ps(bias));
    const __m256 y1 = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(acc[r][1]), s1), _mm256_loadu_ps(bias + 8));
    if (n_valid == kPanel) {
      _mm256_storeu_ps(c + r * ldc, y0);
      _mm256_storeu_ps(c + r * ldc + 8, y1);
    } else {
      _mm256_store_ps(tmp, y0);
      _mm256_store_ps(tmp + 8, y1);
      for (int64_t j = 0; j < n_valid; ++j) c[r * ldc + j] = tmp[j];
    }
  }
}

// codes: int16 rows ("pairs" layout, isa.h), lda in bytes
void gemm_i8(const uint8_t* codes, int64_t lda, int64_t m, const int8_t* panels, int64_t np, int64_t /*np_after*/,
             int64_t k, const float* a_scale, const float* w_scale, const float* bias, float* c, int64_t ldc,
             int64_t n_valid) {
  const int16_t* qa = reinterpret_cast<const int16_t*>(codes);
  const int64_t k2 = (k + 1) / 2, stride = pairs_panel_bytes(k), lda16 = lda / 2;
  for (int64_t j = 0; j < np; ++j) {
    const int64_t valid = std::min(kPanel, n_valid - j * kPanel);
    for_register_blocks(m, [&](int64_t r, auto mr) {
      micro_kernel_i8<decltype(mr)::value>(qa + r * lda16, lda16, panels + j * stride, k2, a_scale + r,
                                           w_scale + j * kPanel, bias + j * kPanel, c + r * ldc + j * kPanel, ldc,
                                           valid);
    });
  }
}

// 8 int32 codes of v / scale: clamp(round_half_even(v / scale), -127, 127), NaN -> 0
inline __m256i codes8(__m256 v, __m256 vscale) {
  v = _mm256_div_ps(v, vscale);
  v = _mm256_blendv_ps(v, _mm256_setzero_ps(), _mm256_cmp_ps(v, v, _CMP_UNORD_Q));  // NaN -> 0
  v = _mm256_min_ps(_mm256_max_ps(v, _mm256_set1_ps(-127.0f)), _mm256_set1_ps(127.0f));
  return _mm256_cvtps_epi32(v);  // round half to even (default MXCSR)
}

// one code of x (/ smooth) / scale, as codes8 computes it lane by lane
inline int16_t code1(float x, const float* smooth, float scale) {
  float v = (smooth != nullptr ? x / *smooth : x) / scale;
  if (v != v) v = 0.0f;
  v = v < -127.0f ? -127.0f : (v > 127.0f ? 127.0f : v);
  return static_cast<int16_t>(std::nearbyint(v));
}

void quantize_row(const float* x, int64_t n, const RowCodes& c) {
  const float* smooth = c.smooth;
  const float scale = c.scale;
  int16_t* q = reinterpret_cast<int16_t*>(c.codes);
  const int64_t n_padded = pairs_code_bytes(n) / 2;
  const __m256 vs = _mm256_set1_ps(scale);
  auto load = [&](int64_t i) {
    const __m256 v = _mm256_loadu_ps(x + i);
    return smooth != nullptr ? _mm256_div_ps(v, _mm256_loadu_ps(smooth + i)) : v;
  };
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i a = codes8(load(i), vs), b = codes8(load(i + 8), vs);
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i), packed);
  }
  for (; i < n; ++i) q[i] = code1(x[i], smooth != nullptr ? smooth + i : nullptr, scale);
  for (; i < n_padded; ++i) q[i] = 0;
}

void divide_row(const float* x, const float* d, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, _mm256_div_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(d + i)));
  for (; i < n; ++i) out[i] = x[i] / d[i];
}

// ------------------------------------------------------------------------------------------ row epilogue
// simd_math.h's lane operations on 8 lanes
struct Ops256 {
  using F = __m256;
  using M = __m256;
  static F set(float v) { return _mm256_set1_ps(v); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F div(F a, F b) { return _mm256_div_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F fnma(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }
  static F max(F a, F b) { return _mm256_max_ps(a, b); }
  static F min(F a, F b) { return _mm256_min_ps(a, b); }
  static F round(F a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static void pow2(F n, F* s1, F* s2) {
    const __m256i ni = _mm256_cvtps_epi32(n);
    const __m256i h1 = _mm256_srai_epi32(ni, 1);
    const __m256i h2 = _mm256_sub_epi32(ni, h1);
    *s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(h1, _mm256_set1_epi32(127)), 23));
    *s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(h2, _mm256_set1_epi32(127)), 23));
  }
  static F sign(F a) { return _mm256_and_ps(a, _mm256_set1_ps(-0.0f)); }
  static F abs(F a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
  static F or_sign(F a, F s) { return _mm256_or_ps(a, s); }
  static M is_nan(F a) { return _mm256_cmp_ps(a, a, _CMP_UNORD_Q); }
  static M gt(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
  static M lt(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
  static F select(M m, F a, F b) { return _mm256_blendv_ps(b, a, m); }
};

// lanes 0..7 reduced by halving (+4, +2, +1)
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The canonical 64-lane sum (isa.h) of term(x) over the row as eight 8-lane accumulators; the tail runs through a
// copy padded with ``pad`` (a value whose term adds exactly 0).
template <typename Term>
float lane_sum(const float* row, int64_t n, float pad, Term term) {
  static_assert(math::kNormLanes == 64, "eight 8-lane accumulators");
  __m256 s[8];
  for (auto& v : s) v = _mm256_setzero_ps();
  auto block = [&](const float* x) {
    for (int j = 0; j < 8; ++j) s[j] = term(_mm256_loadu_ps(x + 8 * j), s[j]);
  };
  const int64_t n64 = n & ~int64_t{63};
  for (int64_t i = 0; i < n64; i += 64) block(row + i);
  if (n64 < n) {
    alignas(32) float tmp[64];
    for (int64_t j = 0; j < 64; ++j) tmp[j] = n64 + j < n ? row[n64 + j] : pad;
    block(tmp);
  }
  for (int j = 0; j < 4; ++j) s[j] = _mm256_add_ps(s[j], s[j + 4]);  // lane + 32
  for (int j = 0; j < 2; ++j) s[j] = _mm256_add_ps(s[j], s[j + 2]);  // + 16
  return hsum(_mm256_add_ps(s[0], s[1]));                              // + 8, + 4, + 2, + 1
}

void row_epilogue(float* row, int64_t n, const float* gamma, const float* beta, float eps, int32_t activation,
                  const RowCodes* codes, const float* /*next_row*/) {
  const int64_t nv = n & ~int64_t{7};
  float mean = 0.0f, rstd = 0.0f;
  if (gamma != nullptr) {
    mean = lane_sum(row, n, 0.0f, [](__m256 x, __m256 s) { return _mm256_add_ps(s, x); }) / static_cast<float>(n);
    const __m256 vmean = _mm256_set1_ps(mean);
    const float sq = lane_sum(row, n, mean, [&](__m256 x, __m256 s) {
      const __m256 d = _mm256_sub_ps(x, vmean);
      return _mm256_fmadd_ps(d, d, s);
    });
    rstd = 1.0f / std::sqrt(sq / static_cast<float>(n) + eps);
  }
  const __m256 vmean = _mm256_set1_ps(mean), vrstd = _mm256_set1_ps(rstd);
  auto apply = [&](__m256 x, const float* g, const float* b) {
    if (gamma != nullptr)
      x = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_sub_ps(x, vmean), vrstd), _mm256_loadu_ps(g), _mm256_loadu_ps(b));
    return activation < 0 ? x : math::activate<Ops256>(x, activation);
  };
  if (codes != nullptr) {  // the next layer's codes (int16, "pairs" layout) instead of the row
    int16_t* q = reinterpret_cast<int16_t*>(codes->codes);
    const __m256 vs = _mm256_set1_ps(codes->scale);
    const float* smooth = codes->smooth;
    for (int64_t i = 0; i < nv; i += 8) {
      __m256 y = apply(_mm256_loadu_ps(row + i), gamma ? gamma + i : nullptr, beta ? beta + i : nullptr);
      if (smooth != nullptr) y = _mm256_div_ps(y, _mm256_loadu_ps(smooth + i));
      const __m256i c = codes8(y, vs);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i),
                       _mm_packs_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1)));
    }
    if (nv < n) {  // tail through padded vectors so the tail rounds like the body, then code1 (the same operations)
      alignas(32) float tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0}, g[8] = {0, 0, 0, 0, 0, 0, 0, 0}, b[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int64_t i = nv; i < n; ++i) {
        tmp[i - nv] = row[i];
        if (gamma != nullptr) {
          g[i - nv] = gamma[i];
          b[i - nv] = beta[i];
        }
      }
      _mm256_store_ps(tmp, apply(_mm256_load_ps(tmp), g, b));
      for (int64_t i = nv; i < n; ++i)
        q[i] = code1(tmp[i - nv], smooth != nullptr ? smooth + i : nullptr, codes->scale);
    }
    for (int64_t i = n; i < pairs_code_bytes(n) / 2; ++i) q[i] = 0;
    return;
  }
  if (gamma == nullptr && activation < 0) return;
  for (int64_t i = 0; i < nv; i += 8)
    _mm256_storeu_ps(row + i, apply(_mm256_loadu_ps(row + i), gamma ? gamma + i : nullptr, beta ? beta + i : nullptr));
  if (nv < n) {  // tail through padded vectors so the tail rounds like the body
    alignas(32) float tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0}, g[8] = {0, 0, 0, 0, 0, 0, 0, 0}, b[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t i = nv; i < n; ++i) {
      tmp[i - nv] = row[i];
      if (gamma != nullptr) {
        g[i - nv] = gamma[i];
        b[i - nv] = beta[i];
      }
    }
    _mm256_store_ps(tmp, apply(_mm256_load_ps(tmp), g, b));
    for (int64_t i = nv; i < n; ++i) row[i] = tmp[i - nv];
  }
}

void glu_row(const float* gate, const float* up, float* h, int64_t n, const Glu& glu) {
  const __m256 alpha = _mm256_set1_ps(glu.alpha), limit = _mm256_set1_ps(glu.limit);
  math::with_activation(glu.activation, [&](auto act) {
    constexpr int32_t kAct = decltype(act)::value;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(h + i,
                       math::glu<Ops256>(_mm256_loadu_ps(gate + i), _mm256_loadu_ps(up + i), kAct, alpha, limit));
    if (i < n) {  // tail through padded vectors so the tail rounds like the body
      alignas(32) float g[8] = {0, 0, 0, 0, 0, 0, 0, 0}, u[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int64_t j = i; j < n; ++j) {
        g[j - i] = gate[j];
        u[j - i] = up[j];
      }
      _mm256_store_ps(g, math::glu<Ops256>(_mm256_load_ps(g), _mm256_load_ps(u), kAct, alpha, limit));
      for (int64_t j = i; j < n; ++j) h[j] = g[j - i];
    }
  });
}

void half_to_float_row(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = _cvtsh_ss(src[i]);
}

void float_to_half_row(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  for (; i < n; ++i) dst[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

}  // namespace

const Kernels* avx2_kernels() {
  static const Kernels kernels{"avx2",        gemm_f32, pairs_panel_bytes, pairs_code_bytes,  pack_i8_pairs,
                               quantize_row,  gemm_i8,  glu_row,           divide_row,        row_epilogue,
                               half_to_float_row, float_to_half_row};
  return &kernels;
}

}  // namespace isa
}  // namespace cpu
}  // namespace pimoe
