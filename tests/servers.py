"""What the tests that start `pimoe-export serve` share: free local ports, and waiting for the server to say it is
ready, then stopping it with SIGTERM (killed if it has not stopped a minute later)."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


def free_ports(n: int) -> list[int]:
    """n ports free on 127.0.0.1 now (all held open together while chosen, so they differ)."""
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@contextmanager
def ready_server(process: subprocess.Popen, output: Callable[[], str], startup_s: float) -> Iterator[None]:
    """Wait until the server's output says "ready: HTTP" (failing with its output if it exits or takes longer than
    ``startup_s``), run the body, then stop it."""
    try:
        deadline = time.monotonic() + startup_s
        while "ready: HTTP" not in output():
            assert process.poll() is None, f"serve exited with {process.returncode}:\n{output()[-3000:]}"
            assert time.monotonic() < deadline, f"serve not ready after {startup_s} s:\n{output()[-3000:]}"
            time.sleep(0.2)
        yield
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
