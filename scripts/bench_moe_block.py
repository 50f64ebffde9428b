#!/usr/bin/env python3
"""CPU benchmark of a gated MoE block shaped like one layer of a real decoder, side by side in one run.

Shapes (``--shape``, the MoE-block presets of pimoe_export.model.factory): ``mixtral-ffn`` (Mixtral-8x7B: H 4096,
I 14336, E 8, k 2) and ``qwen3-moe`` (Qwen3-30B-A3B: H 2048, I 768, E 128, k 8); gated SiLU experts without biases
or LayerNorm, softmax routing renormalised over the k.
Variants, all on the same seeded weights and inputs, batch 1 and T tokens:

- ``hf_block``: the Hugging Face block in eager PyTorch (``MixtralSparseMoeBlock`` / ``Qwen3MoeSparseMoeBlock``
  of the installed transformers), fp32; the reference every other output is compared with
- ``ort_contrib_moe``: ONNX Runtime's ``com.microsoft.MoE`` with ``activation_type=swiglu`` (fc1 rows interleaved
  gate/up, ``swiglu_fusion=1``, alpha 1, beta 0: exactly silu(gate) * up), our router MatMul in front, fp32
- ``ort_pimoe``: our graph (router MatMul, PiMoERoute, PiMoEDispatch, one gated PiMoEExpertMLP, PiMoECombine in
  Hugging Face's expert order) on libpimoe_ort, fp32
- ``ort_pimoe_int8``: the same graph with W8A8 experts (int8 weights with per-row scales, activations quantised per
  row at run time: ``quant_mode=w8a8_dynamic``; ONNX Runtime's QMoE has no fp32/int8 CPU kernel to compare with)

Each (variant, thread count) is measured in its own process (the Mixtral shape holds 5.6 GB of fp32 weights; one
copy at a time), every point the median of its repeats after warm-up; ``--rounds`` repeats the whole sweep and a
cell is the median of the per-round medians. Graphs are written with external data (no 2 GB protobuf limit) and
removed afterwards. Nothing here asserts a time.

Usage:
    .venv/bin/python scripts/bench_moe_block.py --shape qwen3-moe --tokens 1,16,128,1024 --threads 1,2 --update-docs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

VARIANTS = ("hf_block", "ort_contrib_moe", "ort_pimoe", "ort_pimoe_int8")


@dataclass(frozen=True)
class Shape:
    hidden: int
    inter: int
    experts: int
    top_k: int
    family: str  # the transformers model type whose block is the reference


BLOCK_PRESETS = ("mixtral-ffn", "qwen3-moe")


def preset_shape(name: str) -> Shape:
    """The shape of a MoE-block preset (pimoe_export.model.factory.PRESETS), which must be a plain gated block."""
    from pimoe_export.model.factory import preset_config

    cfg = preset_config(name)
    if (cfg.scoring, cfg.num_groups, cfg.shared, cfg.experts.gated, cfg.experts.bias, cfg.experts.activation,
            cfg.normalize) != ("softmax", 1, None, True, False, "silu", True):
        raise SystemExit(f"{name}: this benchmark covers softmax-routed, renormalised, gated silu blocks")
    return Shape(cfg.hidden_size, cfg.experts.intermediate_size, cfg.num_experts, cfg.top_k, cfg.family)


def weights(shape: Shape, seed: int = 0) -> dict[str, np.ndarray]:
    """Router [E, H], gate and up [E, I, H], down [E, H, I]; N(0, 1/fan_in) so activations stay O(1)."""
    rng = np.random.default_rng(seed)
    h, i, e = shape.hidden, shape.inter, shape.experts
    out = {}
    for name, dims, fan_in in (("router", (e, h), h), ("gate", (e, i, h), h), ("up", (e, i, h), h),
                               ("down", (e, h, i), i)):
        w = rng.standard_normal(dims, dtype=np.float32)
        w *= np.float32(1.0 / np.sqrt(fan_in))
        out[name] = w
    return out


def token_inputs(shape: Shape, tokens: int) -> np.ndarray:
    return np.random.default_rng(1000 + tokens).standard_normal((tokens, shape.hidden), dtype=np.float32)


# --- graphs ---------------------------------------------------------------------------------------------------------

class ExternalData:
    """Initializers written straight to one external-data file (no in-memory protobuf copy of the weights)."""

    def __init__(self, directory: Path) -> None:
        self.location = "weights.bin"
        self.handle: BinaryIO = open(directory / self.location, "wb")  # noqa: SIM115 - closed by close()
        self.tensors: list[Any] = []

    def add(self, name: str, array: np.ndarray) -> None:
        from onnx import TensorProto, helper

        array = np.ascontiguousarray(array)
        offset = self.handle.tell()
        pad = (-offset) % 64
        self.handle.write(b"\0" * pad)
        offset += pad
        array.tofile(self.handle)
        tensor = TensorProto(name=name, dims=list(array.shape),
                             data_type=helper.np_dtype_to_tensor_dtype(array.dtype))
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(offset)), ("length", str(array.nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.tensors.append(tensor)

    def close(self) -> None:
        self.handle.close()


def save_graph(directory: Path, nodes: list, store: ExternalData, extra_opsets: dict[str, int]) -> Path:
    import onnx
    from onnx import TensorProto, helper

    store.close()
    graph = helper.make_graph(nodes, "moe_block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None])],
                              initializer=store.tensors)
    opsets = [helper.make_opsetid("", 18)] + [helper.make_opsetid(d, v) for d, v in extra_opsets.items()]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    path = directory / "model.onnx"
    onnx.save_model(model, str(path))
    return path


def contrib_graph(shape: Shape, w: dict[str, np.ndarray], directory: Path) -> Path:
    from onnx import helper

    store = ExternalData(directory)
    store.add("router_t", np.ascontiguousarray(w["router"].T))
    fc1 = np.empty((shape.experts, 2 * shape.inter, shape.hidden), np.float32)
    fc1[:, 0::2], fc1[:, 1::2] = w["gate"], w["up"]  # interleaved rows: gate, up, gate, up, ...
    store.add("fc1", fc1)
    del fc1
    store.add("fc2", w["down"])
    nodes = [helper.make_node("MatMul", ["x", "router_t"], ["logits"]),
             helper.make_node("MoE", ["x", "logits", "fc1", "", "fc2"], ["y"], domain="com.microsoft",
                              k=shape.top_k, activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0,
                              activation_beta=0.0, normalize_routing_weights=1)]
    return save_graph(directory, nodes, store, {"com.microsoft": 1})


def pimoe_graph(shape: Shape, w: dict[str, np.ndarray], directory: Path, int8: bool) -> Path:
    from onnx import helper

    from pimoe_export.ops import schema
    from pimoe_export.quantize.int8 import quantize_weight

    store = ExternalData(directory)
    store.add("router_t", np.ascontiguousarray(w["router"].T))
    mode = "w8a8_dynamic" if int8 else "none"
    layers = [np.concatenate([w["gate"], w["up"]], axis=1), w["down"]]  # gated rows [gate; up]
    params = []
    for layer, role in schema.expert_mlp_param_layout(2, False, mode, bias=False):
        name = f"l{layer}_{role}"
        if role == "weight":
            if int8:
                q, scale = quantize_weight(layers[layer])
                store.add(name, q)
                store.add(f"l{layer}_w_scale", scale)
            else:
                store.add(name, layers[layer])
        elif role == "act_smooth":
            store.add(name, np.ones((shape.experts, layers[layer].shape[2]), np.float32))
        elif role != "w_scale":
            raise SystemExit(f"unexpected parameter role {role!r} for a bias-free gated layer")
        params.append(name)
    del layers
    e, k = shape.experts, shape.top_k
    nodes = [
        helper.make_node("MatMul", ["x", "router_t"], ["logits"]),
        helper.make_node(schema.ROUTE, ["logits"], ["weights", "ids"], domain=schema.DOMAIN, k=k, normalize=1),
        helper.make_node(schema.DISPATCH, ["x", "ids"], ["x_sorted", "offsets", "flat_to_sorted"],
                         domain=schema.DOMAIN, num_experts=e),
        helper.make_node(schema.EXPERT_MLP, ["x_sorted", "offsets", *params], ["y_sorted"], domain=schema.DOMAIN,
                         expert_ids=list(range(e)), widths=[shape.hidden, shape.inter, shape.hidden],
                         activation="silu", layer_norm=0, quant_mode=mode, gated=1, bias=0),
        helper.make_node(schema.COMBINE, ["y_sorted", "flat_to_sorted", "weights"], ["y"], domain=schema.DOMAIN,
                         order="expert"),
    ]
    return save_graph(directory, nodes, store, {schema.DOMAIN: schema.OPSET_VERSION})


def make_hf_block(shape: Shape, w: dict[str, np.ndarray]) -> Any:
    """The installed transformers' own block, its parameters our arrays (shared, not copied)."""
    import torch
    from transformers import AutoConfig

    if shape.family == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Block
        config = AutoConfig.for_model("mixtral", hidden_size=shape.hidden, intermediate_size=shape.inter,
                                      num_local_experts=shape.experts, num_experts_per_tok=shape.top_k)
        names = ("w1", "w3", "w2")
    else:
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as Block
        config = AutoConfig.for_model("qwen3_moe", hidden_size=shape.hidden, moe_intermediate_size=shape.inter,
                                      num_experts=shape.experts, num_experts_per_tok=shape.top_k, norm_topk_prob=True)
        names = ("gate_proj", "up_proj", "down_proj")
    with torch.device("meta"):
        block = Block(config)
    param = lambda a: torch.nn.Parameter(torch.from_numpy(a), requires_grad=False)  # noqa: E731
    block.gate.weight = param(w["router"])
    for e, expert in enumerate(block.experts):
        for attr, key in zip(names, ("gate", "up", "down"), strict=True):
            getattr(expert, attr).weight = param(w[key][e])
    return block.eval()


