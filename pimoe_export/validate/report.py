"""The report of a parity check: JSON, Markdown and PNG plots (nothing here runs a backend)."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pimoe_export._files import OutputDir
from pimoe_export.interface import LAYER_OUTPUT, Tolerances
from pimoe_export.validate.metrics import ErrorStats


@dataclass
class CheckReport:
    backend: str
    precision: str
    shapes: list[tuple[int, int]]
    tolerances: Tolerances
    output_stats: dict[str, ErrorStats]
    routing_agreement: float
    polygraphy_passed: bool
    passed: bool
    failures: list[str] = field(default_factory=list)
    per_expert_mean_abs: dict[int, float] = field(default_factory=dict)
    # quantised graphs: the kernels vs the fake-quant PyTorch reference of the same integer math (kernel error
    # alone; the comparison with the fp32 model above is quantisation + kernel error)
    kernel_vs_fake_quant: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    # `polygraphy run` argv that replays the comparison from the saved inputs and outputs (empty: not replayable)
    replay: list[str] = field(default_factory=list)
    primary: str = LAYER_OUTPUT  # the output printed and plotted
    routing_by_layer: dict[str, float] = field(default_factory=dict)  # whole models: agreement per PiMoE layer
    # whole models with an attention mask: mean-pooled embedding cosine of the primary output
    embedding: dict[str, Any] = field(default_factory=dict)
    # quantised graphs: each MoE layer's W8A8 output error against the same layer in fp32, on the inputs that reach
    # it (the fake-quant reference with the graph's codes and scales; pimoe_export.validate.compare)
    layer_output_error: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "precision": self.precision,
            "shapes": [list(s) for s in self.shapes],
            "tolerances": self.tolerances.to_dict(),
            "outputs": {k: v.to_dict() for k, v in self.output_stats.items()},
            "routing_agreement": self.routing_agreement,
            "polygraphy_passed": self.polygraphy_passed,
            "passed": self.passed,
            "failures": self.failures,
            "per_expert_mean_abs": {str(k): v for k, v in self.per_expert_mean_abs.items()},
            "kernel_vs_fake_quant": self.kernel_vs_fake_quant,
            "environment": self.environment,
            "files": self.files,
            "replay": self.replay,
            "primary": self.primary,
            "routing_by_layer": self.routing_by_layer,
            "embedding": self.embedding,
            "layer_output_error": self.layer_output_error,
        }


def plots(reference, actual, per_expert: dict[int, float], out_dir: OutputDir,
          primary: str = LAYER_OUTPUT) -> dict[str, str]:
    """An error histogram and a per-expert error bar chart (PNG; skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional; the JSON/Markdown report is complete without them
        return {}
    errors = np.concatenate([np.abs(a[primary].astype(np.float64) - r[primary]).ravel()
                             for r, a in zip(reference, actual, strict=True)])
    files = {}
    fig, ax = plt.subplots(figsize=(6, 3.5))
    positive = errors[errors > 0]
    if positive.size:
        ax.hist(np.log10(positive), bins=60, color="#3a7")
        ax.set_xlabel("log10 |output error|")
    else:
        ax.text(0.5, 0.5, "all errors are exactly 0", ha="center", va="center")
    ax.set_ylabel("elements")
    ax.set_title(f"output error histogram ({errors.size} elements, {int((errors == 0).sum())} exact)")
    fig.tight_layout()
    path = out_dir.claim("error_histogram.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    files["error_histogram"] = str(path)
    if per_expert:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar([str(e) for e in per_expert], list(per_expert.values()), color="#37a")
        ax.set_xlabel("top-1 expert")
        ax.set_ylabel("mean |output error|")
        ax.set_title("error per expert")
        fig.tight_layout()
        path = out_dir.claim("per_expert_error.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files["per_expert_error"] = str(path)
    return files


def write_report(report: CheckReport, out_dir: OutputDir) -> None:
    """report.json and report.md into ``out_dir`` (an OutputDir: both are claimed there)."""
    json_path, md_path = out_dir.claim("report.json"), out_dir.claim("report.md")
    report.files["json"] = str(json_path)
    report.files["markdown"] = str(md_path)
    json_path.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    lines = [
        f"# pimoe-export parity report: {report.backend}, {report.precision}",
        "",
        f"**{'PASSED' if report.passed else 'FAILED'}** — reference: PyTorch fp32 model; shapes [batch, seq] "
        f"{report.shapes}",
        "",
        "| output | max abs | mean abs | rel L2 | cosine | max abs(ref) |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in report.output_stats.items():
        lines.append(f"| {name} | {s.max_abs:.3e} | {s.mean_abs:.3e} | {s.rel_l2:.3e} | {s.cosine:.8f} | "
                     f"{s.ref_max_abs:.3e} |")
    t = report.tolerances
    lines += [
        "",
        f"Top-k routing agreement (tokens whose expert set is unchanged): **{report.routing_agreement:.4%}** "
        f"(required ≥ {t.min_routing_agreement:.2%})",
        "",
        f"Polygraphy `Comparator.compare_accuracy`: {'passed' if report.polygraphy_passed else 'failed'} "
        f"(rtol {t.rtol}, atol {t.atol_rel} × max|ref|, check_error_stat={t.check_error_stat}"
        + (f", quantile {t.error_quantile}" if t.check_error_stat == "quantile" else "") + ")",
        "",
    ]
    if report.kernel_vs_fake_quant:
        k = report.kernel_vs_fake_quant[LAYER_OUTPUT]
        lines += [
            "## Kernel error alone: backend vs the fake-quant PyTorch reference (same integer math)",
            "",
            "| output | max abs | mean abs | rel L2 | cosine |",
            "|---|---|---|---|---|",
            f"| output | {k['max_abs']:.3e} | {k['mean_abs']:.3e} | {k['rel_l2']:.3e} | {k['cosine']:.8f} |",
            "",
            f"Routing agreement with the fake-quant reference: {report.kernel_vs_fake_quant['routing_agreement']:.4%}; "
            f"required rel L2 ≤ {report.kernel_vs_fake_quant['max_rel_l2']}. The table above (vs the fp32 model) is "
            "quantisation error plus kernel error.",
            "",
        ]
    if report.embedding:
        e = report.embedding
        lines += [f"Mean-pooled embedding of `{e['output']}` over the attention mask, {e['sequences']} sequences: "
                  f"mean cosine **{e['mean_cosine']:.6f}** (required ≥ {e['required_mean_cosine']}), "
                  f"min {e['min_cosine']:.6f}", ""]
    if report.routing_by_layer:
        lines += ["## Routing agreement by MoE layer", "", "| layer | top-k agreement |", "|---|---|"]
        lines += [f"| {layer} | {value:.4%} |" for layer, value in report.routing_by_layer.items()] + [""]
    if report.layer_output_error:
        lines += ["## W8A8 output error by MoE layer (the layer alone, on the inputs that reach it, vs fp32)", "",
                  "| layer | rel L2 | cosine | max abs | tokens |", "|---|---|---|---|---|"]
        lines += [f"| {layer or '(the layer)'} | {e['rel_l2']:.3e} | {e['cosine']:.8f} | {e['max_abs']:.3e} | "
                  f"{e['tokens']} |" for layer, e in report.layer_output_error.items()] + [""]
    if report.failures:
        lines += ["## Failures", ""] + [f"- {f}" for f in report.failures] + [""]
    if report.per_expert_mean_abs:
        lines += ["## Mean |error| by top-1 expert", "", "| expert | mean abs |", "|---|---|"]
        lines += [f"| {e} | {v:.3e} |" for e, v in report.per_expert_mean_abs.items()] + [""]
    lines += ["## Environment", ""] + [f"- {k}: {v}" for k, v in report.environment.items()] + [""]
    lines += ["## Files", ""] + [f"- {k}: {Path(v).name}" for k, v in report.files.items()] + [""]
    if report.replay:
        lines += ["## Replay with Polygraphy", "",
                  "The same comparison from the saved inputs and PyTorch outputs, with this check's tolerances "
                  "(the runner option comes with pimoe-export; docs/precision.md):", "",
                  "```", shlex.join(report.replay), "```", ""]
    md_path.write_text("\n".join(lines))
