"""The pipeline's benchmark summary: the model in PyTorch vs its ONNX graphs on ONNX Runtime (CPU), medians of
repeated runs, and the Markdown table of it (docs/benchmarks.md holds the full benchmarks and their commands)."""

from __future__ import annotations

import gc
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pimoe_export.bench.timing import median_ms


def benchmark_source(source: Any, variants: Mapping[str, Path], tokens: Sequence[int] = (1, 16, 128),
                     repeats: int = 20) -> list[dict[str, Any]]:
    """One row per token count (batch 1): ``pytorch_ms`` of the source's module and ``<variant>_ms`` of every ONNX
    graph in ``variants``, on the source's seeded random inputs."""
    import torch

    from pimoe_export.runtime.ort import create_session

    inputs = {t: source.random_feed(1, t, t) for t in tokens}
    table: dict[int, dict[str, Any]] = {t: {"tokens": t} for t in tokens}
    with torch.inference_mode():
        for t in tokens:
            feed = {k: torch.from_numpy(v) for k, v in inputs[t].items()}
            table[t]["pytorch_ms"] = median_ms(lambda feed=feed: source.module(**feed), repeats)
    for name, path in variants.items():  # one live session at a time (idle ORT pools spin)
        session = create_session(path)
        for t in tokens:
            table[t][f"{name}_ms"] = median_ms(lambda s=session, f=inputs[t]: s.run(None, f), repeats)
        del session
        gc.collect()
    return [table[t] for t in tokens]


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def render_markdown(rows: list[dict[str, Any]], repeats: int) -> str:
    columns = [k for k in rows[0] if k.endswith("_ms")]
    lines = ["| tokens | " + " | ".join(k[:-3] + " (ms)" for k in columns) + " |", "|---|" + "---|" * len(columns)]
    lines += [f"| {row['tokens']} | " + " | ".join(f"{row[k]:.3f}" for k in columns) + " |" for row in rows]
    machine = platform.processor() or platform.machine()
    return (f"# Benchmark summary\n\nMedian of {repeats} runs per point, batch 1, {_cpu_count()} threads "
            f"available, {machine}.\n\n" + "\n".join(lines) + "\n")
