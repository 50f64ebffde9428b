"""Shared fixtures and helpers for the test-suite."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # make tests/oracle.py importable as `oracle`

# hypothesis profile: CI runs the stated example counts, deterministic derandomised search
try:
    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "ci", derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
    )
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # pragma: no cover
    pass


@pytest.fixture(autouse=True)
def _deterministic_torch():
    import torch

    torch.manual_seed(0)
    yield



# PIMOE_TESTS_NO_EXPORT=1 (scripts/gpu_check.sh sets it for the GPU tests): any ONNX export (torch.onnx.export, the
# exporter's only entry) raises, in every fixture and test, so a GPU run never depends on the exporter of the GPU
# machine (its torch / onnx-ir versions differ from the ones the exporter is developed on). The dry run of
# gpu_check.sh runs the same test selection with it, which proves the selection export-free.
if os.environ.get("PIMOE_TESTS_NO_EXPORT") == "1":
    import torch.onnx

    def _refuse_export(*args, **kwargs):
        raise RuntimeError("PIMOE_TESTS_NO_EXPORT=1: this test exports ONNX, which the GPU check must not depend on "
                           "(compute what it needs in memory, as tests/test_gpu_layer.py does)")

    torch.onnx.export = _refuse_export
