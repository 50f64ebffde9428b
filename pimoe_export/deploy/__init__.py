"""Producing deployable artefacts: units (ONNX Runtime packages, TensorRT engines) and Triton repositories.

Reading and verifying what these write lives in :mod:`pimoe_export.artefacts`, which both this package and the
runtime use; nothing here is imported by the runtime.
"""
