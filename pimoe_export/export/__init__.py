"""torch -> ONNX export (custom-op graph and standard-op graph)."""
