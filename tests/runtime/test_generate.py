"""Engine.generate on every decoder family's fp32 unit, against Hugging Face ``generate`` on the same weights.

Greedy tokens must be identical to ``generate(do_sample=False)`` for a left-padded batch of prompts of different
lengths; seeded sampling must repeat itself; EOS, stop strings and stop token sequences must end one row and leave
the others as they were; the streaming callback must deliver exactly the final tokens and text.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pimoe_export.errors import ArtifactError, PiMoEInputError
from pimoe_export.runtime.engine import Engine, OrtEngine

PROMPTS = ["the cat sat", "dog ran far away on the mat moe expert token", "route"]
NEW_TOKENS = 32


def hf_greedy(case, prompts: list[str], new_tokens: int = NEW_TOKENS) -> list[list[int]]:
    """Hugging Face generate(do_sample=False) on the left-padded batch: each row's new tokens up to its EOS."""
    tokenizer, model = case.hf_tokenizer(), case.hf_model()
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, do_sample=False, max_new_tokens=new_tokens, pad_token_id=tokenizer.pad_token_id)
    rows = []
    eos = set(model.generation_config.eos_token_id if isinstance(model.generation_config.eos_token_id, list)
              else [model.generation_config.eos_token_id])
    for row in out[:, batch["input_ids"].shape[1]:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:end])
    return rows


@pytest.fixture
def engine(decoder_case):
    with Engine.load(decoder_case.unit) as loaded:
        yield loaded


@pytest.mark.slow
def test_greedy_batch_is_token_identical_to_hugging_face(decoder_case, engine) -> None:
    reference = hf_greedy(decoder_case, PROMPTS)
    results = engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS)
    assert [r.token_ids for r in results] == reference
    assert max(len(r) for r in reference) == NEW_TOKENS  # at least one row ran the whole 32 tokens
    prompts = decoder_case.hf_tokenizer()(PROMPTS)["input_ids"]
    assert [r.prompt_token_ids for r in results] == prompts and len({len(p) for p in prompts}) == 3
    for result, row in zip(results, reference, strict=True):
        assert result.finish_reason == ("length" if len(row) == NEW_TOKENS else "eos")
    # each prompt alone: the same tokens as in the padded batch
    assert [engine.generate(p, max_new_tokens=NEW_TOKENS)[0].token_ids for p in PROMPTS] == reference


def test_the_cache_stays_in_onnx_runtime_between_steps(decoder_case, engine) -> None:
    """I/O binding: after a step the cache is the OrtValues ONNX Runtime returned (no numpy copy); the plain numpy
    path through run_named's backend call gives the same tokens."""
    import onnxruntime as ort

    from pimoe_export.runtime.decoder import Rows

    assert isinstance(engine, OrtEngine)
    decoder = engine.decoder()
    rows, logits = Rows.prefill(decoder, engine.prompt_ids(PROMPTS))
    rows.step(decoder, logits.argmax(axis=1).tolist())
    assert all(isinstance(c, ort.OrtValue) for c in rows.cache)
    assert rows.cache[0].shape()[2] == rows.mask.shape[1]
    numpy_path = Engine.decoder(engine)  # the base class's ArrayDecoder (numpy feeds, numpy cache)
    from pimoe_export.runtime.generation import Request, generate
    from pimoe_export.runtime.sampling import SamplingSettings

    settings = SamplingSettings(max_new_tokens=12)
    requests = [Request(i, ids, settings, engine.decoder_spec) for i, ids in enumerate(engine.prompt_ids(PROMPTS))]
    assert [g.token_ids for g in generate(numpy_path, requests)] == \
        [r.token_ids for r in engine.generate(PROMPTS, max_new_tokens=12)]


def test_native_run_and_io_binding_give_the_same_bits(decoder_case, engine) -> None:
    """The CPU decoder's native run_with_ort_values step and the I/O-binding step (other devices, older onnxruntime):
    the same logits and cache, bit for bit, through prefill, decode steps, a row leaving (numpy cache, non-contiguous
    after trimming) and the steps after it; the CPU default is the native path."""
    from pimoe_export.runtime.decoder import Rows

    native, bound = engine.decoder(), engine.decoder()
    assert native._native is not None  # this onnxruntime has the native call: the CPU default uses it
    bound._native = None
    prompts = engine.prompt_ids(PROMPTS)
    results = []
    for decoder in (native, bound):
        rows, logits = Rows.prefill(decoder, prompts)
        seen = [logits]
        for step in range(6):
            tokens = seen[-1].argmax(axis=1).tolist()
            if step == 3:  # row 1 leaves
                rows, tokens = rows.select(decoder, [2, 0], trim=True), [tokens[2], tokens[0]]
            seen.append(rows.step(decoder, tokens))
        results.append((seen, decoder.to_numpy(rows.cache)))
    (native_logits, native_cache), (bound_logits, bound_cache) = results
    assert all(a.dtype == np.float32 and a.tobytes() == b.tobytes()
               for a, b in zip(native_logits, bound_logits, strict=True))
    assert all(a.tobytes() == b.tobytes() for a, b in zip(native_cache, bound_cache, strict=True))
    assert native_cache[0].shape[0] == 2


