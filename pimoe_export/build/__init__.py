"""Engine building: TensorRT-side helpers (plugin library location and loading, TensorRT-RTX ahead-of-time builds).

:mod:`pimoe_export.build.tensorrt` never imports torch; TensorRT modules are imported lazily, so importing this
package needs neither TensorRT nor CUDA.
"""
