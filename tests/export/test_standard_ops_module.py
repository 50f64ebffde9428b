"""The export modules (the custom-op module the graph is traced from, and the standard-op module of the plugin-free
baseline graph) route as the model does, selection bias included: a bias that moves the choice of experts moves
their choice the same way."""

from __future__ import annotations

import torch

from pimoe_export.export.modules import StandardOpsPiMoE
from pimoe_export.model import create_from_preset


def test_the_standard_op_module_routes_with_the_selection_bias() -> None:
    model = create_from_preset("tiny", seed=4)
    x = torch.randn(2, 7, model.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model.router.selection_bias.copy_(torch.tensor([0.9, -0.9, 0.0, 0.45]))  # decisive for the choice
        y, ids, _ = StandardOpsPiMoE(model)(x)
        ref, info = model(x, return_routing_info=True)
    assert torch.equal(ids.sort(-1).values, info.ids.reshape(ids.shape).long().sort(-1).values)
    assert torch.allclose(y, ref, atol=1e-5)
    assert (ids == 0).any(-1).all()  # the +0.9 expert is in every token's top 2


def test_the_custom_op_module_routes_with_the_selection_bias() -> None:
    from pimoe_export.export.modules import CustomOpPiMoE

    model = create_from_preset("tiny", seed=4)
    x = torch.randn(2, 7, model.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model.router.selection_bias.copy_(torch.tensor([0.9, -0.9, 0.0, 0.45]))
        y, ids, _ = CustomOpPiMoE(model)(x)
        ref, info = model(x, return_routing_info=True)
    assert torch.equal(ids.reshape(-1, ids.shape[-1]).long().sort(-1).values,
                       info.ids.reshape(-1, ids.shape[-1]).long().sort(-1).values)
    assert torch.allclose(y, ref, atol=1e-5)
    assert (ids == 0).any(-1).all()


def test_the_export_modules_refuse_a_precision_they_do_not_export() -> None:
    import pytest

    from pimoe_export.errors import PiMoEExportError
    from pimoe_export.export.modules import CustomOpPiMoE

    model = create_from_preset("tiny")
    for module in (CustomOpPiMoE, StandardOpsPiMoE):
        with pytest.raises(PiMoEExportError, match=r"precision must be one of \[.*'fp32'.*\], got 'int4'"):
            module(model, "int4")
