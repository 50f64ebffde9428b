// Host side of the device status block (see cuda_kernels.h).
#include <sstream>

#include "cuda_kernels.h"

namespace pimoe {
namespace cuda {

cudaError_t clear_status(DeviceStatus* status, cudaStream_t stream) {
  if (status == nullptr) return cudaSuccess;
  return cudaMemsetAsync(status, 0xFF, sizeof(DeviceStatus), stream);
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

}  // namespace cuda
}  // namespace pimoe
