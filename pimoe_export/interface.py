"""What crosses module boundaries, defined once and torch-free.

Every module that writes or reads one of these facts imports it from here (a test greps for stray copies):

- the graph interface: named inputs and outputs with dtypes and symbolic axes (:class:`GraphInterface`; the PiMoE
  layer's is :func:`layer_interface`; a whole model has several named inputs and outputs in the same form);
- the ONNX opset and the ``pimoe.*`` metadata keys of exported graphs, with one reader (:func:`read_metadata`);
- decoder LLMs with a KV cache: the I/O names of Hugging Face optimum and ONNX Runtime GenAI, what a unit records
  of its decoder (:class:`DecoderSpec`) and the graph interface that follows from it (:func:`decoder_interface`);
- optimisation profiles over the (batch, sequence) axes (:class:`Profile`) and their defaults, and per-input shape
  profiles (:class:`ShapeProfile`: an engine with several, e.g. a decoder's prefill and decode profiles);
- parity tolerances per precision (:data:`TOLERANCES`, documented in docs/precision.md);
- the CUDA architectures the plugins are compiled for (generated into plugins/cmake/cuda_architectures.txt by
  ``python -m pimoe_export.ops.codegen``) and the TensorRT-RTX ahead-of-time targets.

It imports nothing of the package but its error types, so the runtime, the CLI and build scripts can read it.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pimoe_export.errors import ArtifactError

# ------------------------------------------------------------------------------------------ contract limits
# Op contract v1 (pimoe_export/ops/schema.py and docs/op_contract.md), checked at config time, at export and in
# every kernel: 1 <= k <= min(E, MAX_TOP_K), E <= MAX_EXPERTS, at most MAX_LAYERS linear layers per expert, every
# element count an op indexes below INT32_LIMIT.
MAX_EXPERTS = 1024
MAX_TOP_K = 16
MAX_LAYERS = 8
INT32_LIMIT = 2**31

# ------------------------------------------------------------------------------------------ graph I/O
ONNX_OPSET = 18
BATCH_AXIS = "batch"
SEQUENCE_AXIS = "sequence"

#: the PiMoE layer graph
LAYER_INPUT = "hidden_states"
LAYER_OUTPUT = "output"
LAYER_EXPERT_IDS = "expert_ids"
LAYER_EXPERT_WEIGHTS = "expert_weights"
LAYER_OUTPUTS = (LAYER_OUTPUT, LAYER_EXPERT_IDS, LAYER_EXPERT_WEIGHTS)
#: the module path of a PiMoE layer that is the whole model (a bare layer): its routing outputs keep the layer
#: interface's names, and its graph keeps the layer-graph metadata encoding (:func:`graph_metadata`)
ROOT_LAYER = ""
#: whole models: the input whose non-zero positions are the valid tokens (the Hugging Face convention); a check
#: pools the primary [B, S, H] output over it (sentence-embedding cosine)
MODEL_MASK_INPUT = "attention_mask"
#: Hugging Face text models: the token ids input
MODEL_IDS_INPUT = "input_ids"
#: decoders (causal LMs): each token's position (optimum / ONNX Runtime GenAI name), and the logits output
MODEL_POSITIONS_INPUT = "position_ids"
MODEL_LOGITS_OUTPUT = "logits"
#: decoders with a key/value cache (issue 27): the optimum / ONNX Runtime GenAI names of layer i's cache tensors
PAST_KEY, PAST_VALUE = "past_key_values.{layer}.key", "past_key_values.{layer}.value"
PRESENT_KEY, PRESENT_VALUE = "present.{layer}.key", "present.{layer}.value"


def past_names(layers: int) -> tuple[str, ...]:
    """The cache inputs of a decoder with ``layers`` attention layers, in graph order (key, value per layer)."""
    return tuple(name.format(layer=i) for i in range(layers) for name in (PAST_KEY, PAST_VALUE))


def present_names(layers: int) -> tuple[str, ...]:
    """The cache outputs of a decoder with ``layers`` attention layers, in graph order (key, value per layer)."""
    return tuple(name.format(layer=i) for i in range(layers) for name in (PRESENT_KEY, PRESENT_VALUE))

DTYPES = ("float32", "float16", "int32", "int64", "int8", "bool")


@dataclass(frozen=True)
class TensorInterface:
    """One graph input or output: name, dtype (numpy spelling) and dims (int, or an axis name when dynamic)."""

    name: str
    dtype: str
    dims: tuple[int | str, ...]

    def to_list(self) -> list[Any]:
        return [self.name, self.dtype, list(self.dims)]

    @classmethod
    def from_list(cls, entry: Any) -> TensorInterface:
        try:
            name, dtype, dims = entry
            dims = tuple(d if isinstance(d, str) else int(d) for d in dims)
        except (TypeError, ValueError):
            raise ArtifactError(f"malformed I/O entry {entry!r} (expected [name, dtype, dims])") from None
        if not isinstance(name, str) or not name or dtype not in DTYPES:
            raise ArtifactError(f"malformed I/O entry {entry!r}: name must be a string, dtype one of {DTYPES}")
        return cls(name, dtype, dims)


@dataclass(frozen=True)
class GraphInterface:
    """The named inputs and outputs of an exported graph (and of every unit built from it)."""

    inputs: tuple[TensorInterface, ...]
    outputs: tuple[TensorInterface, ...]

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    def to_dict(self) -> dict[str, list[list[Any]]]:
        return {"inputs": [t.to_list() for t in self.inputs], "outputs": [t.to_list() for t in self.outputs]}

    @classmethod
    def from_dict(cls, data: Any) -> GraphInterface:
        if not isinstance(data, dict) or not isinstance(data.get("inputs"), list) or not data["inputs"] or \
                not isinstance(data.get("outputs"), list) or not data["outputs"]:
            raise ArtifactError("the I/O description must list inputs and outputs ({'inputs': [...], 'outputs': "
                                "[...]})")
        return cls(tuple(TensorInterface.from_list(e) for e in data["inputs"]),
                   tuple(TensorInterface.from_list(e) for e in data["outputs"]))


def layer_interface(hidden_size: int, top_k: int, precision: str) -> GraphInterface:
    """hidden_states [batch, sequence, H] -> output [batch, sequence, H] (the input's dtype), expert_ids
    [batch, sequence, k] int32, expert_weights [batch, sequence, k] float32."""
    io_dtype = "float16" if precision == "fp16" else "float32"
    tokens = (BATCH_AXIS, SEQUENCE_AXIS)
    return GraphInterface(
        inputs=(TensorInterface(LAYER_INPUT, io_dtype, (*tokens, hidden_size)),),
        outputs=(TensorInterface(LAYER_OUTPUT, io_dtype, (*tokens, hidden_size)),
                 TensorInterface(LAYER_EXPERT_IDS, "int32", (*tokens, top_k)),
                 TensorInterface(LAYER_EXPERT_WEIGHTS, "float32", (*tokens, top_k))),
    )


# ------------------------------------------------------------------------------------------ decoders (KV cache)
#: decoder LLMs take and return their KV cache with the names of Hugging Face optimum's ORTModelForCausalLM and ONNX
#: Runtime GenAI (genai_config.json), so both run our graphs: input_ids [batch, sequence], attention_mask [batch,
#: total_sequence] (1 = a token, 0 = left padding), position_ids [batch, sequence], past_key_values.<i>.key/value
#: [batch, kv_heads, past_sequence, head_dim] in; logits [batch, sequence, vocab] and present.<i>.key/value [batch,
#: kv_heads, total_sequence, head_dim] out, total_sequence = past_sequence + sequence. A prompt is one call with an
#: empty past (past_sequence 0), each new token one call with sequence 1. The value tensors' head dim may differ from
#: the keys' (DecoderSpec.value_head_dim: multi-head latent attention, DeepSeek-V2/V3).
DECODER_POSITIONS_INPUT = "position_ids"
DECODER_LOGITS = "logits"
PAST_SEQUENCE_AXIS = "past_sequence"
TOTAL_SEQUENCE_AXIS = "total_sequence"
KV_KINDS = ("key", "value")
#: printf templates of the cache names (genai_config.json spells them so)
PAST_TEMPLATE = "past_key_values.%d.{kind}"
PRESENT_TEMPLATE = "present.%d.{kind}"


def past_name(layer: int, kind: str) -> str:
    """``past_key_values.<layer>.<kind>`` (kind: key | value)."""
    return PAST_TEMPLATE.format(kind=kind) % layer


def present_name(layer: int, kind: str) -> str:
    """``present.<layer>.<kind>`` (kind: key | value)."""
    return PRESENT_TEMPLATE.format(kind=kind) % layer


def _id_list(value: Any) -> tuple[int, ...]:
    values = value if isinstance(value, list | tuple) else [value]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ValueError(f"expected a token id or a list of them, got {value!r}")
    return tuple(values)


@dataclass(frozen=True)
class DecoderSpec:
    """What a decoder unit records of its model (the exporter writes it as ``pimoe.decoder`` metadata, the unit's
    manifest carries it as ``decoder``): the cache geometry, the vocabulary, the context length and the special
    tokens generation needs. ``model_type`` is the Hugging Face ``model_type`` (clients pick their model class by
    it). ``value_head_dim`` is the value cache's head dim (None when constructed: ``head_dim``, which every
    attention whose keys and values are of one size has); DeepSeek-V2/V3's multi-head latent attention caches keys
    of qk_nope_head_dim + qk_rope_head_dim and values of v_head_dim. :meth:`to_dict` leaves it out where it equals
    ``head_dim``, so such a description reads as before it existed."""

    model_type: str
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    context_length: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    bos_token_id: int | None = None
    value_head_dim: int = None  # type: ignore[assignment]  # None: head_dim (set in __post_init__)

    def __post_init__(self) -> None:
        if self.value_head_dim is None:
            object.__setattr__(self, "value_head_dim", self.head_dim)
        sizes = ("num_layers", "num_attention_heads", "num_kv_heads", "head_dim", "value_head_dim", "hidden_size",
                 "vocab_size", "context_length")
        bad = [n for n in sizes if not isinstance(getattr(self, n), int) or isinstance(getattr(self, n), bool)
               or getattr(self, n) < 1]
        if bad or not isinstance(self.model_type, str) or not self.model_type:
            raise ArtifactError(f"malformed decoder description: {bad or ['model_type']} must be positive integers "
                                "(model_type a non-empty string)")
        tokens = [*self.eos_token_ids, self.pad_token_id, *([self.bos_token_id] if self.bos_token_id is not None
                                                            else [])]
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size for t in tokens):
            raise ArtifactError(f"malformed decoder description: the special token ids {tokens} must lie in "
                                f"[0, vocab_size={self.vocab_size})")
        if self.num_attention_heads % self.num_kv_heads:
            raise ArtifactError(f"malformed decoder description: {self.num_attention_heads} attention heads are not "
                                f"a multiple of {self.num_kv_heads} KV heads")

    @property
    def past_names(self) -> tuple[str, ...]:
        return tuple(past_name(i, k) for i in range(self.num_layers) for k in KV_KINDS)

    @property
    def present_names(self) -> tuple[str, ...]:
        return tuple(present_name(i, k) for i in range(self.num_layers) for k in KV_KINDS)

    def kv_head_dim(self, kind: str) -> int:
        """The head dim of the key or the value cache (kind: key | value)."""
        if kind not in KV_KINDS:
            raise ValueError(f"a cache tensor is one of {KV_KINDS}, not {kind!r}")
        return self.head_dim if kind == "key" else self.value_head_dim

    @property
    def cache_head_dims(self) -> tuple[int, ...]:
        """The head dim of each cache tensor, in the order of :attr:`past_names` and :attr:`present_names`."""
        return tuple(self.kv_head_dim(k) for _ in range(self.num_layers) for k in KV_KINDS)

    def cache_shape(self, kind: str, batch: Any, length: Any) -> tuple[Any, ...]:
        """[batch, kv_heads, length, head dim of ``kind``]: a key or value cache tensor (ints or axis names)."""
        return (batch, self.num_kv_heads, length, self.kv_head_dim(kind))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["eos_token_ids"] = list(self.eos_token_ids)
        if self.value_head_dim == self.head_dim:
            del data["value_head_dim"]
        return data

    @classmethod
    def from_dict(cls, data: Any) -> DecoderSpec:
        fields = set(cls.__dataclass_fields__)
        if not isinstance(data, dict) or not fields - {"bos_token_id", "value_head_dim"} <= set(data) <= fields:
            raise ArtifactError(f"malformed decoder description {data!r} (expected the fields {sorted(fields)})")
        if "value_head_dim" in data and data["value_head_dim"] is None:  # written only when it differs from head_dim
            raise ArtifactError("malformed decoder description: value_head_dim is null (leave it out when the "
                                "values' head dim is head_dim)")
        try:
            return cls(**{**data, "eos_token_ids": _id_list(data["eos_token_ids"])})
        except ValueError as exc:
            raise ArtifactError(f"malformed decoder description: eos_token_ids: {exc}") from None

    def interface_problems(self, interface: GraphInterface) -> list[str]:
        """What keeps ``interface`` from being this decoder's (empty: it is): every standard input and no other,
        every standard output (a graph may add outputs, e.g. routing), the cache geometry."""
        expected = decoder_interface(self, _cache_dtype(interface))
        problems = []
        if set(interface.input_names) != set(expected.input_names):
            problems.append(f"its inputs {list(interface.input_names)} are not {list(expected.input_names)}")
        missing = [n for n in expected.output_names if n not in interface.output_names]
        if missing:
            problems.append(f"its outputs lack {missing}")
        given = {t.name: t for t in (*interface.inputs, *interface.outputs)}
        for tensor in (*expected.inputs, *expected.outputs):
            got = given.get(tensor.name)
            if got is not None and (got.dtype != tensor.dtype or len(got.dims) != len(tensor.dims) or any(
                    isinstance(e, int) and e != g for e, g in zip(tensor.dims, got.dims, strict=True))):
                problems.append(f"{tensor.name} is {got.dtype} {list(got.dims)}, expected {tensor.dtype} "
                                f"{list(tensor.dims)}")
        return problems


def _cache_dtype(interface: GraphInterface) -> str:
    dtypes = {t.name: t.dtype for t in interface.inputs}
    return dtypes.get(past_name(0, KV_KINDS[0]), "float32")


def decoder_interface(spec: DecoderSpec, cache_dtype: str = "float32") -> GraphInterface:
    """The standard decoder I/O of ``spec`` (see above): token inputs int64, logits float32 (fp16 graphs: float16
    like the cache)."""
    tokens = (BATCH_AXIS, SEQUENCE_AXIS)
    kinds = KV_KINDS * spec.num_layers  # the kind of each past / present name, in order
    return GraphInterface(
        inputs=(TensorInterface(MODEL_IDS_INPUT, "int64", tokens),
                TensorInterface(MODEL_MASK_INPUT, "int64", (BATCH_AXIS, TOTAL_SEQUENCE_AXIS)),
                TensorInterface(DECODER_POSITIONS_INPUT, "int64", tokens),
                *(TensorInterface(name, cache_dtype, spec.cache_shape(kind, BATCH_AXIS, PAST_SEQUENCE_AXIS))
                  for name, kind in zip(spec.past_names, kinds, strict=True))),
        outputs=(TensorInterface(DECODER_LOGITS, cache_dtype, (*tokens, spec.vocab_size)),
                 *(TensorInterface(name, cache_dtype, spec.cache_shape(kind, BATCH_AXIS, TOTAL_SEQUENCE_AXIS))
                   for name, kind in zip(spec.present_names, kinds, strict=True))),
    )


def decoder_metadata(spec: DecoderSpec) -> dict[str, str]:
    """The ``pimoe.decoder`` metadata of a decoder graph (the exporter adds it to the whole-model metadata)."""
    return {META_DECODER: json.dumps(spec.to_dict())}


# ------------------------------------------------------------------------------------------ ONNX metadata
META_CONFIG = "pimoe.config"  # the PiMoEConfig dict (JSON)
META_CONTRACT = "pimoe.contract_version"
META_GRAPH = "pimoe.graph"  # "custom-ops" | "standard-ops"
META_PRECISION = "pimoe.precision"  # "fp32" | "fp16" | "w8a8" | "w8a8_dynamic"
META_EXPORTER = "pimoe.exporter"
META_WEIGHTS = "pimoe.weights_sha256"  # fingerprint of the PyTorch weights the graph was exported from
META_QUANT = "pimoe.quantization"  # quantisation settings of an INT8 graph (JSON)
#: whole-model graphs only: the graph's named inputs and outputs (GraphInterface JSON); a layer graph's interface
#: follows from its config (layer_interface). Their pimoe.config is {"model": class name, "layers": {path: config}}.
META_INTERFACE = "pimoe.interface"
#: decoder graphs only: the DecoderSpec JSON (:func:`decoder_metadata`)
META_DECODER = "pimoe.decoder"
PRECISIONS = ("fp32", "fp16", "w8a8", "w8a8_dynamic")
GRAPH_KINDS = ("custom-ops", "standard-ops")


@dataclass(frozen=True)
class OnnxMetadata:
    """The ``pimoe.*`` metadata of an exported graph, parsed and checked."""

    config: dict[str, Any]
    precision: str
    graph: str
    contract_version: int
    weights_sha256: str = ""
    quantization: dict[str, Any] | None = None
    model_interface: GraphInterface | None = None  # whole-model graphs
    decoder: DecoderSpec | None = None  # decoder graphs with a KV cache

    @property
    def quantized(self) -> bool:
        return self.precision in ("w8a8", "w8a8_dynamic")

    @property
    def is_model(self) -> bool:
        """A whole model (several named inputs/outputs, PiMoE layers inside) rather than one bare layer."""
        return self.model_interface is not None

    @property
    def interface(self) -> GraphInterface:
        """The graph's named inputs and outputs."""
        if self.model_interface is not None:
            return self.model_interface
        return layer_interface(int(self.config["hidden_size"]), int(self.config["top_k"]), self.precision)

    @property
    def layer_configs(self) -> dict[str, dict[str, Any]]:
        """PiMoE layer configs by module path ("" for a bare layer graph)."""
        return layer_configs(self.config)


