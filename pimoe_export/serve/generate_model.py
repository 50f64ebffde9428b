"""Generation on a decoder unit behind tritonserver: Triton's generate extension, tokens streamed as they come.

``pimoe-export serve`` writes, for each decoder unit, a Triton Python-backend model (:func:`write_generate_model`:
``config.pbtxt`` + ``1/model.py``) into the model repository tritonserver loads at start; its stub process loads
the unit (verified) as an ``Engine`` and decodes every request through one
:class:`~pimoe_export.runtime.generation.ContinuousBatcher` (one batch per decode step across concurrent requests).
The model is decoupled, so it answers:

- ``POST /v2/models/<name>/generate``: ``{"text_input": "...", "max_tokens": 32}`` -> one JSON answer with the whole
  ``text_output``, ``token_ids`` and ``finish_reason``;
- ``POST /v2/models/<name>/generate_stream``: the same with ``"stream": true`` -> one server-sent event per token
  (its ``text_output`` piece and ``token_ids`` [the token]), the last one with ``finish_reason``.

Request fields (top level or under ``parameters``; Triton maps a field of an input's name to that input):
``text_input`` (or ``input_ids``, a list of token ids), ``max_tokens``, ``temperature`` (0: greedy), ``top_k``,
``top_p``, ``seed``, ``stop`` (a list of strings), ``stream``. Any other field is refused by name, as are an empty
prompt and ``max_tokens`` past the unit's context; the server keeps serving. A client that hangs up is cancelled by
Triton; the batcher drops its row at the next step, which frees its cache and its slot. Counters on Triton's
metrics endpoint: ``pimoe_generate_requests_total{reason}``, ``pimoe_generate_tokens_total``,
``pimoe_generate_steps_total`` and ``pimoe_generate_step_rows_total`` (rows decoded, summed over steps).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pimoe_export.errors import PiMoEError, PiMoEInputError
from pimoe_export.interface import MODEL_IDS_INPUT
from pimoe_export.runtime.sampling import DEFAULT_MAX_NEW_TOKENS, SamplingSettings

#: the model's optional inputs: name -> (Triton data type, dims); every request field must be one of them
GENERATE_INPUTS: dict[str, tuple[str, tuple[int, ...]]] = {
    "text_input": ("TYPE_STRING", (1,)), MODEL_IDS_INPUT: ("TYPE_INT64", (-1,)), "max_tokens": ("TYPE_INT32", (1,)),
    "temperature": ("TYPE_FP32", (1,)), "top_k": ("TYPE_INT32", (1,)), "top_p": ("TYPE_FP32", (1,)),
    "seed": ("TYPE_INT64", (1,)), "stop": ("TYPE_STRING", (-1,)), "stream": ("TYPE_BOOL", (1,)),
}
GENERATE_OUTPUTS: dict[str, tuple[str, tuple[int, ...]]] = {
    "text_output": ("TYPE_STRING", (1,)), "token_ids": ("TYPE_INT64", (-1,)), "finish_reason": ("TYPE_STRING", (1,)),
}
MODEL_FILE = ('"""Written by pimoe-export serve: generation on a decoder unit (see '
              'pimoe_export/serve/generate_model.py)."""\n'
              "from pimoe_export.serve.generate_model import TritonPythonModel  # noqa: F401\n")


