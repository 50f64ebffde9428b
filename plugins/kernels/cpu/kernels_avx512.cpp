// AVX-512 inner kernels: fp32 GEMM on 512-bit FMAs, int8 GEMM on VNNI (vpdpbusd), 16-lane epilogues. Built twice
// from this one source (plugins/kernels/CMakeLists.txt):
// - "avx512": native instructions (-mavx512f -mavx512bw -mavx512dq -mavx512vl -mavx512vnni), only called after a
//   run-time CPU check (kernels_select.cpp), so the library still loads on older CPUs;
// - "avx512-simde" (PIMOE_AVX512_SIMDE): the same intrinsics from SIMDe's portable implementations, compiled for
//   AVX2 + FMA + F16C, so that machines without AVX-512 run this code and its tests (PIMOE_CPU_ISA=avx512-simde).
// Results are those of isa.h: the same bits as the AVX2 table, fp32 included.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
// GCC 12's own AVX-512 intrinsics warn about their _mm512_undefined_*() placeholders once inlined (GCC bug 105593)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#if defined(PIMOE_AVX512_SIMDE)
#if defined(__AVX512F__)
#error "the SIMDe build must not use native AVX-512 instructions (it is the one that runs without them)"
#endif
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#define PIMOE_AVX512_TABLE avx512_simde_kernels
#define PIMOE_AVX512_NAME "avx512-simde"
#else
#include <immintrin.h>
#define PIMOE_AVX512_TABLE avx512_kernels
#define PIMOE_AVX512_NAME "avx512"
#endif

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

// ------------------------------------------------------------------------------------------ register blocks
// A register block is MR rows x NR panels (16 columns each): MR * NR accumulators (zmm) + NR weight vectors + one
// broadcast in 32 registers. Rows: blocks of kMaxRows, the last two sharing their rows evenly (like the AVX2
// kernels: a 1- or 2-row block re-reads its panels for little work); panels: groups of kMaxPanels.
constexpr int kMaxRows = 6;
constexpr int kMaxPanels = 4;

inline int64_t block_rows(int64_t left) {
  if (left <= kMaxRows) return left;
  if (left >= 2 * kMaxRows) return kMaxRows;
  return (left + 1) / 2;
}

template <int N, typename F>
inline void with_constant(int64_t n, F&& body) {  // body(std::integral_constant<int, n>) for 1 <= n <= N
  if constexpr (N > 1) {
    if (n < N) return with_constant<N - 1>(n, body);
  }
  body(std::integral_constant<int, N>{});
}

// body(first_row, first_panel, integral_constant MR, integral_constant NR) over the m x np block: panel groups
// outside (a group's weights stay in L1/L2 while every row block passes over them), row blocks inside. Every
// element's sum runs the same k order in any block, so the blocking does not change results.
template <typename F>
inline void for_register_blocks(int64_t m, int64_t np, F&& body) {
  for (int64_t p = 0; p < np; p += kMaxPanels) {
    const int64_t nr = std::min<int64_t>(kMaxPanels, np - p);
    with_constant<kMaxPanels>(nr, [&](auto nr_c) {
      for (int64_t r = 0; r < m;) {
        const int64_t mr = block_rows(m - r);
        with_constant<kMaxRows>(mr, [&](auto mr_c) { body(r, p, mr_c, nr_c); });
        r += mr;
      }
    });
  }
}

constexpr int64_t kLanes = 16;  // floats per zmm (= kPanel)

// lanes [0, n) of a vector, n clamped to [0, kLanes]
inline __mmask16 lanes(int64_t n) {
  return n >= kLanes ? static_cast<__mmask16>(0xFFFF) : n <= 0 ? static_cast<__mmask16>(0)
                                                                : static_cast<__mmask16>((1u << n) - 1u);
}

