"""`pimoe-export serve` on a decoder unit: Triton's generate extension on the real tritonserver.

One server per decoder family (tests/decoders.py) runs as a subprocess for the module. Every answer is compared with
``Engine.generate`` on the same unit in this process (the independent reference: the server decodes in Triton's stub
process, batching concurrent requests per decode step). Counters come from Triton's metrics endpoint.
"""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from decoders import FAMILIES
from servers import free_ports, ready_server

from pimoe_export.runtime.engine import Engine

pytest.importorskip("pytriton.triton", reason="nvidia-pytriton is not installed (the serve extra; scripts/setup.sh "
                                              "installs it)")
pytestmark = pytest.mark.slow
STARTUP_S = 180
MODEL = "llm"
PROMPTS = ["the cat sat", "dog ran far away", "moe expert token route fast", "on the mat", "far away the dog",
           "route", "token token", "the expert ran on the mat and the cat sat far away"]


class Served:
    def __init__(self, process: subprocess.Popen, log: Path, ports: list[int], engine: Engine) -> None:
        self.process, self.log, self.engine = process, log, engine
        self.http_port, self.metrics_port = ports[0], ports[2]

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def post(self, endpoint: str, body: dict, timeout: float = 60) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=timeout)
        try:
            conn.request("POST", f"/v2/models/{MODEL}/{endpoint}", json.dumps(body))
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def stream(self, body: dict, events: int | None = None) -> list[dict]:
        """generate_stream's server-sent events (``events``: hang up after that many)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=60)
        conn.request("POST", f"/v2/models/{MODEL}/generate_stream", json.dumps({**body, "stream": True}))
        response = conn.getresponse()
        received = []
        try:
            while events is None or len(received) < events:
                line = response.readline()
                if not line:
                    break
                if line.startswith(b"data: "):
                    received.append(json.loads(line[6:]))
        finally:
            conn.sock.close() if conn.sock is not None else None
            conn.close()
        return received

    def counter(self, name: str, reason: str | None = None) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        total = 0.0
        for labels, value in re.findall(rf"^{name}(?:{{([^}}]*)}})? (\S+)$", text, re.M):
            if reason is None or f'reason="{reason}"' in (labels or ""):
                total += float(value)
        return total


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def served(request, decoder_cases, tmp_path_factory):
    unit = decoder_cases(request.param).unit
    ports = free_ports(3)
    log = tmp_path_factory.mktemp("serve-generate") / "serve.log"
    argv = [sys.executable, "-m", "pimoe_export.cli", "serve", str(unit), "--name", MODEL, "--http-port",
            str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]), "--max-batch", "8",
            "--threads", "1"]
    with log.open("w") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    served = Served(process, log, ports, Engine.load(unit))
    with ready_server(process, served.output, STARTUP_S):
        yield served


def _ids(event: dict) -> list[int]:
    ids = event["token_ids"]
    return ids if isinstance(ids, list) else [ids]


def test_concurrent_streaming_clients_get_the_tokens_of_engine_generate(served) -> None:
    settings = [{"max_tokens": 24 + 2 * i} if i < 6 else {"max_tokens": 30, "temperature": 0.8, "top_k": 30,
                                                           "top_p": 0.9, "seed": 100 + i} for i in range(8)]
    expected = [served.engine.generate(p, max_new_tokens=s["max_tokens"], temperature=s.get("temperature", 0.0),
                                       top_k=s.get("top_k", 0), top_p=s.get("top_p", 1.0), seed=s.get("seed"))[0]
                for p, s in zip(PROMPTS, settings, strict=True)]
    steps, rows = served.counter("pimoe_generate_steps_total"), served.counter("pimoe_generate_step_rows_total")
    results: list[list[dict] | None] = [None] * 8
    start = threading.Barrier(8)

    def client(i: int) -> None:
        start.wait()
        results[i] = served.stream({"text_input": PROMPTS[i], **settings[i]})

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for events, reference in zip(results, expected, strict=True):
        assert events, served.output()[-2000:]
        assert [t for e in events for t in _ids(e)] == reference.token_ids
        assert "".join(e["text_output"] for e in events) == reference.text
        assert [e["finish_reason"] for e in events] == [""] * (len(events) - 1) + [reference.finish_reason]
    # requests shared decode steps: more rows than steps since the clients started
    decoded = served.counter("pimoe_generate_step_rows_total") - rows
    assert decoded > served.counter("pimoe_generate_steps_total") - steps


def test_generate_answers_once_with_the_whole_text(served) -> None:
    status, body = served.post("generate", {"text_input": PROMPTS[2], "max_tokens": 12})
    assert status == 200, body
    answer = json.loads(body)
    reference = served.engine.generate(PROMPTS[2], max_new_tokens=12)[0]
    assert answer["token_ids"] == reference.token_ids and answer["text_output"] == reference.text
    assert answer["finish_reason"] == reference.finish_reason
    ids = served.engine.prompt_ids(PROMPTS[2])[0]
    status, body = served.post("generate", {"input_ids": ids, "parameters": {"max_tokens": 12}})
    assert status == 200 and json.loads(body)["token_ids"] == reference.token_ids
    stop = reference.text[3:6]
    status, body = served.post("generate", {"text_input": PROMPTS[2], "max_tokens": 12, "stop": [stop]})
    assert json.loads(body)["text_output"] == reference.text[: reference.text.find(stop)]


def test_a_client_that_hangs_up_is_cancelled_and_frees_its_slot(served) -> None:
    cancelled = served.counter("pimoe_generate_requests_total", "cancelled")
    tokens = served.counter("pimoe_generate_tokens_total")
    events = served.stream({"text_input": PROMPTS[0], "max_tokens": 2000}, events=3)
    assert len(events) == 3
    deadline = time.monotonic() + 60
    while served.counter("pimoe_generate_requests_total", "cancelled") == cancelled:
        assert time.monotonic() < deadline, "the abandoned request was never cancelled"
        time.sleep(0.1)
    assert served.counter("pimoe_generate_tokens_total") - tokens < 2000  # it stopped early
    status, body = served.post("generate", {"text_input": PROMPTS[1], "max_tokens": 8})
    assert status == 200 and json.loads(body)["token_ids"] == served.engine.generate(PROMPTS[1],
                                                                                     max_new_tokens=8)[0].token_ids


@pytest.mark.parametrize(("body", "message"), [
    ({"text_input": "", "max_tokens": 4}, "prompt is empty"),
    ({"text_input": "the cat", "max_tokens": 5000}, "context length"),
    ({"text_input": "the cat", "max_tokens": 4, "frequency_penalty": 1.0}, "unknown parameter"),
    ({"text_input": "the cat", "parameters": {"best_of": 2}}, "unknown parameter"),
    ({"max_tokens": 4}, "text_input"),
    ({"text_input": "the cat", "input_ids": [1, 2]}, "one of the two"),
    ({"text_input": "the cat", "temperature": -1.0}, "temperature"),
    ({"input_ids": [1, 10**6]}, "outside the vocabulary"),
])
def test_bad_requests_get_an_error_and_the_server_keeps_serving(served, body, message) -> None:
    status, answer = served.post("generate", body)
    assert status == 400 and message in json.loads(answer)["error"], answer
    events = served.stream(body)
    assert len(events) == 1 and message in events[0]["error"]
    status, answer = served.post("generate", {"text_input": "the cat", "max_tokens": 2})
    assert status == 200 and len(json.loads(answer)["token_ids"]) == 2
