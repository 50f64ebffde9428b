"""`pimoe-export serve`: a real tritonserver (nvidia-pytriton) in front of the tiny preset's ORT fp32 and INT8 units.

One server (both units, dynamic batching up to 8 rows) is started as a subprocess for the whole module, on free
loopback ports; every answer is compared with `Engine.run_named` on the same unit in this process (the independent
reference: the server runs the unit through its own engine, in another process). The last test stops it with
SIGTERM while a request is in flight.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pytriton.triton", reason="nvidia-pytriton is not installed (the serve extra; scripts/setup.sh "
                                              "installs it)")
httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is not installed (the serve extra)")
grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed (the serve extra)")
from servers import free_ports, ready_server  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from pimoe_export.cli import main  # noqa: E402
from pimoe_export.runtime.engine import Engine  # noqa: E402

pytestmark = pytest.mark.slow
UNITS = ("ort-fp32", "ort-int8")
MAX_BATCH = 8
STARTUP_S = 180


@pytest.fixture(scope="module")
def units(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve") / "tiny"
    steps = [["create", "--preset", "tiny", "--seed", "3", "-o", str(root / "model")],
             ["export", str(root / "model"), "-o", str(root / "model.onnx")],
             ["quantize", str(root / "model"), "-o", str(root / "model.int8.onnx"), "--onnx", str(root / "model.onnx"),
              "--calib-tokens", "1024"],
             ["package", str(root / "model.onnx"), "-o", str(root / "ort-fp32")],
             ["package", str(root / "model.int8.onnx"), "-o", str(root / "ort-int8")]]
    for argv in steps:
        assert main(argv) == 0, argv
    return {u: root / u for u in UNITS}


class Served:
    def __init__(self, process: subprocess.Popen, log: Path, ports: list[int], engines: dict[str, Engine]) -> None:
        self.process, self.log, self.ports, self.engines = process, log, ports, engines
        self.http, self.grpc, self.metrics = (f"127.0.0.1:{p}" for p in ports)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def serving(unit_dirs: list[Path], options: list[str], log: Path, engines: dict[str, Engine]):
    """`pimoe-export serve UNITS OPTIONS` on free loopback ports, until it says it is ready; stopped with SIGTERM
    (killed after 60 s) on the way out."""
    ports = free_ports(3)
    argv = [sys.executable, "-m", "pimoe_export.cli", "serve", *map(str, unit_dirs),
            "--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]), *options]
    with log.open("w") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    served = Served(process, log, ports, engines)
    with ready_server(process, served.output, STARTUP_S):
        yield served


@pytest.fixture(scope="module")
def server(units, tmp_path_factory):
    engines = {f"tiny_{u}": Engine.load(path) for u, path in units.items()}
    with serving(list(units.values()), ["--max-batch", str(MAX_BATCH), "--queue-delay-us", "2000"],
                 tmp_path_factory.mktemp("serve-log") / "serve.log", engines) as served:
        yield served


def _infer(module, url: str, model: str, x: np.ndarray, name: str = "hidden_states", datatype: str = "FP32"):
    client = module.InferenceServerClient(url)
    try:
        tensor = module.InferInput(name, list(x.shape), datatype)
        tensor.set_data_from_numpy(x)
        result = client.infer(model, [tensor])
        return {k: result.as_numpy(k) for k in ("output", "expert_ids", "expert_weights")}
    finally:
        client.close()


def _tokens(seed: int, batch: int, sequence: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, sequence, 16)).astype(np.float32)


def _metric(served: Served, name: str, model: str) -> float:
    """Prometheus counter ``name`` of ``model``, summed over its other labels (failures carry a reason)."""
    text = urllib.request.urlopen(f"http://{served.metrics}/metrics", timeout=10).read().decode()
    values = [float(value) for labels, value in re.findall(rf"^{name}{{([^}}]*)}} (\S+)$", text, re.M)
              if f'model="{model}"' in labels.split(",")]
    assert values, f"{name} for {model} not in the metrics"
    return sum(values)


@pytest.mark.parametrize("model", [f"tiny_{u}" for u in UNITS])
def test_http_and_grpc_answers_equal_engine_run(server, model) -> None:
    for module, url in ((httpclient, server.http), (grpcclient, server.grpc)):
        client = module.InferenceServerClient(url)
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(model, "1")
        client.close()
        for seed, (batch, sequence) in enumerate([(1, 1), (2, 7), (MAX_BATCH, 33)]):
            x = _tokens(seed, batch, sequence)
            got = _infer(module, url, model, x)
            expected = server.engines[model].run_named({"hidden_states": x})
            for key, value in expected.items():  # one request at a time: executed alone, so bit-identical
                assert got[key].dtype == value.dtype and np.array_equal(got[key], value), (module.__name__, key)


def _client(server: Served, model: str, client_id: int, requests: int) -> list[str]:
    """One client's requests; a list of problems (errors, mismatches) for the caller to assert empty."""
    module, url = (httpclient, server.http) if client_id % 2 else (grpcclient, server.grpc)
    problems = []
    for i in range(requests):
        x = _tokens(1000 * client_id + i, 1 + i % 2, 3 + client_id % 4)  # some requests share shapes: batchable
        try:
            got = _infer(module, url, model, x)
        except InferenceServerException as exc:
            problems.append(f"client {client_id} request {i}: {exc}")
            continue
        expected = server.engines[model].run_named({"hidden_states": x})
        scale = float(np.abs(expected["output"]).max())
        if not (np.array_equal(got["expert_ids"], expected["expert_ids"])
                and np.allclose(got["output"], expected["output"], rtol=1e-5, atol=1e-6 * scale)
                and np.allclose(got["expert_weights"], expected["expert_weights"], rtol=1e-5, atol=1e-6)):
            problems.append(f"client {client_id} request {i}: answer differs from Engine.run on its own input")
    return problems


