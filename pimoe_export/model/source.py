"""A model as export, quantisation and the pipeline take it: a PyTorch module with PiMoE layers inside, and the
inputs it runs on. A bare PiMoE layer is the case of one layer, at module path "", fed ``hidden_states``.

    importer (layer_source, model_source, pimoe_export.hf) ─► ModelSource ─► export ─► quantize ─► units ─► checks
                                                                module(**feed), named inputs, feeds, settings

Everything downstream asks the source, never which kind of model it holds: a new model family is a new importer
that builds a :class:`ModelSource` (docs/architecture.md, "Adding a model family").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pimoe_export.errors import PiMoEInputError
from pimoe_export.interface import BATCH_AXIS, LAYER_INPUT, SEQUENCE_AXIS, TensorInterface, layer_interface
from pimoe_export.model.enhanced import DeploymentSettings, EnhancedPiMoEIntegration
from pimoe_export.model.moe_block import MoEBlock
from pimoe_export.model.system import PiMoESystem

#: one input of every named input of a model, as numpy arrays
Feed = dict[str, np.ndarray]


#: a MoE layer the exporter replaces with pimoe ops: a PiMoE layer, or a contract-level MoE block (the Hugging Face
#: families and the gated presets)
MoELayer = PiMoESystem | MoEBlock


def moe_layers(model: nn.Module) -> dict[str, MoELayer]:
    """The MoE layers inside ``model`` by module path: PiMoE layers (an Enhanced wrapper counts as its inner layer)
    and MoE blocks; a bare layer is ``{"": layer}``."""
    found: dict[str, MoELayer] = {}
    for path, module in model.named_modules():
        if any(path.startswith(p + ".") or (p == "" and path) for p in found):
            continue  # inside a layer already found
        if isinstance(module, EnhancedPiMoEIntegration):
            found[path] = module.pimoe
        elif isinstance(module, (PiMoESystem, MoEBlock)):
            found[path] = module
    return found


def layer_routing(layer: MoELayer, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, S, k] int32, weights [B, S, k] fp32) of every position of ``hidden_states`` as the layer routes it
    (unmasked: the exported graph routes padded positions too)."""
    if isinstance(layer, MoEBlock):
        return layer.routing(hidden_states)
    _, info = layer(hidden_states, None, return_routing_info=True)
    return info.ids, info.weights


@dataclass(frozen=True)
class Calibration:
    """The feeds INT8 calibration runs the model on. ``synthetic``: the PiMoE layers' inputs are drawn at random
    rather than produced by the model from data (SmoothQuant factors from them would describe nothing, so they
    are only collected where static scales need the statistics anyway)."""

    feeds: list[Feed]
    description: str
    synthetic: bool = False


@dataclass
class ModelSource:
    """A PyTorch model with PiMoE layers and how to feed it (see the module docstring).

    ``module`` is called as ``module(**feed)``. ``inputs`` are the graph's named inputs (dtype, dims: an axis name
    or a fixed size). ``example`` is the export example (batch and sequence > 1, so the axes stay dynamic).
    ``calibration()`` gives the default INT8 calibration, ``read_calibration(data, max_tokens)`` the user's.
    ``evaluation`` holds the feeds the parity checks use (None: seeded random inputs of the interface).
    ``random_feed(batch, sequence, seed)`` makes inputs for smoke runs and benchmarks. ``standard_ops``: the
    plugin-free standard-op graph (every expert evaluated densely, a benchmark baseline) is offered. The graph's
    dynamic axes are the axis names of ``inputs`` (``bounded_axes`` False: not bounded while tracing, see
    :func:`~pimoe_export.export.tracing.axes_of`); ``metadata`` is added to the graph's (a decoder's DecoderSpec).
    """

    module: nn.Module
    inputs: tuple[TensorInterface, ...]
    example: Feed
    calibration: Callable[[], Calibration]
    read_calibration: Callable[[Any, int | None], Calibration]
    random_feed: Callable[[int, int, int], Feed]
    describe: Callable[[], dict[str, Any]]
    save: Callable[[Path], Any]
    evaluation: list[Feed] | None = None
    settings: DeploymentSettings = field(default_factory=DeploymentSettings)
    standard_ops: bool = False
    metadata: dict[str, str] = field(default_factory=dict)
    bounded_axes: bool = True

    @property
    def layers(self) -> dict[str, MoELayer]:
        return moe_layers(self.module)

    def example_tensors(self) -> dict[str, torch.Tensor]:
        return {name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in self.example.items()}

    def smoke_feed(self) -> Feed:
        """One feed for a quick run of an artefact: the first held-out feed, else seeded random inputs."""
        return dict(self.evaluation[0]) if self.evaluation else self.random_feed(1, 4, 0)


