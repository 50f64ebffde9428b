"""`pimoe-export serve` options at values other than their defaults, in this process (no tritonserver): the command's
flags reach ServeOptions; batching turned off (--max-batch 0) gives Triton models without a batcher whose tensors
keep their batch axis, and runs every request alone; a batch limit the unit's profile cannot hold is refused; the
instance count and queue delay reach Triton's model configuration.

Triton itself is replaced by a recorder of what the server binds (pytriton's Triton class); answers are compared
with Engine.run_named on each request alone (the server must compute exactly that)."""

from __future__ import annotations

import re
import socket
import threading
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from servers import free_ports

pytest.importorskip("pytriton.triton", reason="nvidia-pytriton is not installed (the serve extra)")

from pimoe_export.build.units import package_ort
from pimoe_export.errors import PiMoEInputError, PluginLoadError
from pimoe_export.interface import Profile
from pimoe_export.serve.server import (
    ServedModel,
    ServeError,
    ServeOptions,
    Server,
    check_ports_free,
    infer_requests,
    load_models,
    make_infer_function,
    stub_environment,
    triton_config,
    triton_tensors,
)

PROFILE = Profile((1, 1), (2, 8), (4, 64))


@pytest.fixture(scope="module")
def units(exported_layer, tmp_path_factory) -> dict[str, Path]:
    """Two units of the tiny layer under a pipeline folder: batch 1..4 and batch 2..4 (which cannot batch)."""
    _, onnx_path = exported_layer("tiny", 3)
    root = tmp_path_factory.mktemp("serve-options") / "tiny"
    try:
        package_ort(onnx_path, root / "ort-fp32", profile=PROFILE)
        package_ort(onnx_path, root / "min2", profile=Profile((2, 1), (2, 8), (4, 64)))
    except PluginLoadError as exc:
        pytest.skip(f"libpimoe_ort is not built: {exc}")
    return {"ort": root / "ort-fp32", "min2": root / "min2"}


def tokens(seed: int, batch: int, sequence: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, sequence, 16)).astype(np.float32)


class CountingEngine:
    """The engine, counting its run_named calls and the batch of each."""

    def __init__(self, engine) -> None:
        self.engine, self.batches = engine, []
        self.interface, self.manifest, self.unit_dir = engine.interface, engine.manifest, engine.unit_dir

    def run_named(self, feeds):
        self.batches.append(next(iter(feeds.values())).shape[0])
        return self.engine.run_named(feeds)

    def close(self) -> None:
        self.engine.close()


# ------------------------------------------------------------------------------------------ options -> models
def test_batching_off_serves_every_unit_without_a_batcher(units) -> None:
    models = load_models([units["ort"], units["min2"]], None, ServeOptions(max_batch=0))
    try:
        assert [(m.name, m.batching, m.max_batch) for m in models] == [("tiny_ort-fp32", False, 0),
                                                                        ("tiny_min2", False, 0)]
    finally:
        for m in models:
            m.engine.close()


def test_a_decoder_unit_is_verified_and_served_by_its_generate_model(decoder_cases, tmp_path) -> None:
    """A decoder unit is not loaded in the server process (Triton's generate model loads it in its stub): it is
    verified here, served with no engine, and decodes up to --max-batch rows together (1 with batching off); a
    decoder unit whose files do not match its manifest is refused before anything is served."""
    import shutil

    from decoders import FAMILIES

    from pimoe_export.errors import ArtifactError

    case = decoder_cases(next(iter(FAMILIES)))
    (model,) = load_models([case.unit], "d", ServeOptions(max_batch=2))
    assert (model.name, model.engine, model.generates, model.batching, model.max_batch) == ("d", None, True, True, 2)
    assert model.unit.dir == case.unit and model.unit.manifest.decoder_spec is not None
    (alone,) = load_models([case.unit], "d", ServeOptions(max_batch=0))
    assert (alone.batching, alone.max_batch) == (False, 1)
    tampered = tmp_path / "unit"
    shutil.copytree(case.unit, tampered)
    onnx_file = tampered / "model.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes() + b"\0")
    with pytest.raises(ArtifactError, match=r"model\.onnx"):
        load_models([tampered], "d", ServeOptions(max_batch=2))


