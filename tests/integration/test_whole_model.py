"""A model of the user's own (not a Hugging Face model) with PiMoE layers inside: one ONNX graph with the pimoe
ops at every MoE layer, several named inputs and outputs, padding; run on ONNX Runtime, packaged as a unit, built
by TensorRT-RTX when it is available, and checked against PyTorch through the Python API."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from pimoe_export.errors import PiMoEExportError, PluginLoadError
from pimoe_export.model.factory import build_model, preset_config

VOCAB, HIDDEN = 50, 16


class Block(nn.Module):
    """Pre-norm self-attention (padding masked) + a PiMoE feed-forward, residual around both."""

    def __init__(self, seed: int, adaptive: bool = False) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(HIDDEN), nn.LayerNorm(HIDDEN)
        self.qkv, self.proj = nn.Linear(HIDDEN, 3 * HIDDEN), nn.Linear(HIDDEN, HIDDEN)
        self.moe = build_model(preset_config("tiny"), seed=seed, adaptive=adaptive)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        scores = q @ k.transpose(1, 2) / math.sqrt(HIDDEN)
        scores = scores.masked_fill(mask[:, None, :] == 0, torch.finfo(scores.dtype).min)
        x = x + self.proj(torch.softmax(scores, dim=-1) @ v)
        return x + self.moe(self.norm2(x), mask)


class TinyEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.blocks = nn.ModuleList([Block(1), Block(2, adaptive=True)])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x, attention_mask)
        m = attention_mask.unsqueeze(-1).float()
        return {"last_hidden_state": x, "pooled": (x * m).sum(1) / m.sum(1).clamp_min(1.0)}


def feeds(seed: int, shapes=((1, 5), (3, 12), (2, 7))) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for b, s in shapes:
        mask = np.ones((b, s), np.int64)
        for row in range(b):
            mask[row, rng.integers(1, s + 1):] = 0  # right padding, at least one valid token
        out.append({"input_ids": rng.integers(0, VOCAB, (b, s)).astype(np.int64), "attention_mask": mask})
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from pimoe_export.export.exporter import export_model

    model = TinyEncoder().eval()
    path = tmp_path_factory.mktemp("whole") / "model.onnx"
    example = {k: torch.from_numpy(v) for k, v in feeds(0, ((2, 8),))[0].items()}
    result = export_model(model, path, example, routing_outputs=True)
    return model, path, result


def test_one_graph_with_the_pimoe_ops_at_every_layer(exported) -> None:
    from pimoe_export.interface import read_metadata

    model, path, result = exported
    proto = onnx.load(str(path))
    ops = [n.op_type for n in proto.graph.node if n.domain == "pimoe"]
    groups = len(model.blocks[0].moe.config.expert_groups())
    assert ops.count("PiMoERoute") == ops.count("PiMoEDispatch") == ops.count("PiMoECombine") == 2
    assert ops.count("PiMoEExpertMLP") == 2 * groups
    assert [i.name for i in proto.graph.input] == ["input_ids", "attention_mask"]
    names = [o.name for o in proto.graph.output]
    assert names == ["last_hidden_state", "pooled", "blocks.0.moe/expert_ids", "blocks.0.moe/expert_weights",
                     "blocks.1.moe/expert_ids", "blocks.1.moe/expert_weights"]
    meta = read_metadata(path)
    assert meta.is_model and set(meta.layer_configs) == {"blocks.0.moe", "blocks.1.moe"}
    dims = {t.name: t.dims for t in meta.interface.inputs + meta.interface.outputs}
    assert dims["input_ids"] == ("batch", "sequence") and dims["pooled"] == ("batch", HIDDEN)
    assert dims["last_hidden_state"] == ("batch", "sequence", HIDDEN)
    assert result.node_counts["pimoe::PiMoERoute"] == 2
    # torch.chunk in the attention exports as SplitToSequence/SequenceAt, which TensorRT cannot parse: rewritten
    assert not {"SplitToSequence", "SequenceAt"} & {n.op_type for n in proto.graph.node}
    assert "Split" in {n.op_type for n in proto.graph.node}


def test_onnx_runtime_equals_pytorch_at_every_shape(exported) -> None:
    from pimoe_export.runtime.ort import create_session

    model, path, _ = exported
    try:
        session = create_session(path)
    except PluginLoadError as exc:
        pytest.skip(f"libpimoe_ort is not built: {exc}")
    for feed in feeds(1):
        got = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed), strict=True))
        with torch.no_grad():
            ref = model(**{k: torch.from_numpy(v) for k, v in feed.items()})
        for name in ("last_hidden_state", "pooled"):
            r = ref[name].numpy()
            err = np.linalg.norm(got[name] - r) / np.linalg.norm(r)
            assert err <= 1e-5, (name, feed["input_ids"].shape, err)
        # padded positions: zero MoE contribution, as in PyTorch (the residual stream itself is defined there)
        assert np.isfinite(got["last_hidden_state"]).all()


def test_unit_runs_named_inputs_and_check_passes_through_the_python_api(exported, tmp_path) -> None:
    from pimoe_export.build.units import package_ort
    from pimoe_export.runtime.engine import Engine
    from pimoe_export.validate.check import check_onnx, check_unit

    model, path, _ = exported
    try:
        package_ort(path, tmp_path / "unit")
    except PluginLoadError as exc:
        pytest.skip(f"libpimoe_ort is not built: {exc}")
    feed = feeds(2)[1]
    with Engine.load(tmp_path / "unit") as engine:
        assert engine.interface.input_names == ("input_ids", "attention_mask")
        out = engine.run_named(feed)
        with pytest.raises(Exception, match="several inputs"):
            engine.run(feed["input_ids"])
    with torch.no_grad():
        ref = model(**{k: torch.from_numpy(v) for k, v in feed.items()})
    assert np.abs(out["pooled"] - ref["pooled"].numpy()).max() <= 1e-5 * np.abs(ref["pooled"].numpy()).max()

    for report in (check_onnx(model, path, tmp_path / "onnx_report", feeds=feeds(3), plots=False),
                   check_unit(model, tmp_path / "unit", tmp_path / "unit_report", feeds=feeds(3), plots=False)):
        assert report.passed, report.failures
        assert set(report.output_stats) == {"last_hidden_state", "pooled", "blocks.0.moe/expert_weights",
                                            "blocks.1.moe/expert_weights"}
        assert report.routing_by_layer == {"blocks.0.moe": 1.0, "blocks.1.moe": 1.0}
        assert report.output_stats["last_hidden_state"].rel_l2 <= 1e-5


def test_check_fails_when_one_layer_differs(exported, tmp_path) -> None:
    """The check compares every layer: a changed expert weight in the second layer's PyTorch model fails it."""
    import copy

    from pimoe_export.validate.check import check_onnx

    model, path, _ = exported
    changed = copy.deepcopy(model)
    with torch.no_grad():
        for expert in changed.blocks[1].moe.experts:
            expert.layers[-1].weight.mul_(1.01)
    try:
        report = check_onnx(changed, path, tmp_path / "report", feeds=feeds(4), plots=False)
    except PluginLoadError as exc:
        pytest.skip(f"libpimoe_ort is not built: {exc}")
    assert not report.passed
    assert any("last_hidden_state" in f or "Polygraphy" in f for f in report.failures)


