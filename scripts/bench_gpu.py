"""GPU benchmark of one PiMoE FFN layer: our TensorRT plugin objects (through plugins/harness, fp16) vs PyTorch.

Every path computes the same thing from the same weights: router logits (one fp32 linear [E, H]), softmax/top-k,
the experts of the preset (seed-512: 512 -> 2048 -> 512 with LayerNorm + GELU; the MoE-block presets gated, no bias:
mixtral-ffn 4096 -> [gate; up] 2 x 14336 -> silu(gate) * up -> 4096, E 8, k 2; qwen3-moe 2048 -> 2 x 768 -> 2048,
E 128, k 8) and the weighted combine.

  plugins-graph     route -> dispatch -> expert MLP -> combine, the plugin objects' enqueue (fp16) in a CUDA graph
  plugins-eager     the same enqueue calls issued from Python (host overhead per call included)
  torch-eager       PyTorch eager, loop over experts (nonzero / index_add_), fp16
  torch-dense       every expert on every token (batched matmul), fp16
  grouped-mm-graph  sort + torch._grouped_mm (bf16) replayed in a CUDA graph: the strongest PyTorch path

INT8 (W8A8) plugin paths, fp16 I/O, weights = per-output-channel int8 codes of the same fp16 weights:
  int8-graph        the four plugins, PiMoEExpertMLP in quant_mode w8a8 (static activation scales from a max
                    calibration on 256 random tokens), in a CUDA graph
  int8-dyn-graph    the same with w8a8_dynamic (per-row activation scales)
  int8-mlp-graph    only the w8a8 PiMoEExpertMLP plugin (inputs from one dispatch), in a CUDA graph
  int8-eager        int8-graph's enqueue calls issued from Python
reported against the weight-streaming floor: int8 bytes of the experts the routing touched / the memory bandwidth
measured in the same run (device-to-device copy of 1 GiB, read + write bytes).

Weights are created on the GPU directly (mixtral-ffn is 2.8 GB in fp16; never through the fp32 CPU model).
Timings are medians of CUDA-event measurements. Needs a CUDA GPU (scripts/gpu_check.sh runs it); writes
bench_gpu.json and bench_gpu.md into --out after EVERY (config, T) row, configs in the order given (smallest first
by default), so a run cut short by a time limit keeps every row it finished.

--emulated (the dry run of scripts/gpu_check.sh, on a CPU): the same driver and files, the plugin path through the
emulated harness (plugins/emu) against an fp32 dense reference on the CPU; its times are the emulator's, NOT GPU
numbers, and the files say so.

usage: python scripts/bench_gpu.py [--configs seed-512,qwen3-moe,mixtral-ffn] [--tokens 1,16,128,1024] [--iters 30]
                                   [--no-int8] [--emulated] [--out gpu-results]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PATHS = ["plugins-graph", "plugins-eager", "torch-eager", "torch-dense", "grouped-mm-graph"]
INT8_PATHS = ["int8-graph", "int8-dyn-graph", "int8-mlp-graph", "int8-eager"]


def time_cuda(fn: Callable[[], object], iters: int, warmup: int = 3) -> dict[str, float]:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return {"median_ms": statistics.median(times), "p10_ms": times[len(times) // 10],
            "p90_ms": times[min(len(times) - 1, (9 * len(times)) // 10)]}


def graphed(step: Callable[[], object]) -> Callable[[], object]:
    """Capture `step` (already warmed up) into a CUDA graph; returns the replay function."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


@dataclass(frozen=True)
class GatedSpec:
    """The expert shape of a MoE-block preset, in the terms the benchmark uses for a PiMoE expert group."""

    widths: tuple[int, ...]
    activation: str
    layer_norm: bool = False

    @property
    def num_layers(self) -> int:
        return len(self.widths) - 1