@pytest.mark.parametrize(("max_batch", "refused"), [(1, False), (3, False), (4, False), (5, True)])
def test_the_batch_limit_must_fit_the_profile(units, max_batch, refused) -> None:
    if refused:
        with pytest.raises(ServeError, match=rf"--max-batch {max_batch} does not fit .*profile \(batch 1\.\.4\); use "
                                             r"--max-batch between 1 and 4, or 0"):
            load_models([units["ort"]], "m", ServeOptions(max_batch=max_batch))
        return
    (model,) = load_models([units["ort"]], "m", ServeOptions(max_batch=max_batch))
    model.engine.close()
    assert (model.name, model.batching, model.max_batch) == ("m", True, max_batch)


def test_a_unit_whose_batch_starts_above_1_cannot_batch_but_serves_alone(units) -> None:
    with pytest.raises(ServeError, match=r"does not fit .*profile \(batch 2\.\.4\)"):
        load_models([units["min2"]], None, ServeOptions(max_batch=2))
    (model,) = load_models([units["min2"]], None, ServeOptions(max_batch=0))
    model.engine.close()
    assert not model.batching


@pytest.mark.parametrize(("options", "fragment"), [
    (ServeOptions(http_port=9000, grpc_port=9000), "must be distinct"),
    (ServeOptions(metrics_port=0), "must be distinct and in 1..65535"),
    (ServeOptions(grpc_port=65536), "must be distinct and in 1..65535"),
    (ServeOptions(max_batch=-1), "--max-batch and --queue-delay-us must be >= 0"),
    (ServeOptions(queue_delay_us=-1), "--max-batch and --queue-delay-us must be >= 0"),
    (ServeOptions(instances=0), "--instances >= 1"),
])
def test_options_no_server_can_take_are_refused_before_any_unit_is_loaded(tmp_path, options, fragment) -> None:
    with pytest.raises(ServeError, match=fragment):
        load_models([tmp_path / "not-a-unit"], None, options)


def test_ports_at_the_ends_of_their_range_are_accepted(units) -> None:
    (model,) = load_models([units["ort"]], None, ServeOptions(http_port=1, grpc_port=65535, metrics_port=2,
                                                              max_batch=0, queue_delay_us=0, instances=64))
    model.engine.close()


@pytest.mark.parametrize(("names", "name", "fragment"), [
    (["ort", "min2"], "both", "--name names one model, but 2 units were given"),
    (["ort"], ".hidden", "is not usable by Triton"),
    (["ort"], "a b", "is not usable by Triton"),
    (["ort"], "", "is not usable by Triton"),
    (["ort", "ort"], None, "two units would be served under the same model name"),
])
def test_model_names_triton_cannot_take_are_refused(units, names, name, fragment) -> None:
    with pytest.raises(ServeError, match=fragment):
        load_models([units[n] for n in names], name, ServeOptions(max_batch=0))


def test_names_triton_takes(units) -> None:
    for name in ("a", "m_1.v-2", "_x", "9"):
        (model,) = load_models([units["ort"]], name, ServeOptions(max_batch=0))
        model.engine.close()
        assert model.name == name


def test_default_names_are_names_triton_takes(tmp_path) -> None:
    """A unit's default model name (<pipeline dir>_<unit dir>) is one Triton takes whatever the folders are called:
    letters, digits, '_', '-' and '.', not starting with '.'."""
    from pimoe_export.serve.triton import default_model_name

    takes = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
    for parent, unit in ((".hidden", "ort-fp32"), ("..", "u"), ("a b", ".u"), ("out", "trt fp16"), ("é", "ü")):
        name = default_model_name(tmp_path / parent / unit)
        assert takes.fullmatch(name), (parent, unit, name)
    assert default_model_name(tmp_path / "seed-512" / "trt-fp32") == "seed-512_trt-fp32"