def test_rtx_builds_the_whole_model_fp32_and_int8(exported, tmp_path) -> None:
    from pimoe_export.build.units import BuildOptions, build_unit
    from pimoe_export.errors import BackendUnavailableError
    from pimoe_export.native import libraries as L
    from pimoe_export.native import tensorrt_loader as T

    _, path, _ = exported
    try:
        L.find_plugin_library()
        T.import_tensorrt("rtx")
    except (PluginLoadError, BackendUnavailableError) as exc:
        pytest.skip(f"TensorRT-RTX or the plugin library is not available: {exc}")
    options = BuildOptions(flavour="rtx", compute_capabilities=("SM89",))
    manifest = build_unit(path, tmp_path / "unit", options=options)
    assert [t[0] for t in manifest.io["inputs"]] == ["input_ids", "attention_mask"]
    assert (tmp_path / "unit" / "model.engine").stat().st_size > 0
    from pimoe_export.quantize import quantize_model

    model = exported[0]
    int8 = quantize_model(model, tmp_path / "int8.onnx", calibration=feeds(7, ((2, 8),)), fp32_onnx=path).onnx_path
    assert build_unit(int8, tmp_path / "unit-int8", options=options).precision == "w8a8"


def test_a_model_without_pimoe_layers_is_refused(tmp_path) -> None:
    from pimoe_export.export.exporter import export_model

    with pytest.raises(PiMoEExportError, match=r"^Linear contains no PiMoE layer"):  # names the module given
        export_model(nn.Linear(4, 4), tmp_path / "x.onnx", {"x": torch.zeros(2, 4)})
    assert not (tmp_path / "x.onnx").exists()


