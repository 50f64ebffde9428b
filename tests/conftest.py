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


def pytest_report_header(config) -> list[str]:
    """Say which CPU kernel sets the ONNX Runtime op tests run here (tests/cpu_kernel_sets.py): native or SIMDe."""
    from cpu_kernel_sets import DESCRIPTION, default_kernel_set, other_kernel_sets

    own = default_kernel_set()
    others = ", ".join(DESCRIPTION[s] for s in other_kernel_sets()) or "none"
    return [f"pimoe CPU kernels: {DESCRIPTION.get(own, own)} in this process; in subprocesses: {others}"]
