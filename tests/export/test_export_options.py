"""Every CLI/API option at a NON-default value, followed through to its effect.

An option tested only at its default passes even when the value is silently dropped on the way (the default is
what arrives anyway). Each test here sets a value the code would never produce by itself and checks the
artefact: the graph's dtypes and nodes, the quantisation scales and modes written into the INT8 graph, the
report's shapes and feeds, the pipeline's seed and INT8 mode. Op attributes at non-default values are written
into the exported graph, read back from the ONNX node, and the graph still matches PyTorch on ONNX Runtime.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import helper

from pimoe_export.cli import main
from pimoe_export.interface import META_PRECISION, META_QUANT
from pimoe_export.model import create_from_preset
from pimoe_export.ops import schema


def _tiny(tmp_path, seed: int = 0, **overrides):
    model = create_from_preset("tiny", seed=seed, **overrides).eval()
    model_dir = tmp_path / f"tiny{seed}"
    model.save_pretrained(model_dir)
    return model, model_dir


def _nodes(path, op_type: str) -> list[dict]:
    proto = onnx.load(str(path))
    return [{a.name: helper.get_attribute_value(a) for a in n.attribute} for n in proto.graph.node
            if n.domain == schema.DOMAIN and n.op_type == op_type]


def _metadata(path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


# ------------------------------------------------------------------------------------------ export
@pytest.mark.slow
def test_export_fp16_and_standard_ops_reach_the_graph(tmp_path) -> None:
    _, model_dir = _tiny(tmp_path)
    fp16, standard = tmp_path / "fp16.onnx", tmp_path / "standard.onnx"
    assert main(["export", str(model_dir), "-o", str(fp16), "--fp16"]) == 0
    assert main(["export", str(model_dir), "-o", str(standard), "--standard-ops"]) == 0
    proto16 = onnx.load(str(fp16))
    assert proto16.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert _metadata(fp16)[META_PRECISION] == "fp16"
    assert _nodes(fp16, schema.EXPERT_MLP)  # still the custom ops
    proto_std = onnx.load(str(standard))
    assert not [n for n in proto_std.graph.node if n.domain == schema.DOMAIN]  # no pimoe op at all
    assert proto_std.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


# ------------------------------------------------------------------------------------------ quantize
def _act_scales(path) -> np.ndarray:
    return np.concatenate([np.asarray(a["act_scales"], np.float64) for a in _nodes(path, schema.EXPERT_MLP)])


@pytest.mark.slow
def test_quantize_method_percentile_and_smoothing_reach_the_graph(tmp_path) -> None:
    """--method percentile --percentile 100 clips nothing, so its activation scales are exactly --method max's
    (the histogram's last non-empty bin is the one holding the maximum); --percentile 50 clips half the mass and
    gives smaller scales; a dropped --percentile (default 99.99) or --method (default entropy) differs from both."""
    _, model_dir = _tiny(tmp_path)
    calib = tmp_path / "calib.npy"
    np.save(calib, np.random.default_rng(0).standard_normal((512, 16)).astype(np.float32))
    fp32 = tmp_path / "fp32.onnx"  # exported once; --onnx reuses it
    assert main(["export", str(model_dir), "-o", str(fp32)]) == 0
    common = ["--calib", str(calib), "--smooth-alpha", "0", "--onnx", str(fp32)]

    def quantize(name: str, *options: str):
        path = tmp_path / f"{name}.int8.onnx"
        assert main(["quantize", str(model_dir), "-o", str(path), *common, *options]) == 0
        return path

    by_max = quantize("max", "--method", "max")
    p100 = quantize("p100", "--method", "percentile", "--percentile", "100")
    p50 = quantize("p50", "--method", "percentile", "--percentile", "50")
    entropy = quantize("entropy")
    info = json.loads(_metadata(p50)[META_QUANT])
    assert (info["method"], info["percentile"], info["smoothing"]) == ("percentile", 50.0, None)
    np.testing.assert_array_equal(_act_scales(p100), _act_scales(by_max))
    assert (_act_scales(p50) < _act_scales(by_max)).all()
    assert not np.array_equal(_act_scales(entropy), _act_scales(by_max))
    # --smooth-alpha at a non-zero value: SmoothQuant divisors other than 1 in the graph
    smooth = quantize("smooth", "--method", "max", "--smooth-alpha", "0.8")
    assert json.loads(_metadata(smooth)[META_QUANT])["smoothing"] == 0.8
    smooth_inputs = {i.name for i in onnx.load(str(smooth)).graph.initializer if "smooth" in i.name}
    assert smooth_inputs
    values = [onnx.numpy_helper.to_array(i) for i in onnx.load(str(smooth)).graph.initializer
              if i.name in smooth_inputs]
    assert any(not np.allclose(v, 1.0) for v in values)
    plain = [onnx.numpy_helper.to_array(i) for i in onnx.load(str(by_max)).graph.initializer if "smooth" in i.name]
    assert all(np.array_equal(v, np.ones_like(v)) for v in plain)


@pytest.mark.slow
def test_quantize_dynamic_and_calib_tokens(tmp_path) -> None:
    """--calib-tokens 300 of a 700-token file: 300 tokens calibrate (before the fix, a single [N, H] array was
    never cut and all 700 were used)."""
    _, model_dir = _tiny(tmp_path)
    calib = tmp_path / "calib.npy"
    np.save(calib, np.random.default_rng(1).standard_normal((700, 16)).astype(np.float32))
    fp32 = tmp_path / "fp32.onnx"
    assert main(["export", str(model_dir), "-o", str(fp32)]) == 0
    dynamic, limited = tmp_path / "dyn.int8.onnx", tmp_path / "lim.int8.onnx"
    assert main(["quantize", str(model_dir), "-o", str(dynamic), "--dynamic", "--onnx", str(fp32)]) == 0
    assert main(["quantize", str(model_dir), "-o", str(limited), "--calib", str(calib), "--calib-tokens", "300",
                 "--method", "max", "--onnx", str(fp32)]) == 0
    assert {a["quant_mode"] for a in _nodes(dynamic, schema.EXPERT_MLP)} == {b"w8a8_dynamic"}
    assert _metadata(dynamic)[META_PRECISION] == "w8a8_dynamic"
    assert json.loads(_metadata(limited)[META_QUANT])["calibration_tokens"] == 300


# ------------------------------------------------------------------------------------------ check
@pytest.mark.slow
def test_check_shapes_seed_and_no_plots_reach_the_report(tmp_path) -> None:
    from polygraphy.json import load_json

    _, model_dir = _tiny(tmp_path)
    path = tmp_path / "tiny.onnx"
    assert main(["export", str(model_dir), "-o", str(path)]) == 0
    reports = {}
    for name, options in {"a": ["--seed", "77"], "b": ["--seed", "78"]}.items():
        out = tmp_path / f"report-{name}"
        assert main(["check", str(model_dir), "--onnx", str(path), "-o", str(out), "--shapes", "3x5,1x2",
                     "--no-plots", *options]) == 0
        reports[name] = (json.loads((out / "report.json").read_text()), load_json(str(out / "inputs.json")), out)
    report, feeds, out = reports["a"]
    assert report["shapes"] == [[3, 5], [1, 2]]
    assert [f["hidden_states"].shape for f in feeds] == [(3, 5, 16), (1, 2, 16)]
    assert not list(out.glob("*.png"))
    other = reports["b"][1]
    assert not np.array_equal(feeds[0]["hidden_states"], other[0]["hidden_states"])  # the seed reached the data
    assert np.array_equal(feeds[0]["hidden_states"],
                          np.random.default_rng(77).standard_normal((3, 5, 16)).astype(np.float32))


# ------------------------------------------------------------------------------------------ pipeline
def test_pipeline_options_reach_run_pipeline(tmp_path, monkeypatch) -> None:
    import pimoe_export.pipeline as pipeline

    seen = {}

    def record(**kwargs):
        seen.update(kwargs)
        return {"passed": True}

    monkeypatch.setattr(pipeline, "run_pipeline", record)
    out = tmp_path / "out"
    assert main(["pipeline", "--preset", "tiny", "-o", str(out), "--seed", "9", "--bench-repeats", "3",
                 "--int8-mode", "w8a8_dynamic", "--quiet", "--force"]) == 0
    assert seen == {"output": out, "preset": "tiny", "model_dir": None, "seed": 9, "bench_repeats": 3,
                    "progress": False, "force": True, "calib_text": None, "int8_mode": "w8a8_dynamic"}


@pytest.mark.slow
def test_pipeline_steps_use_the_seed_and_int8_mode(tmp_path) -> None:
    from pimoe_export._files import OutputDir
    from pimoe_export.pipeline import PipelineOptions, Run, step_export, step_int8, step_model

    run = Run(OutputDir(tmp_path / "p"), PipelineOptions("tiny", None, seed=5, bench_repeats=1,
                                                         int8_mode="w8a8_dynamic"))
    model = step_model(run)
    expected = create_from_preset("tiny", seed=5).state_dict()
    default = create_from_preset("tiny", seed=0).state_dict()
    got = model.source.module.state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert not all(torch.equal(got[k], default[k]) for k in default)
    int8 = step_int8(run, model, step_export(run, model))
    detail = int8.detail()
    assert detail["mode"] == "w8a8_dynamic" and detail["method"] == "dynamic-per-row"
    assert {a["quant_mode"] for a in _nodes(int8.onnx, schema.EXPERT_MLP)} == {b"w8a8_dynamic"}


# ------------------------------------------------------------------------------------------ op attributes
ATTRIBUTE_CASES = {
    # top-k 3 of 4 without normalisation, SiLU experts without LayerNorm, a sharper router
    "k3-raw-silu-noln": {"top_k": 3, "normalize": False, "activation": "silu", "layer_norm": False,
                         "temperature": 0.5},
    # top-1 (normalisation of one weight would make it 1), ReLU, LayerNorm with a large epsilon
    "k1-relu-eps": {"top_k": 1, "activation": "relu", "layer_norm": True, "layer_norm_eps": 0.25},
    # tanh-approximated GELU, normalised top-2 (the kernel's default normalize is 0)
    "k2-norm-gelu_tanh": {"top_k": 2, "normalize": True, "activation": "gelu_tanh"},
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(ATTRIBUTE_CASES))
def test_op_attributes_at_non_default_values_reach_the_graph_and_ort(tmp_path, case) -> None:
    from pimoe_export.export.exporter import export_onnx
    from pimoe_export.runtime.ort import create_session

    settings = ATTRIBUTE_CASES[case]
    model = create_from_preset("tiny", seed=3, **settings).eval()
    path = tmp_path / f"{case}.onnx"
    export_onnx(model, path)
    (route,) = _nodes(path, schema.ROUTE)
    assert route["k"] == settings["top_k"]
    assert route.get("normalize", 0) == int(model.config.normalize)
    mlps = _nodes(path, schema.EXPERT_MLP)
    assert mlps
    for attrs in mlps:
        assert attrs.get("activation", b"gelu").decode() == settings["activation"]
        assert attrs.get("layer_norm", 1) == int(settings.get("layer_norm", True))
        if settings.get("layer_norm", True):
            assert attrs.get("eps", 1e-5) == pytest.approx(settings.get("layer_norm_eps", 1e-5))
    x = np.random.default_rng(4).standard_normal((2, 9, 16)).astype(np.float32)
    y, ids, w = create_session(path).run(None, {"hidden_states": x})
    with torch.no_grad():
        ref, info = model(torch.from_numpy(x), return_routing_info=True)
    assert ids.shape == (2, 9, settings["top_k"])
    np.testing.assert_array_equal(ids, info.ids.numpy())
    np.testing.assert_allclose(w, info.weights.numpy(), rtol=2e-6, atol=1e-7)
    if model.config.normalize:
        np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)
    else:
        assert (w.sum(-1) < 1.0 - 1e-3).any()  # raw softmax probabilities of k < E experts
    # fp32 contract (docs/precision.md): max |error| <= 1e-5 max|ref|
    ref = ref.numpy()
    assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()
