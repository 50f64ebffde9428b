"""MoEfication of a Hugging Face BERT encoder (tiny, randomly initialised from a transformers config: no download)
and the whole-model pipeline on it: one ONNX with pimoe ops at every layer, INT8, units, engines, reports."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pimoe_export.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=1200, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.fixture(scope="module")
def bert(tiny_bert) -> Path:
    """A tiny BERT with a tokenizer, saved as a Hugging Face model directory (conftest: built once per session)."""
    return tiny_bert


def test_moefication_with_every_expert_selected_is_the_dense_ffn(bert) -> None:
    """k = E: the chosen parts sum to the whole FFN (combine weights 1/k to ~1e-3): the dense model's output."""
    from pimoe_export.hf.feeds import random_feeds
    from pimoe_export.hf.moefy import MoefySettings, moefy

    dense = transformers.AutoModel.from_pretrained(str(bert), local_files_only=True).eval()
    feeds = [{k: torch.from_numpy(v) for k, v in f.items()} for f in random_feeds(dense.config.vocab_size, 0)]
    test = {k: torch.from_numpy(v) for k, v in random_feeds(dense.config.vocab_size, 9, ((3, 17),))[0].items()}
    with torch.no_grad():
        ref = dense(**test).last_hidden_state
    for k, bound in ((4, 1e-3), (2, 0.5)):
        moe, layers = moefy(copy.deepcopy(dense), feeds, MoefySettings(experts=4, top_k=k))
        assert sorted(layers) == ["encoder.layer.0", "encoder.layer.1"]
        with torch.no_grad():
            got = moe(**test).last_hidden_state
        err = float((got - ref).abs().max() / ref.abs().max())
        assert err <= bound, (k, err)
        if k == 4:
            assert err > 0  # it really runs the MoE


def test_noisy_top_k_without_noise_is_the_plain_layer_and_eval_ignores_the_noise(bert) -> None:
    """The distillation path (noisy top-k, hand-written dispatch) with a vanishing noise selects what the layer's
    own routing selects and computes the same output; in eval mode the noise setting has no effect."""
    from pimoe_export.hf.feeds import random_feeds
    from pimoe_export.hf.moefy import MoEFeedForward, MoefySettings, moefy

    dense = transformers.AutoModel.from_pretrained(str(bert), local_files_only=True).eval()
    feeds = [{k: torch.from_numpy(v) for k, v in f.items()} for f in random_feeds(dense.config.vocab_size, 0)]
    _, layers = moefy(dense, feeds, MoefySettings(experts=4, top_k=2))
    ffn = MoEFeedForward(layers["encoder.layer.0"]).eval()
    x = torch.randn(3, 11, dense.config.hidden_size)
    with torch.no_grad():
        plain = ffn(x)
        ffn.routing_noise = 1.0
        assert torch.equal(ffn(x), plain)  # eval mode: the plain PiMoE layer whatever the noise
        ffn.train()
        ffn.routing_noise = 1e-12
        assert torch.allclose(ffn(x), plain, rtol=1e-5, atol=1e-6 * float(plain.abs().max()))
        ffn.routing_noise = 3.0
        assert not torch.allclose(ffn(x), plain, rtol=1e-3, atol=1e-3 * float(plain.abs().max()))


def test_whole_model_distillation_brings_the_moe_closer_to_the_original(bert, tmp_path) -> None:
    """--finetune-epochs: the report's held-out embedding cosine vs the original improves on the undistilled MoE,
    the loss falls, and only expert weights changed (embeddings, attention and routers are the undistilled ones)."""
    from safetensors.torch import load_file

    text = bert.parent / "sentences.txt"
    for name, epochs in (("plain", "0"), ("distilled", "6")):
        result = cli("moefy", str(bert), "-o", name, "--experts", "4", "--top-k", "2", "--calib", str(text),
                     "--finetune-epochs", epochs, "--routing-noise", "1.0", cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "distilled" / "moefy_report.json").read_text())
    before = report["moe_vs_original_held_out_before_distillation"]
    after = report["moe_vs_original_held_out"]
    assert report["settings"]["finetune_epochs"] == 6 and report["settings"]["routing_noise"] == 1.0
    assert after["sentences"] == 16 and before["sentences"] == 16  # every fifth of the 80 lines is held out
    assert after["token_state_rel_l2"] < before["token_state_rel_l2"]
    assert after["embedding_cosine_mean"] > before["embedding_cosine_mean"]
    losses = report["distillation_loss_per_epoch"]
    assert len(losses) == 6 and losses[-1] < losses[0]
    plain = json.loads((tmp_path / "plain" / "moefy_report.json").read_text())
    assert plain["moe_vs_original_held_out"] == before and plain["distillation_loss_per_epoch"] == []
    a, b = load_file(str(tmp_path / "plain" / "model.safetensors")), load_file(str(tmp_path / "distilled" /
                                                                                 "model.safetensors"))
    changed = sorted(k for k in a if not torch.equal(a[k], b[k]))
    assert changed and all(".moe.experts." in k for k in changed), changed