def quantization_metadata(layers: dict[str, dict[str, Any]], calibration: str) -> dict[str, Any]:
    """The ``pimoe.quantization`` metadata of an INT8 graph from each PiMoE layer's settings by module path: a graph
    that is one PiMoE layer keeps the layer-graph encoding (that layer's settings), any other graph records them by
    layer."""
    if list(layers) == [ROOT_LAYER]:
        return {**layers[ROOT_LAYER], "calibration_data": calibration}
    first = next(iter(layers.values()))
    return {"mode": first["mode"], "router": "fp32", "layers": layers, "method": first["method"],
            "calibration_data": calibration}


def graph_metadata(model_name: str, layer_configs: dict[str, str], interface: GraphInterface) -> dict[str, str]:
    """The ``pimoe.config`` (and ``pimoe.interface``) metadata of an exported graph, what :func:`parse_metadata`
    reads back. ``layer_configs``: each PiMoE layer's config JSON by module path. A graph that is one PiMoE layer
    with the layer interface keeps the layer-graph encoding of contract v1: the layer's config alone, the interface
    implied by it (:func:`layer_interface`); any other graph records its layers' configs and its interface."""
    if list(layer_configs) == [ROOT_LAYER]:
        config = json.loads(layer_configs[ROOT_LAYER])
        implied = [layer_interface(int(config["hidden_size"]), int(config["top_k"]), p) for p in ("fp32", "fp16")]
        if interface in implied:
            return {META_CONFIG: layer_configs[ROOT_LAYER]}
    layers = {path: json.loads(text) for path, text in layer_configs.items()}
    return {META_CONFIG: json.dumps({"model": model_name, "layers": layers}),
            META_INTERFACE: json.dumps(interface.to_dict())}