# --- one measurement (child process) --------------------------------------------------------------------------------

def child(args: argparse.Namespace) -> None:
    shape = preset_shape(args.shape)
    tokens = [int(t) for t in args.tokens.split(",")]
    w = weights(shape)
    inputs = {t: token_inputs(shape, t) for t in tokens}
    outputs: dict[str, np.ndarray] = {}
    result: dict[str, Any] = {"variant": args.child, "threads": args.threads, "ms": {}}

    def timed(fn) -> float:
        times = []
        for _ in range(2):
            fn()
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    if args.child == "hf_block":
        import torch

        torch.set_num_threads(args.threads)
        block = make_hf_block(shape, w)
        with torch.inference_mode():
            for t in tokens:
                repeats = repeats_for(args.repeats, t)
                x = torch.from_numpy(inputs[t])[None]
                run = lambda x=x: block(x)  # noqa: E731
                result["ms"][str(t)] = timed(run)
                out = block(x)
                outputs[str(t)] = (out[0] if isinstance(out, tuple) else out)[0].numpy()
    else:
        from pimoe_export.runtime.ort import create_session

        with tempfile.TemporaryDirectory(dir=args.scratch) as tmp:
            if args.child == "ort_contrib_moe":
                path = contrib_graph(shape, w, Path(tmp))
            else:
                path = pimoe_graph(shape, w, Path(tmp), int8=args.child == "ort_pimoe_int8")
            del w
            session = create_session(path, threads=args.threads)
            for t in tokens:
                repeats = repeats_for(args.repeats, t)
                feeds = {"x": inputs[t]}
                result["ms"][str(t)] = timed(lambda f=feeds: session.run(None, f))
                first = session.run(None, feeds)[0]
                again = session.run(None, feeds)[0]
                result.setdefault("deterministic", True)
                result["deterministic"] &= bool(np.array_equal(first, again))
                outputs[str(t)] = first
    np.savez(args.out_npz, **outputs)
    print(json.dumps(result))


