"""schema.py, the ONNX Runtime kernels and the TensorRT plugins agree on every attribute range and input shape.

The cases are derived from the schema itself: for every attribute, the values just outside its allowed range
(below the minimum, above the maximum, 2 for a 0/1 flag, 0 where the minimum is exclusive, NaN for floats, a name
that is not a choice) must be refused by all three, and the boundary values inside it accepted by all three. The
C++ checks are written by hand (plugins/common/pimoe_attrs.h): this is what keeps them equal to the schema. Shape
cases the schema states in words (selection_bias exactly [E], at most MAX_EXPERTS experts) are added by hand.
Every refusal runs in a separate process (tests/isolated.py): a backend that accepted the value and crashed fails the
case, naming it, instead of ending the test run.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from isolated import assert_refused, harness_prepare, isolated, ort_run
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, InvalidGraph, RuntimeException
from op_graphs import single_op_model

from pimoe_export.errors import ArtifactError
from pimoe_export.ops import schema
from pimoe_export.ops.validation import attribute_problems
from pimoe_export.runtime.ort import create_session
from pimoe_export.testing.harness import Harness, expert_mlp_fields, find_harness

f32, i32 = np.float32, np.int32
ORT_ERRORS = (Fail, InvalidArgument, InvalidGraph, RuntimeException, ArtifactError)
ORT_ERROR_TYPES = tuple(t.__name__ for t in ORT_ERRORS)
E = 32  # experts in the baselines (k up to 16 fits)


def mlp_params(widths: list[int], groups: int, layer_norm: bool, quant: str, gated: bool = False,
               bias: bool = True) -> list[np.ndarray]:
    params = []
    for layer, role in schema.expert_mlp_param_layout(len(widths) - 1, layer_norm, quant, bias=bias):
        out, inp = widths[layer + 1], widths[layer]
        if role in ("weight", "w_scale", "bias"):
            out = schema.expert_mlp_param_rows(widths, layer, gated)
        if role == "weight":
            params.append(np.ones((groups, out, inp), np.int8 if quant != "none" else f32))
        elif role == "act_smooth":
            params.append(np.ones((groups, inp), f32))
        else:
            params.append(np.full((groups, out), 0.5 if role in ("w_scale", "ln_gamma") else 0.0, f32))
    return params


def baseline(op: str, attrs: dict[str, Any]) -> tuple[list[tuple[str, np.ndarray]], list[tuple[str, Any, int]]]:
    """Valid inputs and outputs of one node of ``op`` with ``attrs`` (as far as the attributes allow)."""
    rng = np.random.default_rng(0)
    if op == schema.ROUTE:  # E = 32, or num_groups experts when there are more groups (one expert per group)
        groups = attrs.get("num_groups", 1)
        experts = groups if isinstance(groups, int) and E < groups <= schema.MAX_EXPERTS else E
        return ([("logits", rng.normal(size=(4, experts)).astype(f32))],
                [("weights", f32, 2), ("ids", i32, 2)])
    if op == schema.COMBINE:
        return ([("y_sorted", rng.normal(size=(8, 3)).astype(f32)), ("flat_to_sorted", rng.permutation(8).astype(i32)),
                 ("weights", rng.random((4, 2)).astype(f32))], [("y", f32, 2)])
    if op == schema.DISPATCH:
        return ([("x", rng.normal(size=(4, 3)).astype(f32)), ("ids", np.zeros((4, 1), i32))],
                [("x_sorted", f32, 2), ("offsets", i32, 1), ("flat_to_sorted", i32, 1)])
    widths = [w for w in attrs.get("widths", [4, 5, 4]) if isinstance(w, int) and 0 < w < 64] or [4, 4]
    quant = attrs.get("quant_mode", "none") if attrs.get("quant_mode") in schema.QUANT_MODES else "none"
    layer_norm = attrs.get("layer_norm") in (0, 1) and attrs.get("layer_norm", 1) == 1
    gated, bias = attrs.get("gated") == 1 and len(widths) > 2, attrs.get("bias", 1) != 0
    groups = max(1, len(attrs.get("expert_ids", [0])))
    inputs = [("x_sorted", rng.normal(size=(3, widths[0])).astype(f32)),
              ("offsets", np.array([0, 1, 3] + [3] * (E - 2), i32))]
    params = [(f"p{i}", p) for i, p in enumerate(mlp_params(widths, groups, layer_norm, quant, gated, bias))]
    return inputs + params, [("y_sorted", f32, 2)]


BASE_ATTRS: dict[str, dict[str, Any]] = {
    schema.ROUTE: {"k": 2, "normalize": 0},
    schema.DISPATCH: {"num_experts": E},
    schema.EXPERT_MLP: {"expert_ids": [0, 1], "widths": [4, 5, 4], "activation": "gelu", "layer_norm": 1,
                        "eps": 1e-5, "quant_mode": "w8a8", "act_scales": [0.02] * 4},
    schema.COMBINE: {},
}


def outside(attr: schema.AttrSpec) -> list[Any]:
    """Values just outside ``attr``'s allowed range, derived from its spec."""
    values: list[Any] = []
    wrap = (lambda v: [v]) if attr.kind in ("ints", "floats") else (lambda v: v)
    if attr.choices:
        values.append("not-a-choice")
    if attr.minimum is not None:
        values.append(wrap(attr.minimum if attr.exclusive_minimum else
                           (attr.minimum - 1 if attr.kind.startswith("int") else attr.minimum - 0.5)))
    if attr.maximum is not None and attr.maximum < 2**31 - 1:
        values.append(wrap(attr.maximum + 1))
    if attr.kind.startswith("float"):
        values.append(wrap(math.nan))
    return values


