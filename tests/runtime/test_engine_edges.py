"""Engine input checks at their edges (the exact token limit, torch tensors of every kind, names, shapes shared by
several inputs) and the errors a backend's refusal becomes. The limits are set on the verified unit directly, so the
boundary itself is tested, not the arithmetic that computes it (test_manifest.py checks that)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pimoe_export.build.units import package_ort
from pimoe_export.errors import PiMoEInputError, PluginLoadError, RunError
from pimoe_export.interface import Profile
from pimoe_export.runtime.engine import Engine


@pytest.fixture(scope="module")
def unit(exported_layer, tmp_path_factory):
    _, onnx_path = exported_layer("tiny", 0)
    path = tmp_path_factory.mktemp("edges") / "unit"
    try:
        package_ort(onnx_path, path, profile=Profile((1, 1), (1, 4), (4, 64)))
    except PluginLoadError as exc:
        pytest.skip(f"libpimoe_ort is not built: {exc}")
    return path


def test_exactly_the_most_tokens_a_call_may_hold(unit) -> None:
    with Engine.load(unit) as engine:
        engine.unit.max_tokens = 6
        assert engine.run(np.zeros((2, 3, 16), np.float32)).shape == (2, 3, 16)
        assert engine.run(np.zeros((1, 6, 16), np.float32)).shape == (1, 6, 16)
        with pytest.raises(PiMoEInputError) as info:
            engine.run(np.zeros((1, 7, 16), np.float32))
        assert str(info.value) == ("input hidden_states holds 7 tokens; this unit's ops index at most 6 per call (the "
                                   "op contract's element counts stay below 2147483648); split the batch")
        with pytest.raises(PiMoEInputError, match="holds 8 tokens"):
            engine.run(np.zeros((4, 2, 16), np.float32))


def test_torch_tensors_of_every_kind_in_and_out(unit) -> None:
    x = torch.randn(2, 3, 16)
    with Engine.load(unit) as engine:
        expected = engine.run(x.numpy())
        strided = x.transpose(0, 1).contiguous().transpose(0, 1)  # the same values, not contiguous
        for given in (x, torch.nn.Parameter(x.clone(), requires_grad=True), x.clone().requires_grad_(True), strided):
            y = engine.run(given)
            assert isinstance(y, torch.Tensor) and y.dtype == torch.float32
            np.testing.assert_array_equal(y.numpy(), expected)
        with pytest.raises(PiMoEInputError, match=r"takes float32 input, got float64 for hidden_states; convert it "
                                                  r"\(numpy: x\.astype\(np\.float32\)\)"):
            engine.run(x.double())
        with pytest.raises(PiMoEInputError, match=r"must be a numpy array or torch tensor \[batch, sequence, 16\], "
                                                  r"got list"):
            engine.run([[0.0] * 16])


def test_inputs_by_name(unit) -> None:
    with Engine.load(unit) as engine:
        x = np.random.default_rng(0).standard_normal((1, 4, 16)).astype(np.float32)
        named = engine.run_named({"hidden_states": x})
        assert list(named) == ["output", "expert_ids", "expert_weights"]
        np.testing.assert_array_equal(named["output"], engine.run(x))
        for feeds in ({}, {"x": x}, {"hidden_states": x, "extra": x}):
            with pytest.raises(PiMoEInputError, match=r"this unit takes the inputs \['hidden_states'\], got "):
                engine.run_named(feeds)
        with pytest.raises(PiMoEInputError, match=r"must be \[batch, sequence, 16\], got shape \[1, 4, 16, 1\]"):
            engine.run(x[..., None])


def test_a_refusal_of_onnx_runtime_becomes_a_run_error(unit) -> None:
    class Refusing:
        def __init__(self, message: str) -> None:
            self.message = message

        def run(self, names, feeds):
            raise RuntimeError(self.message)

    with Engine.load(unit) as engine:
        engine.session = Refusing("  first line of the reason\n second line")
        with pytest.raises(RunError) as info:
            engine.run(np.zeros((1, 2, 16), np.float32))
        assert str(info.value) == f"ONNX Runtime could not run {unit}: first line of the reason"
        engine.session = Refusing("   ")
        with pytest.raises(RunError) as info:
            engine.run(np.zeros((1, 2, 16), np.float32))
        assert str(info.value) == f"ONNX Runtime could not run {unit}: RuntimeError"
    with pytest.raises(RunError, match=rf"the engine of {unit} was closed"):
        engine.run(np.zeros((1, 2, 16), np.float32))


def test_what_an_engine_describes(unit) -> None:
    with Engine.load(unit) as engine:
        described = engine.describe()
    assert described["unit"] == str(unit) and described["backend"] == "onnxruntime"
    assert described["precision"] == "fp32" and described["target_sms"] == []
    assert described["profile"] == {"min": (1, 1), "opt": (1, 4), "max": (4, 64)}
    assert described["io"]["inputs"] == [["hidden_states", "float32", ["batch", "sequence", 16]]]


@pytest.mark.parametrize("threads", [1, 3])
def test_the_thread_count_reaches_the_session(unit, threads) -> None:
    """Engine.load(threads=N) runs the unit's session on N intra-op threads (what serve --threads sets)."""
    with Engine.load(unit, threads=threads) as engine:
        assert engine.session.get_session_options().intra_op_num_threads == threads


