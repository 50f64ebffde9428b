// PiMoECombine on the GPU: a gather, no atomics. Each output element y[t, c] is computed by one thread as
//   acc = y_sorted[row_0, c] * w[t, 0];  acc = acc + y_sorted[row_j, c] * w[t, j]  (j = 1..k-1)
// in fp32, which is exactly the PyTorch reference's sequence of roundings. This file is compiled with
// --fmad=false (CMake) so the multiply and the add are never contracted into an FMA: results are bit-identical
// to the reference on every GPU. A flat_to_sorted entry outside [0, N*k) makes its slot contribute NaN (the
// fault stays visible) and is recorded in the DeviceStatus; nothing is read out of bounds.
// order kEXPERT (contract v2): acc = 0, then + w_j * y_j over the slots by ascending flat_to_sorted row, which is
// ascending expert id (Hugging Face's index_add_ order); ties between equal rows (only with bad input) in slot order.
#include "cuda_common.cuh"

namespace pimoe {
namespace cuda {
namespace {

template <typename T>
__global__ void combine_kernel(const T* __restrict__ y_sorted, const int* __restrict__ flat_to_sorted,
                               const float* __restrict__ weights, long long n, int k, long long h, T* __restrict__ y,
                               DeviceStatus* status, bool by_expert) {
  const long long total = n * h;
  const long long pairs = n * k;
  for (long long idx = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long t = idx / h, c = idx - t * h;
    int slots[contract::kMAX_TOP_K];  // summation order: slot order, or by ascending sorted row
    for (int j = 0; j < k; ++j) {
      int pos = j;
      while (by_expert && pos > 0 && flat_to_sorted[t * k + slots[pos - 1]] > flat_to_sorted[t * k + j]) {
        slots[pos] = slots[pos - 1];
        --pos;
      }
      slots[pos] = j;
    }
    float acc = 0.0f;
    for (int i = 0; i < k; ++i) {
      const int j = slots[i];
      const long long flat = t * k + j;
      const int row = flat_to_sorted[flat];
      float term;
      if (row < 0 || row >= pairs) {
        if (c == 0) detail::report(status, &status->bad_flat_to_sorted, flat, row);
        term = NAN;
      } else {
        term = detail::to_float(y_sorted[static_cast<long long>(row) * h + c]) * weights[flat];
      }
      acc = i == 0 && !by_expert ? term : acc + term;  // expert order: index_add_ into zeros, 0 + term
    }
    y[idx] = detail::from_float<T>(acc);
  }
}

}  // namespace

cudaError_t combine(const void* y_sorted, DType dtype, const int32_t* flat_to_sorted, const float* weights, int64_t n,
                    int64_t k, int64_t h, void* y, DeviceStatus* status, cudaStream_t stream,
                    contract::CombineOrder order) {
  if (status == nullptr) return cudaErrorInvalidValue;
  if (n < 0 || k < 1 || k > kMAX_TOP_K || h < 0) return cudaErrorInvalidValue;
  if (n == 0 || h == 0) return cudaSuccess;
  const unsigned int blocks = detail::grid_for(n * h, 256);
  const int ki = static_cast<int>(k);
  const bool by_expert = order == contract::CombineOrder::kEXPERT;
  if (dtype == DType::kF16)
    combine_kernel<__half><<<blocks, 256, 0, stream>>>(static_cast<const __half*>(y_sorted), flat_to_sorted, weights,
                                                       n, ki, h, static_cast<__half*>(y), status, by_expert);
  else if (dtype == DType::kF32)
    combine_kernel<float><<<blocks, 256, 0, stream>>>(static_cast<const float*>(y_sorted), flat_to_sorted, weights, n,
                                                      ki, h, static_cast<float*>(y), status, by_expert);
  else
    return cudaErrorInvalidValue;
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace pimoe
