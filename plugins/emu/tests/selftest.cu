// The emulator's feature test: plain CUDA C++ that the emulator runs (pimoe_emu_selftest) and nvcc compiles for a
// real GPU (sm_80+; scripts/gpu_check.sh), so the first GPU at hand validates the emulator itself, WMMA and mma.sync
// fragment layouts included. Positive cases must match a host reference on both; negative cases (emulator only:
// on a GPU they are undefined behaviour) must be reported by the emulator.
#include <cuda_fp16.h>
#include <cuda_pipeline.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

using namespace nvcuda;

static int g_pass = 0, g_fail = 0;
static void check(bool ok, const char* what) {
  std::printf("%s: %s\n", ok ? "PASS" : "FAIL", what);
  (ok ? g_pass : g_fail)++;
}

// ---------------------------------------------------------------- shared memory + __syncthreads + warp shuffle
__device__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
// block sum: warp butterflies, per-warp partials in static shared memory, one warp finishes
__global__ void block_sum_kernel(const float* x, int n, float* out) {
  __shared__ float partial[32];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  float v = 0.0f;
  for (int i = blockIdx.x * blockDim.x + tid; i < n; i += gridDim.x * blockDim.x) v += x[i];
  v = warp_sum(v);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float t = lane < (int)(blockDim.x >> 5) ? partial[lane] : 0.0f;
    t = warp_sum(t);
    if (lane == 0) out[blockIdx.x] = t;
  }
}
// inclusive scan (shfl_up inside a warp-0-only branch, dynamic shared memory, __syncthreads_or)
__global__ void scan_kernel(const int* in, int* out, int* any_negative) {
  extern __shared__ int scratch[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, warps = blockDim.x >> 5;
  int v = in[tid];
  const int neg = __syncthreads_or(v < 0);
  for (int o = 1; o < 32; o <<= 1) {
    const int u = __shfl_up_sync(0xffffffffu, v, o);
    if (lane >= o) v += u;
  }
  if (lane == 31) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    int t = lane < warps ? scratch[lane] : 0;
    for (int o = 1; o < 32; o <<= 1) {
      const int u = __shfl_up_sync(0xffffffffu, t, o);
      if (lane >= o) t += u;
    }
    if (lane < warps) scratch[lane] = t;
  }
  __syncthreads();
  out[tid] = v + (warp > 0 ? scratch[warp - 1] : 0);
  if (tid == 0) *any_negative = neg;
}
// warp match + popcount + atomics (the dispatch kernel's counting idiom)
__global__ void match_count_kernel(const int* ids, int n, int* counts, unsigned long long* first_bad) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x, lane = threadIdx.x & 31;
  const int id = i < n ? ids[i] : -1;
  const unsigned same = __match_any_sync(0xffffffffu, id);
  if (i < n && lane == __ffs(same) - 1) atomicAdd(&counts[id], __popc(same));
  if (i < n && id == 3) atomicMin(first_bad, (unsigned long long)i);
}

// ---------------------------------------------------------------- WMMA f16 -> f32 and s8 -> s32 (one warp)
__global__ void wmma_f16_kernel(const __half* a, const __half* b, float* c) {  // a row-major, b col-major
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.0f);
  wmma::load_matrix_sync(fa, a, 16);
  wmma::load_matrix_sync(fb, b, 16);
  wmma::mma_sync(acc, fa, fb, acc);
  wmma::store_matrix_sync(c, acc, 16, wmma::mem_row_major);
}
__global__ void wmma_s8_kernel(const signed char* a, const signed char* b, int* c) {
  wmma::fragment<wmma::matrix_a, 16, 16, 16, signed char, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, signed char, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, int> acc;
  wmma::fill_fragment(acc, 0);
  wmma::load_matrix_sync(fa, a, 16);
  wmma::load_matrix_sync(fb, b, 16);
  wmma::mma_sync(acc, fa, fb, acc);
  wmma::store_matrix_sync(c, acc, 16, wmma::mem_row_major);
}

