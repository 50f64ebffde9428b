"""Every Hugging Face MoE family through the CLI a user runs: `pimoe-export pipeline --model DIR` on a tiny random
model built from a transformers config and saved as safetensors (tests/hf/tiny_decoders.py, no download).

Against the Hugging Face forward itself (transformers' own model loaded from the same directory, fp32, eager
attention), on padded batches (left and right padding, none): the fp32 ONNX the pipeline wrote, run in ONNX Runtime,
gives the same logits at every valid position (rel. L2 <= 1e-5) and selects the same top-k experts at every MoE layer
(its routing outputs against the experts Hugging Face's routers pick). The pipeline builds the TensorRT-RTX fp32 and
INT8 engines (when TensorRT-RTX is installed), and its INT8 report states each MoE layer's routing agreement and
output error. Every family gets decoder units (the KV cache in and out, its DecoderSpec in the manifest, a
genai_config.json where GenAI can describe the cache: DeepSeek-V2/V3's multi-head latent attention caches keys and
values of different head dims, which GenAI's one head_size cannot, and the manifest says so).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_hf_families import hf_selection
from tiny_decoders import TINY

from pimoe_export.artifacts.manifest import read_manifest
from pimoe_export.cli import main
from pimoe_export.hf.decoder import random_decoder_feeds
from pimoe_export.hf.families import BY_MODEL_TYPE
from pimoe_export.interface import LAYER_EXPERT_IDS, MODEL_LOGITS_OUTPUT, MODEL_MASK_INPUT, decoder_interface

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

REL_L2 = 1e-5
#: the families whose keys and values have different head dims (multi-head latent attention)
MLA = ("deepseek_v2", "deepseek_v3")
#: padded batches the comparison runs on (independent of the pipeline's own held-out feeds)
SHAPES = ((2, 9, "left"), (3, 7, "right"), (1, 6, "none"))
MEASURED: dict[str, dict] = {}  # family -> what test_fp32_onnx_matches_hugging_face measured (printed at the end)


@pytest.fixture(scope="module", params=list(TINY))
def pipeline(request, tiny_decoder, tmp_path_factory):
    directory = tiny_decoder(request.param)
    out = tmp_path_factory.mktemp(f"pipeline-{request.param}") / "out"
    code = main(["pipeline", "--model", str(directory), "-o", str(out), "--bench-repeats", "1", "--quiet"])
    return request.param, directory, out, code, json.loads((out / "pipeline.json").read_text())


def _steps(summary: dict) -> dict[str, dict]:
    return {s["name"]: s for s in summary["steps"]}


def test_the_pipeline_passes_and_builds_fp32_and_int8_engines(pipeline) -> None:
    _, _, out, code, summary = pipeline
    steps = _steps(summary)
    assert code == 0 and summary["passed"], {n: s.get("reason") for n, s in steps.items() if s["status"] != "done"}
    assert all(s["status"] == "done" for n, s in steps.items() if n != "engines"), steps
    if steps["engines"]["status"] == "skipped":
        pytest.skip(f"engines not built here: {steps['engines']['reason']}")
    engines = steps["engines"]["detail"]
    assert set(engines) == {"trt-rtx-fp32", "trt-rtx-int8"}, engines
    for unit in engines.values():  # TensorRT's parser made our plugins of every pimoe node
        assert set(unit["plugin_layers"]) == {"PiMoERoute", "PiMoEDispatch", "PiMoEExpertMLP", "PiMoECombine"}
    assert (out / "trt-rtx-int8" / "model.engine").stat().st_size > 0


def _hf_routing(model, family: str) -> tuple[dict, list]:
    """Forward pre-hooks on Hugging Face's sparse-MoE blocks recording the experts its routers pick."""
    kinds = BY_MODEL_TYPE[family].block_classes
    picked: dict[str, torch.Tensor] = {}

    def hook_for(path):
        def hook(block, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            picked[path] = hf_selection(family, block, hidden)
        return hook

    handles = [m.register_forward_pre_hook(hook_for(path), with_kwargs=True)
               for path, m in model.named_modules() if type(m).__name__ in kinds]
    return picked, handles


def test_fp32_onnx_matches_hugging_face(pipeline) -> None:
    from pimoe_export.runtime.ort import create_session

    family, directory, out, code, _ = pipeline
    assert code == 0
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32,
                                                                  attn_implementation="eager").eval()
    picked, handles = _hf_routing(reference, family)
    session = create_session(out / "model.onnx")
    names = [o.name for o in session.get_outputs()]
    worst, layers, tokens = 0.0, set(), 0
    spec = read_manifest(out / "ort-fp32").decoder_spec  # prompt steps: an empty past
    for feed in random_decoder_feeds(int(reference.config.vocab_size), 7, SHAPES, spec):
        with torch.no_grad():
            want = reference(**{k: torch.from_numpy(feed[k]) for k in ("input_ids", MODEL_MASK_INPUT,
                                                                         "position_ids")}).logits.numpy()
        got = dict(zip(names, session.run(None, feed), strict=True))
        valid = feed[MODEL_MASK_INPUT].astype(bool)
        rel = float(np.linalg.norm(got[MODEL_LOGITS_OUTPUT][valid] - want[valid]) / np.linalg.norm(want[valid]))
        worst = max(worst, rel)
        for path, hf_mask in picked.items():
            ids = got[f"{path}/{LAYER_EXPERT_IDS}"].reshape(-1, got[f"{path}/{LAYER_EXPERT_IDS}"].shape[-1])
            ours = np.zeros(hf_mask.shape, bool)
            np.put_along_axis(ours, ids.astype(np.int64), True, axis=1)
            flat_valid = valid.reshape(-1)
            assert np.array_equal(ours[flat_valid], hf_mask.numpy()[flat_valid]), \
                f"{family} {path}: other experts than Hugging Face's for {feed['input_ids'].shape}"
            layers.add(path)
        tokens += int(valid.sum())
    for handle in handles:
        handle.remove()
    assert layers and len(layers) == len([n for n in names if n.endswith("/" + LAYER_EXPERT_IDS)]), (layers, names)
    assert worst <= REL_L2, f"{family}: logits rel. L2 {worst:.3g} against Hugging Face"
    MEASURED[family] = {"rel_l2": worst, "moe_layers": sorted(layers), "tokens": tokens, "routing_agreement": 1.0}
    print(f"\n{family}: logits rel. L2 {worst:.2e} vs Hugging Face over {tokens} valid tokens; same experts at "
          f"{len(layers)} MoE layer(s)")