def test_moefy_command_saves_a_model_that_reloads_bit_exactly(bert, tmp_path) -> None:
    from pimoe_export.hf.checkpoint import load_moefied

    text = bert.parent / "sentences.txt"
    result = cli("moefy", str(bert), "-o", "moe", "--experts", "4", "--top-k", "2", "--calib", str(text),
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[-1])["pimoe_layers"] == ["encoder.layer.0", "encoder.layer.1"]
    a, b = load_moefied(tmp_path / "moe"), load_moefied(tmp_path / "moe")
    feed = {"input_ids": torch.tensor([[2, 7, 9, 3]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    with torch.no_grad():
        assert torch.equal(a(**feed).last_hidden_state, b(**feed).last_hidden_state)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "config.json").write_text("the user's own")
    refused = cli("moefy", str(bert), "-o", "mine", cwd=tmp_path)
    assert refused.returncode == 2 and "--force" in refused.stderr  # a file it did not write is left alone
    assert (tmp_path / "mine" / "config.json").read_text() == "the user's own"


def test_export_command_takes_a_moefied_directory(bert, tmp_path) -> None:
    assert cli("moefy", str(bert), "-o", "moe", "--experts", "4", cwd=tmp_path).returncode == 0
    result = cli("export", "moe", "-o", "moe.onnx", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    names = [o.name for o in onnx.load(str(tmp_path / "moe.onnx")).graph.output]
    assert names[:2] == ["last_hidden_state", "pooler_output"] and len(names) == 6
    refused = cli("export", "moe", "-o", "std.onnx", "--standard-ops", cwd=tmp_path)
    assert refused.returncode == 2 and "drop --standard-ops" in refused.stderr


def test_a_moefied_checkpoint_whose_tensors_do_not_fit_is_refused(bert, tmp_path) -> None:
    """A tensor missing, one too many, or one of another shape: the loader refuses the directory as bad input (exit
    2, the file and the fix named), never as an internal error, and nothing is written."""
    from safetensors.torch import load_file, save_file

    assert cli("moefy", str(bert), "-o", "moe", "--experts", "4", cwd=tmp_path).returncode == 0
    state = load_file(str(tmp_path / "moe" / "model.safetensors"))
    name = next(n for n in state if ".moe.experts." in n)
    edits = {"missing": lambda s: s.pop(name), "extra": lambda s: s.update(extra=torch.zeros(2)),
             "shape": lambda s: s.update({name: torch.zeros(3, 3)})}
    for case, edit in edits.items():
        directory = Path(shutil.copytree(tmp_path / "moe", tmp_path / case))
        edited = dict(state)
        edit(edited)
        save_file(edited, str(directory / "model.safetensors"), metadata={"format": "pt"})
        result = cli("export", case, "-o", f"{case}.onnx", cwd=tmp_path)
        assert result.returncode == 2, (case, result.stderr[-2000:])
        assert f"{case}/model.safetensors does not hold the weights of the model pimoe_moefy.json describes" in \
            result.stderr and "re-create it with `pimoe-export moefy`" in result.stderr, (case, result.stderr)
        assert not (tmp_path / f"{case}.onnx").exists()


@pytest.mark.slow
def test_whole_model_pipeline(bert, tmp_path) -> None:
    text = bert.parent / "sentences.txt"
    assert cli("moefy", str(bert), "-o", "moe", "--experts", "4", "--top-k", "2", "--calib", str(text),
               cwd=tmp_path).returncode == 0
    result = cli("pipeline", "--model", "moe", "-o", "out", "--calib", str(text), "--quiet", "--int8-mode",
                 "w8a8_dynamic", cwd=tmp_path)
    out = tmp_path / "out"
    record = json.loads((out / "pipeline.json").read_text())
    assert result.returncode == 0 and record["passed"], (result.stderr[-3000:], record)
    proto = onnx.load(str(out / "model.onnx"))
    assert [n.op_type for n in proto.graph.node if n.domain == "pimoe"].count("PiMoERoute") == 2
    assert [i.name for i in proto.graph.input] == ["input_ids", "attention_mask"]
    steps = {s["name"]: s for s in record["steps"]}
    assert {"ort-fp32", "ort-int8"} <= set(steps["units"]["detail"])
    check = steps["check"]["detail"]
    fp32, int8 = check["report"], check["report_int8"]
    assert fp32["passed"] and fp32["output"]["rel_l2"] <= 1e-5
    assert fp32["routing_by_layer"] == {"encoder.layer.0.intermediate.moe": 1.0,
                                        "encoder.layer.1.intermediate.moe": 1.0}
    # the non-default INT8 mode reached the graph, the unit and the check
    assert int8["precision"] == "w8a8_dynamic" and steps["int8"]["detail"]["mode"] == "w8a8_dynamic"
    assert json.loads((out / "ort-int8" / "manifest.json").read_text())["precision"] == "w8a8_dynamic"
    assert set(int8["routing_by_layer"]) == set(fp32["routing_by_layer"])
    # sentence-embedding parity on the held-out lines (every fifth of 80): fp32 to rounding, INT8 reported
    assert fp32["embedding"]["sequences"] == 16 and fp32["embedding"]["mean_cosine"] >= 0.999999
    assert int8["embedding"]["sequences"] == 16 and int8["embedding"]["required_mean_cosine"] == 0.999
    if steps["engines"]["status"] == "done":  # TensorRT-RTX wheels present (CI): whole-model engines built
        assert {"trt-rtx-fp32", "trt-rtx-int8"} <= set(steps["engines"]["detail"])
