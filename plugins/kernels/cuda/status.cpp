// Host side of the device status block (see cuda_kernels.h).
#include <cstddef>
#include <sstream>

#include "cuda_kernels.h"

namespace pimoe {
namespace cuda {

cudaError_t clear_status(DeviceStatus* status, cudaStream_t stream) {
  if (status == nullptr) return cudaSuccess;
  constexpr size_t kSlots = offsetof(DeviceStatus, faults);
  if (cudaError_t err = cudaMemsetAsync(status, 0xFF, kSlots, stream); err != cudaSuccess) return err;
  return cudaMemsetAsync(&status->faults, 0, sizeof status->faults, stream);
}

std::string describe_status(const DeviceStatus& status) {
  std::ostringstream os;
  auto index = [](unsigned long long packed) { return static_cast<long long>(packed >> 32); };
  auto value = [](unsigned long long packed) { return static_cast<int>(static_cast<unsigned int>(packed & 0xffffffffu)); };
  if (status.bad_expert_id != kSTATUS_CLEAR)
    os << "PiMoEDispatch: ids (flat index " << index(status.bad_expert_id) << ") holds expert id "
       << value(status.bad_expert_id)
       << " outside [0, num_experts); it was clamped. ids must come from PiMoERoute over the same experts. ";
  if (status.bad_offsets != kSTATUS_CLEAR)
    os << "PiMoEExpertMLP: offsets is not a partition of [0, R) (first inconsistent entry offsets["
       << index(status.bad_offsets) << "] = " << value(status.bad_offsets)
       << "); the output was zeroed. offsets must come from PiMoEDispatch over the same x_sorted. ";
  if (status.bad_flat_to_sorted != kSTATUS_CLEAR)
    os << "PiMoECombine: flat_to_sorted[" << index(status.bad_flat_to_sorted) << "] = "
       << value(status.bad_flat_to_sorted)
       << " is outside [0, N*k); that slot contributed NaN. flat_to_sorted must come from PiMoEDispatch. ";
  if (status.bad_scale != kSTATUS_CLEAR)
    os << "PiMoEExpertMLP: layer " << value(status.bad_scale) / 2 << " "
       << (value(status.bad_scale) % 2 ? "act_smooth" : "w_scale") << "[" << index(status.bad_scale)
       << "] is not a positive finite number; the outputs it touches are NaN or inf. Re-run `pimoe-export quantize`. ";
  std::string text = os.str();
  if (!text.empty() && text.back() == ' ') text.pop_back();
  return text;
}

StatusBlock::~StatusBlock() {
  if (mBlock != nullptr) cudaFree(mBlock);  // at process exit the runtime may be gone: nothing to report then
}

cudaError_t StatusBlock::allocate() {
  if (mBlock != nullptr) return cudaSuccess;
  void* p = nullptr;
  if (cudaError_t err = cudaMalloc(&p, sizeof(DeviceStatus)); err != cudaSuccess) return err;
  DeviceStatus clear{kSTATUS_CLEAR, kSTATUS_CLEAR, kSTATUS_CLEAR, kSTATUS_CLEAR, 0};
  if (cudaError_t err = cudaMemcpy(p, &clear, sizeof clear, cudaMemcpyHostToDevice); err != cudaSuccess) {
    cudaFree(p);
    return err;
  }
  mBlock = static_cast<DeviceStatus*>(p);
  return cudaSuccess;
}

cudaError_t StatusBlock::read(cudaStream_t stream, DeviceStatus* out, bool clear) {
  if (mBlock == nullptr) return cudaErrorInvalidValue;
  cudaError_t err = cudaMemcpyAsync(out, mBlock, sizeof *out, cudaMemcpyDeviceToHost, stream);
  if (err == cudaSuccess && clear) err = clear_status(mBlock, stream);
  if (err == cudaSuccess) err = cudaStreamSynchronize(stream);
  return err;
}

std::string StatusBlock::teardown_report() {
  if (mBlock == nullptr) return {};
  DeviceStatus host{};
  if (cudaMemcpy(&host, mBlock, sizeof host, cudaMemcpyDeviceToHost) != cudaSuccess) {
    cudaGetLastError();  // a runtime shutting down: not this library's error to keep
    return {};
  }
  if (host.faults == 0) return {};
  std::ostringstream os;
  os << host.faults << " inconsistent input entr" << (host.faults == 1 ? "y" : "ies")
     << " met since creation (the outputs they touched are clamped, zero or NaN); lowest offenders: "
     << describe_status(host);
  return os.str();
}

}  // namespace cuda
}  // namespace pimoe
