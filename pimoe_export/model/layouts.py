"""Expert weight layouts of the Hugging Face MoE families -> the op contract's layout, exactly (pure data movement).

The contract (`PiMoEExpertMLP`, docs/op_contract.md) stores one tensor per layer and expert group: ``[G, rows, in]``
(PyTorch's ``nn.Linear`` orientation: out x in), a gated (GLU) layer with its rows ``[gate; up]`` (gate rows first,
h = act(gate) * up), biases ``[G, rows]``. Checkpoints store the same numbers in other arrangements; every function
here only moves elements (``cat``, slicing, ``transpose``, ``reshape``), so the conversion is exact in any dtype.

Which family uses which (transformers 4.57; docs/op_contract.md, "The families"):

==================  ===========================================================  ===============================
layout              checkpoint tensors                                           functions
==================  ===========================================================  ===============================
separate            ``gate_proj``/``w1`` and ``up_proj``/``w3`` [I, H] per expert  :func:`glu_rows_from_separate`
                    (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek, shared experts)
fused halves        one [2I, H] (Granite, JetMoE: ``input_linear`` [E, 2I, H],    :func:`glu_rows_from_halves`
                    chunk(2): gate first; Llama 4 after transposing)
interleaved         [2I, H] rows g0, u0, g1, u1, ... (GPT-OSS's ``gate_up_proj``  :func:`glu_rows_from_interleaved`,
                    after transposing; its bias [E, 2I] the same way)             :func:`glu_bias_from_interleaved`
transposed          [E, in, out] (Llama 4 and GPT-OSS ``gate_up_proj`` and        :func:`transpose_experts`
                    ``down_proj``: ``x @ W``)
flattened           [E * rows, cols] (DBRX's ``w1``, ``v1``, ``w2``)              :func:`unflatten_experts`
==================  ===========================================================  ===============================

No transformers import here: the importers (pimoe_export.hf) read the checkpoints and call these.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pimoe_export.errors import PiMoEInputError

__all__ = [
    "glu_bias_from_interleaved",
    "glu_bias_from_separate",
    "glu_rows_from_halves",
    "glu_rows_from_interleaved",
    "glu_rows_from_separate",
    "stack_experts",
    "transpose_experts",
    "unflatten_experts",
]


def stack_experts(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-expert tensors of one shape -> one tensor with a leading expert dimension (the group's G)."""
    if not weights:
        raise PiMoEInputError("stack_experts: no expert tensors")
    shapes = {tuple(w.shape) for w in weights}
    if len(shapes) != 1:
        raise PiMoEInputError(f"stack_experts: the experts' tensors differ in shape: {sorted(shapes)}")
    return torch.stack(list(weights), dim=0)


def unflatten_experts(weight: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E * rows, cols] (the experts' matrices one after another, DBRX) -> [E, rows, cols]."""
    if weight.dim() != 2 or num_experts < 1 or weight.shape[0] % num_experts:
        raise PiMoEInputError(f"unflatten_experts: a [E * rows, cols] tensor with E={num_experts} is needed, got "
                              f"shape {list(weight.shape)}")
    return weight.reshape(num_experts, weight.shape[0] // num_experts, weight.shape[1])


def transpose_experts(weight: torch.Tensor) -> torch.Tensor:
    """[..., in, out] (applied as ``x @ W``) -> [..., out, in] (``nn.Linear``'s orientation), contiguous."""
    if weight.dim() < 2:
        raise PiMoEInputError(f"transpose_experts: needs at least 2 dimensions, got shape {list(weight.shape)}")
    return weight.transpose(-1, -2).contiguous()


def _check_pair(gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise PiMoEInputError(f"gate and up projections must have one shape and dtype, got {list(gate.shape)} "
                              f"{gate.dtype} and {list(up.shape)} {up.dtype}")


def glu_rows_from_separate(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate [..., I, in] and up [..., I, in] -> [..., 2I, in] with rows [gate; up]."""
    _check_pair(gate, up)
    if gate.dim() < 2:
        raise PiMoEInputError(f"glu_rows_from_separate: needs [..., I, in] matrices, got shape {list(gate.shape)}")
    return torch.cat([gate, up], dim=-2)


def glu_bias_from_separate(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate bias [..., I] and up bias [..., I] -> [..., 2I] in the order of the rows [gate; up]."""
    _check_pair(gate, up)
    return torch.cat([gate, up], dim=-1)


def _even_rows(fused: torch.Tensor, dim: int, what: str) -> None:
    if fused.dim() < (2 if dim == -2 else 1) or fused.shape[dim] % 2:
        raise PiMoEInputError(f"{what}: the fused gate/up dimension must be even, got shape {list(fused.shape)}")


def glu_rows_from_halves(fused: torch.Tensor) -> torch.Tensor:
    """[..., 2I, in] whose first I rows are the gate (``chunk(2)``'s first half is activated: Granite, JetMoE,
    Llama 4) -> the same rows [gate; up] (validated, contiguous)."""
    _even_rows(fused, -2, "glu_rows_from_halves")
    return fused.contiguous()


def glu_rows_from_interleaved(fused: torch.Tensor) -> torch.Tensor:
    """[..., 2I, in] with rows gate_0, up_0, gate_1, up_1, ... (GPT-OSS: ``gate_up[..., ::2]`` is the gate) ->
    [..., 2I, in] with rows [gate; up]."""
    _even_rows(fused, -2, "glu_rows_from_interleaved")
    return torch.cat([fused[..., 0::2, :], fused[..., 1::2, :]], dim=-2)


def glu_bias_from_interleaved(fused: torch.Tensor) -> torch.Tensor:
    """[..., 2I] biases interleaved gate_0, up_0, ... -> [..., 2I] in the order [gate; up]."""
    _even_rows(fused, -1, "glu_bias_from_interleaved")
    return torch.cat([fused[..., 0::2], fused[..., 1::2]], dim=-1)