def _pbtxt_string(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid protobuf text-format string for these characters


def model_config(name: str, unit_dir: Path, max_rows: int, threads: int | None) -> str:
    """config.pbtxt of the generate model of ``unit_dir`` (absolute, as the stub process sees it)."""
    def tensors(specs: dict[str, tuple[str, tuple[int, ...]]], optional: bool) -> str:
        entries = [f'  {{ name: "{n}" data_type: {t} dims: [ {", ".join(map(str, d))} ]'
                   + (" optional: true" if optional else "") + " }" for n, (t, d) in specs.items()]
        return ",\n".join(entries)

    parameters = {"unit": str(unit_dir.resolve()), "max_rows": str(max_rows), "threads": str(threads or 0)}
    params = "\n".join(f"parameters {{ key: {_pbtxt_string(k)} value: {{ string_value: {_pbtxt_string(v)} }} }}"
                       for k, v in parameters.items())
    return (f"name: {_pbtxt_string(name)}\nbackend: \"python\"\nmax_batch_size: 0\n"
            "model_transaction_policy { decoupled: true }\n"
            f"input [\n{tensors(GENERATE_INPUTS, True)}\n]\noutput [\n{tensors(GENERATE_OUTPUTS, False)}\n]\n"
            "instance_group [ { kind: KIND_CPU count: 1 } ]\n" + params + "\n")


def write_generate_model(repository: Path, name: str, unit_dir: Path, max_rows: int, threads: int | None) -> Path:
    """REPOSITORY/NAME/{config.pbtxt, 1/model.py} (the repository is a fresh directory serve owns)."""
    model_dir = repository / name
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text(model_config(name, unit_dir, max_rows, threads))
    (model_dir / "1" / "model.py").write_text(MODEL_FILE)
    return model_dir


# ---------------------------------------------------------------------------------------------- requests
@dataclass
class ParsedRequest:
    prompt: str | list[int]
    settings: SamplingSettings
    stream: bool


def _value(request: Any, pb_utils: Any, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy().reshape(-1)


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def parse_request(request: Any, pb_utils: Any) -> ParsedRequest:
    """The prompt, sampling settings and stream flag of a Triton request (PiMoEInputError naming what is wrong)."""
    unknown = sorted(json.loads(request.parameters() or "{}"))
    if unknown:
        raise PiMoEInputError(f"unknown parameter(s) {unknown}; this model takes {sorted(GENERATE_INPUTS)}")
    values = {name: _value(request, pb_utils, name) for name in GENERATE_INPUTS}
    text, ids = values["text_input"], values[MODEL_IDS_INPUT]
    if (text is None) == (ids is None):
        raise PiMoEInputError("give the prompt as text_input (text) or input_ids (token ids), one of the two")
    prompt: str | list[int] = _text(text[0]) if text is not None and text.size else \
        [int(t) for t in (ids if ids is not None else [])]
    scalar = {n: v[0].item() for n, v in values.items() if v is not None and v.size == 1 and n not in
              ("text_input", MODEL_IDS_INPUT, "stop")}
    settings = SamplingSettings(
        max_new_tokens=int(scalar.get("max_tokens", DEFAULT_MAX_NEW_TOKENS)),
        temperature=float(scalar.get("temperature", 0.0)), top_k=int(scalar.get("top_k", 0)),
        top_p=float(scalar.get("top_p", 1.0)), seed=None if "seed" not in scalar else int(scalar["seed"]),
        stop=tuple(_text(s) for s in values["stop"]) if values["stop"] is not None else ())
    return ParsedRequest(prompt, settings, bool(scalar.get("stream", False)))


# ---------------------------------------------------------------------------------------------- the model
class _Reply:
    """Sends one request's answers: a response per token when streaming, else one at the end."""

    def __init__(self, sender: Any, pb_utils: Any, stream: bool, metrics: Metrics) -> None:
        self.sender, self.pb, self.stream, self.metrics = sender, pb_utils, stream, metrics
        self.tokens: list[int] = []
        self.text: list[str] = []

    def response(self, text: str, tokens: list[int], reason: str) -> Any:
        pb = self.pb
        return pb.InferenceResponse(output_tensors=[
            pb.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_)),
            pb.Tensor("token_ids", np.array(tokens, np.int64)),
            pb.Tensor("finish_reason", np.array([reason.encode("utf-8")], dtype=np.object_))])

    def __call__(self, event: Any) -> None:
        final = self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        if event.token_id is not None:
            self.metrics.count("tokens")
            self.tokens.append(event.token_id)
            self.text.append(event.text or "")
        if event.finish_reason is not None:
            self.metrics.count("requests", event.finish_reason)
        try:
            if event.finish_reason == "error":
                self.sender.send(self.pb.InferenceResponse(error=self.pb.TritonError(event.error or "failed")),
                                 flags=final)
            elif event.finish_reason == "cancelled":
                self.sender.send(flags=final)
            elif self.stream:
                self.sender.send(self.response(event.text or "", [event.token_id], event.finish_reason or ""),
                                 flags=final if event.finish_reason else 0)
            elif event.finish_reason:
                self.sender.send(self.response("".join(self.text), self.tokens, event.finish_reason), flags=final)
        except Exception:  # the client is gone: Triton cancels the request, the batcher drops its row
            pass


