"""What the importer takes from a Hugging Face config besides the MoE block's shape: the special tokens generation
needs (generation_config.json over config.json), DeepSeek-V2's expert biases (mlp_bias), the default calibration
of a decoder (seeded random token ids, seed 0, and the description the INT8 metadata records), and the messages of
two refusals (DBRX's p-norm, a pickle checkpoint's conversion command naming the directory). Each against the
files written here or Hugging Face's own forward pass."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pimoe_export.errors import PiMoEInputError
from pimoe_export.hf import decoder as D

transformers = pytest.importorskip("transformers")


def _copy(tiny_decoder, family: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_decoder(family), tmp_path / family))


def test_special_tokens_come_from_generation_config_then_config(tiny_decoder, tmp_path) -> None:
    directory = _copy(tiny_decoder, "mixtral", tmp_path)
    (directory / "generation_config.json").write_text(json.dumps({"bos_token_id": 5, "eos_token_id": [2, 7],
                                                                  "pad_token_id": 3}))
    spec = D.load_decoder(directory).spec
    assert spec is not None
    assert (spec.bos_token_id, spec.eos_token_ids, spec.pad_token_id) == (5, (2, 7), 3)
    (directory / "generation_config.json").unlink()
    config = json.loads((directory / "config.json").read_text())
    config.update(bos_token_id=None, eos_token_id=4, pad_token_id=None)
    (directory / "config.json").write_text(json.dumps(config))
    spec = D.load_decoder(directory).spec
    assert spec is not None
    assert (spec.bos_token_id, spec.eos_token_ids, spec.pad_token_id) == (None, (4,), 0)


def test_deepseek_v2_expert_biases_are_imported(tmp_path) -> None:
    """DeepSeek-V2 with mlp_bias: every expert Linear has a bias (random here: Hugging Face initialises them to 0,
    which would hide a dropped bias); the imported model computes Hugging Face's logits."""
    from tiny_decoders import tiny_config

    config = tiny_config("deepseek_v2")
    config.mlp_bias, config.num_experts_per_tok = True, 4
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        theirs = transformers.AutoModelForCausalLM.from_config(config).eval()
        with torch.no_grad():
            for name, module in theirs.named_modules():
                if isinstance(module, torch.nn.Linear) and module.bias is not None and "mlp" in name:
                    module.bias.normal_(0.0, 0.5)
    theirs.save_pretrained(str(tmp_path / "m"), safe_serialization=True)
    ours = D.load_decoder(tmp_path / "m")
    from pimoe_export.model.source import moe_layers

    blocks = list(moe_layers(ours).values())
    assert blocks and all(b.config.experts.bias and b.config.shared is not None and b.config.shared.bias
                          for b in blocks)
    feed = D.random_decoder_feeds(int(config.vocab_size), 3, ((2, 9, "left"),))[0]
    with torch.no_grad():
        want = theirs(**{k: torch.from_numpy(v) for k, v in feed.items()}).logits.numpy()
        got = ours(**{k: torch.from_numpy(v) for k, v in feed.items()})
    got = (got["logits"] if isinstance(got, dict) else got.logits).numpy()
    valid = feed["attention_mask"].astype(bool)
    assert np.linalg.norm(got[valid] - want[valid]) / np.linalg.norm(want[valid]) <= 1e-6


def test_a_decoders_default_calibration_is_seed_0_and_says_so(tiny_decoder) -> None:
    from pimoe_export.hf.importers import decoder_source

    directory = tiny_decoder("qwen3_moe")
    source = decoder_source(directory)
    spec = D.load_decoder(directory).spec
    calibration = source.calibration()
    described = ("seeded random token ids: calibration right- and left-padded, checks with no, right "
                 "and left padding (no text given)")
    assert calibration.description == described
    want = D.random_decoder_feeds(int(spec.vocab_size), 0, D.CALIBRATION_SHAPES, spec)
    assert len(calibration.feeds) == len(want)
    for got, ref in zip(calibration.feeds, want, strict=True):
        assert set(got) == set(ref) and all(np.array_equal(got[k], ref[k]) for k in ref)


