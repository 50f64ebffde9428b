"""The TensorRT plugin library on a machine without a GPU (CI rung 4).

- It was built (scripts/setup.sh compiles it for every architecture in CMAKE_CUDA_ARCHITECTURES), exports the two
  entry points TensorRT's loadLibrary needs and depends on nothing of TensorRT or the CUDA runtime.
- The TensorRT 11.4 lean runtime loads it and registers all four creators under the contract's names, version
  and namespace, with the contract's attributes as declared fields.
- Each creator builds plugins from field collections made from the contract (the types TensorRT's ONNX parser
  delivers) and rejects bad fields; the plugins report the contract's name, version, namespace and outputs.
- pimoe_export.native (libraries, tensorrt_loader) reports missing pieces with its error types, and never imports torch.
- The generated *_PluginConfig.yaml files match the contract.
"""

from __future__ import annotations

import gc
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pimoe_export.errors import BackendUnavailableError, PluginLoadError
from pimoe_export.ops import schema

ROOT = Path(__file__).resolve().parents[2]


def plugin_library_or_skip() -> Path:
    from pimoe_export.native.libraries import find_plugin_library

    try:
        return find_plugin_library()
    except PluginLoadError as exc:
        pytest.skip(f"plugin library not built (no nvcc?): {exc}")


@pytest.fixture(scope="module")
def lean():
    from pimoe_export.native import tensorrt_loader as T

    path = plugin_library_or_skip()
    try:
        trt = T.import_tensorrt("lean")
    except BackendUnavailableError as exc:
        pytest.skip(str(exc))
    logger = T.CaptureLogger(trt)
    registry = trt.get_plugin_registry()
    T.load_plugin_library(trt, path, registry=registry, logger=logger)
    return trt, registry


# ------------------------------------------------------------------------------------------ the library file
def test_library_exports_entry_points_and_needs_no_tensorrt() -> None:
    from pimoe_export.native.libraries import check_plugin_library

    path = plugin_library_or_skip()
    info = check_plugin_library(str(path))
    assert info["contract_version"] == schema.CONTRACT_VERSION
    assert info["tensorrt_header_version"] >= 100000  # built against TensorRT 10+ headers
    if shutil.which("readelf") is None:
        pytest.skip("readelf not installed")
    dynamic = subprocess.run(["readelf", "-dW", str(path)], capture_output=True, text=True, check=True).stdout
    needed = [line.split("[")[1].rstrip("]") for line in dynamic.splitlines() if "(NEEDED)" in line]
    assert not [n for n in needed if "nvinfer" in n or "tensorrt" in n or "cudart" in n], needed
    symbols = subprocess.run(["readelf", "--dyn-syms", "-W", str(path)], capture_output=True, text=True,
                             check=True).stdout
    exported = {line.split()[-1] for line in symbols.splitlines() if " GLOBAL " in line and " UND " not in line}
    assert {"getCreators", "setLoggerFinder"} <= exported
    assert not [s for s in exported if s.startswith("cuda")], "the static CUDA runtime must stay private"


@pytest.mark.parametrize("arch", (ROOT / "plugins" / "cmake" / "cuda_architectures.txt").read_text().strip().split(";"))
def test_library_holds_code_for_every_target_architecture(arch) -> None:
    path = plugin_library_or_skip()
    cache = ROOT / "build" / "plugins" / "CMakeCache.txt"
    if cache.is_file() and path.resolve().is_relative_to((ROOT / "build" / "plugins").resolve()):
        archs = [line.split("=", 1)[1] for line in cache.read_text().splitlines()
                 if line.startswith("CMAKE_CUDA_ARCHITECTURES:")]
        if archs and arch not in archs[0].replace("-real", "").replace("-virtual", "").split(";"):
            pytest.skip(f"build configured for {archs[0]}")
    # the fatbinary names every SASS target (sm_XX) it embeds
    assert f"sm_{arch}".encode() in path.read_bytes()