@pytest.mark.parametrize("model", [f"tiny_{u}" for u in UNITS])
def test_eight_concurrent_clients_all_answers_verified(server, model) -> None:
    before = _metric(server, "nv_inference_request_success", model), _metric(server, "nv_inference_request_failure",
                                                                              model)
    with ThreadPoolExecutor(8) as pool:
        problems = [p for found in pool.map(lambda c: _client(server, model, c, 50), range(8)) for p in found]
    assert problems == []
    after = _metric(server, "nv_inference_request_success", model), _metric(server, "nv_inference_request_failure",
                                                                             model)
    assert (after[0] - before[0], after[1] - before[1]) == (400, 0)  # the server counted every one, none failed
    executions = _metric(server, "nv_inference_exec_count", model)
    assert 0 < executions <= after[0]


@pytest.mark.parametrize("module", ["http", "grpc"])
def test_bad_requests_get_an_error_and_the_server_keeps_serving(server, module) -> None:
    mod, url = (httpclient, server.http) if module == "http" else (grpcclient, server.grpc)
    model = "tiny_ort-fp32"
    bad = [  # (input, name, Triton datatype, what the error must say)
        (_tokens(1, 2, 5)[..., :15].copy(), "hidden_states", "FP32", r"shape"),  # hidden size 15, not 16
        (_tokens(1, 2, 5).astype(np.float64), "hidden_states", "FP64", r"data-type is 'FP64'.*expects 'FP32'"),
        (np.zeros((0, 5, 16), np.float32), "hidden_states", "FP32", r"."),  # empty batch
        (_tokens(1, MAX_BATCH + 1, 5), "hidden_states", "FP32", rf"batch-size must be <= {MAX_BATCH}"),  # oversized
        (_tokens(1, 1, 8193), "hidden_states", "FP32", r"outside this unit's profile"),  # longer than the profile
        (_tokens(1, 2, 5), "x", "FP32", r"unexpected inference input 'x'"),
    ]
    for x, name, datatype, message in bad:
        with pytest.raises(InferenceServerException, match=message):
            _infer(mod, url, model, x, name=name, datatype=datatype)
        good = _tokens(7, 2, 5)
        got = _infer(mod, url, model, good)
        assert np.array_equal(got["output"], server.engines[model].run(good))
    assert server.process.poll() is None


