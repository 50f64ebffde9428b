"""INT8: calibration, W8A8 expert quantisation, INT8 ONNX, fake-quant reference; Q/DQ of the Linear layers outside
the PiMoE layers (:mod:`.qdq`).

TensorRT 11 has no implicit INT8 calibration, so INT8 is explicit here: the expert GEMMs inside
`PiMoEExpertMLP` run W8A8 (int8 weights with per-output-channel scales, int8 activations with calibrated
static per-(expert, layer) scales or dynamic per-row scales, int32 accumulation, fp32 epilogue); the router
stays fp32 (quantising it flips top-k choices).

One quantiser for a bare layer and a whole model alike (:func:`quantize_model`): the model runs on the calibration
feeds, every PiMoE layer is calibrated on the activations that reach it (:mod:`.capture`), and the graph's
PiMoEExpertMLP nodes are rewritten layer by layer in the order the layers run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from pimoe_export.model.source import Calibration, ModelSource, as_source


@dataclass
class QuantizeResult:
    onnx_path: Path
    layers: dict[str, Any]  # QuantParams of every PiMoE layer, by module path, in the order the layers run
    fp32_onnx: Path
    calibration: str = ""  # what the model was calibrated on
    info: dict[str, Any] = field(default_factory=dict)  # the pimoe.quantization metadata written

    @property
    def params(self) -> Any:
        """The QuantParams of a graph with one PiMoE layer (a bare layer)."""
        (only,) = self.layers.values()
        return only

    @property
    def method(self) -> str:
        return next(iter(self.layers.values())).method

    def summary(self) -> dict[str, Any]:
        """What the pipeline records: mode, method, the data, and per layer the tokens seen and the experts that
        saw none."""
        first = next(iter(self.layers.values()))
        return {"onnx_int8": str(self.onnx_path), "method": first.method, "mode": first.mode,
                "calibration_data": self.calibration,
                "calibration_tokens": max(p.info["calibration_tokens"] for p in self.layers.values()),
                "uncalibrated_experts": {path: p.info["uncalibrated_experts"] for path, p in self.layers.items()
                                         if p.info["uncalibrated_experts"]},
                "layers": len(self.layers)}


def quantize_model(
    model: ModelSource | nn.Module,
    output: str | Path,
    *,
    calibration: Any = None,
    method: str = "entropy",
    mode: str = "w8a8",
    percentile: float = 99.99,
    smooth_alpha: float | None = 0.5,
    fp32_onnx: str | Path | None = None,
    max_tokens: int | None = 65536,
    progress: bool = False,
) -> QuantizeResult:
    """Calibrate ``model`` (a :class:`~pimoe_export.model.source.ModelSource`, or a bare PiMoE layer) and write the
    INT8 form of its custom-op graph to ``output``.

    ``calibration``: None (the source's default: 4096 seeded standard-normal tokens for a bare layer), a
    :class:`Calibration`, or data the source reads (a bare layer: tensor/array, .npz/.npy/.safetensors path or an
    iterable of batches of hidden states; any model: a list of feeds of its named inputs). ``fp32_onnx`` reuses an
    existing custom-op export of the same model (else one is exported next to ``output``). ``smooth_alpha``
    (SmoothQuant migration strength; None or 0 disables) moves activation outlier channels into the weights; it
    needs activations the model produced from data, also in ``w8a8_dynamic`` mode.
    """
    from pimoe_export.export.exporter import export_source
    from pimoe_export.interface import quantization_metadata
    from pimoe_export.quantize.int8 import write_int8_onnx

    check_settings(method=method, mode=mode, percentile=percentile, smooth_alpha=smooth_alpha, max_tokens=max_tokens)
    source = as_source(model, calibration)
    data = calibration if isinstance(calibration, Calibration) else source.calibration() if calibration is None \
        else source.read_calibration(calibration, max_tokens)
    output = Path(output)
    if fp32_onnx is not None:
        check_same_model(source.module, fp32_onnx)
    else:
        fp32_onnx = default_fp32_path(output)
        export_source(source, fp32_onnx)
    layers = _calibrate_layers(source, data, method, mode, percentile, smooth_alpha, progress)
    info = quantization_metadata({path: params.info for path, params in layers.items()}, data.description)
    path = write_int8_onnx(fp32_onnx, list(layers.values()), output, info=info)
    return QuantizeResult(path, layers, Path(fp32_onnx), data.description, info)


def calibrated_params(
    model: ModelSource | nn.Module,
    *,
    calibration: Any = None,
    method: str = "entropy",
    mode: str = "w8a8",
    percentile: float = 99.99,
    smooth_alpha: float | None = 0.5,
    max_tokens: int | None = 65536,
    progress: bool = False,
) -> dict[str, Any]:
    """The QuantParams :func:`quantize_model` writes into the INT8 ONNX, by PiMoE layer path ("" for a bare layer),
    computed without exporting anything (the GPU tests use them, so that they do not depend on the exporter of the
    GPU machine; tests/quantize/test_quantize.py checks that the file carries them exactly)."""
    check_settings(method=method, mode=mode, percentile=percentile, smooth_alpha=smooth_alpha, max_tokens=max_tokens)
    source = as_source(model, calibration)
    data = calibration if isinstance(calibration, Calibration) else source.calibration() if calibration is None \
        else source.read_calibration(calibration, max_tokens)
    return _calibrate_layers(source, data, method, mode, percentile, smooth_alpha, progress)


def _calibrate_layers(source: ModelSource, data: Calibration, method: str, mode: str, percentile: float,
                      smooth_alpha: float | None, progress: bool) -> dict[str, Any]:
    """Every PiMoE layer calibrated on the activations that reach it, in the order the layers run."""
    from pimoe_export.quantize.capture import capture_layer_inputs

    captured = capture_layer_inputs(source.module, data.feeds)  # also the order the layers run
    statistics = mode == "w8a8" or bool(smooth_alpha and not data.synthetic)
    return {path: _quantize_layer(source.layers[path], batches if statistics else None, method, mode, percentile,
                                  smooth_alpha, progress)
            for path, batches in captured.items()}


def _quantize_layer(layer: Any, batches: list | None, method: str, mode: str, percentile: float,
                    smooth_alpha: float | None, progress: bool) -> Any:
    from pimoe_export.quantize.calibrate import collect_stats
    from pimoe_export.quantize.int8 import compute_quant_params

    stats = None if batches is None else collect_stats(layer.eval(), batches, progress=progress,
                                                       smooth_alpha=smooth_alpha)
    return compute_quant_params(layer, stats, method, mode, percentile)


def default_fp32_path(output: Path) -> Path:
    """Where :func:`quantize_model` writes the fp32 export it needs when given none: next to ``output``, its name
    less ``.onnx`` and ``.int8`` plus ``.fp32.onnx`` (model.int8.onnx: model.fp32.onnx)."""
    fp32 = output.with_name(output.name.removesuffix(".onnx").replace(".int8", "") + ".fp32.onnx")
    return output.with_suffix(".fp32.onnx") if fp32 == output else fp32


def check_settings(*, method: str, mode: str, percentile: float, smooth_alpha: float | None,
                   max_tokens: int | None) -> None:
    """Refuse settings that would quantise silently badly (a negative percentile gave cosine 0.22)."""
    import math

    from pimoe_export.errors import PiMoEInputError
    from pimoe_export.quantize.calibrate import METHODS
    from pimoe_export.quantize.int8 import QUANT_MODES

    if method not in METHODS:
        raise PiMoEInputError(f"calibration method must be one of {METHODS}, got {method!r}")
    if mode not in QUANT_MODES:
        raise PiMoEInputError(f"quantisation mode must be one of {QUANT_MODES}, got {mode!r}")
    if not (isinstance(percentile, (int, float)) and math.isfinite(percentile) and 0 < percentile <= 100):
        raise PiMoEInputError(f"percentile must be in (0, 100], got {percentile!r} (e.g. 99.99)")
    if smooth_alpha is not None and not (isinstance(smooth_alpha, (int, float)) and math.isfinite(smooth_alpha)
                                         and 0 <= smooth_alpha <= 1):
        raise PiMoEInputError(f"smooth_alpha must be in [0, 1] (0 disables SmoothQuant), got {smooth_alpha!r}")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise PiMoEInputError(f"the calibration token limit must be a positive integer, got {max_tokens!r}")


def check_same_model(model: nn.Module, fp32_onnx: str | Path) -> None:
    """Refuse to quantise an ONNX that is not the export of ``model``: other PiMoE layers, or other weights (its
    weights fingerprint differs)."""
    from pimoe_export.errors import ArtifactError
    from pimoe_export.export.exporter import weights_fingerprint
    from pimoe_export.interface import META_WEIGHTS, read_metadata
    from pimoe_export.model.source import moe_layers

    meta = read_metadata(fp32_onnx)
    layers = sorted(moe_layers(model))
    if sorted(meta.layer_configs) != layers:
        raise ArtifactError(f"{fp32_onnx} is not the export of this model (its PiMoE layers "
                            f"{sorted(meta.layer_configs)}, the model's {layers}); export this model and quantise "
                            "that graph")
    if not meta.weights_sha256:
        raise ArtifactError(f"{fp32_onnx} carries no {META_WEIGHTS}: re-export it with `pimoe-export export`")
    if meta.weights_sha256 != weights_fingerprint(model):
        raise ArtifactError(f"{fp32_onnx} was exported from different weights than this model; export this model "
                            f"again (`pimoe-export export MODEL_DIR -o ...`) or omit --onnx")


__all__ = ["QuantizeResult", "calibrated_params", "check_settings", "quantize_model"]
