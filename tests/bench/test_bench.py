"""The pipeline's benchmark summary, without timing anything real: the median is computed on a clock this test
controls (no test asserts wall-clock times), each variant's session runs the source's own inputs, and the Markdown
table holds every row and column."""

from __future__ import annotations

import numpy as np
import pytest

from pimoe_export.bench import summary as summary_module
from pimoe_export.bench import timing
from pimoe_export.bench.summary import benchmark_source, render_markdown
from pimoe_export.bench.timing import median_ms


class Clock:
    """perf_counter stand-in: each call of the timed function advances time by the next duration."""

    def __init__(self, durations: list[float]) -> None:
        self.now, self.durations, self.calls = 0.0, list(durations), 0

    def perf_counter(self) -> float:
        return self.now

    def work(self) -> None:
        self.calls += 1
        if self.calls > 2:  # the warmup calls take no (measured) time
            self.now += self.durations.pop(0)


@pytest.mark.parametrize(("durations", "median"), [
    ([0.004, 0.001, 0.003], 3.0),
    ([0.002, 0.001, 0.004, 0.003], 2.5),  # even count: the mean of the middle two
    ([0.0005], 0.5),
])
def test_the_median_in_milliseconds_after_the_warmup(monkeypatch, durations, median) -> None:
    clock = Clock(durations)
    monkeypatch.setattr(timing.time, "perf_counter", clock.perf_counter)
    assert median_ms(clock.work, repeats=len(durations), warmup=2) == pytest.approx(median)
    assert clock.calls == 2 + len(durations)


def test_the_default_warmup_is_three_untimed_calls(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(timing.time, "perf_counter", lambda: float(len(calls)))
    median_ms(lambda: calls.append(1), repeats=4)
    assert len(calls) == 7


def test_the_table_has_every_row_and_column() -> None:
    rows = [{"tokens": 1, "pytorch_ms": 0.25, "fp32_ms": 0.1234, "int8_ms": 0.05},
            {"tokens": 128, "pytorch_ms": 2.0, "fp32_ms": 1.5, "int8_ms": 0.75}]
    text = render_markdown(rows, repeats=20)
    lines = text.splitlines()
    assert lines[0] == "# Benchmark summary"
    assert "Median of 20 runs per point, batch 1" in text and "threads available" in text
    table = [line for line in lines if line.startswith("|")]
    assert table == ["| tokens | pytorch (ms) | fp32 (ms) | int8 (ms) |", "|---|---|---|---|",
                     "| 1 | 0.250 | 0.123 | 0.050 |", "| 128 | 2.000 | 1.500 | 0.750 |"]
    assert text.endswith("\n")


def test_the_cpu_count_is_the_affinity_mask(monkeypatch) -> None:
    if hasattr(summary_module.os, "sched_getaffinity"):
        monkeypatch.setattr(summary_module.os, "sched_getaffinity", lambda pid: {0, 3, 5})
        assert summary_module._cpu_count() == 3
    monkeypatch.delattr(summary_module.os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(summary_module.os, "cpu_count", lambda: None)
    assert summary_module._cpu_count() == 1


def test_benchmark_source_times_pytorch_and_each_variant_on_the_sources_inputs(exported_layer, monkeypatch) -> None:
    from pimoe_export.model.source import as_source

    model, onnx_path = exported_layer("tiny", 0)
    source = as_source(model)
    results: list[object] = []

    def fake_median(fn, repeats, warmup=3):
        assert repeats == 7
        results.append(fn())
        return float(len(results))
    monkeypatch.setattr(summary_module, "median_ms", fake_median)
    rows = benchmark_source(source, {"fp32": onnx_path, "again": onnx_path}, tokens=(1, 5), repeats=7)
    assert [row["tokens"] for row in rows] == [1, 5]
    # pytorch for every token count first, then each variant's session for every token count
    assert rows == [{"tokens": 1, "pytorch_ms": 1.0, "fp32_ms": 3.0, "again_ms": 5.0},
                    {"tokens": 5, "pytorch_ms": 2.0, "fp32_ms": 4.0, "again_ms": 6.0}]
    feed_1, feed_5 = source.random_feed(1, 1, 1), source.random_feed(1, 5, 5)
    assert results[0].shape == (1, 1, 16) and results[1].shape == (1, 5, 16)
    for torch_out, ort_out in ((results[0], results[2]), (results[1], results[3])):
        np.testing.assert_allclose(ort_out[0], torch_out.numpy(), rtol=1e-5, atol=1e-5)
    import torch

    with torch.no_grad():
        np.testing.assert_allclose(results[2][0], model(torch.from_numpy(feed_1["hidden_states"])).numpy(),
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(results[3][0], model(torch.from_numpy(feed_5["hidden_states"])).numpy(),
                                   rtol=1e-5, atol=1e-5)
