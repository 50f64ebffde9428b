// PiMoERoute on the GPU: one warp per token row.
//   probs = softmax(logits) in fp32, exactly as PyTorch defines it (NaN anywhere -> NaN row; +inf -> NaN),
//   ids   = top-k of (probs + bias): larger first, ties to the lower index, NaN ranked below every number,
//   weights = probs[ids] (divided by their sum in slot order when normalize).
// Compiled with --fmad=false (CMake) so exp/sub/div/add round like the CPU kernel.
#include "cuda_common.cuh"

namespace pimoe {
namespace cuda {
namespace {

using detail::kFULL_MASK;

constexpr int kWARPS_PER_BLOCK = 4;

// a ranks before b: larger score first, ties to the lower index, NaN after every number. A strict total
// order on (score, index) pairs, so the k-th best is unique and every lane agrees on it.
__device__ __forceinline__ bool ranks_before(float sa, int a, float sb, int b) {
  const bool na = isnan(sa), nb = isnan(sb);
  if (na != nb) return nb;
  if (!na && sa != sb) return sa > sb;
  return a < b;
}

template <typename T>
__global__ void route_kernel(const T* __restrict__ logits, const float* __restrict__ bias, int n, int e, int k,
                             bool normalize, float* __restrict__ weights, int* __restrict__ ids) {
  extern __shared__ float route_smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float* probs = route_smem + static_cast<size_t>(warp) * e;
  for (long long row = static_cast<long long>(blockIdx.x) * kWARPS_PER_BLOCK + warp; row < n;
       row += static_cast<long long>(gridDim.x) * kWARPS_PER_BLOCK) {
    const T* src = logits + row * e;
    // softmax: max over numbers (NaN propagates), exp(x - max), sum, divide
    float m = -INFINITY;
    bool has_nan = false;
    for (int j = lane; j < e; j += 32) {
      const float v = detail::to_float(src[j]);
      probs[j] = v;
      if (isnan(v)) has_nan = true;
      else m = fmaxf(m, v);
    }
    m = detail::warp_max(m);
    if (__any_sync(kFULL_MASK, has_nan)) m = NAN;
    float sum = 0.0f;
    for (int j = lane; j < e; j += 32) {
      const float x = expf(probs[j] - m);
      probs[j] = x;
      sum += x;
    }
    sum = detail::warp_sum(sum);
    for (int j = lane; j < e; j += 32) probs[j] = probs[j] / sum;
    __syncwarp();

    // top-k by k rounds of a warp arg-best over the candidates that rank strictly after the previous pick
    float last_score = 0.0f;
    int last_index = -1;
    float total = 0.0f;
    int my_id = 0;  // lane j < k keeps slot j
    for (int slot = 0; slot < k; ++slot) {
      float best_score = 0.0f;
      int best_index = -1;
      for (int j = lane; j < e; j += 32) {
        const float s = probs[j] + (bias != nullptr ? bias[j] : 0.0f);
        if (last_index >= 0 && !ranks_before(last_score, last_index, s, j)) continue;
        if (best_index < 0 || ranks_before(s, j, best_score, best_index)) {
          best_score = s;
          best_index = j;
        }
      }
      for (int offset = 16; offset > 0; offset >>= 1) {
        const float other_score = __shfl_xor_sync(kFULL_MASK, best_score, offset);
        const int other_index = __shfl_xor_sync(kFULL_MASK, best_index, offset);
        if (other_index >= 0 && (best_index < 0 || ranks_before(other_score, other_index, best_score, best_index))) {
          best_score = other_score;
          best_index = other_index;
        }
      }
      if (best_index < 0 || best_index >= e) best_index = 0;  // unreachable for k <= e; keeps ids in range
      last_score = best_score;
      last_index = best_index;
      total += probs[best_index];
      if (lane == slot) my_id = best_index;
    }
    if (lane < k) {
      float w = probs[my_id];
      if (normalize) w = w / total;
      ids[row * k + lane] = my_id;
      weights[row * k + lane] = w;
    }
    __syncwarp();  // probs is rewritten by the next row of this warp
  }
}

}  // namespace

cudaError_t route(const void* logits, DType dtype, const float* bias, int64_t n, int64_t e, int64_t k, bool normalize,
                  float* weights, int32_t* ids, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  if (e < 1 || e > kMAX_EXPERTS || k < 1 || k > kMAX_TOP_K || k > e) return cudaErrorInvalidValue;
  const unsigned int blocks = detail::grid_for(n, kWARPS_PER_BLOCK);
  const size_t smem = static_cast<size_t>(kWARPS_PER_BLOCK) * static_cast<size_t>(e) * sizeof(float);
  const int ni = static_cast<int>(n), ei = static_cast<int>(e), ki = static_cast<int>(k);
  if (dtype == DType::kF16)
    route_kernel<__half><<<blocks, kWARPS_PER_BLOCK * 32, smem, stream>>>(static_cast<const __half*>(logits), bias, ni,
                                                                           ei, ki, normalize, weights, ids);
  else if (dtype == DType::kF32)
    route_kernel<float><<<blocks, kWARPS_PER_BLOCK * 32, smem, stream>>>(static_cast<const float*>(logits), bias, ni,
                                                                          ei, ki, normalize, weights, ids);
  else
    return cudaErrorInvalidValue;
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace pimoe