def read_onnx(onnx_path: str | Path, external_data: bool = False) -> Any:
    """The ModelProto of an ONNX file: the one place the package loads an ONNX file it is given, so a missing or
    corrupt one is always an ArtifactError naming the file."""
    import onnx

    path = Path(onnx_path)
    if not path.is_file():
        raise ArtifactError(f"{path} does not exist; write it with `pimoe-export export` or `pimoe-export quantize`")
    try:
        return onnx.load(str(path), load_external_data=external_data)
    except Exception as exc:  # onnx raises DecodeError, ValueError, ... for a corrupt file
        raise ArtifactError(f"{path} is not a readable ONNX model ({type(exc).__name__}: {exc}); re-export it") \
            from None


#: a graph whose initializers hold more bytes than this is written with ONNX external data: protobuf serialises at
#: most 2 GiB, and the graph's nodes and metadata need room besides the weights
EXTERNAL_DATA_BYTES = 2**31 - 2**27


def external_data_name(onnx_name: str) -> str:
    """The one external-data file of a graph written by pimoe-export: ``<file name>.data`` beside it."""
    return f"{onnx_name}.data"


def initializer_bytes(proto: Any) -> int:
    """Bytes of the graph's initializers, whether held in the proto or in external data (from their shapes)."""
    import onnx

    total = 0
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            length = {e.key: e.value for e in tensor.external_data}.get("length")
            size = int(length) if length else math.prod(tensor.dims) * onnx.helper.tensor_dtype_to_np_dtype(
                tensor.data_type).itemsize
        else:
            size = tensor.ByteSize()
        total += size
    return total


