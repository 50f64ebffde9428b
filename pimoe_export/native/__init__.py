"""The native backends of this machine: our compiled libraries (found and checked with ctypes), the ONNX Runtime
and TensorRT modules (imported on first use), TensorRT's plugin registry and the local GPU. Torch-free.
"""
