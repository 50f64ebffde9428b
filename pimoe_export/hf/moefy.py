"""MoEfication of a Hugging Face BERT-family encoder: every feed-forward block becomes a PiMoE layer.

For each transformer layer (``encoder.layer.<i>``, BERT and MiniLM layout):

1. The feed-forward inputs of the calibration tokens are recorded (the attention output entering
   ``intermediate``), with the FFN's hidden activations ``act(W1 x + b1)``.
2. The I hidden units are split into E experts of I/E units by co-activation (balanced k-means on the units'
   activation patterns): expert e keeps its units' rows of W1 (and b1) and columns of W2.
3. Expert e computes ``k * W2[:, S_e] act(W1[S_e] x + b1[S_e]) + b2``. The router (Linear -> ReLU -> Linear, no
   gate) is trained to predict which experts' parts are largest for each token; its logits are divided by a high
   temperature so that the normalised weights of the k chosen experts are 1/k to within ~1e-3, which makes the
   layer the sum of the chosen parts plus b2 — exactly the dense FFN when k = E.
4. Optional distillation (``finetune_epochs``): the experts of all layers are trained together so that the MoE
   model's token states and mean-pooled embeddings match the original model's on the calibration text (routers
   frozen), with noisy top-k selection while training (Gaussian noise of ``routing_noise`` x each token's router-
   logit spread picks the experts; the combine weights stay the router's). The noise teaches the experts that
   either side of a near-tie must give a usable output, so an upstream perturbation (INT8 error) that flips a
   near-tied choice at inference costs less (docs/minilm_demo.md). Eval mode is the plain PiMoE layer.

The result is the same ``transformers`` model with ``layer.intermediate`` replaced by :class:`MoEFeedForward`
and ``layer.output.dense`` by ``nn.Identity`` (``BertOutput`` still applies dropout, the residual and its
LayerNorm). :mod:`pimoe_export.hf.checkpoint` stores it as the Hugging Face config + a pimoe manifest + safetensors
(no pickle), so export, quantisation and the pipeline take it.

``transformers`` is an optional dependency (the ``hf`` extra).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from pimoe_export.errors import PiMoEConfigError, PiMoEInputError
from pimoe_export.interface import MODEL_IDS_INPUT, MODEL_MASK_INPUT
from pimoe_export.model.config import ExpertType, PiMoEConfig
from pimoe_export.model.system import PiMoESystem

#: logits / TEMPERATURE: normalised top-k weights of a trained router are 1/k to ~1e-3 (see the module docstring)
TEMPERATURE = 1000.0


@dataclass(frozen=True)
class MoefySettings:
    experts: int = 8
    top_k: int = 2
    router_epochs: int = 200
    #: router targets: softmax(expert share / std(shares) * sharpness); sharp targets give wide logit gaps at the
    #: top-k boundary, i.e. routing that small upstream errors rarely flip
    router_sharpness: float = 8.0
    finetune_epochs: int = 0
    finetune_lr: float = 3e-4
    #: noisy top-k while distilling: noise std = routing_noise x each token's router-logit std (0: plain top-k)
    routing_noise: float = 1.5
    max_tokens: int = 16384
    seed: int = 0


class MoEFeedForward(nn.Module):
    """Stands in for ``BertIntermediate``: the PiMoE layer computes the whole FFN (H -> H).

    ``routing_noise`` > 0 in training mode selects experts by noisy top-k (distillation only, see the module
    docstring); eval mode, and export, always run the plain PiMoE layer."""

    def __init__(self, moe: PiMoESystem) -> None:
        super().__init__()
        self.moe = moe
        self.routing_noise = 0.0

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.training and self.routing_noise > 0:
            return self._noisy_top_k(hidden_states)
        return self.moe(hidden_states)

    def _noisy_top_k(self, hidden_states: torch.Tensor) -> torch.Tensor:
        moe = self.moe
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        with torch.no_grad():  # the router is frozen: selection and weights are constants of the step
            logits = moe.router.compute_logits(flat)
            noisy = logits + self.routing_noise * logits.std(dim=-1, keepdim=True) * torch.randn_like(logits)
            ids = (noisy + moe.router.selection_bias).topk(moe.config.top_k, dim=-1).indices
            weights = torch.softmax(logits, dim=-1).gather(1, ids)
            if moe.config.normalize:
                weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(moe.experts):
            rows, slot = (ids == e).nonzero(as_tuple=True)
            if rows.numel():
                out = out.index_add(0, rows, expert(flat[rows]) * weights[rows, slot, None])
        return out.reshape(hidden_states.shape)


def encoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, layer) of every transformer layer with a BERT-style FFN (``intermediate.dense`` + ``output.dense``)."""
    found = [(path, m) for path, m in model.named_modules()
             if hasattr(m, "intermediate") and hasattr(m, "output") and hasattr(m.output, "LayerNorm")]
    if not found:
        raise PiMoEConfigError("moefy", f"{type(model).__name__} has no BERT-style layers (intermediate.dense, "
                               "output.dense, output.LayerNorm); supported: BERT-family encoders (BERT, MiniLM)")
    return found