def as_source(model: ModelSource | nn.Module, feeds: Any = None) -> ModelSource:
    """``model`` itself; the source of a bare PiMoE layer (the one module that knows its own inputs); or any module
    fed with ``feeds`` (a list of {input name: array} dicts): :func:`model_source`."""
    if isinstance(model, ModelSource):
        return model
    if isinstance(model, (PiMoESystem, MoEBlock)):
        return layer_source(model)
    if isinstance(feeds, Sequence) and feeds and all(isinstance(f, Mapping) for f in feeds):
        return model_source(model, feeds)
    raise PiMoEInputError(f"{type(model).__name__} is not a bare PiMoE layer: give the feeds it is called with "
                          "(a list of {input name: array} dicts), or its ModelSource (pimoe_export.model.source)")


# ------------------------------------------------------------------------------------------ a bare PiMoE layer
def layer_source(layer: MoELayer, example_shape: tuple[int, int] = (2, 8)) -> ModelSource:
    """A bare PiMoE layer or MoE block: ``hidden_states`` [batch, sequence, H] in; ``output``, ``expert_ids``,
    ``expert_weights`` out (the layer interface); calibrated by default on 4096 seeded standard-normal tokens. A
    PiMoE layer also offers the standard-op graph (the benchmark's baseline)."""
    from pimoe_export.model.summary import summarize, summarize_block

    hidden = layer.hidden_size
    settings = DeploymentSettings.of(layer.config)
    example = torch.randn(*example_shape, hidden, generator=torch.Generator().manual_seed(0)).numpy()

    def read(data: Any, max_tokens: int | None) -> Calibration:
        batches = load_calibration_data(data, hidden, max_tokens)
        what = str(data) if isinstance(data, (str, Path)) else type(data).__name__
        return Calibration([{LAYER_INPUT: b.numpy()} for b in batches], what)

    def default() -> Calibration:
        return Calibration([{LAYER_INPUT: b.numpy()} for b in random_calibration_data(hidden)],
                           "seeded standard normal (default)", synthetic=True)

    def describe() -> dict[str, Any]:
        summary = summarize_block(layer.config) if isinstance(layer, MoEBlock) else summarize(layer.config)
        return {"params": summary["params_total"], "expert_groups": [g["experts"] for g in summary["expert_groups"]],
                "deployment": settings.to_dict() if settings.recorded else "none recorded (defaults)"}

    return ModelSource(
        module=layer, inputs=layer_interface(hidden, layer.config.top_k, "fp32").inputs,
        example={LAYER_INPUT: example}, calibration=default, read_calibration=read,
        random_feed=lambda b, s, seed: {LAYER_INPUT: np.random.default_rng(seed).standard_normal(
            (b, s, hidden)).astype(np.float32)},
        describe=describe, save=layer.save_pretrained, settings=settings,
        standard_ops=isinstance(layer, PiMoESystem))


# ------------------------------------------------------------------------------------------ any model fed by name
def feed_inputs(feed: Mapping[str, Any]) -> tuple[TensorInterface, ...]:
    """The named inputs of a feed: axis 0 ``batch`` and axis 1 ``sequence`` of every input, the rest fixed."""
    inputs = []
    for name, value in feed.items():
        array = np.asarray(value)
        axes = (BATCH_AXIS, SEQUENCE_AXIS)[: array.ndim]
        inputs.append(TensorInterface(name, str(array.dtype), (*axes, *array.shape[len(axes):])))
    return tuple(inputs)


def model_source(module: nn.Module, calibration: Sequence[Mapping[str, Any]], *,
                 evaluation: Sequence[Mapping[str, Any]] | None = None, data: str = "calibration feeds",
                 random_feed: Callable[[int, int, int], Feed] | None = None,
                 describe: Callable[[], dict[str, Any]] | None = None,
                 read_calibration: Callable[[Any, int | None], Calibration] | None = None,
                 save: Callable[[Path], Any] | None = None) -> ModelSource:
    """Any ``nn.Module`` with PiMoE layers called as ``module(**feed)``: its inputs and export example come from
    the first calibration feed (its first two rows), its default calibration is ``calibration``."""
    feeds = [{k: np.asarray(v) for k, v in f.items()} for f in calibration]
    if not feeds or not feeds[0]:
        raise PiMoEInputError("a model source needs at least one calibration feed of the model's named inputs")
    if not moe_layers(module):
        raise PiMoEInputError(f"{type(module).__name__} contains no PiMoE layer (PiMoESystem, AdaptivePiMoE or "
                              "EnhancedPiMoEIntegration)")

    def read(given: Any, max_tokens: int | None) -> Calibration:
        return Calibration(_feed_list(given), type(given).__name__)

    def like_calibration(batch: int, sequence: int, seed: int) -> Feed:
        """Seeded inputs shaped like the calibration feeds: standard normal floats, integers (token ids, masks) in
        the range the calibration feeds use."""
        rng = np.random.default_rng(seed)
        feed = {}
        for name, value in feeds[0].items():
            shape = (batch, sequence, *value.shape[2:])[: value.ndim]
            if value.dtype.kind == "f":
                feed[name] = rng.standard_normal(shape).astype(value.dtype)
            else:
                top = max(int(np.max(f[name])) for f in feeds if f[name].size)
                feed[name] = rng.integers(0, top + 1, shape).astype(value.dtype)
        return feed

    def nothing(directory: Path) -> Any:
        raise PiMoEInputError(f"{type(module).__name__} has no checkpoint format; give its source a save function")

    return ModelSource(
        module=module, inputs=feed_inputs(feeds[0]), example={k: v[:2] for k, v in feeds[0].items()},
        calibration=lambda: Calibration(feeds, data), read_calibration=read_calibration or read,
        random_feed=random_feed or like_calibration,
        describe=describe or (lambda: {"architecture": type(module).__name__}), save=save or nothing,
        evaluation=None if evaluation is None else _feed_list(evaluation))


