"""The Python driver of the plugin harness (pimoe_export.testing.harness) on the emulated GPU: device memory round
trips for bytes and arrays, the guard-byte setting every session's buffers get, and the errors it raises."""

from __future__ import annotations

import numpy as np
import pytest

from pimoe_export.testing.harness import GUARD_ENV, Harness, HarnessError, find_harness, guard_bytes


@pytest.fixture(scope="module")
def harness() -> Harness:
    path = find_harness(emulated=True)
    if path is None:
        pytest.skip("the emulated harness is not built")
    return Harness(path)


@pytest.mark.parametrize("data", [b"\x00\x01\xfe\xff" * 9, np.arange(12, dtype=np.float32),
                                  np.arange(24, dtype=np.int16).reshape(4, 6)[:, ::2]])
def test_device_memory_round_trips_bytes_and_arrays(harness, data) -> None:
    expected = np.frombuffer(data, np.uint8) if isinstance(data, bytes) else np.ascontiguousarray(data).view(np.uint8)
    ptr = harness.alloc(expected.nbytes)
    try:
        harness.upload(ptr, data)
        np.testing.assert_array_equal(harness.download(ptr, expected.nbytes).reshape(-1), expected.reshape(-1))
    finally:
        harness.free(ptr)
    harness.free(0)  # nothing to free
    assert harness.download(ptr, 0).size == 0


@pytest.mark.parametrize(("value", "expected"), [(None, 256), ("0", 0), ("512", 512), ("4096", 4096)])
def test_guard_bytes_accepted(monkeypatch, value, expected) -> None:
    if value is None:
        monkeypatch.delenv(GUARD_ENV, raising=False)
    else:
        monkeypatch.setenv(GUARD_ENV, value)
    assert guard_bytes() == expected


@pytest.mark.parametrize(("value", "message"), [
    ("-256", f"{GUARD_ENV}=-256 must be a non-negative multiple of 256"),
    ("100", f"{GUARD_ENV}=100 must be a non-negative multiple of 256"),
    ("-100", f"{GUARD_ENV}=-100 must be a non-negative multiple of 256"),
    ("lots", f"{GUARD_ENV}='lots' is not a number of bytes"),
])
def test_guard_bytes_refused(monkeypatch, value, message) -> None:
    monkeypatch.setenv(GUARD_ENV, value)
    with pytest.raises(HarnessError) as info:
        guard_bytes()
    assert str(info.value) == message


def test_the_default_harness_is_the_gpu_build_never_the_emulator(monkeypatch, tmp_path) -> None:
    """find_harness() is the CUDA build the GPU tests run; the emulated one only when asked for. With both named
    by their environment variables, each call gets its own."""
    from pimoe_export.native import libraries as L

    gpu, emu = tmp_path / "gpu.so", tmp_path / "emu.so"
    gpu.write_bytes(b"x")
    emu.write_bytes(b"x")
    monkeypatch.setenv(L.HARNESS_LIBRARY_ENV, str(gpu))
    monkeypatch.setenv(L.EMU_HARNESS_LIBRARY_ENV, str(emu))
    assert (find_harness(), find_harness(emulated=True)) == (gpu, emu)
    gpu.unlink()
    assert find_harness() is None and find_harness(emulated=True) == emu  # no fallback to the emulator


# ------------------------------------------------------------------------------------------ memory checks
def _combine_session(harness: Harness):
    """A PiMoECombine plugin session (N = 6 tokens, k = 2, H = 8, fp32) and its arrays."""
    from pimoe_export.ops import schema
    from pimoe_export.testing.harness import PluginProfile, PluginSession

    rng = np.random.default_rng(0)
    arrays = [rng.normal(size=(12, 8)).astype(np.float32), rng.permutation(12).astype(np.int32),
              rng.random(size=(6, 2)).astype(np.float32)]
    session = PluginSession(harness, schema.COMBINE, {}, PluginProfile.fixed([(a.shape, a.dtype) for a in arrays]))
    return session, arrays


#: where the stray byte goes -> what the harness says
STRAY = {
    "after output 0": r"PiMoECombine: a kernel wrote outside output 0 \(192 bytes\)",
    "before output 0": r"PiMoECombine: a kernel wrote outside output 0 \(192 bytes\)",
    "before the workspace": r"PiMoECombine: a kernel wrote outside its workspace \(\d+ bytes, the build-time "
                            r"getWorkspaceSize of the profile\)",
    "after the workspace": r"PiMoECombine: a kernel wrote outside its workspace",
    "into input 0": r"PiMoECombine: a kernel wrote into input 0 or around it",
    "after input 2": r"PiMoECombine: a kernel wrote into input 2 or around it",
}


@pytest.mark.parametrize("where", list(STRAY))
def test_a_kernel_writing_outside_its_buffers_is_caught(harness, monkeypatch, where) -> None:
    """docs/verification.md: "Every buffer has guard bytes around it; after each run the harness checks that no
    kernel wrote past its workspace or an output and that the inputs are unchanged". A kernel made to write one
    byte outside a buffer (or into an input): the real enqueue, then one stray byte, and the run raises
    HarnessMemoryError naming the buffer; the session's clean run before it returned the combine."""
    from pimoe_export.testing.harness import HarnessMemoryError

    monkeypatch.delenv(GUARD_ENV, raising=False)  # the default 256 guard bytes
    session, arrays = _combine_session(harness)
    try:
        clean = session.run(arrays)[0]
        workspace = max(session.workspace_bytes, 256)
        real = harness.enqueue

        def stray(prepared, inputs, outputs, workspace_ptr, stream=0):
            real(prepared, inputs, outputs, workspace_ptr, stream)
            at = {"after output 0": outputs[0] + clean.nbytes, "before output 0": outputs[0] - 1,
                  "before the workspace": workspace_ptr - 1, "after the workspace": workspace_ptr + workspace,
                  "into input 0": inputs[0] + 5, "after input 2": inputs[2] + arrays[2].nbytes}[where]
            harness.upload(at, b"\x00")

        monkeypatch.setattr(harness, "enqueue", stray)
        with pytest.raises(HarnessMemoryError, match=STRAY[where]):
            session.run(arrays)
    finally:
        session.close()
    # the clean run: y[t] = w[t, 0] · y_sorted[f[2t]] + w[t, 1] · y_sorted[f[2t + 1]] (slot order, fp32)
    y_sorted, flat, weights = arrays
    assert clean.nbytes == 192
    np.testing.assert_array_equal(clean, weights[:, :1] * y_sorted[flat[0::2]] + weights[:, 1:] * y_sorted[flat[1::2]])
