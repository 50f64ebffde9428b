"""The serve batcher's thread survives any failure of one request or step: the request (or the step's requests)
ends with the error, later requests are still served (a dying thread would leave every client waiting)."""

from __future__ import annotations

import queue
import threading
import time

from pimoe_export.errors import RunError
from pimoe_export.runtime.generation import ContinuousBatcher


class FakeRequest:
    def __init__(self, name: str) -> None:
        self.name, self.ended = name, threading.Event()
        self.status: tuple[str, str | None] | None = None

    def cancelled(self) -> bool:
        return False

    def end(self, status: str, message: str | None = None) -> None:
        self.status = (status, message)
        self.ended.set()


class FakeDecoding:
    """admit: the request named "bad-prefill" raises a non-pimoe error; step: the first step raises one too."""

    def __init__(self) -> None:
        self.active: list[FakeRequest] = []
        self.failures: list[str] = []
        self.steps = 0

    def admit(self, requests: list[FakeRequest]) -> None:
        for request in requests:
            if request.name == "bad-prefill":
                raise ValueError("a tokenizer could not decode this")
            request.end("done")

    def step(self) -> int:
        self.steps += 1
        if self.steps == 1:
            raise IndexError("a numpy error in a step")
        if self.steps == 2:
            raise RunError("the backend refused the step")
        return 0

    def fail(self, message: str) -> None:
        self.failures.append(message)


def _batcher() -> tuple[ContinuousBatcher, FakeDecoding]:
    batcher = ContinuousBatcher.__new__(ContinuousBatcher)  # the threading of the real class, a fake decoder state
    decoding = FakeDecoding()
    batcher.decoding, batcher.max_rows, batcher.on_step = decoding, 4, None
    batcher._waiting, batcher._stop = queue.Queue(), threading.Event()
    batcher._thread = threading.Thread(target=batcher._run, daemon=True)
    return batcher, decoding


def test_a_failing_prefill_or_step_ends_its_requests_and_the_thread_goes_on() -> None:
    batcher, decoding = _batcher()
    batcher.start()
    try:
        bad, good = FakeRequest("bad-prefill"), FakeRequest("good")
        batcher.submit(bad)
        assert bad.ended.wait(10)
        assert bad.status is not None and bad.status[0] == "error" and "ValueError" in (bad.status[1] or "")
        batcher.submit(good)
        assert good.ended.wait(10) and good.status == ("done", None)
        deadline = time.monotonic() + 10
        while len(decoding.failures) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert decoding.failures[0].startswith("internal error: IndexError")
        assert decoding.failures[1] == "the backend refused the step"  # a pimoe error keeps its own message
        assert batcher._thread.is_alive()
    finally:
        batcher.stop(10)
    assert not batcher._thread.is_alive()