def _feed_list(feeds: Any) -> list[Feed]:
    if isinstance(feeds, Mapping) or not isinstance(feeds, Iterable) or isinstance(feeds, (str, Path)):
        raise PiMoEInputError(f"feeds must be a list of {{input name: array}} dicts, got {type(feeds).__name__}")
    out = []
    for feed in feeds:
        if not isinstance(feed, Mapping) or not feed:
            raise PiMoEInputError(f"every feed must be a non-empty {{input name: array}} dict, got "
                                  f"{type(feed).__name__}")
        out.append({str(k): np.asarray(v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v)
                    for k, v in feed.items()})
    if not out:
        raise PiMoEInputError("no feeds given")
    return out


# ------------------------------------------------------------------------------------------ hidden-state data
def _read_calibration_file(path: Path) -> list[Any]:
    """The arrays of a .npz (every array, or the one named ``hidden_states``), .npy or .safetensors file; a file
    that cannot be read as one (corrupt, pickled objects, another format) is a PiMoEInputError."""
    if not path.is_file():
        raise PiMoEInputError(f"calibration data {path} does not exist")
    if path.suffix not in (".npz", ".npy", ".safetensors"):
        raise PiMoEInputError(f"calibration data {path}: expected .npz, .npy or .safetensors")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                keys = [LAYER_INPUT] if LAYER_INPUT in archive.files else archive.files
                return [archive[k] for k in keys]
        if path.suffix == ".npy":
            return [np.load(path, allow_pickle=False)]
        from safetensors.numpy import load_file

        return list(load_file(str(path)).values())
    except Exception as exc:  # numpy/zipfile/safetensors each raise their own types for a bad file
        raise PiMoEInputError(f"calibration data {path} cannot be read as {path.suffix} ({type(exc).__name__}: "
                              f"{str(exc)[:200]}); write it with numpy.savez / numpy.save / safetensors") from None


def load_calibration_data(data: Any, hidden_size: int, max_tokens: int | None = None) -> list[torch.Tensor]:
    """Calibration batches as a list of fp32 [B, S, H] tensors.

    Accepts a tensor/array ([N, H] or [B, S, H]), a path to ``.npz`` (every array, or the one named
    ``hidden_states``), ``.safetensors`` or ``.npy``, or an iterable of tensors/arrays.
    """
    if isinstance(data, (str, Path)):
        items: Iterable[Any] = _read_calibration_file(Path(data))
    elif isinstance(data, (torch.Tensor, np.ndarray)):
        items = [data]
    else:
        items = data
    batches: list[torch.Tensor] = []
    tokens = 0
    for item in items:
        array = item if isinstance(item, torch.Tensor) else np.asarray(item)
        if not isinstance(array, torch.Tensor) and array.dtype.kind not in "fiu":
            raise PiMoEInputError(f"calibration data must hold numbers (float arrays [N, {hidden_size}] or "
                                  f"[B, S, {hidden_size}]), got an array of dtype {array.dtype}")
        t = torch.as_tensor(array).float()
        if t.dim() == 2:
            t = t.unsqueeze(0)
        if t.dim() != 3 or t.shape[-1] != hidden_size:
            raise PiMoEInputError(f"calibration tensors must be [N, {hidden_size}] or [B, S, {hidden_size}], "
                                  f"got {tuple(t.shape)}")
        if not torch.isfinite(t).all():
            raise PiMoEInputError("calibration data contains NaN or Inf; clean it before calibrating")
        if max_tokens is not None and tokens + t.shape[0] * t.shape[1] > max_tokens:  # at most max_tokens in all
            t = t.reshape(1, -1, hidden_size)[:, : max_tokens - tokens]
        batches.append(t)
        tokens += t.shape[0] * t.shape[1]
        if max_tokens is not None and tokens >= max_tokens:
            break
    if not batches or tokens == 0:
        raise PiMoEInputError("calibration data is empty")
    return batches


def random_calibration_data(hidden_size: int, tokens: int = 4096, seed: int = 0) -> list[torch.Tensor]:
    """Default data when the user gives none: standard normal tokens (documented, seeded)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 256, hidden_size, generator=g) for _ in range(max(1, tokens // 256))]
