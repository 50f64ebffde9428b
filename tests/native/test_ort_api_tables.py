"""Each kernel of the pimoe ONNX Runtime libraries calls back into the ONNX Runtime that created it.

A process can hold two ONNX Runtime copies that both register the same library: onnxruntime's Python module and
onnxruntime-genai's own libonnxruntime (the GenAI client and the generation benchmark do exactly that). The library
used to keep one global API table, the one its last RegisterCustomOps received, so the kernels of the first copy's
sessions called into the second copy's functions: harmless while both are the same release, undefined (a crash at
best) otherwise. Here a second "ONNX Runtime" registers the library with a table whose every function counts its
calls and fails; sessions of the real ONNX Runtime, created before and after that registration, must still run and
give the same bits, without one call into the stand-in table. The whole check runs in a child process, so a library
that does call the stand-in fails this test with its exit status instead of taking the test run down.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pimoe_export.errors import PluginLoadError
from pimoe_export.native.libraries import find_ort_cuda_library, find_ort_library

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "contract_v1"

CHILD = r"""
import ctypes, sys
import numpy as np
import onnxruntime as ort

library, fixture = sys.argv[1], sys.argv[2]
recordings = np.load(fixture + "/recordings.npz")

def options():
    o = ort.SessionOptions()
    o.register_custom_ops_library(library)  # RegisterCustomOps runs here, with the real ONNX Runtime's table
    return o

def session(graph, o=None):
    return ort.InferenceSession(f"{fixture}/tiny_{graph}.onnx", o or options(), providers=["CPUExecutionProvider"])

def run(s, graph):
    return s.run(None, {"hidden_states": recordings[f"{graph}/x"]})

graphs = ("fp32", "w8a8")
before = {g: session(g) for g in graphs}
want = {g: run(before[g], g) for g in graphs}
registered_before = {g: options() for g in graphs}  # sessions to create after the stand-in has registered

calls = [0]
@ctypes.CFUNCTYPE(ctypes.c_void_p)
def stand_in():  # every function of the stand-in table: counts the call, returns a non-null "status"
    calls[0] += 1
    return 1

table = (ctypes.c_void_p * 2048)(*([ctypes.cast(stand_in, ctypes.c_void_p)] * 2048))
GetApi = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_uint32)(lambda version: ctypes.addressof(table))
Version = ctypes.CFUNCTYPE(ctypes.c_char_p)(lambda: b"stand-in")

class OrtApiBase(ctypes.Structure):
    _fields_ = [("GetApi", type(GetApi)), ("GetVersionString", type(Version))]

base = OrtApiBase(GetApi, Version)
lib = ctypes.CDLL(library)  # the instance ONNX Runtime loaded: the same path
lib.RegisterCustomOps.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
lib.RegisterCustomOps.restype = ctypes.c_void_p
status = lib.RegisterCustomOps(None, ctypes.byref(base))
assert status, "the stand-in table's failure did not come back from RegisterCustomOps"
registered = calls[0]
assert registered >= 1, "RegisterCustomOps did not use the table it was given"

# no registration with the real table from here on: the sessions made before run again, then sessions whose options
# registered the library before the stand-in did are created (attributes read, weights packed) and run
for g in graphs:
    got = run(before[g], g)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(got, want[g])), g
for g in graphs:
    got = run(session(g, registered_before[g]), g)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(got, want[g])), g
assert calls[0] == registered, f"the kernels made {calls[0] - registered} calls into the other ONNX Runtime's table"
print("ok")
"""


def libraries() -> list[tuple[str, Path | None, str]]:
    """(name, path or None, why it is missing): the CPU library, and the CUDA kernels on the emulated GPU (registered
    for the CPU provider, so they run here)."""
    found: list[tuple[str, Path | None, str]] = []
    for name, finder in (("libpimoe_ort", find_ort_library),
                         ("libpimoe_ort_cuda_emu", lambda: find_ort_cuda_library(emulated=True))):
        try:
            found.append((name, finder(), ""))
        except PluginLoadError as exc:
            found.append((name, None, str(exc)))
    return found


@pytest.mark.parametrize(("name", "path", "missing"), libraries(), ids=lambda v: v if isinstance(v, str) else "")
def test_kernels_call_the_onnx_runtime_that_created_them(name, path, missing) -> None:
    if path is None:
        pytest.skip(f"{name} is not built: {missing}")
    done = subprocess.run([sys.executable, "-c", CHILD, str(path), str(FIXTURE)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), (
        f"{name}: exit status {done.returncode}\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
