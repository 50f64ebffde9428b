"""Every op on every available backend against the PyTorch reference (pimoe_export.model.functional).

Hypothesis generates the cases: N including 0 and 1, E up to 64, k up to min(E, 16), hidden sizes that are
not multiples of 8, fp32 and fp16, NaN/Inf and exact ties. 200 examples per op and backend.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from backends import BACKEND_PARAMS, get_backend
from cpu_kernel_sets import other_kernel_sets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pimoe_export.model import functional
from pimoe_export.ops import schema

# 200 examples per op and backend; the sanitizer runs of the emulated backend (tests/emu/test_emu.py) ask for fewer
EXAMPLES = int(os.environ.get("PIMOE_OP_EXAMPLES", "200"))
op_settings = settings(max_examples=EXAMPLES, deadline=None,
                       suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
DTYPES = [np.float32, np.float16]


def rng_from(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


# ------------------------------------------------------------------------------------------ PiMoERoute
@st.composite
def route_cases(draw):
    e = draw(st.integers(1, 64))
    k = draw(st.integers(1, min(e, schema.MAX_TOP_K)))
    n = draw(st.sampled_from([0, 1, 2, 3, 5, 17, 40]))
    dtype = draw(st.sampled_from(DTYPES))
    style = draw(st.sampled_from(["normal", "ties", "special"]))
    rng = rng_from(draw(st.integers(0, 2**31)))
    logits = rng.normal(0, 2, size=(n, e))
    if style == "ties":  # few distinct values: many exact ties, broken by the lower index
        logits = rng.integers(-2, 3, size=(n, e)).astype(np.float64)
    elif style == "special" and n:
        rows = rng.integers(0, n, size=min(n, 3))
        cols = rng.integers(0, e, size=len(rows))
        logits[rows, cols] = rng.choice([np.nan, np.inf, -np.inf], size=len(rows))
    bias = rng.normal(0, 0.05, size=e).astype(np.float32) if draw(st.booleans()) else None
    return logits.astype(dtype), bias, k, draw(st.booleans())


def assert_same_selection(ids, ref_ids, ref_scores, tol=1e-6):
    """ids equal, except that swaps between (numerically) tied scores are accepted."""
    if np.array_equal(ids, ref_ids):
        return
    for row in np.nonzero((ids != ref_ids).any(axis=1))[0]:
        got = ref_scores[row, ids[row]]
        want = ref_scores[row, ref_ids[row]]
        np.testing.assert_allclose(got, want, rtol=0, atol=tol, err_msg=f"row {row}: {ids[row]} vs {ref_ids[row]}")


@pytest.mark.parametrize("backend_name", BACKEND_PARAMS)
@op_settings
@given(case=route_cases())
def test_route_matches_reference(backend_name, case) -> None:
    backend = get_backend(backend_name)
    logits, bias, k, normalize = case
    weights, ids = backend.route(logits, bias, k, normalize)
    n, e = logits.shape
    assert weights.shape == (n, k) and ids.shape == (n, k)
    assert weights.dtype == np.float32 and ids.dtype == np.int32
    assert ((ids >= 0) & (ids < e)).all(), "ids must stay in range whatever the logits"
    t_bias = None if bias is None else torch.from_numpy(bias)
    ref_w, ref_ids = functional.route(torch.from_numpy(logits), t_bias, k, normalize)
    probs = torch.softmax(torch.from_numpy(logits).float(), -1)
    scores = (probs + (t_bias if t_bias is not None else 0)).numpy()
    finite_rows = np.isfinite(scores).all(axis=1)
    assert_same_selection(ids[finite_rows], ref_ids.numpy()[finite_rows], scores[finite_rows])
    if (~finite_rows).any():  # NaN rows: the contract fixes ids exactly (NaN ranks lowest, then index order)
        np.testing.assert_array_equal(ids[~finite_rows], ref_ids.numpy()[~finite_rows])
    same = (ids == ref_ids.numpy()).all(axis=1)
    np.testing.assert_allclose(weights[same], ref_w.numpy()[same], rtol=2e-6, atol=1e-7, equal_nan=True)


# ------------------------------------------------------------------------------------------ PiMoERoute, contract v2
@st.composite
def route_v2_cases(draw):
    scoring = draw(st.sampled_from(schema.SCORING))
    groups = 1 if scoring == "softmax_topk" else draw(st.sampled_from([1, 1, 2, 4, 8]))
    size = draw(st.integers(2 if groups > 1 else 1, max(2, 64 // groups)))
    e = groups * size
    kept = draw(st.integers(1, groups))
    k = draw(st.integers(1, min(kept * size, schema.MAX_TOP_K)))
    n = draw(st.sampled_from([0, 1, 2, 5, 17, 40]))
    dtype = draw(st.sampled_from(DTYPES))
    style = draw(st.sampled_from(["normal", "ties", "special", "saturated"]))
    rng = rng_from(draw(st.integers(0, 2**31)))
    logits = rng.normal(0, 2, size=(n, e))
    if style == "ties":  # few distinct values: exact ties, broken by the lower index (expert and group)
        logits = rng.integers(-2, 3, size=(n, e)).astype(np.float64)
    elif style == "saturated":  # fp32 sigmoid is exactly 1 here: only ranking the logits tells them apart
        logits = rng.uniform(17.0, 40.0, size=(n, e)).round(1)
    elif style == "special" and n:
        rows = rng.integers(0, n, size=min(n, 3))
        cols = rng.integers(0, e, size=len(rows))
        logits[rows, cols] = rng.choice([np.nan, np.inf, -np.inf], size=len(rows))
    bias = rng.normal(0, 0.3, size=e).astype(np.float32) if draw(st.booleans()) else None
    attrs = {"scoring": scoring, "num_groups": groups, "groups_kept": kept,
             "group_score": draw(st.sampled_from(schema.GROUP_SCORES)) if size > 1 else "max",
             "routed_scaling_factor": draw(st.sampled_from([1.0, 2.5, 16.0])),
             "normalize_eps": draw(st.sampled_from([0.0, 1e-20, 0.5]))}
    return logits.astype(dtype), bias, k, draw(st.booleans()), attrs


def reference_keys(logits: np.ndarray, bias: np.ndarray | None, attrs: dict) -> np.ndarray:
    """The selection keys the contract ranks (after group masking), from the reference's definitions."""
    values = torch.from_numpy(logits).float()
    b = None if bias is None else torch.from_numpy(bias)
    if attrs["scoring"] == "softmax":
        keys = torch.softmax(values, -1) + (b if b is not None else 0)
    elif attrs["scoring"] == "sigmoid":
        keys = torch.sigmoid(values) + (b if b is not None else 0) if b is not None or attrs["num_groups"] > 1 \
            else values
    else:
        keys = values + (b if b is not None else 0)
    if attrs["num_groups"] > 1:
        kept = functional.kept_group_mask(keys, attrs["num_groups"], attrs["groups_kept"], attrs["group_score"])
        keys = keys.masked_fill(~kept, 0.0)
    return keys.numpy()