def inside(attr: schema.AttrSpec) -> list[Any]:
    """Boundary values inside the range (those the baselines can carry)."""
    if attr.choices:
        return [c for c in attr.choices if attr.name != "quant_mode"]
    values = []
    wrap = (lambda v: [v]) if attr.kind in ("ints", "floats") else (lambda v: v)
    if attr.flag:
        return [0, 1]
    if attr.minimum is not None and not attr.exclusive_minimum and attr.name not in ("widths",):
        values.append(wrap(int(attr.minimum) if attr.kind.startswith("int") else attr.minimum))
    if attr.maximum is not None and attr.name not in ("widths", "expert_ids"):
        values.append(wrap(int(attr.maximum)))
    return values


def cases(pick) -> list[tuple[str, str, Any]]:
    out = []
    for op in BASE_ATTRS:
        for attr in schema.SCHEMAS[op].attributes:
            if op == schema.EXPERT_MLP and attr.name == "act_scales":
                out += [(op, attr.name, v) for v in pick(attr) if not isinstance(v, str)]
            else:
                out += [(op, attr.name, v) for v in pick(attr)]
    return out


def with_value(op: str, name: str, value: Any) -> dict[str, Any]:
    attrs = dict(BASE_ATTRS[op], **{name: value})
    if op == schema.EXPERT_MLP and name == "expert_ids" and isinstance(value, list):
        attrs["act_scales"] = [0.02] * (2 * len(value))
    # contract v2: the attributes a value needs to be valid at all (the baseline is plain, LayerNorm, no groups)
    if op == schema.EXPERT_MLP and ((name == "gated" and value == 1) or value in schema.GLU_ONLY_ACTIVATIONS):
        attrs["gated"], attrs["layer_norm"] = 1, 0
    if op == schema.ROUTE and name == "groups_kept" and isinstance(value, int) and value > 1:
        attrs["num_groups"] = value  # kept <= num_groups
    if op == schema.ROUTE and name == "num_groups" and isinstance(value, int) and value > 1:
        attrs["groups_kept"] = 2  # k = 2 <= groups_kept * E / num_groups
    return attrs


def harness_kinds() -> list[bool]:
    """The harness builds here (emulated: True, a real GPU's: False)."""
    found = [emulated for emulated in (True, False) if find_harness(emulated=emulated) is not None]
    if not found:
        pytest.skip("no harness build (scripts/setup.sh builds the emulated one)")
    return found


def harnesses() -> list[Harness]:
    return [Harness(find_harness(emulated=emulated)) for emulated in harness_kinds()]


def onnx_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    """An empty list cannot be typed as an ONNX attribute: it is left out (its default is the empty list)."""
    return {k: v for k, v in attrs.items() if v != []}


def ort_model(op: str, attrs: dict[str, Any]) -> tuple[bytes, dict[str, np.ndarray]]:
    inputs, outputs = baseline(op, attrs)
    fixed = [inputs[0], inputs[1]] if op == schema.EXPERT_MLP else inputs
    initializers = inputs[2:] if op == schema.EXPERT_MLP else []
    return single_op_model(op, fixed, outputs, onnx_attrs(attrs), initializers), dict(fixed)


