"""Drivers for tests and benchmarks: the plugin harness (the TensorRT plugin objects without TensorRT, on a GPU or
the emulated GPU). Nothing in the pipeline imports it."""
