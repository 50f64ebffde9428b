"""The ONNX nodes the exporter's translations emit: every input of the torch op reaches its pimoe node. A selection
bias of zeros (every freshly built layer) hides a dropped bias input; here the bias decides the routing, and ONNX
Runtime must route as PyTorch does."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from pimoe_export.errors import PluginLoadError
from pimoe_export.export.exporter import export_onnx
from pimoe_export.model.factory import create_from_preset


@pytest.fixture(scope="module")
def biased(tmp_path_factory):
    """tiny (E = 4, k = 2) with a selection bias that puts expert 3 in every token's top 2."""
    model = create_from_preset("tiny", seed=1).eval()
    with torch.no_grad():
        model.router.selection_bias.copy_(torch.tensor([0.0, -0.2, 0.1, 10.0]))
    path = tmp_path_factory.mktemp("biased") / "model.onnx"
    export_onnx(model, path)
    return model, path


def test_the_route_node_takes_the_selection_bias(biased) -> None:
    _, path = biased
    proto = onnx.load(str(path))
    (route,) = [n for n in proto.graph.node if n.op_type == "PiMoERoute"]
    assert len(route.input) == 2
    initializers = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    np.testing.assert_array_equal(initializers[route.input[1]], np.array([0.0, -0.2, 0.1, 10.0], np.float32))
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in route.attribute}
    assert attrs == {"k": 2, "normalize": 1, "scoring": b"softmax"}
    (dispatch,) = [n for n in proto.graph.node if n.op_type == "PiMoEDispatch"]
    assert list(dispatch.input)[1] == route.output[1] and len(dispatch.output) == 3
    assert {a.name: onnx.helper.get_attribute_value(a) for a in dispatch.attribute} == {"num_experts": 4}


def test_onnx_runtime_routes_with_the_bias_as_pytorch_does(biased) -> None:
    from pimoe_export.runtime.ort import create_session

    model, path = biased
    x = np.random.default_rng(0).standard_normal((3, 7, 16)).astype(np.float32)
    try:
        session = create_session(path)
    except PluginLoadError as exc:
        pytest.skip(f"libpimoe_ort is not built: {exc}")
    y, ids, weights = session.run(None, {"hidden_states": x})
    assert (ids == 3).any(axis=-1).all()  # the bias put expert 3 in every top 2
    with torch.no_grad():
        ref, info = model(torch.from_numpy(x), return_routing_info=True)
    np.testing.assert_array_equal(ids, info.ids.numpy())
    np.testing.assert_allclose(weights, info.weights.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(y, ref.numpy(), rtol=1e-5, atol=1e-5 * float(np.abs(ref.numpy()).max()))


def test_static_w8a8_activation_scales_reach_the_expert_node() -> None:
    """The ExpertMLP translation of a static-w8a8 call (the fake-quant reference traced by torch.onnx) writes each
    group's activation scales, layer-major, as the node's act_scales attribute: the calibrated values, as float32."""
    from onnx import helper

    from pimoe_export.ops import schema
    from pimoe_export.ops.onnx_translation import custom_translation_table
    from pimoe_export.quantize import calibrated_params
    from pimoe_export.quantize.int8 import FakeQuantPiMoE

    model = create_from_preset("tiny", seed=2).eval()
    calibration = torch.randn(2, 32, model.hidden_size, generator=torch.Generator().manual_seed(0))
    params = calibrated_params(model, calibration=calibration, method="max")[""]
    assert params.mode == "w8a8" and all(g.act_scales for g in params.groups)
    program = torch.onnx.export(FakeQuantPiMoE(model, params).eval(), (torch.randn(1, 5, model.hidden_size),),
                                dynamo=True, custom_translation_table=custom_translation_table(),
                                opset_version=18, optimize=False, verify=False, report=False, verbose=False)
    nodes = [n for n in program.model_proto.graph.node if n.op_type == schema.EXPERT_MLP]
    assert len(nodes) == len(params.groups)
    for node, group in zip(nodes, params.groups, strict=True):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["quant_mode"] in (b"w8a8", "w8a8")
        assert np.array_equal(np.float32(attrs["act_scales"]), np.float32(group.act_scales))


def test_every_route_attribute_reaches_the_node_with_its_value_and_type(tmp_path) -> None:
    """A block with every routing setting away from its default: the PiMoERoute node carries each one exactly (floats
    as FLOAT attributes: routed_scaling_factor 2.5 is not 2), and ONNX Runtime routes and weighs as PyTorch does."""
    from pimoe_export.export.exporter import export_source
    from pimoe_export.model.moe_block import REFERENCE_OPS, ExpertsConfig, MoEBlock, MoEBlockConfig, route_tokens
    from pimoe_export.model.source import layer_source

    config = MoEBlockConfig(16, 8, 3, ExpertsConfig(12, "silu"), scoring="sigmoid", normalize=True,
                            normalize_eps=1e-3, num_groups=4, groups_kept=3, group_score="sum_top2",
                            routed_scaling_factor=2.5, correction_bias=True)
    block = MoEBlock(config, initialize=False)
    block.reset_parameters(torch.Generator().manual_seed(3))
    block.eval()
    path = export_source(layer_source(block), tmp_path / "block.onnx").path
    (route,) = [n for n in onnx.load(str(path)).graph.node if n.op_type == "PiMoERoute"]
    attrs = {a.name: (a.type, onnx.helper.get_attribute_value(a)) for a in route.attribute}
    f, i, s = onnx.AttributeProto.FLOAT, onnx.AttributeProto.INT, onnx.AttributeProto.STRING
    assert attrs == {"k": (i, 3), "normalize": (i, 1), "scoring": (s, b"sigmoid"), "num_groups": (i, 4),
                     "groups_kept": (i, 3), "group_score": (s, b"sum_top2"), "routed_scaling_factor": (f, 2.5),
                     "normalize_eps": (f, pytest.approx(1e-3, rel=1e-7))}
    from pimoe_export.runtime.ort import create_session

    try:
        session = create_session(path)
    except PluginLoadError as exc:
        pytest.skip(f"libpimoe_ort is not built: {exc}")
    x = np.random.default_rng(1).standard_normal((2, 9, 16)).astype(np.float32)
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"hidden_states": x}), strict=True))
    with torch.no_grad():
        weights, ids = route_tokens(block, torch.from_numpy(x).reshape(-1, 16), REFERENCE_OPS)
    np.testing.assert_array_equal(outputs["expert_ids"].reshape(-1, 3), ids.numpy())
    np.testing.assert_allclose(outputs["expert_weights"].reshape(-1, 3), weights.numpy(), rtol=1e-6, atol=1e-7)
    assert float(np.abs(outputs["expert_weights"]).sum(-1).max()) > 1.5  # the factor 2.5 is in the weights