def repeats_for(repeats: int, tokens: int) -> int:
    return max(3, repeats if tokens <= 16 else repeats // 2 if tokens <= 128 else repeats // 5)


# --- the sweep (parent) ---------------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="qwen3-moe", choices=BLOCK_PRESETS)
    parser.add_argument("--tokens", default="1,16,128,1024")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--scratch", default=str(ROOT / "build" / "bench"), help="where graphs are written (removed)")
    parser.add_argument("--json", help="write the measurements here")
    parser.add_argument("--update-docs", action="store_true")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--out-npz", help=argparse.SUPPRESS)
    args = parser.parse_args()
    Path(args.scratch).mkdir(parents=True, exist_ok=True)
    if args.child:
        args.threads = int(args.threads)
        child(args)
        return 0

    from bench_cpu import machine_description, update_docs

    shape = preset_shape(args.shape)
    tokens = [int(t) for t in args.tokens.split(",")]
    threads_list = [int(n) for n in args.threads.split(",")]
    variants = [v for v in args.variants.split(",") if v]
    load = os.getloadavg()[0]
    samples: dict[tuple[str, int, int], list[float]] = {}
    errors: dict[tuple[str, int], float] = {}
    deterministic = True
    for _ in range(args.rounds):
        for threads in threads_list:
            outs: dict[str, dict[str, np.ndarray]] = {}
            for variant in variants:
                with tempfile.TemporaryDirectory(dir=args.scratch) as tmp:
                    npz = Path(tmp) / "out.npz"
                    cmd = [sys.executable, __file__, "--child", variant, "--shape", args.shape, "--tokens",
                           args.tokens, "--threads", str(threads), "--repeats", str(args.repeats), "--scratch",
                           args.scratch, "--out-npz", str(npz)]
                    proc = subprocess.run(cmd, capture_output=True, text=True)
                    if proc.returncode:
                        print(proc.stderr[-3000:], file=sys.stderr)
                        raise SystemExit(f"{variant} with {threads} threads failed")
                    result = json.loads(proc.stdout.strip().splitlines()[-1])
                    deterministic &= result.get("deterministic", True)
                    with np.load(npz) as data:
                        outs[variant] = {key: data[key] for key in data.files}
                for t in tokens:
                    samples.setdefault((variant, threads, t), []).append(result["ms"][str(t)])
                print(f"{variant} threads={threads}: " + ", ".join(f"T={t} {result['ms'][str(t)]:.2f} ms"
                                                                   for t in tokens), flush=True)
            if "hf_block" in outs:
                for variant, out in outs.items():
                    for t in tokens:
                        ref = outs["hf_block"][str(t)].astype(np.float64)
                        err = float(np.linalg.norm(out[str(t)] - ref) / np.linalg.norm(ref))
                        errors[(variant, t)] = max(errors.get((variant, t), 0.0), err)
    table = render(args, shape, tokens, threads_list, variants, samples, errors, deterministic, load,
                   machine_description())
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"samples": {"|".join(map(str, k)): v for k, v in samples.items()},
                                               "errors": {"|".join(map(str, k)): v for k, v in errors.items()}},
                                              indent=1))
    if args.update_docs:
        update_docs(table, f"cpu-moe-block-{args.shape}")
    return 0


