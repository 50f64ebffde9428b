"""Bad inputs to each ONNX Runtime op fail with one clear error naming the problem (never a crash)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, InvalidGraph, RuntimeException
from op_graphs import expert_mlp_attrs, single_op_model

from pimoe_export.errors import ArtifactError, PluginLoadError
from pimoe_export.runtime.ort import check_ort_library, create_session

# a session that cannot be created is an ArtifactError (runtime.ort keeps ONNX Runtime's message)
ORT_ERRORS = (Fail, InvalidArgument, InvalidGraph, RuntimeException, ArtifactError)
f32 = np.float32


def run(model: bytes, feeds: dict):
    return create_session(model).run(None, feeds)


def expect_error(fragment: str, model: bytes, feeds: dict) -> None:
    with pytest.raises(ORT_ERRORS) as info:
        run(model, feeds)
    assert fragment in str(info.value), str(info.value)


# ------------------------------------------------------------------------------------------ PiMoERoute
def route_model(logits, bias=None, k=2):
    inputs = [("logits", logits)] + ([("selection_bias", bias)] if bias is not None else [])
    return single_op_model("PiMoERoute", inputs, [("weights", f32, 2), ("ids", np.int32, 2)], {"k": k}), dict(inputs)


@pytest.mark.parametrize(
    ("logits", "bias", "k", "fragment"),
    [
        (np.zeros((2, 3, 4), f32), None, 2, "logits must have rank 2"),
        (np.zeros((5, 3), f32), None, 4, "k=4 exceeds the number of experts E=3"),
        (np.zeros((5, 4), f32), np.zeros(3, f32), 2, "selection_bias must have shape [4]"),
        (np.zeros((5, 4), np.float64), None, 2, "logits must be float32 or float16, got float64"),
        (np.zeros((5, 4), f32), None, 17, "attribute k must be in [1, 16]"),
    ],
)
def test_route_bad_inputs(logits, bias, k, fragment) -> None:
    model, feeds = route_model(logits, bias, k)
    expect_error(fragment, model, feeds)


# ------------------------------------------------------------------------------------------ PiMoEDispatch
def dispatch_model(x, ids, e=4):
    model = single_op_model("PiMoEDispatch", [("x", x), ("ids", ids)],
                            [("x_sorted", x.dtype, 2), ("offsets", np.int32, 1), ("flat_to_sorted", np.int32, 1)],
                            {"num_experts": e})
    return model, {"x": x, "ids": ids}


@pytest.mark.parametrize(
    ("x", "ids", "fragment"),
    [
        (np.zeros((3, 2, 8), f32), np.zeros((3, 2), np.int32), "x must have rank 2"),
        (np.zeros((3, 8), f32), np.zeros((4, 2), np.int32), "ids has 4 rows but x has 3"),
        (np.zeros((3, 8), f32), np.array([[0, 1], [2, 9], [1, 1]], np.int32), "is outside [0, 4)"),
        (np.zeros((3, 8), f32), np.array([[0, 1], [2, -1], [1, 1]], np.int32), "is outside [0, 4)"),
        (np.zeros((3, 8), f32), np.zeros((3, 5), np.int32), "ids dim 1 (k) must be in [1, min(E"),
        (np.zeros((3, 8), f32), np.zeros((3, 0), np.int32), "ids dim 1 (k) must be in [1, min(E"),
    ],
)
def test_dispatch_bad_inputs(x, ids, fragment) -> None:
    expect_error(fragment, *dispatch_model(x, ids))


def test_dispatch_wrong_id_dtype_is_rejected_when_the_session_is_built() -> None:
    model, _ = dispatch_model(np.zeros((3, 8), f32), np.zeros((3, 2), np.int64))
    with pytest.raises(ORT_ERRORS) as info:
        create_session(model)
    assert "PiMoEDispatch" in str(info.value) or "ids" in str(info.value)


@pytest.mark.parametrize(("op", "e", "k", "fragment"), [
    ("PiMoEDispatch", 0, 2, "attribute num_experts must be in [1, "),
    ("PiMoEDispatch", -3, 2, "attribute num_experts must be in [1, "),
    ("PiMoERoute", 4, 0, "attribute k must be in [1, 16]"),
])
def test_bad_attributes_are_refused_when_the_session_is_created(op, e, k, fragment) -> None:
    """An attribute no input can make valid is refused at load time, before any batch is run (the run-time shape
    checks would also refuse it, one batch later: a mutant that dropped the load-time check survived that)."""
    if op == "PiMoEDispatch":
        model, _ = dispatch_model(np.zeros((3, 8), f32), np.zeros((3, 2), np.int32), e=e)
    else:
        model, _ = route_model(np.zeros((3, e), f32), None, k)
    with pytest.raises(ORT_ERRORS) as info:
        create_session(model)
    assert fragment in str(info.value), str(info.value)


def test_route_attributes_left_out_take_the_contract_defaults() -> None:
    """A PiMoERoute node with only k: normalize defaults to 0 (the top-k softmax probabilities, not renormalised)
    and scoring to softmax, as pimoe_export/ops/schema.py declares."""
    from pimoe_export.ops import schema

    defaults = {a.name: a.default for a in schema.ROUTE_SCHEMA.attributes}
    assert defaults["normalize"] == 0 and defaults["scoring"] == "softmax"
    logits = np.random.default_rng(4).standard_normal((7, 5)).astype(f32)
    model, feeds = route_model(logits, None, 2)
    weights, ids = run(model, feeds)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    np.testing.assert_array_equal(ids, np.argsort(-probs, axis=-1, kind="stable")[:, :2])
    np.testing.assert_allclose(weights, np.take_along_axis(probs, ids.astype(np.int64), -1), rtol=1e-6)
    assert (weights.sum(-1) < 0.999).all()  # not renormalised


# ------------------------------------------------------------------------------------------ PiMoECombine
@pytest.mark.parametrize(
    ("y_sorted", "f2s", "weights", "fragment"),
    [
        (np.zeros((6, 4), f32), np.arange(6, dtype=np.int32), np.zeros((3, 3), f32), "must both have N*k = 9 rows"),
        (np.zeros((6, 4), f32), np.arange(5, dtype=np.int32), np.zeros((3, 2), f32), "must both have N*k = 6 rows"),
        (np.zeros((6,), f32), np.arange(6, dtype=np.int32), np.zeros((3, 2), f32), "y_sorted must have rank 2"),
        (np.zeros((6, 4), f32), np.array([0, 1, 2, 3, 4, 60], np.int32), np.zeros((3, 2), f32), "is outside [0, 6)"),
        # k outside [1, 16] with every other shape consistent (a mutant that never refused k survived)
        (np.zeros((34, 4), f32), np.arange(34, dtype=np.int32), np.zeros((2, 17), f32),
         "weights dim 1 (k) must be in [1, 16], got 17"),
        (np.zeros((0, 4), f32), np.arange(0, dtype=np.int32), np.zeros((3, 0), f32),
         "weights dim 1 (k) must be in [1, 16], got 0"),
    ],
)
def test_combine_bad_inputs(y_sorted, f2s, weights, fragment) -> None:
    inputs = [("y_sorted", y_sorted), ("flat_to_sorted", f2s), ("weights", weights)]
    model = single_op_model("PiMoECombine", inputs, [("y", f32, 2)], {})
    expect_error(fragment, model, dict(inputs))


# ------------------------------------------------------------------------------------------ PiMoEExpertMLP
def mlp_params(g=1, widths=(8, 16, 8), layer_norm=True, dtype=f32):
    params = []
    for layer in range(len(widths) - 1):
        params.append(np.ones((g, widths[layer + 1], widths[layer]), dtype))
        params.append(np.zeros((g, widths[layer + 1]), f32))
        if layer_norm and layer < len(widths) - 2:
            params += [np.ones((g, widths[layer + 1]), f32), np.zeros((g, widths[layer + 1]), f32)]
    return params


def mlp_model(x, offsets, params, widths=(8, 16, 8), expert_ids=(0,), layer_norm=True, activation="gelu",
              constant=True):
    attrs = expert_mlp_attrs(expert_ids, widths, activation, layer_norm)
    named = [(f"p{i}", p) for i, p in enumerate(params)]
    inputs = [("x_sorted", x), ("offsets", offsets)]
    if constant:
        return single_op_model("PiMoEExpertMLP", inputs, [("y", x.dtype, 2)], attrs, named), dict(inputs)
    return single_op_model("PiMoEExpertMLP", inputs + named, [("y", x.dtype, 2)], attrs), dict(inputs + named)


OFFSETS = np.array([0, 2, 3], np.int32)


@pytest.mark.parametrize("constant", [True, False])
@pytest.mark.parametrize(
    ("x", "offsets", "fragment"),
    [
        (np.zeros((3, 2, 8), f32), OFFSETS, "x_sorted must have rank 2"),
        (np.zeros((3, 7), f32), OFFSETS, "x_sorted hidden size 7 does not match widths[0]=8"),
        (np.zeros((3, 8), f32), np.array([0, 1, 2], np.int32), "must equal the number of rows 3"),
        (np.zeros((3, 8), f32), np.array([0, 2, 1, 3], np.int32), "non-decreasing"),
        (np.zeros((3, 8), f32), np.array([3], np.int32), "offsets must have shape [E+1] with E >= 1"),
    ],
)
def test_expert_mlp_bad_inputs(x, offsets, fragment, constant) -> None:
    model, feeds = mlp_model(x, offsets, mlp_params(), constant=constant)
    expect_error(fragment, model, feeds)


@pytest.mark.parametrize("constant", [True, False])
def test_expert_mlp_bad_weight_shape_and_count(constant) -> None:
    x = np.zeros((3, 8), f32)
    params = mlp_params()
    params[0] = np.ones((1, 15, 8), f32)
    model, feeds = mlp_model(x, OFFSETS, params, constant=constant)
    with pytest.raises(ORT_ERRORS) as info:
        run(model, feeds)
    assert "layer 0 weight (input 2) must have shape [1, 16, 8], got [1, 15, 8]" in str(info.value)
    model, feeds = mlp_model(x, OFFSETS, mlp_params()[:-1], constant=constant)
    with pytest.raises(ORT_ERRORS) as info:
        run(model, feeds)
    assert "expected 6 parameter inputs" in str(info.value)


def test_expert_mlp_bad_attributes() -> None:
    x = np.zeros((3, 8), f32)
    for attrs, fragment in (({"activation": "swish"}, "unknown activation 'swish'"),
                            ({"expert_ids": (5,)}, "expert_ids[0]=5 is outside [0, 2)"),
                            ({"expert_ids": (0, 0)}, "lists expert 0 twice")):
        kwargs = {"expert_ids": (0,), "activation": "gelu", **attrs}
        model, feeds = mlp_model(x, OFFSETS, mlp_params(g=len(kwargs["expert_ids"])), constant=False, **kwargs)
        with pytest.raises(ORT_ERRORS) as info:
            run(model, feeds)
        assert fragment in str(info.value), str(info.value)
    from pimoe_export.interface import MAX_LAYERS  # one layer too many (exactly MAX_LAYERS: test_ops_backends.py)

    model, feeds = mlp_model(x, OFFSETS, mlp_params(), widths=(8,) * (MAX_LAYERS + 2), constant=False)
    with pytest.raises(ORT_ERRORS) as info:
        create_session(model)
    assert f"widths must hold 2..{MAX_LAYERS + 1} entries (layers + 1), got {MAX_LAYERS + 2}" in str(info.value)


def test_expert_mlp_weight_dtype_mismatch() -> None:
    x = np.zeros((3, 8), np.float16)
    model, feeds = mlp_model(x, OFFSETS, mlp_params(dtype=f32))
    with pytest.raises(ORT_ERRORS) as info:
        run(model, feeds)
    assert "weight is float32 but x_sorted is float16" in str(info.value)


# ------------------------------------------------------------------------------------------ library
def test_missing_library_is_a_clear_error(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("PIMOE_ORT_LIBRARY", str(tmp_path / "nope.so"))
    with pytest.raises(PluginLoadError, match="does not exist"):
        create_session(b"")


def test_foreign_library_is_refused(tmp_path) -> None:
    import ctypes.util

    libm = ctypes.util.find_library("m")
    assert libm
    with pytest.raises(PluginLoadError, match="not a pimoe ONNX Runtime op library"):
        check_ort_library(libm)


@pytest.mark.parametrize(("version", "refused"), [("1.20.1", True), ("1.19.2", True), ("1.21.0", False),
                                                  ("1.22.0.dev20250301", False), ("1.32.1", False), ("2.0", False)])
def test_onnxruntime_older_than_the_c_api_is_refused_before_registration(monkeypatch, version, refused) -> None:
    """ORT 1.20 silently registers none of our ops (the library needs C API 21): refused with the fix instead."""
    import onnxruntime

    from pimoe_export.errors import PluginLoadError
    from pimoe_export.runtime.ort import session_options

    monkeypatch.setattr(onnxruntime, "__version__", version)
    if refused:
        with pytest.raises(PluginLoadError, match=r"needs onnxruntime >= 1\.21.*" + re.escape(version) +
                           r".*pip install 'onnxruntime>=1\.21'"):
            session_options()
    else:
        try:
            session_options()
        except PluginLoadError as exc:
            assert "needs onnxruntime" not in str(exc)  # only a missing build may stop it here