def test_int8_of_the_whole_model_is_calibrated_per_layer_and_checked(exported, tmp_path) -> None:
    from pimoe_export.interface import MODEL_TOLERANCES, read_metadata
    from pimoe_export.quantize import quantize_model
    from pimoe_export.quantize.int8 import read_quant_params
    from pimoe_export.validate.check import check_onnx

    model, path, _ = exported
    result = quantize_model(model, tmp_path / "model.int8.onnx", calibration=feeds(5, ((4, 16),) * 4),
                            fp32_onnx=path)
    meta = read_metadata(result.onnx_path)
    assert meta.precision == "w8a8" and meta.is_model
    assert set(meta.quantization["layers"]) == {"blocks.0.moe", "blocks.1.moe"}
    proto = onnx.load(str(result.onnx_path))
    mlps = [n for n in proto.graph.node if n.op_type == "PiMoEExpertMLP"]
    assert all(any(a.name == "quant_mode" and a.s == b"w8a8" for a in n.attribute) for n in mlps)
    # each layer got its own scales: the two layers' first groups differ (different weights and inputs)
    groups = read_quant_params(result.onnx_path).groups
    per_layer = len(model.blocks[0].moe.config.expert_groups())
    assert groups[0].act_scales != groups[per_layer].act_scales
    try:
        report = check_onnx(model, result.onnx_path, tmp_path / "report", feeds=feeds(6), plots=False)
    except PluginLoadError as exc:
        pytest.skip(f"libpimoe_ort is not built: {exc}")
    assert report.precision == "w8a8"
    # docs/precision.md "Whole models": a graph of several PiMoE layers is held to interface.MODEL_TOLERANCES
    assert report.tolerances is MODEL_TOLERANCES["w8a8"]
    assert json.loads((tmp_path / "report" / "report.json").read_text())["tolerances"]["error_quantile"] == 0.95
    assert set(report.routing_by_layer) == {"blocks.0.moe", "blocks.1.moe"}
    assert report.output_stats["last_hidden_state"].cosine >= 0.999, report.failures
    assert report.passed, report.failures
    # each layer's own W8A8 error, with its own codes and scales: INT8-sized in every layer (layer 1 computed with
    # layer 0's codes would be off by the whole output, cosine near 0)
    assert list(report.layer_output_error) == ["blocks.0.moe", "blocks.1.moe"]
    for path, error in report.layer_output_error.items():
        assert error["cosine"] >= 0.99 and error["rel_l2"] <= 0.1, (path, error)


def test_fp16_whole_model_runs_within_fp16_rounding(exported, tmp_path) -> None:
    """fp16: the model's own layers in fp16, the PiMoE layers' fp16 storage with fp32 routers, biases and math."""
    from pimoe_export.export.exporter import export_model
    from pimoe_export.runtime.ort import create_session

    model = exported[0]
    example = {k: torch.from_numpy(v) for k, v in feeds(0, ((2, 8),))[0].items()}
    path = export_model(model, tmp_path / "fp16.onnx", example, precision="fp16").path
    try:
        session = create_session(path)
    except PluginLoadError as exc:
        pytest.skip(f"libpimoe_ort is not built: {exc}")
    feed = feeds(8)[1]
    got = session.run(["last_hidden_state"], feed)[0]
    assert got.dtype == np.float16
    with torch.no_grad():
        ref = model(**{k: torch.from_numpy(v) for k, v in feed.items()})["last_hidden_state"].numpy()
    err = np.linalg.norm(got.astype(np.float32) - ref) / np.linalg.norm(ref)
    assert err <= 5e-3, err  # fp16 storage of activations: ~1e-3; a wrong cast would be far off (or NaN)


def test_triton_repository_for_a_multi_input_unit(exported, tmp_path) -> None:
    """A whole-model unit's Triton config lists every named input and output with its dtype and dynamic axes."""
    from pimoe_export.build.units import package_ort
    from pimoe_export.serve.triton import write_triton_repository

    _, path, _ = exported
    try:
        package_ort(path, tmp_path / "unit")
    except PluginLoadError as exc:
        pytest.skip(f"libpimoe_ort is not built: {exc}")
    model = write_triton_repository(tmp_path / "unit", tmp_path / "repo", name="encoder", max_batch_size=8)
    specs = {s.name: (s.data_type, s.dims) for s in model.inputs + model.outputs}
    assert specs["input_ids"] == ("TYPE_INT64", (-1, -1)) and specs["attention_mask"] == ("TYPE_INT64", (-1, -1))
    assert specs["pooled"] == ("TYPE_FP32", (-1, HIDDEN))
    assert specs["blocks.1.moe/expert_ids"] == ("TYPE_INT32", (-1, -1, 2))
    config = (tmp_path / "repo" / "encoder" / "config.pbtxt").read_text()
    assert 'name: "input_ids"' in config and "max_batch_size: 8" in config
    assert "dims: [ -1 ]" in config  # batch dropped from input_ids' dims under dynamic batching
