"""Parity of a decoder unit with its PyTorch reference, step by step and token for token (``check`` on a decoder).

For each prompt:

1. the reference's greedy continuation of ``new_tokens`` tokens (full forward passes, no cache: independent of
   any cache handling) gives the sequence prompt + continuation;
2. teacher forcing: the unit runs that sequence the way generation does (the prompt in one call with an empty
   cache, then one token per call through its KV cache) and its logits at every position, prompt and continuation,
   are compared with the reference's logits of the whole sequence: per step, cosine and max abs error;
3. the unit's own greedy continuation (Engine.generate, EOS off) is compared token for token with the
   reference's; the first divergent step is reported (None: identical).

Verdict: every step's cosine at least the precision's ``min_cosine`` (interface.tolerances_for, whole-model
tolerances for INT8) and, in fp32, identical greedy tokens; INT8 and fp16 report where their tokens diverge.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pimoe_export._files import OutputDir
from pimoe_export.interface import DECODER_LOGITS, tolerances_for
from pimoe_export.runtime.decoder import Rows, prompt_positions
from pimoe_export.runtime.engine import Engine
from pimoe_export.validate.metrics import error_stats

#: reference logits of token ids [1, L] -> [1, L, V]
Reference = Callable[[np.ndarray], np.ndarray]


def torch_reference(module: Any) -> Reference:
    """A causal LM as a :data:`Reference`, in fp32 without gradients: ``module(input_ids=, attention_mask=,
    position_ids=)`` (unpadded rows: a mask of ones, positions from 0) returning the logits by name (a Hugging Face
    output, or the importers' DecoderLM dict) or first in a tuple."""
    import torch

    def run(ids: np.ndarray) -> np.ndarray:
        tokens = torch.from_numpy(np.asarray(ids, np.int64))
        positions = torch.arange(tokens.shape[-1]).expand_as(tokens)
        with torch.no_grad():
            out = module(input_ids=tokens, attention_mask=torch.ones_like(tokens), position_ids=positions)
        logits = out[DECODER_LOGITS] if isinstance(out, Mapping) else out[0]
        return logits.float().numpy()

    return run


@dataclass
class PromptResult:
    prompt: list[int]
    reference_tokens: list[int]
    unit_tokens: list[int]
    step_cosine: list[float]  # per position of prompt + continuation
    step_max_abs: list[float]
    first_divergence: int | None


@dataclass
class GenerationReport:
    unit: str
    precision: str
    min_cosine: float
    prompts: list[PromptResult] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def worst_cosine(self) -> float:
        return min(min(p.step_cosine) for p in self.prompts)

    def to_dict(self) -> dict[str, Any]:
        return {"unit": self.unit, "precision": self.precision, "min_cosine": self.min_cosine, "passed": self.passed,
                "worst_cosine": self.worst_cosine, "failures": self.failures,
                "prompts": [asdict(p) for p in self.prompts]}


def reference_greedy(reference: Reference, prompt: Sequence[int], new_tokens: int) -> list[int]:
    ids = list(prompt)
    for _ in range(new_tokens):
        ids.append(int(np.argmax(reference(np.array([ids]))[0, -1])))
    return ids[len(prompt):]


def teacher_forced_logits(engine: Engine, sequence: Sequence[int], prompt_length: int) -> np.ndarray:
    """The unit's logits [L, V] for every position of ``sequence``: the first ``prompt_length`` tokens in one call,
    then one token per call through the cache (what generation runs)."""
    decoder = engine.decoder()
    ids = np.array([sequence[:prompt_length]], np.int64)
    mask = np.ones_like(ids)
    logits, cache = decoder.forward(ids, mask, prompt_positions(mask), None, all_positions=True)
    rows = Rows(mask, np.array([prompt_length], np.int64), cache)
    steps = [rows.step(decoder, [token]) for token in sequence[prompt_length:-1]]
    return np.concatenate([logits[0], *steps]) if steps else logits[0]


def check_prompt(engine: Engine, reference: Reference, prompt: Sequence[int], new_tokens: int) -> PromptResult:
    continuation = reference_greedy(reference, prompt, new_tokens)
    sequence = [*prompt, *continuation]
    expected = reference(np.array([sequence]))[0, :-1]
    actual = teacher_forced_logits(engine, sequence, len(prompt))
    stats = [error_stats(r, a) for r, a in zip(expected, actual, strict=True)]
    unit_tokens = engine.generate([list(prompt)], max_new_tokens=new_tokens, eos_token_ids=[])[0].token_ids
    divergence = next((i for i, (a, b) in enumerate(zip(unit_tokens, continuation, strict=True)) if a != b), None)
    return PromptResult(list(prompt), continuation, unit_tokens, [s.cosine for s in stats],
                        [s.max_abs for s in stats], divergence)


def seeded_prompts(vocab_size: int, seed: int, lengths: Sequence[int] = (4, 9, 17)) -> list[list[int]]:
    """Prompts of random token ids (the check's default inputs)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab_size, n).tolist() for n in lengths]


def check_generation(engine: Engine, reference: Reference, prompts: Sequence[Sequence[int]],
                     new_tokens: int = 16) -> GenerationReport:
    """The check of the module docstring on ``prompts`` (token ids)."""
    precision = engine.manifest.precision
    tolerance = tolerances_for(precision, moe_layers=2)
    report = GenerationReport(str(engine.unit_dir), precision, tolerance.min_cosine)
    for index, prompt in enumerate(prompts):
        result = check_prompt(engine, reference, prompt, new_tokens)
        report.prompts.append(result)
        worst = int(np.argmin(result.step_cosine))
        if not result.step_cosine[worst] >= tolerance.min_cosine:  # NaN logits fail too
            report.failures.append(f"prompt {index}: logits cosine {result.step_cosine[worst]:.8f} at position "
                                   f"{worst} is below {tolerance.min_cosine}")
        if precision == "fp32" and result.first_divergence is not None:
            report.failures.append(f"prompt {index}: the greedy tokens diverge from the reference at step "
                                   f"{result.first_divergence}")
    return report


def write_generation_report(report: GenerationReport, out_dir: str | Path, force: bool = False) -> dict[str, Path]:
    """report.json and report.md in ``out_dir`` (an output directory: pimoe-export's own files only)."""
    out = OutputDir(out_dir, force=force, command="check")
    json_path = out.claim("report.json")
    json_path.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    lines = [f"# Generation check: {report.unit} ({report.precision})", "",
             f"**{'PASSED' if report.passed else 'FAILED'}**: worst per-step logits cosine "
             f"{report.worst_cosine:.8f} (needs >= {report.min_cosine})", "",
             "| prompt | tokens | positions | worst cosine | max abs error | first divergent token |",
             "|---|---|---|---|---|---|"]
    for i, p in enumerate(report.prompts):
        lines.append(f"| {i} | {len(p.prompt)} + {len(p.reference_tokens)} | {len(p.step_cosine)} | "
                     f"{min(p.step_cosine):.8f} | {max(p.step_max_abs):.3e} | "
                     f"{'none' if p.first_divergence is None else p.first_divergence} |")
    lines += ["", *(f"- {f}" for f in report.failures)]
    md_path = out.claim("report.md")
    md_path.write_text("\n".join(lines) + "\n")
    return {"json": json_path, "markdown": md_path}
