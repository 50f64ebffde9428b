"""`pimoe-export serve`: a real Triton Inference Server (tritonserver from nvidia-pytriton) in front of units."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path

from pimoe_export.cli._common import integer

NAME = "serve"
HELP = ("serve units with a real Triton Inference Server (HTTP, gRPC, metrics; dynamic batching) until SIGINT/SIGTERM; "
        "needs the serve extra")


def configure(p: argparse.ArgumentParser) -> None:
    port = integer(1, 65535)
    p.add_argument("units", nargs="+", type=Path, metavar="UNIT", help="unit directories (manifest.json); each is "
                   "verified, loaded with Engine.load and served as one Triton model")
    p.add_argument("--name", help="model name (one unit only; default: <pipeline dir>_<unit dir>)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address HTTP, gRPC and metrics listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--http-port", type=port, default=8000, help="HTTP/REST port (default 8000)")
    p.add_argument("--grpc-port", type=port, default=8001, help="gRPC port (default 8001)")
    p.add_argument("--metrics-port", type=port, default=8002, help="Prometheus metrics port (default 8002)")
    p.add_argument("--max-batch", type=integer(0), default=8,
                   help="dynamic batching: at most N batch rows per execution (default 8; 0 turns batching off; "
                        "must fit the unit's profile); decoder units: the most sequences decoded together per step")
    p.add_argument("--queue-delay-us", type=integer(0), default=200,
                   help="dynamic batching: longest wait for more requests, in microseconds (default 200)")
    p.add_argument("--instances", type=integer(1, 64), default=1,
                   help="model instances per unit (concurrent executions; default 1)")
    p.add_argument("--threads", type=integer(1, 256), default=None,
                   help="ONNX Runtime intra-op threads per engine (default: ONNX Runtime's choice)")
    p.add_argument("--exit-timeout", type=integer(0, 3600), default=30,
                   help="on SIGINT/SIGTERM, wait at most this many seconds for in-flight requests (default 30)")


def run(args: argparse.Namespace) -> int:
    from pimoe_export.serve.server import ServeOptions, Server, import_pytriton, load_models

    import_pytriton()  # exit 3 with the install hint before any unit is loaded
    options = ServeOptions(host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
                           metrics_port=args.metrics_port, max_batch=args.max_batch,
                           queue_delay_us=args.queue_delay_us, instances=args.instances,
                           exit_timeout_s=args.exit_timeout)
    models = load_models(args.units, args.name, options, threads=args.threads)
    stop = threading.Event()
    received: list[str] = []

    def on_signal(signum: int, frame: object) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    server = Server(models, options)
    server.threads = args.threads
    try:
        server.start()
        urls = server.urls()
        for model in models:
            m = model.unit.manifest
            if model.generates:
                batching = f"generation, up to {model.max_batch} sequences per decode step"
            else:
                batching = f"dynamic batching up to {model.max_batch}" if model.batching else "no batching"
            print(f"serving {model.name!r} v{model.version}: {model.unit.dir} ({m.backend} "
                  f"{m.backend_version}, {m.precision}; {batching})")
        print(f"ready: HTTP {urls['http']}  gRPC {urls['grpc']}  metrics {urls['metrics']}", flush=True)
        while not stop.is_set() and server.is_alive():
            stop.wait(0.5)
        if not stop.is_set():
            print("pimoe-export serve: error: tritonserver exited unexpectedly; rerun with --debug before the command "
                  "name for details", file=sys.stderr)
            return 70
        print(f"{received[0]} received: finishing in-flight requests and stopping", flush=True)
        start = time.monotonic()
        server.stop()
        print(f"stopped in {time.monotonic() - start:.1f} s", flush=True)
        return 0
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
