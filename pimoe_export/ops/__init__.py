"""Op contract v1: schema, torch custom ops, ONNX translations."""