def _all_tensors(graph: Any) -> Iterator[Any]:
    """Every TensorProto a graph holds: initializers, sparse initializers, node attributes, subgraphs (recursively)."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("sparse_tensor"):
                yield from (attr.sparse_tensor.values, attr.sparse_tensor.indices)
            for sparse in attr.sparse_tensors:
                yield from (sparse.values, sparse.indices)
            if attr.HasField("g"):
                yield from _all_tensors(attr.g)
            for sub in attr.graphs:
                yield from _all_tensors(sub)


def external_data_files(proto: Any) -> list[str]:
    """The external-data locations any tensor of a graph names (initializers, node attributes such as a Constant's
    value, sparse tensors, subgraphs); empty for a self-contained graph."""
    import onnx

    locations = {e.value for t in _all_tensors(proto.graph) if t.data_location == onnx.TensorProto.EXTERNAL
                 for e in t.external_data if e.key == "location"}
    return sorted(locations)


def write_onnx(proto: Any, path: str | Path) -> Path:
    """Write ``proto`` to ``path``: one file, or with its initializers in :func:`external_data_name` beside it when
    they exceed :data:`EXTERNAL_DATA_BYTES` (a proto whose initializers already live there keeps them)."""
    import onnx

    path = Path(path)
    data = path.with_name(external_data_name(path.name))
    if external_data_files(proto) or initializer_bytes(proto) <= EXTERNAL_DATA_BYTES:
        if not external_data_files(proto) and data.is_file() and not data.is_symlink():
            data.unlink()  # a stale companion of an earlier, larger graph of this name
        onnx.save_model(proto, str(path))
        return path
    if data.is_symlink() or data.exists():
        data.unlink()  # onnx appends to an existing data file
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    return path


def layer_configs(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The PiMoE layer configs by module path of a graph's ``pimoe.config`` (or a unit manifest's ``config``): the
    recorded layers, or the layer-graph encoding's one config at path "" (see :func:`graph_metadata`)."""
    layers = config.get("layers")
    if "model" in config and isinstance(layers, dict):
        return dict(layers)
    return {ROOT_LAYER: config}


