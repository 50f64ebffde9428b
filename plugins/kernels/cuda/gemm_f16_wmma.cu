// fp16-weight grouped GEMM on tensor cores (nvcuda::wmma 16x16x16, fp32 accumulation) with a fused
// bias + activation epilogue, over the row tiles of a PiMoEExpertMLP plan.
//
// A (activations) is either fp16 (x_sorted, layer 0) or fp32 (hidden activations, kept in fp32 as the op contract
// requires). An fp32 A is split on the fly into A_hi = fp16(A) and A_lo = fp16(A - A_hi) and both are multiplied
// by the (exact) fp16 weights, so A enters the product with ~22 significant bits: close to fp32 rather than
// rounded to fp16 between layers (which would miss the contract's tolerance, see docs/trt_plugins.md).
// fp16 ends at 65504: a hidden value >= 65520 would split into +inf and -inf and the two products would add to NaN.
// So every row r of an fp32 A carries an exponent e_r (args.row_exp, expert_mlp.cu: 0 unless the row's largest
// finite |value| is >= 2^15): the split is of A * 2^-e_r and the accumulator is multiplied by 2^e_r before the
// epilogue. Both scalings are exact (powers of two), so rows with e_r = 0, all rows of ordinary data, are
// bit-identical to the unscaled computation.
//
// Few rows (decode) leave most SMs idle, so K can be split over gridDim.z: each split writes raw fp32 partial sums
// and splitk_reduce (expert_mlp.cu) adds them in split order (deterministic), then bias and activation.
// Block tile 64x64, K step 32, 4 warps (2x2, 32x32 each). Global -> register -> shared double buffering on the
// vector path (rows and pointers 16-byte aligned, K % 8 == 0); otherwise a scalar path loads straight into shared
// memory. Rows past the segment, columns past N and k past K are zero-filled. Each output element is produced by
// one fixed sequence of mma operations: deterministic.
#include <mma.h>

#include "expert_mlp_internal.cuh"

