"""GPU benchmark of one PiMoE FFN layer: our TensorRT plugin objects (through plugins/harness, fp16) vs PyTorch.

Every path computes the same thing from the same weights: router logits (one fp32 linear [E, H]), softmax/top-k,
the experts of the preset (seed-512: 512 -> 2048 -> 512 with LayerNorm + GELU; mixtral-ffn: 4096 -> 14336 ->
4096, GELU) and the weighted combine.

  plugins-graph     route -> dispatch -> expert MLP -> combine, the plugin objects' enqueue (fp16) in a CUDA graph
  plugins-eager     the same enqueue calls issued from Python (host overhead per call included)
  torch-eager       PyTorch eager, loop over experts (nonzero / index_add_), fp16
  torch-dense       every expert on every token (batched matmul), fp16
  grouped-mm-graph  sort + torch._grouped_mm (bf16) replayed in a CUDA graph: the strongest PyTorch path

Weights are created on the GPU directly (mixtral-ffn is 1.9 GB in fp16; never through the fp32 CPU model).
Timings are medians of CUDA-event measurements. Needs a CUDA GPU (scripts/gpu_check.sh runs it); writes
bench_gpu.json and bench_gpu.md into --out.

usage: python scripts/bench_gpu.py [--configs seed-512,mixtral-ffn] [--tokens 1,16,128,1024] [--iters 30]
                                   [--out gpu-results]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

PATHS = ["plugins-graph", "plugins-eager", "torch-eager", "torch-dense", "grouped-mm-graph"]


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


class Layer:
    """Random weights of one preset's uniform expert group, created on the GPU."""

    def __init__(self, preset: str, seed: int = 0) -> None:
        import torch

        from pimoe_export.model.factory import preset_config

        cfg = preset_config(preset)
        groups = cfg.expert_groups()
        if len(groups) != 1:
            raise SystemExit(f"{preset}: the benchmark covers uniform presets (one expert group)")
        spec, _ = groups[0]
        self.name, self.cfg, self.spec = preset, cfg, spec
        self.e, self.h, self.k = cfg.num_experts, cfg.hidden_size, cfg.top_k
        self.normalize, self.eps = bool(cfg.normalize), float(cfg.layer_norm_eps)
        g = torch.Generator(device="cuda").manual_seed(seed)
        dev = "cuda"
        self.router = torch.randn(self.e, self.h, generator=g, device=dev) / self.h ** 0.5
        self.router_bias = torch.zeros(self.e, device=dev)
        self.w, self.b, self.gamma, self.beta = [], [], [], []
        for layer in range(spec.num_layers):
            inp, out = spec.widths[layer], spec.widths[layer + 1]
            self.w.append(torch.randn(self.e, out, inp, generator=g, device=dev, dtype=torch.float16) / inp ** 0.5)
            self.b.append(torch.randn(self.e, out, generator=g, device=dev) * 0.02)
            if spec.layer_norm and layer < spec.num_layers - 1:
                self.gamma.append(1 + 0.1 * torch.randn(self.e, out, generator=g, device=dev))
                self.beta.append(0.02 * torch.randn(self.e, out, generator=g, device=dev))

    def params(self) -> list:
        out = []
        for layer in range(self.spec.num_layers):
            out += [self.w[layer], self.b[layer]]
            if layer < len(self.gamma):
                out += [self.gamma[layer], self.beta[layer]]
        return out

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
def plugin_path(layer: Layer, x, harness):
    import torch
    from gpu_harness import BoundOp, expert_mlp_fields

    from pimoe_export.ops import schema

    t = x.shape[0]
    logits = torch.empty(t, layer.e, device="cuda")
    x32 = torch.empty(t, layer.h, device="cuda")
    route = BoundOp(harness, schema.ROUTE, {"k": layer.k, "normalize": int(layer.normalize)},
                    [logits, layer.router_bias])
    dispatch = BoundOp(harness, schema.DISPATCH, {"num_experts": layer.e}, [x, route.outputs[1]])
    attrs = expert_mlp_fields(list(range(layer.e)), layer.spec.widths, layer.spec.activation, layer.spec.layer_norm,
                              layer.eps)
    mlp = BoundOp(harness, schema.EXPERT_MLP, attrs, [dispatch.outputs[0], dispatch.outputs[1], *layer.params()])
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
                h = F.linear(h, w[i][e], b[i][e])
                if i < layer.spec.num_layers - 1:
                    if i < len(gamma):
                        h = F.layer_norm(h, (h.shape[-1],), gamma[i][e], beta[i][e], layer.eps)
                    h = layer.act(h)
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
            h = torch.baddbmm(b[i], h, layer.w[i].transpose(1, 2))
            if i < layer.spec.num_layers - 1:
                if i < len(gamma):
                    h = F.layer_norm(h, (h.shape[-1],), eps=layer.eps) * gamma[i] + beta[i]
                h = layer.act(h)
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
            h = torch._grouped_mm(h, wt[i], offs=offs) + layer.b[i][sorted_expert].to(torch.bfloat16)
            if i < layer.spec.num_layers - 1:
                if i < len(layer.gamma):
                    h = F.layer_norm(h.float(), (h.shape[-1],), eps=layer.eps) * layer.gamma[i][sorted_expert] \
                        + layer.beta[i][sorted_expert]
                h = layer.act(h).to(torch.bfloat16)
        out = torch.empty_like(h)
        out[order] = h
        return (out.view(x.shape[0], layer.k, -1).float() * weights[..., None]).sum(1).half()

    return step


# ------------------------------------------------------------------------------------------ driver
def rel_l2(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def bench_config(preset: str, tokens: list[int], iters: int, harness) -> list[dict]:
    import torch

    layer = Layer(preset)
    records = []
    for t in tokens:
        x = torch.randn(t, layer.h, device="cuda", dtype=torch.float16)
        results: dict[str, dict] = {}
        step, ops = plugin_path(layer, x, harness)
        try:
            step()
            for op in ops:
                op.check_status()
            reference = torch_dense(layer, x)()
            check = rel_l2(step(), reference)
            results["plugins-eager"] = time_cuda(step, iters)
            results["plugins-graph"] = time_cuda(graphed(step), iters)
        finally:
            torch.cuda.synchronize()
            for op in ops:
                op.close()
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
        records.append(record)
        print(f"{preset:12s} T={t:5d} " + "  ".join(
            f"{p}={results[p].get('median_ms', float('nan')):.3f}ms" for p in PATHS) + f"  check={check:.2e}",
            flush=True)
        del x
        torch.cuda.empty_cache()
    del layer
    torch.cuda.empty_cache()
    return records


def markdown(records: list[dict], gpu: str, when: str) -> str:
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
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="seed-512,mixtral-ffn")
    parser.add_argument("--tokens", default="1,16,128,1024")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--out", default="gpu-results")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench_gpu.py needs a CUDA GPU (torch.cuda is not available)", file=sys.stderr)
        return 2
    from gpu_harness import Harness, find_harness

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
    records = []
    for preset in args.configs.split(","):
        records += bench_config(preset, tokens, args.iters, harness)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_gpu.json").write_text(json.dumps({"gpu": gpu, "date": when, "torch": torch.__version__,
                                                    "seconds": time.perf_counter() - start, "records": records},
                                                   indent=2))
    table = markdown(records, gpu, when)
    (out / "bench_gpu.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
