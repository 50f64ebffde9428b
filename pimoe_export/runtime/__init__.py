"""Runtime backends (ONNX Runtime on the CPU is the embedded default). Knows nothing of PyTorch."""
