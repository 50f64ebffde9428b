"""`pimoe-export generate` on every decoder family's unit: what it prints is what Engine.generate returns."""

from __future__ import annotations

import json
import re

import pytest

from pimoe_export.cli import main
from pimoe_export.runtime.engine import Engine


def test_generate_prints_the_engines_results(decoder_case, capsys) -> None:
    unit = str(decoder_case.unit)
    assert main(["generate", unit, "--prompt", "the cat sat", "--prompt", "dog ran", "--max-new-tokens", "7",
                 "--json"]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    with Engine.load(unit) as engine:
        expected = engine.generate(["the cat sat", "dog ran"], max_new_tokens=7)
        sampled = engine.generate("the cat", max_new_tokens=6, temperature=0.7, top_k=20, top_p=0.9, seed=11)[0]
    # one JSON object a line, each the engine's result field by field
    assert printed == [{"prompt_token_ids": e.prompt_token_ids, "token_ids": e.token_ids, "text": e.text,
                        "finish_reason": e.finish_reason, "seed": e.seed} for e in expected]
    argv = ["generate", unit, "--prompt", "the cat", "--max-new-tokens", "6", "--temperature", "0.7", "--top-k", "20",
            "--top-p", "0.9", "--seed", "11"]
    assert main([*argv, "--stream"]) == 0
    assert capsys.readouterr().out == sampled.text + "\n"
    ids = ",".join(map(str, expected[0].prompt_token_ids))
    assert main(["generate", unit, "--prompt-ids", ids, "--max-new-tokens", "7", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == expected[0].token_ids
    # texts and id lists mixed: results in command-line order
    assert main(["generate", unit, "--prompt", "dog ran", "--prompt-ids", ids, "--max-new-tokens", "7", "--json"]) == 0
    mixed = [json.loads(line)["token_ids"] for line in capsys.readouterr().out.splitlines()]
    assert mixed == [expected[1].token_ids, expected[0].token_ids]
    # token id 0 is a token like any other (often a special one): taken as given
    assert main(["generate", unit, "--prompt-ids", "0,5,9", "--max-new-tokens", "3", "--json"]) == 0
    zero = json.loads(capsys.readouterr().out)
    with Engine.load(unit) as engine:
        assert zero["token_ids"] == engine.generate([[0, 5, 9]], max_new_tokens=3)[0].token_ids
    assert zero["prompt_token_ids"] == [0, 5, 9]
    with pytest.raises(SystemExit) as refused:  # argparse's refusal: exit 2, the value named
        main(["generate", unit, "--prompt-ids=-1,2"])
    assert refused.value.code == 2
    assert "expected non-negative token ids like 1,5,9, got '-1,2'" in capsys.readouterr().err
    # sampling without --seed names the seed it drew, and that seed repeats the tokens; greedy and seeded say nothing
    sample = ["generate", unit, "--prompt", "the cat", "--max-new-tokens", "6", "--temperature", "0.7"]
    assert main(sample) == 0
    drawn = capsys.readouterr()
    seed = re.fullmatch(r"\(sampled with --seed (\d+)\)\n", drawn.err)
    assert seed, drawn.err
    assert main([*sample, "--seed", seed.group(1)]) == 0
    assert capsys.readouterr() == (drawn.out, "")
    assert main(["generate", unit, "--prompt", "the cat", "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(("extra", "message"), [
    ([], "give a prompt"),
    (["--prompt", ""], "prompt is empty"),
    (["--prompt", "a", "--prompt", "b", "--stream"], "one prompt"),
    (["--prompt", "a", "--max-new-tokens", "100000"], "context length"),
])
def test_generate_refuses_bad_input_with_exit_2(decoder_case, capsys, extra, message) -> None:
    assert main(["generate", str(decoder_case.unit), *extra]) == 2
    assert message in capsys.readouterr().err


def test_generate_refuses_a_unit_that_is_not_a_decoder(tmp_path, exported_layer, capsys) -> None:
    _, onnx_path = exported_layer()
    assert main(["package", str(onnx_path), "-o", str(tmp_path / "layer")]) == 0
    assert main(["generate", str(tmp_path / "layer"), "--prompt-ids", "1,2"]) == 2
    assert "not a decoder unit" in capsys.readouterr().err