# ------------------------------------------------------------------------------------------ requests
@pytest.mark.parametrize("batching", [False, True])
def test_requests_are_run_alone_without_batching_and_joined_with_it(units, batching) -> None:
    """Requests of equal [sequence, H] are joined along the batch axis only with batching; the answers are each
    request's own either way."""
    from pimoe_export.runtime.engine import Engine

    engine = CountingEngine(Engine.load(units["ort"]))
    model = ServedModel("m", engine.engine.unit, engine, batching=batching, max_batch=4 if batching else 0)
    shapes = [(1, 5), (2, 5), (1, 7), (1, 7), (1, 5)]
    requests = [{"hidden_states": tokens(i, *s)} for i, s in enumerate(shapes)]
    answers = infer_requests(model, requests)
    # joined: consecutive equal shapes only ((1,5)+(2,5), (1,7)+(1,7), (1,5)); alone: one call per request
    assert engine.batches == ([3, 2, 1] if batching else [1, 2, 1, 1, 1])
    assert model.calls == 1
    for request, answer in zip(requests, answers, strict=True):
        alone = engine.engine.run_named(request)
        assert set(answer) == set(alone)
        for key in alone:
            assert answer[key].shape == alone[key].shape
            np.testing.assert_array_equal(answer[key], alone[key], err_msg=key)
    engine.close()


def test_a_request_missing_an_input_is_refused_by_name(units) -> None:
    from pimoe_export.runtime.engine import Engine

    engine = Engine.load(units["ort"])
    model = ServedModel("tiny", engine.unit, engine)
    infer = make_infer_function(model)
    assert infer.__name__ == "infer_tiny"
    with pytest.raises(PiMoEInputError, match=r"^model tiny: model tiny takes the inputs \['hidden_states'\]; "
                                              r"missing \['hidden_states'\]$"):
        infer([{"x": tokens(0, 1, 3)}])
    with pytest.raises(PiMoEInputError, match=r"^model tiny: this fp32 unit takes float32 input, got float64"):
        infer([{"hidden_states": tokens(0, 1, 3).astype(np.float64)}])
    model.engine.close()
    with pytest.raises(PiMoEInputError, match=r"model tiny: the engine of .* was closed"):
        infer([{"hidden_states": tokens(0, 1, 3)}])
    assert make_infer_function(ServedModel("a.b-c", engine.unit, model.engine)).__name__ == "infer_a_b_c"


# ------------------------------------------------------------------------------------------ what Triton is told
class RecordingTriton:
    """Stands in for pytriton.triton.Triton: records the config and every bind."""

    instances: ClassVar[list] = []

    def __init__(self, config) -> None:
        self.config, self.bound, self.running, self.stopped = config, [], False, False
        RecordingTriton.instances.append(self)

    def bind(self, **kwargs) -> None:
        self.bound.append(kwargs)

    def run(self) -> None:
        self.running = True

    def is_alive(self) -> bool:
        return self.running and not self.stopped

    def stop(self) -> None:
        self.stopped = True


@pytest.mark.parametrize("max_batch", [0, 3])
def test_what_the_server_binds_for_each_option(units, monkeypatch, max_batch) -> None:
    import pytriton.triton

    monkeypatch.setattr(pytriton.triton, "Triton", RecordingTriton)
    RecordingTriton.instances = []
    http, grpc, metrics = free_ports(3)
    options = ServeOptions(host="127.0.0.1", http_port=http, grpc_port=grpc, metrics_port=metrics,
                           max_batch=max_batch, queue_delay_us=1234, instances=3, exit_timeout_s=7)
    models = load_models([units["ort"]], "tiny", options)
    server = Server(models, options)
    server.start()
    try:
        (triton,) = RecordingTriton.instances
        assert server.is_alive()
        (bound,) = triton.bound
        assert bound["model_name"] == "tiny" and bound["model_version"] == 1 and bound["strict"] is True
        assert len(bound["infer_func"]) == 3  # one inference function per instance
        config = bound["config"]
        assert config.batching is (max_batch > 0) and config.max_batch_size == max_batch
        assert config.batcher.max_queue_delay_microseconds == 1234
        shapes = {t.name: t.shape for t in (*bound["inputs"], *bound["outputs"])}
        if max_batch:  # Triton adds the batch axis itself
            assert shapes == {"hidden_states": (-1, 16), "output": (-1, 16), "expert_ids": (-1, 2),
                              "expert_weights": (-1, 2)}
        else:  # no batcher: the batch axis is the tensors' own
            assert shapes == {"hidden_states": (-1, -1, 16), "output": (-1, -1, 16), "expert_ids": (-1, -1, 2),
                              "expert_weights": (-1, -1, 2)}
        dtypes = {t.name: np.dtype(t.dtype) for t in (*bound["inputs"], *bound["outputs"])}
        assert dtypes == {"hidden_states": np.float32, "output": np.float32, "expert_ids": np.int32,
                          "expert_weights": np.float32}
        tc = triton.config
        assert (tc.http_address, tc.http_port, tc.grpc_address, tc.grpc_port, tc.metrics_address, tc.metrics_port) \
            == ("127.0.0.1", http, "127.0.0.1", grpc, "127.0.0.1", metrics)
        assert tc.exit_timeout_secs == 7 and tc.allow_metrics and not tc.allow_gpu_metrics
        assert server.urls() == {"http": f"http://127.0.0.1:{http}", "grpc": f"127.0.0.1:{grpc}",
                                 "metrics": f"http://127.0.0.1:{metrics}/metrics"}
        x = tokens(5, 2, 3)
        (answer,) = bound["infer_func"][2]([{"hidden_states": x}])
        np.testing.assert_array_equal(answer["output"], models[0].engine.run(x))
    finally:
        server.stop()
    assert triton.stopped and not server.is_alive()
    with pytest.raises(Exception, match="closed"):
        models[0].engine.run(tokens(0, 1, 1))


