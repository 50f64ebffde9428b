// The CUDA execution-provider kernels of libpimoe_ort_cuda (and, built against plugins/emu, of
// libpimoe_ort_cuda_emu, which registers them for the CPU provider so that CI runs this code): the four pimoe ops
// on the plugins/kernels/cuda launchers that the TensorRT plugins use.
//
// Each kernel checks shapes and attributes exactly like the CPU kernel (the *_io functions of pimoe_ort_io.h;
// shapes are host values), then enqueues the launcher on ONNX Runtime's compute stream for the node
// (KernelContext_GetGPUComputeStream). Nothing on that path synchronises:
//   - Scratch memory (the launchers' workspace) is stream-ordered: see Scratch below.
//   - Input data that only the device sees (expert ids outside [0, E), offsets or flat_to_sorted entries that do
//     not fit, non-positive scales) is clamped, zeroed or made NaN as in the TensorRT plugins, and recorded and
//     counted in the kernel object's device status block (cuda::StatusBlock, allocated at the first run). What a
//     user sees: a warning on stderr when the session is released, naming how many inconsistent entries the
//     kernels met and the lowest offender of each kind; with PIMOE_ORT_SYNC_CHECK=1, every op synchronises its
//     stream after its kernels and fails the run with the message instead (the error the CPU kernels give).
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include "cuda_attrs.h"
#include "cuda_kernels.h"
#include "pimoe_ort_io.h"

namespace pimoe {
namespace ort {
namespace {

cuda::DType to_cuda(ONNXTensorElementDataType t) {
  return t == kF16 ? cuda::DType::kF16 : t == kI8 ? cuda::DType::kI8 : cuda::DType::kF32;
}

OrtStatusPtr runtime_error(const std::string& text) {
  return api()->CreateStatus(ORT_RUNTIME_EXCEPTION, text.c_str());
}

OrtStatusPtr compute_stream(OrtKernelContext* ctx, cudaStream_t* stream) {
  void* raw = nullptr;
  PIMOE_RETURN_IF(api()->KernelContext_GetGPUComputeStream(ctx, &raw));
  *stream = static_cast<cudaStream_t>(raw);  // nullptr: ONNX Runtime gives this node no stream (see Scratch)
  return nullptr;
}

// Device scratch memory for one ComputeV2 (the launchers' workspace), released when ComputeV2 returns, which is
// before the GPU has run the kernels that use it. So it must be ordered on the stream the kernels run on:
//   - With a compute stream (the CUDA provider): KernelContext_GetScratchBuffer (C API 18) allocates from the
//     allocator of the inputs' device ON THAT STREAM, as ONNX Runtime's own CUDA kernels do. The stream-aware arena
//     records the chunk's stream; freed, the chunk is reused by later work on the same stream (which runs after our
//     kernels) or by another stream only after ONNX Runtime has made that stream wait on this one. Concurrent Run()
//     calls on one session, each on its own stream, therefore never share a live buffer.
//   - Without one (the CPU provider running libpimoe_ort_cuda_emu, whose emulated kernels finish before the launch
//     returns; or a provider on the legacy default stream): the allocator's stream-less memory, and the stream is
//     synchronised before the memory goes back.
class Scratch {
 public:
  Scratch() = default;
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  ~Scratch() {
    if (mPtr != nullptr) {
      if (!mOrdered) cudaStreamSynchronize(mStream);  // the kernels are done with it before it is freed
      if (OrtStatus* s = api()->AllocatorFree(mAllocator, mPtr)) api()->ReleaseStatus(s);
    }
    if (mAllocator != nullptr) api()->ReleaseAllocator(mAllocator);
  }

  // `bytes` of device memory where `like` lives, for kernels enqueued on `stream` (0 bytes: nothing, nullptr)
  OrtStatusPtr allocate(OrtKernelContext* ctx, const OrtValue* like, size_t bytes, cudaStream_t stream) {
    if (bytes == 0) return nullptr;
    const OrtMemoryInfo* info = nullptr;
    PIMOE_RETURN_IF(api()->GetTensorMemoryInfo(like, &info));
    PIMOE_RETURN_IF(api()->KernelContext_GetAllocator(ctx, info, &mAllocator));  // frees it, either way
    mStream = stream;
    mOrdered = stream != nullptr;
    if (mOrdered) return api()->KernelContext_GetScratchBuffer(ctx, info, bytes, &mPtr);
    return api()->AllocatorAlloc(mAllocator, bytes, &mPtr);
  }
  void* get() const { return mPtr; }

