"""The client files of a decoder unit (what tokenizers, optimum and ONNX Runtime GenAI read beside the graph): each
copied from the model directory under its role, hashed in the manifest, and a genai_config.json that names the
unit's own graph and op library. The clients themselves run in test_llm_clients.py (slow)."""

from __future__ import annotations

import json

import pytest

from pimoe_export._files import sha256_file
from pimoe_export.artifacts.manifest import CLIENT_FILES, read_manifest


@pytest.fixture(scope="module")
def case(decoder_cases):
    from decoders import FAMILIES

    return decoder_cases(next(iter(FAMILIES)))


def test_the_client_files_are_the_model_directorys_under_their_roles(case) -> None:
    manifest = read_manifest(case.unit)
    by_role = {a.role: a for a in manifest.artifacts}
    copied = [role for role, name in CLIENT_FILES.items() if role != "genai_config" and (case.hf_dir / name).is_file()]
    assert "tokenizer" in copied and "hf_config" in copied
    for role in copied:
        artifact = by_role[role]
        assert artifact.file == CLIENT_FILES[role]
        assert (case.unit / artifact.file).read_bytes() == (case.hf_dir / CLIENT_FILES[role]).read_bytes()
        assert artifact.sha256 == sha256_file(case.hf_dir / CLIENT_FILES[role])
    assert by_role["genai_config"].file == "genai_config.json"
    assert by_role["genai_config"].sha256 == sha256_file(case.unit / "genai_config.json")


def test_genai_config_names_the_units_own_graph_and_op_library(case) -> None:
    manifest = read_manifest(case.unit)
    files = {a.role: a.file for a in manifest.artifacts}
    model = json.loads((case.unit / "genai_config.json").read_text())["model"]
    decoder = model["decoder"]
    assert decoder["filename"] == files["onnx"] and (case.unit / decoder["filename"]).is_file()
    library = decoder["session_options"]["custom_ops_library"]
    assert library == files["ort_library"] and (case.unit / library).is_file()


def test_an_engine_unit_refuses_a_missing_client_directory_before_building(case, tmp_path) -> None:
    """``build_unit(client_dir=...)`` names a client directory that is not there, before the (long) engine build
    and before anything is written (the engine builds themselves: test_trt_rtx_decoder.py, slow)."""
    from pimoe_export.build.units import build_unit
    from pimoe_export.errors import ArtifactError, BackendUnavailableError, PluginLoadError
    from pimoe_export.native.libraries import find_plugin_library
    from pimoe_export.native.tensorrt_loader import import_tensorrt

    try:
        find_plugin_library()
        import_tensorrt("rtx")
    except (PluginLoadError, BackendUnavailableError) as exc:
        pytest.skip(f"no TensorRT-RTX builder or plugin library here: {exc}")
    missing = tmp_path / "no-such-model-dir"
    with pytest.raises(ArtifactError, match=f"^{missing} is not a directory \\(the tokenizer and config files"):
        build_unit(case.unit / "model.onnx", tmp_path / "engine", client_dir=missing)
    assert not (tmp_path / "engine").exists() or not any((tmp_path / "engine").iterdir())


def test_a_decoder_engine_is_built_with_the_prefill_and_decode_profiles_of_the_options(case, tmp_path,
                                                                                       monkeypatch) -> None:
    """build_unit around a stand-in engine builder (the real builds: test_trt_rtx_decoder.py, slow): the builder gets
    the two profiles of decoder_profiles for the options' largest batch and prompt (here below the context length,
    so a prompt bound taken from anywhere else shows), and the manifest records the same."""
    import types

    from pimoe_export.build import engine_builder
    from pimoe_export.build.units import BuildOptions, build_unit
    from pimoe_export.errors import PluginLoadError
    from pimoe_export.interface import Profile, decoder_profiles
    from pimoe_export.native import libraries, tensorrt_loader

    try:
        libraries.check_plugin_library(str(libraries.find_plugin_library()))
    except PluginLoadError as exc:
        pytest.skip(f"the TensorRT plugin library is not built: {exc}")
    seen: dict = {}

    def build_engine(onnx_path, plugin, profile, capabilities, *, strongly_typed, flavour, configure, profiles):
        seen.update(profile=profile, profiles=profiles)
        return b"plan", types.SimpleNamespace(plugin_counts=lambda: {"PiMoERoute": 1}, num_layers=7)

    monkeypatch.setattr(tensorrt_loader, "import_tensorrt", lambda f: types.SimpleNamespace(__version__="1.7"))
    monkeypatch.setattr(engine_builder, "build_engine", build_engine)
    monkeypatch.setattr(engine_builder, "compute_capability", lambda trt, name: (8, 9))
    spec = read_manifest(case.unit).decoder_spec
    assert spec is not None and spec.context_length > 100
    options = BuildOptions(flavour="rtx", compute_capabilities=("SM89",), profile=Profile((1, 1), (1, 32), (3, 100)))
    manifest = build_unit(case.unit / "model.onnx", tmp_path / "engine", options=options, client_dir=case.hf_dir)
    want = decoder_profiles(spec, max_batch=3, max_prompt=100)
    assert seen["profile"] is None and seen["profiles"] == [p.shapes for p in want]
    assert manifest.shape_profiles == list(want)
    assert want[0].shapes["input_ids"] == ((1, 1), (1, 100), (3, 100))  # prefill: up to 3 prompts of 100 tokens