def test_a_request_that_ends_at_its_prefill_joins_and_leaves_a_running_batch(engine) -> None:
    """The serving batcher's Decoding: rows decode with their cache in ONNX Runtime; a new group arrives in which
    one request ends at its first token, so the group's rows are selected (a numpy cache) and merged with the
    running rows (OrtValues) before any step. Every request that goes on gets the tokens it gets alone."""
    from pimoe_export.runtime.generation import Decoding, Request
    from pimoe_export.runtime.sampling import SamplingSettings

    prompts = engine.prompt_ids(PROMPTS)
    alone = [engine.generate(PROMPTS[i], max_new_tokens=8, eos_token_ids=[])[0].token_ids for i in (0, 2)]
    settings = SamplingSettings(max_new_tokens=8, eos_token_ids=())
    spec = engine.decoder_spec
    decoding = Decoding(engine.decoder(), trim=True)
    first = Request(0, prompts[0], settings, spec)
    decoding.admit([first])
    decoding.step()
    decoding.step()
    ending = Request(1, prompts[1], SamplingSettings(max_new_tokens=1, eos_token_ids=()), spec)
    going = Request(2, prompts[2], settings, spec)
    decoding.admit([ending, going])
    assert ending.finish_reason == "length" and len(ending.tokens) == 1
    assert decoding.active == [first, going]
    while decoding.active:
        decoding.step()
    assert [first.tokens, going.tokens] == alone


def test_a_cuda_session_binds_the_cache_to_the_gpu(engine, monkeypatch) -> None:
    """A session whose first provider is CUDA's gets a decoder that keeps the presents on "cuda" (ONNX Runtime's
    device name for I/O binding) and does not take the CPU-only native step; a CPU session's stays on "cpu"."""

    class OnCuda:
        def __init__(self, session) -> None:
            self._session = session

        def get_providers(self) -> list[str]:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]

        def __getattr__(self, name: str):
            return getattr(self._session, name)

    cpu = engine.decoder()
    assert cpu.device == "cpu" and cpu._native is not None
    monkeypatch.setattr(engine, "session", OnCuda(engine.session))
    gpu = engine.decoder()
    assert gpu.device == "cuda" and gpu._native is None


def test_seeded_sampling_repeats_and_rows_are_independent(engine) -> None:
    kwargs = {"max_new_tokens": 24, "temperature": 0.9, "top_k": 40, "top_p": 0.95, "seed": 1234}
    first = engine.generate(PROMPTS, **kwargs)
    again = engine.generate(PROMPTS, **kwargs)
    assert [r.token_ids for r in first] == [r.token_ids for r in again]
    assert all(r.seed == 1234 for r in first)
    other = engine.generate(PROMPTS, **{**kwargs, "seed": 1235})
    assert [r.token_ids for r in other] != [r.token_ids for r in first]
    # row 0 draws from (seed, 0) whatever else is in the batch
    assert engine.generate(PROMPTS[0], **kwargs)[0].token_ids == first[0].token_ids
    # without a seed, the fresh seed is reported and repeats the run
    unseeded = engine.generate(PROMPTS[:1], **{**kwargs, "seed": None})[0]
    assert engine.generate(PROMPTS[:1], **{**kwargs, "seed": unseeded.seed})[0].token_ids == unseeded.token_ids
    # greedy ignores the seed
    assert engine.generate(PROMPTS, max_new_tokens=8, seed=5)[0].seed is None