// ---------------------------------------------------------------- inline PTX mma.sync (fragment layout of the PTX ISA)
__device__ uint32_t pack_h(__half lo, __half hi) {
  return (uint32_t)__half_as_ushort(lo) | ((uint32_t)__half_as_ushort(hi) << 16);
}
// A [16][16] row-major, B stored as [n][k] (8 x 16), D [16][8] row-major. swap_bug: swaps a1/a2 (a layout bug).
__global__ void mma_f16_kernel(const __half* A, const __half* B, float* D, int swap_bug) {
  const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
  uint32_t a[4], b[2];
  a[0] = pack_h(A[g * 16 + 2 * t], A[g * 16 + 2 * t + 1]);
  a[1] = pack_h(A[(g + 8) * 16 + 2 * t], A[(g + 8) * 16 + 2 * t + 1]);
  a[2] = pack_h(A[g * 16 + 2 * t + 8], A[g * 16 + 2 * t + 9]);
  a[3] = pack_h(A[(g + 8) * 16 + 2 * t + 8], A[(g + 8) * 16 + 2 * t + 9]);
  if (swap_bug) {
    const uint32_t s = a[1];
    a[1] = a[2];
    a[2] = s;
  }
  b[0] = pack_h(B[g * 16 + 2 * t], B[g * 16 + 2 * t + 1]);
  b[1] = pack_h(B[g * 16 + 2 * t + 8], B[g * 16 + 2 * t + 9]);
  float d0, d1, d2, d3;
  const float z = 0.0f;
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=f"(d0), "=f"(d1), "=f"(d2), "=f"(d3)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(z), "f"(z), "f"(z), "f"(z));
  D[g * 8 + 2 * t] = d0;
  D[g * 8 + 2 * t + 1] = d1;
  D[(g + 8) * 8 + 2 * t] = d2;
  D[(g + 8) * 8 + 2 * t + 1] = d3;
}
// A [16][32] row-major s8, B stored as [n][k] (8 x 32), D [16][8] int32
__global__ void mma_s8_kernel(const signed char* A, const signed char* B, int* D) {
  const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
  uint32_t a[4], b[2];
  std::memcpy(&a[0], A + g * 32 + 4 * t, 4);
  std::memcpy(&a[1], A + (g + 8) * 32 + 4 * t, 4);
  std::memcpy(&a[2], A + g * 32 + 4 * t + 16, 4);
  std::memcpy(&a[3], A + (g + 8) * 32 + 4 * t + 16, 4);
  std::memcpy(&b[0], B + g * 32 + 4 * t, 4);
  std::memcpy(&b[1], B + g * 32 + 4 * t + 16, 4);
  int d0, d1, d2, d3;
  const int z = 0;
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
      : "=r"(d0), "=r"(d1), "=r"(d2), "=r"(d3)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(z), "r"(z), "r"(z), "r"(z));
  D[g * 8 + 2 * t] = d0;
  D[g * 8 + 2 * t + 1] = d1;
  D[(g + 8) * 8 + 2 * t] = d2;
  D[(g + 8) * 8 + 2 * t + 1] = d3;
}

// ---------------------------------------------------------------- cp.async pipeline
// each thread copies 16 bytes into shared memory asynchronously; wait_early reads before waiting (a bug)
__global__ void cp_async_kernel(const float* x, float* out, int wait_early) {
  __shared__ __align__(16) float buf[256];
  const int tid = threadIdx.x;
  __pipeline_memcpy_async(&buf[tid * 4], &x[tid * 4], 16);
  __pipeline_commit();
  if (!wait_early) __pipeline_wait_prior(0);
  __syncthreads();
  if (tid == 0) {
    float s = 0.0f;
    for (int i = 0; i < 256; ++i) s += buf[i];
    out[0] = s;
  }
  if (wait_early) __pipeline_wait_prior(0);
}