class Layer:
    """Random weights of one preset's uniform expert group, created on the GPU. A MoE-block preset (mixtral-ffn,
    qwen3-moe) gives gated experts without biases: hidden layers of rows [gate; up], h = act(gate) * up."""

    def __init__(self, preset: str, seed: int = 0, device: str = "cuda") -> None:
        import torch

        from pimoe_export.model.factory import preset_config
        from pimoe_export.model.moe_block import MoEBlockConfig

        cfg = preset_config(preset)
        if isinstance(cfg, MoEBlockConfig):
            plain = (cfg.scoring == "softmax" and cfg.num_groups == 1 and cfg.shared is None and not cfg.router_bias
                     and not cfg.correction_bias and not cfg.experts.bias and cfg.experts.gated
                     and cfg.experts.activation != "swiglu_oai")
            if not plain:
                raise SystemExit(f"{preset}: the benchmark covers softmax-routed gated blocks without shared experts "
                                 "or biases")
            spec = GatedSpec((cfg.hidden_size, cfg.experts.intermediate_size, cfg.hidden_size), cfg.experts.activation)
            self.gated, self.eps = True, 1e-5
        else:
            groups = cfg.expert_groups()
            if len(groups) != 1:
                raise SystemExit(f"{preset}: the benchmark covers uniform presets (one expert group)")
            spec, _ = groups[0]
            self.gated, self.eps = False, float(cfg.layer_norm_eps)
        self.name, self.cfg, self.spec = preset, cfg, spec
        self.e, self.h, self.k = cfg.num_experts, cfg.hidden_size, cfg.top_k
        self.normalize = bool(cfg.normalize)
        g = torch.Generator(device=device).manual_seed(seed)
        dev = device
        self.router = torch.randn(self.e, self.h, generator=g, device=dev) / self.h ** 0.5
        self.router_bias = torch.zeros(self.e, device=dev)
        self.w, self.b, self.gamma, self.beta = [], [], [], []
        for layer in range(spec.num_layers):
            inp, rows = spec.widths[layer], self.rows(layer)
            self.w.append(torch.randn(self.e, rows, inp, generator=g, device=dev, dtype=torch.float16) / inp ** 0.5)
            self.b.append(torch.zeros(self.e, rows, device=dev) if self.gated
                          else torch.randn(self.e, rows, generator=g, device=dev) * 0.02)
            if spec.layer_norm and layer < spec.num_layers - 1:
                self.gamma.append(1 + 0.1 * torch.randn(self.e, rows, generator=g, device=dev))
                self.beta.append(0.02 * torch.randn(self.e, rows, generator=g, device=dev))

    def rows(self, layer: int) -> int:
        """Rows of layer ``layer``'s weight: 2 x out for a gated hidden layer ([gate; up]), else out."""
        out = self.spec.widths[layer + 1]
        return 2 * out if self.gated and layer < self.spec.num_layers - 1 else out

    def v2_fields(self) -> dict:
        return {"gated": 1, "bias": 0} if self.gated else {}

    def hidden(self, h, layer: int, gamma=None, beta=None):
        """After hidden layer ``layer``'s linear: LayerNorm (if any) and the activation, or the GLU when gated."""
        import torch.nn.functional as F

        if self.gated:
            out = self.spec.widths[layer + 1]
            return self.act(h[..., :out]) * h[..., out:]
        if gamma is not None:
            h = F.layer_norm(h, (h.shape[-1],), gamma, beta, self.eps)
        return self.act(h)

    def params(self) -> list:
        out = []
        for layer in range(self.spec.num_layers):
            out += [self.w[layer]] + ([] if self.gated else [self.b[layer]])
            if layer < len(self.gamma):
                out += [self.gamma[layer], self.beta[layer]]
        return out

    def quantize(self, calibration_tokens: int = 256) -> None:
        """int8 codes + per-output-channel scales of the fp16 weights (symmetric, max|W_row| / 127), SmoothQuant
        divisors of 1, and static activation scales max|input| / 127 per (layer, expert) from the fp32 forward
        pass of `calibration_tokens` standard-normal tokens through every expert (the max calibration)."""
        import torch

        self.w_q, self.w_scale, self.act_smooth = [], [], []
        for layer in range(self.spec.num_layers):
            codes, scales = [], []
            for e in range(self.e):  # one expert at a time: the fp32 copy of a mixtral weight is 235 MB
                w = self.w[layer][e].float()
                s = w.abs().amax(dim=-1).clamp_min(1e-12) / 127.0
                codes.append(torch.round(w / s[:, None]).clamp_(-127, 127).to(torch.int8))
                scales.append(s)
            self.w_q.append(torch.stack(codes).contiguous())
            self.w_scale.append(torch.stack(scales).contiguous())
            self.act_smooth.append(torch.ones(self.e, self.spec.widths[layer], device="cuda"))
        g = torch.Generator(device="cuda").manual_seed(1234)
        x = torch.randn(calibration_tokens, self.h, generator=g, device="cuda", dtype=torch.float16).float()
        scales = [[0.0] * self.e for _ in range(self.spec.num_layers)]
        for e in range(self.e):
            h = x
            for layer in range(self.spec.num_layers):
                scales[layer][e] = max(float(h.abs().max()) / 127.0, 1e-8)
                h = torch.nn.functional.linear(h, self.w[layer][e].float(), self.b[layer][e])
                if layer < self.spec.num_layers - 1:
                    ln = (self.gamma[layer][e], self.beta[layer][e]) if layer < len(self.gamma) else (None, None)
                    h = self.hidden(h, layer, *ln)
        self.act_scales = [s for per_layer in scales for s in per_layer]  # layer-major, [L * E]

    def int8_params(self) -> list:
        out = []
        for layer in range(self.spec.num_layers):
            out += [self.w_q[layer], self.w_scale[layer], self.act_smooth[layer]]
            out += [] if self.gated else [self.b[layer]]
            if layer < len(self.gamma):
                out += [self.gamma[layer], self.beta[layer]]
        return out

    def int8_bytes_per_expert(self) -> int:
        return sum(self.spec.widths[i] * self.rows(i) for i in range(self.spec.num_layers))

    def act(self, x):
        from pimoe_export.model.functional import activation_fn

        return activation_fn(self.spec.activation, x)

    def routing(self, x):
        import torch

        logits = torch.nn.functional.linear(x.float(), self.router)
        probs = torch.softmax(logits, dim=-1)
        weights, ids = torch.topk(probs + self.router_bias, self.k, dim=-1)
        weights = probs.gather(-1, ids)
        if self.normalize:
            weights = weights / weights.sum(-1, keepdim=True)
        return weights, ids


