"""The GPU of this machine, as the manifests name it ("sm_XY"), without CUDA or TensorRT."""

from __future__ import annotations

import subprocess


def local_gpu_sm() -> str | None:
    """The first GPU's compute capability as "sm_XY" (nvidia-smi), or None without a GPU/driver."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20, check=True).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    if not out:
        return None
    major, _, minor = out[0].strip().partition(".")
    return f"sm_{major}{minor}" if major.isdigit() else None