def test_a_client_that_disconnects_mid_request_does_not_disturb_the_others(server) -> None:
    """A raw HTTP request of about a second of work whose client hangs up right after sending it, while another
    client's requests go on: those are all answered correctly, and the server keeps serving."""
    import json

    model = "tiny_ort-fp32"
    x = _tokens(21, MAX_BATCH, 8192)
    header = json.dumps({"inputs": [{"name": "hidden_states", "shape": list(x.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}]}).encode()
    head = (f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: {server.http}\r\n"
            f"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: {len(header)}\r\n"
            f"Content-Length: {len(header) + x.nbytes}\r\n\r\n").encode()
    problems: list[str] = []
    other = threading.Thread(target=lambda: problems.extend(_client(server, model, 3, 20)))
    other.start()
    host, port = server.http.split(":")
    with socket.create_connection((host, int(port))) as raw:
        raw.sendall(head + header + x.tobytes())
    # ... and a second one that hangs up half-way through its body
    with socket.create_connection((host, int(port))) as raw:
        raw.sendall(head + header + x.tobytes()[: x.nbytes // 2])
    other.join(120)
    assert not other.is_alive() and problems == []
    good = _tokens(22, 1, 9)
    assert np.array_equal(_infer(grpcclient, server.grpc, model, good)["output"], server.engines[model].run(good))
    assert server.process.poll() is None


def _listening(pids: set[int]) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state that one of ``pids`` holds (from /proc)."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                address, port = fields[1].split(":")
                raw = bytes.fromhex(address)
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # kernel order, per 32-bit word
                found.append((socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, words),
                              int(port, 16)))
    return found


def _process_tree(root: int) -> set[int]:
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    tree, grew = {root}, True
    while grew:
        children = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= children
        grew = bool(children)
    return tree


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc to list listening sockets")
def test_listens_only_on_loopback_and_the_given_ports(server) -> None:
    listening = _listening(_process_tree(server.process.pid))
    assert sorted(port for _, port in listening) == sorted(server.ports), listening
    assert all(address in ("127.0.0.1", "::ffff:127.0.0.1") for address, _ in listening), listening


def test_refuses_a_tampered_unit(units, tmp_path, capsys) -> None:
    import shutil

    tampered = tmp_path / "tampered"
    shutil.copytree(units["ort-fp32"], tampered)
    onnx = tampered / "model.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx.write_bytes(bytes(data))
    http, grpc, metrics = free_ports(3)
    code = main(["serve", str(tampered), "--http-port", str(http), "--grpc-port", str(grpc),
                 "--metrics-port", str(metrics)])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "sha256" in err and str(tampered) in err, err


def test_sigterm_finishes_the_request_in_flight_and_stops(server) -> None:
    """Runs last: requests the server holds at SIGTERM are answered, then the process exits 0 and every port is
    released. Six large requests go in at once; the one model instance runs them one after another (~0.2 s each
    here), so some wait in the queue. SIGTERM is sent once the server's own metrics count queued requests (a client
    thread that is merely alive may not have sent its request yet on a loaded machine, and the server rightly refuses
    new connections after SIGTERM)."""
    model = "tiny_ort-fp32"
    inputs = [_tokens(11 + i, MAX_BATCH, 8192) for i in range(6)]
    results: dict[int, object] = {}

    def send(i: int) -> None:
        try:
            results[i] = _infer(httpclient, server.http, model, inputs[i])
        except Exception as exc:  # reported by the assertions below, with the client's message
            results[i] = exc

    senders = [threading.Thread(target=send, args=(i,)) for i in range(len(inputs))]
    for sender in senders:
        sender.start()
    pending, deadline = 0.0, time.monotonic() + 60
    while pending < 1 and time.monotonic() < deadline and any(s.is_alive() for s in senders):
        pending = _metric(server, "nv_inference_pending_request_count", model)
        time.sleep(0.01)
    assert pending >= 1, f"no request was queued while the six were sent ({results}); nothing to check in flight"
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(90) == 0, server.output()[-3000:]
    for sender in senders:
        sender.join(30)
    answered = [i for i, r in results.items() if isinstance(r, dict)]
    # every request queued when SIGTERM went out is answered (and any that ran before), with the right numbers
    assert len(answered) >= pending, f"{pending:g} requests queued at SIGTERM, answers: {results}"
    for i in answered:
        assert np.array_equal(results[i]["output"], server.engines[model].run(inputs[i]))
    assert "SIGTERM received" in server.output()
    for port in server.ports:
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still accepts connections"


def test_batching_turned_off_serves_each_request_alone_with_its_own_batch_axis(units, tmp_path) -> None:
    """--max-batch 0 (and two instances, no queue delay): Triton's model has no batcher (max_batch_size 0) and the
    batch axis is part of every tensor's dims, so a request of any batch the unit's profile holds is answered, even
    one larger than a batching server would take; every answer is Engine.run_named's on that request alone."""
    name = "tiny_alone"
    engine = Engine.load(units["ort-fp32"])
    options = ["--name", name, "--max-batch", "0", "--instances", "2", "--queue-delay-us", "0"]
    with serving([units["ort-fp32"]], options, tmp_path / "serve.log", {name: engine}) as served:
        assert "no batching" in served.output()
        client = httpclient.InferenceServerClient(served.http)
        try:
            config = client.get_model_config(name)
        finally:
            client.close()
        assert config.get("max_batch_size", 0) == 0 and "dynamic_batching" not in config, config
        dims = {t["name"]: [int(d) for d in t["dims"]] for t in (*config["input"], *config["output"])}
        assert dims == {"hidden_states": [-1, -1, 16], "output": [-1, -1, 16], "expert_ids": [-1, -1, 2],
                        "expert_weights": [-1, -1, 2]}, config
        assert len(config["instance_group"]) == 1 and config["instance_group"][0]["count"] == 2, config
        for module, url in ((httpclient, served.http), (grpcclient, served.grpc)):
            for seed, (batch, sequence) in enumerate([(1, 1), (3, 7), (MAX_BATCH + 1, 5)]):
                x = _tokens(100 + seed, batch, sequence)
                got = _infer(module, url, name, x)
                for key, value in engine.run_named({"hidden_states": x}).items():
                    assert got[key].shape == value.shape and np.array_equal(got[key], value), (module.__name__, key)
        served.process.send_signal(signal.SIGTERM)
        assert served.process.wait(90) == 0, served.output()[-3000:]


def test_the_stub_gets_this_interpreters_libpython_first() -> None:
    import sysconfig

    from pimoe_export.serve.server import stub_environment

    libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    if not (sysconfig.get_config_var("Py_ENABLE_SHARED") and (Path(libdir) / soname).exists()):
        pytest.skip("this interpreter has no shared libpython (the system Python's is found without help)")
    env = stub_environment({"LD_LIBRARY_PATH": f"/opt/other:{libdir}"})
    assert env["LD_LIBRARY_PATH"].split(":") == [libdir, "/opt/other"]  # first, once, the rest kept in order
    assert stub_environment({"LD_LIBRARY_PATH": env["LD_LIBRARY_PATH"]}) == {}  # already right: nothing to change
    assert stub_environment({})["LD_LIBRARY_PATH"] == libdir


def test_without_pytriton_serve_exits_3_naming_the_extra(units, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "pytriton.triton", None)  # `import pytriton.triton` now raises ImportError
    assert main(["serve", str(units["ort-fp32"])]) == 3
    err = capsys.readouterr().err
    assert "nvidia-pytriton" in err and "'.[serve]'" in err, err
