/* C ABI of libpimoe_trt_harness.so (CUDA GPU) and libpimoe_trt_harness_emu.so (the same sources built against the
 * CPU CUDA emulator of plugins/emu): drives the pimoe TensorRT plugin objects WITHOUT TensorRT, in the order
 * TensorRT's builder and runtime call them.
 *
 * Build (pimoe_harness_prepare_profile), for an optimisation profile (min, opt, max shapes of every input):
 *   creator->createPlugin(fields, kBUILD) -> getOutputDataTypes -> getOutputShapes (dimensions that differ between
 *   min and max are symbolic expressions, as in TensorRT) -> supportsFormatCombination for every position ->
 *   configurePlugin (desc.dims -1 where dynamic, min/opt/max) -> getWorkspaceSize (sized for the profile) ->
 *   getFieldsToSerialize -> creator->createPlugin(serialised fields, kRUNTIME) -> attachToContext
 * Run, as often as wanted with shapes inside the profile:
 *   pimoe_harness_set_input_shapes (output shapes evaluated from the build-time expressions, onShapeChange) ->
 *   pimoe_harness_enqueue (IPluginV3OneRuntime::enqueue on caller-owned device pointers, stream and a workspace of
 *   pimoe_harness_workspace_size bytes: the size TensorRT would hand over for the profile).
 * pimoe_harness_prepare is the one-shape form (min = opt = max = the given shapes, shapes already set).
 *
 * Every function returns 0 on success and -1 on failure; pimoe_harness_last_error() then names the problem.
 * Used by pimoe_export.harness (ctypes), the tests and scripts/bench_gpu.py.
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

/* One tensor description; `dtype` is nvinfer1::DataType (kFLOAT = 0, kHALF = 1, kINT8 = 2, kINT32 = 3). In output
 * descriptions of a plugin whose shapes have not been set, a dimension that depends on the run shapes is -1. */
typedef struct PimoeTensorDesc {
  int32_t dtype;
  int32_t rank;
  int64_t dims[8];
} PimoeTensorDesc;

typedef struct PimoeHarnessPlugin PimoeHarnessPlugin;

int pimoe_harness_contract_version(void);
/* 1 for the emulated build (plugins/emu: device memory is host memory), 0 for the CUDA build. */
int pimoe_harness_is_emulated(void);
const char* pimoe_harness_last_error(void);

/* Builds the plugin for one optimisation profile: min/opt/max hold nb_inputs descriptions with equal dtypes and
 * ranks, min <= opt <= max in every dimension. On success *out owns the plugin pair. */
int pimoe_harness_prepare_profile(const char* op, const PimoeField* fields, int32_t nb_fields,
                                  const PimoeTensorDesc* min, const PimoeTensorDesc* opt, const PimoeTensorDesc* max,
                                  int32_t nb_inputs, PimoeHarnessPlugin** out);
/* The one-shape profile: prepare_profile(inputs, inputs, inputs) followed by set_input_shapes(inputs). */
int pimoe_harness_prepare(const char* op, const PimoeField* fields, int32_t nb_fields, const PimoeTensorDesc* inputs,
                          int32_t nb_inputs, PimoeHarnessPlugin** out);
/* Run shapes (inside the profile; dtypes and ranks as built): evaluates the output shapes and calls onShapeChange. */
int pimoe_harness_set_input_shapes(PimoeHarnessPlugin* plugin, const PimoeTensorDesc* inputs, int32_t nb_inputs);
int pimoe_harness_num_outputs(const PimoeHarnessPlugin* plugin);
int pimoe_harness_output_desc(const PimoeHarnessPlugin* plugin, int32_t index, PimoeTensorDesc* desc);
/* getWorkspaceSize at build time, for the profile (covers every run shape inside it). */
size_t pimoe_harness_workspace_size(const PimoeHarnessPlugin* plugin);
/* inputs/outputs: device pointers in op order; workspace: >= pimoe_harness_workspace_size bytes of device memory
 * (256-byte aligned; may be null when that size is 0); stream: a cudaStream_t (0 = legacy default stream). Only
 * enqueues: call pimoe_harness_check_status to synchronise and read what the kernels recorded. */
int pimoe_harness_enqueue(PimoeHarnessPlugin* plugin, const void* const* inputs, void* const* outputs,
                          void* workspace, void* stream);
/* Synchronises `stream`, reads and clears the plugin's device status block (it persists across enqueues: the
 * kernels record inconsistent input data there): 0 = clean, 1 = the kernels met inconsistent input data since the
 * last check (message in pimoe_harness_last_error), -1 = CUDA error. */
int pimoe_harness_check_status(PimoeHarnessPlugin* plugin, void* stream);
/* Releases the plugin pair. The attached plugin's destructor logs, on stderr, a warning naming the inconsistent
 * input data its kernels met and nobody checked (what a TensorRT user sees at teardown). */
void pimoe_harness_release(PimoeHarnessPlugin* plugin);

/* Test aid: pimoe_harness_enqueue, and in *allocations the number of heap allocations (malloc, calloc, realloc,
 * posix_memalign, aligned_alloc, memalign) the calling thread made during it. Needs the counting allocator
 * libpimoe_alloc_counter.so (built next to the harness) preloaded with LD_PRELOAD; -1 and an error without it. */
int pimoe_harness_enqueue_counting_allocations(PimoeHarnessPlugin* plugin, const void* const* inputs,
                                               void* const* outputs, void* workspace, void* stream,
                                               long long* allocations);

/* Emulated build: the number of errors and warnings the emulator reported (on stderr, with source lines: races on
 * barriers, bad warp collectives, misaligned WMMA, ...) since the previous call, after which a sticky launch error is
 * cleared (as destroying the CUDA context would) so that later runs start clean. CUDA build: always 0. */
int pimoe_harness_emulator_diagnostics(void);

/* Device memory of the build's CUDA runtime (cudaMalloc/cudaFree/cudaMemcpy; the emulator's in the emulated build,
 * where a buffer is a heap block of exactly `bytes` bytes, filled with 0xFF). direction: 1 = host to device,
 * 2 = device to host, 3 = device to device. */
int pimoe_harness_device_alloc(size_t bytes, void** ptr);
int pimoe_harness_device_free(void* ptr);
int pimoe_harness_copy(void* dst, const void* src, size_t bytes, int32_t direction);

#ifdef __cplusplus
}
#endif

#endif /* PIMOE_HARNESS_H */
