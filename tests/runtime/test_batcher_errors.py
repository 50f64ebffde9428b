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


class RecordingQueue(queue.Queue):
    """A queue that records the timeout of every get."""

    def __init__(self) -> None:
        super().__init__()
        self.timeouts: list[float | None] = []

    def get(self, block: bool = True, timeout: float | None = None):  # type: ignore[override]
        self.timeouts.append(timeout)
        return super().get(block, timeout)


def test_waiting_requests_never_hold_up_a_decode_step_and_an_idle_batcher_blocks() -> None:
    """While rows decode, the batcher only polls the queue (timeout 0: a step is never delayed for arrivals); with
    nothing to decode it waits on the queue (a positive timeout, not a busy loop spinning a core); once one
    request is taken, it takes the others that are there without waiting."""
    batcher, decoding = _batcher()
    batcher._waiting = waiting = RecordingQueue()
    batcher._admit_waiting()  # idle, nothing queued
    assert len(waiting.timeouts) == 1 and (waiting.timeouts[0] or 0) > 0
    decoding.active = [FakeRequest("decoding")]
    waiting.timeouts.clear()
    batcher._admit_waiting()  # a row decodes, nothing queued
    assert waiting.timeouts == [0]
    decoding.active = []
    for name in ("a", "b"):
        waiting.put(FakeRequest(name))
    waiting.timeouts.clear()
    batcher._admit_waiting()  # idle, two queued: the first wait may block, the rest are polls
    assert (waiting.timeouts[0] or 0) > 0 and waiting.timeouts[1:] == [0, 0]
