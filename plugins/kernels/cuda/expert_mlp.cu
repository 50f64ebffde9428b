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
// accumulation, whose fp32 inputs (layers >= 1) are split into two fp16 halves (gemm_f16_wmma.cu).
// Quantised weights (quant_mode w8a8) would add a third GEMM (int8 x int8 -> int32, dequantised by
// w_scale * act_scale in the same epilogue); MLPLayer already carries w_scale for it. Not implemented yet.
#include "expert_mlp_internal.cuh"

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
      detail::report(&status->bad_offsets, e + 1, hi);
    }
  }
  if (tid == 0) {
    if (offsets[0] != 0) {
      bad = true;
      detail::report(&status->bad_offsets, 0, offsets[0]);
    }
    if (offsets[experts] != rows) {
      bad = true;
      detail::report(&status->bad_offsets, experts, offsets[experts]);
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
    const float* b = bias + static_cast<long long>(member) * width;
    for (int col = lane; col < width; col += 32) {
      const long long at = r * width + col;
      float v = partial[at];
      for (int s = 1; s < splits; ++s) v += partial[s * split_stride + at];
      v = detail::activate(v + b[col], activation);
      if (c_f32) static_cast<float*>(c)[at] = v;
      else static_cast<__half*>(c)[at] = __float2half_rn(v);
    }
  }
}

struct Layout {
  size_t plan_bytes = 0;
  size_t hidden_bytes = 0;   // one fp32 hidden buffer [R, max hidden width]
  int hidden_buffers = 0;    // 0, 1 or 2 (ping-pong)
  size_t partial_bytes = 0;  // split-K partial sums (fp16 path): kSPLIT_MAX x min(R, kSPLIT_MAX_ROWS) x max width
  size_t total = 0;
};

Layout layout_of(const ExpertMLPShape& s) {
  Layout l;
  l.plan_bytes = align256(PlanView::ints(s.num_group, static_cast<int>(s.num_experts)) * sizeof(int));
  const int hidden_layers = s.num_layers - 1;
  int64_t max_hidden = 0;
  for (int i = 1; i < s.num_layers; ++i) max_hidden = s.widths[i] > max_hidden ? s.widths[i] : max_hidden;
  const size_t elems = static_cast<size_t>(s.rows > 0 ? s.rows : 0) * static_cast<size_t>(max_hidden);
  l.hidden_buffers = hidden_layers <= 0 ? 0 : hidden_layers == 1 ? 1 : 2;
  l.hidden_bytes = align256(elems * sizeof(float));
  if (s.dtype == DType::kF16) {
    int64_t max_out = 0;
    for (int i = 1; i <= s.num_layers; ++i) max_out = s.widths[i] > max_out ? s.widths[i] : max_out;
    const int64_t split_rows = s.rows < detail::kSPLIT_MAX_ROWS ? (s.rows > 0 ? s.rows : 0) : detail::kSPLIT_MAX_ROWS;
    l.partial_bytes = align256(static_cast<size_t>(detail::kSPLIT_MAX) * static_cast<size_t>(split_rows) *
                               static_cast<size_t>(max_out) * sizeof(float));
  }
  l.total = l.plan_bytes + l.hidden_bytes * static_cast<size_t>(l.hidden_buffers) + l.partial_bytes;
  return l;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// K splits for the tensor-core GEMM: only with few rows (decode), until about kSPLIT_TARGET_BLOCKS blocks have
// work (estimated: at most one row tile per row and per expert), every split at least one K step.
void choose_splits(int64_t rows, int groups, int k, int n, int* splits, int* steps_per_split) {
  *splits = 1;
  *steps_per_split = 0;
  if (rows > detail::kSPLIT_MAX_ROWS) return;
  const int64_t k_steps = (k + detail::kGEMM_BK_F16 - 1) / detail::kGEMM_BK_F16;
  const int64_t row_tiles = (rows + detail::kGEMM_BM - 1) / detail::kGEMM_BM + groups;
  const int64_t busy = (row_tiles < rows ? row_tiles : rows) * ((n + 63) / 64);
  int64_t want = (detail::kSPLIT_TARGET_BLOCKS + busy - 1) / (busy > 0 ? busy : 1);
  if (want > detail::kSPLIT_MAX) want = detail::kSPLIT_MAX;
  if (want > k_steps) want = k_steps;
  if (want <= 1) return;
  const int64_t per = (k_steps + want - 1) / want;
  *steps_per_split = static_cast<int>(per);
  *splits = static_cast<int>((k_steps + per - 1) / per);  // every split non-empty
  if (*splits <= 1) *steps_per_split = 0, *splits = 1;
}

}  // namespace

