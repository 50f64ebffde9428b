// The CPU kernels of libpimoe_ort (and of libpimoe_ort_cuda, which adds CUDA kernels): the four pimoe ops on
// plugins/kernels/cpu, run on ONNX Runtime's intra-op thread pool. Inputs are checked by the shared *_io functions
// of pimoe_ort_io.h; PiMoEExpertMLP packs its weights once at session creation when they are initializers.
#include "cpu_kernels.h"
#include "pimoe_ort_io.h"

namespace pimoe {
namespace ort {
namespace {

cpu::DType to_dtype(ONNXTensorElementDataType t) {
  return t == kF16 ? cpu::DType::kF16 : t == kI8 ? cpu::DType::kI8 : cpu::DType::kF32;
}

cpu::Parallel make_parallel(OrtKernelContext* context) {
  return cpu::Parallel(context, [](void* ctx, cpu::Parallel::Trampoline fn, size_t total, void* arg) {
    OrtStatus* status = api()->KernelContext_ParallelFor(static_cast<OrtKernelContext*>(ctx), fn, total, 0, arg);
    if (status != nullptr) {  // no thread pool available: run serially, same results
      api()->ReleaseStatus(status);
      for (size_t i = 0; i < total; ++i) fn(arg, i);
    }
  });
}

// ------------------------------------------------------------------------------------------ PiMoERoute
struct RouteKernel {
  using Signature = RouteSignature;
  RouteAttrs attrs;

  OrtStatusPtr init(const OrtKernelInfo*, ONNXTensorElementDataType) { return nullptr; }
  OrtStatusPtr ComputeV2(OrtKernelContext* ctx) {
    RouteIO io;
    PIMOE_RETURN_IF(route_io(ctx, attrs, &io));
    cpu::route(attrs, io.logits.data, to_dtype(io.logits.type),
               io.bias.value ? static_cast<const float*>(io.bias.data) : nullptr, io.n, io.experts,
               static_cast<float*>(io.weights), static_cast<int32_t*>(io.ids), make_parallel(ctx));
    return nullptr;
  }
};

// ------------------------------------------------------------------------------------------ PiMoEDispatch
struct DispatchKernel {
  using Signature = DispatchSignature;
  DispatchAttrs attrs;

  OrtStatusPtr init(const OrtKernelInfo*, ONNXTensorElementDataType) { return nullptr; }
  OrtStatusPtr ComputeV2(OrtKernelContext* ctx) {
    DispatchIO io;
    PIMOE_RETURN_IF(dispatch_io(ctx, attrs, &io));
    auto e = cpu::dispatch(io.x.data, to_dtype(io.x.type), static_cast<const int32_t*>(io.ids.data), io.n, io.h,
                           io.k, attrs.num_experts, io.x_sorted, static_cast<int32_t*>(io.offsets),
                           static_cast<int32_t*>(io.f2s), make_parallel(ctx));
    return e.empty() ? nullptr : error(e);
  }
};

// ------------------------------------------------------------------------------------------ PiMoECombine
struct CombineKernel {
  using Signature = CombineSignature;
  CombineAttrs attrs;

  OrtStatusPtr init(const OrtKernelInfo*, ONNXTensorElementDataType) { return nullptr; }
  OrtStatusPtr ComputeV2(OrtKernelContext* ctx) {
    CombineIO io;
    PIMOE_RETURN_IF(combine_io(ctx, &io));
    auto e = cpu::combine(io.y_sorted.data, to_dtype(io.y_sorted.type), static_cast<const int32_t*>(io.f2s.data),
                          static_cast<const float*>(io.weights.data), io.n, io.k, io.h, io.y, make_parallel(ctx),
                          attrs.order);
    return e.empty() ? nullptr : error(e);
  }
};

// ------------------------------------------------------------------------------------------ PiMoEExpertMLP
struct ExpertMLPKernel {
  using Signature = ExpertMLPSignature;
  ExpertMLPAttrs attrs;
  std::unique_ptr<cpu::ExpertMLP> packed;  // set when every parameter is a constant initializer
  ConstantParams constant;                 // their shapes and types (then not fetched again per call)