def test_decoder_units_get_generate_models_in_the_repository_triton_loads(units, monkeypatch, tmp_path) -> None:
    """A decoder unit (ServedModel without an engine here) is written as a generate model into the repository
    Triton is configured with: its config names the unit, the rows decoded together and the threads; the
    repository is the server's own and is gone after stop. An ONNX model unit is bound beside it."""
    import pytriton.triton

    from pimoe_export.serve.server import ServedModel

    monkeypatch.setattr(pytriton.triton, "Triton", RecordingTriton)
    RecordingTriton.instances = []
    http, grpc, metrics = free_ports(3)
    options = ServeOptions(host="127.0.0.1", http_port=http, grpc_port=grpc, metrics_port=metrics, max_batch=3)
    (layer,) = load_models([units["ort"]], "tiny", options)
    decoder_dir = tmp_path / "decoder-unit"
    decoder = ServedModel("chat", type("U", (), {"dir": decoder_dir})(), None, max_batch=5)
    server = Server([decoder, layer], options)
    server.threads = 2
    server.start()
    try:
        (triton,) = RecordingTriton.instances
        repository = Path(triton.config.model_repository)
        assert repository.is_dir() and sorted(p.name for p in repository.iterdir()) == ["chat"]
        config = (repository / "chat" / "config.pbtxt").read_text()
        assert 'name: "chat"' in config
        params = dict(re.findall(r'parameters \{ key: "(\w+)" value: \{ string_value: "([^"]*)" \} \}', config))
        assert params == {"unit": str(decoder_dir.resolve()), "max_rows": "5", "threads": "2"}
        assert (repository / "chat" / "1" / "model.py").is_file()
        assert [b["model_name"] for b in triton.bound] == ["tiny"]  # the decoder is Triton's own python model
    finally:
        server.stop()
    assert not repository.exists()


#: the load error tritonserver gave when PyTriton's handshake race hit a second instance (CI log, 2026-12-07)
RACE_ERROR = ("[400] load failed for model 'tiny': version 1 is at UNAVAILABLE state: Internal: TritonModelException: "
              "Model initialize error: Traceback (most recent call last):\n  File \"/tmp/folderheNxeF/1/model.py\", "
              "line 425, in initialize\n    inference_handler_config = get_config_from_handshake_server("
              "handshake_socket)\n  File \"/tmp/folderheNxeF/1/communication.py\", line 550, in "
              "get_config_from_handshake_server\n    sock.connect(socket_path.as_posix())\nConnectionRefusedError: "
              "[Errno 111] Connection refused\n")


class FailingTriton(RecordingTriton):
    """A RecordingTriton whose first ``failures`` runs fail with ``error`` (as Triton's client raises a load error)."""

    failures: ClassVar[int] = 0
    error: ClassVar[str] = RACE_ERROR

    def run(self) -> None:
        if len(RecordingTriton.instances) <= FailingTriton.failures:
            raise RuntimeError(FailingTriton.error)
        super().run()