@pytest.mark.parametrize("backend_name", BACKEND_PARAMS)
@op_settings
@given(case=route_v2_cases())
def test_route_v2_modes_match_reference(backend_name, case) -> None:
    """Every scoring, grouped selection (max and sum_top2), routed scaling and normalize_eps, with and without a
    bias, fp32 and fp16 logits, NaN/Inf, exact ties and saturated sigmoids."""
    backend = get_backend(backend_name)
    logits, bias, k, normalize, attrs = case
    weights, ids = backend.route(logits, bias, k, normalize, **attrs)
    n, e = logits.shape
    assert weights.shape == (n, k) and ids.shape == (n, k) and weights.dtype == np.float32
    assert ((ids >= 0) & (ids < e)).all(), "ids must stay in range whatever the logits"
    t_bias = None if bias is None else torch.from_numpy(bias)
    ref_w, ref_ids = functional.route(torch.from_numpy(logits), t_bias, k, normalize, **attrs)
    keys = reference_keys(logits, bias, attrs)
    ref_ids = ref_ids.numpy()
    for row in np.nonzero((ids != ref_ids).any(axis=1))[0]:  # only swaps between (numerically) tied keys
        got, want = keys[row, ids[row]], keys[row, ref_ids[row]]
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, equal_nan=True,
                                   err_msg=f"row {row}: {ids[row]} vs {ref_ids[row]}")
    same = (ids == ref_ids).all(axis=1)
    np.testing.assert_allclose(weights[same], ref_w.numpy()[same], rtol=2e-6, atol=1e-7, equal_nan=True)


@pytest.mark.parametrize("backend_name", BACKEND_PARAMS)
def test_route_v2_known_answers(backend_name) -> None:
    """Ties, groups and saturation with answers worked out by hand (tests/model/test_contract_v2_oracle.py holds the
    same for the reference): every backend must give exactly these ids."""
    backend = get_backend(backend_name)
    keys = np.array([0.9, 0.0, 0.6, 0.55, 0.7, 0.1, 0.5, 0.45], np.float32)
    zeros = np.zeros((1, 8), np.float32)  # sigmoid(0) = 0.5: the bias sets every key
    grouped = {"scoring": "sigmoid", "num_groups": 4, "groups_kept": 2}
    cases = [  # (logits, bias, k, attrs, ids)
        (zeros, keys - 0.5, 2, {**grouped, "group_score": "max"}, [0, 4]),
        (zeros, keys - 0.5, 3, {**grouped, "group_score": "max"}, [0, 4, 5]),
        (zeros, keys - 0.5, 2, {**grouped, "group_score": "sum_top2"}, [2, 3]),
        # kept keys -0.2, -0.3 lose to the dropped group's experts, masked to 0 (tied: lower index first)
        (zeros[:, :4], np.array([-0.7, -0.8, -1.0, -1.1], np.float32), 2,
         {"scoring": "sigmoid", "num_groups": 2, "groups_kept": 1}, [2, 3]),
        # fp32 sigmoid is 1 for all four: without a bias the logits are ranked; with one, ties to the lower index
        (np.array([[20.0, 30.0, 17.5, 25.0]], np.float32), None, 2, {"scoring": "sigmoid"}, [1, 3]),
        (np.array([[20.0, 30.0, 17.5, 25.0]], np.float32), np.zeros(4, np.float32), 2, {"scoring": "sigmoid"}, [0, 1]),
        (np.array([[1.0, 3.0, 3.0, 2.0]], np.float32), None, 2, {"scoring": "softmax_topk"}, [1, 2]),
        # a kept expert's probability underflows to 0 and ties with the dropped experts' 0: the lower index, dropped
        (np.array([[0.0, 0.0, 100.0, -100.0]], np.float32), None, 2,
         {"scoring": "softmax", "num_groups": 2, "groups_kept": 1}, [2, 0]),
    ]
    for logits, bias, k, attrs, want in cases:
        weights, ids = backend.route(logits, bias, k, False, **attrs)
        assert ids[0].tolist() == want, (attrs, ids[0].tolist(), want)
        ref_w = functional.route(torch.from_numpy(logits), None if bias is None else torch.from_numpy(bias), k, False,
                                 **attrs)[0].numpy()
        np.testing.assert_allclose(weights, ref_w, rtol=2e-6, atol=1e-7)
    # softmax with groups: a dropped expert's weight is 0 (DeepSeek-V2 gathers from the masked scores), not its
    # probability exp(-100) ~ 4e-44
    assert weights[0, 1] == 0.0