// The first n lanes (n clamped to [0, kLanes]) from memory, the others 0; and to memory, the rest untouched. Nothing
// past them is read or written: SIMDe 0.8's masked loads and stores access all 16 lanes (and its masked store
// writes zeros into the masked-off ones), so its build copies through a buffer.
inline __m512 load_first(const float* p, int64_t n) {
  if (n >= kLanes) return _mm512_loadu_ps(p);
#if defined(PIMOE_AVX512_SIMDE)
  alignas(64) float tmp[16] = {};
  if (n > 0) std::memcpy(tmp, p, static_cast<size_t>(n) * sizeof(float));
  return _mm512_load_ps(tmp);
#else
  return _mm512_maskz_loadu_ps(lanes(n), p);
#endif
}

inline void store_first(float* p, int64_t n, __m512 v) {
  if (n >= kLanes) return _mm512_storeu_ps(p, v);
#if defined(PIMOE_AVX512_SIMDE)
  alignas(64) float tmp[16];
  _mm512_store_ps(tmp, v);
  if (n > 0) std::memcpy(p, tmp, static_cast<size_t>(n) * sizeof(float));
#else
  _mm512_mask_storeu_ps(p, lanes(n), v);
#endif
}

// The accumulators are named variables (cRJ: row R, panel J), not an array: GCC keeps an array of 24 zmm in memory.
// PIMOE_RJ(X) expands X(R, J) over the whole 6 x 4 grid; the micro-kernels use the cells with R < MR and J < NR.
static_assert(kMaxRows == 6 && kMaxPanels == 4, "PIMOE_RJ spells out the 6 x 4 register block");
#define PIMOE_ROW_CELLS(X, R) X(R, 0) X(R, 1) X(R, 2) X(R, 3)
#define PIMOE_RJ(X) \
  PIMOE_ROW_CELLS(X, 0) PIMOE_ROW_CELLS(X, 1) PIMOE_ROW_CELLS(X, 2) PIMOE_ROW_CELLS(X, 3) PIMOE_ROW_CELLS(X, 4) \
  PIMOE_ROW_CELLS(X, 5)

