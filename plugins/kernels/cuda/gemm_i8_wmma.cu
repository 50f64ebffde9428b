// int8 x int8 -> int32 grouped GEMM on tensor cores (nvcuda::wmma m16n16k16, signed char operands, int
// accumulators; sm_72+) with the W8A8 dequantisation epilogue, over the row tiles of a PiMoEExpertMLP plan.
//
//   acc = sum_k codes[r, k] * W[member, n, k]                exact (int32; K <= kMAX_I8_WIDTH cannot overflow)
//   y   = float(acc) * (row_scale[r] * w_scale[member, n]) + bias[member, n]
// computed with __int2float_rn / __fmul_rn / __fadd_rn: one rounding per operation, never an FMA, exactly the
// operation sequence of pimoe_export/model/quant_reference.py (and of the CPU kernels). Integer sums do not depend
// on their order, so the result is bit-identical for every tiling and split-K choice.
//
// Two tile configurations (4 warps each, K step 128 bytes):
//   small: 16 x 64 tile, 4 pipeline stages: few rows per expert (decode), where the GEMM streams the weights
//   large: 64 x 64 tile, 2 stages: many rows (prefill)
// Shared memory holds every operand tile as k-slabs of 16 bytes: slab s of a tile with ROWS rows is ROWS
// consecutive 16-byte cells (row r at cell r) plus 32 bytes of padding, so
//   - one 16-byte global chunk (row r, k = 16 s .. 16 s + 15) is one cell: asynchronous 16-byte copies
//     (cp.async, sm_80+) straight from global memory,
//   - a 16 x 16 WMMA fragment is 256 contiguous bytes (leading dimension 16), 32-byte aligned as WMMA requires.
// Weights whose rows are not 16-byte aligned (K % 16 != 0, odd test shapes) take a scalar copy path; the codes
// are always padded and aligned (expert_mlp.cu). Out-of-range rows, columns and k are zero-filled.
// Few rows (R <= kI8_SPLIT_MAX_ROWS): K may be split over gridDim.z; each split writes int32 partial sums and
// i8_splitk_epilogue_kernel adds them (exact) and applies the same epilogue. No atomics anywhere.
#include <cuda_pipeline.h>
#include <mma.h>

#include "expert_mlp_internal.cuh"

namespace pimoe {
namespace cuda {
namespace detail {
namespace {

using namespace nvcuda;

constexpr int kTHREADS = 128;
constexpr int BN = 64;
constexpr int BK = kGEMM_BK_I8;
constexpr int KC = BK / 16;  // k-slabs (16-byte chunks per row) per K step

template <int BM, int STAGES, int WARPS_M>
struct I8Tile {
  static constexpr int WARPS_N = 4 / WARPS_M;
  static constexpr int SA = BM * 16 + 32;  // bytes per A slab: BM cells + padding (keeps 32-byte alignment)
  static constexpr int SB = BN * 16 + 32;  // bytes per B slab
  static constexpr int STAGE = KC * (SA + SB);
  static constexpr int FM = BM / WARPS_M / 16;  // accumulator fragments per warp (rows x columns)
  static constexpr int FN = BN / WARPS_N / 16;
  static constexpr int LDC = BN + 4;  // ints per row of the epilogue tile (multiple of 4, as WMMA requires)
  static constexpr int OPERAND_BYTES = STAGES * STAGE;
  static constexpr int EPILOGUE_BYTES = BM * LDC * 4;
  static constexpr int BYTES = OPERAND_BYTES > EPILOGUE_BYTES ? OPERAND_BYTES : EPILOGUE_BYTES;
  static_assert(WARPS_M * WARPS_N == kTHREADS / 32, "4 warps");
  static_assert(FM >= 1 && FN >= 1 && FM * WARPS_M * 16 == BM && FN * WARPS_N * 16 == BN, "warp tiling");
  static_assert(SA % 32 == 0 && SB % 32 == 0 && STAGE % 32 == 0, "fragments must stay 32-byte aligned");
  static_assert(BYTES <= 48 * 1024, "static shared memory limit");
};

// One rounding per operation, like the reference: float(acc) * (s * w_scale) + bias.
__device__ __forceinline__ float dequant(int acc, float row_scale, float w_scale, const float* bias, int col) {
  const float v = __fmul_rn(__int2float_rn(acc), __fmul_rn(row_scale, w_scale));
  return bias != nullptr ? __fadd_rn(v, bias[col]) : v;  // no bias (contract v2 bias=0): no add
}

__device__ __forceinline__ void store_output(const GemmI8Args& args, long long at, float v) {
  if (args.c_f32) static_cast<float*>(args.c)[at] = v;
  else static_cast<__half*>(args.c)[at] = __float2half_rn(v);
}

template <int BM, int STAGES, int WARPS_M>
__global__ void __launch_bounds__(kTHREADS) gemm_i8_kernel(GemmI8Args args) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 720
  __trap();  // int8 WMMA needs sm_72+ (every architecture this project builds for has it)
#else
  using T = I8Tile<BM, STAGES, WARPS_M>;
  __shared__ __align__(128) unsigned char smem[T::BYTES];
  RowTile tile;
  if (!find_row_tile(args.plan, static_cast<int>(blockIdx.x), BM, &tile)) return;  // block-uniform
  const int tid = threadIdx.x, warp = tid >> 5;
  const int warp_m = warp / T::WARPS_N, warp_n = warp % T::WARPS_N;
  const int K = args.k, N = args.n, lda = args.lda;
  const int8_t* a_rows = args.a + static_cast<long long>(tile.row0) * lda;
  const int8_t* w_member = args.w + static_cast<long long>(tile.member) * N * K;
  // split-K (blockIdx.z): this block covers K steps [step_begin, step_end); the host makes every split non-empty
  const int k_steps = (K + BK - 1) / BK;
  const int splits = args.k_splits > 1 ? args.k_splits : 1;
  const int step_begin = splits > 1 ? static_cast<int>(blockIdx.z) * args.steps_per_split : 0;
  const int step_end = splits > 1 ? min(k_steps, step_begin + args.steps_per_split) : k_steps;
  if (step_begin >= step_end) return;  // block-uniform; cannot happen for a consistent split
  const int steps = step_end - step_begin;
  const uint4 zero16 = make_uint4(0u, 0u, 0u, 0u);