size_t expert_mlp_workspace_size(const ExpertMLPShape& shape) { return layout_of(shape).total; }

cudaError_t expert_mlp(const ExpertMLPShape& s, const MLPLayer* layers, const void* x, const int32_t* offsets, void* y,
                       void* workspace, size_t workspace_bytes, DeviceStatus* status, cudaStream_t stream) {
  if (status == nullptr) return cudaErrorInvalidValue;
  if (cudaError_t err = clear_status(status, stream); err != cudaSuccess) return err;
  if (s.num_layers < 1 || s.num_layers > kMAX_LAYERS || s.num_group < 1 || s.num_group > kMAX_GROUP ||
      s.num_experts < 1 || s.num_experts > 1024 || s.rows < 0 || s.rows >= (1ll << 31))
    return cudaErrorInvalidValue;
  if (s.quant_mode != 0) return cudaErrorNotSupported;  // w8a8: reserved (see the file comment)
  if (s.dtype != DType::kF32 && s.dtype != DType::kF16) return cudaErrorInvalidValue;
  for (int l = 0; l < s.num_layers; ++l)
    if (layers[l].weight_dtype != s.dtype || layers[l].weight == nullptr || layers[l].bias == nullptr)
      return cudaErrorInvalidValue;
  if (s.rows == 0) return cudaSuccess;
  const Layout lay = layout_of(s);
  if (workspace == nullptr || workspace_bytes < lay.total) return cudaErrorInvalidValue;

  char* ws = static_cast<char*>(workspace);
  PlanView plan{reinterpret_cast<int*>(ws), s.num_group, static_cast<int>(s.num_experts)};
  float* hidden[2] = {reinterpret_cast<float*>(ws + lay.plan_bytes),
                      reinterpret_cast<float*>(ws + lay.plan_bytes + lay.hidden_bytes)};
  float* partial = lay.partial_bytes > 0
                       ? reinterpret_cast<float*>(ws + lay.plan_bytes + lay.hidden_bytes * lay.hidden_buffers)
                       : nullptr;
  const int rows = static_cast<int>(s.rows), experts = static_cast<int>(s.num_experts);

  GroupIds group{};
  group.count = s.num_group;
  for (int g = 0; g < s.num_group; ++g) group.ids[g] = s.expert_ids[g];
  plan_kernel<<<1, 1024, 0, stream>>>(offsets, experts, rows, group, detail::kGEMM_BM, plan, status);

  const int out_width = s.widths[s.num_layers];
  const unsigned int row_blocks = detail::grid_for(rows, 8);  // 8 warps (rows) per 256-thread block
  if (s.dtype == DType::kF16)
    zero_rows_kernel<__half><<<row_blocks, 256, 0, stream>>>(plan, offsets, rows, out_width, static_cast<__half*>(y));
  else
    zero_rows_kernel<float><<<row_blocks, 256, 0, stream>>>(plan, offsets, rows, out_width, static_cast<float*>(y));

  const long long max_tiles = (static_cast<long long>(rows) + detail::kGEMM_BM - 1) / detail::kGEMM_BM + s.num_group;
  const void* input = x;
  for (int l = 0; l < s.num_layers; ++l) {
    const bool last = l == s.num_layers - 1;
    const bool ln = !last && s.layer_norm && layers[l].ln_gamma != nullptr && layers[l].ln_beta != nullptr;
    float* hidden_out = last ? nullptr : hidden[l % 2];
    detail::GemmArgs args{};
    args.a = input;
    args.a_f32 = l > 0 || s.dtype == DType::kF32;  // layer 0 reads x_sorted; later layers the fp32 hidden buffer
    args.w = layers[l].weight;
    args.bias = layers[l].bias;
    args.k = s.widths[l];
    args.n = s.widths[l + 1];
    args.plan = plan;
    args.max_tiles = static_cast<int>(max_tiles);
    args.c = last ? y : static_cast<void*>(hidden_out);
    args.c_f32 = !last || s.dtype == DType::kF32;
    args.activation = last || ln ? -1 : s.activation;
    cudaError_t err;
    if (s.dtype == DType::kF16) {
      args.vec = args.k % 8 == 0 && aligned16(args.a) && aligned16(args.w);
      if (partial != nullptr) choose_splits(s.rows, s.num_group, args.k, args.n, &args.k_splits, &args.steps_per_split);
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
    if (ln)
      layernorm_act_kernel<<<row_blocks, 256, 0, stream>>>(plan, offsets, rows, args.n, hidden_out, layers[l].ln_gamma,
                                                           layers[l].ln_beta, s.eps, s.activation);
    input = hidden_out;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace pimoe
