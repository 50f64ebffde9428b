#include "pimoePluginCommon.h"

#include "pimoePlugin.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "pimoe_contract.h"

namespace pimoe {
namespace trt {

// ------------------------------------------------------------------------------------------ logging / errors
namespace {

int32_t threshold_from_env() {
  const char* value = std::getenv("PIMOE_TRT_LOG");
  if (value == nullptr) return static_cast<int32_t>(LogLevel::kWARNING);
  if (std::strcmp(value, "off") == 0) return -1;
  if (std::strcmp(value, "error") == 0) return static_cast<int32_t>(LogLevel::kERROR);
  if (std::strcmp(value, "info") == 0) return static_cast<int32_t>(LogLevel::kINFO);
  if (std::strcmp(value, "verbose") == 0) return static_cast<int32_t>(LogLevel::kVERBOSE);
  return static_cast<int32_t>(LogLevel::kWARNING);
}

int32_t threshold() {
  static const int32_t value = threshold_from_env();
  return value;
}

const char* level_name(LogLevel level) {
  switch (level) {
    case LogLevel::kERROR: return "ERROR";
    case LogLevel::kWARNING: return "WARNING";
    case LogLevel::kINFO: return "INFO";
    default: return "VERBOSE";
  }
}

thread_local std::string t_last_error;

}  // namespace

void log(LogLevel level, const std::string& text) noexcept {
  if (static_cast<int32_t>(level) > threshold()) return;
  std::fprintf(stderr, "[pimoe-trt] %s: %s\n", level_name(level), text.c_str());
  std::fflush(stderr);
}

int32_t fail(const char* text) noexcept {
  try {
    t_last_error = text;
  } catch (...) {  // out of memory: keep the previous message
  }
  if (threshold() >= static_cast<int32_t>(LogLevel::kERROR)) {
    std::fprintf(stderr, "[pimoe-trt] ERROR: %s\n", text);
    std::fflush(stderr);
  }
  return -1;
}

int32_t fail(const std::string& text) noexcept { return fail(text.c_str()); }

const char* last_error() noexcept { return t_last_error.c_str(); }

void clear_last_error() noexcept { t_last_error.clear(); }

// ------------------------------------------------------------------------------------------ dtypes / dims
const char* dtype_name(DataType type) noexcept {
  switch (type) {
    case DataType::kFLOAT: return "float32";
    case DataType::kHALF: return "float16";
    case DataType::kINT8: return "int8";
    case DataType::kINT32: return "int32";
    case DataType::kBOOL: return "bool";
    case DataType::kUINT8: return "uint8";
    case DataType::kFP8: return "fp8";
    case DataType::kBF16: return "bfloat16";
    case DataType::kINT64: return "int64";
    default: return "another type";
  }
}

bool is_float_io(DataType type) noexcept { return type == DataType::kFLOAT || type == DataType::kHALF; }

cuda::DType to_cuda(DataType type) noexcept {
  return type == DataType::kHALF ? cuda::DType::kF16 : type == DataType::kINT8 ? cuda::DType::kI8 : cuda::DType::kF32;
}

Dims to_dims(const nvinfer1::Dims& dims) {
  Dims out;
  const int32_t rank = dims.nbDims < 0 ? 0 : (dims.nbDims > nvinfer1::Dims::MAX_DIMS ? nvinfer1::Dims::MAX_DIMS : dims.nbDims);
  for (int32_t i = 0; i < rank; ++i) out.push_back(dims.d[i]);
  return out;
}

std::vector<TensorInfo> tensor_infos(const DynamicPluginTensorDesc* desc, int32_t count) {
  std::vector<TensorInfo> out;
  for (int32_t i = 0; desc != nullptr && i < count; ++i) out.push_back({to_dims(desc[i].max), desc[i].desc.type});
  return out;
}

std::vector<TensorInfo> tensor_infos(const PluginTensorDesc* desc, int32_t count) {
  std::vector<TensorInfo> out;
  for (int32_t i = 0; desc != nullptr && i < count; ++i) out.push_back({to_dims(desc[i].dims), desc[i].type});
  return out;
}

std::string require_type(const char* op, const char* what, DataType got, std::initializer_list<DataType> allowed) {
  for (DataType t : allowed)
    if (t == got) return {};
  std::string names;
  for (DataType t : allowed) names += (names.empty() ? "" : " or ") + std::string(dtype_name(t));
  return msg(op, ": ", what, " must be ", names, ", got ", dtype_name(got));
}

// ------------------------------------------------------------------------------------------ FieldReader
const PluginField* FieldReader::find(const char* name) {
  bool seen = false;
  for (const char* v : mVisited) seen = seen || std::strcmp(v, name) == 0;
  if (!seen) mVisited.push_back(name);
  if (mFields == nullptr || mFields->fields == nullptr) return nullptr;
  for (int32_t i = 0; i < mFields->nbFields; ++i) {
    const PluginField& f = mFields->fields[i];
    if (f.name != nullptr && std::strcmp(f.name, name) == 0) return &f;
  }
  return nullptr;
}

void FieldReader::set_problem(const std::string& text) {
  if (mProblem.empty()) mProblem = msg(mOp, ": ", text);
}

namespace {

bool read_integer(const PluginField& f, int32_t index, int64_t* out) {
  switch (f.type) {
    case PluginFieldType::kINT32: *out = static_cast<const int32_t*>(f.data)[index]; return true;
    case PluginFieldType::kINT64: *out = static_cast<const int64_t*>(f.data)[index]; return true;
    case PluginFieldType::kINT16: *out = static_cast<const int16_t*>(f.data)[index]; return true;
    case PluginFieldType::kINT8: *out = static_cast<const int8_t*>(f.data)[index]; return true;
    default: return false;
  }
}

bool read_real(const PluginField& f, int32_t index, float* out) {
  switch (f.type) {
    case PluginFieldType::kFLOAT32: *out = static_cast<const float*>(f.data)[index]; return true;
    case PluginFieldType::kFLOAT64: *out = static_cast<float>(static_cast<const double*>(f.data)[index]); return true;
    default: return false;
  }
}

}  // namespace

int64_t FieldReader::get_int(const char* name, int64_t fallback, bool required) {
  const PluginField* f = find(name);
  if (f == nullptr) {
    if (required) set_problem(msg("missing required field '", name, "' (int)"));
    return fallback;
  }
  int64_t value = 0;
  if (f->length != 1 || f->data == nullptr || !read_integer(*f, 0, &value)) {
    set_problem(msg("field '", name, "' must hold one integer (kINT32 or kINT64), got type ",
                    static_cast<int32_t>(f->type), " with length ", f->length));
    return fallback;
  }
  return value;
}

std::vector<int64_t> FieldReader::get_ints(const char* name, bool required) {
  const PluginField* f = find(name);
  std::vector<int64_t> values;
  if (f == nullptr) {
    if (required) set_problem(msg("missing required field '", name, "' (list of ints)"));
    return values;
  }
  if (f->length < 0 || (f->length > 0 && f->data == nullptr)) {
    set_problem(msg("field '", name, "' has length ", f->length, " but no data"));
    return values;
  }
  for (int32_t i = 0; i < f->length; ++i) {
    int64_t v = 0;
    if (!read_integer(*f, i, &v)) {
      set_problem(msg("field '", name, "' must be a list of integers (kINT32 or kINT64), got type ",
                      static_cast<int32_t>(f->type)));
      return {};
    }
    values.push_back(v);
  }
  return values;
}

float FieldReader::get_float(const char* name, float fallback) {
  const PluginField* f = find(name);
  if (f == nullptr) return fallback;
  float value = 0.0f;
  if (f->length != 1 || f->data == nullptr || !read_real(*f, 0, &value)) {
    set_problem(msg("field '", name, "' must hold one float (kFLOAT32), got type ", static_cast<int32_t>(f->type),
                    " with length ", f->length));
    return fallback;
  }
  return value;
}

std::vector<float> FieldReader::get_floats(const char* name) {
  const PluginField* f = find(name);
  std::vector<float> values;
  if (f == nullptr) return values;
  if (f->length < 0 || (f->length > 0 && f->data == nullptr)) {
    set_problem(msg("field '", name, "' has length ", f->length, " but no data"));
    return values;
  }
  for (int32_t i = 0; i < f->length; ++i) {
    float v = 0.0f;
    if (!read_real(*f, i, &v)) {
      set_problem(msg("field '", name, "' must be a list of floats (kFLOAT32), got type ",
                      static_cast<int32_t>(f->type)));
      return {};
    }
    values.push_back(v);
  }
  return values;
}

std::string FieldReader::get_string(const char* name, const std::string& fallback) {
  const PluginField* f = find(name);
  if (f == nullptr) return fallback;
  if (f->type != PluginFieldType::kCHAR || f->length < 0 || (f->length > 0 && f->data == nullptr)) {
    set_problem(msg("field '", name, "' must be a string (kCHAR), got type ", static_cast<int32_t>(f->type)));
    return fallback;
  }
  const char* text = static_cast<const char*>(f->data);
  return std::string(text, text == nullptr ? 0 : strnlen(text, static_cast<size_t>(f->length)));
}

void FieldReader::flag(const char* name, bool& member) {
  const int64_t value = get_int(name, member ? 1 : 0, false);
  if (auto e = parse_flag(mOp, name, value, &member); !e.empty() && mProblem.empty()) mProblem = e;
}

bool FieldReader::read_choice(const char* name, const char* const* names, int32_t count, int32_t* value) {
  if (find(name) == nullptr) return false;
  const std::string text = get_string(name, names[*value]);
  if (!mProblem.empty()) return false;
  if (!parse_enum(text.c_str(), names, count, value)) {
    set_problem(msg("unknown ", name, " '", text, "'; expected one of ", enum_choices(names, count)));
    return false;
  }
  return true;
}

void FieldReader::warn_unknown() const {
  if (mFields == nullptr || mFields->fields == nullptr) return;
  for (int32_t i = 0; i < mFields->nbFields; ++i) {
    const char* name = mFields->fields[i].name;
    bool found = false;
    for (const char* k : mVisited) found = found || (name != nullptr && std::strcmp(name, k) == 0);
    if (!found) log(LogLevel::kWARNING, msg(mOp, ": ignoring unknown plugin field '", name ? name : "(null)", "'"));
  }
}

// ------------------------------------------------------------------------------------------ FieldWriter
void FieldWriter::clear() {
  mInts.clear();
  mFloats.clear();
  mStrings.clear();
  mFields.clear();
}

// Values are stored first and the PluginField pointers are set in collection(), after every vector has its
// final size (pointers into a growing vector would dangle).
void FieldWriter::add_int(const char* name, int64_t value) { add_ints(name, {value}); }

void FieldWriter::add_ints(const char* name, const std::vector<int64_t>& values) {
  std::vector<int32_t> narrow;
  for (int64_t v : values) narrow.push_back(static_cast<int32_t>(v));
  mInts.push_back(std::move(narrow));
  mFields.emplace_back(name, nullptr, PluginFieldType::kINT32, static_cast<int32_t>(values.size()));
}

void FieldWriter::add_float(const char* name, float value) { add_floats(name, {value}); }

void FieldWriter::add_floats(const char* name, const std::vector<float>& values) {
  mFloats.push_back(values);
  mFields.emplace_back(name, nullptr, PluginFieldType::kFLOAT32, static_cast<int32_t>(values.size()));
}

void FieldWriter::add_string(const char* name, const std::string& value) {
  mStrings.push_back(value);
  mFields.emplace_back(name, nullptr, PluginFieldType::kCHAR, static_cast<int32_t>(value.size() + 1));
}

const PluginFieldCollection* FieldWriter::collection() {
  size_t ints = 0, floats = 0, strings = 0;
  for (PluginField& f : mFields) {
    if (f.type == PluginFieldType::kINT32) f.data = mInts[ints++].data();
    else if (f.type == PluginFieldType::kFLOAT32) f.data = mFloats[floats++].data();
    else f.data = mStrings[strings++].c_str();
  }
  mCollection.nbFields = static_cast<int32_t>(mFields.size());
  mCollection.fields = mFields.data();
  return &mCollection;
}

void FieldDeclarations::add(const char* name, PluginFieldType type, int32_t length) {
  mFields.emplace_back(name, nullptr, type, length);
}

const PluginFieldCollection* FieldDeclarations::collection() {
  mCollection.nbFields = static_cast<int32_t>(mFields.size());
  mCollection.fields = mFields.data();
  return &mCollection;
}

// ------------------------------------------------------------------------------------------ Plugin<Op> helpers
RunTensor run_tensor(const PluginTensorDesc& desc) noexcept {
  RunTensor t;
  t.dims = desc.dims;
  t.type = desc.type;
  int64_t elements = 1;
  for (int32_t i = 0; i < desc.dims.nbDims && i < nvinfer1::Dims64::MAX_DIMS; ++i) elements *= desc.dims.d[i];
  t.empty = elements <= 0;
  return t;
}

bool same_tensor(const PluginTensorDesc& desc, const RunTensor& t) noexcept {
  if (desc.type != t.type || desc.dims.nbDims != t.dims.nbDims) return false;
  for (int32_t i = 0; i < desc.dims.nbDims && i < nvinfer1::Dims64::MAX_DIMS; ++i)
    if (desc.dims.d[i] != t.dims.d[i]) return false;
  return true;
}

// ------------------------------------------------------------------------------------------ PluginBase
PluginBase::~PluginBase() {
  if (!mAttached) return;
  try {
    const std::string report = mStatus.teardown_report();
    if (!report.empty()) log(LogLevel::kWARNING, msg(mName, ": ", report));
  } catch (...) {  // out of host memory at teardown: nothing more to say
  }
}

nvinfer1::IPluginCapability* PluginBase::getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept {
  switch (type) {
    case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
    case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
    case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
  }
  return nullptr;
}

const char* PluginBase::getPluginVersion() const noexcept { return contract::kPLUGIN_VERSION; }
const char* PluginBase::getPluginNamespace() const noexcept { return contract::kPLUGIN_NAMESPACE; }

nvinfer1::IPluginV3* PluginBase::attachToContext(nvinfer1::IPluginResourceContext*) noexcept {
  nvinfer1::IPluginV3* copy = clone();
  if (copy == nullptr) return nullptr;
  // clone() returns a Plugin<Op>, which is a PluginBase; the status block is allocated here, once per execution
  // context, so that enqueue never allocates (a failure, e.g. no GPU, is reported by enqueue)
  auto* attached = static_cast<PluginBase*>(copy);
  attached->mAttached = true;
  attached->ensure_status();
  return copy;
}

void PluginBase::ensure_status() noexcept {
  if (mStatus.get() != nullptr) return;
  const cudaError_t err = mStatus.allocate();
  if (err != cudaSuccess) {
    cudaGetLastError();  // not sticky: the next attempt (or enqueue's report) starts clean
    mStatusError = cudaGetErrorString(err);
  }
}

int32_t PluginBase::read_status(cudaStream_t stream, cuda::DeviceStatus* out, bool clear) noexcept {
  if (mStatus.get() == nullptr) return fail(msg(mName, ": ", mStatusError));
  const cudaError_t err = mStatus.read(stream, out, clear);
  if (err != cudaSuccess) return fail(msg(mName, ": reading the device status: ", cudaGetErrorString(err)));
  return kOK;
}

int32_t PluginBase::finish_enqueue(cudaError_t launch, cudaStream_t stream) noexcept {
  try {
    if (launch != cudaSuccess) return fail(msg(mName, ": kernel launch failed: ", cudaGetErrorString(launch)));
    static const bool sync_check = [] {
      const char* v = std::getenv("PIMOE_TRT_SYNC_CHECK");
      return v != nullptr && std::strcmp(v, "1") == 0;
    }();
    if (!sync_check) return kOK;
    cuda::DeviceStatus host{};
    const cudaError_t err = mStatus.read(stream, &host, true);
    if (err != cudaSuccess) return fail(msg(mName, ": PIMOE_TRT_SYNC_CHECK: ", cudaGetErrorString(err)));
    const std::string problem = cuda::describe_status(host);
    if (!problem.empty()) return fail(problem);
    return kOK;
  } catch (...) {
    return fail("pimoe TensorRT plugin: out of host memory");
  }
}

const char* CreatorBase::getPluginVersion() const noexcept { return contract::kPLUGIN_VERSION; }
const char* CreatorBase::getPluginNamespace() const noexcept { return contract::kPLUGIN_NAMESPACE; }

}  // namespace trt
}  // namespace pimoe
