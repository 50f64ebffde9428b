// AVX2 + FMA + F16C inner kernels. This file alone is compiled with -mavx2 -mfma -mf16c; it is only
// called after a run-time CPU check (expert_mlp.cpp), so the library still loads on older CPUs.
#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <type_traits>

#include "isa.h"

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

void gemm_f32_panel(const float* a, int64_t lda, int64_t m, const float* panel, int64_t k, const float* bias,
                    float* c, int64_t ldc, int64_t n_valid, bool acc) {
  for_register_blocks(m, [&](int64_t r, auto mr) {
    micro_kernel<decltype(mr)::value>(a + r * lda, lda, panel, k, bias, c + r * ldc, ldc, n_valid, acc);
  });
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

void gemm_i8_panel(const int16_t* qa, int64_t lda, int64_t m, const int8_t* panel, int64_t k2, const float* a_scale,
                   const float* w_scale, const float* bias, float* c, int64_t ldc, int64_t n_valid) {
  for_register_blocks(m, [&](int64_t r, auto mr) {
    micro_kernel_i8<decltype(mr)::value>(qa + r * lda, lda, panel, k2, a_scale + r, w_scale, bias, c + r * ldc, ldc,
                                         n_valid);
  });
}

void quantize_row(const float* x, int64_t n, float scale, int16_t* q, int64_t n_padded) {
  const __m256 vs = _mm256_set1_ps(scale), lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
  auto codes = [&](__m256 v) {
    v = _mm256_div_ps(v, vs);
    v = _mm256_blendv_ps(v, _mm256_setzero_ps(), _mm256_cmp_ps(v, v, _CMP_UNORD_Q));  // NaN -> 0
    v = _mm256_min_ps(_mm256_max_ps(v, lo), hi);
    return _mm256_cvtps_epi32(v);  // round half to even (default MXCSR)
  };
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i a = codes(_mm256_loadu_ps(x + i)), b = codes(_mm256_loadu_ps(x + i + 8));
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i), packed);
  }
  for (; i < n; ++i) {
    float v = x[i] / scale;
    if (v != v) v = 0.0f;
    v = v < -127.0f ? -127.0f : (v > 127.0f ? 127.0f : v);
    q[i] = static_cast<int16_t>(std::nearbyint(v));
  }
  for (; i < n_padded; ++i) q[i] = 0;
}

void divide_row(const float* x, const float* d, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, _mm256_div_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(d + i)));
  for (; i < n; ++i) out[i] = x[i] / d[i];
}

// ------------------------------------------------------------------------------------------ vector math
// exp: x = n ln2 + r, |r| <= ln2/2, 2^n built in the exponent field, e^r by a degree-6 polynomial
// (relative error ~2 ulp). NaN in -> NaN out; overflow -> inf; underflow -> 0.
inline __m256 exp256(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.7228394f), lo = _mm256_set1_ps(-103.972076f);
  const __m256 nan_mask = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
  const __m256 over = _mm256_cmp_ps(x, hi, _CMP_GT_OQ);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  const __m256 xc = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860682030941723212e-6f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720.0f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  // 2^n in two halves so that n down to -150 (subnormal results) stays representable
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i half1 = _mm256_srai_epi32(ni, 1);
  const __m256i half2 = _mm256_sub_epi32(ni, half1);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half1, _mm256_set1_epi32(127)), 23));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half2, _mm256_set1_epi32(127)), 23));
  __m256 result = _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
  result = _mm256_blendv_ps(result, _mm256_set1_ps(INFINITY), over);
  result = _mm256_blendv_ps(result, _mm256_setzero_ps(), under);
  return _mm256_blendv_ps(result, x, nan_mask);
}

// erf by Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7), odd-symmetric.
inline __m256 erf256(__m256 x) {
  const __m256 sign = _mm256_and_ps(x, _mm256_set1_ps(-0.0f));
  const __m256 ax = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x);
  const __m256 t = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_fmadd_ps(_mm256_set1_ps(0.3275911f), ax,
                                                                       _mm256_set1_ps(1.0f)));
  __m256 p = _mm256_set1_ps(1.061405429f);
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-1.453152027f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.421413741f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-0.284496736f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.254829592f));
  p = _mm256_mul_ps(p, t);
  const __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(ax, ax)));
  const __m256 y = _mm256_fnmadd_ps(p, e, _mm256_set1_ps(1.0f));
  return _mm256_or_ps(y, sign);
}

