"""INT8: calibration, W8A8 expert quantisation, INT8 ONNX, fake-quant reference.

TensorRT 11 has no implicit INT8 calibration, so INT8 is explicit here: the expert GEMMs inside
`PiMoEExpertMLP` run W8A8 (int8 weights with per-output-channel scales, int8 activations with calibrated
static per-(expert, layer) scales or dynamic per-row scales, int32 accumulation, fp32 epilogue); the router
stays fp32 (quantising it flips top-k choices).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pimoe_export.model.system import PiMoESystem


@dataclass
class QuantizeResult:
    onnx_path: Path
    params: Any  # QuantParams
    fp32_onnx: Path


def quantize_model(
    model: PiMoESystem,
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
    """Calibrate ``model`` on ``calibration`` (tensor/array, .npz/.npy/.safetensors path, or an iterable of
    batches; None = 4096 seeded standard-normal tokens) and write the INT8 ONNX to ``output``.

    ``fp32_onnx`` reuses an existing custom-op export of the same model (else one is exported next to
    ``output``). ``smooth_alpha`` (SmoothQuant migration strength; None or 0 disables) moves activation outlier
    channels into the weights; it needs calibration data, also in ``w8a8_dynamic`` mode.
    """
    from pimoe_export.export.onnx_export import export_onnx
    from pimoe_export.quantize.int8 import write_int8_onnx

    check_settings(method=method, mode=mode, percentile=percentile, smooth_alpha=smooth_alpha, max_tokens=max_tokens)
    output = Path(output)
    if fp32_onnx is not None:
        _check_same_model(model, fp32_onnx)
    if fp32_onnx is None:
        fp32_onnx = output.with_name(output.name.replace(".int8", "") + ".fp32.onnx")
        if fp32_onnx == output:
            fp32_onnx = output.with_suffix(".fp32.onnx")
        export_onnx(model, fp32_onnx)
    params = calibrated_params(model, calibration=calibration, method=method, mode=mode, percentile=percentile,
                               smooth_alpha=smooth_alpha, max_tokens=max_tokens, progress=progress)
    path = write_int8_onnx(fp32_onnx, params, output)
    return QuantizeResult(path, params, Path(fp32_onnx))


def calibrated_params(
    model: PiMoESystem,
    *,
    calibration: Any = None,
    method: str = "entropy",
    mode: str = "w8a8",
    percentile: float = 99.99,
    smooth_alpha: float | None = 0.5,
    max_tokens: int | None = 65536,
    progress: bool = False,
) -> Any:
    """The quantisation parameters (QuantParams) ``quantize_model`` writes into the INT8 ONNX, computed without
    exporting anything (the GPU tests use them, so that they do not depend on the exporter of the machine)."""
    from pimoe_export.quantize.calibrate import collect_stats, load_calibration_data, random_calibration_data
    from pimoe_export.quantize.int8 import compute_quant_params

    check_settings(method=method, mode=mode, percentile=percentile, smooth_alpha=smooth_alpha, max_tokens=max_tokens)
    stats = None
    if mode == "w8a8" or (calibration is not None and smooth_alpha):
        batches = (random_calibration_data(model.hidden_size) if calibration is None
                   else load_calibration_data(calibration, model.hidden_size, max_tokens))
        stats = collect_stats(model, batches, progress=progress, smooth_alpha=smooth_alpha)
    params = compute_quant_params(model, stats, method, mode, percentile)
    params.info["calibration_data"] = "seeded standard normal (default)" if calibration is None else (
        str(calibration) if isinstance(calibration, (str, Path)) else type(calibration).__name__)
    return params


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


def _check_same_model(model: PiMoESystem, fp32_onnx: str | Path) -> None:
    """Refuse to quantise an ONNX that was exported from other weights (its weights fingerprint differs)."""
    import onnx

    from pimoe_export.errors import ArtifactError
    from pimoe_export.export.onnx_export import get_metadata, weights_fingerprint
    from pimoe_export.interface import META_WEIGHTS

    meta = get_metadata(onnx.load(str(fp32_onnx), load_external_data=False))
    recorded = meta.get(META_WEIGHTS)
    if recorded is None:
        raise ArtifactError(f"{fp32_onnx} carries no {META_WEIGHTS}: re-export it with `pimoe-export export`")
    if recorded != weights_fingerprint(model):
        raise ArtifactError(f"{fp32_onnx} was exported from different weights than this model; export this model "
                            f"again (`pimoe-export export MODEL_DIR -o ...`) or omit --onnx")


def pipeline_step(model: PiMoESystem, fp32_onnx: Path, output: Path) -> dict[str, Any]:
    """`pimoe-export pipeline`'s INT8 step: calibrate on the default data with the model's configured method."""
    deployment = model.config.metadata.get("deployment", {}) if isinstance(model.config.metadata, dict) else {}
    method = deployment.get("calibration_method", "entropy")  # set by EnhancedPiMoEIntegration's level
    result = quantize_model(model, output / "model.int8.onnx", method=method, fp32_onnx=fp32_onnx)
    return {"onnx_int8": str(result.onnx_path), "method": result.params.info["method"],
            "calibration_tokens": result.params.info["calibration_tokens"],
            "calibration_data": result.params.info["calibration_data"],
            "uncalibrated_experts": result.params.info["uncalibrated_experts"]}


__all__ = ["QuantizeResult", "calibrated_params", "pipeline_step", "quantize_model"]