def metadata_props(onnx_path: str | Path) -> dict[str, str]:
    """The raw metadata_props of an ONNX file (no external data loaded)."""
    return {p.key: p.value for p in read_onnx(onnx_path).metadata_props}


def parse_metadata(props: dict[str, str], source: str) -> OnnxMetadata:
    """Check and parse ``pimoe.*`` metadata (from :func:`metadata_props` or a loaded ModelProto)."""
    fix = "export it with `pimoe-export export` (or `quantize`)"
    if META_CONFIG not in props:
        raise ArtifactError(f"{source} carries no {META_CONFIG} metadata: it was not written by pimoe-export; {fix}")
    try:
        config = json.loads(props[META_CONFIG])
        quant = json.loads(props[META_QUANT]) if META_QUANT in props else None
        contract = int(props.get(META_CONTRACT, "0"))
    except (ValueError, RecursionError) as exc:
        raise ArtifactError(f"{source}: malformed pimoe metadata ({exc}); {fix}") from None
    precision = props.get(META_PRECISION, "fp32")
    graph = props.get(META_GRAPH, "custom-ops")
    if not isinstance(config, dict) or precision not in PRECISIONS or graph not in GRAPH_KINDS:
        raise ArtifactError(f"{source}: malformed pimoe metadata (config must be an object, precision one of "
                            f"{PRECISIONS}, graph one of {GRAPH_KINDS}); {fix}")
    model_interface = None
    if META_INTERFACE in props:
        try:
            model_interface = GraphInterface.from_dict(json.loads(props[META_INTERFACE]))
        except (ValueError, RecursionError) as exc:
            raise ArtifactError(f"{source}: malformed {META_INTERFACE} metadata ({exc}); {fix}") from None
        layers = config.get("layers")
        if not isinstance(layers, dict) or not all(isinstance(c, dict) for c in layers.values()):
            raise ArtifactError(f"{source}: a whole-model graph's {META_CONFIG} must hold its layers' configs; {fix}")
    else:
        for key in ("hidden_size", "top_k"):
            if not isinstance(config.get(key), int) or isinstance(config.get(key), bool) or config[key] < 1:
                raise ArtifactError(f"{source}: {META_CONFIG} has no valid {key!r}; {fix}")
    decoder = None
    if META_DECODER in props:
        decoder = _parse_decoder(props[META_DECODER], model_interface, f"{source}: {META_DECODER} metadata", fix)
    return OnnxMetadata(config, precision, graph, contract, props.get(META_WEIGHTS, ""),
                        quant if isinstance(quant, dict) else None, model_interface, decoder)