def test_the_int8_report_states_each_layer_routing_and_error(pipeline) -> None:
    _, _, out, code, _ = pipeline
    assert code == 0
    report = json.loads((out / "report_int8" / "report.json").read_text())
    outputs = [o[0] for o in json.loads((out / "ort-int8" / "manifest.json").read_text())["io"]["outputs"]]
    moe = sorted(n[: -len(LAYER_EXPERT_IDS) - 1] for n in outputs if n.endswith("/" + LAYER_EXPERT_IDS))
    assert moe and sorted(report["routing_by_layer"]) == moe, report["routing_by_layer"]
    assert all(0.0 <= v <= 1.0 for v in report["routing_by_layer"].values())
    assert sorted(report["layer_output_error"]) == moe
    for path, error in report["layer_output_error"].items():
        assert 0.0 < error["rel_l2"] < 0.2 and error["tokens"] > 0, (path, error)  # W8A8: not exact, not broken
    text = (out / "report_int8" / "report.md").read_text()
    assert "Routing agreement by MoE layer" in text and "W8A8 output error by MoE layer" in text
    assert report["outputs"][MODEL_LOGITS_OUTPUT]["rel_l2"] > 0
    print(f"\n{pipeline[0]} INT8: logits rel. L2 {report['outputs'][MODEL_LOGITS_OUTPUT]['rel_l2']:.3f}; per MoE "
          f"layer W8A8 rel. L2 {[round(e['rel_l2'], 4) for e in report['layer_output_error'].values()]}, routing "
          f"agreement {[round(v, 4) for v in report['routing_by_layer'].values()]}")


def test_the_units_are_decoder_units(pipeline) -> None:
    """fp32 and INT8 units with the KV-cache I/O, the DecoderSpec in their manifests and a genai_config.json (the
    tiny models have no tokenizer: none is shipped); DeepSeek's: values of their own head dim, no genai_config.json
    (the manifest says why)."""
    family, directory, out, code, summary = pipeline
    assert code == 0
    kv_cache = _steps(summary)["model"]["detail"]["kv_cache"]
    for unit in ("ort-fp32", "ort-int8"):
        manifest = read_manifest(out / unit)
        # the model directory's config files, as its clients read them (the graphs themselves are written elsewhere)
        for name in ("config.json", "generation_config.json"):
            assert (out / unit / name).read_bytes() == (directory / name).read_bytes(), (unit, name)
        spec = manifest.decoder_spec
        assert spec is not None and spec.to_dict() == kv_cache and spec.model_type == family
        assert "notes" not in _steps(summary)["model"]
        assert spec.eos_token_ids == (2,) and spec.num_layers == 2 and spec.vocab_size == 96
        standard = decoder_interface(spec)
        assert manifest.interface.input_names == standard.input_names
        assert manifest.interface.output_names[: len(standard.output_names)] == standard.output_names
        named = {t.name: t for t in (*manifest.interface.inputs, *manifest.interface.outputs)}
        assert [named[t.name] for t in (*standard.inputs, *standard.outputs)] == [*standard.inputs, *standard.outputs]
        if family in MLA:  # keys of qk_nope 8 + qk_rope 8, values of v_head_dim 8 (tests/hf/tiny_decoders.py)
            assert (spec.head_dim, spec.value_head_dim) == (16, 8)
            assert not (out / unit / "genai_config.json").exists()
            assert "one head_size" in manifest.build_options["genai_config"]
            continue
        assert spec.value_head_dim == spec.head_dim and "genai_config" not in manifest.build_options
        genai = json.loads((out / unit / "genai_config.json").read_text())["model"]["decoder"]
        assert (genai["num_key_value_heads"], genai["head_size"]) == (spec.num_kv_heads, spec.head_dim)
        assert not (out / unit / "tokenizer.json").exists()


def test_the_pipeline_record_names_the_family(pipeline) -> None:
    family, directory, _, _, summary = pipeline
    detail = _steps(summary)["model"]["detail"]
    assert detail["model_type"] == family and detail["architecture"] == BY_MODEL_TYPE[family].name
    assert Path(detail["model_dir"]) == directory
