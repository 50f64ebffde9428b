// Per-ISA inner kernels of the CPU expert MLP (GEMM on packed weight panels, fused epilogues).
// One table per instruction set; expert_mlp.cpp picks the best one the CPU supports at run time.
#pragma once

#include <cstdint>

namespace pimoe {
namespace cpu {
namespace isa {

// Packed fp32 weight layout: for output columns [16p, 16p + 16) a panel of K x 16 floats, k-major,
// zero-padded past the last column.
constexpr int64_t kPanel = 16;
// Packed int8 weight layout (w8a8): for columns [16p, 16p + 16) a panel of K2 = ceil(K / 2) k-pairs; per
// pair the 16 columns' two weights side by side (c0k0, c0k1, c1k0, c1k1, ...), 32 bytes, zero-padded past the
// last column and the last k. Activations are int16 rows of even length (codes in [-127, 127]), so one
// pmaddwd computes w[c,k0]*a[k0] + w[c,k1]*a[k1] exactly.

struct Kernels {
  const char* name;
  // C[r, c] = sum_k A[r, k] * panel[k, c] + bias[c] for r < m, c < n_valid (<= 16); with ``accumulate`` the
  // sum is added to C instead (bias unused): the driver splits K into cache-sized blocks this way.
  void (*gemm_f32_panel)(const float* a, int64_t lda, int64_t m, const float* panel, int64_t k, const float* bias,
                         float* c, int64_t ldc, int64_t n_valid, bool accumulate);
  // w8a8: C[r, c] = float(sum_k qa[r, k] * qw[k, c]) * (a_scale[r] * w_scale[c]) + bias[c] for r < m,
  // c < n_valid; qa rows hold k2 * 2 int16 codes (lda >= 2 * k2), the integer sum is exact (int32).
  void (*gemm_i8_panel)(const int16_t* qa, int64_t lda, int64_t m, const int8_t* panel, int64_t k2,
                        const float* a_scale, const float* w_scale, const float* bias, float* c, int64_t ldc,
                        int64_t n_valid);
  // q[i] = clamp(round_half_even(x[i] / scale), -127, 127) for i < n; q[n .. n_padded) = 0.
  void (*quantize_row)(const float* x, int64_t n, float scale, int16_t* q, int64_t n_padded);
  // out[i] = x[i] / d[i] for i < n (SmoothQuant's per-channel divisor; IEEE division, so every ISA agrees)
  void (*divide_row)(const float* x, const float* d, float* out, int64_t n);
  // In place on one row of n values: LayerNorm (when gamma != nullptr) then the activation (contract enum).
  void (*row_epilogue)(float* row, int64_t n, const float* gamma, const float* beta, float eps, int32_t activation);
  void (*half_to_float_row)(const uint16_t* src, float* dst, int64_t n);
  void (*float_to_half_row)(const float* src, uint16_t* dst, int64_t n);
};

const Kernels& generic_kernels();
// nullptr when the library was built without AVX2 support
const Kernels* avx2_kernels();

}  // namespace isa
}  // namespace cpu
}  // namespace pimoe
