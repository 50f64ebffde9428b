#!/usr/bin/env python3
"""Load test of `pimoe-export serve`: a real tritonserver on the loopback address, hammered by concurrent clients.

For each batching mode (dynamic batching on: --max-batch N; off: --max-batch 0) the script starts
`pimoe-export serve UNIT` on free 127.0.0.1 ports, then for each concurrency C runs C client threads (one
tritonclient each) for at most --duration seconds and --max-requests requests in all. Every request carries one of
--inputs distinct precomputed inputs and its answer is compared with `Engine.run_named` on that input, computed here
beforehand: a lost, failed or swapped answer (another client's output) counts as an error. Reported per cell:
requests, errors, tokens/s (answered tokens / wall time), client-side latency p50/p99, and the server's own count
of executions (Prometheus nv_inference_exec_count: requests per execution > 1 means dynamic batching grouped them).

    .venv/bin/python scripts/load_test.py engines/seed-512/ort-fp32 [--concurrency 1,4,16,64] [--duration 10]
        [--max-requests 5000] [--shape 1x64] [--protocol grpc] [--max-batch 16] [--queue-delay-us 500]
        [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pimoe_export.runtime.engine import Engine  # noqa: E402
from pimoe_export.serve.triton import default_model_name  # noqa: E402


@dataclass
class Cell:
    batching: str
    concurrency: int
    requests: int
    errors: int
    tokens_per_s: float
    p50_ms: float
    p99_ms: float
    executions: int
    compute_ms_per_execution: float
    wall_s: float


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def start_server(unit: Path, name: str, max_batch: int, delay_us: int, log: Path) -> tuple[subprocess.Popen, list[int]]:
    ports = free_ports(3)
    argv = [sys.executable, "-m", "pimoe_export.cli", "serve", str(unit), "--name", name, "--host", "127.0.0.1",
            "--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]),
            "--max-batch", str(max_batch), "--queue-delay-us", str(delay_us)]
    with log.open("w") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while "ready: HTTP" not in log.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise SystemExit(f"serve did not start (log {log}):\n{log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.2)
    return process, ports


def stop_server(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(120)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def counters(metrics_port: int, name: str) -> tuple[float, float, float]:
    """(executions, successful requests, compute microseconds) so far, from the server's Prometheus counters. Triton
    adds an execution's compute time to each request it carried, so compute / requests = time per execution."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    values = []
    for metric in ("nv_inference_exec_count", "nv_inference_request_success", "nv_inference_compute_infer_duration_us"):
        match = re.search(rf'^{metric}{{model="{re.escape(name)}",version="1"}} (\S+)$', text, re.M)
        values.append(float(match.group(1)) if match else float("nan"))
    return values[0], values[1], values[2]


