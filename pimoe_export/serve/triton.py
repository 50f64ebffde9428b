"""Write a Triton Inference Server model repository for a deployable unit (``pimoe-export triton``).

Layout written for a unit ``U`` into ``REPO/NAME/``::

    REPO/NAME/config.pbtxt                 model configuration (protobuf text format)
    REPO/NAME/1/model.plan                 the unit's TensorRT engine, byte-identical   (tensorrt units)
    REPO/NAME/1/model.onnx                 the unit's ONNX, byte-identical              (onnxruntime units)
    REPO/NAME/libpimoe_trt_plugins.so      the unit's plugin library                    (tensorrt units)
    REPO/NAME/libpimoe_ort.so              the unit's custom-op library                 (onnxruntime units)
    REPO/NAME/README.md                    how to start tritonserver with this model

The unit's manifest is verified (every sha256) before anything is copied, and the copies are checked against the
manifest again afterwards. Inputs/outputs come from the manifest's ``io`` (for engines: what TensorRT's parser
reported): Triton dtypes TYPE_FP32/TYPE_FP16/TYPE_INT32, dynamic axes as -1, ``max_batch_size: 0`` by default
because batch is an explicit dimension of every tensor.

How Triton gets our custom code (facts from Triton's sources and docs, see docker/README.md):

- TensorRT backend: ``--backend-config=tensorrt,plugins=/abs/path/lib.so`` makes the backend ``dlopen()`` the
  library (tensorrt_backend ``src/tensorrt.cc`` + ``src/shared_library.cc``); it never calls ``getCreators``, so
  our library must register itself: ``PIMOE_TRT_STATIC_REGISTRATION=1`` in tritonserver's environment
  (docs/trt_plugins.md). ``LD_PRELOAD`` (Triton's custom-operations guide) does not work for this library: it
  is loaded before any TensorRT library, and static registration needs TensorRT already loaded.
- ONNX Runtime backend: ``model_operations { op_library_filename: "/abs/path/libpimoe_ort.so" }`` in the model
  configuration (Triton's custom-operations guide; onnxruntime_backend passes the string unchanged to
  ``RegisterCustomOpsLibrary``, so it must be an absolute path as the server sees it).

Nothing here has been run against a real tritonserver (no Docker engine or GPU on the CI machines): CI checks
the generated files (tests/serve/test_triton.py), not that Triton serves them.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pimoe_export._files import OutputDir, sha256_file
from pimoe_export.artifacts.manifest import Manifest, Unit, verify
from pimoe_export.errors import ArtifactError, PiMoEError
from pimoe_export.interface import LAYER_INPUT

#: manifest io dtype spellings (TensorRT DataType names and numpy names) -> Triton model-config data types
TRITON_DTYPES: dict[str, str] = {
    "FLOAT": "TYPE_FP32", "float32": "TYPE_FP32",
    "HALF": "TYPE_FP16", "float16": "TYPE_FP16",
    "BF16": "TYPE_BF16", "bfloat16": "TYPE_BF16",
    "INT32": "TYPE_INT32", "int32": "TYPE_INT32",
    "INT64": "TYPE_INT64", "int64": "TYPE_INT64",
    "INT8": "TYPE_INT8", "int8": "TYPE_INT8",
    "UINT8": "TYPE_UINT8", "uint8": "TYPE_UINT8",
    "BOOL": "TYPE_BOOL", "bool": "TYPE_BOOL",
}
#: unit backend -> (Triton platform, file name in the version folder, manifest role of the model file,
#:                  manifest role of the custom library, instance kind)
PLATFORMS: dict[str, tuple[str, str, str, str, str]] = {
    "tensorrt": ("tensorrt_plan", "model.plan", "engine", "plugin_library", "KIND_GPU"),
    "tensorrt-rtx": ("tensorrt_plan", "model.plan", "engine", "plugin_library", "KIND_GPU"),
    "onnxruntime": ("onnxruntime_onnx", "model.onnx", "onnx", "ort_library", "KIND_CPU"),
}
#: file name of the custom library in REPO/NAME/ per backend
LIBRARY_NAMES = {"tensorrt": "libpimoe_trt_plugins.so", "tensorrt-rtx": "libpimoe_trt_plugins.so",
                 "onnxruntime": "libpimoe_ort.so"}
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


class TritonRepositoryError(PiMoEError, ValueError):
    """The unit cannot be turned into a Triton model (wrong kind of unit, bad option, existing output)."""


@dataclass(frozen=True)
class TritonTensor:
    """One model input or output as Triton sees it."""

    name: str
    data_type: str  # TYPE_FP32, ...
    dims: tuple[int, ...]  # -1 for a dynamic axis


@dataclass
class TritonModel:
    """What :func:`write_triton_repository` wrote."""

    repository: Path
    name: str
    platform: str
    model_dir: Path
    config: Path
    model_file: Path
    library: Path
    readme: Path
    inputs: list[TritonTensor] = field(default_factory=list)
    outputs: list[TritonTensor] = field(default_factory=list)
    max_batch_size: int = 0


def default_model_name(unit_dir: str | Path) -> str:
    """``<pipeline dir>_<unit dir>``, e.g. ``seed-512_trt-fp32``, with characters Triton dislikes replaced."""
    unit = Path(unit_dir).resolve()
    raw = f"{unit.parent.name}_{unit.name}" if unit.parent.name else unit.name
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", raw).lstrip(".")
    return name or "pimoe"


def tensor_specs(manifest: Manifest) -> tuple[list[TritonTensor], list[TritonTensor]]:
    """Inputs and outputs from the manifest's ``io``.

    Entries are ``[name, dtype, shape]``; a dim that is a string (``"batch"``) or negative is dynamic (-1). An
    empty dtype means "the same as the first input" (onnxruntime units record ``output`` that way: it follows
    the unit's precision).
    """
    io = manifest.io or {}
    if not io.get("inputs") or not io.get("outputs"):
        raise ArtifactError("the unit's manifest records no inputs/outputs (io); rebuild the unit with this "
                            "version of pimoe-export (`pimoe-export build` / `pimoe-export pipeline`)")

    def convert(entries: list[Any], default_dtype: str | None) -> list[TritonTensor]:
        specs = []
        for entry in entries:
            try:
                name, dtype, shape = entry
            except (TypeError, ValueError):
                raise ArtifactError(f"malformed io entry {entry!r} in the manifest; rebuild the unit") from None
            dtype = str(dtype) or (default_dtype or "")
            if dtype not in TRITON_DTYPES:
                raise TritonRepositoryError(f"tensor {name!r} has dtype {dtype!r}, which has no Triton data type "
                                            f"mapping here (known: {sorted(TRITON_DTYPES)})")
            dims = tuple(int(d) if isinstance(d, int) and d >= 0 else -1 for d in shape)
            specs.append(TritonTensor(str(name), TRITON_DTYPES[dtype], dims))
        return specs

    inputs = convert(list(io["inputs"]), None)
    first_input_dtype = str(io["inputs"][0][1])
    outputs = convert(list(io["outputs"]), first_input_dtype)
    return inputs, outputs


def _tensor_block(kind: str, specs: list[TritonTensor], drop_batch: bool) -> str:
    entries = []
    for spec in specs:
        dims = spec.dims[1:] if drop_batch else spec.dims
        entries.append("  {\n"
                       f'    name: "{spec.name}"\n'
                       f"    data_type: {spec.data_type}\n"
                       f"    dims: [ {', '.join(str(d) for d in dims)} ]\n"
                       "  }")
    return f"{kind} [\n" + ",\n".join(entries) + "\n]\n"


def render_config(
    name: str,
    platform: str,
    model_filename: str,
    inputs: list[TritonTensor],
    outputs: list[TritonTensor],
    *,
    max_batch_size: int = 0,
    instances: int = 1,
    kind: str = "KIND_GPU",
    op_library: str | None = None,
    comment: str = "",
) -> str:
    """``config.pbtxt`` text. With ``max_batch_size > 0`` Triton adds the batch dimension itself, so the leading
    (batch) dim is left out of every tensor's dims."""
    lines = [f"# {line}".rstrip() for line in comment.splitlines()]
    text = ("\n".join(lines) + "\n" if lines else "") + (
        f'name: "{name}"\n'
        f'platform: "{platform}"\n'
        f'default_model_filename: "{model_filename}"\n'
        f"max_batch_size: {max_batch_size}\n"
    )
    text += _tensor_block("input", inputs, max_batch_size > 0)
    text += _tensor_block("output", outputs, max_batch_size > 0)
    text += f"instance_group [\n  {{\n    count: {instances}\n    kind: {kind}\n  }}\n]\n"
    if op_library is not None:
        text += f'model_operations {{\n  op_library_filename: "{op_library}"\n}}\n'
    return text


def _readme(model: TritonModel, manifest: Manifest, unit_dir: Path, server_dir: str) -> str:
    m = manifest
    lib = f"{server_dir}/{model.library.name}"
    io_rows = "\n".join(f"| {kind} | `{s.name}` | {s.data_type} | {list(s.dims)} |"
                        for kind, specs in (("input", model.inputs), ("output", model.outputs)) for s in specs)
    hashes = "\n".join(f"- `{p.relative_to(model.model_dir)}`: sha256 `{sha256_file(p)}`"
                       for p in (model.model_file, model.library))
    lo, hi = m.profile.min_shape, m.profile.max_shape
    header = (f"# Triton model `{model.name}` (generated by `pimoe-export triton`)\n\n"
              f"Source unit: `{unit_dir}`: {m.backend} {m.backend_version}, {m.precision}, op contract "
              f"v{m.contract_version}, PiMoE H={m.config.get('hidden_size')}, E={m.config.get('num_experts')}, "
              f"k={m.config.get('top_k')}. Accepted shapes (the unit's profile): batch {lo[0]}..{hi[0]}, "
              f"sequence {lo[1]}..{hi[1]}.\n\n"
              f"| | name | data type | dims (config.pbtxt) |\n|---|---|---|---|\n{io_rows}\n\n"
              f"max_batch_size {model.max_batch_size}"
              + (" (batch is an explicit dimension of every tensor)" if model.max_batch_size == 0 else
                 " (Triton adds the batch dimension; requests of one batch must share a sequence length; add "
                 "`dynamic_batching { }` to config.pbtxt to let Triton batch them)") + ".\n\n"
              f"Files (copied from the unit, checked against its manifest):\n{hashes}\n\n")
    if m.backend == "onnxruntime":
        start = (f"## Start the server\n\n```bash\ntritonserver --model-repository={Path(server_dir).parent}\n```\n\n"
                 f"ONNX Runtime registers our custom ops from the `model_operations {{ op_library_filename }}` entry "
                 f"of config.pbtxt: `{lib}`. That path is absolute as the server sees it; if the repository moves, "
                 f"regenerate with `pimoe-export triton ... --server-repo NEW_PATH` or edit the path. "
                 f"`{model.library.name}` is built against ONNX Runtime C API 21: the server's ONNX Runtime must be "
                 f"1.21 or newer (Triton's release notes list the version per container). The ops run on the CPU "
                 f"(instance kind KIND_CPU).\n")
    else:
        start = (f"## Start the server\n\n```bash\nPIMOE_TRT_STATIC_REGISTRATION=1 tritonserver "
                 f"--model-repository={Path(server_dir).parent} \\\n"
                 f"    --backend-config=tensorrt,plugins={lib}\n```\n\n"
                 f"Triton's TensorRT backend `dlopen()`s each library named in `plugins=` (several: separate them "
                 f"with `;`) and does not call `getCreators()`; `PIMOE_TRT_STATIC_REGISTRATION=1` makes "
                 f"`{model.library.name}` register its four creators itself when it is loaded (docs/trt_plugins.md). "
                 f"Do not use `LD_PRELOAD` for this library: it would be loaded before TensorRT, and static "
                 f"registration needs TensorRT loaded first. The path is absolute as the server sees it; if the "
                 f"repository moves, regenerate with `--server-repo NEW_PATH`.\n")
        if m.backend == "tensorrt-rtx":
            start += ("\n**Warning: this is a TensorRT-RTX engine.** Triton's TensorRT backend deserialises plans "
                      "with full TensorRT and cannot load it; this repository was written with `--allow-rtx` for "
                      "inspection only. Build a TensorRT unit (`--flavour tensorrt`, e.g. in the docker/server "
                      "image) for serving.\n")
        else:
            version = m.backend_version or "(version not recorded)"
            start += (f"\nThe engine runs only with exactly TensorRT {version} on a GPU of "
                      f"{m.target_sms or 'the build machine'}: use the Triton container whose TensorRT version is "
                      f"that one (Triton release notes), or rebuild the engine in that container with "
                      f"`pimoe-export build {unit_dir / 'model.onnx'} -o UNIT --flavour tensorrt`.\n")
    shape = ",".join(str(s) for s in (1, 16, m.config.get("hidden_size", "H")))
    dims = shape if model.max_batch_size == 0 else ",".join(shape.split(",")[1:])
    first = model.inputs[0].name if model.inputs else LAYER_INPUT
    return (header + start + f"\nLoad test: `perf_analyzer -m {model.name} --shape {first}:{dims}`.\n\n"
            "Not verified by CI: no tritonserver, Docker engine or GPU runs there; CI checks these files only.\n")


def write_triton_repository(
    unit_dir: str | Path,
    repository: str | Path,
    *,
    name: str | None = None,
    max_batch_size: int = 0,
    instances: int = 1,
    server_repository: str | None = None,
    allow_rtx: bool = False,
    force: bool = False,
) -> TritonModel:
    """Write ``repository/NAME/`` for the unit at ``unit_dir`` (see the module docstring).

    ``server_repository``: the repository's absolute path as the server will see it (e.g. where it is mounted in
    the Triton container); default: ``repository`` resolved here. ``allow_rtx`` writes a repository for a
    TensorRT-RTX unit too (Triton cannot load it: for inspection and tests). ``force`` replaces an existing
    ``repository/NAME`` that holds a config.pbtxt.
    """
    unit_dir = Path(unit_dir)
    repository = Path(repository)
    unit = verify(unit_dir)  # containment and every artefact's sha256, before anything is copied
    manifest = unit.manifest
    name = name or default_model_name(unit_dir)
    _check_request(unit_dir, manifest, name, max_batch_size, instances, allow_rtx)
    platform, model_filename, model_role, library_role, kind = PLATFORMS[manifest.backend]
    inputs, outputs = tensor_specs(manifest)
    if max_batch_size > 0 and any(not s.dims or s.dims[0] != -1 for s in inputs + outputs):
        raise TritonRepositoryError("--max-batch-size > 0 needs a dynamic leading (batch) dimension on every "
                                    "tensor; use --max-batch-size 0")
    server_dir = f"{(server_repository or str(repository.resolve())).rstrip('/')}/{name}"
    if not server_dir.startswith("/"):
        raise TritonRepositoryError(f"--server-repo must be an absolute path (the server loads libraries by it), "
                                    f"got {server_repository!r}")

    # written into a private folder of the repository first and renamed into place at the end: a failed or
    # interrupted run leaves no half-written model for Triton to pick up, and NAME is replaced only when this command
    # wrote it (or with --force)
    target = _claim_model_dir(repository, name, force)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=repository))
    try:
        model_dir = staging
        (model_dir / "1").mkdir()
        model_file = model_dir / "1" / model_filename
        library = model_dir / LIBRARY_NAMES[manifest.backend]  # our name, never one taken from the manifest
        copies = [(model_role, model_file), (library_role, library)]
        if model_role == "onnx" and "onnx_data" in unit.files:  # a graph past 2 GB: its data file, by the name the
            copies.append(("onnx_data", model_file.parent / unit.files["onnx_data"].name))  # ONNX gives it
        for role, copy in copies:
            shutil.copyfile(unit.files[role], copy)
            if sha256_file(copy) != manifest.artifact(role).sha256:  # the unit changed while we copied it
                raise ArtifactError(f"{copy.name} does not match the sha256 in {unit_dir}/manifest.json after "
                                    "copying; the unit is being modified: retry when it is complete")
        library.chmod(0o755)
        model = _finish(staging, target, name, platform, model_filename, inputs, outputs, max_batch_size, instances,
                        kind, server_dir, unit, repository)
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        staging.rename(target)
        return model
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check_request(unit_dir: Path, manifest: Manifest, name: str, max_batch_size: int, instances: int,
                   allow_rtx: bool) -> None:
    """Everything about the request that can be refused before a file is written."""
    if manifest.backend not in PLATFORMS:
        raise TritonRepositoryError(f"{unit_dir}: backend {manifest.backend!r} has no Triton platform here "
                                    f"(supported: {sorted(PLATFORMS)})")
    if manifest.backend == "tensorrt-rtx" and not allow_rtx:
        raise TritonRepositoryError(
            f"{unit_dir} holds a TensorRT-RTX engine; Triton's TensorRT backend deserialises plans with full "
            f"TensorRT and cannot load it. Build a TensorRT unit on the serving GPU (`pimoe-export build "
            f"{unit_dir / 'model.onnx'} -o UNIT --flavour tensorrt`, e.g. in the docker/server image) and generate "
            f"the repository from that, or pass --allow-rtx to write it anyway for inspection")
    if not _NAME.match(name):
        raise TritonRepositoryError(f"model name {name!r} is not usable as a Triton model directory: use letters, "
                                    f"digits, '_', '-' and '.', not starting with '.'")
    if instances < 1:
        raise TritonRepositoryError(f"--instances must be >= 1, got {instances}")
    max_batch = manifest.profile.max_shape[0]
    if not 0 <= max_batch_size <= max_batch:
        raise TritonRepositoryError(
            f"--max-batch-size {max_batch_size} is outside 0..{max_batch} (the unit's profile accepts batch "
            f"{manifest.profile.min_shape[0]}..{max_batch}); use 0 (batch as an explicit dimension) or rebuild the "
            f"unit with a larger profile (pimoe-export build --max-tokens BxS)")
    if max_batch_size > 0 and manifest.profile.min_shape[0] > 1:
        raise TritonRepositoryError(f"--max-batch-size needs a profile that accepts batch 1; this unit's minimum "
                                    f"batch is {manifest.profile.min_shape[0]}: use --max-batch-size 0")