// tanh: odd polynomial below 0.3 (no cancellation), 1 - 2 / (e^{2|x|} + 1) above.
inline __m256 tanh256(__m256 x) {
  const __m256 sign = _mm256_and_ps(x, _mm256_set1_ps(-0.0f));
  const __m256 ax = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x);
  const __m256 x2 = _mm256_mul_ps(x, x);
  __m256 p = _mm256_set1_ps(21844.0f / 6081075.0f);
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-1382.0f / 155925.0f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(62.0f / 2835.0f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-17.0f / 315.0f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(2.0f / 15.0f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-1.0f / 3.0f));
  const __m256 small = _mm256_fmadd_ps(_mm256_mul_ps(p, x2), x, x);
  const __m256 e = exp256(_mm256_add_ps(ax, ax));
  const __m256 large = _mm256_sub_ps(_mm256_set1_ps(1.0f),
                                     _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(e, _mm256_set1_ps(1.0f))));
  const __m256 use_small = _mm256_cmp_ps(ax, _mm256_set1_ps(0.3f), _CMP_LT_OQ);
  const __m256 result = _mm256_blendv_ps(_mm256_or_ps(large, sign), small, use_small);
  return _mm256_blendv_ps(result, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

inline __m256 activate256(__m256 x, int32_t activation) {
  const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f);
  switch (activation) {
    case 0:
      return _mm256_mul_ps(_mm256_mul_ps(half, x),
                           _mm256_add_ps(one, erf256(_mm256_mul_ps(x, _mm256_set1_ps(0.70710678118654752f)))));
    case 1: {
      const __m256 x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
      const __m256 inner = _mm256_mul_ps(_mm256_set1_ps(0.79788456080286536f),
                                         _mm256_fmadd_ps(_mm256_set1_ps(0.044715f), x3, x));
      return _mm256_mul_ps(_mm256_mul_ps(half, x), _mm256_add_ps(one, tanh256(inner)));
    }
    case 2: {  // relu; NaN stays NaN
      const __m256 r = _mm256_max_ps(x, _mm256_setzero_ps());
      return _mm256_blendv_ps(r, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    }
    case 3:
      return _mm256_div_ps(x, _mm256_add_ps(one, exp256(_mm256_sub_ps(_mm256_setzero_ps(), x))));
    default:
      return tanh256(x);
  }
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

void row_epilogue(float* row, int64_t n, const float* gamma, const float* beta, float eps, int32_t activation) {
  const int64_t nv = n & ~int64_t{7};
  if (gamma != nullptr) {
    __m256 s = _mm256_setzero_ps();
    for (int64_t i = 0; i < nv; i += 8) s = _mm256_add_ps(s, _mm256_loadu_ps(row + i));
    float sum = hsum(s);
    for (int64_t i = nv; i < n; ++i) sum += row[i];
    const float mean = sum / static_cast<float>(n);
    const __m256 vmean = _mm256_set1_ps(mean);
    __m256 q = _mm256_setzero_ps();
    for (int64_t i = 0; i < nv; i += 8) {
      const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(row + i), vmean);
      q = _mm256_fmadd_ps(d, d, q);
    }
    float sq = hsum(q);
    for (int64_t i = nv; i < n; ++i) sq += (row[i] - mean) * (row[i] - mean);
    const float rstd = 1.0f / std::sqrt(sq / static_cast<float>(n) + eps);
    const __m256 vrstd = _mm256_set1_ps(rstd);
    for (int64_t i = 0; i < nv; i += 8) {
      const __m256 d = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(row + i), vmean), vrstd);
      _mm256_storeu_ps(row + i, _mm256_fmadd_ps(d, _mm256_loadu_ps(gamma + i), _mm256_loadu_ps(beta + i)));
    }
    for (int64_t i = nv; i < n; ++i) row[i] = (row[i] - mean) * rstd * gamma[i] + beta[i];
  }
  if (activation < 0) return;
  for (int64_t i = 0; i < nv; i += 8) _mm256_storeu_ps(row + i, activate256(_mm256_loadu_ps(row + i), activation));
  if (nv < n) {  // tail through a padded vector so the tail rounds like the body
    alignas(32) float tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t i = nv; i < n; ++i) tmp[i - nv] = row[i];
    _mm256_store_ps(tmp, activate256(_mm256_load_ps(tmp), activation));
    for (int64_t i = nv; i < n; ++i) row[i] = tmp[i - nv];
  }
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
  static const Kernels kernels{"avx2", gemm_f32_panel, gemm_i8_panel, quantize_row, divide_row, row_epilogue,
                               half_to_float_row, float_to_half_row};
  return &kernels;
}

}  // namespace isa
}  // namespace cpu
}  // namespace pimoe