# ------------------------------------------------------------------------------------------ paths
def plugin_path(layer: Layer, x, harness, quant_mode: str = "none"):
    """The four plugins on fixed buffers; quant_mode w8a8 / w8a8_dynamic runs the int8 expert MLP."""
    import torch

    from pimoe_export.ops import schema
    from pimoe_export.testing.harness import BoundOp, expert_mlp_fields

    t = x.shape[0]
    logits = torch.empty(t, layer.e, device="cuda")
    x32 = torch.empty(t, layer.h, device="cuda")
    route = BoundOp(harness, schema.ROUTE, {"k": layer.k, "normalize": int(layer.normalize)},
                    [logits, layer.router_bias])
    dispatch = BoundOp(harness, schema.DISPATCH, {"num_experts": layer.e}, [x, route.outputs[1]])
    params = layer.params() if quant_mode == "none" else layer.int8_params()
    attrs = expert_mlp_fields(list(range(layer.e)), layer.spec.widths, layer.spec.activation, layer.spec.layer_norm,
                              layer.eps, quant_mode, layer.act_scales if quant_mode == "w8a8" else (),
                              **layer.v2_fields())
    mlp = BoundOp(harness, schema.EXPERT_MLP, attrs, [dispatch.outputs[0], dispatch.outputs[1], *params])
    combine = BoundOp(harness, schema.COMBINE, {}, [mlp.outputs[0], dispatch.outputs[2], route.outputs[0]])
    ops = [route, dispatch, mlp, combine]

    def step():
        x32.copy_(x)
        torch.mm(x32, layer.router.t(), out=logits)
        for op in ops:
            op.enqueue()
        return combine.outputs[0]

    return step, ops


def torch_eager(layer: Layer, x):
    import torch
    import torch.nn.functional as F

    w = layer.w
    b = [bias.half() for bias in layer.b]
    gamma = [g.half() for g in layer.gamma]
    beta = [g.half() for g in layer.beta]

    def step():
        weights, ids = layer.routing(x)
        y = torch.zeros_like(x)
        for e in range(layer.e):
            token, slot = torch.nonzero(ids == e, as_tuple=True)
            if token.numel() == 0:
                continue
            h = x[token]
            for i in range(layer.spec.num_layers):
                h = F.linear(h, w[i][e], None if layer.gated else b[i][e])
                if i < layer.spec.num_layers - 1:
                    h = layer.hidden(h, i, *((gamma[i][e], beta[i][e]) if i < len(gamma) else (None, None)))
            y.index_add_(0, token, h * weights[token, slot, None].half())
        return y

    return step


