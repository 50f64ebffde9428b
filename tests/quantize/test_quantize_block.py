"""INT8 (W8A8) of the generic MoE block every Hugging Face family imports into, on a tiny block built from its
config (no download): gated routed experts in two groups, a gated shared expert behind its sigmoid gate. The INT8
graph ONNX Runtime runs with our op library must compute what the fake-quant reference computes from the same
codes and scales (the same integers; an activation code may move one step where fp32 rounding crosses a boundary,
docs/precision.md), and stay close to the fp32 block."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pimoe_export.model.moe_block import ExpertsConfig, MoEBlock, MoEBlockConfig
from pimoe_export.quantize import quantize_model
from pimoe_export.quantize.int8 import fake_quant_form, read_quant_params

H = 16


@pytest.fixture(scope="module")
def block() -> MoEBlock:
    config = MoEBlockConfig(H, 6, 2, ExpertsConfig(8, "silu"), normalize=True, shared=ExpertsConfig(12, "silu"),
                            shared_gate=True, max_group_weights=800)  # 3 routed experts a group: 2 groups
    assert [len(g) for g in config.routed_groups()] == [3, 3]
    model = MoEBlock(config, initialize=False)
    model.reset_parameters(torch.Generator().manual_seed(21))
    return model.eval()


@pytest.mark.parametrize("mode", ["w8a8", "w8a8_dynamic"])
def test_int8_block_graph_computes_the_fake_quant_reference(block, mode, tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    from pimoe_export.runtime.ort import create_session

    calibration = torch.randn(4, 64, H, generator=torch.Generator().manual_seed(0))
    result = quantize_model(block, tmp_path / "block.int8.onnx", calibration=calibration, mode=mode, method="max")
    params = read_quant_params(result.onnx_path)
    assert params.mode == mode
    # gated groups: layer 0's codes hold the [gate; up] rows of every expert of the group
    assert [g.layers[0].weight.shape for g in params.groups] == [(3, 16, H), (3, 16, H), (1, 24, H)]
    x = np.random.default_rng(5).standard_normal((3, 11, H)).astype(np.float32)
    assert ort is not None
    session = create_session(result.onnx_path)
    y = session.run(None, {session.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        fake = fake_quant_form(block, params).eval()(torch.from_numpy(x))
        ref = (fake[0] if isinstance(fake, tuple) else fake).numpy()
        exact = block(torch.from_numpy(x)).numpy()
    assert np.linalg.norm(y - ref) <= 1e-3 * np.linalg.norm(ref)
    assert np.abs(y - ref).max() <= 1e-2 * np.abs(ref).max()
    cosine = float((y * exact).sum() / (np.linalg.norm(y) * np.linalg.norm(exact)))
    assert cosine > 0.99, cosine
