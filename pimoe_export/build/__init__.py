"""Building deployable units: ONNX Runtime units (the graph + our op library) and TensorRT / TensorRT-RTX engine
units (the engine built here + our plugin library), each with its manifest.

Reading and verifying units lives in :mod:`pimoe_export.artifacts`, which the runtime uses too; nothing here is
imported by the runtime.
"""