def layer_config(hidden: int, intermediate: int, settings: MoefySettings) -> PiMoEConfig:
    if intermediate % settings.experts:
        raise PiMoEConfigError("experts", f"the FFN width {intermediate} must divide into {settings.experts} "
                               "equal experts; choose a divisor")
    return PiMoEConfig(hidden_size=hidden, num_experts=settings.experts, top_k=settings.top_k,
                       intermediate_size=intermediate // settings.experts, expert_types=(ExpertType.LANGUAGE,),
                       activation="gelu", layer_norm=False, use_gating=False, normalize=True,
                       temperature=TEMPERATURE, router_hidden_size=hidden, dropout=0.0, router_dropout=0.0,
                       metadata={"moefy": asdict(settings)})


def balanced_clusters(features: np.ndarray, clusters: int, iterations: int = 20, seed: int = 0) -> np.ndarray:
    """Cluster index of each row of ``features`` (units x samples), every cluster exactly rows / clusters big:
    k-means whose assignment step fills clusters greedily by distance (deterministic for a seed)."""
    rows = features.shape[0]
    size = rows // clusters
    x = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    rng = np.random.default_rng(seed)
    centroids = x[rng.choice(rows, clusters, replace=False)]
    labels = np.zeros(rows, np.int64)
    for _ in range(iterations):
        # squared distances [rows, clusters] without the [rows, clusters, samples] difference tensor
        distance = (x * x).sum(1)[:, None] - 2.0 * x @ centroids.T + (centroids * centroids).sum(1)[None, :]
        order = np.argsort(distance, axis=None, kind="stable")
        labels[:] = -1
        fill = np.zeros(clusters, np.int64)
        for flat in order:
            unit, cluster = divmod(int(flat), clusters)
            if labels[unit] < 0 and fill[cluster] < size:
                labels[unit] = cluster
                fill[cluster] += 1
        centroids = np.stack([x[labels == c].mean(0) for c in range(clusters)])
    return labels


def _ffn_parts(layer: nn.Module, x: torch.Tensor, units: list[np.ndarray]) -> torch.Tensor:
    """||W2[:, S_e] act(W1[S_e] x + b1[S_e])|| for every token and expert: [N, E]."""
    act = layer.intermediate.intermediate_act_fn(layer.intermediate.dense(x))
    w2 = layer.output.dense.weight
    return torch.stack([(act[:, u] @ w2[:, u].T).norm(dim=-1) for u in units], dim=-1)


