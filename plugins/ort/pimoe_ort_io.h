// The I/O layer of the pimoe ONNX Runtime kernels, shared by the CPU kernels (pimoe_ort_cpu.cpp) and the CUDA
// execution-provider kernels (pimoe_ort_cuda.cpp): ONNX Runtime's API table, non-throwing views of kernel inputs
// and outputs, the attribute reader (a visitor of pimoe_attrs.h's attribute lists), each op's input checks and
// output claims (*_io: shapes are host values on every provider; only the data pointers differ), and OrtOp, the
// custom-op definition every kernel class is registered through.
//
// A kernel class provides
//   using Signature = <RouteSignature | DispatchSignature | CombineSignature | ExpertMLPSignature>;
//   typename Signature::Attrs attrs;
//   OrtStatusPtr init(const OrtKernelInfo*, ONNXTensorElementDataType x_type);   after the attributes are valid
//   OrtStatusPtr ComputeV2(OrtKernelContext*);
// and OrtOp<Kernel>(provider, x_type) is its custom op (provider nullptr: the CPU provider).
#pragma once

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <memory>
#include <string>
#include <vector>

#include "pimoe_attrs.h"

namespace pimoe {
namespace ort {

// ONNX Runtime's API table for the call in progress on this thread. Each kernel keeps the table of the ONNX Runtime
// that created it (CreateKernelV2 receives it) and makes it current for its calls (ApiScope): a process can hold two
// ONNX Runtime copies that both register this library (onnxruntime's Python module and onnxruntime-genai's own
// library), and each kernel must call back into its own. Outside a kernel's call: the table RegisterCustomOps
// (pimoe_ort.cpp) received last.
const OrtApi* api();
extern const OrtApi* g_registered_api;
class ApiScope {
 public:
  explicit ApiScope(const OrtApi* table);
  ~ApiScope();
  ApiScope(const ApiScope&) = delete;
  ApiScope& operator=(const ApiScope&) = delete;

 private:
  const OrtApi* mPrevious;
};

constexpr ONNXTensorElementDataType kF32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
constexpr ONNXTensorElementDataType kF16 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
constexpr ONNXTensorElementDataType kI32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
constexpr ONNXTensorElementDataType kI8 = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
constexpr ONNXTensorElementDataType kAny = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;

const char* type_name(ONNXTensorElementDataType t);
OrtStatusPtr error(const std::string& text);  // ORT_INVALID_ARGUMENT with `text`

#define PIMOE_RETURN_IF(status_expr)                                      \
  do {                                                                    \
    if (OrtStatusPtr pimoe_status_ = (status_expr)) return pimoe_status_; \
  } while (0)

// ------------------------------------------------------------------------------------------ attributes
// The ONNX Runtime visitor of visit_attrs: reads node attributes, keeps the first problem (prefixed by the op) and
// leaves a member at its default when its attribute is absent.
class AttrReader {
 public:
  AttrReader(const char* op, const OrtKernelInfo* info) : mOp(op), mInfo(info) {}

  template <class T>
  void integer(const char* name, T& member, Need need) {
    member = get_int(name, member, need == Need::kREQUIRED);
  }
  void flag(const char* name, bool& member);
  void real(const char* name, float& member);
  void integers(const char* name, std::vector<int64_t>& member, Need need);
  void reals(const char* name, std::vector<float>& member);
  template <class E>
  void choice(const char* name, E& member, const char* const* names, int32_t count) {
    int32_t value = static_cast<int32_t>(member);
    if (read_choice(name, names, count, &value)) member = static_cast<E>(value);
  }

  const std::string& problem() const { return mProblem; }

 private:
  int64_t get_int(const char* name, int64_t fallback, bool required);
  bool read_choice(const char* name, const char* const* names, int32_t count, int32_t* value);
  void set_problem(const std::string& text);

