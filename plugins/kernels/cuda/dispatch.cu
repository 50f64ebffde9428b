// PiMoEDispatch on the GPU: a deterministic, stable counting sort of the R = N*k (token, slot) pairs by expert.
//
//   1. count  : the pairs are cut into T contiguous tiles; one warp per tile counts its pairs per expert
//               (warp match + popcount, no atomics) into counts[T][E] (workspace).
//   2. scan   : one block turns counts into, per (tile, expert), the first output row of that tile's pairs of
//               that expert: offsets[e] + sum of the expert's counts in earlier tiles. Writes offsets[E+1].
//   3. rank   : one warp per tile walks its pairs in flat order; a pair's row is its tile base plus its rank
//               among the earlier pairs of the same expert (stable: flat order t*k + j inside an expert).
//   4. copy   : x_sorted[flat_to_sorted[i]] = x[i / k], one block per pair, every row written exactly once.
// Ids outside [0, E) are clamped to the nearest expert (so nothing is written out of bounds) and the first one
// is recorded in the DeviceStatus.
#include "cuda_common.cuh"

namespace pimoe {
namespace cuda {
namespace {

using detail::kFULL_MASK;

constexpr int kTILE_WARPS = 4;        // warps (tiles) per block in the count and rank kernels
constexpr long long kMAX_TILES = 1024;  // bounds the workspace: counts[T][E] int32 <= 4 MiB

struct Tiling {
  long long tiles;
  long long tile_pairs;  // a multiple of 32
};

Tiling make_tiling(long long pairs) {
  Tiling t{1, 32};
  if (pairs <= 0) return t;
  long long tiles = (pairs + 31) / 32;
  if (tiles > kMAX_TILES) tiles = kMAX_TILES;
  long long per = (pairs + tiles - 1) / tiles;
  per = (per + 31) / 32 * 32;
  t.tile_pairs = per;
  t.tiles = (pairs + per - 1) / per;
  return t;
}

__device__ __forceinline__ int load_id(const int* ids, long long i, int e, DeviceStatus* status) {
  int id = ids[i];
  if (id < 0 || id >= e) {
    if (status != nullptr) detail::report(status, &status->bad_expert_id, i, id);
    id = id < 0 ? 0 : e - 1;
  }
  return id;
}

__global__ void count_kernel(const int* __restrict__ ids, long long pairs, int e, long long tiles, long long tile_pairs,
                             int* __restrict__ counts, DeviceStatus* status) {
  extern __shared__ int count_smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int* local = count_smem + static_cast<size_t>(warp) * e;
  for (long long tile = static_cast<long long>(blockIdx.x) * kTILE_WARPS + warp; tile < tiles;
       tile += static_cast<long long>(gridDim.x) * kTILE_WARPS) {
    for (int j = lane; j < e; j += 32) local[j] = 0;
    __syncwarp();
    const long long begin = tile * tile_pairs;
    const long long end = begin + tile_pairs < pairs ? begin + tile_pairs : pairs;
    for (long long base = begin; base < end; base += 32) {
      const long long i = base + lane;
      const bool valid = i < end;
      const int id = valid ? load_id(ids, i, e, status) : -1;
      const unsigned same = __match_any_sync(kFULL_MASK, id);
      // the lowest lane of each group of equal ids adds the group's size: one writer per expert and step
      if (valid && lane == __ffs(same) - 1) local[id] += __popc(same);
      __syncwarp();
    }
    int* dst = counts + tile * e;
    for (int j = lane; j < e; j += 32) dst[j] = local[j];
    __syncwarp();
  }
}

// One block; thread j owns expert j (e <= 1024 <= blockDim.x).
__global__ void scan_kernel(int* __restrict__ counts, long long tiles, int e, long long pairs,
                            int* __restrict__ offsets) {
  __shared__ int scratch[32];
  const int j = threadIdx.x;
  int total = 0;
  if (j < e)
    for (long long t = 0; t < tiles; ++t) total += counts[t * e + j];
  const int inclusive = detail::block_inclusive_scan(total, scratch);
  const int start = inclusive - total;
  if (j < e) {
    offsets[j] = start;
    int running = start;
    for (long long t = 0; t < tiles; ++t) {
      const int c = counts[t * e + j];
      counts[t * e + j] = running;
      running += c;
    }
  }
  if (j == 0) offsets[e] = static_cast<int>(pairs);
}

__global__ void rank_kernel(const int* __restrict__ ids, long long pairs, int e, long long tiles, long long tile_pairs,
                            const int* __restrict__ bases, int* __restrict__ flat_to_sorted) {
  extern __shared__ int rank_smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int* cursor = rank_smem + static_cast<size_t>(warp) * e;
  const unsigned lower = (1u << lane) - 1u;
  for (long long tile = static_cast<long long>(blockIdx.x) * kTILE_WARPS + warp; tile < tiles;
       tile += static_cast<long long>(gridDim.x) * kTILE_WARPS) {
    const int* src = bases + tile * e;
    for (int j = lane; j < e; j += 32) cursor[j] = src[j];
    __syncwarp();
    const long long begin = tile * tile_pairs;
    const long long end = begin + tile_pairs < pairs ? begin + tile_pairs : pairs;
    for (long long base = begin; base < end; base += 32) {
      const long long i = base + lane;
      const bool valid = i < end;
      const int id = valid ? load_id(ids, i, e, nullptr) : -1;  // clamped exactly as in count_kernel
      const unsigned same = __match_any_sync(kFULL_MASK, id);
      int row = 0;
      if (valid) row = cursor[id] + __popc(same & lower);
      __syncwarp();
      if (valid && lane == __ffs(same) - 1) cursor[id] += __popc(same);
      if (valid) flat_to_sorted[i] = row;
      __syncwarp();
    }
  }
}

template <typename V>
__global__ void copy_rows_kernel(const V* __restrict__ x, const int* __restrict__ flat_to_sorted, long long pairs,
                                 int k, long long row_elems, V* __restrict__ x_sorted) {
  for (long long i = blockIdx.x; i < pairs; i += gridDim.x) {
    const int dst_row = flat_to_sorted[i];
    if (dst_row < 0 || dst_row >= pairs) continue;  // cannot happen: rows are a permutation of [0, pairs)
    const V* src = x + (i / k) * row_elems;
    V* dst = x_sorted + static_cast<long long>(dst_row) * row_elems;
    for (long long c = threadIdx.x; c < row_elems; c += blockDim.x) dst[c] = src[c];
  }
}

}  // namespace

// TensorRT sizes the workspace once, for the profile's largest shape, and hands that buffer to every smaller run, so
// the size must not decrease as `pairs` decreases. make_tiling's tile count does (it saturates at kMAX_TILES and then
// drops: 32768 pairs -> 1024 tiles, 32769 -> 513), so the size is taken from its upper bound
// min(ceil(pairs / 32), kMAX_TILES), which is monotone and covers every pairs' <= pairs.
size_t dispatch_workspace_size(int64_t pairs, int64_t num_experts) {
  long long tiles = pairs > 0 ? (static_cast<long long>(pairs) + 31) / 32 : 1;
  if (tiles > kMAX_TILES) tiles = kMAX_TILES;
  return static_cast<size_t>(tiles) * static_cast<size_t>(num_experts > 0 ? num_experts : 1) * sizeof(int) + 256;
}

cudaError_t dispatch(const void* x, DType dtype, const int32_t* ids, int64_t n, int64_t h, int64_t k,
                     int64_t num_experts, void* x_sorted, int32_t* offsets, int32_t* flat_to_sorted, void* workspace,
                     size_t workspace_bytes, DeviceStatus* status, cudaStream_t stream) {
  if (num_experts < 1 || num_experts > kMAX_EXPERTS || k < 1 || k > kMAX_TOP_K || n < 0 || h < 1) return cudaErrorInvalidValue;
  if (dtype != DType::kF32 && dtype != DType::kF16) return cudaErrorInvalidValue;
  const long long pairs = n * k;
  const int e = static_cast<int>(num_experts);
  if (pairs == 0) {  // empty batch: every expert owns the empty range
    if (cudaError_t err = cudaMemsetAsync(offsets, 0, static_cast<size_t>(e + 1) * sizeof(int32_t), stream);
        err != cudaSuccess)
      return err;
    return cudaSuccess;
  }
  if (workspace == nullptr || workspace_bytes < dispatch_workspace_size(pairs, num_experts))
    return cudaErrorInvalidValue;
  const Tiling t = make_tiling(pairs);
  int* counts = static_cast<int*>(workspace);
  const unsigned int tile_blocks = detail::grid_for(t.tiles, kTILE_WARPS);
  const size_t smem = static_cast<size_t>(kTILE_WARPS) * static_cast<size_t>(e) * sizeof(int);
  count_kernel<<<tile_blocks, kTILE_WARPS * 32, smem, stream>>>(ids, pairs, e, t.tiles, t.tile_pairs, counts, status);
  scan_kernel<<<1, kEXPERT_BLOCK, 0, stream>>>(counts, t.tiles, e, pairs, offsets);
  rank_kernel<<<tile_blocks, kTILE_WARPS * 32, smem, stream>>>(ids, pairs, e, t.tiles, t.tile_pairs, counts,
                                                                flat_to_sorted);
  // row copy: 16-byte vectors when rows and pointers allow it, else one element (bit-exact either way)
  const size_t row_bytes = static_cast<size_t>(h) * dtype_size(dtype);
  const bool vec16 = row_bytes % 16 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 &&
                     reinterpret_cast<uintptr_t>(x_sorted) % 16 == 0;
  const unsigned int copy_blocks = detail::grid_for(pairs, 1);
  const int ki = static_cast<int>(k);
  if (vec16) {
    copy_rows_kernel<uint4><<<copy_blocks, 128, 0, stream>>>(static_cast<const uint4*>(x), flat_to_sorted, pairs, ki,
                                                             static_cast<long long>(row_bytes / 16),
                                                             static_cast<uint4*>(x_sorted));
  } else if (dtype == DType::kF16) {
    copy_rows_kernel<uint16_t><<<copy_blocks, 128, 0, stream>>>(static_cast<const uint16_t*>(x), flat_to_sorted, pairs,
                                                                ki, h, static_cast<uint16_t*>(x_sorted));
  } else {
    copy_rows_kernel<uint32_t><<<copy_blocks, 128, 0, stream>>>(static_cast<const uint32_t*>(x), flat_to_sorted, pairs,
                                                                ki, h, static_cast<uint32_t*>(x_sorted));
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace pimoe
