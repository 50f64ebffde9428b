// CUDA implementations of the four pimoe ops (op contract v2), host-side launch API.
//
// Same semantics as the CPU kernels (plugins/kernels/cpu) and the PyTorch reference
// (pimoe_export/model/functional.py): fp32 math whatever the storage dtype, deterministic results (every
// output element is produced by one thread in a fixed order; no floating-point atomics), and no memory access
// outside the given tensors for ANY input data. Shapes must have passed the checks of
// plugins/common/pimoe_attrs.h; data that cannot be checked on the host without a synchronisation (expert ids,
// offsets, flat_to_sorted values) is checked on the device: offending entries are clamped or skipped, and the
// first one is recorded, and counted, in a DeviceStatus that the caller owns and can read back after the stream
// has finished.
//
// Nothing here allocates memory or synchronises: every op function only enqueues kernels (and memsets of its
// outputs) on `stream`, so the calls can be captured into a CUDA graph (StatusBlock's allocate/read do both, and
// belong to set-up and diagnostics).
// Functions return the launch error (cudaSuccess when everything was enqueued).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "pimoe_attrs.h"
#include "pimoe_contract.h"

namespace pimoe {
namespace cuda {

enum class DType : int32_t { kF32 = 0, kF16 = 1, kI8 = 2 };

inline size_t dtype_size(DType t) { return t == DType::kF32 ? 4 : t == DType::kF16 ? 2 : 1; }

// ------------------------------------------------------------------------------------------ device status
// Where kernels record input DATA that is inconsistent (never shape errors, which the host rejects): a block in
// device memory that the CALLER owns and keeps across launches (one per TensorRT plugin instance / ONNX Runtime
// kernel object: StatusBlock below). Nothing here clears it: every slot keeps (index << 32) | uint32(value) of the
// lowest offending index met since the last clear (an atomicMin, so the entry does not depend on thread scheduling;
// ~0ull when there is none), and `faults` counts every offending entry met (an atomicAdd on the fault path only:
// the normal path neither reads nor writes the block).
struct DeviceStatus {
  unsigned long long bad_expert_id;       // PiMoEDispatch: flat pair index, id outside [0, E) (clamped)
  unsigned long long bad_offsets;         // PiMoEExpertMLP: expert index, offsets not a partition of [0, R)
  unsigned long long bad_flat_to_sorted;  // PiMoECombine: flat pair index, entry outside [0, N*k) (slot -> NaN)
  unsigned long long bad_scale;           // PiMoEExpertMLP w8a8: element index of a w_scale / act_smooth that is not
                                          // positive and finite; value = 2 * layer (+1 for act_smooth). NaN flows on
  unsigned long long faults;              // offending entries met since the last clear (0 when clean)
};
constexpr unsigned long long kSTATUS_CLEAR = ~0ull;

// Marks `status` as clear (slots ~0, count 0); enqueued on `stream`.
cudaError_t clear_status(DeviceStatus* status, cudaStream_t stream);

// Empty string when the status is clear, else one message naming the first offending entry of each kind.
std::string describe_status(const DeviceStatus& status);

// The DeviceStatus of one plugin instance or kernel object: device memory allocated once (allocate(): cudaMalloc
// and a synchronous clear, never on an enqueue path), freed by the destructor. read() is the only way back to the
// host and synchronises `stream` first.
class StatusBlock {
 public:
  StatusBlock() = default;
  StatusBlock(const StatusBlock&) = delete;
  StatusBlock& operator=(const StatusBlock&) = delete;
  ~StatusBlock();
  // on the current device; a no-op when already allocated
  cudaError_t allocate();
  DeviceStatus* get() const { return mBlock; }
  // synchronises `stream`, copies the block into *out and, when `clear`, clears it (also synchronously)
  cudaError_t read(cudaStream_t stream, DeviceStatus* out, bool clear);
  // For teardown (destructors): "" when the block is clean or cannot be read, else "<count> inconsistent input
  // entries ... : <describe_status>". Synchronous (cudaMemcpy): call after the work is done.
  std::string teardown_report();

