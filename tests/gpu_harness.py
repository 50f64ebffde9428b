"""GPU harness backend placeholder: replaced by the plugins/harness driver (TensorRT plugin issue)."""

from __future__ import annotations


def harness_backend_or_skip():
    return None