// ---------------------------------------------------------------- deliberately broken kernels
__global__ void missing_sync_kernel(const float* x, float* out) {  // no __syncthreads between write and read
  __shared__ float s[128];
  s[threadIdx.x] = x[threadIdx.x];
  if (threadIdx.x == 0) {
    float t = 0.0f;
    for (int i = 0; i < 128; ++i) t += s[i];
    out[0] = t;
  }
}
__global__ void bad_mask_kernel(float* out) {  // lanes 0..15 shuffle from lane+16, which is not in the mask
  const int lane = threadIdx.x & 31;
  if (lane < 16) out[lane] = __shfl_sync(0x0000ffffu, (float)lane, lane + 16);
}
__global__ void divergent_shfl_kernel(float* out) {  // full mask, but only half the warp gets there
  const int lane = threadIdx.x & 31;
  if (lane < 16) out[lane] = warp_sum((float)lane);
}
__global__ void divergent_barrier_kernel(float* out) {
  __shared__ float s[64];
  if (threadIdx.x < 64) {
    s[threadIdx.x] = 1.0f;
    __syncthreads();
    out[threadIdx.x] = s[63 - threadIdx.x];
  }
}
__global__ void misaligned_wmma_kernel(const __half* a, float* c) {
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.0f);
  wmma::load_matrix_sync(fa, a + 8, 16);  // 16 bytes off a 256-bit boundary
  wmma::load_matrix_sync(fb, a, 16);
  wmma::mma_sync(acc, fa, fb, acc);
  wmma::store_matrix_sync(c, acc, 16, wmma::mem_row_major);
}

template <class T>
static T* dev(const std::vector<T>& h) {
  T* d = nullptr;
  cudaMalloc(&d, h.size() * sizeof(T));
  cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice);
  return d;
}
template <class T>
static std::vector<T> host(const T* d, size_t n) {
  std::vector<T> h(n);
  cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost);
  return h;
}
static unsigned g_seed = 12345;
static float frand() {
  g_seed = g_seed * 1664525u + 1013904223u;
  return ((g_seed >> 8) & 0xffff) / 65536.0f - 0.5f;
}
#ifdef __CUDA_EMU__
static int emu_warnings_now() { return emu::warning_count(); }
#endif
static bool launch_failed() {
  cudaError_t e = cudaDeviceSynchronize();
  return e != cudaSuccess;
}

