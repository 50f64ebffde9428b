"""Deployable units and their manifests, and the one check every reader of a unit goes through.

A *unit* is one directory holding everything one backend needs to serve a model, and a ``manifest.json`` that
describes and fingerprints it:

- ``onnxruntime`` units: ``model.onnx`` + ``libpimoe_ort.so`` (CPU; the embedded default backend)
- ``tensorrt`` / ``tensorrt-rtx`` units: ``model.engine`` + ``libpimoe_trt_plugins.so`` + the source ``model.onnx``
- a graph past 2 GB also ships its one external-data file (role ``onnx_data``, the name the ONNX gives it), and
  the ONNX may name no other

A decoder unit (an LLM with a KV cache) also carries the files its clients read (:data:`CLIENT_FILES`: the tokenizer
for text in and out, config.json for optimum, genai_config.json for ONNX Runtime GenAI), next to the ONNX.

The manifest records the backend flavour and version, target SMs, precision, the optimisation profile (and, for
engines with several, the shape profiles), the op-contract version, the model config, the graph interface, the
decoder description of a decoder unit and the sha256 of every artefact. Units are untrusted
input: :func:`verify` runs before anything is loaded from one (``Engine.load``, ``check --unit``, ``inspect``,
``triton``, ``serve``) and checks that every path the manifest names resolves, after symlinks, to a file inside the
unit; that the backend's required artefacts are all listed and match their sha256; that the manifest's config,
precision and interface agree with the ONNX it ships; and (when given) the installed backend version and the GPU.
Loaders then use only the paths :func:`verify` returns.
"""

from __future__ import annotations

import json
import platform
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pimoe_export._files import read_format_json, resolve_inside, sha256_file
from pimoe_export.errors import ArtifactError
from pimoe_export.interface import (
    INT32_LIMIT,
    PRECISIONS,
    DecoderSpec,
    GraphInterface,
    Profile,
    ShapeProfile,
    external_data_files,
    layer_configs,
    parse_metadata,
)
from pimoe_export.ops.schema import CONTRACT_VERSION
from pimoe_export.ops.validation import elements_per_token

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "pimoe-export-unit/1"
BACKENDS = ("onnxruntime", "tensorrt", "tensorrt-rtx")
#: the files a decoder unit ships for its clients, by role: the Hugging Face tokenizer (text in and out), the model's
#: config.json and generation_config.json (optimum's ORTModelForCausalLM), genai_config.json (ONNX Runtime GenAI)
CLIENT_FILES = {"tokenizer": "tokenizer.json", "tokenizer_config": "tokenizer_config.json",
                "special_tokens_map": "special_tokens_map.json", "hf_config": "config.json",
                "generation_config": "generation_config.json", "genai_config": "genai_config.json"}
ROLES = ("onnx", "engine", "plugin_library", "ort_library", "onnx_data", *CLIENT_FILES)
#: artefacts a unit of each backend must list (and ship)
REQUIRED_ROLES: dict[str, tuple[str, ...]] = {
    "onnxruntime": ("onnx", "ort_library"),
    "tensorrt": ("engine", "plugin_library", "onnx"),
    "tensorrt-rtx": ("engine", "plugin_library", "onnx"),
}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class Artifact:
    role: str  # one of ROLES
    file: str  # relative to the unit directory
    sha256: str
    bytes: int

    @classmethod
    def of(cls, role: str, path: Path) -> Artifact:
        return cls(role, path.name, sha256_file(path), path.stat().st_size)

    @classmethod
    def from_dict(cls, data: Any) -> Artifact:
        if not isinstance(data, dict) or set(data) != {"role", "file", "sha256", "bytes"}:
            raise ArtifactError(f"malformed artefact entry {data!r} (expected role, file, sha256, bytes)")
        art = cls(**data)
        if art.role not in ROLES or not isinstance(art.file, str) or not isinstance(art.sha256, str) or \
                not _SHA256.match(art.sha256) or not isinstance(art.bytes, int) or isinstance(art.bytes, bool) \
                or art.bytes < 0:
            raise ArtifactError(f"malformed artefact entry {data!r} (role one of {ROLES}, a file name, a sha256 of "
                                "64 hex digits, a byte count)")
        return art