def render(args: argparse.Namespace, shape: Shape, tokens: list[int], threads_list: list[int], variants: list[str],
           samples: dict, errors: dict, deterministic: bool, load: float, machine: str) -> str:
    import onnxruntime
    import torch
    import transformers

    from pimoe_export.runtime.ort import check_ort_library, find_ort_library

    med = {key: statistics.median(v) for key, v in samples.items()}
    spread = max((max(v) - min(v)) / statistics.median(v) for v in samples.values())
    isa = check_ort_library(find_ort_library()).get("cpu_isa", "?")
    command = (f"`.venv/bin/python scripts/bench_moe_block.py --shape {args.shape} --tokens {args.tokens} "
               f"--threads {args.threads} --repeats {args.repeats} --rounds {args.rounds}`")
    lines = [
        f"Command: {command}  ",
        f"Date: {time.strftime('%Y-%m-%d')}; machine: {machine}; onnxruntime {onnxruntime.__version__}, torch "
        f"{torch.__version__}, transformers {transformers.__version__}; pimoe CPU kernels: {isa}. 1-minute load "
        f"average before the run: {load:.2f}. Outputs of `ort_pimoe` bit-identical run to run: "
        f"{'yes' if deterministic else 'NO'}. Largest spread between rounds: {spread:.0%}.",
        "",
        f"Shape: H {shape.hidden}, I {shape.inter}, E {shape.experts}, k {shape.top_k} (gated SiLU, no bias). Median "
        "latency (ms), batch 1; in brackets the output's relative L2 error against `hf_block` (fp32):",
        "",
        "| threads | tokens | " + " | ".join(variants) + " | pimoe vs hf | pimoe vs contrib | int8 vs hf |",
        "|---|---|" + "---|" * (len(variants) + 3),
    ]
    for threads in threads_list:
        for t in tokens:
            cells = []
            for v in variants:
                err = errors.get((v, t))
                cells.append(f"{med[(v, threads, t)]:.3f}" + (f" ({err:.1e})" if err is not None and v != "hf_block"
                                                              else ""))
            ratios = [ratio(med, a, b, threads, t) for a, b in (("ort_pimoe", "hf_block"),
                                                                 ("ort_pimoe", "ort_contrib_moe"),
                                                                 ("ort_pimoe_int8", "hf_block"))]
            lines.append(f"| {threads} | {t} | " + " | ".join(cells + ratios) + " |")
    return "\n".join(lines) + "\n"


def ratio(med: dict, fast: str, slow: str, threads: int, tokens: int) -> str:
    """How many times faster ``fast`` ran than ``slow`` ("–" when either was not measured)."""
    a, b = med.get((fast, threads, tokens)), med.get((slow, threads, tokens))
    return f"{b / a:.2f}×" if a and b else "–"


if __name__ == "__main__":
    sys.exit(main())