 private:
  DeviceStatus* mBlock = nullptr;
};

// ------------------------------------------------------------------------------------------ PiMoERoute
// logits [n, e] (f32/f16), bias [e] f32 or nullptr -> weights [n, k] f32, ids [n, k] i32 (always in [0, e)),
// k = attrs.k; attrs must have passed check_route for [n, e] (the launcher refuses what the kernel cannot index with
// cudaErrorInvalidValue, without validating the attributes again).
// No input data can be inconsistent here (NaN logits rank lowest): route has no device status.
cudaError_t route(const RouteAttrs& attrs, const void* logits, DType dtype, const float* bias, int64_t n, int64_t e,
                  float* weights, int32_t* ids, cudaStream_t stream);

// ------------------------------------------------------------------------------------------ PiMoEDispatch
// Deterministic stable counting sort (per-tile histograms, exclusive scan, stable per-tile ranks, row copy).
size_t dispatch_workspace_size(int64_t pairs, int64_t num_experts);
cudaError_t dispatch(const void* x, DType dtype, const int32_t* ids, int64_t n, int64_t h, int64_t k,
                     int64_t num_experts, void* x_sorted, int32_t* offsets, int32_t* flat_to_sorted, void* workspace,
                     size_t workspace_bytes, DeviceStatus* status, cudaStream_t stream);

// ------------------------------------------------------------------------------------------ PiMoECombine
// y[t] = sum_j weights[t, j] * y_sorted[flat_to_sorted[t*k + j]], fp32, one multiply and one add per slot (compiled
// with --fmad=false), in slot order or (order kEXPERT) from 0 by ascending sorted row: bit-identical to the PyTorch
// reference.
cudaError_t combine(const void* y_sorted, DType dtype, const int32_t* flat_to_sorted, const float* weights, int64_t n,
                    int64_t k, int64_t h, void* y, DeviceStatus* status, cudaStream_t stream,
                    contract::CombineOrder order = contract::CombineOrder::kSLOT);

// ------------------------------------------------------------------------------------------ PiMoEExpertMLP
// Contract limits (generated from pimoe_export/ops/schema.py): every launcher checks them.
constexpr int32_t kMAX_LAYERS = static_cast<int32_t>(contract::kMAX_LAYERS);
constexpr int32_t kMAX_EXPERTS = static_cast<int32_t>(contract::kMAX_EXPERTS);
constexpr int32_t kMAX_TOP_K = static_cast<int32_t>(contract::kMAX_TOP_K);
constexpr int32_t kMAX_GROUP = kMAX_EXPERTS;  // a group holds distinct experts
// The single-block kernels (dispatch scan, expert plan) give each expert one thread of a 1024-thread block.
constexpr int32_t kEXPERT_BLOCK = 1024;
static_assert(kMAX_EXPERTS <= kEXPERT_BLOCK, "one thread per expert in the single-block kernels");

// Largest layer input width of the w8a8 path: the int32 accumulator holds sum_k q_a * q_w exactly while
// 127 * 127 * K < 2^31 (K <= 133143); the limit is rounded down to a power of two.
constexpr int64_t kMAX_I8_WIDTH = 131072;

struct MLPLayer {
  const void* weight = nullptr;       // [G, rows, in]: the activation dtype (quant_mode none) or int8 (w8a8 modes)
  DType weight_dtype = DType::kF32;
  const float* w_scale = nullptr;     // [G, rows] per-output-channel (per-row) weight scale (w8a8 modes)
  const float* act_smooth = nullptr;  // [G, in] SmoothQuant divisor of the layer input (w8a8 modes)
  const float* act_scales = nullptr;  // HOST memory, [G]: static activation scale per member (w8a8 only); read
                                      // during the call (passed to the kernels by value), not kept
  const float* bias = nullptr;        // [G, rows] (rows = 2*out for a gated hidden layer), nullptr without bias
  const float* ln_gamma = nullptr;    // [G, out] (hidden layers with LayerNorm) or nullptr
  const float* ln_beta = nullptr;     // [G, out] or nullptr
};

// Static description of one PiMoEExpertMLP node (from its attributes and the tensor shapes).
struct ExpertMLPShape {
  DType dtype = DType::kF32;  // x_sorted / y_sorted storage
  int64_t rows = 0;           // R (the maximum R when sizing a workspace)
  int64_t num_experts = 0;    // E
  int32_t num_layers = 0;     // L
  int32_t widths[kMAX_LAYERS + 1] = {};
  int32_t num_group = 0;      // G
  int16_t expert_ids[kMAX_GROUP] = {};
  int32_t activation = 0;     // contract::Activation
  bool layer_norm = false;
  float eps = 1e-5f;
  int32_t quant_mode = 0;     // contract::QuantMode: 0 none, 1 w8a8 (static scales), 2 w8a8_dynamic
  // contract v2 (defaults: v1)
  bool gated = false;  // hidden layers are GLUs over their 2*out rows [gate; up] (no LayerNorm)
  bool bias = true;    // false: MLPLayer::bias is nullptr for every layer
  float alpha = contract::kSWIGLU_OAI_ALPHA;  // activation swiglu_oai
  float limit = contract::kSWIGLU_OAI_LIMIT;

  bool is_gated(int32_t layer) const { return gated && layer < num_layers - 1; }
  int32_t rows_of(int32_t layer) const { return widths[layer + 1] * (is_gated(layer) ? 2 : 1); }
};

size_t expert_mlp_workspace_size(const ExpertMLPShape& shape);
// x [R, widths[0]], offsets [E+1] (device), layers[0..L) -> y [R, widths[L]]; rows of experts outside the
// group are written as 0. `shape.rows` is the actual R here.
// w8a8 modes (the math of pimoe_export/model/quant_reference.py, per layer): x / act_smooth -> int8 codes with the
// static scale act_scales[g] or a dynamic per-row scale max|x| / 127 -> int8 tensor-core GEMM with int32
// accumulation -> float(acc) * (s * w_scale) + bias (separate multiply and add) -> [LayerNorm] -> activation.
// Gated hidden layers: the GEMM writes the 2*out columns [gate | up] (bias fused) into a workspace buffer, then one
// pass computes h = act(gate) * up (swiglu_oai: the clamped SwiGLU) into the hidden buffer the next layer reads.
cudaError_t expert_mlp(const ExpertMLPShape& shape, const MLPLayer* layers, const void* x, const int32_t* offsets,
                       void* y, void* workspace, size_t workspace_bytes, DeviceStatus* status, cudaStream_t stream);

}  // namespace cuda
}  // namespace pimoe
