// PiMoERoute on the GPU: one warp per token row (op contract v2; docs/op_contract.md, "Semantics").
//   source = softmax(logits) (softmax), or the logits themselves (softmax_topk, sigmoid: sigma is taken on the fly)
//   keys   = softmax: probs + bias; softmax_topk: logits + bias; sigmoid: sigma + bias, or the logits when there is
//            neither a bias nor groups; grouped selection: the groups_kept best groups (max key or sum of the best
//            two) keep their keys, every other expert's key is 0 (and its softmax weight source 0)
//   ids    = top-k of keys: larger first, ties to the lower index, NaN ranked below every number
//   weights = source[ids] (sigmoid: sigma, unmasked; softmax_topk: softmax of the k logits), divided by
//            (their sum in slot order + normalize_eps) when normalize, times routed_scaling_factor.
// Compiled with --fmad=false (CMake) so exp/sub/div/add round like the CPU kernel. Shared memory per warp: E floats
// (source) + num_groups group scores + num_groups kept flags.
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

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

struct RouteParams {
  int n, e, k;
  bool normalize;
  int scoring;      // contract::Scoring
  int groups;       // num_groups (1: none)
  int kept;         // groups_kept
  int group_score;  // contract::GroupScore
  float scaling;    // routed_scaling_factor
  float eps;        // normalize_eps
};

constexpr int kSOFTMAX = static_cast<int>(contract::Scoring::kSOFTMAX);
constexpr int kSOFTMAX_TOPK = static_cast<int>(contract::Scoring::kSOFTMAX_TOPK);
constexpr int kSIGMOID = static_cast<int>(contract::Scoring::kSIGMOID);

// Warp-wide arg-best over candidates; every lane ends with the same (score, index), index -1 when none.
__device__ __forceinline__ void warp_best(float* score, int* index) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float other_score = __shfl_xor_sync(kFULL_MASK, *score, offset);
    const int other_index = __shfl_xor_sync(kFULL_MASK, *index, offset);
    if (other_index >= 0 && (*index < 0 || ranks_before(other_score, other_index, *score, *index))) {
      *score = other_score;
      *index = other_index;
    }
  }
}

template <typename T>
__global__ void route_kernel(const T* __restrict__ logits, const float* __restrict__ bias, RouteParams p,
                             float* __restrict__ weights, int* __restrict__ ids) {
  extern __shared__ float route_smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int e = p.e, k = p.k, size = e / p.groups;
  float* source = route_smem + static_cast<size_t>(warp) * (e + 2 * p.groups);
  float* group_scores = source + e;
  int* kept = reinterpret_cast<int*>(group_scores + p.groups);
  const bool logit_keys = p.scoring == kSIGMOID && bias == nullptr && p.groups == 1;
  // the selection key of expert j (unmasked); masked experts of dropped groups score 0
  auto base_key = [&](int j) -> float {
    const float v = source[j];
    const float b = bias != nullptr ? bias[j] : 0.0f;
    if (p.scoring == kSOFTMAX) return v + b;  // v1: probs + (bias or 0)
    if (p.scoring == kSIGMOID) return logit_keys ? v : sigmoid(v) + b;
    return bias != nullptr ? v + b : v;
  };
  auto key = [&](int j) -> float { return p.groups > 1 && kept[j / size] == 0 ? 0.0f : base_key(j); };
  for (long long row = static_cast<long long>(blockIdx.x) * kWARPS_PER_BLOCK + warp; row < p.n;
       row += static_cast<long long>(gridDim.x) * kWARPS_PER_BLOCK) {
    const T* src = logits + row * e;
    for (int j = lane; j < e; j += 32) source[j] = detail::to_float(src[j]);
    if (p.scoring == kSOFTMAX) {  // softmax: max over numbers (NaN propagates), exp(x - max), sum, divide
      float m = -INFINITY;
      bool has_nan = false;
      for (int j = lane; j < e; j += 32) {
        const float v = source[j];
        if (isnan(v)) has_nan = true;
        else m = fmaxf(m, v);
      }
      m = detail::warp_max(m);
      if (__any_sync(kFULL_MASK, has_nan)) m = NAN;
      float sum = 0.0f;
      for (int j = lane; j < e; j += 32) {
        const float x = expf(source[j] - m);
        source[j] = x;
        sum += x;
      }
      sum = detail::warp_sum(sum);
      for (int j = lane; j < e; j += 32) source[j] = source[j] / sum;
    }
    __syncwarp();

    if (p.groups > 1) {  // group scores (a lane per group), then the kept groups by rounds of a warp arg-best
      for (int g = lane; g < p.groups; g += 32) {
        int first = g * size, second = -1;
        for (int j = g * size + 1; j < (g + 1) * size; ++j) {
          const float s = base_key(j);
          if (ranks_before(s, j, base_key(first), first)) {
            second = first;
            first = j;
          } else if (second < 0 || ranks_before(s, j, base_key(second), second)) {
            second = j;
          }
        }
        const bool sum2 = p.group_score == static_cast<int>(contract::GroupScore::kSUM_TOP2) && second >= 0;
        group_scores[g] = sum2 ? base_key(first) + base_key(second) : base_key(first);
        kept[g] = 0;
      }
      __syncwarp();
      for (int round = 0; round < p.kept; ++round) {
        float best_score = 0.0f;
        int best = -1;
        for (int g = lane; g < p.groups; g += 32)
          if (kept[g] == 0 && (best < 0 || ranks_before(group_scores[g], g, best_score, best))) {
            best_score = group_scores[g];
            best = g;
          }
        warp_best(&best_score, &best);
        __syncwarp();
        if (lane == 0 && best >= 0) kept[best] = 1;
        __syncwarp();
      }
    }

    // top-k by k rounds of a warp arg-best over the candidates that rank strictly after the previous pick
    float last_score = 0.0f;
    int last_index = -1;
    float chosen[contract::kMAX_TOP_K];  // the weight sources of the k picks, in slot order (every lane)
    int my_id = 0;                       // lane j < k keeps slot j
    for (int slot = 0; slot < k; ++slot) {
      float best_score = 0.0f;
      int best_index = -1;
      for (int j = lane; j < e; j += 32) {
        const float s = key(j);
        if (last_index >= 0 && !ranks_before(last_score, last_index, s, j)) continue;
        if (best_index < 0 || ranks_before(s, j, best_score, best_index)) {
          best_score = s;
          best_index = j;
        }
      }
      warp_best(&best_score, &best_index);
      if (best_index < 0 || best_index >= e) best_index = 0;  // unreachable for k <= e; keeps ids in range
      last_score = best_score;
      last_index = best_index;
      const float v = source[best_index];
      chosen[slot] = p.scoring == kSIGMOID ? sigmoid(v)
                     : p.scoring == kSOFTMAX && p.groups > 1 && kept[best_index / size] == 0 ? 0.0f
                                                                                             : v;
      if (lane == slot) my_id = best_index;
    }
    if (p.scoring == kSOFTMAX_TOPK) {  // softmax of the k logits, as PyTorch: max (NaN propagates), exp, sum, divide
      float m = -INFINITY;
      bool has_nan = false;
      for (int slot = 0; slot < k; ++slot) {
        if (isnan(chosen[slot])) has_nan = true;
        else m = fmaxf(m, chosen[slot]);
      }
      if (has_nan) m = NAN;
      float sum = 0.0f;
      for (int slot = 0; slot < k; ++slot) {
        chosen[slot] = expf(chosen[slot] - m);
        sum += chosen[slot];
      }
      for (int slot = 0; slot < k; ++slot) chosen[slot] = chosen[slot] / sum;
    }
    float total = 0.0f;
    float mine = 0.0f;
    for (int slot = 0; slot < k; ++slot) {
      total += chosen[slot];
      if (lane == slot) mine = chosen[slot];
    }
    if (lane < k) {
      float w = mine;
      if (p.normalize) w = w / (p.eps != 0.0f ? total + p.eps : total);
      if (p.scaling != 1.0f) w = w * p.scaling;
      ids[row * k + lane] = my_id;
      weights[row * k + lane] = w;
    }
    __syncwarp();  // source, group_scores and kept are rewritten by the next row of this warp
  }
}

