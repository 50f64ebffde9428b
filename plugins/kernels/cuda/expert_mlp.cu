// PiMoEExpertMLP on the GPU: one group of structurally identical experts over their contiguous row segments.
//
// Per call (all enqueued on one stream, no host synchronisation):
//   plan      1 block: checks that offsets partitions [0, R) (else: status + zero output), lists the row tiles of
//             the group's segments (expert_mlp_internal.cuh)
//   zero      rows of experts outside the group -> 0 in y
//   per layer grouped GEMM over the plan's row tiles, bias fused in the epilogue; for hidden layers the
//             activation is fused too when there is no LayerNorm, else one row pass applies
//             LayerNorm (fp32 statistics, two-pass mean/variance) + activation in place
// Hidden activations stay in fp32 on both paths, as the op contract defines the math (fp16 is a storage format
// for x_sorted, y_sorted and the weights): fp32 path = SIMT GEMM; fp16 path = tensor-core GEMM with fp32
// accumulation, whose fp32 inputs (layers >= 1) are split into two fp16 halves (gemm_f16_wmma.cu), after a
// per-row power-of-two scaling (row_exponent_kernel) that keeps values of any fp32 magnitude inside fp16's range.
//
// w8a8 modes (quant_mode w8a8 / w8a8_dynamic), per layer, the integer math of pimoe_export/model/quant_reference.py:
//   quantize  block per row: [LayerNorm + activation of the previous layer,] x / act_smooth (__fdiv_rn), the
//             static scale of the row's expert or the dynamic scale max|x| / 127 (1 for a zero or NaN row),
//             codes = __float2int_rn(clamp(nan_to_zero(x / s), -127, 127)) (round half to even), zero-padded rows
//   GEMM      int8 tensor cores, exact int32 sums, epilogue float(acc) * (s * w_scale) + bias with one rounding per
//             operation (gemm_i8_wmma.cu); activation fused there for hidden layers without LayerNorm
// Hidden activations stay fp32 (one buffer: the codes are extracted before the next GEMM overwrites it).
//
// Gated hidden layers (contract v2): the layer's GEMM (any path above, bias fused, no activation) writes its 2*out
// columns [gate | up] into a separate fp32 GLU buffer; glu_kernel then writes h = act(gate) * up (swiglu_oai: GPT-OSS's
// clamped SwiGLU) into the hidden buffer the next layer reads (fp16 path: then its row exponents; w8a8: then its codes).
// Layers without bias pass bias = nullptr to the GEMMs, which then add nothing.
#include "expert_mlp_internal.cuh"
#include "pimoe_contract.h"

