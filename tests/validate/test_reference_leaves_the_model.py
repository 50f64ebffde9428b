"""The PyTorch reference of a check runs on a copy: the user's model keeps its mode, dtype, statistics switch and
counts, and gets no hooks (docs: "a check never changes its statistics")."""

from __future__ import annotations

import copy

import numpy as np
import torch

from pimoe_export.interface import layer_interface
from pimoe_export.model import create_from_preset
from pimoe_export.validate.reference import PyTorchRunner


def test_the_reference_runs_a_copy_and_leaves_the_users_model_alone() -> None:
    model = create_from_preset("tiny", seed=3).train().double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    runner = PyTorchRunner(model, layer_interface(16, model.config.top_k, "fp32"))
    x = np.random.default_rng(0).standard_normal((1, 5, 16)).astype(np.float32)
    with runner:
        out = runner.infer({"hidden_states": x})
    assert model.training and model.track_stats
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing counted, nothing converted
    with torch.no_grad():  # and the reference is the model's fp32 eval-mode output
        got = copy.deepcopy(model).float().eval()(torch.from_numpy(x))
    want = (got[0] if isinstance(got, tuple) else got).numpy()
    np.testing.assert_allclose(out["output"], want, rtol=1e-6, atol=1e-6)