@pytest.mark.parametrize(("failures", "error", "started"), [
    (1, RACE_ERROR, True),
    (2, RACE_ERROR, True),
    (3, RACE_ERROR, False),
    (1, RACE_ERROR.replace("ConnectionRefusedError", "TimeoutError"), False),
    (1, "[400] load failed for model 'tiny': version 1 is at UNAVAILABLE state: out of memory", False),
])
def test_a_start_hit_by_pytritons_handshake_race_is_started_again(units, monkeypatch, capsys, failures, error,
                                                                  started) -> None:
    """PyTriton's handshake race (the load error naming get_config_from_handshake_server and ConnectionRefusedError)
    stops that tritonserver and starts a fresh one, up to three starts in all, with the engines open throughout; the
    race three times is a ServeError saying what happened and what to do; any other load error is raised as it came,
    after one start. Every Triton started is stopped, except the one that serves."""
    import pytriton.triton

    monkeypatch.setattr(pytriton.triton, "Triton", FailingTriton)
    monkeypatch.setattr(FailingTriton, "failures", failures)
    monkeypatch.setattr(FailingTriton, "error", error)
    RecordingTriton.instances = []
    http, grpc, metrics = free_ports(3)
    options = ServeOptions(host="127.0.0.1", http_port=http, grpc_port=grpc, metrics_port=metrics, max_batch=3,
                           instances=2)
    models = load_models([units["ort"]], "tiny", options)
    server = Server(models, options)
    x = tokens(7, 2, 3)
    if started:
        server.start()
        try:
            tritons = RecordingTriton.instances
            assert len(tritons) == failures + 1 and server.is_alive()
            assert all(t.stopped for t in tritons[:-1]) and not tritons[-1].stopped
            (bound,) = tritons[-1].bound
            assert len(bound["infer_func"]) == 2
            (answer,) = bound["infer_func"][1]([{"hidden_states": x}])  # the engine was not closed by the retries
            np.testing.assert_array_equal(answer["output"], models[0].engine.run(x))
        finally:
            server.stop()
        said = capsys.readouterr().err
        assert said.count("PyTriton's handshake race failed a model load") == failures
        assert f"at start {failures} of 3 (--instances 2); starting tritonserver again" in said
        return
    expected = ServeError if failures == 3 else RuntimeError
    with pytest.raises(expected) as caught:
        server.start()
    if failures == 3:
        assert "could not load the models in 3 starts" in str(caught.value)
        assert "run serve again, or with --instances 1" in str(caught.value)
        assert "ConnectionRefusedError" in str(caught.value.__cause__)
    else:
        assert str(caught.value) == error
    assert len(RecordingTriton.instances) == failures and all(t.stopped for t in RecordingTriton.instances)
    assert not server.is_alive()
    with pytest.raises(Exception, match="closed"):  # a failed start closes the engines, as stop does
        models[0].engine.run(x)


def test_the_generate_models_config_reads_as_tritons_model_config(tmp_path) -> None:
    """config.pbtxt parsed with Triton's own ModelConfig schema (protobuf text format, as tritonserver reads it):
    a decoupled python model taking every generate input (optional) and giving its outputs, one CPU instance, its
    parameters as written; a unit path with quotes, a backslash and non-ASCII letters survives the quoting."""
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    from google.protobuf import text_format

    from pimoe_export.serve.generate_model import GENERATE_INPUTS, GENERATE_OUTPUTS, model_config

    unit = tmp_path / 'a "quoted" \\ ünït 模型'
    config = text_format.Parse(model_config("chat-1", unit, 4, None), model_config_pb2.ModelConfig())
    assert (config.name, config.backend, config.max_batch_size) == ("chat-1", "python", 0)
    assert config.model_transaction_policy.decoupled
    types = model_config_pb2.DataType
    assert [(t.name, types.Name(t.data_type), tuple(t.dims), t.optional) for t in config.input] == [
        (n, dtype, dims, True) for n, (dtype, dims) in GENERATE_INPUTS.items()]
    assert [(t.name, types.Name(t.data_type), tuple(t.dims)) for t in config.output] == [
        (n, dtype, dims) for n, (dtype, dims) in GENERATE_OUTPUTS.items()]
    assert [(g.kind, g.count) for g in config.instance_group] == [(model_config_pb2.ModelInstanceGroup.KIND_CPU, 1)]
    assert {k: v.string_value for k, v in config.parameters.items()} == {
        "unit": str(unit.resolve()), "max_rows": "4", "threads": "0"}