def _build_moe(layer: nn.Module, x: torch.Tensor, settings: MoefySettings) -> PiMoESystem:
    dense1, dense2 = layer.intermediate.dense, layer.output.dense
    hidden, intermediate = dense1.in_features, dense1.out_features
    config = layer_config(hidden, intermediate, settings)
    with torch.no_grad():
        act = layer.intermediate.intermediate_act_fn(dense1(x))
    labels = balanced_clusters(act.T.numpy().astype(np.float64), settings.experts, seed=settings.seed)
    units = [np.flatnonzero(labels == e) for e in range(settings.experts)]
    torch.manual_seed(settings.seed)
    moe = PiMoESystem(config=config).eval()
    with torch.no_grad():
        for e, u in enumerate(units):
            index = torch.from_numpy(u)
            first, second = moe.experts[e].layers
            first.weight.copy_(dense1.weight[index])
            first.bias.copy_(dense1.bias[index])
            second.weight.copy_(dense2.weight[:, index] * settings.top_k)
            second.bias.copy_(dense2.bias)
        parts = _ffn_parts(layer, x, units)
        target = torch.softmax(parts / parts.std().clamp_min(1e-6) * settings.router_sharpness, -1)
    _train_router(moe, x, target, settings)
    return moe


def _train_router(moe: PiMoESystem, x: torch.Tensor, target: torch.Tensor, settings: MoefySettings) -> None:
    """Cross-entropy of the router's distribution (before the temperature) against the experts' share."""
    network = moe.router.router_network
    optimiser = torch.optim.Adam(network.parameters(), lr=1e-2)
    network.train()
    for _ in range(settings.router_epochs):
        optimiser.zero_grad()
        loss = -(target * torch.log_softmax(network(x), dim=-1)).sum(-1).mean()
        loss.backward()
        optimiser.step()
    network.eval()


