"""Reading Hugging Face MoE checkpoints: bf16/fp16/fp32 weights, sharded with an index or not, give the model
Hugging Face itself loads, exactly; everything is checked before any weight is allocated; the checkpoint is read
tensor by tensor, so conversion peaks near one float32 copy of the weights (measured in a fresh process)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from pimoe_export.errors import PiMoEInputError
from pimoe_export.hf import decoder as D
from pimoe_export.interface import MODEL_LOGITS_OUTPUT
from pimoe_export.model.moe_block import MoEBlock

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[2]


def _logits(model, feed) -> np.ndarray:
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in feed.items()})
    return (out[MODEL_LOGITS_OUTPUT] if isinstance(out, dict) else out.logits).numpy()


@pytest.mark.parametrize(("family", "dtype", "shard"), [("qwen2_moe", torch.bfloat16, "60KB"),
                                                        ("gpt_oss", torch.float16, None),
                                                        ("deepseek_v3", torch.bfloat16, "40KB")])
def test_bf16_fp16_and_sharded_checkpoints_load_as_hugging_face_loads_them(family, dtype, shard,
                                                                            tiny_decoder) -> None:
    directory = tiny_decoder(family, dtype=dtype, shard=shard)
    assert (directory / "model.safetensors.index.json").is_file() == bool(shard)
    ours = D.load_decoder(directory)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    for name, tensor in theirs.state_dict().items():  # every weight not in a block is Hugging Face's, exactly
        if name in ours.state_dict():
            assert torch.equal(ours.state_dict()[name], tensor), name
    feed = D.random_decoder_feeds(int(theirs.config.vocab_size), 3, ((2, 9, "left"),))[0]
    want, got = _logits(theirs, feed), _logits(ours, feed)
    valid = feed["attention_mask"].astype(bool)
    assert np.linalg.norm(got[valid] - want[valid]) / np.linalg.norm(want[valid]) <= 1e-6


def test_dense_layers_stay_hugging_face_modules(tiny_decoder) -> None:
    """DeepSeek's first_k_dense_replace, Qwen2-MoE's mlp_only_layers, Llama 4's interleave step: layer 0 of each
    tiny model is dense and keeps Hugging Face's MLP; layer 1 is a MoE block."""
    for family, attr in (("deepseek_v3", "mlp"), ("qwen2_moe", "mlp"), ("llama4_text", "feed_forward")):
        model = D.load_decoder(tiny_decoder(family))
        layers = model.model.layers
        assert not isinstance(getattr(layers[0], attr), MoEBlock), family
        assert isinstance(getattr(layers[1], attr), MoEBlock), family


def test_everything_is_checked_before_anything_is_allocated(tiny_decoder, monkeypatch) -> None:
    """check_directory (what every command runs before writing) reads config.json and the safetensors headers only:
    it passes with block construction and tensor reads disabled, and refuses a wrong checkpoint the same way."""
    def refuse(*args, **kwargs):
        raise AssertionError("allocated during the check")

    monkeypatch.setattr(MoEBlock, "__init__", refuse)
    monkeypatch.setattr(D.SafetensorsCheckpoint, "tensor", refuse)
    D.check_directory(tiny_decoder("mixtral"))


def _meminfo(monkeypatch, available_kb: int) -> None:
    """/proc/meminfo as the decoder module reads it: this much available (in kB, the file's unit) and far more in
    total (what the host has, not what it can give)."""
    import builtins
    import io

    text = f"MemTotal:       {available_kb * 1000 + 10**9} kB\nMemFree:        {available_kb // 2} kB\n" \
           f"MemAvailable:   {available_kb} kB\n"

    def fake_open(file, *args, **kwargs):
        return io.StringIO(text) if str(file) == "/proc/meminfo" else builtins.open(file, *args, **kwargs)

    monkeypatch.setattr(D, "open", fake_open, raising=False)