# ------------------------------------------------------------------------------------------ lean runtime
FIELD_TYPE_OF_KIND = {"int": "INT32", "ints": "INT32", "float": "FLOAT32", "floats": "FLOAT32", "string": "CHAR"}


@pytest.mark.trt
@pytest.mark.parametrize("op", list(schema.SCHEMAS))
def test_creator_registered_with_contract_fields(lean, op) -> None:
    _, registry = lean
    creator = registry.get_creator(op, schema.PLUGIN_VERSION, schema.PLUGIN_NAMESPACE)
    assert creator is not None, f"{op} not registered"
    assert type(creator).__name__ == "IPluginCreatorV3One"
    assert creator.name == op and creator.plugin_version == "1" and creator.plugin_namespace == ""
    declared = {f.name: f.type.name for f in creator.field_names}
    expected = {a.name: FIELD_TYPE_OF_KIND[a.kind] for a in schema.SCHEMAS[op].attributes}
    assert declared == expected


def field_collection(trt, fields: list[tuple[str, np.ndarray, object]]) -> object:
    """A PluginFieldCollection of (name, array, PluginFieldType) that keeps its arrays alive: trt.PluginField keeps
    only the address of its buffer, so an array freed after the field is made leaves the plugin reading freed
    memory."""
    class Fields(trt.PluginFieldCollection):
        pass

    collection = Fields([trt.PluginField(name, data, kind) for name, data, kind in fields])
    collection.arrays = [data for _, data, _ in fields]
    return collection


def contract_fields(trt, op: str, **values) -> object:
    """A field collection for `op`: every attribute of the contract (defaults unless given), typed as the ONNX
    parser delivers them. A value of None leaves the field out."""
    fields = []
    for attr in schema.SCHEMAS[op].attributes:
        value = values.get(attr.name, attr.default)
        if value is None:
            continue
        if attr.kind in ("int", "ints"):
            data, kind = np.atleast_1d(np.asarray(value, dtype=np.int32)), trt.PluginFieldType.INT32
        elif attr.kind in ("float", "floats"):
            data, kind = np.atleast_1d(np.asarray(value, dtype=np.float32)), trt.PluginFieldType.FLOAT32
        else:
            data, kind = np.frombuffer(str(value).encode() + b"\0", dtype=np.int8).copy(), trt.PluginFieldType.CHAR
        fields.append((attr.name, data, kind))
    return field_collection(trt, fields)


@pytest.mark.trt
def test_field_collections_keep_their_values(lean) -> None:
    """The helper above: the values a creator reads are the ones given, after the arrays' other owners are gone and
    the memory has been reused."""
    trt, _ = lean
    fields = contract_fields(trt, schema.ROUTE, k=3, routed_scaling_factor=2.5)
    gc.collect()
    reuse = [np.full(1, -1, np.int32) for _ in range(20000)]  # the same size as the fields: reuses their memory
    read = {f.name: np.asarray(f.data).copy() for f in fields}
    assert len(reuse) == 20000 and read["k"].view(np.int32)[0] == 3
    assert read["routed_scaling_factor"].view(np.float32)[0] == 2.5