def torch_dense(layer: Layer, x):
    import torch
    import torch.nn.functional as F

    b = [bias.half()[:, None, :] for bias in layer.b]
    gamma = [g.half()[:, None, :] for g in layer.gamma]
    beta = [g.half()[:, None, :] for g in layer.beta]

    def step():
        weights, ids = layer.routing(x)
        gate = torch.zeros(x.shape[0], layer.e, device="cuda").scatter(1, ids, weights).half()
        h = x.unsqueeze(0).expand(layer.e, -1, -1)
        for i in range(layer.spec.num_layers):
            h = (torch.bmm(h, layer.w[i].transpose(1, 2)) if layer.gated
                 else torch.baddbmm(b[i], h, layer.w[i].transpose(1, 2)))
            if i < layer.spec.num_layers - 1:
                if i < len(gamma):
                    h = F.layer_norm(h, (h.shape[-1],), eps=layer.eps) * gamma[i] + beta[i]
                h = layer.hidden(h, i)
        return torch.einsum("te,eth->th", gate, h)

    return step


def grouped_mm(layer: Layer, x):
    import torch
    import torch.nn.functional as F

    if not hasattr(torch, "_grouped_mm"):
        raise RuntimeError("this torch has no torch._grouped_mm")
    wt = [w.to(torch.bfloat16).transpose(1, 2) for w in layer.w]  # [E, in, out] views with stride(-2) == 1
    xb = x.to(torch.bfloat16)
    experts = torch.arange(layer.e, device="cuda")

    def step():
        weights, ids = layer.routing(x)
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = (flat[:, None] == experts[None, :]).sum(0)  # no host sync (bincount would need one)
        offs = torch.cumsum(counts, 0).to(torch.int32)
        sorted_expert = flat[order]
        h = xb[order // layer.k]
        for i in range(layer.spec.num_layers):
            h = torch._grouped_mm(h, wt[i], offs=offs)
            if not layer.gated:
                h = h + layer.b[i][sorted_expert].to(torch.bfloat16)
            if i < layer.spec.num_layers - 1:
                if i < len(layer.gamma):
                    h = F.layer_norm(h.float(), (h.shape[-1],), eps=layer.eps) * layer.gamma[i][sorted_expert] \
                        + layer.beta[i][sorted_expert]
                h = layer.hidden(h, i).to(torch.bfloat16)
        out = torch.empty_like(h)
        out[order] = h
        return (out.view(x.shape[0], layer.k, -1).float() * weights[..., None]).sum(1).half()

    return step


# ------------------------------------------------------------------------------------------ driver
def rel_l2(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def measure_bandwidth(iters: int = 20, size: int = 1 << 30) -> float:
    """Device memory bandwidth in GB/s: a device-to-device copy of `size` bytes moves 2 x size bytes."""
    import torch

    buffers = [torch.empty(size, dtype=torch.uint8, device="cuda") for _ in range(2)]
    ms = time_cuda(lambda: buffers[1].copy_(buffers[0]), iters)["median_ms"]
    buffers.clear()
    torch.cuda.empty_cache()
    return 2 * size / (ms * 1e-3) / 1e9


def bench_int8(layer: Layer, x, harness, iters: int, fp16_out, bandwidth_gbs: float) -> dict:
    """The int8 plugin paths for input x, against the weight-streaming floor of the experts its routing touches."""
    import torch

    results: dict[str, dict] = {}
    step, ops = plugin_path(layer, x, harness, "w8a8")
    try:
        out = step()
        for op in ops:
            op.check_status()
        ids = ops[0].outputs[1]
        touched = int(torch.unique(ids).numel())
        vs_fp16 = rel_l2(out, fp16_out)
        results["int8-eager"] = time_cuda(step, iters)
        results["int8-graph"] = time_cuda(graphed(step), iters)
        mlp = ops[2]
        results["int8-mlp-graph"] = time_cuda(graphed(lambda: mlp.enqueue()), iters)
    finally:
        torch.cuda.synchronize()
        for op in ops:
            op.close()
    step, ops = plugin_path(layer, x, harness, "w8a8_dynamic")
    try:
        dyn_vs_fp16 = rel_l2(step(), fp16_out)
        for op in ops:
            op.check_status()
        results["int8-dyn-graph"] = time_cuda(graphed(step), iters)
    finally:
        torch.cuda.synchronize()
        for op in ops:
            op.close()
    floor_ms = touched * layer.int8_bytes_per_expert() / (bandwidth_gbs * 1e9) * 1e3
    return {"paths": results, "experts_touched": touched, "floor_ms": floor_ms,
            "graph_vs_floor": results["int8-graph"]["median_ms"] / floor_ms,
            "mlp_vs_floor": results["int8-mlp-graph"]["median_ms"] / floor_ms,
            "int8_vs_fp16_rel_l2": vs_fp16, "int8_dyn_vs_fp16_rel_l2": dyn_vs_fp16}


def bench_config(preset: str, tokens: list[int], iters: int, harness, bandwidth_gbs: float | None) -> Iterator[dict]:
    """One record per token count, yielded as soon as it is measured."""
    import torch

    layer = Layer(preset)
    if bandwidth_gbs is not None:
        layer.quantize()
    for t in tokens:
        x = torch.randn(t, layer.h, device="cuda", dtype=torch.float16)
        results: dict[str, dict] = {}
        step, ops = plugin_path(layer, x, harness)
        try:
            step()
            for op in ops:
                op.check_status()
            reference = torch_dense(layer, x)()
            fp16_out = step().clone()
            check = rel_l2(fp16_out, reference)
            results["plugins-eager"] = time_cuda(step, iters)
            results["plugins-graph"] = time_cuda(graphed(step), iters)
        finally:
            torch.cuda.synchronize()
            for op in ops:
                op.close()
        int8 = None
        if bandwidth_gbs is not None:
            try:
                int8 = bench_int8(layer, x, harness, iters, fp16_out, bandwidth_gbs)
            except Exception as exc:  # report, do not abort the benchmark
                int8 = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        for name, make in (("torch-eager", torch_eager), ("torch-dense", torch_dense)):
            results[name] = time_cuda(make(layer, x), iters)
        try:
            gmm = grouped_mm(layer, x)
            gmm_check = rel_l2(gmm(), reference)
            results["grouped-mm-graph"] = time_cuda(graphed(gmm), iters)
        except Exception as exc:  # report, do not abort the benchmark
            gmm_check = float("nan")
            results["grouped-mm-graph"] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
        record = {"config": preset, "tokens": t, "dtype": "fp16 (grouped_mm: bf16)",
                  "plugins_vs_dense_rel_l2": check, "grouped_mm_vs_dense_rel_l2": gmm_check, "paths": results}
        base = results["grouped-mm-graph"].get("median_ms")
        if base:
            record["speedup_plugins_graph_vs_grouped_mm"] = base / results["plugins-graph"]["median_ms"]
        if int8 is not None:
            record["int8"] = int8
        print(f"{preset:12s} T={t:5d} " + "  ".join(
            f"{p}={results[p].get('median_ms', float('nan')):.3f}ms" for p in PATHS) + f"  check={check:.2e}",
            flush=True)
        if int8 is not None and "error" not in int8:
            print(f"{'':12s} int8: " + "  ".join(
                f"{p}={int8['paths'][p]['median_ms']:.3f}ms" for p in INT8_PATHS) +
                f"  floor={int8['floor_ms']:.3f}ms ({int8['experts_touched']} experts)"
                f"  graph/floor={int8['graph_vs_floor']:.2f}  vs fp16 rel L2={int8['int8_vs_fp16_rel_l2']:.1e}",
                flush=True)
        elif int8 is not None:
            print(f"{'':12s} int8: {int8['error']}", flush=True)
        del x
        torch.cuda.empty_cache()
        yield record
    del layer
    torch.cuda.empty_cache()


def bench_emulated(preset: str, tokens: list[int], iters: int, harness) -> Iterator[dict]:
    """The dry-run rows: the plugin path (fp16) through the emulated harness, checked against an fp32 dense
    reference, timed on the CPU (the emulator's speed, not a GPU's)."""
    import numpy as np
    import torch

    from pimoe_export.ops import schema
    from pimoe_export.testing.harness import HarnessOpBackend, expert_mlp_fields

    layer = Layer(preset, device="cpu")
    backend = HarnessOpBackend(harness)
    attrs = expert_mlp_fields(list(range(layer.e)), layer.spec.widths, layer.spec.activation, layer.spec.layer_norm,
                              layer.eps, **layer.v2_fields())
    params = [p.contiguous().numpy() for p in layer.params()]
    for t in tokens:
        x = torch.randn(t, layer.h, generator=torch.Generator().manual_seed(t)).half()

        def step(x=x):
            logits = torch.nn.functional.linear(x.float(), layer.router).numpy()
            weights, ids = backend.route(logits, layer.router_bias.numpy(), layer.k, layer.normalize)
            x_sorted, offsets, f2s = backend.dispatch(x.numpy(), ids, layer.e)
            y_sorted = backend.run(schema.EXPERT_MLP, attrs, [x_sorted, offsets, *params])[0]
            return backend.combine(y_sorted, f2s, weights)

        out = torch.from_numpy(step()).float()
        weights, ids = layer.routing(x)
        ref = torch.zeros(t, layer.h)
        for slot in range(layer.k):  # fp32 dense reference, expert by expert
            for e in range(layer.e):
                rows = ids[:, slot] == e
                h = x[rows].float()
                for i in range(layer.spec.num_layers):
                    h = torch.nn.functional.linear(h, layer.w[i][e].float(), layer.b[i][e])
                    if i < layer.spec.num_layers - 1:
                        ln = (layer.gamma[i][e], layer.beta[i][e]) if i < len(layer.gamma) else (None, None)
                        h = layer.hidden(h, i, *ln)
                ref[rows] += weights[rows, slot, None] * h
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            step()
            times.append((time.perf_counter() - start) * 1e3)
        check = rel_l2(out, ref)
        print(f"{preset:12s} T={t:5d} plugins-emulated={statistics.median(times):.1f}ms (CPU)  check={check:.2e}",
              flush=True)
        yield {"config": preset, "tokens": t, "dtype": "fp16 (emulated)", "plugins_vs_dense_rel_l2": check,
               "paths": {"plugins-emulated": {"median_ms": statistics.median(times), "p10_ms": float(np.min(times)),
                                              "p90_ms": float(np.max(times))}}}


def markdown_emulated(records: list[dict], when: str) -> str:
    lines = [f"EMULATED dry run ({when}): the plugin path on plugins/emu (CPU); milliseconds of the emulator, NOT of a "
             "GPU", "", "| config | T | plugins-emulated (CPU ms) | plugins vs fp32 dense (rel L2) |",
             "|---|---:|---:|---:|"]
    for r in records:
        lines.append(f"| {r['config']} | {r['tokens']} | {r['paths']['plugins-emulated']['median_ms']:.1f} | "
                     f"{r['plugins_vs_dense_rel_l2']:.1e} |")
    return "\n".join(lines) + "\n"


def markdown_int8(records: list[dict], bandwidth_gbs: float) -> list[str]:
    rows = [r for r in records if "int8" in r]
    if not rows:
        return []
    lines = ["", f"INT8 (W8A8) plugin paths, fp16 I/O; weight-streaming floor = int8 weight bytes of the experts the "
             f"routing touched / {bandwidth_gbs:.0f} GB/s (device-to-device copy measured in this run)", "",
             "| config | T | experts | floor | " + " | ".join(INT8_PATHS) +
             " | int8-graph / floor | int8-mlp-graph / floor | int8 vs fp16 (rel L2) |",
             "|---|---:|---:|---:|" + "---:|" * len(INT8_PATHS) + "---:|---:|---:|"]
    for r in rows:
        q = r["int8"]
        if "error" in q:
            lines.append(f"| {r['config']} | {r['tokens']} | error: {q['error']} |")
            continue
        cells = [f"{q['paths'][p]['median_ms']:.3f}" for p in INT8_PATHS]
        lines.append(f"| {r['config']} | {r['tokens']} | {q['experts_touched']} | {q['floor_ms']:.3f} | " +
                     " | ".join(cells) + f" | {q['graph_vs_floor']:.2f}x | {q['mlp_vs_floor']:.2f}x | "
                     f"{q['int8_vs_fp16_rel_l2']:.1e} |")
    return lines


def markdown(records: list[dict], gpu: str, when: str, bandwidth_gbs: float | None = None) -> str:
    lines = [f"GPU benchmark ({gpu}, {when}); median ms per layer call (CUDA events); `python scripts/bench_gpu.py`",
             "", "| config | T | " + " | ".join(PATHS) + " | plugins-graph vs grouped-mm | plugins vs dense (rel L2) |",
             "|---|---:|" + "---:|" * len(PATHS) + "---:|---:|"]
    for r in records:
        cells = []
        for p in PATHS:
            value = r["paths"][p].get("median_ms")
            cells.append(f"{value:.3f}" if value is not None else "n/a")
        speed = r.get("speedup_plugins_graph_vs_grouped_mm")
        lines.append(f"| {r['config']} | {r['tokens']} | " + " | ".join(cells) +
                     f" | {f'{speed:.2f}x' if speed else 'n/a'} | {r['plugins_vs_dense_rel_l2']:.1e} |")
    errors = {r["paths"]["grouped-mm-graph"].get("error") for r in records} - {None}
    if errors:
        lines += ["", f"grouped-mm-graph unavailable: {sorted(errors)[0]}"]
    if bandwidth_gbs is not None:
        lines += markdown_int8(records, bandwidth_gbs)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="seed-512,qwen3-moe,mixtral-ffn")
    parser.add_argument("--tokens", default="1,16,128,1024")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--no-int8", action="store_true", help="skip the INT8 (W8A8) plugin paths")
    parser.add_argument("--emulated", action="store_true",
                        help="dry run on a CPU: the emulated harness, CPU timings (not GPU numbers)")
    parser.add_argument("--out", default="gpu-results")
    args = parser.parse_args(argv)
    import torch

    if args.emulated:
        return main_emulated(args)
    if not torch.cuda.is_available():
        print("bench_gpu.py needs a CUDA GPU (torch.cuda is not available)", file=sys.stderr)
        return 2
    from pimoe_export.testing.harness import Harness, find_harness

    path = find_harness()
    if path is None:
        print("libpimoe_trt_harness.so not found: build it (scripts/gpu_check.sh does)", file=sys.stderr)
        return 2
    harness = Harness(path)
    torch.backends.cuda.matmul.allow_tf32 = False
    gpu = torch.cuda.get_device_name()
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    tokens = [int(t) for t in args.tokens.split(",")]
    start = time.perf_counter()
    bandwidth = None if args.no_int8 else measure_bandwidth()
    if bandwidth is not None:
        print(f"device-to-device copy bandwidth: {bandwidth:.0f} GB/s", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    table = ""
    for preset in args.configs.split(","):
        for record in bench_config(preset, tokens, args.iters, harness, bandwidth):
            records.append(record)
            # written after every row, so a run cut short by a time limit still leaves every finished row
            write_results(out, {"gpu": gpu, "date": when, "torch": torch.__version__, "copy_bandwidth_gbs": bandwidth,
                                "seconds": time.perf_counter() - start, "records": records},
                          table := markdown(records, gpu, when, bandwidth))
    print(table)
    return 0


def write_results(out: Path, data: dict, table: str) -> None:
    """bench_gpu.json and bench_gpu.md, each replaced whole (a reader never sees half a file)."""
    for name, text in (("bench_gpu.json", json.dumps(data, indent=2)), ("bench_gpu.md", table)):
        partial = out / f".{name}.partial"
        partial.write_text(text)
        partial.replace(out / name)


def main_emulated(args: argparse.Namespace) -> int:
    from pimoe_export.testing.harness import Harness, find_harness

    path = find_harness(emulated=True)
    if path is None:
        print("libpimoe_trt_harness_emu.so not found: run scripts/setup.sh", file=sys.stderr)
        return 2
    harness = Harness(path)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    start = time.perf_counter()
    table = ""
    for preset in args.configs.split(","):
        for record in bench_emulated(preset, [int(t) for t in args.tokens.split(",")], args.iters, harness):
            records.append(record)
            write_results(out, {"gpu": "none (emulated dry run)", "date": when, "emulated": True,
                                "seconds": time.perf_counter() - start, "records": records},
                          table := markdown_emulated(records, when))
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
