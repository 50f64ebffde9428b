// Portable inner kernels (any x86-64 or AArch64 compiler target): plain loops the compiler vectorises.
#include <cmath>

#include "cpu_kernels.h"
#include "isa.h"

namespace pimoe {
namespace cpu {
namespace isa {
namespace {

void gemm_f32_panel(const float* a, int64_t lda, int64_t m, const float* panel, int64_t k, const float* bias,
                    float* c, int64_t ldc, int64_t n_valid) {
  for (int64_t r = 0; r < m; ++r) {
    float acc[kPanel];
    for (int64_t j = 0; j < kPanel; ++j) acc[j] = 0.0f;
    const float* row = a + r * lda;
    for (int64_t kk = 0; kk < k; ++kk) {
      const float v = row[kk];
      const float* w = panel + kk * kPanel;
      for (int64_t j = 0; j < kPanel; ++j) acc[j] += v * w[j];
    }
    for (int64_t j = 0; j < n_valid; ++j) c[r * ldc + j] = acc[j] + bias[j];
  }
}

float activate(float x, int32_t activation) {
  switch (activation) {
    case 0:  // gelu (erf)
      return 0.5f * x * (1.0f + std::erf(x * 0.70710678118654752f));
    case 1: {  // gelu_tanh
      const float inner = 0.79788456080286536f * (x + 0.044715f * x * x * x);
      return 0.5f * x * (1.0f + std::tanh(inner));
    }
    case 2:
      return x > 0.0f ? x : (x == x ? 0.0f : x);  // relu keeps NaN visible
    case 3:
      return x / (1.0f + std::exp(-x));
    default:
      return std::tanh(x);
  }
}

void row_epilogue(float* row, int64_t n, const float* gamma, const float* beta, float eps, int32_t activation) {
  if (gamma != nullptr) {
    float mean = 0.0f;
    for (int64_t i = 0; i < n; ++i) mean += row[i];
    mean /= static_cast<float>(n);
    float var = 0.0f;
    for (int64_t i = 0; i < n; ++i) var += (row[i] - mean) * (row[i] - mean);
    var /= static_cast<float>(n);
    const float rstd = 1.0f / std::sqrt(var + eps);
    for (int64_t i = 0; i < n; ++i) row[i] = (row[i] - mean) * rstd * gamma[i] + beta[i];
  }
  if (activation >= 0)
    for (int64_t i = 0; i < n; ++i) row[i] = activate(row[i], activation);
}

void half_to_float_row(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = half_to_float(src[i]);
}

void float_to_half_row(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = float_to_half(src[i]);
}

}  // namespace

const Kernels& generic_kernels() {
  static const Kernels kernels{"generic", gemm_f32_panel, row_epilogue, half_to_float_row, float_to_half_row};
  return kernels;
}

}  // namespace isa
}  // namespace cpu
}  // namespace pimoe