namespace pimoe {
namespace cuda {
namespace detail {
namespace {

using namespace nvcuda;

constexpr int BM = kGEMM_BM, BN = 64, BK = kGEMM_BK_F16;
constexpr int LDS = BK + 8;  // halves per shared row (keeps 32-byte fragment alignment, spreads banks)
constexpr int LDC = BN + 4;  // floats per row of the epilogue tile
constexpr int kTHREADS = 128;
constexpr int kVEC_H = BM * BK / 8 / kTHREADS;  // 16-byte fp16 vectors per thread per operand and K step (2)
constexpr int kVEC_F = BM * BK / 4 / kTHREADS;  // 16-byte fp32 vectors per thread for an fp32 A (4)
static_assert(BM == BN, "the load mapping below assumes square block tiles");

struct Operands {
  __half a[2][BM * LDS];   // A (or A_hi)
  __half lo[2][BM * LDS];  // A_lo (fp32 A only)
  __half b[2][BN * LDS];
};
// the epilogue tile reuses the operand buffers (it is written only after the K loop's last barrier)
union __align__(128) GemmSmem {
  Operands op;
  float c[BM * LDC];
};

// v = hi + lo (to ~22 bits) for |v| < 2^15 (the caller scales by 2^-e_r first); an infinite v keeps lo = 0 so that
// the product stays the infinity fp32 arithmetic would give (inf - inf would make lo NaN)
__device__ __forceinline__ void split_store(float v, __half* hi, __half* lo) {
  const __half h = __float2half_rn(v);
  *hi = h;
  *lo = isinf(v) ? __float2half_rn(0.0f) : __float2half_rn(v - __half2float(h));
}

// 2^e as a float, for -126 <= e <= 127 (exact)
__device__ __forceinline__ float pow2(int e) { return __int_as_float((127 + e) << 23); }

__global__ void __launch_bounds__(kTHREADS) gemm_f16_kernel(GemmArgs args) {
  __shared__ GemmSmem smem;
  __shared__ float scale_down[BM];  // 2^-e_r: applied to A before the split
  __shared__ float scale_up[BM];    // 2^e_r: applied to the accumulator
  RowTile tile;
  if (!find_row_tile(args.plan, static_cast<int>(blockIdx.x), BM, &tile)) return;
  const int tid = threadIdx.x, warp = tid >> 5;
  for (int r = tid; r < BM; r += kTHREADS) {
    const int e = args.row_exp != nullptr && r < tile.rows ? args.row_exp[tile.row0 + r] : 0;
    scale_down[r] = pow2(-e);
    scale_up[r] = pow2(e);
  }
  __syncthreads();
  const int warp_m = warp >> 1, warp_n = warp & 1;
  const int K = args.k, N = args.n;
  const bool a_f32 = args.a_f32;
  // only the pointer of A's actual dtype is ever dereferenced (and only formed from a correctly typed base)
  const long long a_offset = static_cast<long long>(tile.row0) * K;
  const __half* a_h = a_f32 ? nullptr : static_cast<const __half*>(args.a) + a_offset;
  const float* a_f = a_f32 ? static_cast<const float*>(args.a) + a_offset : nullptr;
  const __half* w_member = static_cast<const __half*>(args.w) + static_cast<long long>(tile.member) * N * K;
  const float* bias = member_bias(args.bias, tile.member, N);
  // split-K (blockIdx.z): this block covers K steps [step_begin, step_end); the host makes every split non-empty
  const int k_steps = (K + BK - 1) / BK;
  const int splits = args.k_splits > 1 ? args.k_splits : 1;
  const int step_begin = splits > 1 ? static_cast<int>(blockIdx.z) * args.steps_per_split : 0;
  const int step_end = splits > 1 ? min(k_steps, step_begin + args.steps_per_split) : k_steps;
  if (step_begin >= step_end) return;  // block-uniform; cannot happen for a consistent split
  const __half zero = __float2half_rn(0.0f);

  for (int n0 = static_cast<int>(blockIdx.y) * BN; n0 < N; n0 += static_cast<int>(gridDim.y) * BN) {
    const __half* w_rows = w_member + static_cast<long long>(n0) * K;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

    // ---- vector path: registers hold the next K step (fp16 A: 2 vectors, fp32 A: 4 vectors; B: 2 vectors)
    uint4 reg_a[kVEC_F], reg_b[kVEC_H];
    auto load_vec = [&](int step) {
      const int k0 = step * BK;
      if (a_f32) {
        for (int i = 0; i < kVEC_F; ++i) {  // chunk v: row v / 8, k offset (v % 8) * 4
          const int v = tid + i * kTHREADS, r = v >> 3, kk = k0 + (v & 7) * 4;
          reg_a[i] = make_uint4(0, 0, 0, 0);
          if (r < tile.rows && kk < K) reg_a[i] = *reinterpret_cast<const uint4*>(a_f + static_cast<long long>(r) * K + kk);
        }
      } else {
        for (int i = 0; i < kVEC_H; ++i) {  // chunk v: row v / 4, k offset (v % 4) * 8
          const int v = tid + i * kTHREADS, r = v >> 2, kk = k0 + (v & 3) * 8;
          reg_a[i] = make_uint4(0, 0, 0, 0);
          if (r < tile.rows && kk < K) reg_a[i] = *reinterpret_cast<const uint4*>(a_h + static_cast<long long>(r) * K + kk);
        }
      }
      for (int i = 0; i < kVEC_H; ++i) {
        const int v = tid + i * kTHREADS, r = v >> 2, kk = k0 + (v & 3) * 8;
        reg_b[i] = make_uint4(0, 0, 0, 0);
        if (n0 + r < N && kk < K) reg_b[i] = *reinterpret_cast<const uint4*>(w_rows + static_cast<long long>(r) * K + kk);
      }
    };
    auto store_vec = [&](int buf) {
      if (a_f32) {
        for (int i = 0; i < kVEC_F; ++i) {
          const int v = tid + i * kTHREADS, r = v >> 3, c = (v & 7) * 4;
          const float vals[4] = {__uint_as_float(reg_a[i].x), __uint_as_float(reg_a[i].y), __uint_as_float(reg_a[i].z),
                                 __uint_as_float(reg_a[i].w)};
          for (int t = 0; t < 4; ++t)
            split_store(vals[t] * scale_down[r], &smem.op.a[buf][r * LDS + c + t], &smem.op.lo[buf][r * LDS + c + t]);
        }
      } else {
        for (int i = 0; i < kVEC_H; ++i) {
          const int v = tid + i * kTHREADS, r = v >> 2, c = (v & 3) * 8;
          *reinterpret_cast<uint4*>(&smem.op.a[buf][r * LDS + c]) = reg_a[i];
        }
      }
      for (int i = 0; i < kVEC_H; ++i) {
        const int v = tid + i * kTHREADS, r = v >> 2, c = (v & 3) * 8;
        *reinterpret_cast<uint4*>(&smem.op.b[buf][r * LDS + c]) = reg_b[i];
      }
    };
    // ---- scalar path (any K, any alignment): element e of a tile = row e / 32, k offset e % 32
    auto load_scalar = [&](int step, int buf) {
      const int k0 = step * BK;
      for (int e = tid; e < BM * BK; e += kTHREADS) {
        const int r = e / BK, kk = e % BK, kg = k0 + kk;
        const bool in_a = r < tile.rows && kg < K;
        if (a_f32) {
          split_store(in_a ? a_f[static_cast<long long>(r) * K + kg] * scale_down[r] : 0.0f,
                      &smem.op.a[buf][r * LDS + kk], &smem.op.lo[buf][r * LDS + kk]);
        } else {
          smem.op.a[buf][r * LDS + kk] = in_a ? a_h[static_cast<long long>(r) * K + kg] : zero;
        }
        smem.op.b[buf][r * LDS + kk] = (n0 + r < N && kg < K) ? w_rows[static_cast<long long>(r) * K + kg] : zero;
      }
    };

    if (args.vec) {
      load_vec(step_begin);
      store_vec(0);
    } else {
      load_scalar(step_begin, 0);
    }
    __syncthreads();
    for (int step = step_begin; step < step_end; ++step) {
      const int cur = (step - step_begin) & 1;
      const bool next = step + 1 < step_end;
      if (next && args.vec) load_vec(step + 1);
      for (int kk = 0; kk < BK; kk += 16) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> fb[2];
        for (int j = 0; j < 2; ++j)
          wmma::load_matrix_sync(fb[j], &smem.op.b[cur][(warp_n * 32 + j * 16) * LDS + kk], LDS);
        for (int i = 0; i < 2; ++i) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
          wmma::load_matrix_sync(fa, &smem.op.a[cur][(warp_m * 32 + i * 16) * LDS + kk], LDS);
          for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa, fb[j], acc[i][j]);
          if (a_f32) {
            wmma::load_matrix_sync(fa, &smem.op.lo[cur][(warp_m * 32 + i * 16) * LDS + kk], LDS);
            for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa, fb[j], acc[i][j]);
          }
        }
      }
      if (next) {
        if (args.vec) store_vec(cur ^ 1);
        else load_scalar(step + 1, cur ^ 1);
      }
      __syncthreads();
    }

