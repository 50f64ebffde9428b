"""scripts/moefy_minilm.py, the MiniLM demo's driver (docs/minilm_demo.md), without MiniLM or the two commands: it
"writes the two text files (English sentences ..., split by a hash into disjoint MoEfication and evaluation sets),
runs exactly these commands and copies their numbers here (`--update-docs`)", between the doc's results markers."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shlex
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "minilm_demo.md"


@pytest.fixture
def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("moefy_minilm", ROOT / "scripts" / "moefy_minilm.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sentences(n: int, start: int = 0) -> list[str]:
    return [f"Sentence number {i} of the synthetic corpus has a few words." for i in range(start, start + n)]


def is_eval(sentence: str) -> bool:
    """The split the script's docstring gives: 30 % evaluation by the sentence's SHA-1 (10 buckets, 3 of them)."""
    return int(hashlib.sha1(sentence.encode()).hexdigest(), 16) % 10 < 3


def test_the_split_is_by_a_hash_of_each_sentence_into_disjoint_sets(script) -> None:
    corpus = sentences(1000)
    parts = script.split(corpus)
    assert sorted(parts) == ["eval", "train"]
    assert set(parts["train"]).isdisjoint(parts["eval"])
    assert sorted(parts["train"] + parts["eval"]) == sorted(corpus)
    assert parts["eval"] == [s for s in corpus if is_eval(s)]  # the corpus's order kept
    assert parts["train"] == [s for s in corpus if not is_eval(s)]
    assert 250 <= len(parts["eval"]) <= 350  # "70% MoEfication, 30% evaluation"
    # another Python version's docstrings (more sentences) move none of the sentences both corpora have
    bigger = script.split(sentences(500, start=800) + corpus)
    for name in ("train", "eval"):
        assert set(parts[name]) == set(bigger[name]) & set(corpus)


def doc_commands() -> list[list[str]]:
    """The two commands docs/minilm_demo.md shows (its first bash block)."""
    block = DOC.read_text().split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line) for line in block.strip().splitlines()]


def test_the_script_runs_exactly_the_docs_commands_on_the_two_text_files(script, monkeypatch, tmp_path) -> None:
    """Its defaults give the doc's two command lines (the paths are the script's --out folder; --force and --quiet
    only decide what is printed and replaced), on the train and eval files it wrote from the split."""
    corpus = sentences(40)
    out = tmp_path / "build" / "minilm"
    ran: list[list[str]] = []
    monkeypatch.setattr(script, "stdlib_sentences", lambda: corpus)
    monkeypatch.setattr(script, "minilm_dir", lambda: Path("/models/minilm"))
    monkeypatch.setattr(script, "cli", lambda *args: ran.append(list(args)))
    monkeypatch.setattr(script, "summarise", lambda folder: {"passed": True})
    monkeypatch.setattr(sys, "argv", ["moefy_minilm.py", "--out", str(out)])
    assert script.main() == 0
    doc_paths = {"/models/minilm": "MINILM_DIR", str(out / "moe"): "build/minilm/moe",
                 str(out / "engines"): "build/minilm/engines", str(out / "train.txt"): "train.txt",
                 str(out / "eval.txt"): "eval.txt"}
    assert [[doc_paths.get(a, a) for a in args if a not in ("--force", "--quiet")] for args in ran] == [
        command[1:] for command in doc_commands()]
    parts = script.split(corpus)
    assert parts["train"] and parts["eval"]
    assert (out / "train.txt").read_text() == "\n".join(parts["train"]) + "\n"
    assert (out / "eval.txt").read_text() == "\n".join(parts["eval"]) + "\n"
    assert json.loads((out / "results.json").read_text())["sentences"] == {"train": len(parts["train"]),
                                                                          "eval": len(parts["eval"])}


def results() -> dict:
    """What main hands to write_docs: the moefy report and the pipeline's check reports, summarised."""
    fidelity = {"sentences": 5, "embedding_cosine_mean": 0.95, "embedding_cosine_min": 0.85,
                "token_state_rel_l2": 0.4}
    settings = {"experts": 8, "top_k": 4, "router_sharpness": 8.0, "finetune_epochs": 2, "routing_noise": 1.5,
                "finetune_lr": 3e-4}
    moefy = {"settings": settings, "moe_vs_original_held_out": fidelity,
             "moe_vs_original_held_out_before_distillation": {**fidelity, "embedding_cosine_mean": 0.8},
             "distillation_loss_per_epoch": [0.5, 0.25]}

    def check(precision: str) -> dict:
        return {"passed": True, "precision": precision, "failures": [], "output": {"rel_l2": 0.01},
                "embedding": {"sequences": 3, "mean_cosine": 0.9995, "min_cosine": 0.99},
                "routing_by_layer": {"layer0": 1.0, "layer1": 0.97}}

    return {"date": "2030-01-02", "command": "python scripts/moefy_minilm.py", "seconds": 12.0, "passed": True,
            "sentences": {"train": 20, "eval": 10}, "moefy": moefy, "units": ["ort-fp32", "ort-int8"],
            "check": {"report": check("fp32"), "report_int8": check("w8a8_dynamic")}}


def test_update_docs_replaces_only_the_text_between_the_results_markers(script, monkeypatch, tmp_path) -> None:
    doc = tmp_path / "docs" / "minilm_demo.md"
    doc.parent.mkdir()
    doc.write_text("A\n<!-- results -->\nold numbers\n<!-- /results -->\nB\n")
    monkeypatch.setattr(script, "ROOT", tmp_path)
    script.write_docs(results())
    text = doc.read_text()
    assert text.startswith("A\n<!-- results -->\n") and text.endswith("\n<!-- /results -->\nB\n"), text
    assert "old numbers" not in text
    body = text.split("<!-- results -->\n", 1)[1].split("\n<!-- /results -->", 1)[0]
    assert body.startswith("Run 2030-01-02: `python scripts/moefy_minilm.py` (12 s on this 2-core CPU machine); "
                           "pipeline **PASSED**")
    assert ("- moefy: E = 8, k = 4, router sharpness 8.0, 2 distillation epochs (noise 1.5, lr 0.0003); loss per "
            "epoch 0.500, 0.250.") in body.splitlines()
    # the table's header is the one the doc has
    header = "| comparison | sentences | mean cosine | min cosine | token-state rel L2 |"
    assert header in DOC.read_text().splitlines() and header in body.splitlines()
    assert "| **ORT INT8 (w8a8_dynamic) vs PyTorch MoE fp32** | 3 | 0.99950 | 0.99000 | 1.00e-02 |" in body
    # the next --update-docs finds its markers again and writes the same
    script.write_docs(results())
    assert doc.read_text() == text


def test_update_docs_refuses_a_doc_without_the_markers(script, monkeypatch, tmp_path) -> None:
    doc = tmp_path / "docs" / "minilm_demo.md"
    doc.parent.mkdir()
    for content in ("A\nB\n", "A\n<!-- results -->\nB\n"):
        doc.write_text(content)
        monkeypatch.setattr(script, "ROOT", tmp_path)
        refusal = f"{doc} lacks the <!-- results --> ... <!-- /results --> markers"
        with pytest.raises(SystemExit, match=re.escape(refusal)):
            script.write_docs(results())
        assert doc.read_text() == content