def _mean_pooled(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(states.dtype)
    return (states * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def distil(model: nn.Module, teacher: nn.Module, feeds: list[dict[str, torch.Tensor]],
           settings: MoefySettings) -> list[float]:
    """Train the experts of every MoE layer of ``model`` (routers and everything else frozen) so its token states
    and mean-pooled embeddings match ``teacher``'s (the original model) on ``feeds``, with noisy top-k selection.
    Loss per batch: MSE of the valid tokens' states relative to the teacher's mean square + (1 - cosine) of the
    mean-pooled embeddings. Returns the mean loss of each epoch."""
    ffns = [m for m in model.modules() if isinstance(m, MoEFeedForward)]
    params = [p for ffn in ffns for p in ffn.moe.experts.parameters()]
    frozen = {p: p.requires_grad for p in model.parameters()}
    trained = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in trained)
    optimiser = torch.optim.Adam(params, lr=settings.finetune_lr)
    generator = np.random.default_rng(settings.seed)
    losses: list[float] = []
    tracking = [ffn.moe.track_stats for ffn in ffns]
    model.eval()  # no dropout anywhere: the student differs from the teacher only by its MoE layers
    for ffn in ffns:
        ffn.routing_noise, ffn.moe.track_stats = settings.routing_noise, False
        ffn.train()
    try:
        for _ in range(settings.finetune_epochs):
            total = 0.0
            for index in generator.permutation(len(feeds)):
                feed = feeds[int(index)]
                mask = feed.get(MODEL_MASK_INPUT, torch.ones_like(feed[MODEL_IDS_INPUT]))
                with torch.no_grad():
                    target = teacher(**feed).last_hidden_state
                states = model(**feed).last_hidden_state
                valid = mask.bool()
                loss = ((states - target)[valid] ** 2).mean() / (target[valid] ** 2).mean() + 1.0 - \
                    torch.nn.functional.cosine_similarity(_mean_pooled(states, mask), _mean_pooled(target, mask)).mean()
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                total += float(loss.detach())
            losses.append(total / len(feeds))
    finally:
        model.eval()
        for ffn, track in zip(ffns, tracking, strict=True):
            ffn.routing_noise, ffn.moe.track_stats = 0.0, track
        for p, flag in frozen.items():
            p.requires_grad_(flag)
    return losses


def embedding_fidelity(model: nn.Module, reference: nn.Module, feeds: list[dict[str, torch.Tensor]]
                       ) -> dict[str, float]:
    """Mean-pooled embedding cosine (mean, min) and the token states' relative L2 of ``model`` against
    ``reference`` on ``feeds`` (valid positions). The MoE layers' routing statistics are left as they were."""
    cosines, err, norm = [], 0.0, 0.0
    layers = [m for m in model.modules() if isinstance(m, PiMoESystem)]
    tracking = [layer.track_stats for layer in layers]
    for layer in layers:
        layer.track_stats = False
    try:
        with torch.no_grad():
            for feed in feeds:
                mask = feed.get(MODEL_MASK_INPUT, torch.ones_like(feed[MODEL_IDS_INPUT]))
                a, b = model(**feed).last_hidden_state, reference(**feed).last_hidden_state
                cosines.append(torch.nn.functional.cosine_similarity(_mean_pooled(a, mask), _mean_pooled(b, mask)))
                valid = mask.bool()
                err += float(((a - b)[valid].double() ** 2).sum())
                norm += float((b[valid].double() ** 2).sum())
    finally:
        for layer, track in zip(layers, tracking, strict=True):
            layer.track_stats = track
    c = torch.cat(cosines)
    return {"embedding_cosine_mean": float(c.mean()), "embedding_cosine_min": float(c.min()),
            "token_state_rel_l2": (err / max(norm, 1e-30)) ** 0.5, "sentences": int(c.numel())}


def _ffn_inputs(model: nn.Module, layers: list[tuple[str, nn.Module]], feeds: list[dict[str, torch.Tensor]],
                max_tokens: int) -> dict[str, torch.Tensor]:
    """[tokens, H] inputs of every layer's FFN (valid positions of the calibration feeds)."""
    captured: dict[str, list[torch.Tensor]] = {path: [] for path, _ in layers}
    masks: list[torch.Tensor] = []

    def hook_for(path: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            captured[path].append(args[0].detach().reshape(-1, args[0].shape[-1])[masks[-1]])
        return hook

    handles = [layer.intermediate.register_forward_pre_hook(hook_for(path)) for path, layer in layers]
    try:
        with torch.no_grad():
            for feed in feeds:
                mask = feed.get(MODEL_MASK_INPUT)
                masks.append(torch.ones(feed[MODEL_IDS_INPUT].numel(), dtype=torch.bool) if mask is None
                             else mask.reshape(-1) != 0)
                model(**feed)
    finally:
        for handle in handles:
            handle.remove()
    return {path: torch.cat(parts)[:max_tokens].float() for path, parts in captured.items()}


def moefy(model: nn.Module, feeds: list[dict[str, torch.Tensor]], settings: MoefySettings = MoefySettings()
          ) -> tuple[nn.Module, dict[str, PiMoESystem]]:
    """MoEfy ``model`` in place (see the module docstring); ``feeds``: tokenised calibration batches."""
    if not feeds:
        raise PiMoEInputError("moefy needs calibration inputs (tokenised text)")
    if settings.routing_noise < 0 or not np.isfinite(settings.routing_noise):
        raise PiMoEConfigError("routing_noise", f"{settings.routing_noise} is not a non-negative number")
    model = model.float().eval()
    teacher = copy.deepcopy(model) if settings.finetune_epochs > 0 else None
    layers = encoder_layers(model)
    inputs = _ffn_inputs(model, layers, feeds, settings.max_tokens)
    converted = {}
    for path, layer in layers:
        moe = _build_moe(layer, inputs[path], settings)
        install_moe(layer, moe)
        converted[path] = moe
    if teacher is not None:
        distil(model, teacher, feeds, settings)
    return model, converted


def install_moe(layer: nn.Module, moe: PiMoESystem) -> None:
    """Replace one encoder layer's FFN by ``moe`` (``intermediate`` computes the whole FFN, ``output.dense`` goes)."""
    layer.intermediate = MoEFeedForward(moe)
    layer.output.dense = nn.Identity()