def _padding(mask: np.ndarray) -> str:
    """The padding of a batch read off its attention mask: "none" (every row full), "right" (every row's tokens
    first, its zeros after), "left" (zeros first); each row keeps a token."""
    rows = [(int(row.sum()), row.tolist()) for row in mask]
    assert all(valid >= 1 for valid, _ in rows)
    if all(valid == mask.shape[1] for valid, _ in rows):
        return "none"
    if all(row == [1] * valid + [0] * (mask.shape[1] - valid) for valid, row in rows):
        return "right"
    assert all(row == [0] * (mask.shape[1] - valid) + [1] * valid for valid, row in rows), mask
    return "left"


def test_a_decoders_default_calibration_is_4096_tokens_right_and_left_padded(tiny_decoder) -> None:
    """docs/models.md: "Without `--calib` the calibration is 4096 seeded random token ids (eight batches of 8 × 64,
    right- and left-padded in turn, each with one unpadded row)" (decoder.py: 512 tokens gave twice the W8A8 error
    of 4096). The padding of each batch is read off its attention mask."""
    from pimoe_export.hf.importers import decoder_source

    feeds = decoder_source(tiny_decoder("qwen3_moe")).calibration().feeds
    assert sum(f["input_ids"].size for f in feeds) == 4096
    assert [f["input_ids"].shape for f in feeds] == [(8, 64)] * 8
    assert all(f["attention_mask"].shape == (8, 64) for f in feeds)
    assert [_padding(f["attention_mask"]) for f in feeds] == ["right", "left"] * 4
    assert [int((f["attention_mask"].sum(axis=1) == 64).sum()) for f in feeds] == [1] * 8


@pytest.mark.parametrize("lines", [1, 4])
def test_a_decoder_calibration_text_needs_a_held_out_line(tiny_decoder, tmp_path, lines) -> None:
    """Every fifth line is held out for the check: with fewer than 5 lines nothing would be, and the importer says
    so before it tokenises anything (4 lines would calibrate, 0 check)."""
    from pimoe_export.hf.importers import decoder_source

    text = tmp_path / "t.txt"
    text.write_text("".join(f"line {i}\n" for i in range(lines)))
    with pytest.raises(PiMoEInputError) as info:
        decoder_source(tiny_decoder("qwen3_moe"), text)
    assert str(info.value) == f"{text}: at least 5 lines are needed (4 of 5 calibrate, 1 of 5 is held out)"


def test_a_decoder_calibrates_on_4_of_5_text_lines_and_checks_on_the_fifth(tiny_decoder, tmp_path,
                                                                          monkeypatch) -> None:
    """docs/models.md: "4 of 5 lines calibrate through the model's tokenizer, the fifth is held out for the check".
    With 12 lines, lines 4 and 9 (0-based) are held out; the other ten calibrate, in order. Both go through the
    tokenizer with the model's DecoderSpec (an empty past), and each ends up where its role says."""
    from pimoe_export.hf.importers import decoder_source

    directory = tiny_decoder("mixtral")
    lines = [f"sentence number {i}" for i in range(12)]
    text = tmp_path / "t.txt"
    text.write_text("".join(f"{line}\n" for line in lines))
    calls: list[tuple[list[str], object]] = []

    def record(given_directory, given_lines, spec=None) -> list[dict[str, np.ndarray]]:
        calls.append((list(given_lines), spec))
        marker = np.full((1, 2), len(calls), np.int64)  # 1: the first call's feed, 2: the second's
        return [D.decoder_feed(marker, np.ones((1, 2), np.int64), spec)]

    monkeypatch.setattr(D, "text_decoder_feeds", record)
    source = decoder_source(directory, text)
    spec = D.load_decoder(directory).spec
    assert spec is not None
    calibrated = [lines[i] for i in (0, 1, 2, 3, 5, 6, 7, 8, 10, 11)]  # written out: every fifth line left out
    assert [given for given, _ in calls] == [calibrated, [lines[4], lines[9]]]
    assert all(given_spec == spec for _, given_spec in calls)
    calibration = source.calibration()
    assert [f["input_ids"].tolist() for f in calibration.feeds] == [[[1, 1]]]
    assert source.evaluation is not None and [f["input_ids"].tolist() for f in source.evaluation] == [[[2, 2]]]
    assert calibration.description == f"10 + 2 lines of {text}"
    assert source.describe()["data"] == f"10 + 2 lines of {text}"