VALID = [
    (schema.ROUTE, {"k": 1}),
    (schema.ROUTE, {"k": 16, "normalize": 1}),
    (schema.DISPATCH, {"num_experts": 1}),
    (schema.DISPATCH, {"num_experts": 1024}),
    (schema.COMBINE, {}),
    *[(schema.EXPERT_MLP, {"expert_ids": [0, 7], "widths": [512, 2048, 512], "activation": act})
      for act in schema.ACTIVATIONS],
    (schema.EXPERT_MLP, {"expert_ids": [3], "widths": [16, 8, 8, 16], "layer_norm": 0, "eps": 1e-6}),
    # int8 (W8A8): static scales per (layer, expert), layer-major; dynamic per-row scales need none
    (schema.EXPERT_MLP, {"expert_ids": [0, 7], "widths": [512, 2048, 512], "quant_mode": "w8a8",
                         "act_scales": [0.01, 0.02, 0.03, 0.04]}),
    (schema.EXPERT_MLP, {"expert_ids": [2], "widths": [4096, 14336, 4096], "layer_norm": 0,
                         "quant_mode": "w8a8_dynamic"}),
    (schema.EXPERT_MLP, {"expert_ids": [0], "widths": [131072, 8], "quant_mode": "w8a8", "act_scales": [1.0]}),
    # contract v2
    *[(schema.ROUTE, {"k": 2, "scoring": scoring}) for scoring in schema.SCORING],
    (schema.ROUTE, {"k": 8, "normalize": 1, "scoring": "sigmoid", "num_groups": 8, "groups_kept": 4,
                    "group_score": "sum_top2", "routed_scaling_factor": 2.5, "normalize_eps": 1e-20}),
    (schema.COMBINE, {"order": "expert"}),
    *[(schema.EXPERT_MLP, {"expert_ids": [0, 7], "widths": [4096, 14336, 4096], "layer_norm": 0, "gated": 1,
                           "bias": 0, "activation": act}) for act in schema.ALL_ACTIVATIONS],
    (schema.EXPERT_MLP, {"expert_ids": [0], "widths": [2880, 2880, 2880], "layer_norm": 0, "gated": 1,
                         "activation": "swiglu_oai", "alpha": 1.702, "limit": 7.0, "quant_mode": "w8a8",
                         "act_scales": [0.1, 0.2]}),
]


@pytest.mark.trt
@pytest.mark.parametrize(("op", "values"), VALID, ids=lambda v: str(v))
def test_creator_builds_plugin_from_contract_fields(lean, op, values) -> None:
    trt, registry = lean
    creator = registry.get_creator(op, "1", "")
    for phase in (trt.TensorRTPhase.BUILD, trt.TensorRTPhase.RUNTIME):
        plugin = creator.create_plugin("node", contract_fields(trt, op, **values), phase)
        assert plugin is not None, f"{op} rejected valid fields {values}"
        core = plugin.get_capability_interface(trt.PluginCapabilityType.CORE)
        assert (core.plugin_name, core.plugin_version, core.plugin_namespace) == (op, "1", "")
        build = plugin.get_capability_interface(trt.PluginCapabilityType.BUILD)
        assert build.num_outputs == len(schema.SCHEMAS[op].outputs)


@pytest.mark.trt
def test_int64_fields_are_accepted(lean) -> None:
    trt, registry = lean
    fields = field_collection(trt, [("k", np.array([2], np.int64), trt.PluginFieldType.INT64)])
    assert registry.get_creator(schema.ROUTE, "1", "").create_plugin("n", fields, trt.TensorRTPhase.BUILD) is not None