namespace pimoe {
namespace cuda {
namespace {

using detail::PlanView;

struct GroupIds {
  int count;
  short ids[kMAX_GROUP];
};

size_t align256(size_t bytes) { return (bytes + 255) / 256 * 256; }

// One block of 1024 threads (E, G <= 1024: one expert and one member per thread).
__global__ void plan_kernel(const int* __restrict__ offsets, int experts, int rows, GroupIds group, int bm,
                            PlanView plan, DeviceStatus* status) {
  __shared__ int scratch[32];
  const int tid = threadIdx.x;
  bool bad = false;
  for (int e = tid; e < experts; e += blockDim.x) {
    const int lo = offsets[e], hi = offsets[e + 1];
    if (hi < lo) {
      bad = true;
      detail::report(status, &status->bad_offsets, e + 1, hi);
    }
  }
  if (tid == 0) {
    if (offsets[0] != 0) {
      bad = true;
      detail::report(status, &status->bad_offsets, 0, offsets[0]);
    }
    if (offsets[experts] != rows) {
      bad = true;
      detail::report(status, &status->bad_offsets, experts, offsets[experts]);
    }
  }
  bad = __syncthreads_or(bad) != 0;
  for (int e = tid; e < experts; e += blockDim.x) plan.member_of_expert()[e] = -1;
  if (bad) {
    if (tid == 0) {
      *plan.valid() = 0;
      *plan.num_tiles() = 0;
    }
    return;
  }
  __syncthreads();
  int tiles = 0;
  if (tid < group.count) {
    const int e = group.ids[tid];
    int lo = 0, hi = 0;
    if (e >= 0 && e < experts) {  // always true: expert_ids are validated on the host
      lo = offsets[e];
      hi = offsets[e + 1];
      plan.member_of_expert()[e] = tid;
    }
    tiles = (hi - lo + bm - 1) / bm;
    plan.seg_lo()[tid] = lo;
    plan.seg_hi()[tid] = hi;
  }
  const int inclusive = detail::block_inclusive_scan(tiles, scratch);
  if (tid < group.count) plan.tile_start()[tid] = inclusive - tiles;
  if (tid == group.count - 1) {
    plan.tile_start()[group.count] = inclusive;
    *plan.num_tiles() = inclusive;
  }
  if (tid == 0) *plan.valid() = 1;
}

// y rows that belong to experts outside the group (or every row when offsets is invalid) -> 0. Warp per row.
template <typename T>
__global__ void zero_rows_kernel(PlanView plan, const int* __restrict__ offsets, int rows, int width,
                                 T* __restrict__ y) {
  const int lane = threadIdx.x & 31;
  const long long warps = static_cast<long long>(gridDim.x) * (blockDim.x >> 5);
  const bool valid = *plan.valid() != 0;
  for (long long r = static_cast<long long>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5); r < rows;
       r += warps) {
    if (valid && detail::member_of_row(plan, offsets, static_cast<int>(r)) >= 0) continue;
    T* dst = y + r * width;
    for (int c = lane; c < width; c += 32) dst[c] = detail::from_float<T>(0.0f);
  }
}

// LayerNorm + activation, in place, over the group's rows of an fp32 hidden buffer. Warp per row: every element
// is read for both statistics before the lane that owns it writes it.
__global__ void layernorm_act_kernel(PlanView plan, const int* __restrict__ offsets, int rows, int width, float* h,
                                     const float* __restrict__ gamma, const float* __restrict__ beta, float eps,
                                     int activation) {
  if (*plan.valid() == 0) return;
  const int lane = threadIdx.x & 31;
  const long long warps = static_cast<long long>(gridDim.x) * (blockDim.x >> 5);
  for (long long r = static_cast<long long>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5); r < rows;
       r += warps) {
    const int member = detail::member_of_row(plan, offsets, static_cast<int>(r));
    if (member < 0) continue;
    float* row = h + r * width;
    float sum = 0.0f;
    for (int c = lane; c < width; c += 32) sum += row[c];
    const float mean = detail::warp_sum(sum) / static_cast<float>(width);
    float sq = 0.0f;
    for (int c = lane; c < width; c += 32) {
      const float d = row[c] - mean;
      sq += d * d;
    }
    const float var = detail::warp_sum(sq) / static_cast<float>(width);
    const float rstd = 1.0f / sqrtf(var + eps);
    const float* g = gamma + static_cast<long long>(member) * width;
    const float* b = beta + static_cast<long long>(member) * width;
    for (int c = lane; c < width; c += 32) row[c] = detail::activate((row[c] - mean) * rstd * g[c] + b[c], activation);
  }
}

// Sums the split-K partials of the group's rows in split order (deterministic), adds the bias and applies the
// activation (or none), stores fp32 or fp16: the epilogue the GEMM skipped. Warp per row.
__global__ void splitk_reduce_kernel(PlanView plan, const int* __restrict__ offsets, int rows, int width,
                                     const float* __restrict__ partial, int splits, const float* __restrict__ bias,
                                     int activation, void* c, bool c_f32) {
  if (*plan.valid() == 0) return;
  const int lane = threadIdx.x & 31;
  const long long warps = static_cast<long long>(gridDim.x) * (blockDim.x >> 5);
  const long long split_stride = static_cast<long long>(rows) * width;
  for (long long r = static_cast<long long>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5); r < rows;
       r += warps) {
    const int member = detail::member_of_row(plan, offsets, static_cast<int>(r));
    if (member < 0) continue;
    const float* b = detail::member_bias(bias, member, width);
    for (int col = lane; col < width; col += 32) {
      const long long at = r * width + col;
      float v = partial[at];
      for (int s = 1; s < splits; ++s) v += partial[s * split_stride + at];
      v = detail::activate(detail::add_bias(v, b, col), activation);
      if (c_f32) static_cast<float*>(c)[at] = v;
      else static_cast<__half*>(c)[at] = __float2half_rn(v);
    }
  }
}

// The exponent e_r of every group row of an fp32 hidden buffer that the fp16 tensor-core GEMM reads next: 0 when the
// row's largest finite |value| is below 2^15, else the power of two that brings it below 2^15 (so the GEMM's fp16
// split of value * 2^-e_r cannot overflow; gemm_f16_wmma.cu). Warp per row; non-finite values do not count.
__global__ void row_exponent_kernel(PlanView plan, const int* __restrict__ offsets, int rows, int width,
                                    const float* __restrict__ h, int* __restrict__ row_exp) {
  if (*plan.valid() == 0) return;
  const int lane = threadIdx.x & 31;
  const long long warps = static_cast<long long>(gridDim.x) * (blockDim.x >> 5);
  for (long long r = static_cast<long long>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5); r < rows;
       r += warps) {
    if (detail::member_of_row(plan, offsets, static_cast<int>(r)) < 0) continue;
    const float* row = h + r * width;
    float m = 0.0f;
    for (int c = lane; c < width; c += 32) {
      const float v = fabsf(row[c]);
      if (v <= 3.402823466e38f) m = fmaxf(m, v);  // finite values only (NaN and inf compare false)
    }
    m = detail::warp_max(m);
    // m >= 2^15 is a normal float: its unbiased exponent is bits 23..30 minus 127; e = exponent - 14 makes m * 2^-e < 2^15
    if (lane == 0) row_exp[r] = m >= 32768.0f ? ((__float_as_int(m) >> 23) & 0xff) - 127 - 14 : 0;
  }
}