@dataclass
class Manifest:
    backend: str
    precision: str
    profile: Profile
    config: dict[str, Any]
    artifacts: list[Artifact]
    backend_version: str = ""
    target_sms: list[str] = field(default_factory=list)
    build_options: dict[str, Any] = field(default_factory=dict)
    io: dict[str, Any] = field(default_factory=dict)
    #: decoder units: the DecoderSpec (interface.DecoderSpec.to_dict)
    decoder: dict[str, Any] = field(default_factory=dict)
    #: engines with several optimisation profiles (a decoder's prefill and decode): ShapeProfile.to_dict each
    profiles: list[dict[str, Any]] = field(default_factory=list)
    source_onnx_sha256: str = ""
    contract_version: int = CONTRACT_VERSION
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    host: dict[str, str] = field(default_factory=lambda: {"machine": platform.machine(),
                                                          "python": platform.python_version()})
    format: str = MANIFEST_FORMAT

    def artifact(self, role: str) -> Artifact:
        for art in self.artifacts:
            if art.role == role:
                return art
        raise ArtifactError(f"the manifest lists no {role!r} artefact")

    @property
    def interface(self) -> GraphInterface:
        return GraphInterface.from_dict(self.io)

    @property
    def layer_configs(self) -> dict[str, dict[str, Any]]:
        """The PiMoE layer configs of the unit's graph by module path."""
        return layer_configs(self.config)

    @property
    def decoder_spec(self) -> DecoderSpec | None:
        """The decoder description of a decoder unit (None for any other unit)."""
        return DecoderSpec.from_dict(self.decoder) if self.decoder else None

    @property
    def shape_profiles(self) -> list[ShapeProfile]:
        return [ShapeProfile.from_dict(p) for p in self.profiles]

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "backend": self.backend, "backend_version": self.backend_version,
                "precision": self.precision, "profile": self.profile.to_dict(), "config": self.config,
                "artifacts": [vars(a) for a in self.artifacts], "target_sms": self.target_sms,
                "build_options": self.build_options, "io": self.io, "decoder": self.decoder,
                "profiles": self.profiles, "source_onnx_sha256": self.source_onnx_sha256,
                "contract_version": self.contract_version, "created": self.created, "host": self.host}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        missing = {"backend", "precision", "profile", "config", "artifacts"} - set(data)
        if unknown or missing:
            raise ArtifactError(f"malformed manifest (unknown fields {sorted(unknown)}, missing {sorted(missing)}); "
                                "rebuild the unit")
        if not isinstance(data["artifacts"], list) or not isinstance(data["config"], dict):
            raise ArtifactError("malformed manifest (artifacts must be a list, config an object); rebuild the unit")
        fields = {k: v for k, v in data.items() if k not in ("profile", "artifacts")}
        try:
            manifest = cls(profile=Profile.from_dict(data["profile"]),
                           artifacts=[Artifact.from_dict(a) for a in data["artifacts"]], **fields)
        except TypeError as exc:
            raise ArtifactError(f"malformed manifest ({exc}); rebuild the unit") from None
        manifest._check_fields()
        return manifest

    def _check_fields(self) -> None:
        problems = []
        if self.backend not in BACKENDS:
            problems.append(f"backend {self.backend!r} is not one of {BACKENDS}")
        if self.precision not in PRECISIONS:
            problems.append(f"precision {self.precision!r} is not one of {PRECISIONS}")
        if not isinstance(self.contract_version, int):
            problems.append("contract_version must be an integer")
        if not isinstance(self.target_sms, list) or not all(isinstance(s, str) for s in self.target_sms):
            problems.append("target_sms must be a list of strings")
        for name in ("backend_version", "source_onnx_sha256", "created"):
            if not isinstance(getattr(self, name), str):
                problems.append(f"{name} must be a string")
        for name in ("build_options", "io", "host", "decoder"):
            if not isinstance(getattr(self, name), dict):
                problems.append(f"{name} must be an object")
        if not isinstance(self.profiles, list):
            problems.append("profiles must be a list")
        roles = [a.role for a in self.artifacts]
        if len(set(roles)) != len(roles):
            problems.append(f"an artefact role is listed twice ({roles})")
        if problems:
            raise ArtifactError(f"malformed manifest: {'; '.join(problems)}; rebuild the unit")
        if self.io:
            GraphInterface.from_dict(self.io)
        self.decoder_spec  # noqa: B018 (parses and checks it)
        names = [p.name for p in self.shape_profiles]
        if len(set(names)) != len(names):
            raise ArtifactError(f"malformed manifest: a shape profile name is listed twice ({names}); rebuild the unit")

    def write(self, unit_dir: Path) -> Path:
        path = unit_dir / MANIFEST_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


def read_manifest(unit_dir: str | Path) -> Manifest:
    """The unit's manifest, parsed and checked for form (not yet against the files: see :func:`verify`)."""
    unit_dir = Path(unit_dir)
    if not unit_dir.is_dir() or not (unit_dir / MANIFEST_FILE).exists():
        raise ArtifactError(f"{unit_dir} is not a pimoe-export unit: {MANIFEST_FILE} is missing. Create one with "
                            f"`pimoe-export build MODEL.onnx -o {unit_dir}`, `pimoe-export package MODEL.onnx -o "
                            f"{unit_dir}` or `pimoe-export pipeline`")
    path = resolve_inside(unit_dir, MANIFEST_FILE, "the manifest")
    return Manifest.from_dict(read_format_json(path, MANIFEST_FORMAT, "manifest", "rebuild the unit"))


