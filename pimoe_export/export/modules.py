"""Export-ready forms of a MoE layer: a :class:`PiMoESystem` or a :class:`MoEBlock`.

- :class:`CustomOpPiMoE`: router MLP in standard ops, then ``pimoe::route -> dispatch -> expert_mlp (one
  per structural group) -> combine``. Expert weights are stacked per group ([G, out, in]) once, here.
- :class:`StandardOpsPiMoE`: the same math with standard ONNX ops only (TopK, dense evaluation of every
  expert, weighted sum): portable to any runtime, and a baseline (PiMoE layers).
- :class:`CustomOpBlock`: a MoE block's own computation (pimoe_export.model.moe_block.block_compute) over the
  custom ops ``torch.ops.pimoe`` instead of the reference functions; its weights are the block's (fp32) or fp16
  copies of the expert weights.

All return ``(output [B, S, H], expert_ids [B, S, k] int32, expert_weights [B, S, k] fp32)``; the routing
outputs let parity checks measure routing agreement. Eager execution of the custom-op forms equals the
model bit for bit in fp32 (tested), which is what makes the export trustworthy.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

import pimoe_export.ops.torch_ops  # noqa: F401  (registers torch.ops.pimoe.*)
from pimoe_export.errors import PiMoEExportError
from pimoe_export.model import functional
from pimoe_export.model.config import ExpertSpec
from pimoe_export.model.moe_block import MoEBlock, block_compute
from pimoe_export.model.system import PiMoESystem
from pimoe_export.ops import schema

FLOAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def _check_exportable(model: PiMoESystem) -> None:
    cfg = model.config
    if cfg.num_experts > schema.MAX_EXPERTS or cfg.top_k > min(cfg.num_experts, schema.MAX_TOP_K):
        raise PiMoEExportError(f"op contract v1 allows E <= {schema.MAX_EXPERTS} and k <= min(E, 16); "
                               f"got E={cfg.num_experts}, k={cfg.top_k}")
    for spec, _ in cfg.expert_groups():
        if spec.num_layers > schema.MAX_LAYERS:
            raise PiMoEExportError(f"experts with {spec.num_layers} layers exceed the contract's {schema.MAX_LAYERS}")


class _Group(nn.Module):
    """Stacked parameters of one structural group of experts."""

    def __init__(self, model: PiMoESystem, spec: ExpertSpec, expert_ids: list[int], weight_dtype: torch.dtype) -> None:
        super().__init__()
        self.spec = spec
        self.expert_ids = list(expert_ids)
        experts = [model.experts[e] for e in expert_ids]
        for layer in range(spec.num_layers):
            weight = torch.stack([ex.layers[layer].weight.detach() for ex in experts]).to(weight_dtype)
            bias = torch.stack([ex.layers[layer].bias.detach() for ex in experts]).float()
            self.register_buffer(f"weight_{layer}", weight.contiguous())
            self.register_buffer(f"bias_{layer}", bias.contiguous())
            if spec.layer_norm and layer < spec.num_layers - 1:
                assert experts[0].norms is not None
                gamma = torch.stack([ex.norms[layer].weight.detach() for ex in experts]).float()  # type: ignore[index]
                beta = torch.stack([ex.norms[layer].bias.detach() for ex in experts]).float()  # type: ignore[index]
                self.register_buffer(f"ln_gamma_{layer}", gamma.contiguous())
                self.register_buffer(f"ln_beta_{layer}", beta.contiguous())

    def params(self) -> list[torch.Tensor]:
        """Flat parameter list in op-contract order (schema.expert_mlp_param_layout)."""
        layout = schema.expert_mlp_param_layout(self.spec.num_layers, self.spec.layer_norm, "none")
        return [getattr(self, f"{role}_{layer}") for layer, role in layout]


class CustomOpPiMoE(nn.Module):
    """A PiMoE layer expressed with the four ``pimoe`` ops (see module docstring)."""

    def __init__(self, model: PiMoESystem, precision: str = "fp32") -> None:
        super().__init__()
        if precision not in FLOAT_DTYPES:
            raise PiMoEExportError(f"precision must be one of {sorted(FLOAT_DTYPES)}, got {precision!r}")
        _check_exportable(model)
        cfg = model.config
        self.config = cfg
        self.precision = precision
        self.dtype = FLOAT_DTYPES[precision]
        # the router always runs in fp32 (quantising or down-casting it flips top-k decisions)
        self.router = copy.deepcopy(model.router).float().eval()
        self.groups = nn.ModuleList(_Group(model, spec, ids, self.dtype) for spec, ids in cfg.expert_groups())

    def group_params(self, index: int) -> tuple[list[torch.Tensor], str, list[float]]:
        """(parameter list in contract order, quant_mode, act_scales) of expert group ``index``."""
        return self.groups[index].params(), "none", []

    def routing(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.router.compute_logits(x.float())
        cfg = self.config
        return torch.ops.pimoe.route(logits, self.router.selection_bias.float(), cfg.top_k, bool(cfg.normalize))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, s, h = hidden_states.shape
        cfg = self.config
        x = hidden_states.reshape(b * s, h)
        weights, ids = self.routing(x)
        x_sorted, offsets, flat_to_sorted = torch.ops.pimoe.dispatch(x, ids, cfg.num_experts)
        y_sorted = None
        for index, group in enumerate(self.groups):
            spec = group.spec
            params, quant_mode, act_scales = self.group_params(index)
            part = torch.ops.pimoe.expert_mlp(
                x_sorted, offsets, params, group.expert_ids, list(spec.widths), spec.activation,
                spec.layer_norm, float(cfg.layer_norm_eps), quant_mode, act_scales,
            )
            y_sorted = part if y_sorted is None else y_sorted + part
        y = torch.ops.pimoe.combine(y_sorted, flat_to_sorted, weights)
        k = cfg.top_k
        return y.reshape(b, s, h), ids.reshape(b, s, k), weights.reshape(b, s, k)


class StandardOpsPiMoE(nn.Module):
    """The same layer with standard ops only: TopK routing and dense evaluation of every expert.

    Every expert runs on every token (E/k times the FLOPs of the custom-op graph), and the outputs are
    summed with the routing weights scattered into an [N, E] matrix. Ties in TopK go to the lower index
    (ONNX TopK specification); NaN handling follows the runtime's TopK, not the contract.
    """

    def __init__(self, model: PiMoESystem, precision: str = "fp32") -> None:
        super().__init__()
        self.inner = CustomOpPiMoE(model, precision)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        inner = self.inner
        cfg = inner.config
        b, s, h = hidden_states.shape
        x = hidden_states.reshape(b * s, h)
        logits = inner.router.compute_logits(x.float())
        probs = torch.softmax(logits, dim=-1)
        scores = probs + inner.router.selection_bias.float()
        ids = torch.topk(scores, cfg.top_k, dim=-1).indices
        weights = probs.gather(-1, ids)
        if cfg.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        dense = torch.zeros_like(probs).scatter(1, ids, weights)  # [N, E]
        xf = x.float()
        y = torch.zeros((b * s, h), dtype=torch.float32, device=x.device)
        for group in inner.groups:
            spec = group.spec
            act = torch.stack([xf] * len(group.expert_ids))  # [G, N, H]
            for layer in range(spec.num_layers):
                w = getattr(group, f"weight_{layer}").float()
                act = torch.matmul(act, w.transpose(1, 2)) + getattr(group, f"bias_{layer}").unsqueeze(1)
                if layer < spec.num_layers - 1:
                    if spec.layer_norm:
                        act = torch.nn.functional.layer_norm(act, (act.shape[-1],), eps=cfg.layer_norm_eps)
                        act = act * getattr(group, f"ln_gamma_{layer}").unsqueeze(1) + getattr(
                            group, f"ln_beta_{layer}"
                        ).unsqueeze(1)
                    act = functional.activation_fn(spec.activation, act)
            gate = dense[:, group.expert_ids].t().unsqueeze(-1)  # [G, N, 1]
            y = y + (gate * act).sum(dim=0)
        return y.to(hidden_states.dtype).reshape(b, s, h), ids.to(torch.int32).reshape(b, s, -1), weights.reshape(
            b, s, -1
        )


class CustomOpBlock(nn.Module):
    """A MoE block with the ``pimoe`` custom ops (see the module docstring). fp16: the expert weights are cast to
    fp16 (inputs and outputs fp16); the router, gates, scales and biases stay fp32."""

    def __init__(self, block: MoEBlock, precision: str = "fp32") -> None:
        super().__init__()
        if precision not in FLOAT_DTYPES:
            raise PiMoEExportError(f"precision must be one of {sorted(FLOAT_DTYPES)}, got {precision!r}")
        self.block = block  # not copied: an fp32 export reads the block's own weights (a large model once in memory)
        self.config = block.config
        self.dtype = FLOAT_DTYPES[precision]
        self._params: list[tuple[list[torch.Tensor], str, list[float]]] | None = None
        if precision != "fp32":
            self._params = [([t.to(self.dtype) if t.dim() == 3 else t.float() for t in group.params()], "none", [])
                            for group in block.groups()]

    def group_params(self) -> list[tuple[list[torch.Tensor], str, list[float]]] | None:
        """(params, quant_mode, act_scales) of every group, or None: the block's own float weights."""
        return self._params

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return block_compute(self.block, hidden_states, torch.ops.pimoe, self.group_params())


def custom_op_form(layer: PiMoESystem | MoEBlock, precision: str = "fp32", standard_ops: bool = False) -> nn.Module:
    """The export-ready form of a MoE layer (see the module docstring)."""
    if isinstance(layer, MoEBlock):
        if standard_ops:
            raise PiMoEExportError("a MoE block is exported with the pimoe ops only (no standard-op graph)")
        return CustomOpBlock(layer, precision)
    return (StandardOpsPiMoE if standard_ops else CustomOpPiMoE)(layer, precision)