def test_a_model_larger_than_the_available_memory_is_refused_before_anything_is_allocated(
        tiny_decoder, tmp_path, monkeypatch, capsys) -> None:
    """docs/models.md: "a model whose float32 weights exceed the host's available memory is refused before anything
    is allocated" (exit code 2, nothing written); PIMOE_IGNORE_MEMORY=1 lets it through. The limit is written out
    here: 4 bytes for every weight of the checkpoint's tensors, against MemAvailable's kB."""
    from pimoe_export.cli import main

    directory = tiny_decoder("mixtral")
    planned = D.plan(directory)
    weights = 4 * sum(int(np.prod(shape)) for shape in planned.expected.values())
    monkeypatch.delenv("PIMOE_IGNORE_MEMORY", raising=False)
    _meminfo(monkeypatch, weights // 1024 - 1)
    for check in (lambda: D.check_memory(planned, directory), lambda: D.check_directory(directory)):
        with pytest.raises(PiMoEInputError) as info:
            check()
        assert str(info.value).startswith(f"{directory}: its weights take ")
        assert "in float32, more than the" in str(info.value) and "GiB this host has available" in str(info.value)

    def refuse(*args, **kwargs):
        raise AssertionError("allocated before the memory check")

    monkeypatch.setattr(MoEBlock, "__init__", refuse)
    out = tmp_path / "out"
    assert main(["export", str(directory), "-o", str(out / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "more than the" in err[0] and "available" in err[0], err
    assert not out.exists()
    monkeypatch.setenv("PIMOE_IGNORE_MEMORY", "1")
    D.check_directory(directory)
    monkeypatch.delenv("PIMOE_IGNORE_MEMORY")
    _meminfo(monkeypatch, weights // 1024 + 1)
    D.check_memory(planned, directory)
    D.check_directory(directory)


def test_an_incomplete_checkpoint_names_the_missing_tensors(tiny_decoder, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    source = tiny_decoder("olmoe")
    target = tmp_path / "olmoe"
    target.mkdir()
    (target / "config.json").write_text((source / "config.json").read_text())
    state = load_file(str(source / "model.safetensors"))
    del state["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(PiMoEInputError, match=r"missing \['model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight'\]"):
        D.check_directory(target)


def test_tied_embeddings_without_an_lm_head_tensor_load_tied(tiny_decoder, tmp_path) -> None:
    """tie_word_embeddings: Hugging Face saves no lm_head.weight and ties the head to the embedding. Such a
    checkpoint passes the check and loads with the head equal to the embedding: its logits are those of the same
    model untied, with lm_head.weight stored as a copy of the embedding."""
    from safetensors.torch import load_file, save_file

    source = tiny_decoder("mixtral")
    config = json.loads((source / "config.json").read_text())
    state = load_file(str(source / "model.safetensors"))
    embedding = state["model.embed_tokens.weight"]
    directories = {}
    for tied in (True, False):
        directory = tmp_path / f"tied-{tied}"
        directory.mkdir()
        (directory / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": tied}))
        weights = {k: v for k, v in state.items() if k != "lm_head.weight"}
        if not tied:
            weights["lm_head.weight"] = embedding.clone()
        save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
        directories[tied] = directory
    D.check_directory(directories[True])
    feed = D.random_decoder_feeds(int(config["vocab_size"]), 3, ((2, 7, "left"),))[0]
    torch_feed = {k: torch.from_numpy(v) for k, v in feed.items()}
    with torch.no_grad():
        tied_model = D.load_decoder(directories[True], cache=False)
        got, want = (m(**torch_feed) for m in (tied_model, D.load_decoder(directories[False], cache=False)))
    assert torch.equal(tied_model.lm_head.weight, embedding)
    got, want = ((o["logits"] if isinstance(o, dict) else o.logits) for o in (got, want))
    assert torch.equal(got, want)


def test_a_truncated_safetensors_file_is_refused_by_its_header_check(tiny_decoder, tmp_path) -> None:
    """A safetensors file cut short (an interrupted download) is refused when its header is read, before any
    tensor: the tensor whose bytes run past the end of the data is named."""
    import shutil

    directory = Path(shutil.copytree(tiny_decoder("mixtral"), tmp_path / "cut"))
    weights = directory / "model.safetensors"
    data = weights.read_bytes()  # the format: an 8-byte little-endian header length, the JSON header, the data
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    weights.write_bytes(data[:-4])
    with pytest.raises(PiMoEInputError, match=rf"is not a valid safetensors file: tensor '{re.escape(last)}' has a "
                                              r"malformed entry"):
        D.SafetensorsCheckpoint(directory)
    with pytest.raises(PiMoEInputError, match="is not a valid safetensors file"):
        D.check_directory(directory)


def test_a_safetensors_header_length_out_of_bounds_is_refused_before_it_is_read(tiny_decoder, tmp_path) -> None:
    """docs/models.md: "safetensors headers are parsed and range-checked first". The format's first 8 bytes give the
    JSON header's length (little-endian): a length past the file's end (2**40), one too short for any JSON object
    (1: "{}" takes 2), and one past the 100 MiB cap on a file that really is that long (a sparse file: no disk) are
    each refused naming the length, before the header is read."""
    import shutil

    directory = Path(shutil.copytree(tiny_decoder("mixtral"), tmp_path / "bad"))
    weights = directory / "model.safetensors"
    data = weights.read_bytes()
    for length in (2**40, 1):
        weights.write_bytes(length.to_bytes(8, "little") + data[8:])
        with pytest.raises(PiMoEInputError, match=re.escape(f"is not a valid safetensors file (header length "
                                                            f"{length}); re-download the checkpoint")):
            D.SafetensorsCheckpoint(directory)
    huge = (100 << 20) + 1
    with open(weights, "wb") as handle:
        handle.write(huge.to_bytes(8, "little"))
        handle.truncate(8 + huge + (1 << 20))  # the header would fit in the file: only the cap refuses it
    with pytest.raises(PiMoEInputError, match=re.escape(f"(header length {huge})")):
        D.SafetensorsCheckpoint(directory)


MEASURE = textwrap.dedent("""
    import json, sys
    from pimoe_export.hf.decoder import load_decoder

    def status(key):
        return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024

    load_decoder(sys.argv[2])  # a tiny model of the family first: imports and one-time set-up, not weights
    open("/proc/self/clear_refs", "w").write("5")  # resets the peak resident size to the current one
    before = status("VmRSS:")
    model = load_decoder(sys.argv[1])
    weights = sum(t.numel() * t.element_size() for t in {id(t): t for t in model.state_dict().values()}.values())
    print(json.dumps({"peak_increase": status("VmHWM:") - before, "weights": weights}))
""")


@pytest.mark.slow
def test_conversion_peaks_near_one_float32_copy_of_the_weights(tmp_path, tiny_decoder) -> None:
    """A synthetic Mixtral checkpoint of ~330 MB of float32 weights stored as bf16 (half that on disk): reading it
    (bf16 -> fp32, experts stacked into blocks) raises the process's peak resident size by at most 1.25 times the
    model's float32 weights plus 64 MiB (one copy plus one tensor in flight, not the 1.5 copies of loading bf16 then
    converting). The process first loads the tiny Mixtral, so that lazy imports and one-time set-up (~110 MiB here,
    whatever the model's size) are not counted as conversion."""
    config = transformers.MixtralConfig(vocab_size=1000, hidden_size=512, intermediate_size=1792, num_hidden_layers=4,
                                        num_attention_heads=8, num_key_value_heads=4, num_local_experts=8,
                                        num_experts_per_tok=2)
    transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(
        str(tmp_path / "mixtral"), safe_serialization=True)
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak resident size")
    run = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / "mixtral"), str(tiny_decoder("mixtral"))],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    measured = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"\nconversion: peak +{measured['peak_increase'] / 2**20:.0f} MiB for {measured['weights'] / 2**20:.0f} "
          "MiB of float32 weights")
    assert measured["peak_increase"] <= 1.25 * measured["weights"] + 64 * 2**20, measured