def _parse_decoder(text: str, interface: GraphInterface | None, where: str, fix: str) -> DecoderSpec:
    try:
        spec = DecoderSpec.from_dict(json.loads(text))
    except (ValueError, RecursionError) as exc:
        raise ArtifactError(f"{where} is malformed ({exc}); {fix}") from None
    problems = spec.interface_problems(interface) if interface is not None else ["the graph records no interface"]
    if problems:
        raise ArtifactError(f"{where} does not describe the graph: {'; '.join(problems)}; {fix}")
    return spec


def read_metadata(onnx_path: str | Path) -> OnnxMetadata:
    """The one reader of an exported graph's metadata."""
    return parse_metadata(metadata_props(onnx_path), str(onnx_path))


# ------------------------------------------------------------------------------------------ profiles
@dataclass(frozen=True)
class Profile:
    """Range of the (batch, sequence) axes every input accepts: min, opt and max as (batch, sequence)."""

    min_shape: tuple[int, int]
    opt_shape: tuple[int, int]
    max_shape: tuple[int, int]

    def __post_init__(self) -> None:
        shapes = (self.min_shape, self.opt_shape, self.max_shape)
        if any(len(s) != 2 or any(not isinstance(d, int) or isinstance(d, bool) for d in s) for s in shapes):
            raise ArtifactError(f"a profile is three (batch, sequence) pairs of integers, got {shapes}")
        for axis in (0, 1):
            lo, opt, hi = (s[axis] for s in shapes)
            if not 1 <= lo <= opt <= hi:
                raise ArtifactError(f"profile {('batch', 'sequence')[axis]} range must satisfy 1 <= min <= opt <= "
                                    f"max, got {lo}, {opt}, {hi}")

    def check(self, batch: int, sequence: int) -> str:
        """Empty string when [batch, sequence] is inside the profile, else the problem."""
        lo, hi = self.min_shape, self.max_shape
        if lo[0] <= batch <= hi[0] and lo[1] <= sequence <= hi[1]:
            return ""
        return (f"input [batch={batch}, sequence={sequence}] is outside this unit's profile "
                f"[{lo[0]}..{hi[0]}] x [{lo[1]}..{hi[1]}]")

    def to_dict(self) -> dict[str, list[int]]:
        return {k: list(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Any) -> Profile:
        try:
            return cls(**{k: tuple(int(x) for x in data[k]) for k in ("min_shape", "opt_shape", "max_shape")})
        except (KeyError, TypeError, ValueError):
            raise ArtifactError(f"malformed profile {data!r} (expected min_shape/opt_shape/max_shape pairs)") \
                from None


@dataclass(frozen=True)
class ShapeProfile:
    """One optimisation profile in TensorRT's form: a name and the (min, opt, max) shape of every input. A decoder
    engine has two (:func:`decoder_profiles`): prefill (a prompt, empty past) and decode (one token, a long past)."""

    name: str
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]

    def __post_init__(self) -> None:
        for name, bounds in self.shapes.items():
            lo, opt, hi = bounds
            if not len(lo) == len(opt) == len(hi) or any(not 0 <= a <= b <= c for a, b, c in zip(lo, opt, hi,
                                                                                                  strict=True)):
                raise ArtifactError(f"profile {self.name!r}: input {name} must satisfy 0 <= min <= opt <= max on "
                                    f"every axis, got {list(lo)}, {list(opt)}, {list(hi)}")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shapes": {k: [list(b) for b in v] for k, v in self.shapes.items()}}

    @classmethod
    def from_dict(cls, data: Any) -> ShapeProfile:
        try:
            shapes = {str(k): tuple(tuple(int(d) for d in b) for b in v) for k, v in data["shapes"].items()}
            if not isinstance(data["name"], str) or any(len(b) != 3 for b in shapes.values()):
                raise ValueError
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ArtifactError(f"malformed shape profile {data!r} (expected a name and shapes {{input: [min, opt, "
                                "max]}})") from None
        return cls(data["name"], shapes)  # type: ignore[arg-type]