def test_optimum_loader_refuses_a_unit_without_a_cache(unit) -> None:
    """optimum_causal_lm (pimoe_export.runtime.clients) needs a decoder unit: a layer unit is refused by name,
    before optimum is imported."""
    from pimoe_export.runtime.clients import optimum_causal_lm

    with pytest.raises(PiMoEInputError, match="is not a decoder unit"):
        optimum_causal_lm(unit)


def test_the_providers_asked_for_reach_the_session_and_the_default_needs_no_fallback(unit, monkeypatch) -> None:
    """Engine.load hands the caller's providers to the session; with none named, the session is made on ONNX
    Runtime's CPU provider by its exact name (a misspelt one makes ONNX Runtime warn and fall back)."""
    import warnings

    import pimoe_export.runtime.ort as ort_module
    from pimoe_export.runtime.engine import Engine

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ONNX Runtime warns when a named provider is not available
        engine = Engine.load(unit)
    assert engine.session.get_providers() == ["CPUExecutionProvider"]
    seen = []
    real = ort_module.create_session

    def recording(*args, **kwargs):
        seen.append(kwargs.get("providers"))
        return real(*args, **kwargs)

    monkeypatch.setattr(ort_module, "create_session", recording)
    Engine.load(unit, providers=["CPUExecutionProvider"])
    assert seen == [["CPUExecutionProvider"]]


def test_a_unit_runs_its_own_op_library_whatever_the_machine_has(unit, monkeypatch, tmp_path) -> None:
    """README: `check --unit` "runs exactly what the unit contains", and an `ort-*` unit carries and fingerprints
    libpimoe_ort.so only, so Engine.load keeps the pimoe ops on the CPU even with the CUDA provider. With the
    machine's own op library unfindable ($PIMOE_ORT_LIBRARY names no file), the unit still loads and runs, and the
    session is always made with the unit's library (never the build tree's, nor libpimoe_ort_cuda)."""
    import pimoe_export.runtime.ort as ort_module
    from pimoe_export.native.libraries import find_ort_library

    x = np.random.default_rng(5).standard_normal((2, 3, 16)).astype(np.float32)
    with Engine.load(unit) as engine:
        expected = engine.run(x)
    monkeypatch.setenv("PIMOE_ORT_LIBRARY", str(tmp_path / "absent.so"))
    with pytest.raises(PluginLoadError, match="does not exist"):
        find_ort_library()  # what a session without the unit's library would have to use
    with Engine.load(unit) as engine:
        np.testing.assert_array_equal(engine.run(x), expected)

    seen: list[dict] = []
    monkeypatch.setattr(ort_module, "create_session", lambda model, **kwargs: seen.append(kwargs) or object())
    for providers in (None, ["CUDAExecutionProvider", "CPUExecutionProvider"]):
        Engine.load(unit, providers=providers)
        assert Path(seen[-1]["library"]).resolve() == (unit / "libpimoe_ort.so").resolve(), providers
        assert seen[-1]["providers"] == providers