int main() {
  // 1. block sum
  {
    const int n = 5000, blocks = 3, threads = 256;
    std::vector<float> x(n);
    for (auto& v : x) v = frand();
    float* dx = dev(x);
    float* dout = nullptr;
    cudaMalloc(&dout, blocks * sizeof(float));
    block_sum_kernel<<<blocks, threads>>>(dx, n, dout);
    auto out = host(dout, blocks);
    double ref = 0, got = 0;
    for (float v : x) ref += v;
    for (float v : out) got += v;
    check(cudaGetLastError() == cudaSuccess && std::fabs(ref - got) < 1e-3, "block sum: shared memory + __syncthreads + __shfl_xor_sync");
  }
  // 2. scan
  {
    const int n = 256;
    std::vector<int> in(n);
    for (int i = 0; i < n; ++i) in[i] = (i * 7) % 13 - (i == 100 ? 50 : 0);
    int *din = dev(in), *dout = nullptr, *dneg = nullptr;
    cudaMalloc(&dout, n * sizeof(int));
    cudaMalloc(&dneg, sizeof(int));
    scan_kernel<<<1, n, 32 * sizeof(int)>>>(din, dout, dneg);
    auto out = host(dout, n);
    auto neg = host(dneg, 1);
    bool ok = neg[0] == 1;
    int s = 0;
    for (int i = 0; i < n; ++i) ok = ok && (out[i] == (s += in[i]));
    check(ok, "block scan: __shfl_up_sync in a warp-0 branch + dynamic shared + __syncthreads_or");
  }
  // 3. match_any + atomics
  {
    const int n = 300;
    std::vector<int> ids(n);
    for (int i = 0; i < n; ++i) ids[i] = (i * 31 + i / 7) % 8;
    std::vector<int> zero(8, 0);
    int *dids = dev(ids), *dcounts = dev(zero);
    unsigned long long* dfirst = dev(std::vector<unsigned long long>{~0ull});
    match_count_kernel<<<(n + 127) / 128, 128>>>(dids, n, dcounts, dfirst);
    auto counts = host(dcounts, 8);
    auto first = host(dfirst, 1);
    std::vector<int> ref(8, 0);
    unsigned long long rf = ~0ull;
    for (int i = 0; i < n; ++i) {
      ref[ids[i]]++;
      if (ids[i] == 3 && rf == ~0ull) rf = i;
    }
    check(counts == ref && first[0] == rf, "__match_any_sync + __popc/__ffs + atomicAdd/atomicMin(u64)");
  }
  // 4./5. WMMA
  {
    std::vector<__half> a(256), b(256);
    std::vector<float> af(256), bf(256);
    for (int i = 0; i < 256; ++i) {
      a[i] = __float2half_rn(frand());
      b[i] = __float2half_rn(frand());
      af[i] = __half2float(a[i]);
      bf[i] = __half2float(b[i]);
    }
    __half *da = dev(a), *db = dev(b);
    float* dc = nullptr;
    cudaMalloc(&dc, 256 * sizeof(float));
    wmma_f16_kernel<<<1, 32>>>(da, db, dc);
    auto c = host(dc, 256);
    double err = 0;
    for (int i = 0; i < 16; ++i)
      for (int j = 0; j < 16; ++j) {
        double r = 0;
        for (int k = 0; k < 16; ++k) r += (double)af[i * 16 + k] * bf[j * 16 + k];  // b col-major: (k, j) at j*16+k
        err = std::fmax(err, std::fabs(r - c[i * 16 + j]));
      }
    check(!launch_failed() && err < 1e-5, "wmma 16x16x16 f16 -> f32");
    std::vector<signed char> a8(256), b8(256);
    for (int i = 0; i < 256; ++i) {
      a8[i] = (signed char)((i * 37) % 255 - 127);
      b8[i] = (signed char)((i * 91) % 255 - 127);
    }
    signed char *da8 = dev(a8), *db8 = dev(b8);
    int* dc8 = nullptr;
    cudaMalloc(&dc8, 256 * sizeof(int));
    wmma_s8_kernel<<<1, 32>>>(da8, db8, dc8);
    auto c8 = host(dc8, 256);
    bool ok = !launch_failed();
    for (int i = 0; i < 16; ++i)
      for (int j = 0; j < 16; ++j) {
        int r = 0;
        for (int k = 0; k < 16; ++k) r += a8[i * 16 + k] * b8[j * 16 + k];
        ok = ok && r == c8[i * 16 + j];
      }
    check(ok, "wmma 16x16x16 s8 -> s32 (exact)");
  }
  // 6./7. mma.sync
  {
    std::vector<__half> A(256), B(128);
    for (auto& v : A) v = __float2half_rn(frand());
    for (auto& v : B) v = __float2half_rn(frand());
    __half *dA = dev(A), *dB = dev(B);
    float* dD = nullptr;
    cudaMalloc(&dD, 128 * sizeof(float));
    auto ref_err = [&](const std::vector<float>& D) {
      double err = 0;
      for (int i = 0; i < 16; ++i)
        for (int j = 0; j < 8; ++j) {
          double r = 0;
          for (int k = 0; k < 16; ++k) r += (double)__half2float(A[i * 16 + k]) * __half2float(B[j * 16 + k]);
          err = std::fmax(err, std::fabs(r - D[i * 8 + j]));
        }
      return err;
    };
    mma_f16_kernel<<<1, 32>>>(dA, dB, dD, 0);
    check(!launch_failed() && ref_err(host(dD, 128)) < 1e-5, "inline PTX mma.sync.m16n8k16 f16 (PTX ISA fragment layout)");
    mma_f16_kernel<<<1, 32>>>(dA, dB, dD, 1);
    check(!launch_failed() && ref_err(host(dD, 128)) > 1e-2, "mma.sync with swapped a1/a2 registers gives wrong results (layout bug caught)");
    std::vector<signed char> A8(512), B8(256);
    for (int i = 0; i < 512; ++i) A8[i] = (signed char)((i * 37) % 255 - 127);
    for (int i = 0; i < 256; ++i) B8[i] = (signed char)((i * 53) % 255 - 127);
    signed char *dA8 = dev(A8), *dB8 = dev(B8);
    int* dD8 = nullptr;
    cudaMalloc(&dD8, 128 * sizeof(int));
    mma_s8_kernel<<<1, 32>>>(dA8, dB8, dD8);
    auto D8 = host(dD8, 128);
    bool ok = !launch_failed();
    for (int i = 0; i < 16; ++i)
      for (int j = 0; j < 8; ++j) {
        int r = 0;
        for (int k = 0; k < 32; ++k) r += A8[i * 32 + k] * B8[j * 32 + k];
        ok = ok && r == D8[i * 8 + j];
      }
    check(ok, "inline PTX mma.sync.m16n8k32 s8 -> s32 (exact)");
  }
  // 8. cp.async
  {
    std::vector<float> x(256);
    double ref = 0;
    for (auto& v : x) ref += (v = frand());
    float* dx = dev(x);
    float* dout = nullptr;
    cudaMalloc(&dout, sizeof(float));
    cp_async_kernel<<<1, 64>>>(dx, dout, 0);
    check(!launch_failed() && std::fabs(host(dout, 1)[0] - ref) < 1e-4, "cp.async (__pipeline_memcpy_async/commit/wait_prior)");
#ifdef __CUDA_EMU__  // on a GPU the early read is a race whose outcome is unspecified
    cp_async_kernel<<<1, 64>>>(dx, dout, 1);
    const float bad = host(dout, 1)[0];
    check(!(std::fabs(bad - ref) < 1e-4), "reading cp.async data before __pipeline_wait_prior is caught (NaN sum)");
#endif
  }
#ifdef __CUDA_EMU__
  std::printf("---- negative cases (the emulator must report them) ----\n");
  {
    std::vector<float> x(128, 1.0f);
    float* dx = dev(x);
    float* dout = nullptr;
    cudaMalloc(&dout, 128 * sizeof(float));
    missing_sync_kernel<<<1, 128>>>(dx, dout);
    const float v = host(dout, 1)[0];
    check(!(v == 128.0f), "missing __syncthreads: thread 0 sees uninitialised shared memory (sum != 128)");
  }
  {
    float* dout = nullptr;
    cudaMalloc(&dout, 64 * sizeof(float));
    bad_mask_kernel<<<1, 32>>>(dout);
    check(launch_failed(), "__shfl_sync from a lane outside the mask is reported");
    cudaDeviceReset();  // the launch error is sticky, as on a GPU
    divergent_shfl_kernel<<<1, 32>>>(dout);
    check(launch_failed(), "full-mask shuffle reached by half a warp is reported");
    cudaDeviceReset();
    divergent_barrier_kernel<<<1, 128>>>(dout);
    check(emu_warnings_now() > 0, "__syncthreads reached by only part of the block is reported (warning)");
    cudaDeviceReset();
    __half* dh = nullptr;
    cudaMalloc(&dh, 512 * sizeof(__half));
    misaligned_wmma_kernel<<<1, 32>>>(dh, dout);
    check(launch_failed(), "wmma::load_matrix_sync with a pointer off the 256-bit boundary is reported");
    cudaDeviceReset();
    block_sum_kernel<<<1, 2048>>>(nullptr, 0, dout);
    check(cudaGetLastError() == cudaErrorInvalidConfiguration, "a 2048-thread block is rejected (cudaErrorInvalidConfiguration)");
  }
#else
  std::printf("(negative cases run on the emulator only: on a GPU they are undefined behaviour)\n");
#endif
  std::printf("%d passed, %d failed\n", g_pass, g_fail);
  return g_fail == 0 ? 0 : 1;
}