    // epilogue: accumulators -> shared (reusing the operand buffers) -> bias + activation -> global
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(&smem.c[(warp_m * 32 + i * 16) * LDC + warp_n * 32 + j * 16], acc[i][j], LDC,
                                wmma::mem_row_major);
    __syncthreads();
    if (splits > 1) {  // raw partial sums; splitk_reduce adds them in split order, then bias and activation
      float* partial = args.partial + (static_cast<long long>(blockIdx.z) * args.partial_rows) * N;
      for (int e = tid; e < BM * BN; e += kTHREADS) {
        const int r = e / BN, c = e % BN, col = n0 + c;
        if (r < tile.rows && col < N)
          partial[static_cast<long long>(tile.row0 + r) * N + col] = smem.c[r * LDC + c] * scale_up[r];
      }
      __syncthreads();
      continue;
    }
    for (int e = tid; e < BM * BN; e += kTHREADS) {
      const int r = e / BN, c = e % BN, col = n0 + c;
      if (r >= tile.rows || col >= N) continue;
      float v = add_bias(smem.c[r * LDC + c] * scale_up[r], bias, col);
      if (args.activation >= 0) v = activate(v, args.activation);
      const long long out = static_cast<long long>(tile.row0 + r) * N + col;
      if (args.c_f32) static_cast<float*>(args.c)[out] = v;
      else static_cast<__half*>(args.c)[out] = __float2half_rn(v);
    }
    __syncthreads();  // the shared tile is reused by the next column tile
  }
}

}  // namespace

cudaError_t launch_gemm_f16(const GemmArgs& args, cudaStream_t stream) {
  if (args.max_tiles <= 0 || args.n <= 0 || args.k <= 0) return cudaSuccess;
  const long long col_tiles = (static_cast<long long>(args.n) + BN - 1) / BN;
  const unsigned int splits = args.k_splits > 1 ? static_cast<unsigned int>(args.k_splits) : 1u;
  if (splits > 1 && (args.partial == nullptr || args.steps_per_split < 1)) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned int>(args.max_tiles),
                  static_cast<unsigned int>(col_tiles < 65535 ? col_tiles : 65535), splits);
  gemm_f16_kernel<<<grid, kTHREADS, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace detail
}  // namespace cuda
}  // namespace pimoe