def test_urls_of_an_ipv6_host() -> None:
    server = Server([], ServeOptions(host="::1", http_port=1, grpc_port=2, metrics_port=3))
    assert server.urls() == {"http": "http://[::1]:1", "grpc": "[::1]:2", "metrics": "http://[::1]:3/metrics"}
    assert not server.is_alive()


def test_triton_config_listens_only_where_asked() -> None:
    config = triton_config(ServeOptions(host="10.1.2.3", http_port=18000, grpc_port=18001, metrics_port=18002,
                                        exit_timeout_s=11, log_verbose=2))
    assert (config.http_address, config.grpc_address, config.metrics_address) == ("10.1.2.3",) * 3
    assert (config.http_port, config.grpc_port, config.metrics_port) == (18000, 18001, 18002)
    assert config.exit_timeout_secs == 11 and config.log_verbose == 2
    assert not config.allow_sagemaker and not config.allow_vertex_ai and config.allow_cpu_metrics
    # False, not None: None leaves the flag off tritonserver's command line, whose default exports GPU metrics
    # wherever a GPU is
    assert config.allow_gpu_metrics is False


def test_triton_tensors_keep_fixed_dims_and_mark_dynamic_ones() -> None:
    from pimoe_export.interface import TensorInterface

    specs = [TensorInterface("input_ids", "int64", ("batch", "sequence")),
             TensorInterface("pooled", "float32", ("batch", 32))]
    assert [(t.name, t.shape, np.dtype(t.dtype)) for t in triton_tensors(specs, batching=False)] == \
        [("input_ids", (-1, -1), np.int64), ("pooled", (-1, 32), np.float32)]
    assert [t.shape for t in triton_tensors(specs, batching=True)] == [(-1,), (32,)]


def test_a_port_in_use_is_refused_naming_its_flag() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        free = free_ports(2)
        for flag, options in (("--http-port", ServeOptions(http_port=port, grpc_port=free[0], metrics_port=free[1])),
                              ("--grpc-port", ServeOptions(http_port=free[0], grpc_port=port, metrics_port=free[1])),
                              ("--metrics-port", ServeOptions(http_port=free[0], grpc_port=free[1],
                                                              metrics_port=port))):
            with pytest.raises(ServeError, match=rf"cannot listen on 127\.0\.0\.1:{port} .*choose another {flag}, or "
                                                 "another --host"):
                check_ports_free(options)
    check_ports_free(ServeOptions(http_port=free[0], grpc_port=free[1], metrics_port=free_ports(1)[0]))


def test_a_restart_waits_for_the_ports_and_then_gives_check_ports_frees_refusal() -> None:
    """Between two tritonserver starts, wait_ports_free waits while a port is still held and returns once it is
    free; a port held past the timeout is check_ports_free's refusal naming its flag."""
    from pimoe_export.serve.server import wait_ports_free

    free = free_ports(2)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    options = ServeOptions(http_port=free[0], grpc_port=taken.getsockname()[1], metrics_port=free[1])
    with pytest.raises(ServeError, match=r"choose another --grpc-port"):
        wait_ports_free(options, timeout_s=0.3)
    release = threading.Timer(0.5, taken.close)
    release.start()
    wait_ports_free(options, timeout_s=20)  # returns after the release, well before the timeout
    release.join()
    assert taken.fileno() == -1


def test_the_stub_finds_this_interpreters_libpython_first() -> None:
    import sysconfig

    libdir = sysconfig.get_config_var("LIBDIR")
    shared = bool(sysconfig.get_config_var("Py_ENABLE_SHARED"))
    soname = sysconfig.get_config_var("INSTSONAME") or ""
    if not (shared and libdir and (Path(libdir) / soname).exists()):
        pytest.skip("this Python has no shared libpython")
    assert stub_environment({}) == {"LD_LIBRARY_PATH": libdir}
    assert stub_environment({"LD_LIBRARY_PATH": f"/a:{libdir}:/b"}) == {"LD_LIBRARY_PATH": f"{libdir}:/a:/b"}
    assert stub_environment({"LD_LIBRARY_PATH": f"{libdir}:/a"}) == {}
    assert stub_environment({"LD_LIBRARY_PATH": "::/a:"}) == {"LD_LIBRARY_PATH": f"{libdir}:/a"}


