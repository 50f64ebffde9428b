"""`EnhancedPiMoEIntegration`: a PiMoE layer with deployment settings, pruning and per-call metrics."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pimoe_export.errors import PiMoEConfigError
from pimoe_export.model.adaptive import AdaptivePiMoE
from pimoe_export.model.config import ExpertType
from pimoe_export.model.pruning import PruningReport, magnitude_prune, structured_prune
from pimoe_export.model.system import PiMoESystem, RoutingInfo, config_from_seed_args, load_balance_ratio

EXPORT_PRECISIONS = ("fp32", "fp16", "int8")
CALIBRATION_METHODS = ("max", "percentile", "entropy", "mse")


@dataclass(frozen=True)
class OptimizationSettings:
    """What an ``optimization_level`` means, setting by setting, and who reads each one.

    - ``inference_mode``: eval-mode forwards run under ``torch.inference_mode()`` (no autograd records).
      Read by :meth:`EnhancedPiMoEIntegration.forward`.
    - ``export_precision``: precision the pipeline exports and builds ("fp32", "fp16", "int8").
      ``enable_quantization=True`` forces "int8". Saved in the checkpoint (config.metadata["deployment"])
      and read by ``pimoe-export pipeline``.
    - ``calibration_method``: INT8 activation calibration method; read by the pipeline's quantize step.
    - ``builder_optimization_level``: TensorRT builder optimisation level (0-5); read by the build step.
    """

    level: str
    inference_mode: bool
    export_precision: str
    calibration_method: str
    builder_optimization_level: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


OPTIMIZATION_LEVELS: dict[str, OptimizationSettings] = {
    "none": OptimizationSettings("none", False, "fp32", "max", 0),
    "basic": OptimizationSettings("basic", True, "fp32", "max", 2),
    "advanced": OptimizationSettings("advanced", True, "fp16", "entropy", 3),
    "maximum": OptimizationSettings("maximum", True, "fp16", "entropy", 5),
}


@dataclass(frozen=True)
class DeploymentSettings:
    """What an EnhancedPiMoEIntegration recorded for deployment (config.metadata["deployment"]), typed; the
    defaults apply to a checkpoint that recorded nothing (``recorded`` False)."""

    export_precision: str = "fp32"  # "fp32" | "fp16" | "int8": the extra graph the pipeline exports
    calibration_method: str = "entropy"
    builder_optimization_level: int | None = None  # None: TensorRT's default
    enable_pruning: bool = False
    pruning_amount: float = 0.25
    pruning_structured: bool = True
    recorded: bool = False

    @classmethod
    def of(cls, config: Any) -> DeploymentSettings:
        metadata = config.metadata if isinstance(config.metadata, dict) else {}
        data = metadata.get("deployment")
        if not isinstance(data, dict):
            return cls()
        default = cls()
        kinds = {"export_precision": str, "calibration_method": str, "builder_optimization_level": int,
                 "enable_pruning": bool, "pruning_amount": float, "pruning_structured": bool}
        values: dict[str, Any] = {}
        for name, kind in kinds.items():
            value = data.get(name, getattr(default, name))
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if value is not None and not isinstance(value, kind):
                raise PiMoEConfigError("metadata", f"deployment.{name} must be {kind.__name__}, got {value!r}")
            values[name] = value
        return cls(**values, recorded=True)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def optimization_settings(level: str, enable_quantization: bool) -> OptimizationSettings:
    if level not in OPTIMIZATION_LEVELS:
        raise PiMoEConfigError("optimization_level", f"must be one of {list(OPTIMIZATION_LEVELS)}, got {level!r}")
    settings = OPTIMIZATION_LEVELS[level]
    if enable_quantization:
        settings = dataclasses.replace(settings, export_precision="int8")
    return settings


def _process_rss_mb() -> float:
    """Resident set size of this process from /proc (Linux); 0.0 where unavailable."""
    try:
        with open("/proc/self/statm") as handle:
            pages = int(handle.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


class EnhancedPiMoEIntegration(nn.Module):
    """A PiMoE layer (``self.pimoe``) plus real deployment settings, pruning and metrics.

    ``forward(x, attention_mask=None, return_metrics=False)`` returns the output, or ``(output, metrics)``
    with the seed's metric names, each measured, not estimated:

    - ``latency_ms``: wall time of this forward, with ``torch.cuda.synchronize`` before and after on CUDA
    - ``throughput_tokens_per_sec``: routed tokens / latency
    - ``memory_usage_mb``: on CUDA the allocator's peak during the call (``max_memory_allocated``), on the
      CPU the process's resident set size after the call; ``memory_source`` says which
    - ``expert_utilization``: share of experts that received at least one token in this call
    - ``load_balance_score``: 1 / (1 + CV of this call's per-expert assignment counts)
    - ``routing_accuracy``: the seed's name for the share of tokens whose top-1 probability exceeds 0.7
      (a confidence measure: there is no ground truth routing to be accurate against)
    - ``total_tokens`` (routed, unmasked), ``batch_size``, ``sequence_length``, ``aux_loss``

    ``enable_quantization=True`` marks the model for the INT8 export path (``settings.export_precision``
    becomes "int8"); it does not fake-quantise PyTorch weights. ``enable_pruning`` with ``pruning_amount``
    and ``pruning_structured`` is applied by :meth:`apply_pruning` (the pipeline calls it before export
    when enabled) — pruning freshly initialised weights at construction would be meaningless.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int = 8,
        expert_types: Sequence[ExpertType | str] | None = None,
        optimization_level: str = "advanced",
        enable_quantization: bool = False,
        enable_pruning: bool = False,
        pruning_amount: float = 0.25,
        pruning_structured: bool = True,
        enable_monitoring: bool = True,
        adaptive: bool = False,
        router_config: Mapping[str, Any] | None = None,
        expert_config: Mapping[str, Any] | None = None,
        *,
        pimoe: PiMoESystem | None = None,
    ) -> None:
        super().__init__()
        self.settings = optimization_settings(optimization_level, bool(enable_quantization))
        if pimoe is None:
            config = config_from_seed_args(hidden_size, num_experts, expert_types, router_config, expert_config)
            pimoe = AdaptivePiMoE(config=config) if adaptive else PiMoESystem(config=config)
        self.pimoe = pimoe
        self.enable_quantization = bool(enable_quantization)
        self.enable_pruning = bool(enable_pruning)
        self.pruning_amount = float(pruning_amount)
        self.pruning_structured = bool(pruning_structured)
        self.enable_monitoring = bool(enable_monitoring)
        self.pimoe.track_stats = self.enable_monitoring
        self.pruning_history: list[dict[str, Any]] = []
        self._record_deployment()

    @property
    def config(self):
        return self.pimoe.config

    def _record_deployment(self) -> None:
        meta = dict(self.pimoe.config.metadata)
        meta["deployment"] = {
            **self.settings.to_dict(),
            "enable_quantization": self.enable_quantization,
            "enable_pruning": self.enable_pruning,
            "pruning_amount": self.pruning_amount,
            "pruning_structured": self.pruning_structured,
        }
        self.pimoe.config = self.pimoe.config.replace(metadata=meta)
        self.pimoe.router.config = self.pimoe.config

    # ------------------------------------------------------------------ forward + metrics
    def forward(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        return_metrics: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, Any]]:
        use_inference_mode = self.settings.inference_mode and not self.training
        cuda = x.is_cuda
        if cuda and return_metrics:
            torch.cuda.synchronize(x.device)
            torch.cuda.reset_peak_memory_stats(x.device)
        start = time.perf_counter()
        with torch.inference_mode(use_inference_mode):
            result = self.pimoe(x, attention_mask, return_routing_info=return_metrics)
        if not return_metrics:
            return result  # type: ignore[return-value]
        if cuda:
            torch.cuda.synchronize(x.device)
        latency_s = time.perf_counter() - start
        output, info = result  # type: ignore[misc]
        return output, self._metrics(x, attention_mask, info, latency_s)

    def _metrics(
        self, x: torch.Tensor, mask: torch.Tensor | None, info: RoutingInfo, latency_s: float
    ) -> dict[str, Any]:
        counts = info.expert_counts.detach().cpu()
        tokens = int(x.shape[0] * x.shape[1]) if mask is None else int((mask != 0).sum())
        if x.is_cuda:
            memory_mb, source = torch.cuda.max_memory_allocated(x.device) / 2**20, "cuda_peak_allocated"
        else:
            memory_mb, source = _process_rss_mb(), "process_rss"
        valid = info.ids[..., 0] >= 0
        top1_prob = info.probs.gather(-1, info.ids[..., :1].clamp_min(0).long()).squeeze(-1)[valid]
        return {
            "latency_ms": latency_s * 1e3,
            "throughput_tokens_per_sec": tokens / latency_s if latency_s > 0 else 0.0,
            "memory_usage_mb": memory_mb,
            "memory_source": source,
            "expert_utilization": float((counts > 0).double().mean()),
            "load_balance_score": load_balance_ratio(counts),
            "routing_accuracy": float((top1_prob > 0.7).double().mean()) if top1_prob.numel() else 0.0,
            "total_tokens": tokens,
            "batch_size": int(x.shape[0]),
            "sequence_length": int(x.shape[1]),
            "aux_loss": float(info.losses["aux_loss"].detach()),
            "expert_counts": counts.tolist(),
        }

    # ------------------------------------------------------------------ pruning
    def apply_pruning(
        self, amount: float | None = None, structured: bool | None = None, probe: torch.Tensor | None = None
    ) -> PruningReport:
        """Prune the experts now (defaults: this module's pruning_amount / pruning_structured)."""
        amount = self.pruning_amount if amount is None else amount
        structured = self.pruning_structured if structured is None else structured
        fn = structured_prune if structured else magnitude_prune
        report = fn(self.pimoe, amount, probe)
        self.pruning_history.append(report.to_dict())
        return report

    def get_system_stats(self) -> dict[str, Any]:
        stats = self.pimoe.get_system_stats()
        stats["optimization"] = self.settings.to_dict()
        return stats

    def save_pretrained(self, directory: str | Path) -> Path:
        """Save the inner layer; the deployment settings travel in config.metadata["deployment"]."""
        return self.pimoe.save_pretrained(directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> EnhancedPiMoEIntegration:
        from pimoe_export.model.io import load_pretrained

        pimoe = load_pretrained(directory)
        deployment = dict(pimoe.config.metadata.get("deployment", {}))
        return cls(
            pimoe.hidden_size,
            optimization_level=deployment.get("level", "advanced"),
            enable_quantization=bool(deployment.get("enable_quantization", False)),
            enable_pruning=bool(deployment.get("enable_pruning", False)),
            pruning_amount=float(deployment.get("pruning_amount", 0.25)),
            pruning_structured=bool(deployment.get("pruning_structured", True)),
            pimoe=pimoe,
        )