BAD = [
    (schema.ROUTE, {"k": None}),  # required field missing
    (schema.ROUTE, {"k": 0}),
    (schema.ROUTE, {"k": 17}),
    (schema.ROUTE, {"k": 2, "normalize": 2}),
    (schema.ROUTE, {"k": 2, "scoring": "sparsemax"}),
    (schema.DISPATCH, {"num_experts": None}),
    (schema.DISPATCH, {"num_experts": 0}),
    (schema.DISPATCH, {"num_experts": 1025}),
    (schema.EXPERT_MLP, {"expert_ids": None, "widths": [8, 8]}),
    (schema.EXPERT_MLP, {"expert_ids": [1, 1], "widths": [8, 8]}),
    (schema.EXPERT_MLP, {"expert_ids": [-1], "widths": [8, 8]}),
    (schema.EXPERT_MLP, {"expert_ids": [0], "widths": [8]}),
    (schema.EXPERT_MLP, {"expert_ids": [0], "widths": [8, 0]}),
    (schema.EXPERT_MLP, {"expert_ids": [0], "widths": [8] * 10}),
    (schema.EXPERT_MLP, {"expert_ids": [0], "widths": [8, 8], "activation": "swish"}),
    (schema.EXPERT_MLP, {"expert_ids": [0], "widths": [8, 8], "eps": 0.0}),
    (schema.EXPERT_MLP, {"expert_ids": [0], "widths": [8, 8], "layer_norm": 3}),
    (schema.EXPERT_MLP, {"expert_ids": [0], "widths": [8, 8], "quant_mode": "int4"}),
    # w8a8: act_scales must hold layers x G positive finite values; int32 accumulation bounds the input width
    (schema.EXPERT_MLP, {"expert_ids": [0], "widths": [8, 8], "quant_mode": "w8a8"}),
    (schema.EXPERT_MLP, {"expert_ids": [0, 1], "widths": [8, 8, 8], "quant_mode": "w8a8", "act_scales": [0.1] * 3}),
    (schema.EXPERT_MLP, {"expert_ids": [0], "widths": [8, 8], "quant_mode": "w8a8", "act_scales": [0.0]}),
    (schema.EXPERT_MLP, {"expert_ids": [0], "widths": [8, 8], "quant_mode": "w8a8", "act_scales": [float("nan")]}),
    (schema.EXPERT_MLP, {"expert_ids": [0], "widths": [131073, 8], "quant_mode": "w8a8_dynamic"}),
    (schema.EXPERT_MLP, {"expert_ids": [0], "widths": [8, 8], "quant_mode": "W8A8", "act_scales": [0.1]}),
    # contract v2
    (schema.ROUTE, {"k": 2, "num_groups": 0}),
    (schema.ROUTE, {"k": 2, "num_groups": 2, "groups_kept": 3}),
    (schema.ROUTE, {"k": 2, "num_groups": 2, "groups_kept": 1, "scoring": "softmax_topk"}),
    (schema.ROUTE, {"k": 2, "group_score": "mean"}),
    (schema.ROUTE, {"k": 2, "routed_scaling_factor": 0.0}),
    (schema.ROUTE, {"k": 2, "routed_scaling_factor": float("inf")}),
    (schema.ROUTE, {"k": 2, "normalize_eps": -1e-20}),
    (schema.COMBINE, {"order": "token"}),
    (schema.EXPERT_MLP, {"expert_ids": [0], "widths": [8, 8, 8], "gated": 1}),  # gated with LayerNorm
    (schema.EXPERT_MLP, {"expert_ids": [0], "widths": [8, 8], "layer_norm": 0, "gated": 1}),  # no hidden layer
    (schema.EXPERT_MLP, {"expert_ids": [0], "widths": [8, 8, 8], "layer_norm": 0, "activation": "swiglu_oai"}),
    (schema.EXPERT_MLP, {"expert_ids": [0], "widths": [8, 8, 8], "layer_norm": 0, "gated": 2}),
    (schema.EXPERT_MLP, {"expert_ids": [0], "widths": [8, 8, 8], "layer_norm": 0, "bias": -1}),
    (schema.EXPERT_MLP, {"expert_ids": [0], "widths": [8, 8, 8], "layer_norm": 0, "gated": 1,
                         "activation": "swiglu_oai", "limit": 0.0}),
    (schema.EXPERT_MLP, {"expert_ids": [0], "widths": [8, 8, 8], "layer_norm": 0, "gated": 1,
                         "activation": "swiglu_oai", "alpha": float("nan")}),
]


@pytest.mark.trt
@pytest.mark.parametrize(("op", "values"), BAD, ids=lambda v: str(v))
def test_creator_rejects_bad_fields(lean, op, values) -> None:
    trt, registry = lean
    plugin = registry.get_creator(op, "1", "").create_plugin("node", contract_fields(trt, op, **values),
                                                              trt.TensorRTPhase.BUILD)
    assert plugin is None