def ort_run_here(op: str, attrs: dict[str, Any]) -> None:
    model, feeds = ort_model(op, attrs)
    create_session(model, threads=1).run(None, feeds)


def plugin_fields(op: str, attrs: dict[str, Any]) -> dict[str, Any]:
    if op != schema.EXPERT_MLP:
        return attrs
    v2 = {name: attrs[name] for name in ("gated", "bias", "alpha", "limit") if name in attrs}
    return expert_mlp_fields(attrs["expert_ids"], attrs["widths"], attrs["activation"], attrs["layer_norm"],
                             attrs["eps"], attrs["quant_mode"], attrs["act_scales"], **v2)


def plugin_prepare(harness: Harness, op: str, attrs: dict[str, Any]) -> None:
    inputs, _ = baseline(op, attrs)
    prepared = harness.prepare(op, plugin_fields(op, attrs), [(a.shape, a.dtype) for _, a in inputs])
    harness.release(prepared)


OUTSIDE = cases(outside)
INSIDE = cases(inside)


def test_every_bounded_attribute_has_cases() -> None:
    bounded = {(op, a.name) for op in BASE_ATTRS for a in schema.SCHEMAS[op].attributes
               if a.minimum is not None or a.maximum is not None or a.choices}
    assert bounded <= {(op, name) for op, name, _ in OUTSIDE}


@pytest.mark.parametrize(("op", "name", "value"), OUTSIDE, ids=[f"{o}.{n}={v!r}" for o, n, v in OUTSIDE])
def test_values_outside_the_schema_are_refused_everywhere(op, name, value) -> None:
    attrs = with_value(op, name, value)
    assert attribute_problems(op, attrs), "schema.py accepts it"
    what = f"{op} with {name}={value!r}"
    assert_refused(isolated().call(ort_run, *ort_model(op, attrs), threads=1), "", f"ONNX Runtime: {what}",
                   ORT_ERROR_TYPES)
    for emulated in harness_kinds():
        inputs, _ = baseline(op, attrs)
        outcome = isolated().call(harness_prepare, op, plugin_fields(op, attrs),
                                  [(a.shape, a.dtype) for _, a in inputs], emulated=emulated)
        assert_refused(outcome, "", f"the {'emulated ' if emulated else ''}plugin: {what}", ("HarnessError",))


@pytest.mark.parametrize(("op", "name", "value"), INSIDE, ids=[f"{o}.{n}={v!r}" for o, n, v in INSIDE])
def test_boundary_values_inside_the_schema_are_accepted_everywhere(op, name, value) -> None:
    attrs = with_value(op, name, value)
    if op == schema.EXPERT_MLP and name in ("activation", "layer_norm", "eps", "gated", "bias"):
        attrs["quant_mode"], attrs["act_scales"] = "none", []
    assert not attribute_problems(op, attrs)
    ort_run_here(op, attrs)
    for harness in harnesses():
        plugin_prepare(harness, op, attrs)


SHAPES = [
    # (op, attrs, inputs as (shape, dtype), fragment every backend's message holds)
    (schema.ROUTE, {"k": 2}, [((4, 8), f32), ((), f32)], "selection_bias must have shape [8]"),
    (schema.ROUTE, {"k": 2}, [((4, 8), f32), ((9,), f32)], "selection_bias must have shape [8]"),
    (schema.ROUTE, {"k": 2}, [((4, 8), f32), ((1,), f32)], "selection_bias must have shape [8]"),
    (schema.EXPERT_MLP, {"expert_ids": [0], "widths": [4, 4], "activation": "relu", "layer_norm": 0, "eps": 1e-5,
                         "quant_mode": "none", "act_scales": []},
     [((3, 4), f32), ((schema.MAX_EXPERTS + 2,), i32), ((1, 4, 4), f32), ((1, 4), f32)], "exceeds the contract"),
]