// ------------------------------------------------------------------------------------------ fp32 GEMM
// Row r's NR result vectors go to out(r, v), the block's output stage: here bias or C added and stored. (A gated
// layer's GLU runs on each GEMM task's [gate | up] tile while it is in L1, through glu_row: expert_mlp.cpp.)
template <int MR, int NR, typename Out>
inline void f32_block(const float* a, int64_t lda, const float* panels, int64_t stride, int64_t k, Out&& out) {
#define PIMOE_DECLARE(R, J) __m512 c##R##J = _mm512_setzero_ps();
  PIMOE_RJ(PIMOE_DECLARE)
#undef PIMOE_DECLARE
  const float* w0 = panels;
  const float* w1 = panels + stride * (NR > 1 ? 1 : 0);
  const float* w2 = panels + stride * (NR > 2 ? 2 : 0);
  const float* w3 = panels + stride * (NR > 3 ? 3 : 0);
  for (int64_t kk = 0; kk < k; ++kk) {
    const __m512 b0 = _mm512_loadu_ps(w0 + kk * kPanel);
    const __m512 b1 = NR > 1 ? _mm512_loadu_ps(w1 + kk * kPanel) : b0;
    const __m512 b2 = NR > 2 ? _mm512_loadu_ps(w2 + kk * kPanel) : b0;
    const __m512 b3 = NR > 3 ? _mm512_loadu_ps(w3 + kk * kPanel) : b0;
#define PIMOE_FMA(R, J)                                                             \
  if constexpr (MR > R && NR > J) {                                                 \
    if constexpr (J == 0) a##R = _mm512_set1_ps(a[R * lda + kk]);                   \
    c##R##J = _mm512_fmadd_ps(a##R, b##J, c##R##J);                                 \
  }
    __m512 a0, a1, a2, a3, a4, a5;
    PIMOE_RJ(PIMOE_FMA)
#undef PIMOE_FMA
    (void)a0, (void)a1, (void)a2, (void)a3, (void)a4, (void)a5, (void)b1, (void)b2, (void)b3;
  }
#define PIMOE_OUT(R)                                     \
  if constexpr (MR > R) {                                \
    const __m512 v[kMaxPanels] = {c##R##0, c##R##1, c##R##2, c##R##3}; \
    out(R, v);                                           \
  }
  PIMOE_OUT(0) PIMOE_OUT(1) PIMOE_OUT(2) PIMOE_OUT(3) PIMOE_OUT(4) PIMOE_OUT(5)
#undef PIMOE_OUT
}

void gemm_f32(const float* a, int64_t lda, int64_t m, const float* panels, int64_t panel_stride, int64_t np, int64_t k,
              const float* bias, float* c, int64_t ldc, int64_t n_valid, bool accumulate) {
  for_register_blocks(m, np, [&](int64_t r0, int64_t p0, auto mr, auto nr) {
    constexpr int NR = decltype(nr)::value;
    float* c0 = c + r0 * ldc + p0 * kPanel;
    const float* b0 = bias + p0 * kPanel;
    int64_t valid[NR];  // columns of each panel to store
    for (int j = 0; j < NR; ++j) valid[j] = n_valid - (p0 + j) * kPanel;
    f32_block<decltype(mr)::value, NR>(
        a + r0 * lda, lda, panels + p0 * panel_stride, panel_stride, k, [&](int r, const __m512(&v)[kMaxPanels]) {
          for (int j = 0; j < NR; ++j) {
            float* dst = c0 + r * ldc + j * kPanel;
            const __m512 base = accumulate ? load_first(dst, valid[j]) : _mm512_loadu_ps(b0 + j * kPanel);
            store_first(dst, valid[j], _mm512_add_ps(base, v[j]));
          }
        });
  });
}

// ------------------------------------------------------------------------------------------ int8 GEMM (VNNI)
// "quads" layout (isa.h): per panel 16 int32 column terms (128 * sum_k w), then ceil(K / 4) quads of 64 bytes.
constexpr int64_t kTermBytes = kPanel * 4;

int64_t quads_panel_bytes(int64_t k) { return kTermBytes + (k + 3) / 4 * 4 * kPanel; }
int64_t quads_code_bytes(int64_t k) { return (k + 3) / 4 * 4; }

void pack_i8_quads(const int8_t* w, int64_t out, int64_t in, int8_t* packed) {
  const int64_t panels = (out + kPanel - 1) / kPanel, panel_bytes = quads_panel_bytes(in);
  std::memset(packed, 0, static_cast<size_t>(panels * panel_bytes));
  for (int64_t o = 0; o < out; ++o) {
    int8_t* panel = packed + (o / kPanel) * panel_bytes;
    int32_t sum = 0;
    for (int64_t i = 0; i < in; ++i) {
      panel[kTermBytes + (i / 4) * 4 * kPanel + (o % kPanel) * 4 + (i % 4)] = w[o * in + i];
      sum += w[o * in + i];
    }
    const int32_t term = 128 * sum;
    std::memcpy(panel + (o % kPanel) * 4, &term, sizeof term);
  }
}

// Codes are a + 128 (unsigned), weights signed: vpdpbusd adds four (a + 128) * w products into each int32 lane,
// onto the negated column terms (- 128 sum_k w), so out(r, v) gets row r's exact sums sum_k a w. Cache line q of
// ``prefetch`` is prefetched at k step q < prefetch_lines. Never inlined: GCC 12, inlining a smaller block (4 x 4)
// into gemm_i8, kept its accumulators in rotating register copies (a vmovdqa32 per accumulator and k step), ~11%
// of the T = 128 GEMM time.
template <int MR, int NR, typename Out>
__attribute__((noinline)) void i8_block(const uint8_t* codes, int64_t lda, const int8_t* panels, int64_t panel_bytes,
                                        int64_t k4, const int8_t* prefetch, int64_t prefetch_lines, Out&& out) {
  __m512i t[kMaxPanels];
  for (int j = 0; j < kMaxPanels; ++j)
    t[j] = j < NR ? _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_loadu_si512(panels + j * panel_bytes))
                  : _mm512_setzero_si512();
#define PIMOE_DECLARE(R, J) __m512i c##R##J = t[J];
  PIMOE_RJ(PIMOE_DECLARE)
#undef PIMOE_DECLARE
  const int8_t* w0 = panels + kTermBytes;
  const int8_t* w1 = w0 + panel_bytes * (NR > 1 ? 1 : 0);
  const int8_t* w2 = w0 + panel_bytes * (NR > 2 ? 2 : 0);
  const int8_t* w3 = w0 + panel_bytes * (NR > 3 ? 3 : 0);
  for (int64_t q = 0; q < k4; ++q) {
    const int64_t off = q * 4 * kPanel;
    if (q < prefetch_lines) _mm_prefetch(reinterpret_cast<const char*>(prefetch + q * 64), _MM_HINT_T1);
    const __m512i b0 = _mm512_loadu_si512(w0 + off);
    const __m512i b1 = NR > 1 ? _mm512_loadu_si512(w1 + off) : b0;
    const __m512i b2 = NR > 2 ? _mm512_loadu_si512(w2 + off) : b0;
    const __m512i b3 = NR > 3 ? _mm512_loadu_si512(w3 + off) : b0;
#define PIMOE_DP(R, J)                                              \
  if constexpr (MR > R && NR > J) {                                 \
    if constexpr (J == 0) {                                         \
      int32_t quad;                                                 \
      std::memcpy(&quad, codes + R * lda + 4 * q, sizeof quad);     \
      a##R = _mm512_set1_epi32(quad);                               \
    }                                                               \
    c##R##J = _mm512_dpbusd_epi32(c##R##J, a##R, b##J);             \
  }
    __m512i a0, a1, a2, a3, a4, a5;
    PIMOE_RJ(PIMOE_DP)
#undef PIMOE_DP
    (void)a0, (void)a1, (void)a2, (void)a3, (void)a4, (void)a5, (void)b1, (void)b2, (void)b3;
  }
#define PIMOE_OUT(R)                                                             \
  if constexpr (MR > R) {                                                        \
    const __m512i v[kMaxPanels] = {c##R##0, c##R##1, c##R##2, c##R##3};          \
    out(R, v);                                                                   \
  }
  PIMOE_OUT(0) PIMOE_OUT(1) PIMOE_OUT(2) PIMOE_OUT(3) PIMOE_OUT(4) PIMOE_OUT(5)
#undef PIMOE_OUT
}

// The weights stream from L3 or memory (a call's experts hold megabytes of them), once per panel group, while the
// register blocks of the group's later rows reuse them from L1/L2: the panels of the next group (or the caller's
// next ones, np_after) are prefetched into L2 in slices, one cache line per k step of each row block, so that the
// next group's first row block finds them there. Prefetches change no result.
void gemm_i8(const uint8_t* codes, int64_t lda, int64_t m, const int8_t* panels, int64_t np, int64_t np_after,
             int64_t k, const float* a_scale, const float* w_scale, const float* bias, float* c, int64_t ldc,
             int64_t n_valid) {
  const int64_t panel_bytes = quads_panel_bytes(k), k4 = (k + 3) / 4;
  int64_t row_blocks = 0;
  for (int64_t r = 0; r < m; r += block_rows(m - r)) ++row_blocks;
  // for_register_blocks runs the groups outside, rows inside: a group's first row block (r0 = 0) sizes the slices
  int64_t lines = 0, slice = 0, first = 0;
  for_register_blocks(m, np, [&](int64_t r0, int64_t p0, auto mr, auto nr) {
    constexpr int NR = decltype(nr)::value;
    float* c0 = c + r0 * ldc + p0 * kPanel;
    int64_t valid[NR];  // columns of each panel to store
    for (int j = 0; j < NR; ++j) valid[j] = n_valid - (p0 + j) * kPanel;
    // this row block's slice of the next group's cache lines
    const int64_t next = p0 + kMaxPanels;
    if (r0 == 0) {
      const int64_t next_end = std::min(next + kMaxPanels, np + np_after);
      lines = next < next_end ? (next_end - next) * panel_bytes / 64 : 0;
      slice = (lines + row_blocks - 1) / row_blocks;
      first = 0;
    } else {
      first += slice;
    }
    const int64_t count = std::min({slice, lines - first, k4});
    const int8_t* prefetch = count > 0 ? panels + next * panel_bytes + first * 64 : nullptr;
    // The output stage, inlined into the register block (as an out-of-line call per row, reading every pointer
    // through its captures, it was ~12% of a K = 512 layer's GEMM time); it captures plain values
    const float* const as_rows = a_scale + r0;
    const float* const ws_cols = w_scale + p0 * kPanel;
    const float* const bias_cols = bias + p0 * kPanel;
    int full = 0;  // the leading panels whose 16 columns are all stored
    while (full < NR && valid[full] >= kPanel) ++full;
    i8_block<decltype(mr)::value, NR>(
        codes + r0 * lda, lda, panels + p0 * panel_bytes, panel_bytes, k4, prefetch, count,
        [=](int r, const __m512i(&v)[kMaxPanels]) __attribute__((always_inline)) {
          // separate multiply and add, like the PyTorch reference (acc * (a_scale * w_scale) + bias)
          const __m512 as = _mm512_set1_ps(as_rows[r]);
          float* const dst = c0 + r * ldc;
          for (int j = 0; j < NR; ++j) {
            const __m512 s = _mm512_mul_ps(as, _mm512_loadu_ps(ws_cols + j * kPanel));
            const __m512 y = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(v[j]), s),
                                           _mm512_loadu_ps(bias_cols + j * kPanel));
            if (j < full)
              _mm512_storeu_ps(dst + j * kPanel, y);
            else
              store_first(dst + j * kPanel, valid[j], y);
          }
        });
  });
}