// dynamic shared memory of a block: per warp, E floats + num_groups scores + num_groups flags (<= 48 KB for E <= 1024)
size_t route_shared_bytes(int64_t e, int64_t groups) {
  return static_cast<size_t>(kWARPS_PER_BLOCK) * static_cast<size_t>(e + 2 * groups) * sizeof(float);
}

}  // namespace

cudaError_t route(const RouteAttrs& attrs, const void* logits, DType dtype, const float* bias, int64_t n, int64_t e,
                  float* weights, int32_t* ids, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  // what the kernel indexes by (the attributes were validated once, at plugin / kernel creation)
  if (e < 1 || e > kMAX_EXPERTS || attrs.k < 1 || attrs.k > kMAX_TOP_K || attrs.k > e || attrs.num_groups < 1 ||
      attrs.num_groups > e || e % attrs.num_groups != 0 || attrs.groups_kept < 1 ||
      attrs.groups_kept > attrs.num_groups || attrs.k > attrs.groups_kept * (e / attrs.num_groups))
    return cudaErrorInvalidValue;
  RouteParams p{};
  p.n = static_cast<int>(n);
  p.e = static_cast<int>(e);
  p.k = static_cast<int>(attrs.k);
  p.normalize = attrs.normalize;
  p.scoring = static_cast<int>(attrs.scoring);
  p.groups = static_cast<int>(attrs.num_groups);
  p.kept = static_cast<int>(attrs.groups_kept);
  p.group_score = static_cast<int>(attrs.group_score);
  p.scaling = attrs.routed_scaling_factor;
  p.eps = attrs.normalize_eps;
  const unsigned int blocks = detail::grid_for(n, kWARPS_PER_BLOCK);
  const size_t smem = route_shared_bytes(e, attrs.num_groups);
  if (dtype == DType::kF16)
    route_kernel<__half><<<blocks, kWARPS_PER_BLOCK * 32, smem, stream>>>(static_cast<const __half*>(logits), bias, p,
                                                                           weights, ids);
  else if (dtype == DType::kF32)
    route_kernel<float><<<blocks, kWARPS_PER_BLOCK * 32, smem, stream>>>(static_cast<const float*>(logits), bias, p,
                                                                          weights, ids);
  else
    return cudaErrorInvalidValue;
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace pimoe
