// cuda_emu: run CUDA C++ kernels on the CPU for functional testing (plugins/emu/README.md).
//
// Each CUDA thread is a fiber; a block's fibers run on one OS thread and switch only at synchronisation
// points (__syncthreads*, __syncwarp, warp collectives, WMMA, mma.sync). Warp collectives are real
// rendezvous of the lanes named in `mask` (a lane outside the mask, an exited lane, mismatched collectives
// or a deadlock are reported). Shared memory is a per-block arena filled with 0xFF bytes (NaN / -1) at block
// start. cp.async (__pipeline_memcpy_async) copies land only at __pipeline_wait_prior; the destination holds
// 0xFF bytes until then. Kernel sources need one mechanical rewrite (tools/cu2cpp.py): `k<<<cfg>>>(args)`
// -> emu::launch(...), `[extern] __shared__ T x[..];` -> arena references, selected inline PTX -> emulator calls.
#pragma once

#include <cmath>
#include <math.h>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

// ------------------------------------------------------------------------------------------ qualifiers
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
// (no __noinline__: libstdc++ uses __attribute__((__noinline__)) itself)
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __align__(n) alignas(n)
#define __constant__
#define __managed__
#define __CUDA_EMU__ 1

// ------------------------------------------------------------------------------------------ vector types
struct uint3 { unsigned x, y, z; };
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(8) int2 { int x, y; };
struct alignas(8) float2 { float x, y; };
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
constexpr int warpSize = 32;

// ------------------------------------------------------------------------------------------ runtime API
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorNotSupported = 801,
  cudaErrorLaunchFailure = 719,
  cudaErrorIllegalAddress = 700,
  cudaErrorAssert = 710,
  cudaErrorLaunchOutOfResources = 701,
};
typedef cudaError_t cudaError;
struct CUstream_st;
typedef CUstream_st* cudaStream_t;
struct CUevent_st;
typedef CUevent_st* cudaEvent_t;
enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4
};
enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrWarpSize = 10,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t);
const char* cudaGetErrorName(cudaError_t);
cudaError_t cudaGetDevice(int*);
cudaError_t cudaSetDevice(int);
cudaError_t cudaDeviceGetAttribute(int*, cudaDeviceAttr, int);
cudaError_t cudaMalloc(void**, size_t);
template <class T> cudaError_t cudaMalloc(T** p, size_t n) { return cudaMalloc(reinterpret_cast<void**>(p), n); }
cudaError_t cudaFree(void*);
cudaError_t cudaMemset(void*, int, size_t);
cudaError_t cudaMemsetAsync(void*, int, size_t, cudaStream_t = nullptr);
cudaError_t cudaMemcpy(void*, const void*, size_t, cudaMemcpyKind);
cudaError_t cudaMemcpyAsync(void*, const void*, size_t, cudaMemcpyKind, cudaStream_t = nullptr);
cudaError_t cudaStreamCreate(cudaStream_t*);
cudaError_t cudaStreamDestroy(cudaStream_t);
cudaError_t cudaStreamSynchronize(cudaStream_t);
cudaError_t cudaDeviceSynchronize();
cudaError_t cudaDeviceReset();  // clears the sticky error (as destroying the context would)
cudaError_t cudaFuncSetAttributeImpl(const void* fn, cudaFuncAttribute, int);
template <class F> cudaError_t cudaFuncSetAttribute(F* fn, cudaFuncAttribute a, int v) {
  return cudaFuncSetAttributeImpl(reinterpret_cast<const void*>(fn), a, v);
}