// the first n (<= 16) of 16 codes to memory, nothing past them
inline void store_codes(uint8_t* dst, int64_t n, __m128i u) {
  if (n >= kLanes) return _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), u);
  alignas(16) uint8_t tmp[16];
  _mm_store_si128(reinterpret_cast<__m128i*>(tmp), u);
  std::memcpy(dst, tmp, static_cast<size_t>(n));
}

// The codes of a row, 16 values at a time: clamp(round_half_even((x / smooth) / scale), -127, 127), NaN -> 0, as
// bytes a + 128
class Quantizer {
 public:
  explicit Quantizer(const RowCodes& c) : smooth_(c.smooth), vscale_(_mm512_set1_ps(c.scale)) {}

  // codes of the first n (<= 16) lanes of x, the row's values i.., to dst
  void operator()(__m512 x, int64_t i, int64_t n, uint8_t* dst) const {
    const __m512 v = smooth_ != nullptr ? _mm512_div_ps(x, load_first(smooth_ + i, n)) : x;  // lanes past n: unused
    __m512 q = _mm512_div_ps(v, vscale_);
    q = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(q, q, _CMP_UNORD_Q), q, _mm512_setzero_ps());  // NaN -> 0
    q = _mm512_min_ps(_mm512_max_ps(q, _mm512_set1_ps(-127.0f)), _mm512_set1_ps(127.0f));
    const __m512i c = _mm512_cvtps_epi32(q);  // round half to even (default MXCSR)
    // [-127, 127] -> int8 (no saturation happens) -> + 128 as the byte's top bit flipped
    store_codes(dst, n, _mm_xor_si128(_mm512_cvtsepi32_epi8(c), _mm_set1_epi8(static_cast<char>(0x80))));
  }

 private:
  const float* smooth_;
  __m512 vscale_;
};

