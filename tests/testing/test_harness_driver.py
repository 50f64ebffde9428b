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
