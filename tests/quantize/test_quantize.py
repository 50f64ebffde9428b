"""INT8: weight quantisation, calibration methods, the INT8 ONNX, and parity of the quantised layer."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from pimoe_export.errors import ArtifactError, PiMoEInputError
from pimoe_export.export.exporter import export_onnx
from pimoe_export.model import create_from_preset
from pimoe_export.model.source import load_calibration_data
from pimoe_export.quantize import default_fp32_path, quantize_model
from pimoe_export.quantize.calibrate import BINS, LayerStats, collect_stats, threshold
from pimoe_export.quantize.int8 import FakeQuantPiMoE, quantize_weight, read_quant_params
from pimoe_export.runtime.ort import create_session
from pimoe_export.validate.check import check_onnx


def test_weight_quantisation_is_symmetric_per_channel() -> None:
    w = np.array([[0.5, -1.0, 0.25], [0.0, 0.0, 0.0], [3.0, 1.5, -0.75]], np.float32)
    q, s = quantize_weight(w)
    assert q.dtype == np.int8 and s.dtype == np.float32
    np.testing.assert_allclose(s, [1.0 / 127, 1.0, 3.0 / 127], rtol=1e-7)
    assert q[0, 1] == -127 and q[2, 0] == 127 and (q[1] == 0).all()
    # half a step of each row's own scale at most (not of the largest scale: the all-zero row's placeholder 1.0
    # would allow an error of 0.5 everywhere); the all-zero row is exact
    err = np.abs(q.astype(np.float32) * s[:, None] - w)
    assert (err[[0, 2]] <= s[[0, 2], None] / 2 + 1e-7).all() and (err[1] == 0).all()


def stats_from(samples: np.ndarray) -> LayerStats:
    mags = np.abs(samples)
    amax = float(mags.max())
    hist = np.histogram(mags[mags > 0], bins=BINS, range=(0, amax))[0].astype(np.float64)
    return LayerStats(amax=amax, rows=samples.size, hist=hist)


def test_thresholds_on_known_distributions() -> None:
    rng = np.random.default_rng(0)
    gauss = stats_from(rng.standard_normal(400_000))
    assert threshold(gauss, "max") == gauss.amax
    p = threshold(gauss, "percentile", percentile=99.0)
    assert p == pytest.approx(2.576, rel=0.02)  # 99th percentile of |N(0,1)|
    for method in ("entropy", "mse"):  # both clip the tail of a gaussian, neither clips its bulk
        t = threshold(gauss, method)
        assert 2.0 < t < gauss.amax, (method, t, gauss.amax)
    uniform = stats_from(rng.uniform(-1, 1, 400_000))
    for method in ("entropy", "mse", "percentile"):  # nothing to gain by clipping a uniform distribution
        assert threshold(uniform, method) > 0.9 * uniform.amax, method
    # a spike of exact zeros (post-ReLU) must not drag the threshold down: zeros are not in the histogram
    relu = np.maximum(rng.standard_normal(400_000), 0)
    assert threshold(stats_from(relu), "entropy") > 2.0
    with pytest.raises(ValueError, match="calibration method"):
        threshold(gauss, "kl")


def test_calibration_data_formats_and_errors(tmp_path) -> None:
    x = np.random.default_rng(0).standard_normal((3, 5, 16)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", hidden_states=x)
    from safetensors.numpy import save_file

    save_file({"a": x[0], "b": x[1:]}, str(tmp_path / "calib.safetensors"))
    assert load_calibration_data(tmp_path / "calib.npz", 16)[0].shape == (3, 5, 16)
    assert [t.shape for t in load_calibration_data(tmp_path / "calib.safetensors", 16)] == [(1, 5, 16), (2, 5, 16)]
    assert len(load_calibration_data(iter([x[0], torch.from_numpy(x[1])]), 16)) == 2
    with pytest.raises(PiMoEInputError, match=r"\[N, 8\]"):
        load_calibration_data(x, 8)
    bad = x.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(PiMoEInputError, match="NaN"):
        load_calibration_data(bad, 16)
    with pytest.raises(PiMoEInputError, match="does not exist"):
        load_calibration_data(tmp_path / "missing.npz", 16)


def test_calibration_sees_every_expert_layer_input() -> None:
    model = create_from_preset("tiny", seed=3)
    stats = collect_stats(model, [torch.randn(2, 64, 16)])
    assert stats.tokens == 128
    layers = {(e, layer) for e in range(model.num_experts) for layer in range(len(model.experts[e].layers))}
    assert set(stats.layers) <= layers and len(stats.layers) >= len(layers) - 3
    assert sum(stats.layers[(e, 0)].rows for e in range(4) if (e, 0) in stats.layers) == 128 * 2  # k = 2


@pytest.fixture(scope="module", params=["seed-512", "seed-types"])
def quantised(request, tmp_path_factory):
    model = create_from_preset(request.param, seed=11)
    out = tmp_path_factory.mktemp(request.param)
    fp32 = out / "model.onnx"
    export_onnx(model, fp32)
    # calibration data (seed 0) is disjoint from the check data (seed 1234, DEFAULT in check_onnx)
    calib = torch.randn(8, 256, model.hidden_size, generator=torch.Generator().manual_seed(0))
    result = quantize_model(model, out / "model.int8.onnx", calibration=calib, method="entropy", fp32_onnx=fp32)
    return model, result, out


@pytest.mark.slow
def test_int8_graph_structure(quantised) -> None:
    model, result, _ = quantised
    proto = onnx.load(str(result.onnx_path))
    inits = {t.name: t for t in proto.graph.initializer}
    mlps = [n for n in proto.graph.node if n.op_type == "PiMoEExpertMLP"]
    assert len(mlps) == len(model.config.expert_groups())
    for node in mlps:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["quant_mode"] == b"w8a8"
        assert len(attrs["act_scales"]) == (len(attrs["widths"]) - 1) * len(attrs["expert_ids"])
        int8 = [i for i in node.input if i in inits and inits[i].data_type == onnx.TensorProto.INT8]
        assert len(int8) == len(attrs["widths"]) - 1
    # the router stays fp32: no int8 tensor outside the expert nodes, no Q/DQ nodes
    expert_inputs = {i for n in mlps for i in n.input}
    assert all(t.data_type != onnx.TensorProto.INT8 for name, t in inits.items() if name not in expert_inputs)
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in proto.graph.node)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["pimoe.precision"] == "w8a8" and json.loads(meta["pimoe.quantization"])["router"] == "fp32"
    # codes and scales read back exactly
    params = read_quant_params(result.onnx_path)
    for a, b in zip(params.groups, result.params.groups, strict=True):
        assert a.expert_ids == b.expert_ids and a.act_scales == pytest.approx(b.act_scales)
        for la, lb in zip(a.layers, b.layers, strict=True):
            assert np.array_equal(la.weight, lb.weight) and np.array_equal(la.w_scale, lb.w_scale)


@pytest.mark.slow
def test_int8_parity_acceptance(quantised) -> None:
    """Issue acceptance 1: 100% routing agreement with the fp32 router, cosine >= 0.999 vs fp32 on data
    disjoint from calibration; report files and plots produced; kernels equal the fake-quant reference."""
    model, result, out = quantised
    report = check_onnx(model, result.onnx_path, out / "report_int8", shapes=((1, 1), (2, 16), (4, 64), (8, 128)))
    assert report.passed, report.failures
    assert report.routing_agreement == 1.0
    assert report.output_stats["output"].cosine >= 0.999
    assert report.kernel_vs_fake_quant["output"]["rel_l2"] < 1e-3
    for name in ("report.json", "report.md", "error_histogram.png", "per_expert_error.png"):
        assert (out / "report_int8" / name).is_file()
    assert "Kernel error alone" in (out / "report_int8" / "report.md").read_text()


@pytest.mark.slow
def test_fake_quant_module_matches_ort_int8(quantised) -> None:
    model, result, _ = quantised
    x = np.random.default_rng(5).standard_normal((2, 32, model.hidden_size)).astype(np.float32)
    y, ids, _ = create_session(result.onnx_path).run(None, {"hidden_states": x})
    with torch.no_grad():
        ref, ref_ids, _ = FakeQuantPiMoE(model, result.params)(torch.from_numpy(x))
    assert np.array_equal(ids, ref_ids.numpy())
    ref = ref.numpy()
    # same integer math; an activation code can move by one step where fp32 rounding in LayerNorm/activation
    # crosses a rounding boundary, which shows as a small local difference (docs/precision.md, measured here:
    # seed-512 rel L2 8.3e-8, seed-types 6.4e-4 with max 3.6e-3 of max|ref|: the bounds below leave < 3x)
    assert np.linalg.norm(y - ref) <= 1e-3 * np.linalg.norm(ref)
    assert np.abs(y - ref).max() <= 1e-2 * np.abs(ref).max()


def test_dynamic_mode_needs_no_calibration(tmp_path) -> None:
    model = create_from_preset("tiny", seed=2)
    result = quantize_model(model, tmp_path / "tiny.int8.onnx", mode="w8a8_dynamic")
    assert result.params.info["calibration_tokens"] == 0
    # given no fp32 export, it writes one next to the output: tiny.int8.onnx's is tiny.fp32.onnx
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.fp32.onnx", "tiny.int8.onnx"]
    report = check_onnx(model, result.onnx_path, tmp_path / "report", plots=False)
    assert report.passed, report.failures
    assert report.precision == "w8a8_dynamic"


@pytest.mark.parametrize(("output", "fp32"), [("model.int8.onnx", "model.fp32.onnx"), ("q.onnx", "q.fp32.onnx"),
                                              ("run.int8", "run.fp32.onnx"), ("a.b.int8.onnx", "a.b.fp32.onnx")])
def test_the_fp32_export_is_written_next_to_the_output_under_its_name(tmp_path, output, fp32) -> None:
    assert default_fp32_path(tmp_path / output) == tmp_path / fp32


def test_quantising_an_export_of_other_weights_is_refused(tmp_path) -> None:
    a, b = create_from_preset("tiny", seed=1), create_from_preset("tiny", seed=2)
    export_onnx(a, tmp_path / "a.onnx")
    with pytest.raises(ArtifactError, match="different weights"):
        quantize_model(b, tmp_path / "b.int8.onnx", fp32_onnx=tmp_path / "a.onnx")


def test_weights_in_int8_onnx_are_the_quantised_model_weights(tmp_path) -> None:
    model = create_from_preset("tiny", seed=4)
    result = quantize_model(model, tmp_path / "t.int8.onnx", method="max")
    proto = onnx.load(str(result.onnx_path))
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    group0 = model.config.expert_groups()[0][1]
    w = inits["expert_group0.weight_0.int8"].astype(np.float32) * inits["expert_group0.w_scale_0"][..., None]
    w = w / inits["expert_group0.act_smooth_0"][:, None, :]  # the codes carry the SmoothQuant factors
    ref = torch.stack([model.experts[e].layers[0].weight.detach() for e in group0]).numpy()
    smooth = inits["expert_group0.act_smooth_0"][:, None, :]
    # half a step per element: the step of W * smooth is its output row's max / 127 (per output channel, computed
    # here from the float weights), divided back by the column's smoothing factor
    step = np.abs(ref * smooth).max(axis=-1, keepdims=True) / 127
    assert (np.abs(w - ref) <= step / 2 / smooth + 1e-7).all()


def test_quant_params_use_the_percentile_asked_for_and_name_the_dynamic_method() -> None:
    """Static w8a8 with method percentile: every (expert, layer) threshold is calibrate.threshold of that expert's
    statistics at the given percentile (two percentiles give two answers); dynamic mode records its method as
    dynamic-per-row whatever method was passed."""
    from pimoe_export.quantize.int8 import compute_quant_params

    model = create_from_preset("tiny", seed=3)
    stats = collect_stats(model, [torch.randn(2, 64, 16, generator=torch.Generator().manual_seed(1))])
    by_percentile = {}
    for p in (90.0, 99.9):
        params = compute_quant_params(model, stats, "percentile", "w8a8", percentile=p)
        assert params.method == "percentile" and params.info["percentile"] == p
        want = {f"expert{e}_layer{layer}": threshold(st, "percentile", p) for (e, layer), st in stats.layers.items()}
        got = params.info["thresholds"]
        assert {key: got[key] for key in want} == want
        by_percentile[p] = got
    assert by_percentile[90.0] != by_percentile[99.9]
    assert params.info["uncalibrated_experts"] == []
    # an expert that saw no calibration token is named, and takes its group's widest range
    for key in [key for key in stats.layers if key[0] == 1]:
        del stats.layers[key]
    params = compute_quant_params(model, stats, "max")  # the default mode: static w8a8
    assert params.mode == "w8a8" and all(g.act_scales for g in params.groups)
    assert params.info["uncalibrated_experts"] == [1]
    dynamic = compute_quant_params(model, None, "percentile", "w8a8_dynamic")
    assert dynamic.method == "dynamic-per-row" and dynamic.info["method"] == "dynamic-per-row"
    assert dynamic.info["thresholds"] == {} and all(g.act_scales == [] for g in dynamic.groups)
    # what the graph's pimoe.quantization metadata states besides the numbers: the precision plan
    # (docs/precision.md: symmetric per-channel int8 weights, the router in fp32), in both modes
    for info in (params.info, dynamic.info):
        assert (info["weights"], info["router"]) == ("int8 symmetric per output channel", "fp32")
    assert set(params.info) == set(dynamic.info) == {
        "mode", "method", "percentile", "calibration_tokens", "uncalibrated_experts", "thresholds", "weights",
        "smoothing", "router"}


def test_an_expert_without_calibration_tokens_takes_its_groups_widest_range() -> None:
    """Six experts in one group: with one expert's statistics gone, its threshold in each layer is the largest of
    the other five (which differ, so the widest is not also the narrowest), and its static scale follows from it."""
    from pimoe_export.model.moe_block import ExpertsConfig, MoEBlock, MoEBlockConfig
    from pimoe_export.quantize.int8 import compute_quant_params

    block = MoEBlock(MoEBlockConfig(16, 6, 2, ExpertsConfig(8, "silu")), initialize=False)
    block.reset_parameters(torch.Generator().manual_seed(4))
    stats = collect_stats(block.eval(), [torch.randn(2, 64, 16, generator=torch.Generator().manual_seed(2))])
    for key in [key for key in stats.layers if key[0] == 2]:
        del stats.layers[key]
    params = compute_quant_params(block, stats, "max")
    (group,) = params.groups
    assert params.info["uncalibrated_experts"] == [2] and group.expert_ids == list(range(6))
    got = params.info["thresholds"]
    for layer in range(len(group.layers)):
        others = [threshold(stats.layers[(e, layer)], "max", 99.99) for e in (0, 1, 3, 4, 5)]
        assert len(set(others)) > 1
        assert got[f"expert2_layer{layer}"] == max(others)
        assert group.act_scales[layer * 6 + 2] == float(np.float32(max(others) / 127.0))


def test_smooth_alpha_0_turns_smoothquant_off_and_its_range_is_0_to_1() -> None:
    """smooth_alpha 0 (documented: None or 0 disables SmoothQuant) gives exactly the parameters of None: every
    smoothing factor 1 and none recorded; 0.5 does smooth; 1 is accepted; a value outside [0, 1] or not finite is
    refused naming the range."""
    from pimoe_export.quantize import calibrated_params

    model = create_from_preset("tiny", seed=3)
    data = torch.randn(2, 64, 16, generator=torch.Generator().manual_seed(1))
    off, zero, half = (calibrated_params(model, calibration=data, smooth_alpha=a)[""] for a in (None, 0, 0.5))
    for a, b in zip(off.groups, zero.groups, strict=True):
        assert a.expert_ids == b.expert_ids and a.act_scales == b.act_scales
        for la, lb in zip(a.layers, b.layers, strict=True):
            assert np.array_equal(la.weight, lb.weight) and np.array_equal(la.w_scale, lb.w_scale)
            assert (lb.act_smooth == 1).all()
    assert zero.info["smoothing"] is None and half.info["smoothing"] == 0.5
    assert any((layer.act_smooth != 1).any() for group in half.groups for layer in group.layers)
    calibrated_params(model, calibration=data, smooth_alpha=1)
    for bad in (-0.01, 1.01, float("nan")):
        with pytest.raises(PiMoEInputError, match=r"smooth_alpha must be in \[0, 1\]"):
            calibrated_params(model, calibration=data, smooth_alpha=bad)
