// Portable inner kernels (any x86-64 or AArch64 compiler target): plain loops the compiler vectorises.
#include <cmath>

#include "cpu_kernels.h"
#include "isa.h"

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

void quantize_row(const float* x, int64_t n, float scale, int16_t* q, int64_t n_padded) {
  for (int64_t i = 0; i < n; ++i) {
    float v = x[i] / scale;
    if (std::isnan(v)) v = 0.0f;
    v = v < -127.0f ? -127.0f : (v > 127.0f ? 127.0f : v);
    q[i] = static_cast<int16_t>(std::nearbyint(v));
  }
  for (int64_t i = n; i < n_padded; ++i) q[i] = 0;
}

void divide_row(const float* x, const float* d, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] / d[i];
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
  static const Kernels kernels{"generic", gemm_f32_panel, gemm_i8_panel, quantize_row, divide_row, row_epilogue,
                               half_to_float_row, float_to_half_row};
  return kernels;
}

}  // namespace isa
}  // namespace cpu
}  // namespace pimoe