def _claim_model_dir(repository: Path, name: str, force: bool) -> Path:
    """REPO/NAME, which may be replaced only with ``force``, and then only when pimoe-export wrote it or it holds a
    config.pbtxt (a Triton model): a folder of the user's is never deleted."""
    out = OutputDir(repository, force=True, command="triton")
    existing = out.root / name
    if existing.exists() or existing.is_symlink():
        if not force:
            raise TritonRepositoryError(f"{existing} already exists; pass --force to replace it, or choose another "
                                        "--name / output repository")
        if not out.owns(name) and not (existing / "config.pbtxt").is_file():
            raise TritonRepositoryError(f"{existing} exists and holds no config.pbtxt: it does not look like a Triton "
                                        "model written by this command, so it is not replaced; remove it yourself")
    return out.claim(name)


def _finish(staging: Path, final: Path, name: str, platform: str, model_filename: str, inputs: list[TritonTensor],
            outputs: list[TritonTensor], max_batch_size: int, instances: int, kind: str, server_dir: str, unit: Unit,
            repository: Path) -> TritonModel:
    """config.pbtxt and README.md into the staging folder; the returned paths are those after the rename."""
    manifest, unit_dir = unit.manifest, unit.dir
    library_name = LIBRARY_NAMES[manifest.backend]
    comment = (f"generated by `pimoe-export triton` from {unit_dir.resolve()}\n"
               f"{manifest.backend} {manifest.backend_version}, {manifest.precision}; see README.md next to this file")
    config_text = render_config(
        name, platform, model_filename, inputs, outputs, max_batch_size=max_batch_size, instances=instances,
        kind=kind, op_library=f"{server_dir}/{library_name}" if manifest.backend == "onnxruntime" else None,
        comment=comment)
    (staging / "config.pbtxt").write_text(config_text)
    staged = TritonModel(repository, name, platform, staging, staging / "config.pbtxt",
                         staging / "1" / model_filename, staging / library_name, staging / "README.md", inputs,
                         outputs, max_batch_size)
    staged.readme.write_text(_readme(staged, manifest, unit_dir.resolve(), server_dir))
    return TritonModel(repository, name, platform, final, final / "config.pbtxt", final / "1" / model_filename,
                       final / library_name, final / "README.md", inputs, outputs, max_batch_size)
