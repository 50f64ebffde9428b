"""Shared fixtures and helpers for the test-suite."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
#: the test helpers (tests/oracle.py, backends.py, op_graphs.py) and the test modules of every folder importable by
#: their names from any folder (test file names are unique across folders)
sys.path[:0] = [str(TESTS), *(str(p) for p in sorted(TESTS.iterdir()) if p.is_dir() and any(p.glob("test_*.py")))]

# hypothesis profile: CI runs the stated example counts, deterministic derandomised search
try:
    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "ci", derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
    )
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # pragma: no cover
    pass


@pytest.fixture(autouse=True)
def _deterministic_torch():
    import torch

    torch.manual_seed(0)
    yield


# ------------------------------------------------------------------------------------------ shared tiny artefacts
@pytest.fixture(scope="session")
def exported_layer(tmp_path_factory):
    """Tiny exported PiMoE layers, each built once per session: ``exported_layer(preset, seed, precision)`` ->
    (model, ONNX path). Tests may read both but change neither (copy the model first)."""
    from pimoe_export.export.exporter import export_onnx
    from pimoe_export.model.factory import create_from_preset

    cache: dict[tuple[str, int, str], tuple[object, Path]] = {}

    def get(preset: str = "tiny", seed: int = 0, precision: str = "fp32") -> tuple[object, Path]:
        key = (preset, seed, precision)
        if key not in cache:
            model = create_from_preset(preset, seed=seed).eval()
            path = tmp_path_factory.mktemp(f"{preset}-seed{seed}-{precision}") / "model.onnx"
            export_onnx(model, path, precision=precision)
            cache[key] = (model, path)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A tiny BERT (2 layers, H=32) with a tokenizer, saved as a Hugging Face model directory (safetensors, randomly
    initialised from a transformers config: no download), and ``sentences.txt`` (80 lines of its words) next to it.
    Skips without the hf extra."""
    transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")
    import numpy as np
    import torch

    words = [f"w{i}" for i in range(60)]
    root = tmp_path_factory.mktemp("bert")
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(vocab))
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(words) + 5, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=128)
    model = transformers.BertModel(config).eval()
    directory = root / "tiny-bert"
    model.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))
    rng = np.random.default_rng(0)
    text = root / "sentences.txt"
    text.write_text("\n".join(" ".join(rng.choice(words, rng.integers(3, 20))) for _ in range(80)) + "\n")
    return directory


# PIMOE_TESTS_NO_EXPORT=1 (scripts/gpu_check.sh sets it for the GPU tests): any ONNX export (torch.onnx.export, the
# exporter's only entry) raises, in every fixture and test, so a GPU run never depends on the exporter of the GPU
# machine (its torch / onnx-ir versions differ from the ones the exporter is developed on). The dry run of
# gpu_check.sh runs the same test selection with it, which proves the selection export-free.
if os.environ.get("PIMOE_TESTS_NO_EXPORT") == "1":
    import torch.onnx

    def _refuse_export(*args, **kwargs):
        raise RuntimeError("PIMOE_TESTS_NO_EXPORT=1: this test exports ONNX, which the GPU check must not depend on "
                           "(compute what it needs in memory, as tests/emu/test_gpu_layer.py does)")

    torch.onnx.export = _refuse_export


# ------------------------------------------------------------------------------------------ decoder units
@pytest.fixture(scope="session")
def decoder_cases(tmp_path_factory):
    """Each decoder family's tiny model and fp32 unit (tests/decoders.py: the importer's export with the KV cache),
    built once per session: ``decoder_cases(family)``. Skips without the hf extra."""
    pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")
    from decoders import FAMILIES

    cache: dict = {}

    def get(family: str):
        if family not in cache:
            cache[family] = FAMILIES[family](tmp_path_factory.mktemp(f"decoder-{family}"))
        return cache[family]

    return get


@pytest.fixture(scope="session")
def tiny_decoder(tmp_path_factory):
    """Tiny random Hugging Face MoE decoders (tests/hf/tiny_decoders.py), each saved once per session:
    ``tiny_decoder(family, dtype=None, shard=None)`` -> the model directory. Tests may read it, never change it.
    Skips without the hf extra."""
    pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")
    from tiny_decoders import save_tiny

    cache: dict[tuple[str, str, str], Path] = {}

    def get(family: str, dtype=None, shard: str | None = None) -> Path:
        key = (family, str(dtype), str(shard))
        if key not in cache:
            directory = tmp_path_factory.mktemp(f"hf-{family}") / family
            cache[key] = save_tiny(family, directory, dtype=dtype, shard_bytes=shard)
        return cache[key]

    return get


def _decoder_families() -> list[str]:
    from decoders import FAMILIES

    return sorted(FAMILIES)


@pytest.fixture(params=_decoder_families())
def decoder_case(request, decoder_cases):
    """The tiny decoder of every family (tests run once per family)."""
    return decoder_cases(request.param)


def pytest_report_header(config) -> list[str]:
    """Say which CPU kernel sets the ONNX Runtime op tests run here (tests/cpu_kernel_sets.py): native or SIMDe."""
    from cpu_kernel_sets import DESCRIPTION, default_kernel_set, other_kernel_sets

    own = default_kernel_set()
    others = ", ".join(DESCRIPTION[s] for s in other_kernel_sets()) or "none"
    return [f"pimoe CPU kernels: {DESCRIPTION.get(own, own)} in this process; in subprocesses: {others}"]