 private:
  OrtAllocator* mAllocator = nullptr;
  void* mPtr = nullptr;
  cudaStream_t mStream = nullptr;
  bool mOrdered = false;
};

bool sync_check() {
  static const bool on = [] {
    const char* v = std::getenv("PIMOE_ORT_SYNC_CHECK");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }();
  return on;
}

// What every CUDA kernel object shares: its device status block, allocated at the first run on the device the
// session runs on (ONNX Runtime sets it before calling the kernel) and read back only by the sync check and at
// teardown.
class CudaKernelBase {
 public:
  CudaKernelBase() = default;
  CudaKernelBase(const CudaKernelBase&) = delete;
  CudaKernelBase& operator=(const CudaKernelBase&) = delete;
  ~CudaKernelBase() {
    const std::string report = mStatus.teardown_report();
    if (!report.empty()) std::fprintf(stderr, "[pimoe-ort] WARNING: %s (CUDA): %s\n", mOp, report.c_str());
  }

 protected:
  explicit CudaKernelBase(const char* op) : mOp(op) {}

  // the status block, allocated on first use (once per kernel object, however many threads run it)
  OrtStatusPtr status(cuda::DeviceStatus** out) {
    if (!mReady.load(std::memory_order_acquire)) {
      std::lock_guard<std::mutex> lock(mMutex);
      if (!mReady.load(std::memory_order_relaxed)) {
        if (cudaError_t err = mStatus.allocate(); err != cudaSuccess) {
          cudaGetLastError();
          return runtime_error(msg(mOp, ": cannot allocate its device status block: ", cudaGetErrorString(err)));
        }
        mReady.store(true, std::memory_order_release);
      }
    }
    *out = mStatus.get();
    return nullptr;
  }

  // The launch error, or (PIMOE_ORT_SYNC_CHECK=1) what the kernels recorded, after synchronising `stream`.
  OrtStatusPtr finish(cudaError_t launch, cudaStream_t stream) {
    if (launch != cudaSuccess) return runtime_error(msg(mOp, ": CUDA launch failed: ", cudaGetErrorString(launch)));
    if (!sync_check()) return nullptr;
    if (!mReady.load(std::memory_order_acquire)) {  // an op without a status block (PiMoERoute): errors only
      if (cudaError_t err = cudaStreamSynchronize(stream); err != cudaSuccess)
        return runtime_error(msg(mOp, ": PIMOE_ORT_SYNC_CHECK: ", cudaGetErrorString(err)));
      return nullptr;
    }
    cuda::DeviceStatus host{};
    if (cudaError_t err = mStatus.read(stream, &host, true); err != cudaSuccess)
      return runtime_error(msg(mOp, ": PIMOE_ORT_SYNC_CHECK: ", cudaGetErrorString(err)));
    const std::string problem = cuda::describe_status(host);
    return problem.empty() ? nullptr : error(problem);
  }

  const char* mOp = "";

 private:
  cuda::StatusBlock mStatus;
  std::atomic<bool> mReady{false};
  std::mutex mMutex;
};

// ------------------------------------------------------------------------------------------ PiMoERoute
struct RouteCuda : CudaKernelBase {
  using Signature = RouteSignature;
  RouteAttrs attrs;

  RouteCuda() : CudaKernelBase(Signature::kNAME) {}
  OrtStatusPtr init(const OrtKernelInfo*, ONNXTensorElementDataType) { return nullptr; }
  OrtStatusPtr ComputeV2(OrtKernelContext* ctx) {
    RouteIO io;
    PIMOE_RETURN_IF(route_io(ctx, attrs, &io));
    cudaStream_t stream = nullptr;
    PIMOE_RETURN_IF(compute_stream(ctx, &stream));
    // route has no device status: no input data of it can be inconsistent
    return finish(cuda::route(attrs, io.logits.data, to_cuda(io.logits.type),
                              io.bias.value ? static_cast<const float*>(io.bias.data) : nullptr, io.n, io.experts,
                              static_cast<float*>(io.weights), static_cast<int32_t*>(io.ids), stream),
                  stream);
  }
};

// ------------------------------------------------------------------------------------------ PiMoEDispatch
struct DispatchCuda : CudaKernelBase {
  using Signature = DispatchSignature;
  DispatchAttrs attrs;

  DispatchCuda() : CudaKernelBase(Signature::kNAME) {}
  OrtStatusPtr init(const OrtKernelInfo*, ONNXTensorElementDataType) { return nullptr; }
  OrtStatusPtr ComputeV2(OrtKernelContext* ctx) {
    DispatchIO io;
    PIMOE_RETURN_IF(dispatch_io(ctx, attrs, &io));
    cudaStream_t stream = nullptr;
    PIMOE_RETURN_IF(compute_stream(ctx, &stream));
    cuda::DeviceStatus* device_status = nullptr;
    PIMOE_RETURN_IF(status(&device_status));
    const size_t need = cuda::dispatch_workspace_size(io.n * io.k, attrs.num_experts);
    Scratch scratch;
    PIMOE_RETURN_IF(scratch.allocate(ctx, io.x.value, need, stream));
    return finish(cuda::dispatch(io.x.data, to_cuda(io.x.type), static_cast<const int32_t*>(io.ids.data), io.n, io.h,
                                 io.k, attrs.num_experts, io.x_sorted, static_cast<int32_t*>(io.offsets),
                                 static_cast<int32_t*>(io.f2s), scratch.get(), need, device_status, stream),
                  stream);
  }
};

// ------------------------------------------------------------------------------------------ PiMoECombine
struct CombineCuda : CudaKernelBase {
  using Signature = CombineSignature;
  CombineAttrs attrs;