void quantize_row(const float* x, int64_t n, const RowCodes& c) {
  const Quantizer quantize(c);
  for (int64_t i = 0; i < n; i += 16) quantize(load_first(x + i, n - i), i, n - i, c.codes + i);
  for (int64_t i = n; i < quads_code_bytes(n); ++i) c.codes[i] = 128;  // the code of 0
}

void divide_row(const float* x, const float* d, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(out + i, _mm512_div_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(d + i)));
  for (; i < n; ++i) out[i] = x[i] / d[i];
}

// ------------------------------------------------------------------------------------------ row epilogue
// simd_math.h's lane operations on 16 lanes
struct Ops512 {
  using F = __m512;
  using M = __mmask16;
  static F set(float v) { return _mm512_set1_ps(v); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F div(F a, F b) { return _mm512_div_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F fnma(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }
  static F max(F a, F b) { return _mm512_max_ps(a, b); }
  static F min(F a, F b) { return _mm512_min_ps(a, b); }
  static F round(F a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static void pow2(F n, F* s1, F* s2) {
    const __m512i ni = _mm512_cvtps_epi32(n);
    const __m512i h1 = _mm512_srai_epi32(ni, 1);
    const __m512i h2 = _mm512_sub_epi32(ni, h1);
    *s1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(h1, _mm512_set1_epi32(127)), 23));
    *s2 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(h2, _mm512_set1_epi32(127)), 23));
  }
  static F sign(F a) { return _mm512_and_ps(a, _mm512_set1_ps(-0.0f)); }
  static F abs(F a) { return _mm512_andnot_ps(_mm512_set1_ps(-0.0f), a); }
  static F or_sign(F a, F s) { return _mm512_or_ps(a, s); }
  static M is_nan(F a) { return _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q); }
  static M gt(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
  static M lt(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
  static F select(M m, F a, F b) { return _mm512_mask_blend_ps(m, b, a); }
};

// The canonical 64-lane sum (isa.h) of term(x) over the row in four 16-lane accumulators (lanes 0..15, 16..31,
// 32..47, 48..63). In the tail the missing lanes get term(x, valid mask) = the accumulator unchanged.
template <typename Term>
float lane_sum(const float* row, int64_t n, Term term) {
  static_assert(math::kNormLanes == 64, "four 16-lane accumulators");
  __m512 s[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  const __mmask16 all = lanes(16);
  const int64_t n64 = n & ~int64_t{63};
  for (int64_t i = 0; i < n64; i += 64)
    for (int j = 0; j < 4; ++j) s[j] = term(_mm512_loadu_ps(row + i + 16 * j), s[j], all);
  for (int j = 0; j < 4 && n64 + 16 * j < n; ++j) {
    const int64_t left = n - n64 - 16 * j;
    s[j] = term(load_first(row + n64 + 16 * j, left), s[j], lanes(left));
  }
  const __m512 s16 = _mm512_add_ps(_mm512_add_ps(s[0], s[2]), _mm512_add_ps(s[1], s[3]));  // + 32, then + 16
  const __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(s16), _mm512_extractf32x8_ps(s16, 1));
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
}

// y = fma((x - mean) * rstd, gamma, beta) when kNorm, then the activation, 16 lanes at a time, to the row or (with
// codes) to the next layer's codes
template <bool kNorm, int32_t kAct>
void normalize_activate(float* row, int64_t n, const float* gamma, const float* beta, float mean, float rstd,
                        const RowCodes* codes, const float* next_row) {
  const __m512 vmean = _mm512_set1_ps(mean), vrstd = _mm512_set1_ps(rstd);
  auto apply = [&](__m512 x, __m512 g, __m512 b) {
    if constexpr (kNorm) x = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_sub_ps(x, vmean), vrstd), g, b);
    if constexpr (kAct >= 0) x = math::activate<Ops512>(x, kAct);
    return x;
  };
  const Quantizer quantize(codes != nullptr ? *codes : RowCodes{nullptr, 1.0f, nullptr});
  auto put = [&](int64_t i, int64_t left, __m512 y) {
    if (codes == nullptr)
      store_first(row + i, left, y);
    else
      quantize(y, i, left, codes->codes + i);
  };
  const int64_t n16 = n & ~int64_t{15};
  auto body = [&](int64_t i) {
    if (next_row != nullptr) _mm_prefetch(reinterpret_cast<const char*>(next_row + i), _MM_HINT_T1);
    const __m512 g = kNorm ? _mm512_loadu_ps(gamma + i) : vmean, b = kNorm ? _mm512_loadu_ps(beta + i) : vmean;
    return apply(_mm512_loadu_ps(row + i), g, b);
  };
  // four independent vectors per step: each one's activation is a long chain of dependent operations (~130 cycles
  // of latency), which the core only overlaps with others when they are in flight together
  int64_t i = 0;
  for (; i + 64 <= n16; i += 64) {
    const __m512 y0 = body(i), y1 = body(i + 16), y2 = body(i + 32), y3 = body(i + 48);
    put(i, kLanes, y0);
    put(i + 16, kLanes, y1);
    put(i + 32, kLanes, y2);
    put(i + 48, kLanes, y3);
  }
  for (; i < n16; i += 16) put(i, kLanes, body(i));
  if (n16 < n) {
    const int64_t left = n - n16;
    const __m512 g = kNorm ? load_first(gamma + n16, left) : vmean;
    const __m512 b = kNorm ? load_first(beta + n16, left) : vmean;
    put(n16, left, apply(load_first(row + n16, left), g, b));
  }
  if (codes != nullptr)
    for (int64_t j = n; j < quads_code_bytes(n); ++j) codes->codes[j] = 128;  // the code of 0
}