class Metrics:
    """The model's counters on Triton's metrics endpoint (see the module docstring)."""

    def __init__(self, pb_utils: Any) -> None:
        counter = pb_utils.MetricFamily.COUNTER
        self._families = {
            "requests": pb_utils.MetricFamily(name="pimoe_generate_requests_total", description="generate requests "
                                              "ended, by finish reason", kind=counter),
            "tokens": pb_utils.MetricFamily(name="pimoe_generate_tokens_total", description="tokens generated",
                                            kind=counter),
            "steps": pb_utils.MetricFamily(name="pimoe_generate_steps_total", description="decode steps",
                                           kind=counter),
            "rows": pb_utils.MetricFamily(name="pimoe_generate_step_rows_total", description="rows decoded, summed "
                                          "over decode steps", kind=counter)}
        self._metrics: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()

    def count(self, family: str, reason: str = "", value: int = 1) -> None:
        with self._lock:
            key = (family, reason)
            if key not in self._metrics:
                self._metrics[key] = self._families[family].Metric(labels={"reason": reason} if reason else {})
            self._metrics[key].increment(value)


class TritonPythonModel:
    """The Triton Python-backend model (see the module docstring); runs in Triton's stub process."""

    def initialize(self, args: dict[str, Any]) -> None:
        import triton_python_backend_utils as pb_utils

        from pimoe_export.runtime.engine import Engine
        from pimoe_export.runtime.generation import ContinuousBatcher

        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        self.pb = pb_utils
        self.metrics = Metrics(pb_utils)
        self.engine = Engine.load(params["unit"], threads=int(params["threads"]) or None)
        self.spec = self.engine.decoder_spec
        if self.spec is None:
            raise PiMoEInputError(f"{params['unit']} is not a decoder unit")
        self.batcher = ContinuousBatcher(self.engine.decoder(), max_rows=int(params["max_rows"]),
                                         on_step=self._on_step)
        self.batcher.start()

    def _on_step(self, rows: int) -> None:
        self.metrics.count("steps")
        self.metrics.count("rows", value=rows)

    def execute(self, requests: list[Any]) -> None:
        from pimoe_export.runtime.generation import Request

        for request in requests:
            sender = request.get_response_sender()
            try:
                parsed = parse_request(request, self.pb)
                reply = _Reply(sender, self.pb, parsed.stream, self.metrics)
                prompt = self.engine.prompt_ids(parsed.prompt)[0]
                self.batcher.submit(Request(0, prompt, parsed.settings, self.spec, self.engine.tokenizer,
                                            on_token=reply, is_cancelled=sender.is_cancelled))
            except Exception as exc:  # every request gets its FINAL response, or its client waits
                self.metrics.count("requests", "refused")
                message = str(exc) if isinstance(exc, PiMoEError) else f"bad request ({type(exc).__name__}: {exc})"
                sender.send(self.pb.InferenceResponse(error=self.pb.TritonError(message)),
                            flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None

    def finalize(self) -> None:
        self.batcher.stop()
        self.engine.close()
