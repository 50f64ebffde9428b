// fp32 grouped GEMM on the CUDA cores (tiled SIMT) with a fused bias + activation epilogue, over the row tiles
// of a PiMoEExpertMLP plan.
//
// Block tile 64x64, K step 16, 256 threads each computing a 4x4 micro-tile (rows ty + 16 i, columns tx + 16 j,
// so shared-memory reads are broadcasts or conflict-free). Global -> register -> shared double buffering.
// Out-of-range rows/columns/k are zero-filled; every output element accumulates its K products in increasing
// k order in one thread: deterministic.
#include "expert_mlp_internal.cuh"

namespace pimoe {
namespace cuda {
namespace detail {
namespace {

constexpr int BM = kGEMM_BM, BN = 64, BK = 16;
constexpr int kTHREADS = 256;
constexpr int kLOADS = BM * BK / kTHREADS;  // elements per thread per operand and K step (4)
static_assert(BM == BN, "the load mapping below assumes square block tiles");

__global__ void __launch_bounds__(kTHREADS) gemm_f32_kernel(GemmArgs args) {
  __shared__ float a_s[2][BK][BM + 4];
  __shared__ float b_s[2][BK][BN + 4];
  RowTile tile;
  if (!find_row_tile(args.plan, static_cast<int>(blockIdx.x), BM, &tile)) return;
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const int K = args.k, N = args.n;
  const float* a_rows = static_cast<const float*>(args.a) + static_cast<long long>(tile.row0) * K;
  const float* w_member = static_cast<const float*>(args.w) + static_cast<long long>(tile.member) * N * K;
  const float* bias = member_bias(args.bias, tile.member, N);
  const int k_steps = (K + BK - 1) / BK;

  for (int n0 = static_cast<int>(blockIdx.y) * BN; n0 < N; n0 += static_cast<int>(gridDim.y) * BN) {
    const float* w_rows = w_member + static_cast<long long>(n0) * K;
    float acc[4][4];
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
    float reg_a[kLOADS], reg_b[kLOADS];
    // element e of a 64 x 16 tile: row e / 16, k offset e % 16 (consecutive threads read consecutive k)
    auto load = [&](int step) {
      const int k0 = step * BK;
      for (int i = 0; i < kLOADS; ++i) {
        const int e = tid + i * kTHREADS, r = e >> 4, kg = k0 + (e & 15);
        reg_a[i] = (r < tile.rows && kg < K) ? a_rows[static_cast<long long>(r) * K + kg] : 0.0f;
        reg_b[i] = (n0 + r < N && kg < K) ? w_rows[static_cast<long long>(r) * K + kg] : 0.0f;
      }
    };
    auto store = [&](int buf) {
      for (int i = 0; i < kLOADS; ++i) {
        const int e = tid + i * kTHREADS, r = e >> 4, kk = e & 15;
        a_s[buf][kk][r] = reg_a[i];
        b_s[buf][kk][r] = reg_b[i];
      }
    };
    load(0);
    store(0);
    __syncthreads();
    for (int step = 0; step < k_steps; ++step) {
      const int cur = step & 1;
      const bool next = step + 1 < k_steps;
      if (next) load(step + 1);
      for (int kk = 0; kk < BK; ++kk) {
        float a[4], b[4];
        for (int i = 0; i < 4; ++i) a[i] = a_s[cur][kk][ty + 16 * i];
        for (int j = 0; j < 4; ++j) b[j] = b_s[cur][kk][tx + 16 * j];
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
      }
      if (next) store(cur ^ 1);
      __syncthreads();
    }
    for (int i = 0; i < 4; ++i) {
      const int r = ty + 16 * i;
      if (r >= tile.rows) continue;
      float* out = static_cast<float*>(args.c) + static_cast<long long>(tile.row0 + r) * N;
      for (int j = 0; j < 4; ++j) {
        const int col = n0 + tx + 16 * j;
        if (col >= N) continue;
        float v = add_bias(acc[i][j], bias, col);
        if (args.activation >= 0) v = activate(v, args.activation);
        out[col] = v;
      }
    }
    // no barrier needed here: the next column tile's first shared writes go to buffer 0, whose last reads
    // happened before the final __syncthreads of the K loop
  }
}

}  // namespace

cudaError_t launch_gemm_f32(const GemmArgs& args, cudaStream_t stream) {
  if (args.max_tiles <= 0 || args.n <= 0 || args.k <= 0) return cudaSuccess;
  if (!args.c_f32) return cudaErrorInvalidValue;  // the fp32 path keeps every activation in fp32
  const long long col_tiles = (static_cast<long long>(args.n) + BN - 1) / BN;
  const dim3 grid(static_cast<unsigned int>(args.max_tiles),
                  static_cast<unsigned int>(col_tiles < 65535 ? col_tiles : 65535));
  gemm_f32_kernel<<<grid, kTHREADS, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace detail
}  // namespace cuda
}  // namespace pimoe
