// Device helpers shared by the pimoe CUDA kernels (header-only, included by the .cu files).
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_kernels.h"

namespace pimoe {
namespace cuda {
namespace detail {

constexpr unsigned kFULL_MASK = 0xffffffffu;
constexpr int kWARP = 32;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);  // round to nearest even, like torch's .to(float16)
}

__device__ __forceinline__ float warp_sum(float v) {
  // butterfly: every lane ends with the same value, computed in the same order on every run
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFULL_MASK, v, offset);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(kFULL_MASK, v, offset));
  return v;
}

// Activation in fp32 (contract::Activation values); NaN stays NaN.
__device__ __forceinline__ float activate(float x, int activation) {
  switch (activation) {
    case 0:  // gelu (erf)
      return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
    case 1: {  // gelu_tanh
      const float inner = 0.79788456080286536f * (x + 0.044715f * x * x * x);
      return 0.5f * x * (1.0f + tanhf(inner));
    }
    case 2:  // relu
      return x > 0.0f ? x : (x == x ? 0.0f : x);
    case 3:  // silu
      return x / (1.0f + expf(-x));
    case 4:  // tanh
      return tanhf(x);
    default:  // no activation
      return x;
  }
}

// Record one offending entry (index, value) in `slot` of `status`: the lowest index wins whatever the thread order,
// and the fault count goes up by one. Called only where input data is inconsistent (never on the normal path).
__device__ __forceinline__ void report(DeviceStatus* status, unsigned long long* slot, long long index, int value) {
  const unsigned long long packed =
      (static_cast<unsigned long long>(index < 0 ? 0 : (index > 0x7fffffffLL ? 0x7fffffffLL : index)) << 32) |
      static_cast<unsigned long long>(static_cast<unsigned int>(value));
  atomicMin(slot, packed);
  atomicAdd(&status->faults, 1ull);
}

// Inclusive scan of one int per thread over a block of up to 1024 threads (blockDim.x a multiple of 32).
// `scratch` holds at least 32 ints of shared memory. Integer sums are exact, so the order cannot matter.
__device__ __forceinline__ int block_inclusive_scan(int value, int* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  for (int offset = 1; offset < 32; offset <<= 1) {
    const int other = __shfl_up_sync(kFULL_MASK, value, offset);
    if (lane >= offset) value += other;
  }
  if (lane == 31) scratch[warp] = value;
  __syncthreads();
  if (warp == 0) {
    int total = lane < warps ? scratch[lane] : 0;
    for (int offset = 1; offset < 32; offset <<= 1) {
      const int other = __shfl_up_sync(kFULL_MASK, total, offset);
      if (lane >= offset) total += other;
    }
    if (lane < warps) scratch[lane] = total;
  }
  __syncthreads();
  const int result = value + (warp > 0 ? scratch[warp - 1] : 0);
  __syncthreads();  // scratch may be reused by the caller
  return result;
}

inline unsigned int grid_for(long long work, int per_block, unsigned int cap = 65535u * 16u) {
  long long blocks = (work + per_block - 1) / per_block;
  if (blocks < 1) blocks = 1;
  if (blocks > cap) blocks = cap;
  return static_cast<unsigned int>(blocks);
}

}  // namespace detail
}  // namespace cuda
}  // namespace pimoe