# ------------------------------------------------------------------------------------------ PiMoEDispatch
@st.composite
def dispatch_cases(draw):
    e = draw(st.integers(1, 64))
    k = draw(st.integers(1, min(e, schema.MAX_TOP_K)))
    n = draw(st.sampled_from([0, 1, 2, 7, 33]))
    h = draw(st.sampled_from([1, 3, 8, 13, 37]))
    rng = rng_from(draw(st.integers(0, 2**31)))
    x = rng.normal(size=(n, h)).astype(draw(st.sampled_from(DTYPES)))
    skew = draw(st.booleans())  # skewed: most pairs on few experts, empty experts in between
    ids = (rng.integers(0, max(1, e // 4), size=(n, k)) * (4 if e >= 4 else 1) if skew
           else rng.integers(0, e, size=(n, k))).astype(np.int32) % e
    return x, ids, e


@pytest.mark.parametrize("backend_name", BACKEND_PARAMS)
@op_settings
@given(case=dispatch_cases())
def test_dispatch_matches_reference(backend_name, case) -> None:
    backend = get_backend(backend_name)
    x, ids, e = case
    x_sorted, offsets, f2s = backend.dispatch(x, ids, e)
    ref = functional.dispatch(torch.from_numpy(x), torch.from_numpy(ids), e)
    np.testing.assert_array_equal(offsets, ref[1].numpy())
    np.testing.assert_array_equal(f2s, ref[2].numpy())
    np.testing.assert_array_equal(x_sorted, ref[0].numpy())  # pure data movement: bit-exact
    assert x_sorted.dtype == x.dtype


# ------------------------------------------------------------------------------------------ PiMoECombine
@st.composite
def combine_cases(draw):
    k = draw(st.integers(1, schema.MAX_TOP_K))
    n = draw(st.sampled_from([0, 1, 2, 9, 31]))
    h = draw(st.sampled_from([1, 5, 8, 19, 64]))
    rng = rng_from(draw(st.integers(0, 2**31)))
    dtype = draw(st.sampled_from(DTYPES))
    y_sorted = rng.normal(size=(n * k, h)).astype(dtype)
    f2s = rng.permutation(n * k).astype(np.int32)
    weights = rng.random(size=(n, k)).astype(np.float32)
    return y_sorted, f2s, weights


@pytest.mark.parametrize("backend_name", BACKEND_PARAMS)
@op_settings
@given(case=combine_cases())
def test_combine_matches_reference_bitwise(backend_name, case) -> None:
    backend = get_backend(backend_name)
    y_sorted, f2s, weights = case
    y = backend.combine(y_sorted, f2s, weights)
    ref = functional.combine(torch.from_numpy(y_sorted), torch.from_numpy(f2s), torch.from_numpy(weights)).numpy()
    assert y.dtype == y_sorted.dtype and y.shape == ref.shape
    # same operations in the same order (multiply, then add slot by slot in fp32): identical bits
    np.testing.assert_array_equal(y, ref)


@pytest.mark.parametrize("backend_name", BACKEND_PARAMS)
@op_settings
@given(case=combine_cases())
def test_combine_expert_order_matches_reference_bitwise(backend_name, case) -> None:
    """order="expert": 0 + the slots by ascending sorted row (= expert id), Hugging Face's index_add_ order."""
    backend = get_backend(backend_name)
    y_sorted, f2s, weights = case
    y = backend.combine(y_sorted, f2s, weights, order="expert")
    ref = functional.combine(torch.from_numpy(y_sorted), torch.from_numpy(f2s), torch.from_numpy(weights),
                             "expert").numpy()
    assert y.dtype == y_sorted.dtype and y.shape == ref.shape
    np.testing.assert_array_equal(y, ref)


@pytest.mark.parametrize("backend_name", BACKEND_PARAMS)
def test_combine_orders_known_answers(backend_name) -> None:
    """Where the order decides the result: slot order sums (1e8 + -1e8) + 1 = 1, expert order ((0 + 1) + 1e8) + -1e8
    = 0; and index_add_'s start from zeros makes 0 + (-0) + (-0) = +0 where slot order keeps -0."""
    backend = get_backend(backend_name)
    rows = np.array([[1.0, -0.0], [1e8, -0.0], [-1e8, -0.0]], dtype=np.float32)
    f2s = np.array([1, 2, 0], dtype=np.int32)
    w = np.ones((1, 3), dtype=np.float32)
    slot = backend.combine(rows, f2s, w)
    expert = backend.combine(rows, f2s, w, order="expert")
    assert slot[0, 0] == 1.0 and expert[0, 0] == 0.0
    assert np.signbit(slot[0, 1]) and not np.signbit(expert[0, 1])


# ------------------------------------------------------------------------------------------ PiMoEExpertMLP
def make_expert_case(rng, *, e, groups, widths, layer_norm, dtype, rows_per_expert, gated=False, bias=True):
    expert_ids = sorted(rng.choice(e, size=groups, replace=False).tolist())
    counts = rng.integers(0, rows_per_expert + 1, size=e)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    rows = int(offsets[-1])
    x = rng.normal(size=(rows, widths[0])).astype(dtype)
    params = []
    for layer, role in schema.expert_mlp_param_layout(len(widths) - 1, layer_norm, "none", bias=bias):
        out, inp = widths[layer + 1], widths[layer]
        if role in ("weight", "bias"):
            out = schema.expert_mlp_param_rows(widths, layer, gated)
        if role == "weight":
            params.append((rng.normal(size=(groups, out, inp)) / np.sqrt(inp)).astype(dtype))
        elif role == "ln_gamma":
            params.append(rng.uniform(0.5, 1.5, size=(groups, out)).astype(np.float32))
        else:
            params.append(rng.normal(0, 0.1, size=(groups, out)).astype(np.float32))
    return x, offsets, params, expert_ids


def expert_reference(x, offsets, params, expert_ids, widths, activation, layer_norm, **v2):
    import pimoe_export.ops.torch_ops as ops

    y = ops.expert_mlp(torch.from_numpy(x), torch.from_numpy(offsets), [torch.from_numpy(p) for p in params],
                       expert_ids, list(widths), activation, layer_norm, 1e-5, "none", [], **v2)
    return y.numpy()


@st.composite
def expert_cases(draw):
    e = draw(st.integers(1, 12))
    groups = draw(st.integers(1, e))
    n_layers = draw(st.integers(1, 3))
    widths = [draw(st.sampled_from([1, 3, 8, 13, 24, 37])) for _ in range(n_layers + 1)]
    activation = draw(st.sampled_from(schema.ACTIVATIONS))
    layer_norm = draw(st.booleans())
    dtype = draw(st.sampled_from(DTYPES))
    rng = rng_from(draw(st.integers(0, 2**31)))
    rows_per_expert = draw(st.sampled_from([0, 1, 3, 14]))
    constant = draw(st.booleans())
    case = make_expert_case(rng, e=e, groups=groups, widths=widths, layer_norm=layer_norm, dtype=dtype,
                            rows_per_expert=rows_per_expert)
    return (*case, widths, activation, layer_norm, constant)


@pytest.mark.parametrize("backend_name", BACKEND_PARAMS)
@op_settings
@given(case=expert_cases())
def test_expert_mlp_matches_reference(backend_name, case) -> None:
    check_expert_case(backend_name, case)


def check_expert_case(backend_name, case, **v2) -> None:
    """``v2``: contract-v2 attributes of the node (gated, bias, alpha, limit), given to backend and reference."""
    backend = get_backend(backend_name)
    x, offsets, params, expert_ids, widths, activation, layer_norm, constant = case
    y = backend.expert_mlp(x, offsets, params, expert_ids, widths, activation, layer_norm,
                           constant_params=constant, **v2)
    ref = expert_reference(x, offsets, params, expert_ids, widths, activation, layer_norm, **v2)
    assert y.shape == ref.shape and y.dtype == x.dtype
    # rows of experts outside the group are exactly zero
    mine = np.zeros(x.shape[0], dtype=bool)
    for e in expert_ids:
        mine[offsets[e]:offsets[e + 1]] = True
    assert (y[~mine] == 0).all()
    if x.dtype == np.float32:
        scale = max(1.0, float(np.abs(ref).max(initial=0.0)))
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * scale)
    else:  # fp16 output: one fp16 rounding of the same fp32 result, plus fp32 differences before it
        np.testing.assert_allclose(y.astype(np.float32), ref.astype(np.float32), rtol=2e-3, atol=2e-3)


# ------------------------------------------------------------------------------------------ PiMoEExpertMLP, W8A8
def quantize_case(rng, x, params, widths, layer_norm, groups, mode, bias=True):
    """int8 weights + per-channel scales (from the float weights) and static activation scales."""
    from pimoe_export.quantize.int8 import quantize_weight

    out_params, w_codes = [], []
    float_layout = schema.expert_mlp_param_layout(len(widths) - 1, layer_norm, "none", bias=bias)
    by_role = dict(zip(float_layout, params, strict=True))
    for layer, role in schema.expert_mlp_param_layout(len(widths) - 1, layer_norm, mode, bias=bias):
        if role == "weight":
            q, s = quantize_weight(by_role[(layer, "weight")].astype(np.float32))
            out_params.append(q)
            w_codes.append((q, s))
        elif role == "w_scale":
            out_params.append(w_codes[-1][1])
        elif role == "act_smooth":  # SmoothQuant divisors: exercise non-trivial per-channel values
            out_params.append(rng.uniform(0.5, 2.0, size=(groups, widths[layer])).astype(np.float32))
        else:
            out_params.append(by_role[(layer, role)])
    act_scales = [] if mode == "w8a8_dynamic" else [float(np.float32(rng.uniform(0.005, 0.05)))
                                                   for _ in range((len(widths) - 1) * groups)]
    return out_params, w_codes, act_scales


@st.composite
def w8a8_cases(draw):
    e = draw(st.integers(1, 8))
    groups = draw(st.integers(1, e))
    n_layers = draw(st.integers(1, 3))
    widths = [draw(st.sampled_from([1, 3, 8, 13, 24, 37])) for _ in range(n_layers + 1)]
    activation = draw(st.sampled_from(schema.ACTIVATIONS))
    layer_norm = draw(st.booleans())
    mode = draw(st.sampled_from(["w8a8", "w8a8_dynamic"]))
    rng = rng_from(draw(st.integers(0, 2**31)))
    rows_per_expert = draw(st.sampled_from([0, 1, 3, 14]))
    x, offsets, params, expert_ids = make_expert_case(rng, e=e, groups=groups, widths=widths,
                                                      layer_norm=layer_norm, dtype=np.float32,
                                                      rows_per_expert=rows_per_expert)
    qparams, codes, act_scales = quantize_case(rng, x, params, widths, layer_norm, groups, mode)
    return x, offsets, qparams, codes, act_scales, expert_ids, widths, activation, layer_norm, mode


@pytest.mark.parametrize("backend_name", BACKEND_PARAMS)
@op_settings
@given(case=w8a8_cases())
def test_expert_mlp_w8a8_within_one_quantisation_step(backend_name, case) -> None:
    """The int8 kernels run the fake-quant reference's integer math: equal up to fp32 rounding in the
    epilogue, which can move an activation code by at most one step. So for the last layer
    |y - ref| <= s_a * w_scale[o] * sum_k |q_w[o, k]| (every input code one step off) + fp32 slack; a single
    layer (no hidden activation to re-quantise) must agree to fp32 rounding."""
    check_w8a8_case(backend_name, case)


def check_w8a8_case(backend_name, case, **v2) -> tuple[np.ndarray, np.ndarray, float]:
    """The one-code-step bound (see the test above); returns (y, ref, fp32 slack) for stricter checks. ``v2``:
    contract-v2 attributes of the node (gated, bias, alpha, limit)."""
    backend = get_backend(backend_name)
    if not getattr(backend, "supports_w8a8", True):
        pytest.skip(f"{backend_name} has no w8a8 kernels in this build")
    x, offsets, params, codes, act_scales, expert_ids, widths, activation, layer_norm, mode = case
    y = backend.expert_mlp(x, offsets, params, expert_ids, widths, activation, layer_norm, quant_mode=mode,
                           act_scales=act_scales, **v2)
    import pimoe_export.ops.torch_ops as ops

    ref = ops.expert_mlp(torch.from_numpy(x), torch.from_numpy(offsets), [torch.from_numpy(p) for p in params],
                         expert_ids, list(widths), activation, layer_norm, 1e-5, mode, act_scales, **v2).numpy()
    assert y.shape == ref.shape
    mine = np.zeros(x.shape[0], dtype=bool)
    for e in expert_ids:
        mine[offsets[e]:offsets[e + 1]] = True
    assert (y[~mine] == 0).all()
    slack = 1e-5 * max(1.0, float(np.abs(ref).max(initial=0.0)))
    if len(widths) == 2:
        np.testing.assert_allclose(y, ref, rtol=1e-6, atol=slack)
        return y, ref, slack
    q_last, s_last = codes[-1]
    l1 = np.abs(q_last.astype(np.float64)).sum(axis=-1)  # [G, out]
    groups = len(expert_ids)
    # w8a8_dynamic: the step is the reference's per-row scale of the last layer's input; the kernel's row scale
    # comes from fp32 hidden values that can differ by ulps, which moves the dequantised sum by ~1e-7 relative
    rows = last_layer_row_scales(x, offsets, params, expert_ids, widths, activation, layer_norm, **v2) \
        if mode == "w8a8_dynamic" else None
    for g, e in enumerate(expert_ids):
        lo, hi = offsets[e], offsets[e + 1]
        if hi > lo:
            a_scale = act_scales[(len(widths) - 2) * groups + g] if rows is None else rows[lo:hi, None] * (1 + 1e-5)
            assert (np.abs(y[lo:hi] - ref[lo:hi]) <= a_scale * s_last[g] * l1[g] + slack).all()
    return y, ref, slack


# Widths the drawn cases (at most 37) never reach, found by mutating the CUDA kernels (docs/mutation.md): a K of
# several 128-wide int8 steps with few rows (int8 split-K: every partial sum must be reduced), hidden rows wider
# than 7 warps of a 256-thread block (block-wide LayerNorm statistics: the last warp's partial sum must count), and
# K / N beyond the CPU kernels' 16-column panels and 1024-deep K blocks.
WIDE = [264, 300, 40]


@pytest.mark.parametrize("backend_name", BACKEND_PARAMS)
@pytest.mark.parametrize("mode", ["none", "w8a8", "w8a8_dynamic"])
def test_expert_mlp_wide_layers(backend_name, mode) -> None:
    rng = np.random.default_rng(29)
    x, offsets, params, expert_ids = make_expert_case(rng, e=4, groups=3, widths=WIDE, layer_norm=True,
                                                      dtype=np.float32, rows_per_expert=14)
    assert 16 <= x.shape[0] <= 64  # few rows: the int8 split-K path (at most 64 rows)
    if mode == "none":
        check_expert_case(backend_name, (x, offsets, params, expert_ids, WIDE, "gelu", True, False))
        return
    backend = get_backend(backend_name)
    if not getattr(backend, "supports_w8a8", True):
        pytest.skip(f"{backend_name} has no w8a8 kernels in this build")
    qparams, codes, act_scales = quantize_case(rng, x, params, WIDE, True, len(expert_ids), mode)
    y, ref, slack = check_w8a8_case(backend_name,
                                    (x, offsets, qparams, codes, act_scales, expert_ids, WIDE, "relu", True, mode))
    # Stricter than one code step everywhere: without transcendentals the kernels run the reference's integer
    # math, so a row differs only where fp32 rounding (LayerNorm statistics in another order) lands a hidden value on
    # the other side of a code boundary, once in thousands of codes. Wrong statistics move every row.
    differing = int((np.abs(y - ref) > slack).any(axis=1).sum())
    assert differing <= 1, f"{differing} of {y.shape[0]} rows differ from the reference beyond fp32 rounding"


@pytest.mark.parametrize("backend_name", BACKEND_PARAMS)
def test_expert_mlp_with_the_most_layers_the_contract_allows(backend_name) -> None:
    """Exactly MAX_LAYERS layers is accepted and computed (one more is refused: test_contract_agreement.py); a
    mutant that refused the maximum itself survived the drawn cases of at most three layers."""
    from pimoe_export.interface import MAX_LAYERS

    widths = [6, 5, 7, 4, 6, 5, 3, 8, 4, 5, 6, 7][: MAX_LAYERS + 1]
    assert len(widths) == MAX_LAYERS + 1
    case = make_expert_case(np.random.default_rng(41), e=3, groups=2, widths=widths, layer_norm=True,
                            dtype=np.float32, rows_per_expert=5)
    check_expert_case(backend_name, (*case, widths, "gelu", True, False))


@pytest.mark.parametrize("backend_name", BACKEND_PARAMS)
def test_expert_mlp_w8a8_static_scales_of_a_group_of_600(backend_name) -> None:
    """Static activation scales, one per (layer, expert), for a group larger than the 512 the CUDA kernel passes
    per launch: every expert must quantise with its own scale (a mutant that indexed the second chunk's scales
    wrongly survived the small drawn groups). One layer, so the result must equal the reference to fp32 rounding."""
    rng = np.random.default_rng(37)
    widths = [8, 8]
    x, offsets, params, expert_ids = make_expert_case(rng, e=600, groups=600, widths=widths, layer_norm=False,
                                                      dtype=np.float32, rows_per_expert=1)
    assert offsets[-1] - offsets[513] > 20  # rows of experts beyond the first 512
    qparams, codes, act_scales = quantize_case(rng, x, params, widths, False, 600, "w8a8")
    check_w8a8_case(backend_name, (x, offsets, qparams, codes, act_scales, expert_ids, widths, "relu", False, "w8a8"))


@pytest.mark.parametrize("backend_name", BACKEND_PARAMS)
def test_expert_mlp_fp16_keeps_fp32_hidden_precision(backend_name) -> None:
    """fp16 is storage: hidden activations stay fp32, so a later layer sees all of their bits (the CUDA tensor-core
    GEMM splits each fp32 value into two fp16 halves for this). Constructed so the output is nothing but what fp16
    would drop: every hidden value is 1000 + d (the fp16 grid is 0.5 apart there) and the last layer returns
    differences of hidden pairs, d_2o - d_2o+1, of order 1. Rows 17-40 of an expert sit in the second 16-row
    fragment of a 32-row warp tile (a CUDA mutant that read the wrong rows' low halves survived the other cases)."""
    widths = [16, 64, 32]
    rng = np.random.default_rng(31)
    x, offsets, params, expert_ids = make_expert_case(rng, e=2, groups=2, widths=widths, layer_norm=False,
                                                      dtype=np.float16, rows_per_expert=40)
    offsets = np.array([0, 40, 75], dtype=np.int32)  # both experts fill both 16-row fragments of a warp tile
    x = rng.normal(size=(75, widths[0])).astype(np.float16)
    w0, b0, w1, b1 = params  # layout without LayerNorm: weight, bias per layer
    assert b0.shape == (2, 64) and w1.shape == (2, 32, 64)
    b0[:] = 1000.0
    w1[:] = 0.0
    w1[:, np.arange(32), 2 * np.arange(32)] = 1.0
    w1[:, np.arange(32), 2 * np.arange(32) + 1] = -1.0
    b1[:] = 0.0
    ref = expert_reference(x, offsets, [w0, b0, w1, b1], expert_ids, widths, "relu", False).astype(np.float32)
    assert 0.3 < float(np.abs(ref).mean()) < 10.0, "the outputs must be of order 1 (differences of hidden pairs)"
    check_expert_case(backend_name, (x, offsets, [w0, b0, w1, b1], expert_ids, widths, "relu", False, False))


# ------------------------------------------------------------------------------------------ PiMoEExpertMLP, gated (v2)
def draw_gated_attrs(draw) -> dict:
    activation = draw(st.sampled_from(schema.ALL_ACTIVATIONS))
    attrs = {"gated": True, "bias": draw(st.booleans())}
    if activation == "swiglu_oai":  # GPT-OSS's constants, or others that clamp more often
        attrs["alpha"], attrs["limit"] = draw(st.sampled_from([(1.702, 7.0), (1.0, 1.5), (2.5, 0.75)]))
    return {"activation": activation, **attrs}


@st.composite
def gated_cases(draw):
    e = draw(st.integers(1, 12))
    groups = draw(st.integers(1, e))
    n_layers = draw(st.integers(2, 3))
    widths = [draw(st.sampled_from([1, 3, 8, 13, 24, 37])) for _ in range(n_layers + 1)]
    v2 = draw_gated_attrs(draw)
    activation = v2.pop("activation")
    dtype = draw(st.sampled_from(DTYPES))
    rng = rng_from(draw(st.integers(0, 2**31)))
    rows_per_expert = draw(st.sampled_from([0, 1, 3, 14]))
    case = make_expert_case(rng, e=e, groups=groups, widths=widths, layer_norm=False, dtype=dtype,
                            rows_per_expert=rows_per_expert, gated=True, bias=v2["bias"])
    if dtype == np.float32:  # larger pre-activations so that swiglu_oai's clamps act
        case = (case[0] * 3, *case[1:])
    return (*case, widths, activation, False, draw(st.booleans())), v2


@pytest.mark.parametrize("backend_name", BACKEND_PARAMS)
@op_settings
@given(drawn=gated_cases())
def test_expert_mlp_gated_matches_reference(backend_name, drawn) -> None:
    """Gated (GLU) hidden layers with rows [gate; up], every activation (swiglu_oai with several alpha/limit), with
    and without bias, fp32 and fp16, constant and graph-input weights."""
    case, v2 = drawn
    check_expert_case(backend_name, case, **v2)


@pytest.mark.parametrize("backend_name", BACKEND_PARAMS)
@pytest.mark.parametrize("precision", ["fp32", "fp16", "w8a8", "w8a8_dynamic"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("activation", schema.ALL_ACTIVATIONS)
def test_expert_mlp_gated_every_activation_bias_and_precision(backend_name, activation, with_bias, precision) -> None:
    """Every combination once, deterministically (the drawn cases above cover them only in expectation)."""
    import zlib

    rng = np.random.default_rng(zlib.crc32(f"{activation}-{with_bias}-{precision}".encode()))
    widths = [24, 13, 8]
    dtype = np.float16 if precision == "fp16" else np.float32
    x, offsets, params, expert_ids = make_expert_case(rng, e=5, groups=3, widths=widths, layer_norm=False, dtype=dtype,
                                                      rows_per_expert=6, gated=True, bias=with_bias)
    v2 = {"gated": True, "bias": with_bias}
    if activation == "swiglu_oai":
        v2 |= {"alpha": 1.702, "limit": 1.5}  # clamps often at this scale
    if precision in ("fp32", "fp16"):
        check_expert_case(backend_name, (x, offsets, params, expert_ids, widths, activation, False, True), **v2)
        return
    qparams, codes, act_scales = quantize_case(rng, x, params, widths, False, len(expert_ids), precision,
                                               bias=with_bias)
    check_w8a8_case(backend_name, (x, offsets, qparams, codes, act_scales, expert_ids, widths, activation, False,
                                   precision), **v2)


@pytest.mark.parametrize("backend_name", BACKEND_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_expert_mlp_swiglu_oai_clamps(backend_name, dtype) -> None:
    """swiglu_oai on a grid of (gate, up) across both clamps (a [2 -> 1 -> 1] expert whose gate is x[0] and up
    x[1]): gate clamped above only, up on both sides, NaN kept."""
    grid = np.array([-12.0, -7.5, -7.0, -6.5, -1.0, 0.0, 0.5, 6.5, 7.0, 7.5, 12.0], dtype=np.float32)
    gate, up = np.meshgrid(grid, grid)
    x = np.stack([gate.ravel(), up.ravel()], axis=1)
    x = np.concatenate([x, [[np.nan, 1.0], [1.0, np.nan]]]).astype(dtype)
    offsets = np.array([0, x.shape[0]], dtype=np.int32)
    params = [np.eye(2, dtype=dtype)[None], np.ones((1, 1, 1), dtype=dtype)]
    v2 = {"gated": True, "bias": False, "alpha": 1.702, "limit": 7.0}
    y = get_backend(backend_name).expert_mlp(x, offsets, params, [0], [2, 1, 1], "swiglu_oai", False, **v2)
    ref = expert_reference(x, offsets, params, [0], [2, 1, 1], "swiglu_oai", False, **v2)
    assert np.isnan(y[-2:]).all()
    tol = 1e-6 if dtype == np.float32 else 2e-3
    np.testing.assert_allclose(y[:-2].astype(np.float32), ref[:-2].astype(np.float32), rtol=tol, atol=tol)
    clamped = (gate.ravel() > 7.0) | (np.abs(up.ravel()) > 7.0)
    assert clamped.sum() >= 40  # the grid exercises the clamps


@st.composite
def gated_w8a8_cases(draw):
    e = draw(st.integers(1, 8))
    groups = draw(st.integers(1, e))
    n_layers = draw(st.integers(2, 3))
    widths = [draw(st.sampled_from([1, 3, 8, 13, 24, 37])) for _ in range(n_layers + 1)]
    v2 = draw_gated_attrs(draw)
    activation = v2.pop("activation")
    mode = draw(st.sampled_from(["w8a8", "w8a8_dynamic"]))
    rng = rng_from(draw(st.integers(0, 2**31)))
    rows_per_expert = draw(st.sampled_from([0, 1, 3, 14]))
    x, offsets, params, expert_ids = make_expert_case(rng, e=e, groups=groups, widths=widths, layer_norm=False,
                                                      dtype=np.float32, rows_per_expert=rows_per_expert, gated=True,
                                                      bias=v2["bias"])
    qparams, codes, act_scales = quantize_case(rng, x, params, widths, False, groups, mode, bias=v2["bias"])
    return (x, offsets, qparams, codes, act_scales, expert_ids, widths, activation, False, mode), v2


@pytest.mark.parametrize("backend_name", BACKEND_PARAMS)
@op_settings
@given(drawn=gated_w8a8_cases())
def test_expert_mlp_gated_w8a8_within_one_quantisation_step(backend_name, drawn) -> None:
    """W8A8 gated layers: one int8 GEMM over the 2*out rows (per-row weight scales), the GLU in fp32, one activation
    scale per layer input; the same one-code-step bound as plain layers."""
    case, v2 = drawn
    check_w8a8_case(backend_name, case, **v2)


@pytest.mark.parametrize("backend_name", BACKEND_PARAMS)
@pytest.mark.parametrize("mode", ["none", "w8a8", "w8a8_dynamic"])
def test_expert_mlp_gated_wide_layers(backend_name, mode) -> None:
    """The wide deterministic case (K 264, a 2 x 300 gated GEMM, few rows) for gated layers: split-K, panels beyond
    the first 16-column blocks on both halves [gate; up]."""
    rng = np.random.default_rng(43)
    x, offsets, params, expert_ids = make_expert_case(rng, e=4, groups=3, widths=WIDE, layer_norm=False,
                                                      dtype=np.float32, rows_per_expert=14, gated=True, bias=True)
    if mode == "none":
        check_expert_case(backend_name, (x, offsets, params, expert_ids, WIDE, "silu", False, False), gated=True)
        return
    backend = get_backend(backend_name)
    if not getattr(backend, "supports_w8a8", True):
        pytest.skip(f"{backend_name} has no w8a8 kernels in this build")
    qparams, codes, act_scales = quantize_case(rng, x, params, WIDE, False, len(expert_ids), mode)
    check_w8a8_case(backend_name, (x, offsets, qparams, codes, act_scales, expert_ids, WIDE, "silu", False, mode),
                    gated=True)


def last_layer_row_scales(x, offsets, params, expert_ids, widths, activation, layer_norm, gated=False, bias=True,
                          alpha=schema.SWIGLU_OAI_ALPHA, limit=schema.SWIGLU_OAI_LIMIT) -> np.ndarray:
    """The fake-quant reference's w8a8_dynamic scale (max|h| / 127) of each row's last-layer input: the layers
    before it through the reference, then its LayerNorm, activation (or GLU) and SmoothQuant divisor."""
    import torch.nn.functional as F

    from pimoe_export.model import functional
    from pimoe_export.model.quant_reference import activation_scale_rowwise, expert_mlp_w8a8
    from pimoe_export.ops.torch_ops import split_expert_params

    n = len(widths) - 1
    roles = split_expert_params([torch.from_numpy(p) for p in params], n, layer_norm, "w8a8_dynamic", bias)
    head = {role: tensors[: n - 1] for role, tensors in roles.items()}  # the hidden layers, the last one bare
    xs, offs = torch.from_numpy(x), torch.from_numpy(offsets)
    # all n - 1 head layers as hidden layers: gated=False keeps the last head layer's raw (pre-GLU) output
    h = expert_mlp_w8a8(xs, offs, head, expert_ids, activation, layer_norm, 1e-5, "w8a8_dynamic", [], gated,
                        alpha, limit)
    scales = np.ones(x.shape[0], np.float32)
    for g, e in enumerate(expert_ids):
        lo, hi = int(offsets[e]), int(offsets[e + 1])
        if hi > lo:
            t = h[lo:hi].float()
            if gated:
                t = functional.glu(t, activation, alpha, limit) / roles["act_smooth"][n - 1][g].float()
                scales[lo:hi] = activation_scale_rowwise(t).reshape(-1).numpy()
                continue
            if layer_norm:
                t = F.layer_norm(t, (t.shape[-1],), roles["ln_gamma"][n - 2][g].float(),
                                 roles["ln_beta"][n - 2][g].float(), 1e-5)
            t = functional.activation_fn(activation, t) / roles["act_smooth"][n - 1][g].float()
            scales[lo:hi] = activation_scale_rowwise(t).reshape(-1).numpy()
    return scales


@pytest.mark.slow
@pytest.mark.parametrize("kernel_set", other_kernel_sets())
def test_op_tests_pass_on_every_kernel_set(kernel_set, tmp_path) -> None:
    """The ONNX Runtime op tests again on every other CPU kernel set this machine runs (the generic kernels; avx2
    where the library picks avx512; the AVX-512 source on SIMDe: tests/cpu_kernel_sets.py), each in a subprocess:
    the library reads PIMOE_CPU_ISA once per process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PIMOE_CPU_ISA": kernel_set}
    probe = subprocess.run([sys.executable, "-c", "from pimoe_export.native.libraries import check_ort_library, "
                            "find_ort_library; print(check_ort_library(str(find_ort_library()))['cpu_isa'])"],
                           capture_output=True, text=True, env=env, cwd=root, timeout=120)
    if probe.returncode != 0:
        pytest.skip(f"libpimoe_ort is not built: {probe.stderr.strip().splitlines()[-1:]}")
    assert probe.stdout.strip() == kernel_set, probe.stdout
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:logging",
                             str(Path(__file__)), "-k", "ort and not cuda and not every_kernel_set", "--basetemp",
                             str(tmp_path / "t")],
                            capture_output=True, text=True, env=env, cwd=root, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:]
    assert " passed" in result.stdout and " failed" not in result.stdout
