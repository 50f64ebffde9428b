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

struct Kernels {
  const char* name;
  // C[r, c] = sum_k A[r, k] * panel[k, c] + bias[c] for r < m, c < n_valid (<= 16).
  void (*gemm_f32_panel)(const float* a, int64_t lda, int64_t m, const float* panel, int64_t k, const float* bias,
                         float* c, int64_t ldc, int64_t n_valid);
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