def matches(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> bool:
    """Equal to the reference within fp32 rounding (a batched execution may round differently), routing exact."""
    for key, value in expected.items():
        answer = got.get(key)
        if answer is None or answer.shape != value.shape or answer.dtype != value.dtype:
            return False
        if value.dtype.kind == "f":
            scale = float(np.abs(value).max()) or 1.0
            if not np.allclose(answer, value, rtol=1e-5, atol=1e-6 * scale):
                return False
        elif not np.array_equal(answer, value):
            return False
    return True


def client_loop(args: argparse.Namespace, port: int, name: str, inputs: list[np.ndarray],
                references: list[dict[str, np.ndarray]], worker: int, budget: dict, results: list) -> None:
    if args.protocol == "grpc":
        import tritonclient.grpc as client_module
    else:
        import tritonclient.http as client_module
    client = client_module.InferenceServerClient(f"127.0.0.1:{port}")
    outputs = list(references[0])
    latencies, failed, mismatched, i = [], 0, 0, 0
    try:
        while time.monotonic() < budget["deadline"]:
            with budget["lock"]:
                if budget["left"] <= 0:
                    break
                budget["left"] -= 1
            k = (worker * 7919 + i) % len(inputs)  # each client walks the inputs from its own offset
            i += 1
            tensor = client_module.InferInput(args.input_name, list(inputs[k].shape), "FP32")
            tensor.set_data_from_numpy(inputs[k])
            start = time.perf_counter()
            try:
                result = client.infer(name, [tensor])
                got = {key: result.as_numpy(key) for key in outputs}
            except Exception:  # a failed request is an error of the cell, not of the script
                failed += 1
                continue
            latencies.append(time.perf_counter() - start)
            mismatched += not matches(got, references[k])
    finally:
        client.close()
    results.append((latencies, failed, mismatched))


def run_cell(args: argparse.Namespace, ports: list[int], name: str, inputs: list[np.ndarray],
             references: list[dict[str, np.ndarray]], concurrency: int, batching: str,
             duration: float | None = None) -> Cell:
    port = ports[1] if args.protocol == "grpc" else ports[0]
    budget = {"deadline": time.monotonic() + (duration or args.duration), "left": args.max_requests,
              "lock": threading.Lock()}
    results: list = []
    time.sleep(0.5)  # let the previous cell's last counter updates land
    before = counters(ports[2], name)
    threads = [threading.Thread(target=client_loop, args=(args, port, name, inputs, references, w, budget, results))
               for w in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    latencies = np.array([x for lat, _, _ in results for x in lat])
    failed, mismatched = sum(r[1] for r in results), sum(r[2] for r in results)
    tokens = int(np.prod(inputs[0].shape[:2]))
    p50, p99 = (float(np.percentile(latencies, q)) * 1e3 for q in (50, 99)) if len(latencies) else (np.nan, np.nan)
    time.sleep(0.5)
    after = counters(ports[2], name)
    executions, served = int(after[0] - before[0]), after[1] - before[1]
    compute = (after[2] - before[2]) / 1e3 / served if served > 0 else float("nan")
    return Cell(batching, concurrency, len(latencies) + failed, failed + mismatched,
                round((len(latencies) - mismatched) * tokens / wall, 1), round(p50, 2), round(p99, 2),
                executions, round(compute, 2), round(wall, 2))


def markdown(cells: list[Cell]) -> str:
    rows = ["| batching | concurrency | requests | errors | tokens/s | p50 ms | p99 ms | executions | requests per "
            "execution | server compute ms per execution |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in cells:
        per = f"{c.requests / c.executions:.2f}" if c.executions > 0 else "n/a"
        rows.append(f"| {c.batching} | {c.concurrency} | {c.requests} | {c.errors} | {c.tokens_per_s:.0f} | "
                    f"{c.p50_ms:.1f} | {c.p99_ms:.1f} | {c.executions} | {per} | {c.compute_ms_per_execution:.1f} |")
    return "\n".join(rows)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("unit", type=Path, help="unit directory to serve (an onnxruntime unit on a CPU machine)")
    p.add_argument("--concurrency", default="1,4,16,64", help="client counts, comma-separated (default 1,4,16,64)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per cell, at most (default 10)")
    p.add_argument("--max-requests", type=int, default=5000, help="requests per cell, at most (default 5000)")
    p.add_argument("--shape", default="1x64", help="batch x sequence of every request (default 1x64)")
    p.add_argument("--inputs", type=int, default=64, help="distinct precomputed inputs (default 64)")
    p.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    p.add_argument("--max-batch", type=int, default=16, help="serve --max-batch when batching is on (default 16)")
    p.add_argument("--queue-delay-us", type=int, default=500, help="serve --queue-delay-us (default 500)")
    p.add_argument("--batching", choices=("both", "on", "off"), default="both")
    p.add_argument("--json", type=Path, help="also write the cells as JSON here")
    args = p.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.batch, args.sequence = (int(v) for v in args.shape.split("x"))
    if not (0 < args.duration <= 600 and 0 < args.max_requests <= 10**6 and min(args.concurrency) >= 1
            and max(args.concurrency) <= 256):
        p.error("--duration in (0, 600], --max-requests in 1..1e6, concurrency in 1..256")
    return args


def main() -> int:
    args = parse_args()
    engine = Engine.load(args.unit)
    hidden = engine.interface.inputs[0].dims[-1]
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((args.batch, args.sequence, hidden)).astype(np.float32) for _ in range(args.inputs)]
    if len(engine.interface.inputs) != 1 or engine.interface.inputs[0].dtype != "float32":
        raise SystemExit(f"{args.unit}: this load test drives layer units (one float32 input [batch, sequence, H]); "
                         f"this unit takes {[t.to_list() for t in engine.interface.inputs]}")
    args.input_name = engine.interface.inputs[0].name  # the unit's one input (a layer unit: hidden states)
    references = [engine.run_named({args.input_name: x}) for x in inputs]
    direct = []
    for x in inputs[:20]:  # the engine alone, in this process: what the server adds comes on top of this
        start = time.perf_counter()
        engine.run_named({args.input_name: x})
        direct.append(time.perf_counter() - start)
    engine.close()
    if any(matches(references[i], references[i + 1]) for i in range(len(references) - 1)):
        raise SystemExit("two distinct inputs have matching answers: a swapped answer would go unnoticed; use other "
                         "--shape/--inputs")
    name = default_model_name(args.unit)
    modes = {"both": ("on", "off"), "on": ("on",), "off": ("off",)}[args.batching]
    cells: list[Cell] = []
    for mode in modes:
        log = Path(tempfile.gettempdir()) / f"load_test_serve_{mode}.log"
        process, ports = start_server(args.unit, name, args.max_batch if mode == "on" else 0, args.queue_delay_us,
                                      log)
        try:
            run_cell(args, ports, name, inputs, references, 4, mode, duration=2.0)  # warm-up, not reported
            for concurrency in args.concurrency:
                cells.append(run_cell(args, ports, name, inputs, references, concurrency, mode))
                print(markdown(cells[-1:]).splitlines()[-1], flush=True)
        finally:
            code = stop_server(process)
        if code != 0:
            print(f"serve exited with {code} (log {log})", file=sys.stderr)
            return 1
    print(f"\n{engine.manifest.backend} {engine.manifest.precision} unit {args.unit}, requests {args.shape} "
          f"(hidden {hidden}), {args.protocol}, max batch {args.max_batch}, queue delay {args.queue_delay_us} us; "
          f"Engine.run alone in this process: median {np.median(direct) * 1e3:.1f} ms per request\n")
    print(markdown(cells))
    if args.json:
        args.json.write_text(json.dumps([asdict(c) for c in cells], indent=1))
    return 0 if all(c.errors == 0 for c in cells) else 1


if __name__ == "__main__":
    sys.exit(main())