// ------------------------------------------------------------------------------------------ emulator core
namespace emu {

struct BlockInfo {
  uint3 bidx;
  dim3 bdim;
  dim3 gdim;
};
struct ThreadInfo {
  uint3 tidx;
  unsigned lane;
  unsigned warp;
  BlockInfo* blk;
};
extern thread_local ThreadInfo* t_cur;
int error_count();    // errors the emulator reported so far (test harnesses can assert on them)
int warning_count();

namespace rt {
enum WarpOp : int {
  kShflIdx, kShflUp, kShflDown, kShflXor, kVoteAny, kVoteAll, kBallot, kMatchAny, kMatchAll, kSyncWarp,
  kUniform, kCallback
};
enum BarKind : int { kBarPlain, kBarOr, kBarAnd, kBarCount };
int barrier(int kind, int pred, const char* file, int line);
uint64_t warp_op(int op, unsigned mask, uint64_t value, int arg, int width, const char* file, int line);
// every lane of `mask` hands a pointer; the last to arrive runs fn(payloads[32], mask) once for all of them
void warp_callback(unsigned mask, void* payload, void (*fn)(void* const* payloads, unsigned mask), const char* what,
                   const char* file, int line);
void* shared_var(const void* key, size_t bytes, size_t align, const char* name);
void* dynamic_shared();
void error(const char* file, int line, const char* fmt, ...) __attribute__((format(printf, 3, 4)));
[[noreturn]] void trap(const char* file, int line, const char* what);
void cp_async(void* dst, const void* src, size_t bytes, size_t src_bytes, const char* file, int line);
void cp_commit();
void cp_wait_prior(int n);
void launch(dim3 grid, dim3 block, size_t smem, cudaStream_t stream, void (*thunk)(void*), void* state,
            const void* fn, const char* name, const char* file, int line);
}  // namespace rt

struct LaunchCfg {
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
};
inline LaunchCfg cfg(dim3 g, dim3 b, size_t smem = 0, cudaStream_t s = nullptr) { return {g, b, smem, s}; }

// k<<<cfg>>>(args...): arguments are converted to the kernel's parameter types once (like CUDA's parameter
// buffer); every thread gets its own by-value copy.
template <class... P, class... A>
void launch(const LaunchCfg& c, const char* name, const char* file, int line, void (*k)(P...), A&&... a) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel launched with the wrong number of arguments");
  struct State {
    void (*k)(P...);
    std::tuple<std::decay_t<P>...> params;
  };
  State st{k, std::tuple<std::decay_t<P>...>(std::forward<A>(a)...)};
  auto thunk = [](void* p) {
    auto* s = static_cast<State*>(p);
    std::apply([s](auto&... xs) { s->k(xs...); }, s->params);
  };
  rt::launch(c.grid, c.block, c.smem, c.stream, thunk, &st, reinterpret_cast<const void*>(k), name, file, line);
}

template <class T, size_t Align = 0>
T& shared_ref(const void* key, const char* name) {
  static_assert(std::is_trivially_default_constructible<T>::value, "__shared__ type must be trivial");
  constexpr size_t a = alignof(T) > 16 ? alignof(T) : 16;
  return *static_cast<T*>(rt::shared_var(key, sizeof(T), Align > a ? Align : a, name));
}
template <class T>
T* dynamic_shared() {
  return static_cast<T*>(rt::dynamic_shared());
}

template <class T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8, "warp intrinsics take values of at most 8 bytes");
  uint64_t r = 0;
  std::memcpy(&r, &v, sizeof(T));
  return r;
}
template <class T>
inline T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}
}  // namespace emu

#define threadIdx (::emu::t_cur->tidx)
#define blockIdx (::emu::t_cur->blk->bidx)
#define blockDim (::emu::t_cur->blk->bdim)
#define gridDim (::emu::t_cur->blk->gdim)

// ------------------------------------------------------------------------------------------ synchronisation
inline void __syncthreads(const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
  emu::rt::barrier(emu::rt::kBarPlain, 1, f, l);
}
inline int __syncthreads_or(int p, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
  return emu::rt::barrier(emu::rt::kBarOr, p, f, l);
}
inline int __syncthreads_and(int p, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
  return emu::rt::barrier(emu::rt::kBarAnd, p, f, l);
}
inline int __syncthreads_count(int p, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
  return emu::rt::barrier(emu::rt::kBarCount, p, f, l);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
  emu::rt::warp_op(emu::rt::kSyncWarp, mask, 0, 0, 32, f, l);
}
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
#define __trap() ::emu::rt::trap(__FILE__, __LINE__, "__trap()")