  const char* mOp;
  const OrtKernelInfo* mInfo;
  std::string mProblem;
};

// ------------------------------------------------------------------------------------------ tensors
// Thin, non-throwing views of kernel inputs/outputs.
struct Input {
  const OrtValue* value = nullptr;
  ONNXTensorElementDataType type = kAny;
  Dims dims;
  const void* data = nullptr;
};

OrtStatusPtr describe(const OrtValue* value, Input* in);
OrtStatusPtr get_input(OrtKernelContext* ctx, size_t index, Input* in);
OrtStatusPtr get_output(OrtKernelContext* ctx, size_t index, const Dims& dims, void** data);
// "<op>: <what> must be float32 or float16, got int8" style check; empty when the type is allowed
std::string require_type(const char* op, const char* what, ONNXTensorElementDataType got,
                         std::initializer_list<ONNXTensorElementDataType> allowed);

// ------------------------------------------------------------------------------------------ per-op I/O
// Each *_io checks the inputs against the contract (shapes, dtypes, the attributes) and claims the outputs.
struct RouteIO {
  Input logits, bias;
  int64_t n = 0, experts = 0;
  void* weights = nullptr;
  void* ids = nullptr;
};
OrtStatusPtr route_io(OrtKernelContext* ctx, const RouteAttrs& attrs, RouteIO* io);

struct DispatchIO {
  Input x, ids;
  int64_t n = 0, h = 0, k = 0;
  void *x_sorted = nullptr, *offsets = nullptr, *f2s = nullptr;
};
OrtStatusPtr dispatch_io(OrtKernelContext* ctx, const DispatchAttrs& attrs, DispatchIO* io);

struct CombineIO {
  Input y_sorted, f2s, weights;
  int64_t n = 0, k = 0, h = 0;
  void* y = nullptr;
};
OrtStatusPtr combine_io(OrtKernelContext* ctx, CombineIO* io);

struct MLPIO {
  Input x, offsets;
  std::vector<Input> params;
  int64_t rows = 0, num_experts = 0;
  void* y = nullptr;
};
// ``constant``: the parameters' shapes and types when they are constant initializers the kernel has already read and
// packed at session creation; they are then checked as before but not fetched again (io->params stays empty)
struct ConstantParams {
  std::vector<Dims> dims;
  std::vector<ONNXTensorElementDataType> types;
};
OrtStatusPtr expert_mlp_io(OrtKernelContext* ctx, const ExpertMLPAttrs& attrs, MLPIO* io,
                           const ConstantParams* constant = nullptr);
// the dtypes the contract requires of the variadic parameters; empty when `types` satisfy it
std::string check_param_types(const ExpertMLPAttrs& a, const std::vector<ONNXTensorElementDataType>& types,
                              ONNXTensorElementDataType x_type);

// ------------------------------------------------------------------------------------------ op signatures
// Name, attributes and I/O types of each op as ONNX Runtime sees them; `t` is the activation dtype the op is
// registered for (kAny for PiMoERoute, which takes both).
struct SignatureDefaults {
  static OrtCustomOpInputOutputCharacteristic input_kind(size_t) { return INPUT_OUTPUT_REQUIRED; }
  static int variadic_min_arity() { return 1; }
  static bool variadic_homogeneous() { return true; }
};

struct RouteSignature : SignatureDefaults {
  static constexpr const char* kNAME = contract::kROUTE_NAME;
  using Attrs = RouteAttrs;
  static size_t inputs() { return 2; }
  static ONNXTensorElementDataType input(size_t i, ONNXTensorElementDataType) { return i == 0 ? kAny : kF32; }
  static OrtCustomOpInputOutputCharacteristic input_kind(size_t i) {
    return i == 0 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;  // selection_bias
  }
  static size_t outputs() { return 2; }
  static ONNXTensorElementDataType output(size_t i, ONNXTensorElementDataType) { return i == 0 ? kF32 : kI32; }
};

struct DispatchSignature : SignatureDefaults {
  static constexpr const char* kNAME = contract::kDISPATCH_NAME;
  using Attrs = DispatchAttrs;
  static size_t inputs() { return 2; }
  static ONNXTensorElementDataType input(size_t i, ONNXTensorElementDataType t) { return i == 0 ? t : kI32; }
  static size_t outputs() { return 3; }
  static ONNXTensorElementDataType output(size_t i, ONNXTensorElementDataType t) { return i == 0 ? t : kI32; }
};

struct CombineSignature : SignatureDefaults {
  static constexpr const char* kNAME = contract::kCOMBINE_NAME;
  using Attrs = CombineAttrs;
  static size_t inputs() { return 3; }
  static ONNXTensorElementDataType input(size_t i, ONNXTensorElementDataType t) {
    return i == 0 ? t : i == 1 ? kI32 : kF32;
  }
  static size_t outputs() { return 1; }
  static ONNXTensorElementDataType output(size_t, ONNXTensorElementDataType t) { return t; }
};

struct ExpertMLPSignature : SignatureDefaults {
  static constexpr const char* kNAME = contract::kEXPERTMLP_NAME;
  using Attrs = ExpertMLPAttrs;
  static size_t inputs() { return 3; }
  static ONNXTensorElementDataType input(size_t i, ONNXTensorElementDataType t) {
    return i == 0 ? t : i == 1 ? kI32 : kAny;
  }
  static OrtCustomOpInputOutputCharacteristic input_kind(size_t i) {
    return i == 2 ? INPUT_OUTPUT_VARIADIC : INPUT_OUTPUT_REQUIRED;  // the layers' parameters
  }
  static int variadic_min_arity() { return 1; }  // one bias-free layer: its weight alone
  static bool variadic_homogeneous() { return false; }
  static size_t outputs() { return 1; }
  static ONNXTensorElementDataType output(size_t, ONNXTensorElementDataType t) { return t; }
};

// ------------------------------------------------------------------------------------------ the custom op
// A kernel as ONNX Runtime holds it: the kernel object and the API table of the ONNX Runtime that created it, made
// current on the calling thread for each of its calls.
template <class Kernel>
struct Scoped : Kernel {
  const OrtApi* ort_api = nullptr;
  OrtStatusPtr ComputeV2(OrtKernelContext* ctx) {
    const ApiScope scope(ort_api);
    return Kernel::ComputeV2(ctx);
  }
};

// One registered (op, activation dtype, provider) over kernel class `Kernel`. CreateKernelV2 reads and validates
// the attributes once, at session creation (a bad attribute fails the session, not a run).
template <class Kernel>
struct OrtOp : Ort::CustomOpBase<OrtOp<Kernel>, Scoped<Kernel>, true> {
  using Signature = typename Kernel::Signature;