def decoder_profiles(spec: DecoderSpec, max_batch: int, max_prompt: int) -> tuple[ShapeProfile, ShapeProfile]:
    """The prefill and decode profiles of a decoder engine: prefill takes prompts of 1..max_prompt tokens with an
    empty past; decode takes one token per row with a past of 1..context_length - 1 (opt: batch 1)."""
    context = spec.context_length

    def shapes(seq: tuple[int, int, int], past: tuple[int, int, int]) -> dict[str, Any]:
        batch = (1, 1, max_batch)
        total = tuple(s + p for s, p in zip(seq, past, strict=True))
        out = {MODEL_IDS_INPUT: tuple(zip(batch, seq, strict=True)),
               MODEL_MASK_INPUT: tuple(zip(batch, total, strict=True)),
               DECODER_POSITIONS_INPUT: tuple(zip(batch, seq, strict=True))}
        caches = {name: tuple(spec.cache_shape(kind, b, p) for b, p in zip(batch, past, strict=True))
                  for name, kind in zip(spec.past_names, KV_KINDS * spec.num_layers, strict=True)}
        return {**out, **caches}

    prompt_opt = min(max_prompt, 128)
    return (ShapeProfile("prefill", shapes((1, prompt_opt, max_prompt), (0, 0, 0))),
            ShapeProfile("decode", shapes((1, 1, 1), (1, min(context - 1, 512), context - 1))))


#: ONNX Runtime units accept any size the host can hold
DEFAULT_ORT_PROFILE = Profile((1, 1), (1, 64), (256, 8192))
#: TensorRT / TensorRT-RTX engines are built for this range unless told otherwise (pimoe-export build --max-tokens)
DEFAULT_ENGINE_PROFILE = Profile((1, 1), (1, 64), (8, 512))


def profile_shapes(profile: Profile, interface: GraphInterface) -> dict[str, tuple[tuple[int, ...], ...]]:
    """(min, opt, max) shape of every input: the profile's (batch, sequence) on the named axes, fixed dims kept."""
    shapes = {}
    for tensor in interface.inputs:
        per_bound = []
        for bound in (profile.min_shape, profile.opt_shape, profile.max_shape):
            axes = {BATCH_AXIS: bound[0], SEQUENCE_AXIS: bound[1]}
            if any(isinstance(d, str) and d not in axes for d in tensor.dims):
                raise ArtifactError(f"input {tensor.name} has an axis the profile does not cover: {tensor.dims}")
            per_bound.append(tuple(axes[d] if isinstance(d, str) else int(d) for d in tensor.dims))
        shapes[tensor.name] = tuple(per_bound)
    return shapes


# ------------------------------------------------------------------------------------------ tolerances
@dataclass(frozen=True)
class Tolerances:
    """Pass criteria of a parity check for one precision (docs/precision.md).

    Polygraphy's elementwise check passes an element when |a - r| <= atol or |a - r| <= rtol * |r|; ``atol`` is
    ``atol_rel * max|r|`` so it scales with the layer's output. ``check_error_stat`` chooses what must pass: every
    element ("elemwise") or a quantile of them (tokens whose routing flipped differ by a whole expert and are
    counted by ``min_routing_agreement`` instead).
    """

    rtol: float
    atol_rel: float
    min_cosine: float
    min_routing_agreement: float
    check_error_stat: str = "elemwise"
    error_quantile: float = 0.99
    #: whole models with an attention mask: the lowest allowed MEAN cosine of the mean-pooled [B, S, H] output
    #: (sentence embeddings); None = ``min_cosine``
    min_embedding_cosine: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