template <class T>
inline T __shfl_sync(unsigned m, T v, int src, int w = 32, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
  return emu::from_bits<T>(emu::rt::warp_op(emu::rt::kShflIdx, m, emu::to_bits(v), src, w, f, l));
}
template <class T>
inline T __shfl_up_sync(unsigned m, T v, unsigned d, int w = 32, const char* f = __builtin_FILE(),
                        int l = __builtin_LINE()) {
  return emu::from_bits<T>(emu::rt::warp_op(emu::rt::kShflUp, m, emu::to_bits(v), static_cast<int>(d), w, f, l));
}
template <class T>
inline T __shfl_down_sync(unsigned m, T v, unsigned d, int w = 32, const char* f = __builtin_FILE(),
                          int l = __builtin_LINE()) {
  return emu::from_bits<T>(emu::rt::warp_op(emu::rt::kShflDown, m, emu::to_bits(v), static_cast<int>(d), w, f, l));
}
template <class T>
inline T __shfl_xor_sync(unsigned m, T v, int x, int w = 32, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
  return emu::from_bits<T>(emu::rt::warp_op(emu::rt::kShflXor, m, emu::to_bits(v), x, w, f, l));
}
inline int __any_sync(unsigned m, int p, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
  return static_cast<int>(emu::rt::warp_op(emu::rt::kVoteAny, m, p != 0, 0, 32, f, l));
}
inline int __all_sync(unsigned m, int p, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
  return static_cast<int>(emu::rt::warp_op(emu::rt::kVoteAll, m, p != 0, 0, 32, f, l));
}
inline unsigned __ballot_sync(unsigned m, int p, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
  return static_cast<unsigned>(emu::rt::warp_op(emu::rt::kBallot, m, p != 0, 0, 32, f, l));
}
template <class T>
inline unsigned __match_any_sync(unsigned m, T v, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
  return static_cast<unsigned>(emu::rt::warp_op(emu::rt::kMatchAny, m, emu::to_bits(v), 0, 32, f, l));
}
template <class T>
inline unsigned __match_all_sync(unsigned m, T v, int* pred, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
  const unsigned r = static_cast<unsigned>(emu::rt::warp_op(emu::rt::kMatchAll, m, emu::to_bits(v), 0, 32, f, l));
  *pred = r != 0;
  return r;
}
inline unsigned __activemask() { return 0xffffffffu; }  // no SIMT divergence model: see report