  OrtOp(const char* provider, ONNXTensorElementDataType x_type) : mProvider(provider), mType(x_type) {}

  OrtStatusPtr CreateKernelV2(const OrtApi& table, const OrtKernelInfo* info, void** kernel) const {
    const ApiScope scope(&table);
    auto k = std::make_unique<Scoped<Kernel>>();
    k->ort_api = &table;
    AttrReader reader(Signature::kNAME, info);
    visit_attrs(k->attrs, reader);
    if (!reader.problem().empty()) return error(reader.problem());
    if (auto e = validate_attrs(k->attrs); !e.empty()) return error(e);
    PIMOE_RETURN_IF(k->init(info, mType));
    *kernel = k.release();
    return nullptr;
  }
  const char* GetName() const { return Signature::kNAME; }
  const char* GetExecutionProviderType() const { return mProvider; }
  size_t GetInputTypeCount() const { return Signature::inputs(); }
  ONNXTensorElementDataType GetInputType(size_t i) const { return Signature::input(i, mType); }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const { return Signature::input_kind(i); }
  int GetVariadicInputMinArity() const { return Signature::variadic_min_arity(); }
  bool GetVariadicInputHomogeneity() const { return Signature::variadic_homogeneous(); }
  size_t GetOutputTypeCount() const { return Signature::outputs(); }
  ONNXTensorElementDataType GetOutputType(size_t i) const { return Signature::output(i, mType); }

 private:
  const char* mProvider;
  ONNXTensorElementDataType mType;
};

// The ops a library registers; each add_* appends process-lifetime op objects (they must outlive every session).
using OpList = std::vector<OrtCustomOp*>;
void add_cpu_ops(OpList& ops);                         // pimoe_ort_cpu.cpp
void add_cuda_ops(OpList& ops, const char* provider);  // pimoe_ort_cuda.cpp
// What this library is (library_*.cpp, one per library): the ops it registers and the providers it names.
void library_ops(OpList& ops);
const char* library_providers();

}  // namespace ort
}  // namespace pimoe
