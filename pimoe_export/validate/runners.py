"""The artefact side of a parity check, as Polygraphy runners: a deployable unit through our :class:`Engine`
(ONNX Runtime or TensorRT: exactly what the unit ships, verified first), or a bare ONNX graph on ONNX Runtime with
the build tree's op library (Polygraphy's own OnnxrtRunner over our session)."""

from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata


class EngineRunner(BaseRunner):
    """A unit through ``Engine.load`` (which verifies it before loading anything)."""

    def __init__(self, unit_dir: str | Path, name: str | None = None) -> None:
        from pimoe_export.runtime.engine import Engine

        super().__init__(name=name, prefix="pimoe-engine-runner")
        self.unit_dir = Path(unit_dir)
        self.engine = Engine.load(self.unit_dir)  # verified now: a bad unit fails before any reference work

    def activate_impl(self) -> None:
        pass

    def get_input_metadata_impl(self) -> TensorMetadata:
        from pimoe_export.validate.reference import input_metadata

        return input_metadata(self.engine.interface)

    def infer_impl(self, feed_dict: dict[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
        start = time.perf_counter()
        outputs = OrderedDict(self.engine.run_named(feed_dict))
        self.inference_time = time.perf_counter() - start
        return outputs

    def deactivate_impl(self) -> None:
        pass

    def close(self) -> None:
        self.engine.close()


def onnx_runner(onnx_path: str | Path, threads: int | None = None) -> Any:
    """Polygraphy's OnnxrtRunner over a session of ``onnx_path`` with the build tree's libpimoe_ort registered; a run
    ONNX Runtime refuses (the ops' own checks) is a RunError naming the graph."""
    from polygraphy.backend.onnxrt import OnnxrtRunner

    from pimoe_export.errors import RunError
    from pimoe_export.runtime.ort import create_session

    class Runner(OnnxrtRunner):
        def infer_impl(self, feed_dict: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return super().infer_impl(feed_dict, *args, **kwargs)
            except Exception as exc:  # onnxruntime's own Fail / InvalidArgument / RuntimeException
                detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise RunError(f"ONNX Runtime could not run {onnx_path}: {detail}") from None

    return Runner(create_session(onnx_path, threads=threads), name="onnxrt-pimoe")