def test_eos_and_stop_sequences_end_each_row_separately(engine) -> None:
    free = engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS, eos_token_ids=[])
    assert all(r.finish_reason == "length" and len(r.token_ids) == NEW_TOKENS for r in free)
    row = 1  # its first token (after the first) not seen before in the row
    at = next(i for i, t in enumerate(free[row].token_ids) if i > 0 and t not in free[row].token_ids[:i])
    token = free[row].token_ids[at]
    # that token as EOS: row 1 ends there, every row that never produced it runs on unchanged
    ended = engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS, eos_token_ids=[token])
    assert ended[row].token_ids == free[row].token_ids[: at + 1] and ended[row].finish_reason == "eos"
    for r, f in zip(ended, free, strict=True):
        if token not in f.token_ids:
            assert r.token_ids == f.token_ids and r.finish_reason == "length"
    # the two tokens before it as a stop token sequence
    sequence = free[row].token_ids[at - 1: at + 1]
    stopped = engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS, eos_token_ids=[], stop_token_ids=[sequence])
    assert stopped[row].token_ids == free[row].token_ids[: at + 1] and stopped[row].finish_reason == "stop"
    # a stop string: the text ends just before it, the tokens at the one that completed it
    text = free[0].text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    by_text = engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS, eos_token_ids=[], stop=[stop])
    assert by_text[0].finish_reason == "stop" and by_text[0].text == text[: text.find(stop)]
    assert by_text[0].token_ids == free[0].token_ids[: len(by_text[0].token_ids)]
    assert engine.tokenizer.decode(by_text[0].token_ids).find(stop) >= 0
    assert engine.tokenizer.decode(by_text[0].token_ids[:-1]).find(stop) < 0


def test_streaming_delivers_every_token_as_it_comes(engine) -> None:
    events = []
    results = engine.generate(PROMPTS, max_new_tokens=16, on_token=events.append, stop=["moe"])
    for index, result in enumerate(results):
        mine = [e for e in events if e.request == index]
        assert [e.token_id for e in mine] == result.token_ids
        assert "".join(e.text for e in mine) == result.text
        assert [e.finish_reason for e in mine[:-1]] == [None] * (len(mine) - 1)
        assert mine[-1].finish_reason == result.finish_reason
        # a piece never ends inside a character (an undecodable byte shows only when the row ends on it)
        assert all(not e.text.endswith("\ufffd") for e in mine[:-1])
    # step order: every row's n-th token comes before any row's (n+1)-th
    steps = [sum(1 for e in events[:i] if e.request == ev.request) for i, ev in enumerate(events)]
    assert steps == sorted(steps)


def test_text_in_and_out_uses_the_units_tokenizer(decoder_case, engine) -> None:
    tokenizer = decoder_case.hf_tokenizer()
    result = engine.generate(PROMPTS[1], max_new_tokens=10)[0]
    assert result.prompt_token_ids == tokenizer(PROMPTS[1])["input_ids"]
    assert result.text == tokenizer.decode(result.token_ids, skip_special_tokens=True)
    by_ids = engine.generate([tokenizer(PROMPTS[1])["input_ids"]], max_new_tokens=10)[0]
    assert by_ids.token_ids == result.token_ids


def test_bad_generation_requests_are_refused(decoder_case, engine) -> None:
    spec = engine.decoder_spec
    cases = [
        (lambda: engine.generate([[]]), "prompt is empty"),
        (lambda: engine.generate(""), "prompt is empty"),
        (lambda: engine.generate([[spec.vocab_size]]), "outside the vocabulary"),
        (lambda: engine.generate([[5] * 10], max_new_tokens=spec.context_length), "context length"),
        (lambda: engine.generate(PROMPTS, max_new_tokens=0), "max_new_tokens"),
        (lambda: engine.generate(PROMPTS, temperature=-1), "temperature"),
        (lambda: engine.generate(PROMPTS, temperature=1, top_p=0), "top_p"),
        (lambda: engine.generate(PROMPTS, top_k=-2), "top_k"),
        (lambda: engine.generate(PROMPTS, temperature=1, seed=-3), "seed"),
        (lambda: engine.generate([1.5]), "sequence of token ids"),
    ]
    for call, message in cases:
        with pytest.raises(PiMoEInputError, match=message):
            call()