def _block(order: str, seed: int):
    from pimoe_export.model.moe_block import ExpertsConfig, MoEBlock, MoEBlockConfig

    block = MoEBlock(MoEBlockConfig(16, 8, 4, ExpertsConfig(12, "silu"), normalize=True, order=order),
                     initialize=False)
    block.reset_parameters(torch.Generator().manual_seed(seed))
    return block.eval()


@pytest.mark.parametrize("order", ["slot", "expert"])
def test_the_block_combines_in_its_configured_order(order) -> None:
    """block_compute hands the config's ``order`` to the combine op (both orders differ only in rounding, so a
    dropped argument, which falls back to the op's v1 default slot, shows nowhere else)."""
    from pimoe_export.model.moe_block import REFERENCE_OPS, block_compute

    seen: list[tuple] = []

    class Spy:
        def __getattr__(self, name: str):
            return getattr(REFERENCE_OPS, name)

        def combine(self, *args, **kwargs):
            seen.append(args[3:] + tuple(kwargs.values()))
            return REFERENCE_OPS.combine(*args, **kwargs)

    block = _block(order, 4)
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        y, _, _ = block_compute(block, x, Spy())
        want, _, _ = block_compute(block, x, REFERENCE_OPS)
    assert seen == [(order,)]
    assert torch.equal(y, want)


def test_the_combine_node_carries_the_blocks_order(biased, tmp_path) -> None:
    """A k = 4 block exported with order expert gets a PiMoECombine node with ``order`` = "expert" (a STRING); a
    slot-order graph's node (tiny, a v1 layer) has no attribute at all (v1 defaults are left out,
    docs/op_contract.md)."""
    from pimoe_export.export.exporter import export_source
    from pimoe_export.model.source import layer_source

    def combine_attributes(path) -> dict:
        (combine,) = [n for n in onnx.load(str(path)).graph.node if n.op_type == "PiMoECombine"]
        return {a.name: (a.type, onnx.helper.get_attribute_value(a)) for a in combine.attribute}

    path = export_source(layer_source(_block("expert", 6)), tmp_path / "expert.onnx").path
    assert combine_attributes(path) == {"order": (onnx.AttributeProto.STRING, b"expert")}
    assert combine_attributes(biased[1]) == {}