TOLERANCES: dict[str, Tolerances] = {
    # fp32 graph vs fp32 PyTorch: same math, different summation orders and exp/erf implementations
    "fp32": Tolerances(rtol=1e-5, atol_rel=1e-5, min_cosine=0.999999, min_routing_agreement=1.0),
    # fp16 I/O and weights, fp32 accumulation, fp32 router fed fp16-rounded inputs
    "fp16": Tolerances(rtol=1e-2, atol_rel=1e-2, min_cosine=0.999, min_routing_agreement=0.98,
                       check_error_stat="quantile", error_quantile=0.98),
    # W8A8 experts (fp32 router)
    "w8a8": Tolerances(rtol=5e-2, atol_rel=5e-2, min_cosine=0.999, min_routing_agreement=1.0,
                       check_error_stat="quantile", error_quantile=0.99),
}
TOLERANCES["w8a8_dynamic"] = TOLERANCES["w8a8"]
#: whole models in W8A8 (several PiMoE layers in one graph, docs/precision.md "Whole models"): the quantisation
#: error of one layer moves the next layers' router inputs, and hard top-k re-routes the tokens whose router logits
#: are nearly tied there, each re-routed token swapping a whole expert's share of its FFN. Per-layer routing
#: agreement therefore cannot be 100% on a deep real model, and elementwise differences at those tokens are not
#: rounding. The criterion is on what the model is for: the mean-pooled embedding cosine (sentence encoders), the
#: outputs' overall cosine, a routing floor and a Polygraphy quantile check that re-routed tokens cannot fail.
MODEL_TOLERANCES: dict[str, Tolerances] = {
    "w8a8": Tolerances(rtol=1e-1, atol_rel=1e-1, min_cosine=0.995, min_routing_agreement=0.90,
                       check_error_stat="quantile", error_quantile=0.95, min_embedding_cosine=0.999),
}
MODEL_TOLERANCES["w8a8_dynamic"] = MODEL_TOLERANCES["w8a8"]
#: quantised graphs, kernels vs the fake-quant reference of the same integer math: what remains is fp32 rounding in
#: LayerNorm and the activations, which can move an activation code by one step at a rounding boundary
MAX_KERNEL_REL_L2 = 2e-3


def tolerances_for(precision: str, moe_layers: int = 1) -> Tolerances:
    """The pass criteria of a check at ``precision`` of a graph with ``moe_layers`` PiMoE layers (MODEL_TOLERANCES
    where they differ, for graphs whose PiMoE layers feed one another: see there)."""
    if moe_layers > 1 and precision in MODEL_TOLERANCES:
        return MODEL_TOLERANCES[precision]
    return TOLERANCES.get(precision, TOLERANCES["fp32"])


# ------------------------------------------------------------------------------------------ targets
#: nvcc targets of the TensorRT plugins (Ampere, Ampere consumer, Orin, Ada, Hopper)
CUDA_ARCHITECTURES = ("80", "86", "87", "89", "90")
#: TensorRT-RTX ahead-of-time targets among them (RTX has no SM87/SM90 target; Hopper engines come from full
#: TensorRT in the docker/ image)
DEFAULT_RTX_TARGETS = ("SM80", "SM86", "SM89")
#: nvcc targets of each docker/ image (the Dockerfiles' PIMOE_CUDA_ARCHITECTURES default; a test keeps them equal):
#: the server image for data-centre and workstation GPUs, the Jetson image for Orin (sm_87) and Thor (sm_110 since
#: CUDA 13, which the CI toolchain does not know, hence not in CUDA_ARCHITECTURES)
IMAGE_CUDA_ARCHITECTURES = {"server": ("80", "86", "89", "90"), "jetson": ("87", "110")}


def sm_names(architectures: Iterable[str] = CUDA_ARCHITECTURES) -> list[str]:
    """"80" -> "sm_80"."""
    return [f"sm_{a}" for a in architectures]


# ------------------------------------------------------------------------------------------ runtimes
#: libpimoe_ort is built against ONNX Runtime's C API 21: onnxruntime 1.21 is the oldest that can run our ops
#: (1.20.x registers nothing; Triton containers up to 25.03 ship 1.20.1). pyproject.toml states the same range.
MIN_ONNXRUNTIME = (1, 21)


def version_tuple(version: str) -> tuple[int, ...]:
    """"1.21.0.dev20250101" -> (1, 21, 0); the numeric prefix of each dotted part."""
    parts = []
    for part in version.split(".")[:3]:
        digits = "".join(itertools.takewhile(str.isdigit, part))
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


# ------------------------------------------------------------------------------------------ size limits
#: the largest tensor pimoe-export will allocate or copy on the host without being asked to (elements)
MAX_HOST_ELEMENTS = 2**31


def element_count(shape: Sequence[int]) -> int:
    return math.prod(int(d) for d in shape)