def rebuild_hint(manifest: Manifest, unit_dir: Path) -> str:
    if manifest.backend == "onnxruntime":
        return (f"re-create the unit: `pimoe-export package MODEL.onnx -o {unit_dir} --force` (or "
                "`pimoe-export pipeline`)")
    return f"rebuild it: `pimoe-export build MODEL.onnx -o {unit_dir} --force` on the target machine"


@dataclass
class Unit:
    """A verified unit: its manifest and the resolved path of every artefact (the only paths loaders use)."""

    dir: Path
    manifest: Manifest
    files: dict[str, Path]
    #: the most tokens (batch x sequence) one call may hold: the op contract keeps every element count an op
    #: indexes below INT32_LIMIT
    max_tokens: int = INT32_LIMIT

    @property
    def interface(self) -> GraphInterface:
        return self.manifest.interface

    @property
    def decoder(self) -> DecoderSpec | None:
        """The decoder description of a decoder unit (an LLM with a KV cache), else None."""
        return self.manifest.decoder_spec

    def __getattr__(self, name: str) -> Any:  # the manifest's fields read through the unit (unit.backend, ...)
        if name == "manifest":
            raise AttributeError(name)
        return getattr(self.manifest, name)


def _check_artifacts(unit_dir: Path, manifest: Manifest, hint: str) -> dict[str, Path]:
    files: dict[str, Path] = {}
    missing = [r for r in REQUIRED_ROLES[manifest.backend] if r not in {a.role for a in manifest.artifacts}]
    if missing:
        raise ArtifactError(f"{unit_dir}: the manifest of this {manifest.backend} unit lists no {missing} artefact; "
                            f"it cannot be verified or loaded: {hint}")
    for art in manifest.artifacts:
        path = resolve_inside(unit_dir, art.file, f"manifest artefact {art.role!r}", hint)
        if path.stat().st_size != art.bytes or sha256_file(path) != art.sha256:
            raise ArtifactError(f"{unit_dir}: {art.file} does not match its manifest sha256 ({art.role}: modified, "
                                f"corrupt or replaced): {hint}")
        files[art.role] = path
    return files


def _dims_problems(io: GraphInterface, proto: Any) -> list[str]:
    """Where the manifest's dims are not the graph's: a fixed size must be the graph's size, a named axis a dynamic
    dimension of the graph, and each dynamic dimension of the graph (its dim_param) one named axis throughout."""
    graph = {v.name: v.type.tensor_type.shape.dim for v in (*proto.graph.input, *proto.graph.output)
             if v.type.tensor_type.HasField("shape")}
    axis_of: dict[str, str] = {}
    problems = []
    for t in (*io.inputs, *io.outputs):
        if t.name not in graph:
            continue
        dims = graph[t.name]
        shown = [d.dim_param or (d.dim_value if d.HasField("dim_value") else "?") for d in dims]
        if len(dims) != len(t.dims):
            problems.append(f"{t.name}: {list(t.dims)} vs {shown}")
            continue
        for mine, theirs in zip(t.dims, dims, strict=True):
            if isinstance(mine, int):
                ok = theirs.HasField("dim_value") and theirs.dim_value == mine
            else:
                ok = not theirs.HasField("dim_value") and (not theirs.dim_param
                                                           or axis_of.setdefault(theirs.dim_param, mine) == mine)
            if not ok:
                problems.append(f"{t.name}: {list(t.dims)} vs {shown}")
                break
    return problems