def test_the_hugging_face_config_reader_names_its_fix(tmp_path) -> None:
    """Read directly (the API, not through the importers' dispatch), a config.json that is not JSON, or not an
    object, is refused with the path and what to do."""
    from pimoe_export.errors import ArtifactError
    from pimoe_export.hf.weights import read_config

    (tmp_path / "config.json").write_text("{")
    with pytest.raises(ArtifactError) as info:
        read_config(tmp_path)
    assert str(info.value).startswith(f"{tmp_path / 'config.json'} is not valid JSON (")
    assert str(info.value).endswith("); the Hugging Face config is corrupt, re-download the model")
    (tmp_path / "config.json").write_text("[1]")
    with pytest.raises(PiMoEInputError) as refused:
        read_config(tmp_path)
    assert str(refused.value) == f"{tmp_path / 'config.json'} is not a JSON object"
    (tmp_path / "config.json").unlink()
    with pytest.raises(PiMoEInputError, match=r"has no config\.json: not a Hugging Face model directory"):
        read_config(tmp_path)


def test_dbrx_p_norm_refusal_reads_in_full() -> None:
    from pimoe_export.hf.families import _dbrx_refuse

    config = transformers.DbrxConfig(ffn_config={"moe_normalize_expert_weights": 2.0})
    assert _dbrx_refuse(config) == ("DBRX with ffn_config.moe_normalize_expert_weights=2.0: the k weights divided "
                                    "by their 2.0-norm is outside the op contract (it renormalises by the sum: p = 1)")


def test_a_pickle_checkpoints_conversion_command_names_its_directory(tmp_path) -> None:
    from pimoe_export.hf.weights import _refuse_pickle

    directory = tmp_path / "my model"
    directory.mkdir()
    (directory / "pytorch_model.bin").write_bytes(b"not opened")
    with pytest.raises(PiMoEInputError) as info:
        _refuse_pickle(directory)
    message = str(info.value)
    assert f"M.from_pretrained('{directory}', dtype='auto').save_pretrained('{directory}-safetensors', " \
           "safe_serialization=True)" in message
    assert message.startswith(f"{directory} holds its weights as pickle (pytorch_model.bin)")


def test_deepseek_v3_multi_token_prediction_layer_is_left_out_and_nothing_else(tiny_decoder, tmp_path) -> None:
    """DeepSeek-V3 checkpoints carry a multi-token-prediction layer at index num_hidden_layers, outside the forward
    pass: its tensors are ignored (the model computes the same logits as without them). The same tensors at the
    last real layer's index are not the model's: refused."""
    from safetensors.torch import load_file, save_file

    source = tiny_decoder("deepseek_v3")
    layers = int(json.loads((source / "config.json").read_text())["num_hidden_layers"])
    state = load_file(str(source / "model.safetensors"))
    last = f"model.layers.{layers - 1}."

    def with_extra(index: int) -> tuple[Path, list[str]]:
        directory = Path(shutil.copytree(source, tmp_path / f"mtp-{index}"))
        extra = {f"model.layers.{index}.{n[len(last):]}": t.clone() for n, t in state.items() if n.startswith(last)}
        extra |= {f"model.layers.{index}.eh_proj.weight": torch.ones(4, 8),
                  f"model.layers.{index}.enorm.weight": torch.ones(4)}
        save_file({**state, **extra}, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return directory, sorted(extra)

    mtp, added = with_extra(layers)
    planned = D.plan(mtp)
    with D.SafetensorsCheckpoint(mtp) as checkpoint:
        assert sorted(D.check_checkpoint(planned, checkpoint).ignored) == added
    feed = D.random_decoder_feeds(int(json.loads((source / "config.json").read_text())["vocab_size"]), 3,
                                  ((2, 7, "left"),))[0]
    torch_feed = {k: torch.from_numpy(v) for k, v in feed.items()}
    with torch.no_grad():
        got, want = (D.load_decoder(d, cache=False)(**torch_feed) for d in (mtp, source))
    got, want = ((o["logits"] if isinstance(o, dict) else o.logits) for o in (got, want))
    assert torch.equal(got, want)
    inside, _ = with_extra(layers - 1)
    with pytest.raises(PiMoEInputError, match=r"unexpected \['model\.layers\.1\.eh_proj\.weight'"):
        D.check_directory(inside)