  for (int n0 = static_cast<int>(blockIdx.y) * BN; n0 < N; n0 += static_cast<int>(gridDim.y) * BN) {
    const int8_t* w_rows = w_member + static_cast<long long>(n0) * K;

    // Fills pipeline buffer `buf` with K step `step`: asynchronous copies for aligned 16-byte chunks, plain shared
    // stores for zero fill and for the scalar weight path (visible to all threads after the next barrier).
    auto load_stage = [&](int step, int buf) {
      unsigned char* a_s = smem + buf * T::STAGE;
      unsigned char* b_s = a_s + KC * T::SA;
      const int k0 = step * BK;
      for (int c = tid; c < BM * KC; c += kTHREADS) {  // consecutive threads: consecutive chunks of one row
        const int r = c / KC, kc = c % KC, k = k0 + kc * 16;
        unsigned char* dst = a_s + kc * T::SA + r * 16;
        if (r < tile.rows && k < lda) __pipeline_memcpy_async(dst, a_rows + static_cast<long long>(r) * lda + k, 16);
        else *reinterpret_cast<uint4*>(dst) = zero16;
      }
      if (args.vec) {
        for (int c = tid; c < BN * KC; c += kTHREADS) {
          const int r = c / KC, kc = c % KC, k = k0 + kc * 16;
          unsigned char* dst = b_s + kc * T::SB + r * 16;
          if (n0 + r < N && k < K) __pipeline_memcpy_async(dst, w_rows + static_cast<long long>(r) * K + k, 16);
          else *reinterpret_cast<uint4*>(dst) = zero16;
        }
      } else {
        for (int e = tid; e < BN * BK; e += kTHREADS) {  // any K, any alignment: one byte per element
          const int r = e / BK, kk = e % BK, k = k0 + kk;
          const int8_t v = (n0 + r < N && k < K) ? w_rows[static_cast<long long>(r) * K + k] : static_cast<int8_t>(0);
          b_s[(kk >> 4) * T::SB + r * 16 + (kk & 15)] = static_cast<unsigned char>(v);
        }
      }
    };

    wmma::fragment<wmma::accumulator, 16, 16, 16, int> acc[T::FM][T::FN];
#pragma unroll
    for (int i = 0; i < T::FM; ++i)
#pragma unroll
      for (int j = 0; j < T::FN; ++j) wmma::fill_fragment(acc[i][j], 0);

    // pipeline: STAGES - 1 steps in flight ahead of the one being multiplied; one commit group per step (empty
    // groups past the end keep the wait count uniform)
    for (int s = 0; s < STAGES - 1; ++s) {
      if (s < steps) load_stage(step_begin + s, s);
      __pipeline_commit();
    }
    for (int i = 0; i < steps; ++i) {
      __pipeline_wait_prior(STAGES - 2);  // this thread's copies of step i have landed
      __syncthreads();                    // everyone's have, and everyone is done with the buffer refilled next
      const int ahead = i + STAGES - 1;
      if (ahead < steps) load_stage(step_begin + ahead, ahead % STAGES);
      __pipeline_commit();
      const unsigned char* a_s = smem + (i % STAGES) * T::STAGE;
      const unsigned char* b_s = a_s + KC * T::SA;
#pragma unroll
      for (int kc = 0; kc < KC; ++kc) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, signed char, wmma::col_major> fb[T::FN];
#pragma unroll
        for (int j = 0; j < T::FN; ++j)
          wmma::load_matrix_sync(
              fb[j], reinterpret_cast<const signed char*>(b_s + kc * T::SB + (warp_n * T::FN + j) * 256), 16);
#pragma unroll
        for (int i2 = 0; i2 < T::FM; ++i2) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, signed char, wmma::row_major> fa;
          wmma::load_matrix_sync(
              fa, reinterpret_cast<const signed char*>(a_s + kc * T::SA + (warp_m * T::FM + i2) * 256), 16);
#pragma unroll
          for (int j = 0; j < T::FN; ++j) wmma::mma_sync(acc[i2][j], fa, fb[j], acc[i2][j]);
        }
      }
    }
    __pipeline_wait_prior(0);  // nothing may still be copying into the buffers the epilogue tile reuses
    __syncthreads();

