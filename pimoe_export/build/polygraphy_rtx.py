"""Polygraphy's own CLI with TensorRT-RTX and the pimoe plugins: ``python -m pimoe_export.build.polygraphy_rtx``.

Polygraphy (``POLYGRAPHY_USE_TENSORRT_RTX=1``) builds TensorRT-RTX engines ahead of time, without a GPU, once three
things it cannot do itself are in place; this module puts them in a private folder and runs ``polygraphy`` with
them, so no file of any installed package is touched:

1. Polygraphy imports ``tensorrt_rtx``; the TensorRT-RTX wheels install it as ``tensorrt_rtx_bindings``: the folder
   holds a ``tensorrt_rtx`` module that is the bindings module (on ``PYTHONPATH``).
2. TensorRT-RTX's ONNX parser ``dlopen()``s ``libtensorrt_rtx.so`` (unversioned) when it adds a plugin layer and
   aborts ("terminate called") without it; the wheel ships only ``libtensorrt_rtx.so.1``: the folder holds the
   ``libtensorrt_rtx.so`` link (on ``LD_LIBRARY_PATH``; pimoe_export.native.tensorrt_loader makes the same link next to
   the wheel's libraries for in-process builds).
3. Polygraphy's ``--plugins`` only ``dlopen()``s a library; ours then registers its creators itself when
   ``PIMOE_TRT_STATIC_REGISTRATION=1`` (docs/trt_plugins.md, "Loading the library"). ``--plugins`` is added with the
   built libpimoe_trt_plugins.so unless the arguments name one.

Usage (arguments after the module are Polygraphy's)::

    python -m pimoe_export.build.polygraphy_rtx convert model.onnx --convert-to trt -o model.engine \\
        --compute-capabilities 8.9 --trt-min-shapes hidden_states:[1,1,H] ... --trt-max-shapes hidden_states:[8,512,H]
    python -m pimoe_export.build.polygraphy_rtx --print-env    # the environment, to run polygraphy yourself
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from pimoe_export.errors import BackendUnavailableError, PiMoEError
from pimoe_export.native.libraries import check_plugin_library, find_plugin_library
from pimoe_export.native.tensorrt_loader import FLAVOURS, rtx_library

ALIAS = "import sys\nimport tensorrt_rtx_bindings\n\nsys.modules[__name__] = tensorrt_rtx_bindings\n"


def prepare_folder(folder: Path) -> Path:
    """Write the ``tensorrt_rtx`` module and the ``libtensorrt_rtx.so`` link into ``folder`` (created)."""
    try:
        import tensorrt_rtx_bindings  # noqa: F401
    except ImportError as exc:
        raise BackendUnavailableError(f"TensorRT-RTX's Python bindings are not installed ({exc}); install "
                                      f"{FLAVOURS['rtx'][1]} (the `tensorrt-cpu` extra)") from None
    library = rtx_library()
    (folder / "tensorrt_rtx").mkdir(parents=True, exist_ok=True)
    (folder / "tensorrt_rtx" / "__init__.py").write_text(ALIAS)
    link = folder / "libtensorrt_rtx.so"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(library)
    return folder


def polygraphy_environment(folder: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with the settings Polygraphy + TensorRT-RTX need."""
    env = dict(os.environ if base is None else base)

    def prepend(name: str) -> str:
        return f"{folder}{os.pathsep}{env[name]}" if env.get(name) else str(folder)

    env.update(POLYGRAPHY_USE_TENSORRT_RTX="1", PIMOE_TRT_STATIC_REGISTRATION="1",
               PYTHONPATH=prepend("PYTHONPATH"), LD_LIBRARY_PATH=prepend("LD_LIBRARY_PATH"))
    return env


def print_env(folder: Path) -> list[str]:
    """Shell lines that set up the same environment, for running ``polygraphy`` without this module."""
    lines = [f"export {key}=1" for key in ("POLYGRAPHY_USE_TENSORRT_RTX", "PIMOE_TRT_STATIC_REGISTRATION")]
    lines += [f"export {key}={folder}${{{key}:+:${key}}}" for key in ("PYTHONPATH", "LD_LIBRARY_PATH")]
    return [*lines, f"# and add: --plugins {check_plugin_library(str(find_plugin_library()))['path']}"]


def polygraphy_command(argv: Sequence[str]) -> list[str]:
    """``polygraphy ARGV`` with ``--plugins <libpimoe_trt_plugins.so>`` added when ARGV names no plugin library."""
    exe = Path(sys.executable).parent / "polygraphy"
    found = str(exe) if exe.is_file() else shutil.which("polygraphy")
    if found is None:
        raise BackendUnavailableError("the polygraphy command is not installed: pip install polygraphy")
    argv = list(argv)
    if "--plugins" not in argv and argv and argv[0] in ("convert", "run", "inspect"):
        argv += ["--plugins", check_plugin_library(str(find_plugin_library()))["path"]]
    return [found, *argv]


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if not args or args[0] in ("-h", "--help"):
            print(__doc__)
            return 0 if args else 2
        if args[0] == "--print-env":
            folder = prepare_folder(Path(args[1]) if len(args) > 1 else Path(tempfile.mkdtemp(prefix="pimoe-rtx-")))
            print("\n".join(print_env(folder)))
            return 0
        with tempfile.TemporaryDirectory(prefix="pimoe-rtx-") as tmp:
            folder = prepare_folder(Path(tmp))
            return subprocess.run(polygraphy_command(args), env=polygraphy_environment(folder), check=False).returncode
    except PiMoEError as exc:
        print(f"pimoe-export polygraphy_rtx: error: {exc}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
