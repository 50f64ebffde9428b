/* C ABI of libpimoe_trt_harness.so: drives the pimoe TensorRT plugin objects on a CUDA GPU WITHOUT TensorRT.
 *
 * For one op, pimoe_harness_prepare() does what a TensorRT build + deserialisation would do:
 *   creator->createPlugin(fields, kBUILD) -> getOutputDataTypes -> getOutputShapes (through a small IExprBuilder of
 *   our own for constant dims) -> supportsFormatCombination for every position -> configurePlugin ->
 *   getWorkspaceSize -> getFieldsToSerialize -> creator->createPlugin(serialised fields, kRUNTIME) ->
 *   attachToContext -> onShapeChange
 * and pimoe_harness_enqueue() calls IPluginV3OneRuntime::enqueue on caller-owned device pointers and stream.
 * Every function returns 0 on success and -1 on failure; pimoe_harness_last_error() then names the problem.
 * Used by tests/gpu_harness.py (ctypes) and scripts/bench_gpu.py.
 */
#ifndef PIMOE_HARNESS_H
#define PIMOE_HARNESS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* One plugin field; `type` is nvinfer1::PluginFieldType (kINT32 = 5, kFLOAT32 = 1, kCHAR = 6, kINT64 = 10). */
typedef struct PimoeField {
  const char* name;
  const void* data;
  int32_t type;
  int32_t length;
} PimoeField;

/* One tensor description; `dtype` is nvinfer1::DataType (kFLOAT = 0, kHALF = 1, kINT8 = 2, kINT32 = 3). */
typedef struct PimoeTensorDesc {
  int32_t dtype;
  int32_t rank;
  int64_t dims[8];
} PimoeTensorDesc;

typedef struct PimoeHarnessPlugin PimoeHarnessPlugin;

int pimoe_harness_contract_version(void);
const char* pimoe_harness_last_error(void);

/* Builds the plugin for the given inputs (see above). On success *out owns the plugin pair. */
int pimoe_harness_prepare(const char* op, const PimoeField* fields, int32_t nb_fields, const PimoeTensorDesc* inputs,
                          int32_t nb_inputs, PimoeHarnessPlugin** out);
int pimoe_harness_num_outputs(const PimoeHarnessPlugin* plugin);
int pimoe_harness_output_desc(const PimoeHarnessPlugin* plugin, int32_t index, PimoeTensorDesc* desc);
size_t pimoe_harness_workspace_size(const PimoeHarnessPlugin* plugin);
/* inputs/outputs: device pointers in op order; workspace: >= pimoe_harness_workspace_size bytes of device memory
 * (256-byte aligned); stream: a cudaStream_t (0 = legacy default stream). Only enqueues: call
 * pimoe_harness_check_status after synchronising, or use it to synchronise. */
int pimoe_harness_enqueue(PimoeHarnessPlugin* plugin, const void* const* inputs, void* const* outputs,
                          void* workspace, void* stream);
/* Synchronises `stream`, reads the device status block at the start of `workspace`: 0 = clean, 1 = the kernels
 * met inconsistent input data (message in pimoe_harness_last_error), -1 = CUDA error. */
int pimoe_harness_check_status(void* workspace, void* stream);
void pimoe_harness_release(PimoeHarnessPlugin* plugin);

#ifdef __cplusplus
}
#endif

#endif /* PIMOE_HARNESS_H */