def _check_against_onnx(unit_dir: Path, manifest: Manifest, onnx_path: Path, hint: str) -> int:
    """The manifest describes the ONNX it ships: config, precision, contract version, graph I/O. Returns the most
    tokens one call of the graph may hold under the op contract's element limits."""
    import onnx

    try:
        proto = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:  # a corrupt protobuf raises DecodeError and friends
        raise ArtifactError(f"{onnx_path} is not a readable ONNX model ({type(exc).__name__}): {hint}") from None
    meta = parse_metadata({p.key: p.value for p in proto.metadata_props}, str(onnx_path))
    problems = []
    data = [a.file for a in manifest.artifacts if a.role == "onnx_data"]
    if external_data_files(proto) != data:
        problems.append(f"the ONNX's external data {external_data_files(proto)} is not the data file the manifest "
                        f"fingerprints ({data})")
    if meta.config != manifest.config:
        problems.append("its config differs from the ONNX's pimoe.config")
    if meta.precision != manifest.precision:
        problems.append(f"its precision {manifest.precision!r} differs from the ONNX's {meta.precision!r}")
    if meta.decoder != manifest.decoder_spec:
        problems.append("its decoder description differs from the ONNX's pimoe.decoder")
    if meta.contract_version and meta.contract_version != manifest.contract_version:
        problems.append(f"its contract version {manifest.contract_version} differs from the ONNX's "
                        f"{meta.contract_version}")
    if manifest.io:
        io = manifest.interface
        graph_in = [i.name for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]
        graph_out = [o.name for o in proto.graph.output]
        if list(io.input_names) != graph_in or list(io.output_names) != graph_out:
            problems.append(f"its I/O {list(io.input_names)} -> {list(io.output_names)} differs from the ONNX's "
                            f"{graph_in} -> {graph_out}")
        dtypes = {v.name: onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name
                  for v in (*proto.graph.input, *proto.graph.output) if v.type.tensor_type.elem_type}
        wrong = [f"{t.name}: {t.dtype} vs {dtypes[t.name]}" for t in (*io.inputs, *io.outputs)
                 if t.name in dtypes and dtypes[t.name] != t.dtype]
        if wrong:
            problems.append(f"its I/O dtypes differ from the ONNX's ({', '.join(wrong)})")
        if wrong_dims := _dims_problems(io, proto):
            problems.append(f"its I/O dims differ from the ONNX's ({', '.join(wrong_dims)})")
    if problems:
        raise ArtifactError(f"{unit_dir}: the manifest does not describe the ONNX it ships: {'; '.join(problems)}: "
                            f"{hint}")
    per_token = elements_per_token(proto)
    return (INT32_LIMIT - 1) // per_token if per_token else INT32_LIMIT


def verify(unit_dir: str | Path, *, backend_version: str | None = None, device_sm: str | None = None) -> Unit:
    """Check a unit before loading anything from it (see the module docstring). Raises ArtifactError."""
    unit_dir = Path(unit_dir)
    manifest = read_manifest(unit_dir)
    hint = rebuild_hint(manifest, unit_dir)
    if not 1 <= manifest.contract_version <= CONTRACT_VERSION:  # contracts only grow: older units still run
        raise ArtifactError(f"{unit_dir} was built for op contract v{manifest.contract_version}; this package "
                            f"implements v1 to v{CONTRACT_VERSION}: {hint}")
    files = _check_artifacts(unit_dir, manifest, hint)
    max_tokens = _check_against_onnx(unit_dir, manifest, files["onnx"], hint)
    # engines are tied to the exact TensorRT version that built them (ONNX Runtime units are not)
    if (backend_version is not None and manifest.backend_version and manifest.backend_version != backend_version
            and manifest.backend != "onnxruntime"):
        raise ArtifactError(f"{unit_dir} was built with {manifest.backend} {manifest.backend_version}, this "
                            f"machine has {backend_version}: {hint}")
    if device_sm is not None and manifest.target_sms and device_sm not in manifest.target_sms:
        raise ArtifactError(f"{unit_dir} targets {manifest.target_sms}, this GPU is {device_sm}: {hint}")
    return Unit(unit_dir, manifest, files, max_tokens)


def copy_artifact(src: str | Path, dst: Path) -> Path:
    """Copy ``src`` to ``dst`` (a path claimed in an output directory)."""
    src = Path(src)
    if not src.is_file():
        raise ArtifactError(f"{src} does not exist")
    if src.resolve() != dst.resolve():
        shutil.copyfile(src, dst)
    return dst


def copy_onnx(src: str | Path, out: Any, name: str = "model.onnx", data_files: list[str] | None = None
              ) -> list[Artifact]:
    """Copy an ONNX graph into a unit (``out``: its OutputDir) as ``name``, with its external-data file when it has
    one (copied under the name the graph gives it, which must be one plain file beside the source); returns the
    artefacts ("onnx", and "onnx_data"). ``data_files``: the graph's external-data names where the caller has
    parsed it already (else it is parsed here)."""
    import onnx

    src = Path(src)
    locations = data_files if data_files is not None else external_data_files(
        onnx.load(str(src), load_external_data=False))
    if len(locations) > 1 or any(Path(loc).name != loc or not loc.endswith(".data") or loc == name
                                 for loc in locations):
        raise ArtifactError(f"{src} keeps its weights in {locations}: a unit ships one external-data file beside the "
                            "ONNX, a plain '<name>.data' file name; re-export the graph with `pimoe-export export`")
    artifacts = [Artifact.of("onnx", copy_artifact(src, out.claim(name)))]
    for location in locations:
        data = resolve_inside(src.parent, location, "the ONNX's external data", "re-export the graph")
        artifacts.append(Artifact.of("onnx_data", copy_artifact(data, out.claim(location))))
    return artifacts
