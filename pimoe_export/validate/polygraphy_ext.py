"""Polygraphy extension: `polygraphy run` runners for pimoe-export artefacts.

Registered through the ``polygraphy.run.plugins`` entry point (pyproject.toml), so with pimoe-export installed::

    polygraphy run UNIT_DIR --pimoe-unit ...     # a deployable unit through Engine (verified, then run as shipped)
    polygraphy run model.onnx --pimoe-onnxrt ... # an ONNX graph with pimoe ops on ONNX Runtime + libpimoe_ort

These are the runners `pimoe-export check` itself uses (:mod:`pimoe_export.validate.runners`), so a saved check
replays with ``--load-inputs inputs.json --load-outputs pytorch_outputs.json`` (the report prints the command).
"""

from __future__ import annotations

from typing import Any

from polygraphy.tools.args import ModelArgs
from polygraphy.tools.args.base import BaseRunnerArgs
from polygraphy.tools.script import make_invocable

RUNNERS_MODULE = "pimoe_export.validate.runners"


class UnitRunnerArgs(BaseRunnerArgs):
    """pimoe-export unit: a deployable unit directory through pimoe_export's Engine.

    Depends on:

        - ModelArgs
    """

    def get_name_opt_impl(self) -> tuple[str, str]:
        return "pimoe-export unit", "pimoe-unit"

    def get_extra_help_text_impl(self) -> str:
        return "The model argument is a unit directory; it is verified (manifest, sha256) before anything loads"

    def add_to_script_impl(self, script: Any) -> None:
        script.add_import(imports=["EngineRunner"], frm=RUNNERS_MODULE)
        script.add_runner(make_invocable("EngineRunner", self.arg_groups[ModelArgs].path))


class OnnxrtPiMoERunnerArgs(BaseRunnerArgs):
    """ONNX Runtime with libpimoe_ort: an ONNX graph holding pimoe ops.

    Depends on:

        - ModelArgs
    """

    def get_name_opt_impl(self) -> tuple[str, str]:
        return "ONNX Runtime with libpimoe_ort", "pimoe-onnxrt"

    def get_extra_help_text_impl(self) -> str:
        return "The library is $PIMOE_ORT_LIBRARY or the build tree's"

    def add_to_script_impl(self, script: Any) -> None:
        script.add_import(imports=["onnx_runner"], frm=RUNNERS_MODULE)
        script.add_runner(make_invocable("onnx_runner", self.arg_groups[ModelArgs].path))


def get_arg_groups() -> list[BaseRunnerArgs]:
    """The ``polygraphy.run.plugins`` entry point."""
    return [UnitRunnerArgs(), OnnxrtPiMoERunnerArgs()]