@pytest.mark.parametrize(("op", "attrs", "inputs", "fragment"), SHAPES, ids=[s[3][:40] for s in SHAPES])
def test_input_shapes_outside_the_contract_are_refused_everywhere(op, attrs, inputs, fragment) -> None:
    arrays = [np.zeros(shape, dtype) for shape, dtype in inputs]
    names = ["logits", "selection_bias"] if op == schema.ROUTE else ["x_sorted", "offsets", "p0", "p1"]
    outputs = [("weights", f32, 2), ("ids", i32, 2)] if op == schema.ROUTE else [("y_sorted", f32, 2)]
    model = single_op_model(op, list(zip(names, arrays, strict=True)), outputs, onnx_attrs(attrs))
    outcome = isolated().call(ort_run, model, dict(zip(names, arrays, strict=True)), threads=1)
    assert_refused(outcome, fragment, f"ONNX Runtime: {op} with inputs {inputs}", ORT_ERROR_TYPES)
    for emulated in harness_kinds():
        outcome = isolated().call(harness_prepare, op, plugin_fields(op, attrs), inputs, emulated=emulated)
        assert_refused(outcome, fragment, f"the plugin: {op} with inputs {inputs}", ("HarnessError",))


@pytest.mark.emu
@pytest.mark.parametrize("bad", [np.nan, 0.0, -0.5, np.inf])
def test_bad_weight_scale_is_refused_by_the_cpu_kernel_and_reported_by_the_cuda_kernel(bad) -> None:
    """A NaN w_scale used to be turned into 0 silently. The CPU kernel refuses any w_scale that is not a positive
    finite number; the CUDA kernel (emulated here) records it in the device status (zero included: a CUDA mutant
    that accepted 0 survived the NaN-only version of this test) and, for NaN, lets NaN flow (never a silent zero)."""
    from isolated import emulated_op

    from pimoe_export.testing.harness import HarnessOpBackend

    widths, attrs = [4, 4], {"expert_ids": [0], "widths": [4, 4], "activation": "relu", "layer_norm": 0,
                             "eps": 1e-5, "quant_mode": "w8a8_dynamic", "act_scales": []}
    x = np.ones((3, 4), f32)
    offsets = np.array([0, 3], i32)
    params = mlp_params(widths, 1, False, "w8a8_dynamic")
    params[1][0, 2] = bad  # w_scale of channel 2
    model = single_op_model(schema.EXPERT_MLP, [("x_sorted", x), ("offsets", offsets)], [("y_sorted", f32, 2)],
                            onnx_attrs(attrs), [(f"p{i}", p) for i, p in enumerate(params)])
    message = assert_refused(isolated().call(ort_run, model, {"x_sorted": x, "offsets": offsets}, threads=1),
                             "must be positive and finite, got ", f"ONNX Runtime: w_scale {bad}", ORT_ERROR_TYPES)
    assert "w_scale" in message
    emulated = find_harness(emulated=True)
    if emulated is None:
        pytest.skip("emulated harness not built")
    backend = HarnessOpBackend(Harness(emulated))
    args = (x, offsets, params, [0], widths, "relu", False)
    assert_refused(isolated().call(emulated_op, "expert_mlp", *args, quant_mode="w8a8_dynamic"),
                   "layer 0 w_scale[2] is not a positive finite number", f"the emulated kernel: w_scale {bad}",
                   ("HarnessDataError",))
    y = backend.run(schema.EXPERT_MLP, plugin_fields(schema.EXPERT_MLP, attrs), [x, offsets, *params],
                    check_status=False)[0]
    assert np.isfinite(y[:, [0, 1, 3]]).all()
    if np.isnan(bad):
        assert np.isnan(y[:, 2]).all()


# Contract v2: combinations every backend refuses, each attribute valid on its own (fragment: in every message).
CROSS = [
    (schema.ROUTE, {"k": 2, "scoring": "softmax_topk", "num_groups": 4, "groups_kept": 2}, "softmax_topk"),
    (schema.ROUTE, {"k": 2, "num_groups": 4, "groups_kept": 5}, "groups_kept"),
    (schema.EXPERT_MLP, {**BASE_ATTRS[schema.EXPERT_MLP], "quant_mode": "none", "act_scales": [], "gated": 1},
     "LayerNorm"),
    (schema.EXPERT_MLP, {**BASE_ATTRS[schema.EXPERT_MLP], "quant_mode": "none", "act_scales": [], "layer_norm": 0,
                         "activation": "swiglu_oai"}, "gated"),
    (schema.EXPERT_MLP, {**BASE_ATTRS[schema.EXPERT_MLP], "quant_mode": "none", "act_scales": [], "layer_norm": 0,
                         "gated": 1, "widths": [4, 4]}, "hidden layer"),
]


