"""Hugging Face in and out, in this process: text through the tokenizer and the 4:1 calibration/held-out split, the
MoEfied checkpoint (what it records, what it refuses), the importers that turn a directory into a model source, and
the moefy command's own arguments. The tiny BERT comes from tests/conftest.py (randomly initialised, no download)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")

from pimoe_export.errors import PiMoEInputError  # noqa: E402
from pimoe_export.hf import importers  # noqa: E402
from pimoe_export.hf.checkpoint import MANIFEST, is_moefied, load_moefied, save_moefied  # noqa: E402
from pimoe_export.hf.feeds import model_feeds, random_feeds, read_lines, text_feeds  # noqa: E402


@pytest.fixture(scope="module")
def moefied(tiny_bert, tmp_path_factory) -> Path:
    """tiny BERT MoEfied in this process (4 experts, k = 2) and saved."""
    from pimoe_export.hf.moefy import MoefySettings, moefy

    model = transformers.AutoModel.from_pretrained(str(tiny_bert), local_files_only=True).eval()
    feeds = [{k: torch.from_numpy(v) for k, v in f.items()} for f in random_feeds(model.config.vocab_size, 0)]
    model, _ = moefy(model, feeds, MoefySettings(experts=4, top_k=2, router_epochs=20))
    return save_moefied(model, tmp_path_factory.mktemp("moefied") / "moe", source_dir=tiny_bert)


# ------------------------------------------------------------------------------------------ text
def test_lines_of_a_text_file(tmp_path) -> None:
    path = tmp_path / "t.txt"
    path.write_text("  first line \n\n\t\nsecond\n", encoding="utf-8")
    assert read_lines(path) == ["first line", "second"]
    path.write_text("\n  \n")
    with pytest.raises(PiMoEInputError, match=r"has no non-empty line"):
        read_lines(path)
    path.write_bytes(b"\xff\xfe bad")
    with pytest.raises(PiMoEInputError, match=r"cannot read text file .*pass a UTF-8 file with one text per line"):
        read_lines(path)
    with pytest.raises(PiMoEInputError, match=r"cannot read text file"):
        read_lines(tmp_path / "missing.txt")


def test_random_feeds_are_seeded_right_padded_ids() -> None:
    feeds = random_feeds(50, 3, ((4, 9), (2, 5)))
    assert [f["input_ids"].shape for f in feeds] == [(4, 9), (2, 5)]
    for f in feeds:
        ids, mask = f["input_ids"], f["attention_mask"]
        assert ids.dtype == np.int64 and mask.dtype == np.int64 and ids.min() >= 0 and ids.max() < 50
        for row in mask:
            valid = int(row.sum())
            assert valid >= 1 and row[:valid].all() and not row[valid:].any()  # right padding, one token at least
    again = random_feeds(50, 3, ((4, 9), (2, 5)))
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(feeds, again, strict=True) for k in a)
    assert not np.array_equal(random_feeds(50, 4, ((4, 9),))[0]["input_ids"], feeds[0]["input_ids"])
    assert len(random_feeds(50, 0)) == 8 and random_feeds(50, 0)[0]["input_ids"].shape == (8, 32)


def test_text_through_the_models_tokenizer(tiny_bert) -> None:
    lines = [f"w{i} w{i + 1} w{i + 2}" for i in range(20)] + ["w1"]
    feeds = text_feeds(tiny_bert, lines, batch=16)
    assert [f["input_ids"].shape[0] for f in feeds] == [16, 5]
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tiny_bert), local_files_only=True)
    expected = tokenizer(lines[16:], padding=True, return_tensors="np")
    np.testing.assert_array_equal(feeds[1]["input_ids"], expected["input_ids"])
    np.testing.assert_array_equal(feeds[1]["attention_mask"], expected["attention_mask"])
    assert feeds[1]["attention_mask"][-1].sum() == 3  # [CLS] w1 [SEP], the rest padding
    long = text_feeds(tiny_bert, [" ".join(["w1"] * 300)], max_length=10)
    assert long[0]["input_ids"].shape == (1, 10)


def test_a_folder_without_a_tokenizer(tmp_path) -> None:
    with pytest.raises(PiMoEInputError, match=r"has no usable tokenizer .*copy the model's tokenizer files"):
        text_feeds(tmp_path, ["a"])


def test_every_fifth_line_is_held_out(tiny_bert, tmp_path) -> None:
    text = tmp_path / "t.txt"
    text.write_text("\n".join(f"w{i}" for i in range(12)) + "\n")
    calibration, held, description = model_feeds(tiny_bert, text, 65)
    assert description == f"10 + 2 lines of {text}"
    assert sum(f["input_ids"].shape[0] for f in calibration) == 10
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tiny_bert), local_files_only=True)
    held_ids = held[0]["input_ids"]
    assert [tokenizer.decode(row[row != 0], skip_special_tokens=True) for row in held_ids] == ["w4", "w9"]
    text.write_text("w1\nw2\nw3\nw4\n")
    with pytest.raises(PiMoEInputError, match="at least 5 lines are needed"):
        model_feeds(tiny_bert, text, 65)
    calibration, held, description = model_feeds(tiny_bert, None, 65, seed=7)
    assert description == "seeded random token ids (no text given)"
    assert [f["input_ids"].shape for f in held] == [(1, 5), (4, 24), (2, 64)]
    np.testing.assert_array_equal(calibration[0]["input_ids"], random_feeds(65, 7)[0]["input_ids"])
    np.testing.assert_array_equal(held[0]["input_ids"], random_feeds(65, 8, ((1, 5),))[0]["input_ids"])


# ------------------------------------------------------------------------------------------ checkpoint
def test_the_moefied_checkpoint_records_every_layer(moefied, tiny_bert) -> None:
    manifest = json.loads((moefied / MANIFEST).read_text())
    assert manifest["format"] == 1 and manifest["kind"] == "moefied-hf-encoder"
    assert manifest["architecture"] == "BertModel"
    assert sorted(manifest["layers"]) == ["encoder.layer.0", "encoder.layer.1"]
    assert manifest["layers"]["encoder.layer.0"]["num_experts"] == 4
    assert (moefied / "vocab.txt").read_text() == (tiny_bert / "vocab.txt").read_text()
    assert is_moefied(moefied) and not is_moefied(tiny_bert)
    a, b = load_moefied(moefied), load_moefied(moefied)
    assert not a.training
    feed = {"input_ids": torch.tensor([[2, 7, 9, 3]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    with torch.no_grad():
        assert torch.equal(a(**feed).last_hidden_state, b(**feed).last_hidden_state)


@pytest.mark.parametrize(("change", "fragment"), [
    (lambda d: (d / MANIFEST).write_text(json.dumps({"format": 2, "layers": {}})), "is not a format-1 pimoe moefy"),
    (lambda d: (d / MANIFEST).write_text(json.dumps({"format": 1, "layers": []})), "is not a format-1 pimoe moefy"),
    (lambda d: (d / MANIFEST).write_text("{"), "is not valid JSON"),
    (lambda d: (d / "model.safetensors").unlink(), "model.safetensors is missing; re-create the model with moefy"),
    (lambda d: (d / MANIFEST).write_text(json.dumps({"format": 1, "layers": {"encoder.layer.7": {"hidden_size": 32}}})),
     "names layer 'encoder.layer.7', which the model lacks"),
])
def test_a_damaged_moefied_checkpoint_is_refused(moefied, tmp_path, change, fragment) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(moefied, copy)
    change(copy)
    with pytest.raises(Exception, match=fragment) as info:
        load_moefied(copy)
    assert type(info.value).__name__ in ("PiMoEConfigError", "ArtifactError")


# ------------------------------------------------------------------------------------------ importers
def test_each_directory_gets_its_importer(moefied, exported_layer, tmp_path) -> None:
    model, _ = exported_layer("tiny", 0)
    model.save_pretrained(tmp_path / "layer")
    assert importers.importer_for(moefied) is importers.MOEFIED_ENCODER
    assert importers.importer_for(tmp_path / "layer") is importers.LAYER_CHECKPOINT
    assert importers.IMPORTERS[-1] is importers.LAYER_CHECKPOINT
    text = tmp_path / "t.txt"
    text.write_text("w1\n")
    importers.check_source(moefied, text)
    importers.check_source(tmp_path / "layer")
    with pytest.raises(PiMoEInputError, match=r"--calib applies to whole models"):
        importers.check_source(tmp_path / "layer", text)
    with pytest.raises(PiMoEInputError, match=r"has no non-empty line"):
        text.write_text("\n")
        importers.check_source(moefied, text)
    layer = importers.load_source(tmp_path / "layer")
    with torch.no_grad():
        x = torch.randn(1, 3, 16)
        assert torch.equal(layer.module(x), model(x))


def test_a_moefied_source_calibrates_on_text_and_checks_on_the_fifth_line(moefied, tmp_path) -> None:
    text = tmp_path / "t.txt"
    text.write_text("\n".join(f"w{i} w{i + 3}" for i in range(10)) + "\n")
    source = importers.load_source(moefied, text=text, seed=5)
    layers = ["encoder.layer.0.intermediate.moe", "encoder.layer.1.intermediate.moe"]
    assert source.describe() == {"architecture": "BertModel", "data": f"8 + 2 lines of {text}",
                                 "pimoe_layers": layers}
    assert sum(f["input_ids"].shape[0] for f in source.evaluation) == 2
    assert sum(f["input_ids"].shape[0] for f in source.calibration().feeds) == 8
    assert source.calibration().description == f"8 + 2 lines of {text}"  # what the reports say it calibrated on
    calibration = source.read_calibration(text, None)
    assert calibration.description == f"the lines of {text}"
    assert sum(f["input_ids"].shape[0] for f in calibration.feeds) == 10
    with pytest.raises(PiMoEInputError, match=r"is a text model: calibrate it with a text file .*not ndarray"):
        source.read_calibration(np.zeros((2, 4)), None)
    feed = source.random_feed(2, 7, 3)
    assert feed["input_ids"].shape == (2, 7) and feed["input_ids"].dtype == np.int64
    assert feed["attention_mask"].tolist() == [[1] * 7] * 2 and feed["input_ids"].max() < 65
    assert np.array_equal(feed["input_ids"], source.random_feed(2, 7, 3)["input_ids"])
    saved = source.save(tmp_path / "again")
    assert is_moefied(saved) and (saved / "vocab.txt").exists()


# ------------------------------------------------------------------------------------------ the moefy command
def test_the_moefy_command_in_this_process(tiny_bert, tmp_path, capsys) -> None:
    from pimoe_export.cli import main

    text = tmp_path / "t.txt"
    text.write_text("\n".join(f"w{i} w{i + 1} w{i + 2}" for i in range(10)) + "\n")
    out = tmp_path / "moe"
    assert main(["moefy", str(tiny_bert), "-o", str(out), "--experts", "4", "--top-k", "2", "--calib", str(text),
                 "--seed", "3"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["output"] == str(out) and printed["experts"] == 4 and printed["top_k"] == 2
    assert printed["pimoe_layers"] == ["encoder.layer.0", "encoder.layer.1"]
    report = json.loads((out / "moefy_report.json").read_text())
    assert report["settings"]["experts"] == 4 and report["settings"]["seed"] == 3
    assert report["settings"]["routing_noise"] == 1.5  # the default, as the MiniLM demo reports it
    assert report["settings"]["router_sharpness"] == 8.0 and report["settings"]["finetune_lr"] == 0.0003
    assert report["data"] == f"8 training + 2 held-out lines of {text}"
    assert report["distillation_loss_per_epoch"] == []
    assert report["moe_vs_original_held_out_before_distillation"] is None
    assert report["moe_vs_original_held_out"]["sentences"] == 2
    assert json.loads((out / MANIFEST).read_text())["layers"]["encoder.layer.0"]["top_k"] == 2


@pytest.mark.parametrize("count", [10, 5])
def test_moefy_trains_on_4_of_5_lines_and_reports_on_the_fifth(tmp_path, monkeypatch, count) -> None:
    """docs/minilm_demo.md: moefy "holds out every fifth line of its text and reports the MoE model against the
    original there"; "trains on 4 of 5, reports on the fifth". The lines reach the tokenizer as written out here:
    the held-out ones are never trained on (5 lines: the fifth alone is held out)."""
    import argparse

    import pimoe_export.hf.feeds as feeds
    from pimoe_export.cli.moefy_command import _split

    monkeypatch.setattr(feeds, "text_feeds", lambda directory, lines: list(lines))
    lines = [f"line {i}" for i in range(count)]
    text = tmp_path / "t.txt"
    text.write_text("\n".join(lines) + "\n")
    train, held, description = _split(argparse.Namespace(calib=text, hf_model_dir=tmp_path, seed=0), 65)
    want_held = ["line 4", "line 9"] if count == 10 else ["line 4"]
    assert held == want_held
    assert train == [line for line in lines if line not in want_held]
    assert not set(train) & set(held)
    assert description == f"{len(train)} training + {len(held)} held-out lines of {text}"


def test_the_moefy_defaults_are_the_documented_ones() -> None:
    """The MiniLM demo passes no --routing-noise and reports "router sharpness 8.0, 8 distillation epochs (noise
    1.5, lr 0.0003)" (docs/minilm_demo.md); README's command is `--experts 8 --top-k 2 ... [--finetune-epochs N]
    [--routing-noise 1.5]` (distillation optional): the command's defaults and the settings' own."""
    from pimoe_export.cli import build_parser
    from pimoe_export.hf.moefy import MoefySettings

    args = build_parser().parse_args(["moefy", "D", "-o", "O"])
    assert (args.experts, args.top_k, args.finetune_epochs, args.routing_noise, args.seed) == (8, 2, 0, 1.5, 0)
    assert args.calib is None
    settings = MoefySettings()
    assert (settings.router_sharpness, settings.finetune_lr, settings.routing_noise) == (8.0, 0.0003, 1.5)
    assert (settings.experts, settings.top_k, settings.finetune_epochs, settings.seed) == (8, 2, 0, 0)


@pytest.mark.parametrize(("argv", "code", "fragment"), [
    (["--experts", "4", "--top-k", "5"], 2, "--top-k 5 exceeds --experts 4"),
    (["--experts", "3"], 2, "the FFN width 64 must divide into 3 equal experts"),
])
def test_the_moefy_command_refuses_settings_the_model_cannot_take(tiny_bert, tmp_path, capsys, argv, code,
                                                                  fragment) -> None:
    from pimoe_export.cli import main

    assert main(["moefy", str(tiny_bert), "-o", str(tmp_path / "out"), *argv]) == code
    assert fragment in capsys.readouterr().err


def test_routing_noise_must_be_a_finite_number_of_at_least_0() -> None:
    import argparse

    from pimoe_export.cli.moefy_command import non_negative

    assert non_negative("0") == 0.0 and non_negative("1.5") == 1.5
    for bad in ("-0.1", "inf", "nan", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match=f"{bad!r} is not a finite number >= 0"):
            non_negative(bad)


def test_a_folder_that_is_no_hugging_face_model(tmp_path, capsys) -> None:
    from pimoe_export.cli import main

    (tmp_path / "empty").mkdir()
    assert main(["moefy", str(tmp_path / "empty"), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "is not a loadable Hugging Face model with safetensors weights" in err
    assert not (tmp_path / "out").exists()


def test_random_feeds_cover_every_length_and_every_token() -> None:
    """Valid lengths are uniform in 1..S (full rows and one-token rows both occur) and ids uniform in [0, vocab)."""
    (feed,) = random_feeds(7, 5, ((200, 4),))
    lengths = feed["attention_mask"].sum(axis=1)
    assert set(lengths.tolist()) == {1, 2, 3, 4}
    assert set(np.unique(feed["input_ids"]).tolist()) == set(range(7))


def test_a_moefied_sources_random_feed_draws_every_token(moefied) -> None:
    source = importers.load_source(moefied)
    ids = source.random_feed(64, 64, 0)["input_ids"]
    assert ids.min() == 0 and ids.max() == 64  # vocab 65: [0, 65)


def test_transformers_missing_is_named_with_the_extra(monkeypatch) -> None:
    import sys

    from pimoe_export.errors import PiMoEConfigError
    from pimoe_export.hf.checkpoint import require_transformers

    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(PiMoEConfigError) as info:
        require_transformers()
    assert info.value.field == "moefy"
    assert str(info.value) == ("PiMoEConfig.moefy: needs the `transformers` package: pip install 'pimoe-export[hf]' "
                               "(or scripts/setup.sh, which installs it)")


def test_a_model_without_bert_layers_and_the_settings_each_layer_records(tiny_bert) -> None:
    from dataclasses import asdict

    from pimoe_export.errors import PiMoEConfigError
    from pimoe_export.hf.moefy import MoefySettings, encoder_layers, layer_config

    with pytest.raises(PiMoEConfigError) as info:
        encoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    assert info.value.field == "moefy"
    assert str(info.value) == ("PiMoEConfig.moefy: Sequential has no BERT-style layers (intermediate.dense, "
                               "output.dense, output.LayerNorm); supported: BERT-family encoders (BERT, MiniLM)")
    settings = MoefySettings(experts=4, top_k=2, routing_noise=0.5, seed=9)
    config = layer_config(32, 64, settings)
    assert config.metadata == {"moefy": asdict(settings)}
    assert (config.hidden_size, config.num_experts, config.top_k, config.intermediate_size) == (32, 4, 2, 16)
    assert config.normalize and not config.use_gating and config.router_hidden_size == 32
    with pytest.raises(PiMoEConfigError, match="the FFN width 64 must divide into 3 equal experts"):
        layer_config(32, 64, MoefySettings(experts=3))


def test_routing_noise_of_0_is_plain_top_k_and_a_negative_one_is_refused(tiny_bert) -> None:
    from pimoe_export.errors import PiMoEConfigError
    from pimoe_export.hf.moefy import MoefySettings, moefy

    model = transformers.AutoModel.from_pretrained(str(tiny_bert), local_files_only=True).eval()
    feeds = [{k: torch.from_numpy(v) for k, v in f.items()} for f in random_feeds(65, 0, ((4, 8),))]
    moefy(model, feeds, MoefySettings(experts=4, top_k=2, router_epochs=1, routing_noise=0.0))
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(PiMoEConfigError, match="routing_noise"):
            moefy(model, feeds, MoefySettings(experts=4, top_k=2, router_epochs=1, routing_noise=bad))


def test_embedding_fidelity_by_hand() -> None:
    """Two stand-in models with known token states: the cosine of the mask-pooled embeddings and the relative L2 of
    the valid token states, written out."""
    from types import SimpleNamespace

    from pimoe_export.hf.moefy import embedding_fidelity

    a = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]]])
    b = torch.tensor([[[1.0, 1.0], [0.0, 2.0], [-5.0, 9.0]]])

    class Fixed(torch.nn.Module):
        def __init__(self, states):
            super().__init__()
            self.states = states

        def forward(self, **feed):
            return SimpleNamespace(last_hidden_state=self.states)

    feed = {"input_ids": torch.zeros(1, 3, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 0]])}
    got = embedding_fidelity(Fixed(a), Fixed(b), [feed])
    pooled_a, pooled_b = np.array([0.5, 1.0]), np.array([0.5, 1.5])  # the third token is padding
    cosine = pooled_a @ pooled_b / (np.linalg.norm(pooled_a) * np.linalg.norm(pooled_b))
    assert got["sentences"] == 1
    assert got["embedding_cosine_mean"] == pytest.approx(cosine) == got["embedding_cosine_min"]
    assert got["token_state_rel_l2"] == pytest.approx(np.sqrt(1.0 / (2.0 + 4.0)))  # |a-b|^2 = 1; |b|^2 = 2 + 4


def test_a_moefied_model_saves_into_a_directory_whose_parents_do_not_exist_yet(moefied, tmp_path) -> None:
    model = load_moefied(moefied)
    saved = save_moefied(model, tmp_path / "a" / "b" / "moe")
    assert is_moefied(saved)
    ids = torch.randint(0, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(load_moefied(saved)(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state)