@pytest.mark.trt
def test_creator_rejects_fields_of_the_wrong_type(lean) -> None:
    trt, registry = lean
    creator = registry.get_creator(schema.ROUTE, "1", "")
    as_float = field_collection(trt, [("k", np.array([2.0], np.float32), trt.PluginFieldType.FLOAT32)])
    two_values = field_collection(trt, [("k", np.array([2, 3], np.int32), trt.PluginFieldType.INT32)])
    scoring_int = field_collection(trt, [("k", np.array([2], np.int32), trt.PluginFieldType.INT32),
                                         ("scoring", np.array([1], np.int32), trt.PluginFieldType.INT32)])
    for fields in (as_float, two_values, scoring_int):
        assert creator.create_plugin("n", fields, trt.TensorRTPhase.BUILD) is None


# ------------------------------------------------------------------------------------------ python helpers
def test_tensorrt_helpers_never_import_torch() -> None:
    code = ("import sys, pimoe_export.native.tensorrt_loader as t, pimoe_export.native.libraries as l; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_missing_plugin_library_is_a_plugin_load_error(monkeypatch, tmp_path) -> None:
    from pimoe_export.native import libraries as L

    monkeypatch.setenv(L.PLUGIN_LIBRARY_ENV, str(tmp_path / "missing.so"))
    with pytest.raises(PluginLoadError, match="PIMOE_TRT_PLUGINS"):
        L.find_plugin_library()


def test_foreign_library_is_a_plugin_load_error() -> None:
    from pimoe_export.native.libraries import check_plugin_library
    from pimoe_export.runtime.ort import find_ort_library

    with pytest.raises(PluginLoadError, match="not a pimoe TensorRT plugin library"):
        check_plugin_library(str(find_ort_library()))


def test_missing_tensorrt_module_is_backend_unavailable(monkeypatch) -> None:
    from pimoe_export.native import tensorrt_loader as T

    monkeypatch.setitem(T.FLAVOURS, "rtx", ("pimoe_no_such_tensorrt_module", "a pip requirement"))
    with pytest.raises(BackendUnavailableError, match="pip requirement"):
        T.import_tensorrt("rtx")
    with pytest.raises(ValueError, match="unknown TensorRT flavour"):
        T.import_tensorrt("trt12")


def test_plugin_configs_match_the_contract() -> None:
    from pimoe_export.ops import plugin_configs as module

    for op in schema.SCHEMAS.values():
        path = module.config_path(op.name)
        assert path.read_text() == module.render(op), f"run python -m pimoe_export.ops.codegen ({path})"


@pytest.mark.parametrize("op", [*schema.SCHEMAS, "PiMoECombine-v1"])
def test_plugin_configs_read_back_as_the_contract(op) -> None:
    """Read as YAML (what TensorRT OSS's tooling does with such files), each config names the contract's tensors,
    attributes and required attributes; an op without attributes (Combine as contract v1 had it) says so with
    empty lists rather than leaving the keys out."""
    import dataclasses

    yaml = pytest.importorskip("yaml")
    from pimoe_export.ops import plugin_configs as module

    spec = (dataclasses.replace(schema.SCHEMAS[schema.COMBINE], attributes=()) if op == "PiMoECombine-v1"
            else schema.SCHEMAS[op])
    data = yaml.safe_load(module.render(spec))
    assert data["name"] == spec.name and data["interface"] == "IPluginV3"
    version = data["versions"][schema.PLUGIN_VERSION]
    assert version["namespace"] == schema.PLUGIN_NAMESPACE
    assert version["inputs"] == [t.name for t in spec.inputs] and version["outputs"] == [t.name for t in spec.outputs]
    assert version["attributes"] == [a.name for a in spec.attributes]
    assert version["attributes_required"] == [a.name for a in spec.attributes if a.default is None]
    assert set(version.get("attribute_types", {})) == {a.name for a in spec.attributes}