// Gated layers: h[r, c] = act(z[r, c]) * z[r, out + c] over the group's rows of the GEMM output z [R, 2*out]
// (fp32), written to h [R, out] (fp32). swiglu_oai (activation 5): g = min(gate, limit), u = clamp(up, -limit, limit),
// h = (u + 1) * (g * sigmoid(g * alpha)), NaN kept through the clamps. Warp per row.
__global__ void glu_kernel(PlanView plan, const int* __restrict__ offsets, int rows, int out,
                           const float* __restrict__ z, float* __restrict__ h, int activation, float alpha,
                           float limit) {
  if (*plan.valid() == 0) return;
  const int lane = threadIdx.x & 31;
  const long long warps = static_cast<long long>(gridDim.x) * (blockDim.x >> 5);
  const bool oai = activation == static_cast<int>(contract::Activation::kSWIGLU_OAI);
  for (long long r = static_cast<long long>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5); r < rows;
       r += warps) {
    if (detail::member_of_row(plan, offsets, static_cast<int>(r)) < 0) continue;
    const float* gate = z + r * 2 * out;
    const float* up = gate + out;
    float* dst = h + r * out;
    for (int c = lane; c < out; c += 32) {
      float v;
      if (oai) {
        const float g = gate[c] > limit ? limit : gate[c];
        const float u = up[c] > limit ? limit : up[c] < -limit ? -limit : up[c];
        v = (u + 1.0f) * (g * (1.0f / (1.0f + expf(-(g * alpha)))));
      } else {
        v = detail::activate(gate[c], activation) * up[c];
      }
      dst[c] = v;
    }
  }
}

// w8a8: every w_scale [G, N] and act_smooth [G, K] value must be positive and finite (CPU kernels check them on
// the host; here they are device data): the first offender of the layer is recorded, and the math goes on (a NaN
// scale gives NaN outputs, never a silent zero).
__global__ void check_scales_kernel(const float* __restrict__ w_scale, long long w_count, const float* __restrict__ smooth,
                                    long long smooth_count, int layer, DeviceStatus* status) {
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < w_count + smooth_count;
       i += stride) {
    const bool is_w = i < w_count;
    const float v = is_w ? w_scale[i] : smooth[i - w_count];
    if (!(v > 0.0f && v <= 3.402823466e38f))
      detail::report(status, &status->bad_scale, is_w ? i : i - w_count, 2 * layer + !is_w);
  }
}

// ------------------------------------------------------------------------------------------ w8a8 activations
// Block-wide sum in a fixed order (every thread gets the same value). `red` holds >= 32 floats of shared memory;
// the leading barrier makes it safe to call repeatedly.
__device__ __forceinline__ float block_sum(float v, float* red) {
  v = detail::warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < warps; ++w) total += red[w];
  return total;
}