# ------------------------------------------------------------------------------------------ the command's flags
def test_the_commands_flags_reach_the_server_options(units, monkeypatch) -> None:
    import pimoe_export.serve.server as server_module
    from pimoe_export.cli import main

    seen = {}

    def load(unit_dirs, name, options, threads=None):
        seen.update(units=list(unit_dirs), name=name, options=options, threads=threads)
        raise ServeError("stop here")
    monkeypatch.setattr(server_module, "load_models", load)
    argv = ["serve", str(units["ort"]), "--name", "x", "--host", "127.0.0.2", "--http-port", "18080", "--grpc-port",
            "18081", "--metrics-port", "18082", "--max-batch", "0", "--queue-delay-us", "0", "--instances", "4",
            "--threads", "2", "--exit-timeout", "5"]
    assert main(argv) == 2
    assert seen == {"units": [units["ort"]], "name": "x", "threads": 2, "options": ServeOptions(
        host="127.0.0.2", http_port=18080, grpc_port=18081, metrics_port=18082, max_batch=0, queue_delay_us=0,
        instances=4, exit_timeout_s=5)}
    assert main(["serve", str(units["ort"])]) == 2  # the defaults are ServeOptions' own
    assert seen["options"] == ServeOptions() and seen["name"] is None and seen["threads"] is None


@pytest.mark.parametrize("threads", [1, 3])
def test_the_thread_count_reaches_each_layer_units_session(units, threads) -> None:
    """`serve --help`: "--threads THREADS  ONNX Runtime intra-op threads per engine": load_models(threads=N) runs
    every layer unit's session on N intra-op threads."""
    models = load_models([units["ort"], units["min2"]], None, ServeOptions(max_batch=0), threads=threads)
    try:
        assert [m.engine.session.get_session_options().intra_op_num_threads for m in models] == [threads, threads]
    finally:
        for model in models:
            model.engine.close()


class _QuietServer:
    """Server's place in the command: alive until ``alive`` checks have passed; at check ``signal_at`` a SIGINT
    arrives (what Ctrl-C or the orchestrator sends)."""

    def __init__(self, alive: int, signal_at: int | None) -> None:
        self.alive, self.signal_at, self.checks, self.stops, self.threads = alive, signal_at, 0, 0, None

    def start(self) -> None:
        pass

    def urls(self) -> dict[str, str]:
        return {"http": "h", "grpc": "g", "metrics": "m"}

    def is_alive(self) -> bool:
        import os
        import signal

        self.checks += 1
        if self.checks == self.signal_at:
            os.kill(os.getpid(), signal.SIGINT)  # its handler runs in this (main) thread before the next check
        return self.checks <= self.alive

    def stop(self) -> None:
        self.stops += 1


@pytest.mark.parametrize(("alive", "signal_at", "code", "said"), [
    (1000, 3, 0, "SIGINT received: finishing in-flight requests and stopping"),
    (2, None, 70, "pimoe-export serve: error: tritonserver exited unexpectedly"),
])
def test_the_command_serves_until_a_signal_or_the_servers_end(units, monkeypatch, capsys, alive, signal_at, code,
                                                              said) -> None:
    """The command waits while the server lives: a signal stops it (exit 0, the server stopped, the previous signal
    handlers back), a server that ends on its own is an error (exit 70); either way not before."""
    import signal

    import pimoe_export.serve.server as server_module
    from pimoe_export.cli import main

    fake = _QuietServer(alive, signal_at)
    monkeypatch.setattr(server_module, "load_models", lambda *a, **k: [])
    monkeypatch.setattr(server_module, "Server", lambda models, options: fake)
    monkeypatch.setattr(server_module, "import_pytriton", lambda: None)
    handler = signal.getsignal(signal.SIGINT)
    assert main(["serve", str(units["ort"])]) == code
    out = capsys.readouterr()
    assert said in (out.out if code == 0 else out.err)
    assert fake.checks == (signal_at if signal_at else alive + 1) and fake.stops >= 1
    assert signal.getsignal(signal.SIGINT) is handler