// ------------------------------------------------------------------------------------------ integer / float intrinsics
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline unsigned __brev(unsigned x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
  x = ((x >> 8) & 0x00ff00ffu) | ((x & 0x00ff00ffu) << 8);
  return (x >> 16) | (x << 16);
}
inline float __uint_as_float(unsigned x) { return emu::from_bits<float>(x); }
inline float __int_as_float(int x) { return emu::from_bits<float>(static_cast<unsigned>(x)); }
inline unsigned __float_as_uint(float x) { return static_cast<unsigned>(emu::to_bits(x)); }
inline int __float_as_int(float x) { return static_cast<int>(static_cast<unsigned>(emu::to_bits(x))); }
// IEEE single operations with round-to-nearest-even (the host default; kernels are built with -ffp-contract=off
// where the CUDA file is built with --fmad=false)
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __int2float_rn(int x) { return static_cast<float>(x); }
inline int __float2int_rn(float x) {  // cvt.rni.s32.f32: NaN -> 0, saturating
  if (x != x) return 0;
  if (x >= 2147483648.0f) return INT_MAX;
  if (x < -2147483648.0f) return INT_MIN;
  return static_cast<int>(std::nearbyint(x));
}
inline int __float2int_rz(float x) {
  if (x != x) return 0;
  if (x >= 2147483648.0f) return INT_MAX;
  if (x < -2147483648.0f) return INT_MIN;
  return static_cast<int>(x);
}
inline float __saturatef(float x) { return x != x ? 0.0f : (x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x)); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
template <class T> inline T __ldg(const T* p) { return *p; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
using std::isnan;
using std::isinf;
using std::isfinite;

// ------------------------------------------------------------------------------------------ atomics (relaxed, like CUDA's)
#define EMU_ATOMIC_RMW(NAME, T, OP)                                          \
  inline T NAME(T* p, T v) { return __atomic_fetch_##OP(p, v, __ATOMIC_RELAXED); }
EMU_ATOMIC_RMW(atomicAdd, int, add)
EMU_ATOMIC_RMW(atomicAdd, unsigned, add)
EMU_ATOMIC_RMW(atomicAdd, unsigned long long, add)
EMU_ATOMIC_RMW(atomicSub, int, sub)
EMU_ATOMIC_RMW(atomicSub, unsigned, sub)
EMU_ATOMIC_RMW(atomicAnd, int, and)
EMU_ATOMIC_RMW(atomicAnd, unsigned, and)
EMU_ATOMIC_RMW(atomicOr, int, or)
EMU_ATOMIC_RMW(atomicOr, unsigned, or)
EMU_ATOMIC_RMW(atomicXor, int, xor)
EMU_ATOMIC_RMW(atomicXor, unsigned, xor)
#undef EMU_ATOMIC_RMW
template <class T, class F>
inline T emu_atomic_cas_loop(T* p, F f) {
  T old = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (!__atomic_compare_exchange_n(p, &old, f(old), true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}
#define EMU_ATOMIC_MINMAX(T)                                                                          \
  inline T atomicMin(T* p, T v) { return emu_atomic_cas_loop(p, [v](T o) { return v < o ? v : o; }); } \
  inline T atomicMax(T* p, T v) { return emu_atomic_cas_loop(p, [v](T o) { return v > o ? v : o; }); }
EMU_ATOMIC_MINMAX(int)
EMU_ATOMIC_MINMAX(unsigned)
EMU_ATOMIC_MINMAX(long long)
EMU_ATOMIC_MINMAX(unsigned long long)
#undef EMU_ATOMIC_MINMAX
inline float atomicAdd(float* p, float v) {
  unsigned* u = reinterpret_cast<unsigned*>(p);
  const unsigned old = emu_atomic_cas_loop(u, [v](unsigned o) { return __float_as_uint(__uint_as_float(o) + v); });
  return __uint_as_float(old);
}
template <class T>
inline T atomicCAS(T* p, T cmp, T v) {
  __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
  return cmp;
}
template <class T>
inline T atomicExch(T* p, T v) {
  return __atomic_exchange_n(p, v, __ATOMIC_RELAXED);
}

// ------------------------------------------------------------------------------------------ fp16
struct __half {
  unsigned short __x;
  __half() = default;
};
struct __half2 {
  __half x, y;
};
typedef __half half;
namespace emu {
inline unsigned short f32_to_f16_rn(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  x &= 0x7fffffffu;
  if (x > 0x7f800000u) return 0x7fffu;                                    // NaN: CUDA's canonical NaN
  if (x >= 0x477ff000u) return static_cast<unsigned short>(sign | 0x7c00u);  // >= 65520 -> inf
  if (x >= 0x38800000u) {                                                   // normal half
    uint32_t h = (x - 0x38000000u) >> 13;
    const uint32_t rem = x & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
    return static_cast<unsigned short>(sign | h);
  }
  if (x < 0x33000000u) return static_cast<unsigned short>(sign);  // < 2^-25 (2^-25 itself ties to 0)
  const uint32_t e = x >> 23, m = (x & 0x7fffffu) | 0x800000u, shift = 126u - e;
  uint32_t h = m >> shift;
  const uint32_t rem = m & ((1u << shift) - 1u), half_ulp = 1u << (shift - 1u);
  if (rem > half_ulp || (rem == half_ulp && (h & 1u))) ++h;
  return static_cast<unsigned short>(sign | h);
}
inline float f16_to_f32(unsigned short h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu, x;
  if (e == 0) {
    if (m == 0) {
      x = sign;
    } else {  // subnormal: normalise
      e = 113;
      while ((m & 0x400u) == 0) {
        m <<= 1;
        --e;
      }
      x = sign | (e << 23) | ((m & 0x3ffu) << 13);
    }
  } else if (e == 31) {
    x = sign | 0x7f800000u | (m << 13);
  } else {
    x = sign | ((e + 112u) << 23) | (m << 13);
  }
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}
}  // namespace emu
inline __half __float2half_rn(float f) {
  __half h;
  h.__x = emu::f32_to_f16_rn(f);
  return h;
}
inline __half __float2half(float f) { return __float2half_rn(f); }
inline float __half2float(__half h) { return emu::f16_to_f32(h.__x); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short x) {
  __half h;
  h.__x = x;
  return h;
}
inline __half2 __floats2half2_rn(float a, float b) { return {__float2half_rn(a), __float2half_rn(b)}; }

// ------------------------------------------------------------------------------------------ cp.async (cuda_pipeline.h)
inline void __pipeline_memcpy_async(void* dst, const void* src, size_t bytes, size_t zfill = 0,
                                    const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
  emu::rt::cp_async(dst, src, bytes, bytes - zfill, f, l);
}
inline void __pipeline_commit() { emu::rt::cp_commit(); }
inline void __pipeline_wait_prior(size_t n) { emu::rt::cp_wait_prior(static_cast<int>(n)); }

// ------------------------------------------------------------------------------------------ WMMA (mma.h)
// A fragment holds the WHOLE tile in every lane (the hardware's per-lane distribution is unspecified for WMMA,
// so code that only uses load/store/fill/mma cannot tell). Every operation is a warp rendezvous of all 32 lanes
// that checks the lanes agree on pointer and ldm, and the documented pointer/ldm alignment rules.
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
template <class Use, int M, int N, int K> struct tile_dims;
template <int M, int N, int K> struct tile_dims<matrix_a, M, N, K> { static constexpr int rows = M, cols = K; };
template <int M, int N, int K> struct tile_dims<matrix_b, M, N, K> { static constexpr int rows = K, cols = N; };
template <int M, int N, int K> struct tile_dims<accumulator, M, N, K> { static constexpr int rows = M, cols = N; };
template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  using element_type = T;
  static constexpr int rows = tile_dims<Use, M, N, K>::rows, cols = tile_dims<Use, M, N, K>::cols;
  static constexpr int num_elements = rows * cols;
  T x[num_elements];  // row-major tile
};
namespace detail {
inline void check(const void* p, unsigned ldm, size_t elem, const char* op, const char* f, int l) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) emu::rt::error(f, l, "%s: pointer %p is not 256-bit aligned", op, p);
  if ((ldm * elem) % 16 != 0) emu::rt::error(f, l, "%s: ldm %u is not a multiple of 16 bytes", op, ldm);
  // every lane must pass the same pointer and ldm (and all 32 lanes must take part)
  emu::rt::warp_op(emu::rt::kUniform, 0xffffffffu, reinterpret_cast<uintptr_t>(p) * 131u + ldm, 0, 32, f, l);
}
template <class T> inline float to_f(T v) { return static_cast<float>(v); }
inline float to_f(__half v) { return __half2float(v); }
}  // namespace detail

template <class Use, int M, int N, int K, class T, class L, class V>
inline void fill_fragment(fragment<Use, M, N, K, T, L>& a, V v) {
  for (int i = 0; i < a.num_elements; ++i) a.x[i] = static_cast<T>(v);
}
inline void fill_fragment_h(__half* x, int n, __half v) {
  for (int i = 0; i < n; ++i) x[i] = v;
}
template <class Use, int M, int N, int K, class L>
inline void fill_fragment(fragment<Use, M, N, K, __half, L>& a, float v) {
  fill_fragment_h(a.x, a.num_elements, __float2half_rn(v));
}

template <class Use, int M, int N, int K, class T, class L>
inline void load_matrix_sync(fragment<Use, M, N, K, T, L>& a, const T* p, unsigned ldm,
                             const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
  static_assert(!std::is_same<Use, accumulator>::value, "accumulator loads take a layout_t");
  detail::check(p, ldm, sizeof(T), "wmma::load_matrix_sync", f, l);
  if constexpr (std::is_same<L, row_major>::value) {
    for (int r = 0; r < a.rows; ++r) std::memcpy(&a.x[r * a.cols], p + static_cast<size_t>(r) * ldm, sizeof(T) * a.cols);
  } else {
    for (int c = 0; c < a.cols; ++c)
      for (int r = 0; r < a.rows; ++r) a.x[r * a.cols + c] = p[static_cast<size_t>(c) * ldm + r];
  }
}
template <int M, int N, int K, class T>
inline void load_matrix_sync(fragment<accumulator, M, N, K, T, void>& a, const T* p, unsigned ldm, layout_t lay,
                             const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
  detail::check(p, ldm, sizeof(T), "wmma::load_matrix_sync", f, l);
  for (int r = 0; r < a.rows; ++r)
    for (int c = 0; c < a.cols; ++c) a.x[r * a.cols + c] = lay == mem_row_major ? p[r * ldm + c] : p[c * ldm + r];
}
template <int M, int N, int K, class T>
inline void store_matrix_sync(T* p, const fragment<accumulator, M, N, K, T, void>& a, unsigned ldm, layout_t lay,
                              const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
  detail::check(p, ldm, sizeof(T), "wmma::store_matrix_sync", f, l);
  const int lane = static_cast<int>(emu::t_cur->lane);
  for (int e = lane; e < a.num_elements; e += 32) {  // each lane stores its share of the (identical) tile
    const int r = e / a.cols, c = e % a.cols;
    (lay == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = a.x[e];
  }
}
// D = A * B + C, computed once per warp: every lane hands its fragments to one warp rendezvous, the product is
// formed from lane 0's (all lanes must hold the same tiles, since this model keeps the whole tile in every lane) and
// every lane receives it. f16 inputs: exact products, summed in double, rounded once to float (an idealised tensor
// core: the hardware's accumulation order and internal rounding are not modelled). s8 inputs: exact int32 (wrapping).
namespace detail {
template <class FD, class FA, class FB>
struct MmaCall {
  FD* d;
  const FA* a;
  const FB* b;
  const FD* c;
  const char* file;
  int line;
  static void run(void* const* payloads, unsigned mask) {
    const MmaCall& first = *static_cast<const MmaCall*>(payloads[0]);
    // lanes 1, 16 and 31 must hold lane 0's tiles (the uniform loads guarantee it; a kernel that edits fragment
    // elements per lane does not fit this model); three lanes catch that at a fraction of the cost of 31
    for (unsigned j : {1u, 16u, 31u}) {
      const MmaCall& other = *static_cast<const MmaCall*>(payloads[j]);
      if (std::memcmp(other.a->x, first.a->x, sizeof first.a->x) != 0 ||
          std::memcmp(other.b->x, first.b->x, sizeof first.b->x) != 0 ||
          std::memcmp(other.c->x, first.c->x, sizeof first.c->x) != 0) {
        emu::rt::error(first.file, first.line, "wmma::mma_sync: lane %u holds other A/B/C tiles than lane 0 (per-lane "
                       "fragment element access is outside this emulator's WMMA model)", j);
        break;
      }
    }
    (void)mask;
    constexpr int M = FA::rows, K = FA::cols, N = FB::cols;
    using TC = typename FD::element_type;
    TC out[M * N];
    if constexpr (std::is_integral<TC>::value) {
      int32_t a[M * K], b[K * N];  // widened once, not per product
      for (int i = 0; i < M * K; ++i) a[i] = first.a->x[i];
      for (int i = 0; i < K * N; ++i) b[i] = first.b->x[i];
      for (int i = 0; i < M; ++i)
        for (int j = 0; j < N; ++j) {
          int64_t s = first.c->x[i * N + j];
          for (int k = 0; k < K; ++k) s += static_cast<int64_t>(a[i * K + k]) * b[k * N + j];
          out[i * N + j] = static_cast<TC>(static_cast<uint32_t>(s));
        }
    } else {
      double a[M * K], bt[N * K];  // converted once; B transposed so both walk k contiguously
      for (int i = 0; i < M * K; ++i) a[i] = to_f(first.a->x[i]);
      for (int k = 0; k < K; ++k)
        for (int j = 0; j < N; ++j) bt[j * K + k] = to_f(first.b->x[k * N + j]);
      for (int i = 0; i < M; ++i)
        for (int j = 0; j < N; ++j) {
          // every product of two fp16 values is exact in double; the double sum is rounded once, to float
          double s = to_f(first.c->x[i * N + j]);
          for (int k = 0; k < K; ++k) s += a[i * K + k] * bt[j * K + k];
          if constexpr (std::is_same<TC, __half>::value) out[i * N + j] = __float2half_rn(static_cast<float>(s));
          else out[i * N + j] = static_cast<TC>(static_cast<float>(s));
        }
    }
    for (unsigned j = 0; j < 32; ++j) std::memcpy(static_cast<const MmaCall*>(payloads[j])->d->x, out, sizeof out);
  }
};
}  // namespace detail
template <int M, int N, int K, class TA, class LA, class TB, class LB, class TC>
inline void mma_sync(fragment<accumulator, M, N, K, TC, void>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
                     const fragment<matrix_b, M, N, K, TB, LB>& b, const fragment<accumulator, M, N, K, TC, void>& c,
                     const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
  using Call = detail::MmaCall<fragment<accumulator, M, N, K, TC, void>, fragment<matrix_a, M, N, K, TA, LA>,
                               fragment<matrix_b, M, N, K, TB, LB>>;
  Call call{&d, &a, &b, &c, f, l};
  // all 32 lanes, converged (a lane outside the rendezvous is reported by it)
  emu::rt::warp_callback(0xffffffffu, &call, &Call::run, "wmma::mma_sync", f, l);
}
}  // namespace wmma
}  // namespace nvcuda

// ------------------------------------------------------------------------------------------ inline PTX (selected)
// cu2cpp.py turns `asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 ..." : "=f"(d..) : "r"(a..),
// "r"(b..), "f"(c..))` into a call of the function below. Fragments follow the PTX ISA layout exactly (section
// "Matrix Fragments for mma.m16n8k16 with floating point type"), so register-layout bugs show.
namespace emu {
namespace ptx {
void mma_m16n8k16_f32_f16_f16_f32(float& d0, float& d1, float& d2, float& d3, uint32_t a0, uint32_t a1, uint32_t a2,
                                   uint32_t a3, uint32_t b0, uint32_t b1, float c0, float c1, float c2, float c3,
                                   const char* f = __builtin_FILE(), int l = __builtin_LINE());
void mma_m16n8k32_s32_s8_s8_s32(int& d0, int& d1, int& d2, int& d3, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                uint32_t b0, uint32_t b1, int c0, int c1, int c2, int c3,
                                const char* f = __builtin_FILE(), int l = __builtin_LINE());
}  // namespace ptx
}  // namespace emu