__device__ __forceinline__ float block_max(float v, float* red) {
  v = detail::warp_max(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float m = red[0];
  for (int w = 1; w < warps; ++w) m = fmaxf(m, red[w]);
  return m;
}

// int8 code of x with scale s, as reference.quantize_activations: NaN -> 0, clamp to [-127, 127], round half to
// even (__float2int_rn). The division is the IEEE one (__fdiv_rn), like torch's on the CPU.
__device__ __forceinline__ int8_t quantize_code(float x, float s) {
  float t = __fdiv_rn(x, s);
  if (t != t) t = 0.0f;
  t = fminf(fmaxf(t, -127.0f), 127.0f);
  return static_cast<int8_t>(__float2int_rn(t));
}

constexpr int kSCALE_CHUNK = 512;  // static scales passed by value per launch (2 KB of kernel parameters)
struct ScaleChunk {
  float s[kSCALE_CHUNK];
};

struct QuantizeArgs {
  PlanView plan;
  const int* offsets;
  int rows;
  const void* src;       // layer input [R, width]: x_sorted (fp32/fp16) or the fp32 hidden buffer
  bool src_f16;
  int width;
  float* scratch;        // == src when src is the hidden buffer (dynamic mode keeps x / act_smooth there), else null
  const float* smooth;   // [G, width] act_smooth of this layer
  bool dynamic;          // w8a8_dynamic: per-row scale; else the static scale of the row's member
  int member_begin;      // static: members [member_begin, member_end) have their scale in the ScaleChunk
  int member_end;
  const float* ln_gamma;  // previous layer's LayerNorm [G, width] (then also its activation), or nullptr
  const float* ln_beta;
  float eps;
  int activation;
  int8_t* codes;         // [R, lda]
  int lda;
  float* row_scale;      // [R]
};

// One block per row of the group (grid-stride). Every thread owns the columns c = threadIdx.x + i * blockDim.x
// through all passes, so values it parks in `scratch` are read back only by itself.
__global__ void __launch_bounds__(1024) quantize_rows_kernel(QuantizeArgs a, ScaleChunk scales) {
  __shared__ float red[32];
  if (*a.plan.valid() == 0) return;
  const int width = a.width;
  for (int r = blockIdx.x; r < a.rows; r += gridDim.x) {
    const int member = detail::member_of_row(a.plan, a.offsets, r);  // block-uniform
    if (member < 0 || (!a.dynamic && (member < a.member_begin || member >= a.member_end))) continue;
    const long long base = static_cast<long long>(r) * width;
    auto load = [&](int c) -> float {
      return a.src_f16 ? __half2float(static_cast<const __half*>(a.src)[base + c])
                       : static_cast<const float*>(a.src)[base + c];
    };
    const float* smooth = a.smooth + static_cast<long long>(member) * width;
    const bool ln = a.ln_gamma != nullptr && a.ln_beta != nullptr;
    float mean = 0.0f, rstd = 0.0f;
    const float* gamma = nullptr;
    const float* beta = nullptr;
    if (ln) {  // two-pass statistics in fp32, as layernorm_act_kernel
      gamma = a.ln_gamma + static_cast<long long>(member) * width;
      beta = a.ln_beta + static_cast<long long>(member) * width;
      float sum = 0.0f;
      for (int c = threadIdx.x; c < width; c += blockDim.x) sum += load(c);
      mean = block_sum(sum, red) / static_cast<float>(width);
      float sq = 0.0f;
      for (int c = threadIdx.x; c < width; c += blockDim.x) {
        const float d = load(c) - mean;
        sq += d * d;
      }
      rstd = 1.0f / sqrtf(block_sum(sq, red) / static_cast<float>(width) + a.eps);
    }
    // the quantiser's input: [activation(LayerNorm(h))] / act_smooth
    auto value = [&](int c) -> float {
      float v = load(c);
      if (ln) v = detail::activate((v - mean) * rstd * gamma[c] + beta[c], a.activation);
      return __fdiv_rn(v, smooth[c]);
    };
    float scale;
    if (a.dynamic) {  // max |x| / 127; a NaN anywhere makes the max NaN (torch.amax) -> scale 1
      float m = 0.0f;
      bool nan = false;
      for (int c = threadIdx.x; c < width; c += blockDim.x) {
        const float v = value(c);
        if (a.scratch != nullptr) a.scratch[base + c] = v;
        if (v != v) nan = true;
        else m = fmaxf(m, fabsf(v));
      }
      nan = __syncthreads_or(nan) != 0;
      m = block_max(m, red);
      scale = (!nan && m > 0.0f) ? __fdiv_rn(m, 127.0f) : 1.0f;
    } else {
      scale = scales.s[member - a.member_begin];
    }
    int8_t* codes = a.codes + static_cast<long long>(r) * a.lda;
    for (int c = threadIdx.x; c < a.lda; c += blockDim.x) {
      int8_t q = 0;  // padding past the width stays 0
      if (c < width) q = quantize_code(a.dynamic && a.scratch != nullptr ? a.scratch[base + c] : value(c), scale);
      codes[c] = q;
    }
    if (threadIdx.x == 0) a.row_scale[r] = scale;
  }
}

struct Layout {
  size_t plan_bytes = 0;
  size_t hidden_bytes = 0;   // one fp32 hidden buffer [R, max hidden width]
  int hidden_buffers = 0;    // 0, 1 or 2 (ping-pong)
  size_t partial_bytes = 0;  // split-K partial sums (fp16: fp32, int8: int32): kSPLIT_MAX x min(R, cap) x max width
  size_t codes_bytes = 0;    // w8a8: int8 activation codes [R, max padded input width]
  size_t scale_bytes = 0;    // w8a8: activation scale per row [R]
  size_t exp_bytes = 0;      // fp16 with hidden layers: power-of-two exponent per row [R] (row_exponent_kernel)
  size_t glu_bytes = 0;      // gated: the GEMM output [gate | up] of a gated layer, fp32 [R, 2 * max gated out]
  size_t total = 0;
};

int64_t padded_width(int64_t width) { return (width + 15) / 16 * 16; }

Layout layout_of(const ExpertMLPShape& s) {
  Layout l;
  const bool quantized = s.quant_mode != 0;
  const size_t rows = static_cast<size_t>(s.rows > 0 ? s.rows : 0);
  l.plan_bytes = align256(PlanView::ints(s.num_group, static_cast<int>(s.num_experts)) * sizeof(int));
  const int hidden_layers = s.num_layers - 1;
  int64_t max_hidden = 0, max_out = 0, max_padded_in = 0;
  for (int i = 1; i < s.num_layers; ++i) max_hidden = s.widths[i] > max_hidden ? s.widths[i] : max_hidden;
  int64_t max_glu = 0;
  for (int i = 0; i < s.num_layers; ++i) {
    max_out = s.rows_of(i) > max_out ? s.rows_of(i) : max_out;  // GEMM columns: 2*out for a gated layer
    if (s.is_gated(i)) max_glu = s.rows_of(i) > max_glu ? s.rows_of(i) : max_glu;
  }
  for (int i = 0; i < s.num_layers; ++i)
    max_padded_in = padded_width(s.widths[i]) > max_padded_in ? padded_width(s.widths[i]) : max_padded_in;
  const size_t elems = rows * static_cast<size_t>(max_hidden);
  // w8a8: the GEMM reads codes, not the hidden buffer, so one hidden buffer serves every layer
  l.hidden_buffers = hidden_layers <= 0 ? 0 : (hidden_layers == 1 || quantized) ? 1 : 2;
  l.hidden_bytes = align256(elems * sizeof(float));
  if (quantized) {
    const size_t split_rows = rows < static_cast<size_t>(detail::kI8_SPLIT_MAX_ROWS)
                                  ? rows : static_cast<size_t>(detail::kI8_SPLIT_MAX_ROWS);
    l.partial_bytes = align256(static_cast<size_t>(detail::kSPLIT_MAX) * split_rows * static_cast<size_t>(max_out) *
                               sizeof(int));
    l.codes_bytes = align256(rows * static_cast<size_t>(max_padded_in));
    l.scale_bytes = align256(rows * sizeof(float));
  } else if (s.dtype == DType::kF16) {
    const size_t split_rows = rows < static_cast<size_t>(detail::kSPLIT_MAX_ROWS)
                                  ? rows : static_cast<size_t>(detail::kSPLIT_MAX_ROWS);
    l.partial_bytes = align256(static_cast<size_t>(detail::kSPLIT_MAX) * split_rows * static_cast<size_t>(max_out) *
                               sizeof(float));
    if (hidden_layers > 0) l.exp_bytes = align256(rows * sizeof(int));
  }
  l.glu_bytes = align256(rows * static_cast<size_t>(max_glu) * sizeof(float));
  // every term grows with rows (and nothing else varies with the run shape): the size for a profile's maximum R
  // covers every smaller R, as TensorRT requires
  l.total = l.plan_bytes + l.hidden_bytes * static_cast<size_t>(l.hidden_buffers) + l.partial_bytes + l.codes_bytes +
            l.scale_bytes + l.exp_bytes + l.glu_bytes;
  return l;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// K splits for the tensor-core GEMMs: only with few rows (decode), until about `target_blocks` blocks have work
// (estimated: at most one row tile per row and per expert), every split at least one K step of `k_step`.
void choose_splits(int64_t rows, int64_t max_rows, int groups, int bm, int k_step, int k, int n,
                   int64_t target_blocks, int* splits, int* steps_per_split) {
  *splits = 1;
  *steps_per_split = 0;
  if (rows > max_rows) return;
  const int64_t k_steps = (k + k_step - 1) / k_step;
  const int64_t row_tiles = (rows + bm - 1) / bm + groups;
  const int64_t busy = (row_tiles < rows ? row_tiles : rows) * ((n + 63) / 64);
  int64_t want = (target_blocks + busy - 1) / (busy > 0 ? busy : 1);
  if (want > detail::kSPLIT_MAX) want = detail::kSPLIT_MAX;
  if (want > k_steps) want = k_steps;
  if (want <= 1) return;
  const int64_t per = (k_steps + want - 1) / want;
  *steps_per_split = static_cast<int>(per);
  *splits = static_cast<int>((k_steps + per - 1) / per);  // every split non-empty
  if (*splits <= 1) *steps_per_split = 0, *splits = 1;
}

// SM count of the current device (an attribute query: no synchronisation, allowed during stream capture).
int multiprocessors() {
  int device = 0, count = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || count < 1)
    return 132;  // (the failed query is reported by the launch checks that follow)
  return count;
}

// The w8a8 layers (after the plan and the zeroing of other groups' rows, enqueued by expert_mlp).
cudaError_t expert_mlp_w8a8(const ExpertMLPShape& s, const MLPLayer* layers, const void* x, const int32_t* offsets,
                            void* y, char* ws, const Layout& lay, PlanView plan, int bm, DeviceStatus* status,
                            cudaStream_t stream) {
  const int rows = static_cast<int>(s.rows);
  float* hidden = reinterpret_cast<float*>(ws + lay.plan_bytes);
  char* after_hidden = ws + lay.plan_bytes + lay.hidden_bytes * static_cast<size_t>(lay.hidden_buffers);
  int* partial = reinterpret_cast<int*>(after_hidden);
  int8_t* codes = reinterpret_cast<int8_t*>(after_hidden + lay.partial_bytes);
  float* row_scale = reinterpret_cast<float*>(after_hidden + lay.partial_bytes + lay.codes_bytes);
  float* glu = reinterpret_cast<float*>(ws + lay.total - lay.glu_bytes);  // the last region (gated only)
  const unsigned int row_blocks = detail::grid_for(rows, 8);
  const bool dynamic = s.quant_mode == static_cast<int32_t>(contract::QuantMode::kW8A8_DYNAMIC);
  const long long max_tiles = (static_cast<long long>(rows) + bm - 1) / bm + s.num_group;
  const unsigned int quant_blocks = detail::grid_for(rows, 1, 8192);
  // decode: split K until about two 16-row-tile blocks per SM stream weights (each keeps 3 K steps = 24 KB in
  // flight); integer partial sums make the result independent of this choice (and of the GPU)
  const int64_t split_target = 2 * static_cast<int64_t>(multiprocessors());
  for (int l = 0; l < s.num_layers; ++l) {
    const long long w_count = static_cast<long long>(s.num_group) * s.rows_of(l);
    const long long smooth_count = static_cast<long long>(s.num_group) * s.widths[l];
    check_scales_kernel<<<detail::grid_for(w_count + smooth_count, 256, 1024), 256, 0, stream>>>(
        layers[l].w_scale, w_count, layers[l].act_smooth, smooth_count, l, status);
  }
  for (int l = 0; l < s.num_layers; ++l) {
    const bool last = l == s.num_layers - 1;
    const int width = s.widths[l];
    const int lda = static_cast<int>(padded_width(width));
    // previous layer's LayerNorm (+ activation) is applied while quantising this layer's input
    const bool prev_ln = l > 0 && s.layer_norm && layers[l - 1].ln_gamma != nullptr && layers[l - 1].ln_beta != nullptr;
    const bool ln = !last && s.layer_norm && layers[l].ln_gamma != nullptr && layers[l].ln_beta != nullptr;
    const bool gated = s.is_gated(l);
    QuantizeArgs q{};
    q.plan = plan;
    q.offsets = offsets;
    q.rows = rows;
    q.src = l == 0 ? x : static_cast<const void*>(hidden);
    q.src_f16 = l == 0 && s.dtype == DType::kF16;
    q.width = width;
    q.scratch = l == 0 ? nullptr : hidden;
    q.smooth = layers[l].act_smooth;
    q.dynamic = dynamic;
    q.ln_gamma = prev_ln ? layers[l - 1].ln_gamma : nullptr;
    q.ln_beta = prev_ln ? layers[l - 1].ln_beta : nullptr;
    q.eps = s.eps;
    q.activation = s.activation;
    q.codes = codes;
    q.lda = lda;
    q.row_scale = row_scale;
    const unsigned int threads = width >= 4096 ? 1024u : 256u;
    for (int begin = 0; begin < s.num_group; begin += kSCALE_CHUNK) {  // dynamic: one launch
      ScaleChunk chunk{};
      q.member_begin = begin;
      q.member_end = begin + kSCALE_CHUNK < s.num_group ? begin + kSCALE_CHUNK : s.num_group;
      if (!dynamic)
        for (int g = q.member_begin; g < q.member_end; ++g) chunk.s[g - begin] = layers[l].act_scales[g];
      quantize_rows_kernel<<<quant_blocks, threads, 0, stream>>>(q, chunk);
      if (dynamic) break;
    }
    detail::GemmI8Args args{};
    args.a = codes;
    args.lda = lda;
    args.w = static_cast<const int8_t*>(layers[l].weight);
    args.w_scale = layers[l].w_scale;
    args.bias = layers[l].bias;
    args.row_scale = row_scale;
    args.c = last ? y : gated ? static_cast<void*>(glu) : static_cast<void*>(hidden);
    args.c_f32 = !last || s.dtype == DType::kF32;
    args.k = width;
    args.n = s.rows_of(l);
    args.activation = last || ln || gated ? -1 : s.activation;
    args.plan = plan;
    args.offsets = offsets;
    args.rows = rows;
    args.max_tiles = static_cast<int>(max_tiles);
    args.bm = bm;
    args.vec = width % 16 == 0 && aligned16(layers[l].weight);
    choose_splits(rows, detail::kI8_SPLIT_MAX_ROWS, s.num_group, bm, detail::kGEMM_BK_I8, args.k, args.n,
                  split_target, &args.k_splits, &args.steps_per_split);
    if (args.k_splits > 1) args.partial = partial;
    if (cudaError_t err = detail::launch_gemm_i8(args, stream); err != cudaSuccess) return err;
    if (gated)  // the next layer quantises h = act(gate) * up from the hidden buffer
      glu_kernel<<<row_blocks, 256, 0, stream>>>(plan, offsets, rows, s.widths[l + 1], glu, hidden, s.activation,
                                                 s.alpha, s.limit);
  }
  return cudaGetLastError();
}

}  // namespace