def test_units_without_a_tokenizer_or_a_decoder(tmp_path, decoder_case, exported_layer) -> None:
    from pimoe_export.build.units import package_ort

    bare = package_ort(decoder_case.unit / "model.onnx", tmp_path / "no-tokenizer", client_dir=tmp_path)
    assert "tokenizer" not in {a.role for a in bare.artifacts} and bare.decoder
    with Engine.load(tmp_path / "no-tokenizer") as engine:
        assert engine.tokenizer is None
        with pytest.raises(PiMoEInputError, match="ships no tokenizer"):
            engine.generate("the cat")
        with pytest.raises(PiMoEInputError, match="stop strings need"):
            engine.generate([[1, 5]], stop=["x"])
        result = engine.generate([[1, 5, 9]], max_new_tokens=4)[0]
        assert result.text is None and len(result.token_ids) <= 4
    _, layer_onnx = exported_layer()
    package_ort(layer_onnx, tmp_path / "layer")
    with Engine.load(tmp_path / "layer") as engine, pytest.raises(PiMoEInputError, match="not a decoder unit"):
        engine.generate([[1]])


def test_a_tampered_decoder_unit_is_refused(tmp_path, decoder_case) -> None:
    import json
    import shutil

    unit = tmp_path / "unit"
    shutil.copytree(decoder_case.unit, unit)
    (unit / "tokenizer.json").write_text((unit / "tokenizer.json").read_text().replace('"<s>"', '"<S>"'))
    with pytest.raises(ArtifactError, match=r"tokenizer\.json does not match"):
        Engine.load(unit)
    shutil.rmtree(unit)
    shutil.copytree(decoder_case.unit, unit)
    original = (unit / "manifest.json").read_text()
    manifest = json.loads(original)
    # a value cache of another head dim than the graph's (every family: keys' and values' may differ, MLA)
    manifest["decoder"]["value_head_dim"] = manifest["decoder"]["head_dim"] + 4
    (unit / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="decoder description differs"):
        Engine.load(unit)
    manifest = json.loads(original)
    manifest["decoder"]["eos_token_ids"] = [7]
    (unit / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="decoder description differs"):
        Engine.load(unit)
    manifest["decoder"]["num_kv_heads"] = 3
    (unit / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="not a multiple"):
        Engine.load(unit)


def test_run_named_takes_a_decoder_step(engine) -> None:
    """The decoder's standard I/O through run_named: named axes must agree across inputs (past_sequence of every
    cache input), and a step equals the generation's prefill logits."""
    spec = engine.decoder_spec
    ids = np.array([engine.prompt_ids("the cat sat")[0]], np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(ids.shape[1])[None],
             **{name: np.zeros((1, spec.num_kv_heads, 0, dim), np.float32)
                for name, dim in zip(spec.past_names, spec.cache_head_dims, strict=True)}}
    out = engine.run_named(feeds)
    assert out["logits"].shape == (1, ids.shape[1], spec.vocab_size)
    assert out[spec.present_names[0]].shape == (1, spec.num_kv_heads, ids.shape[1], spec.head_dim)
    assert out[spec.present_names[1]].shape == (1, spec.num_kv_heads, ids.shape[1], spec.value_head_dim)
    first = engine.generate([ids[0].tolist()], max_new_tokens=1)[0].token_ids[0]
    assert first == int(out["logits"][0, -1].argmax())
    bad = {**feeds, spec.past_names[1]: np.zeros((1, spec.num_kv_heads, 2, spec.value_head_dim), np.float32)}
    with pytest.raises(PiMoEInputError, match="past_sequence"):
        engine.run_named(bad)


@pytest.mark.slow
def test_the_pipeline_on_a_model_directory_writes_decoder_units_that_generate(decoder_cases, tmp_path) -> None:
    """`pimoe-export pipeline --model DIR` (the CLI a user runs) on a Hugging Face directory with a tokenizer: its
    fp32 and INT8 ONNX Runtime units are decoder units with the tokenizer and genai_config.json, and the fp32 unit
    generates Hugging Face's greedy tokens."""
    import json

    from pimoe_export.artifacts.manifest import read_manifest
    from pimoe_export.cli import main

    case = decoder_cases("qwen3_moe")
    out = tmp_path / "out"
    assert main(["pipeline", "--model", str(case.hf_dir), "-o", str(out), "--bench-repeats", "1", "--quiet"]) == 0
    assert json.loads((out / "pipeline.json").read_text())["passed"]
    for unit, precision in (("ort-fp32", "fp32"), ("ort-int8", "w8a8")):
        manifest = read_manifest(out / unit)
        assert manifest.precision == precision and manifest.decoder_spec == read_manifest(case.unit).decoder_spec
        assert all((out / unit / name).is_file() for name in ("tokenizer.json", "genai_config.json", "config.json"))
    with Engine.load(out / "ort-fp32") as engine:
        results = engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS)
    assert [r.token_ids for r in results] == hf_greedy(case, PROMPTS)