// The row was written by the GEMM tasks, on any core, and is read from L3 or another core's cache: next_row, the
// caller's next one, is prefetched into L2 meanwhile, one cache line per 16 values of this row's last pass.
void row_epilogue(float* row, int64_t n, const float* gamma, const float* beta, float eps, int32_t activation,
                  const RowCodes* codes, const float* next_row) {
  if (gamma == nullptr) {
    math::with_activation(activation, [&](auto act) {
      constexpr int32_t kAct = decltype(act)::value;
      if (kAct >= 0 || codes != nullptr)
        normalize_activate<false, kAct>(row, n, nullptr, nullptr, 0, 0, codes, next_row);
    });
    return;
  }
  const float mean =
      lane_sum(row, n, [](__m512 x, __m512 s, __mmask16) { return _mm512_add_ps(s, x); }) / static_cast<float>(n);
  const __m512 vmean = _mm512_set1_ps(mean);
  const float sq = lane_sum(row, n, [&](__m512 x, __m512 s, __mmask16 m) {
    const __m512 d = _mm512_maskz_sub_ps(m, x, vmean);  // 0 in the missing lanes: fma(0, 0, s) = s
    return _mm512_fmadd_ps(d, d, s);
  });
  const float rstd = 1.0f / std::sqrt(sq / static_cast<float>(n) + eps);
  math::with_activation(activation, [&](auto act) {
    normalize_activate<true, decltype(act)::value>(row, n, gamma, beta, mean, rstd, codes, next_row);
  });
}

void glu_row(const float* gate, const float* up, float* h, int64_t n, const Glu& glu) {
  const __m512 alpha = _mm512_set1_ps(glu.alpha), limit = _mm512_set1_ps(glu.limit);
  math::with_activation(glu.activation, [&](auto act) {
    constexpr int32_t kAct = decltype(act)::value;
    for (int64_t i = 0; i < n; i += kLanes) {
      const int64_t left = n - i;
      store_first(h + i, left, math::glu<Ops512>(load_first(gate + i, left), load_first(up + i, left), kAct, alpha,
                                                 limit));
    }
  });
}

// fp16 <-> fp32 with F16C (256 bits; both builds have it)
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

const Kernels* PIMOE_AVX512_TABLE() {
  static const Kernels kernels{PIMOE_AVX512_NAME, gemm_f32, quads_panel_bytes, quads_code_bytes,  pack_i8_quads,
                               quantize_row,      gemm_i8,  glu_row,           divide_row,        row_epilogue,
                               half_to_float_row, float_to_half_row};
  return &kernels;
}

}  // namespace isa
}  // namespace cpu
}  // namespace pimoe