size_t expert_mlp_workspace_size(const ExpertMLPShape& shape) { return layout_of(shape).total; }

cudaError_t expert_mlp(const ExpertMLPShape& s, const MLPLayer* layers, const void* x, const int32_t* offsets, void* y,
                       void* workspace, size_t workspace_bytes, DeviceStatus* status, cudaStream_t stream) {
  if (status == nullptr) return cudaErrorInvalidValue;
  if (s.num_layers < 1 || s.num_layers > kMAX_LAYERS || s.num_group < 1 || s.num_group > kMAX_GROUP ||
      s.num_experts < 1 || s.num_experts > kMAX_EXPERTS || s.rows < 0 || s.rows >= (1ll << 31))
    return cudaErrorInvalidValue;
  if (s.dtype != DType::kF32 && s.dtype != DType::kF16) return cudaErrorInvalidValue;
  const bool quantized = s.quant_mode != static_cast<int32_t>(contract::QuantMode::kNONE);
  if (quantized && s.quant_mode != static_cast<int32_t>(contract::QuantMode::kW8A8) &&
      s.quant_mode != static_cast<int32_t>(contract::QuantMode::kW8A8_DYNAMIC))
    return cudaErrorInvalidValue;
  if (s.gated && (s.num_layers < 2 || s.layer_norm)) return cudaErrorInvalidValue;
  if (s.activation == static_cast<int32_t>(contract::Activation::kSWIGLU_OAI) && !s.gated) return cudaErrorInvalidValue;
  for (int l = 0; l < s.num_layers; ++l) {
    if (layers[l].weight == nullptr || (layers[l].bias == nullptr) == s.bias || s.widths[l] < 1 || s.widths[l + 1] < 1)
      return cudaErrorInvalidValue;
    if (!quantized && layers[l].weight_dtype != s.dtype) return cudaErrorInvalidValue;
    if (quantized && (layers[l].weight_dtype != DType::kI8 || layers[l].w_scale == nullptr ||
                      layers[l].act_smooth == nullptr || s.widths[l] > kMAX_I8_WIDTH ||
                      (s.quant_mode == static_cast<int32_t>(contract::QuantMode::kW8A8) &&
                       layers[l].act_scales == nullptr)))
      return cudaErrorInvalidValue;
  }
  if (s.rows == 0) return cudaSuccess;
  const Layout lay = layout_of(s);
  if (workspace == nullptr || workspace_bytes < lay.total) return cudaErrorInvalidValue;

  char* ws = static_cast<char*>(workspace);
  PlanView plan{reinterpret_cast<int*>(ws), s.num_group, static_cast<int>(s.num_experts)};
  float* hidden[2] = {reinterpret_cast<float*>(ws + lay.plan_bytes),
                      reinterpret_cast<float*>(ws + lay.plan_bytes + lay.hidden_bytes)};
  char* after_hidden = ws + lay.plan_bytes + lay.hidden_bytes * static_cast<size_t>(lay.hidden_buffers);
  float* partial = lay.partial_bytes > 0 ? reinterpret_cast<float*>(after_hidden) : nullptr;
  int* row_exp = lay.exp_bytes > 0 ? reinterpret_cast<int*>(after_hidden + lay.partial_bytes) : nullptr;
  float* glu = reinterpret_cast<float*>(ws + lay.total - lay.glu_bytes);  // the last region (gated only)
  const int rows = static_cast<int>(s.rows), experts = static_cast<int>(s.num_experts);

  GroupIds group{};
  group.count = s.num_group;
  for (int g = 0; g < s.num_group; ++g) group.ids[g] = s.expert_ids[g];
  // row tile of the GEMMs (the plan lists tiles of this many rows): w8a8 uses 16-row tiles for few rows
  const int bm = !quantized ? detail::kGEMM_BM
                            : (rows <= detail::kI8_SMALL_TILE_MAX_ROWS ? detail::kGEMM_BM_I8_SMALL
                                                                       : detail::kGEMM_BM_I8_LARGE);
  plan_kernel<<<1, kEXPERT_BLOCK, 0, stream>>>(offsets, experts, rows, group, bm, plan, status);

  const int out_width = s.widths[s.num_layers];
  const unsigned int row_blocks = detail::grid_for(rows, 8);  // 8 warps (rows) per 256-thread block
  if (s.dtype == DType::kF16)
    zero_rows_kernel<__half><<<row_blocks, 256, 0, stream>>>(plan, offsets, rows, out_width, static_cast<__half*>(y));
  else
    zero_rows_kernel<float><<<row_blocks, 256, 0, stream>>>(plan, offsets, rows, out_width, static_cast<float*>(y));
  if (quantized) return expert_mlp_w8a8(s, layers, x, offsets, y, ws, lay, plan, bm, status, stream);

  const long long max_tiles = (static_cast<long long>(rows) + detail::kGEMM_BM - 1) / detail::kGEMM_BM + s.num_group;
  const void* input = x;
  for (int l = 0; l < s.num_layers; ++l) {
    const bool last = l == s.num_layers - 1;
    const bool ln = !last && s.layer_norm && layers[l].ln_gamma != nullptr && layers[l].ln_beta != nullptr;
    const bool gated = s.is_gated(l);
    float* hidden_out = last ? nullptr : hidden[l % 2];
    detail::GemmArgs args{};
    args.a = input;
    args.a_f32 = l > 0 || s.dtype == DType::kF32;  // layer 0 reads x_sorted; later layers the fp32 hidden buffer
    args.w = layers[l].weight;
    args.bias = layers[l].bias;
    args.k = s.widths[l];
    args.n = s.rows_of(l);  // a gated layer: its 2*out rows [gate; up] into the GLU buffer
    args.plan = plan;
    args.max_tiles = static_cast<int>(max_tiles);
    args.c = last ? y : gated ? static_cast<void*>(glu) : static_cast<void*>(hidden_out);
    args.c_f32 = !last || s.dtype == DType::kF32;
    args.activation = last || ln || gated ? -1 : s.activation;
    args.row_exp = l > 0 ? row_exp : nullptr;  // fp16: the fp32 hidden input's row exponents (computed below)
    cudaError_t err;
    if (s.dtype == DType::kF16) {
      args.vec = args.k % 8 == 0 && aligned16(args.a) && aligned16(args.w);
      if (partial != nullptr)
        choose_splits(s.rows, detail::kSPLIT_MAX_ROWS, s.num_group, detail::kGEMM_BM, detail::kGEMM_BK_F16, args.k,
                      args.n, detail::kSPLIT_TARGET_BLOCKS, &args.k_splits, &args.steps_per_split);
      if (args.k_splits > 1) {
        args.partial = partial;
        args.partial_rows = rows;
      }
      err = detail::launch_gemm_f16(args, stream);
      if (err == cudaSuccess && args.k_splits > 1)
        splitk_reduce_kernel<<<row_blocks, 256, 0, stream>>>(plan, offsets, rows, args.n, partial, args.k_splits,
                                                             args.bias, args.activation, args.c, args.c_f32);
    } else {
      args.vec = false;
      err = detail::launch_gemm_f32(args, stream);
    }
    if (err != cudaSuccess) return err;
    if (gated)
      glu_kernel<<<row_blocks, 256, 0, stream>>>(plan, offsets, rows, s.widths[l + 1], glu, hidden_out, s.activation,
                                                 s.alpha, s.limit);
    if (ln)
      layernorm_act_kernel<<<row_blocks, 256, 0, stream>>>(plan, offsets, rows, args.n, hidden_out, layers[l].ln_gamma,
                                                           layers[l].ln_beta, s.eps, s.activation);
    if (!last && row_exp != nullptr)
      row_exponent_kernel<<<row_blocks, 256, 0, stream>>>(plan, offsets, rows, s.widths[l + 1], hidden_out, row_exp);
    input = hidden_out;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace pimoe