  // Pack the weights now if they are all constant initializers (the normal exported graph).
  OrtStatusPtr init(const OrtKernelInfo* info, ONNXTensorElementDataType x_type) {
    const ExpertMLPAttrs& a = attrs;
    size_t inputs = 0;
    PIMOE_RETURN_IF(api()->KernelInfo_GetInputCount(info, &inputs));
    std::vector<Input> params(inputs >= 2 ? inputs - 2 : 0);
    bool all_constant = !params.empty();
    for (size_t i = 0; i < params.size() && all_constant; ++i) {
      int is_constant = 0;
      const OrtValue* value_ptr = nullptr;
      OrtStatus* s = api()->KernelInfoGetConstantInput_tensor(info, i + 2, &is_constant, &value_ptr);
      if (s) {
        api()->ReleaseStatus(s);
        all_constant = false;
      } else if (!is_constant || value_ptr == nullptr) {
        all_constant = false;
      } else {
        PIMOE_RETURN_IF(describe(value_ptr, &params[i]));
      }
    }
    if (!all_constant) return nullptr;
    std::vector<Dims>& dims = constant.dims;
    std::vector<ONNXTensorElementDataType>& types = constant.types;
    for (const Input& p : params) {
      dims.push_back(p.dims);
      types.push_back(p.type);
    }
    // check shapes against a nominal x (rows unknown yet) and offsets for the largest expert id
    int64_t max_id = 0;
    for (int64_t id : a.expert_ids) max_id = id > max_id ? id : max_id;
    if (auto e = check_expert_mlp(a, {0, a.widths.front()}, {max_id + 2}, dims); !e.empty()) return error(e);
    if (auto e = check_param_types(a, types, x_type); !e.empty()) return error(e);
    std::vector<cpu::ExpertMLP::Param> raw;
    for (const Input& p : params) raw.push_back({p.data, to_dtype(p.type)});
    packed = std::make_unique<cpu::ExpertMLP>();
    if (auto e = packed->prepare(a, raw); !e.empty()) return error(e);
    return nullptr;
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* ctx) {
    MLPIO io;
    PIMOE_RETURN_IF(expert_mlp_io(ctx, attrs, &io, packed ? &constant : nullptr));
    const cpu::ExpertMLP* mlp = packed.get();
    cpu::ExpertMLP local;
    if (mlp == nullptr) {  // weights are graph inputs: pack for this call only
      std::vector<cpu::ExpertMLP::Param> raw;
      for (const Input& p : io.params) raw.push_back({p.data, to_dtype(p.type)});
      if (auto e = local.prepare(attrs, raw); !e.empty()) return error(e);
      mlp = &local;
    }
    auto e = mlp->run(io.x.data, to_dtype(io.x.type), io.rows, static_cast<const int32_t*>(io.offsets.data),
                      io.num_experts, io.y, make_parallel(ctx));
    return e.empty() ? nullptr : error(e);
  }
};

}  // namespace

void add_cpu_ops(OpList& ops) {
  static OrtOp<RouteKernel> route(nullptr, kAny);
  static OrtOp<DispatchKernel> dispatch_f32(nullptr, kF32), dispatch_f16(nullptr, kF16);
  static OrtOp<CombineKernel> combine_f32(nullptr, kF32), combine_f16(nullptr, kF16);
  static OrtOp<ExpertMLPKernel> mlp_f32(nullptr, kF32), mlp_f16(nullptr, kF16);
  ops.insert(ops.end(), {&route, &dispatch_f32, &dispatch_f16, &combine_f32, &combine_f16, &mlp_f32, &mlp_f16});
}

}  // namespace ort
}  // namespace pimoe