@pytest.mark.parametrize(("op", "attrs", "fragment"), CROSS, ids=[c[2] for c in CROSS])
def test_inconsistent_v2_attributes_are_refused_everywhere(op, attrs, fragment) -> None:
    assert any(fragment in p for p in attribute_problems(op, attrs)), attribute_problems(op, attrs)
    what = f"{op} with {attrs}"
    assert_refused(isolated().call(ort_run, *ort_model(op, attrs), threads=1), fragment, f"ONNX Runtime: {what}",
                   ORT_ERROR_TYPES)
    inputs, _ = baseline(op, attrs)
    for emulated in harness_kinds():
        outcome = isolated().call(harness_prepare, op, plugin_fields(op, attrs),
                                  [(a.shape, a.dtype) for _, a in inputs], emulated=emulated)
        assert_refused(outcome, fragment, f"the {'emulated ' if emulated else ''}plugin: {what}", ("HarnessError",))


# Route attributes that are valid alone but not for the node's E (the graph check knows E from the dispatch).
ROUTE_SHAPES = [
    ({"k": 2, "num_groups": 5, "groups_kept": 2}, 32, "does not divide"),
    ({"k": 2, "num_groups": 32, "groups_kept": 2, "group_score": "sum_top2"}, 32, "at least 2 experts per group"),
    ({"k": 9, "num_groups": 4, "groups_kept": 1}, 32, "exceeds the experts of the kept groups"),
]


@pytest.mark.parametrize(("attrs", "experts", "fragment"), ROUTE_SHAPES, ids=[c[2] for c in ROUTE_SHAPES])
def test_route_groups_inconsistent_with_e_are_refused_everywhere(attrs, experts, fragment) -> None:
    from pimoe_export.ops.validation import _route_problems

    assert any(fragment in p for p in _route_problems(attrs, experts))
    logits = np.zeros((4, experts), f32)
    model = single_op_model(schema.ROUTE, [("logits", logits)], [("weights", f32, 2), ("ids", i32, 2)], attrs)
    what = f"route {attrs} with E = {experts}"
    assert_refused(isolated().call(ort_run, model, {"logits": logits}, threads=1), fragment, f"ONNX Runtime: {what}",
                   ORT_ERROR_TYPES)
    for emulated in harness_kinds():
        outcome = isolated().call(harness_prepare, schema.ROUTE, plugin_fields(schema.ROUTE, attrs),
                                  [((4, experts), f32)], emulated=emulated)
        assert_refused(outcome, fragment, f"the {'emulated ' if emulated else ''}plugin: {what}", ("HarnessError",))


@pytest.mark.parametrize("with_bias", [True, False])
def test_gated_parameter_shapes_are_checked_everywhere(with_bias) -> None:
    """A gated node's weights and biases have 2*out rows: the plain layout (out rows) is refused, and a bias-free node
    refuses bias inputs (one parameter too many)."""
    attrs = {"expert_ids": [0], "widths": [4, 5, 4], "activation": "silu", "layer_norm": 0, "eps": 1e-5,
             "quant_mode": "none", "act_scales": [], "gated": 1, "bias": int(with_bias)}
    plain = mlp_params([4, 5, 4], 1, False, "none", gated=False, bias=True)  # 5 rows, and biases
    x, offsets = np.zeros((3, 4), f32), np.array([0, 3], i32)
    fragment = "must have shape [1, 10, 4]" if with_bias else "2 param"
    model = single_op_model(schema.EXPERT_MLP, [("x_sorted", x), ("offsets", offsets)], [("y_sorted", f32, 2)],
                            onnx_attrs(attrs), [(f"p{i}", p) for i, p in enumerate(plain)])
    what = f"gated node (bias={with_bias}) with the plain parameter layout"
    assert_refused(isolated().call(ort_run, model, {"x_sorted": x, "offsets": offsets}, threads=1), fragment,
                   f"ONNX Runtime: {what}", ORT_ERROR_TYPES)
    for emulated in harness_kinds():
        outcome = isolated().call(harness_prepare, schema.EXPERT_MLP, plugin_fields(schema.EXPERT_MLP, attrs),
                                  [(x.shape, f32), (offsets.shape, i32), *[(p.shape, p.dtype) for p in plain]],
                                  emulated=emulated)
        assert_refused(outcome, fragment, f"the {'emulated ' if emulated else ''}plugin: {what}", ("HarnessError",))