    int* c_s = reinterpret_cast<int*>(smem);
#pragma unroll
    for (int i = 0; i < T::FM; ++i)
#pragma unroll
      for (int j = 0; j < T::FN; ++j)
        wmma::store_matrix_sync(c_s + (warp_m * T::FM + i) * 16 * T::LDC + (warp_n * T::FN + j) * 16, acc[i][j],
                                T::LDC, wmma::mem_row_major);
    __syncthreads();
    if (splits > 1) {  // raw int32 partial sums; the split-K epilogue adds them and dequantises
      int* partial = args.partial + static_cast<long long>(blockIdx.z) * args.rows * N;
      for (int e = tid; e < BM * BN; e += kTHREADS) {
        const int r = e / BN, c = e % BN, col = n0 + c;
        if (r < tile.rows && col < N) partial[static_cast<long long>(tile.row0 + r) * N + col] = c_s[r * T::LDC + c];
      }
    } else {
      const float* w_scale = args.w_scale + static_cast<long long>(tile.member) * N;
      const float* bias = member_bias(args.bias, tile.member, N);
      for (int e = tid; e < BM * BN; e += kTHREADS) {
        const int r = e / BN, c = e % BN, col = n0 + c;
        if (r >= tile.rows || col >= N) continue;
        float v = dequant(c_s[r * T::LDC + c], args.row_scale[tile.row0 + r], w_scale[col], bias, col);
        if (args.activation >= 0) v = activate(v, args.activation);
        store_output(args, static_cast<long long>(tile.row0 + r) * N + col, v);
      }
    }
    __syncthreads();  // the shared tile is reused by the next column tile
  }
#endif
}

// Split-K: adds the int32 partial sums of the group's rows (exact, any order gives the same integer), then the
// dequantisation epilogue. Warp per row.
__global__ void i8_splitk_epilogue_kernel(GemmI8Args args) {
  if (*args.plan.valid() == 0) return;
  const int lane = threadIdx.x & 31;
  const long long warps = static_cast<long long>(gridDim.x) * (blockDim.x >> 5);
  const int N = args.n;
  const long long split_stride = static_cast<long long>(args.rows) * N;
  for (long long r = static_cast<long long>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5); r < args.rows;
       r += warps) {
    const int member = member_of_row(args.plan, args.offsets, static_cast<int>(r));
    if (member < 0) continue;
    const float* w_scale = args.w_scale + static_cast<long long>(member) * N;
    const float* bias = member_bias(args.bias, member, N);
    const float row_scale = args.row_scale[r];
    for (int col = lane; col < N; col += 32) {
      const long long at = r * N + col;
      int acc = args.partial[at];
      for (int s = 1; s < args.k_splits; ++s) acc += args.partial[s * split_stride + at];
      float v = dequant(acc, row_scale, w_scale[col], bias, col);
      if (args.activation >= 0) v = activate(v, args.activation);
      store_output(args, at, v);
    }
  }
}

template <int BM, int STAGES, int WARPS_M>
cudaError_t launch_config(const GemmI8Args& args, unsigned int splits, cudaStream_t stream) {
  const long long col_tiles = (static_cast<long long>(args.n) + BN - 1) / BN;
  const dim3 grid(static_cast<unsigned int>(args.max_tiles),
                  static_cast<unsigned int>(col_tiles < 65535 ? col_tiles : 65535), splits);
  gemm_i8_kernel<BM, STAGES, WARPS_M><<<grid, kTHREADS, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_gemm_i8(const GemmI8Args& args, cudaStream_t stream) {
  if (args.max_tiles <= 0 || args.n <= 0 || args.k <= 0 || args.rows <= 0) return cudaSuccess;
  if (args.k > kMAX_I8_WIDTH || args.lda < args.k || args.lda % 16 != 0) return cudaErrorInvalidValue;
  const unsigned int splits = args.k_splits > 1 ? static_cast<unsigned int>(args.k_splits) : 1u;
  if (splits > 1 && (args.partial == nullptr || args.steps_per_split < 1)) return cudaErrorInvalidValue;
  cudaError_t err;
  if (args.bm == kGEMM_BM_I8_SMALL) err = launch_config<kGEMM_BM_I8_SMALL, 4, 1>(args, splits, stream);
  else if (args.bm == kGEMM_BM_I8_LARGE) err = launch_config<kGEMM_BM_I8_LARGE, 2, 2>(args, splits, stream);
  else return cudaErrorInvalidValue;
  if (err != cudaSuccess || splits == 1) return err;
  i8_splitk_epilogue_kernel<<<grid_for(args.rows, 8), 256, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace detail
}  // namespace cuda
}  // namespace pimoe
