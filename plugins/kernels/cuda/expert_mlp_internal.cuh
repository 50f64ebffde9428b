// Internals of the grouped expert MLP shared by expert_mlp.cu and the two GEMM files.
//
// A per-call PLAN (built on the device from `offsets`, in the workspace) lists the row tiles of this group's
// expert segments, so one launch covers every expert of the group (a grouped GEMM without host round trips):
//   plan[0] = 1 if offsets is a valid partition of [0, R), else 0 (then nothing is computed, output is 0)
//   plan[1] = number of row tiles T
//   tile_start[G + 1]   first tile of member g (exclusive prefix sum of ceil(rows_g / BM))
//   seg_lo[G], seg_hi[G] row range of member g in x_sorted / y_sorted
//   member_of_expert[E] g for experts of this group, -1 for the others
#pragma once

#include "cuda_common.cuh"

namespace pimoe {
namespace cuda {
namespace detail {

struct PlanView {
  int* base;
  int groups;
  int experts;
  __host__ __device__ int* valid() const { return base; }
  __host__ __device__ int* num_tiles() const { return base + 1; }
  __host__ __device__ int* tile_start() const { return base + 2; }
  __host__ __device__ int* seg_lo() const { return base + 3 + groups; }
  __host__ __device__ int* seg_hi() const { return base + 3 + 2 * groups; }
  __host__ __device__ int* member_of_expert() const { return base + 3 + 3 * groups; }
  static size_t ints(int groups, int experts) { return 3 + 3 * static_cast<size_t>(groups) + experts; }
};

// Row tile of one GEMM block: member g owns rows [row0, row0 + rows) of the activations.
struct RowTile {
  int member;
  int row0;
  int rows;
};

// Looks up the row tile of `tile` (false when the tile index is past the plan's tiles). Block-uniform.
__device__ __forceinline__ bool find_row_tile(const PlanView& plan, int tile, int bm, RowTile* out) {
  if (*plan.valid() == 0 || tile >= *plan.num_tiles()) return false;
  const int* start = plan.tile_start();
  int lo = 0, hi = plan.groups - 1;
  while (lo < hi) {  // largest member whose first tile is <= tile (members with no tiles are skipped over)
    const int mid = (lo + hi + 1) >> 1;
    if (start[mid] <= tile) lo = mid;
    else hi = mid - 1;
  }
  const int row0 = plan.seg_lo()[lo] + (tile - start[lo]) * bm;
  const int end = plan.seg_hi()[lo];
  if (row0 >= end) return false;  // cannot happen for a consistent plan
  out->member = lo;
  out->row0 = row0;
  out->rows = end - row0 < bm ? end - row0 : bm;
  return true;
}

// Which member of the group owns row r (-1: another group's expert). Needs a valid plan.
__device__ __forceinline__ int member_of_row(const PlanView& plan, const int* offsets, int r) {
  int lo = 0, hi = plan.experts - 1;
  while (lo < hi) {  // largest expert whose segment starts at or before r
    const int mid = (lo + hi + 1) >> 1;
    if (offsets[mid] <= r) lo = mid;
    else hi = mid - 1;
  }
  return plan.member_of_expert()[lo];
}

// A member's bias row (nullptr: the layer has no bias, contract v2 `bias`=0) and the bias add of the epilogues: no add
// at all without a bias, as the reference computes a bias-free layer.
__device__ __forceinline__ const float* member_bias(const float* bias, int member, int n) {
  return bias != nullptr ? bias + static_cast<long long>(member) * n : nullptr;
}
__device__ __forceinline__ float add_bias(float v, const float* bias, int col) {
  return bias != nullptr ? v + bias[col] : v;
}

// One linear layer over the plan's row tiles: C[r, n] = epilogue(sum_k A[r, k] * W[member, n, k] + bias[member, n]).
struct GemmArgs {
  const void* a;     // activations [R, K] (row stride K): fp32, or fp16 when !a_f32 (tensor-core kernel only)
  bool a_f32;
  const void* w;     // [G, N, K]
  const float* bias;  // [G, N], or nullptr (no bias)
  void* c;           // [R, N] (row stride N)
  bool c_f32;        // output stored as fp32 (else the kernel's storage dtype)
  int k;
  int n;
  int activation;    // contract::Activation, or -1 for none
  PlanView plan;
  int max_tiles;     // gridDim.x upper bound of row tiles
  bool vec;          // 16-byte aligned rows and pointers: vector loads allowed
  // split-K (tensor-core kernel only): k_splits > 1 -> block z sums K steps [z * steps_per_split, ...) into
  // partial[z][row][n] (fp32, partial_rows rows per split); bias/activation are then applied by splitk_reduce
  int k_splits;
  int steps_per_split;
  float* partial;
  int partial_rows;
  // tensor-core kernel with an fp32 A: per-row power-of-two exponent [R] that keeps A * 2^-e inside fp16's range
  // (row_exponent_kernel, expert_mlp.cu); nullptr = no scaling
  const int* row_exp;
};

constexpr int kGEMM_BK_F16 = 32;          // K step of the tensor-core kernel (split-K works in these steps)
constexpr int kSPLIT_MAX_ROWS = 256;      // split-K only for R <= this (bounds the partial-sum workspace)
constexpr int kSPLIT_MAX = 4;             // at most this many K splits
constexpr int kSPLIT_TARGET_BLOCKS = 512;  // split until about this many blocks have work

constexpr int kGEMM_BM = 64;  // rows per tile of both GEMM kernels (the plan is built with it)

cudaError_t launch_gemm_f16(const GemmArgs& args, cudaStream_t stream);
cudaError_t launch_gemm_f32(const GemmArgs& args, cudaStream_t stream);

// ------------------------------------------------------------------------------------------ w8a8
// One quantised linear layer over the plan's row tiles (gemm_i8_wmma.cu):
//   acc[r, n] = sum_k codes[r, k] * W[member, n, k]   (int8 x int8 -> exact int32)
//   C[r, n]   = epilogue(float(acc) * (row_scale[r] * w_scale[member, n]) + bias[member, n])
// with one rounding per multiply and per add (no FMA), as pimoe_export/model/quant_reference.py computes it.
struct GemmI8Args {
  const int8_t* a;         // activation codes [R, lda], zero-padded to lda (a multiple of 16), 16-byte aligned
  int lda;
  const int8_t* w;         // [G, N, K]
  const float* w_scale;    // [G, N]
  const float* bias;       // [G, N], or nullptr (no bias)
  const float* row_scale;  // [R] activation scale of every row (static or dynamic)
  void* c;                 // [R, N] (row stride N)
  bool c_f32;              // fp32 output, else fp16
  int k;
  int n;
  int activation;          // contract::Activation, or -1 for none
  PlanView plan;           // built with row tiles of `bm` rows
  const int* offsets;      // [E+1] (split-K epilogue: which member owns a row)
  int rows;                // R
  int max_tiles;           // gridDim.x upper bound of row tiles
  int bm;                  // kGEMM_BM_I8_SMALL or kGEMM_BM_I8_LARGE
  bool vec;                // W rows and pointer 16-byte aligned (K % 16 == 0): asynchronous 16-byte copies
  // split-K: k_splits > 1 -> block z sums K steps [z * steps_per_split, ...) into partial[z][row][n] (int32, R
  // rows per split); an epilogue kernel adds the splits (exact integer sums) and dequantises
  int k_splits;
  int steps_per_split;
  int* partial;
};

constexpr int kGEMM_BK_I8 = 128;          // K step (bytes) of the int8 GEMM; split-K works in these steps
constexpr int kGEMM_BM_I8_SMALL = 16;     // row tile for few rows per expert (decode)
constexpr int kGEMM_BM_I8_LARGE = 64;     // row tile for many rows (prefill)
constexpr int kI8_SMALL_TILE_MAX_ROWS = 256;  // R <= this: 16-row tiles
constexpr int kI8_SPLIT_MAX_ROWS = 64;    // int8 split-K only for R <= this (bounds the int32 partial workspace)

cudaError_t launch_gemm_i8(const GemmI8Args& args, cudaStream_t stream);

}  // namespace detail
}  // namespace cuda
}  // namespace pimoe
