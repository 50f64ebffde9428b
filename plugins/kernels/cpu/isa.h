// Per-ISA inner kernels of the CPU expert MLP (GEMM on packed weight panels, fused epilogues).
// One table per instruction set; kernels_select.cpp picks the best one the CPU supports at run time
// (PIMOE_CPU_ISA forces one).
//
// What every table computes, bit for bit (tests/ops/test_cpu_isa.py holds it):
// - w8a8: the same integers (exact int32 sums of int8 x int8 products), dequantised as
//   float(sum) * (a_scale[r] * w_scale[c]) + bias[c] (one multiply, one multiply, one add), and the same fp32
//   row epilogue (below): INT8 outputs are bit-identical on every ISA.
// - fp32 GEMM: each element is one chain of fused multiply-adds over k in order, starting from 0, added to bias
//   (or to C for the K blocks after the first). The SIMD tables (avx2, avx512, avx512-simde) give the same bits;
//   the portable kernels round each multiply and add separately (no FMA instruction to rely on).
// - gated layers: the GEMM's gate and up values as above, then simd_math.h's glu() lane by lane (glu_row).
// - row epilogue: LayerNorm and the activations in one canonical order (simd_math.h), the same on every ISA:
//   the row's sum and sum of squared deviations in 64 lanes (element i into lane i % 64, each lane in order of i,
//   squares by fused multiply-add; independent chains, so the sums run at the adder's throughput), the lanes
//   reduced by halving (lane j += lane j + 32, then + 16, + 8, + 4, + 2, + 1); mean = sum / n,
//   rstd = 1 / sqrt(sq / n + eps), y = fma((x - mean) * rstd, gamma, beta); activations by the polynomials of
//   simd_math.h.
#pragma once

#include <cstdint>