  CombineCuda() : CudaKernelBase(Signature::kNAME) {}
  OrtStatusPtr init(const OrtKernelInfo*, ONNXTensorElementDataType) { return nullptr; }
  OrtStatusPtr ComputeV2(OrtKernelContext* ctx) {
    CombineIO io;
    PIMOE_RETURN_IF(combine_io(ctx, &io));
    cudaStream_t stream = nullptr;
    PIMOE_RETURN_IF(compute_stream(ctx, &stream));
    cuda::DeviceStatus* device_status = nullptr;
    PIMOE_RETURN_IF(status(&device_status));
    return finish(cuda::combine(io.y_sorted.data, to_cuda(io.y_sorted.type), static_cast<const int32_t*>(io.f2s.data),
                                static_cast<const float*>(io.weights.data), io.n, io.k, io.h, io.y, device_status,
                                stream, attrs.order),
                  stream);
  }
};

// ------------------------------------------------------------------------------------------ PiMoEExpertMLP
struct ExpertMLPCuda : CudaKernelBase {
  using Signature = ExpertMLPSignature;
  ExpertMLPAttrs attrs;
  std::unique_ptr<cuda::ExpertMLPParamIndex> index;  // resolved once, at creation

  ExpertMLPCuda() : CudaKernelBase(Signature::kNAME) {}
  // the CUDA kernels' limits beyond the op contract (the TensorRT plugin refuses the same at build time)
  OrtStatusPtr init(const OrtKernelInfo*, ONNXTensorElementDataType) {
    if (auto e = cuda::expert_mlp_kernel_limits(attrs); !e.empty()) return error(e);
    index = std::make_unique<cuda::ExpertMLPParamIndex>(attrs);
    return nullptr;
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* ctx) {
    MLPIO io;
    PIMOE_RETURN_IF(expert_mlp_io(ctx, attrs, &io));
    cudaStream_t stream = nullptr;
    PIMOE_RETURN_IF(compute_stream(ctx, &stream));
    cuda::DeviceStatus* device_status = nullptr;
    PIMOE_RETURN_IF(status(&device_status));
    const void* params[contract::kMAX_LAYERS * kPARAM_ROLE_COUNT] = {};
    for (size_t i = 0; i < io.params.size() && i < sizeof params / sizeof params[0]; ++i) params[i] = io.params[i].data;
    cuda::DType weight_dtypes[cuda::kMAX_LAYERS] = {};
    for (int64_t l = 0; l < attrs.num_layers() && l < cuda::kMAX_LAYERS; ++l)
      weight_dtypes[l] = to_cuda(io.params[static_cast<size_t>((*index)(l, ParamRole::kWEIGHT))].type);
    cuda::MLPLayer layers[cuda::kMAX_LAYERS];
    cuda::expert_mlp_layers(attrs, *index, params, weight_dtypes, layers);
    const cuda::ExpertMLPShape shape = cuda::expert_mlp_shape(attrs, io.rows, io.num_experts, to_cuda(io.x.type));
    const size_t need = cuda::expert_mlp_workspace_size(shape);
    Scratch scratch;
    PIMOE_RETURN_IF(scratch.allocate(ctx, io.x.value, need, stream));
    return finish(cuda::expert_mlp(shape, layers, io.x.data, static_cast<const int32_t*>(io.offsets.data), io.y,
                                   scratch.get(), need, device_status, stream),
                  stream);
  }
};

}  // namespace

void add_cuda_ops(OpList& ops, const char* provider) {
  // one set per provider name (a library registers one)
  static OrtOp<RouteCuda> route(provider, kAny);
  static OrtOp<DispatchCuda> dispatch_f32(provider, kF32), dispatch_f16(provider, kF16);
  static OrtOp<CombineCuda> combine_f32(provider, kF32), combine_f16(provider, kF16);
  static OrtOp<ExpertMLPCuda> mlp_f32(provider, kF32), mlp_f16(provider, kF16);
  ops.insert(ops.end(), {&route, &dispatch_f32, &dispatch_f16, &combine_f32, &combine_f16, &mlp_f32, &mlp_f16});
}

}  // namespace ort
}  // namespace pimoe