namespace pimoe {
namespace cpu {
namespace isa {

// Packed fp32 weight layout: for output columns [16p, 16p + 16) a panel of K x 16 floats, k-major,
// zero-padded past the last column. Panels follow each other (panel p at p * K * 16 floats).
constexpr int64_t kPanel = 16;

// Packed int8 weights and activation codes (w8a8) are in each table's own layout, sized by its functions:
// - "pairs" (generic, avx2): a panel is K2 = ceil(K / 2) k-pairs, per pair the 16 columns' two weights side by
//   side (c0k0, c0k1, c1k0, c1k1, ...), 32 bytes; activation codes are int16 (pmaddwd forms
//   w[c,k0]*a[k0] + w[c,k1]*a[k1] exactly), rows of 2 * K2 codes.
// - "quads" (avx512, avx512-simde): a panel is 16 int32 column terms (128 * sum_k w[k, c]) then K4 = ceil(K / 4)
//   k-quads of 64 bytes (c0k0..c0k3, c1k0..c1k3, ...); activation codes are uint8 a + 128 (VNNI's vpdpbusd
//   multiplies unsigned by signed bytes), rows of 4 * K4 codes; sum_k (a + 128) w - 128 sum_k w is the exact
//   sum_k a w (int32 arithmetic wraps, and the true sum fits in int32 whenever the pairs' sum does).
// Padding (columns past the last, k past K) is zero weight; padded codes are the code of 0.

// The GLU of a gated layer (contract v2): the contract's activation (swiglu_oai included) and swiglu_oai's constants
struct Glu {
  int32_t activation;
  float alpha, limit;
};

// Where and how a row's activation codes go (quantize_row, and row_epilogue for the next layer)
struct RowCodes {
  const float* smooth;  // SmoothQuant's divisors; nullptr: none (all ones)
  float scale;
  uint8_t* codes;
};

struct Kernels {
  const char* name;
  // C[r, c] = sum_k A[r, k] * W[k, c] + bias[c] for r < m, c < n_valid (<= 16 * np), over np consecutive panels
  // (panel j at panels + j * panel_stride floats, its bias at bias + 16 j, its columns at c + 16 j); with
  // ``accumulate`` the sum is added to C instead (bias unused): the driver splits K into cache-sized blocks this way.
  void (*gemm_f32)(const float* a, int64_t lda, int64_t m, const float* panels, int64_t panel_stride, int64_t np,
                   int64_t k, const float* bias, float* c, int64_t ldc, int64_t n_valid, bool accumulate);
  // w8a8 layout: bytes of one packed 16-column panel of K weights, bytes of one row of K activation codes
  int64_t (*i8_panel_bytes)(int64_t k);
  int64_t (*i8_code_bytes)(int64_t k);
  // int8 weights [out, in] (row-major) -> ceil(out / 16) panels of i8_panel_bytes(in) bytes each, at packed
  void (*pack_i8)(const int8_t* w, int64_t out, int64_t in, int8_t* packed);
  // q = clamp(round_half_even(v / scale), -127, 127) (NaN -> 0) with v = x[i] / smooth[i] (SmoothQuant's
  // per-channel divisor; v = x[i] when smooth is nullptr) for i < n as this layout's codes, to codes.codes; the
  // row's padding up to i8_code_bytes(n) holds the code of 0. Two IEEE divisions, as the reference does them: every
  // ISA agrees.
  void (*quantize_row)(const float* x, int64_t n, const RowCodes& codes);
  // C[r, c] = float(sum_k q[r, k] * w[k, c]) * (a_scale[r] * w_scale[c]) + bias[c] for r < m, c < n_valid
  // (<= 16 * np) over np consecutive packed panels (i8_panel_bytes(k) apart); code rows lda bytes apart.
  // ``np_after``: how many packed panels follow the np in memory (the caller's next ones, e.g. the next task's): a
  // table may prefetch them while it works; they are never read otherwise (0: none may be touched).
  void (*gemm_i8)(const uint8_t* codes, int64_t lda, int64_t m, const int8_t* panels, int64_t np, int64_t np_after,
                  int64_t k, const float* a_scale, const float* w_scale, const float* bias, float* c, int64_t ldc,
                  int64_t n_valid);
  // Gated layers: h[i] = math::glu(gate[i], up[i]) for i < n (simd_math.h; h may be gate or up)
  void (*glu_row)(const float* gate, const float* up, float* h, int64_t n, const Glu& glu);
  // out[i] = x[i] / d[i] for i < n (SmoothQuant's per-channel divisor; IEEE division, so every ISA agrees)
  void (*divide_row)(const float* x, const float* d, float* out, int64_t n);
  // In place on one row of n values: LayerNorm (when gamma != nullptr) then the activation (contract enum; < 0:
  // none), in the canonical order above. With ``codes`` (w8a8, a static scale for the next layer) the results go
  // through quantize_row(results, n, *codes) in the same pass instead, while they are in registers: the row's values
  // are then left unspecified (the next layer reads only the codes). ``next_row`` (or nullptr): the n values the
  // caller passes next, which a table may prefetch meanwhile.
  void (*row_epilogue)(float* row, int64_t n, const float* gamma, const float* beta, float eps, int32_t activation,
                       const RowCodes* codes, const float* next_row);
  void (*half_to_float_row)(const uint16_t* src, float* dst, int64_t n);
  void (*float_to_half_row)(const float* src, uint16_t* dst, int64_t n);
};

const Kernels& generic_kernels();
// nullptr when the library was built without them (not an x86-64 build, or -DPIMOE_CPU_SIMDE=OFF for the SIMDe one)
const Kernels* avx2_kernels();
const Kernels* avx512_kernels();        // AVX-512 F/BW/DQ/VL + VNNI instructions
const Kernels* avx512_simde_kernels();  // the same source on SIMDe's portable intrinsics (runs on AVX2 + FMA + F16C)

// The "pairs" layout, shared by the generic and AVX2 tables
int64_t pairs_panel_bytes(int64_t k);
int64_t pairs_code_bytes(int64_t k);
void pack_i8_pairs(const int8_t* w, int64_t out, int64_t in, int8_t* packed);

// The table the expert op uses in this process, chosen once: PIMOE_CPU_ISA (generic, avx2, avx512, avx512-simde)
// when set, else the best one this CPU runs. nullptr when PIMOE_CPU_ISA asks for something this library or CPU
// cannot run; selection_error() then says what and how to fix it.
const Kernels* selected();
const char* selection_error();

}  // namespace isa
}  // namespace cpu
}  // namespace pimoe
