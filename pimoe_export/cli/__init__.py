"""`pimoe-export` command line: one module per command (COMMANDS lists them, in help order).

Each command module has ``NAME``, ``HELP``, ``configure(parser)`` and ``run(args) -> exit code``; heavy imports
happen inside ``run`` so that `pimoe-export --help` is instant and commands that need only ONNX Runtime never import
torch. Exit codes (README "Exit codes"): 0 success, 1 a parity check failed, 2 bad input or usage (one message
naming the problem and the fix, no traceback), 3 a backend, GPU or library this machine lacks, 130 interrupted,
70 an internal error (a bug: rerun with --debug for the traceback).
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import traceback
from collections.abc import Sequence
from types import ModuleType

from pimoe_export.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, exit_code, user_message

COMMANDS = ("create", "info", "moefy", "export", "quantize", "check", "package", "build", "inspect", "generate",
            "triton", "serve", "pipeline")


def _module(name: str) -> ModuleType:
    return importlib.import_module(f"pimoe_export.cli.{name}_command")


def build_parser() -> argparse.ArgumentParser:
    from pimoe_export import __version__

    parser = argparse.ArgumentParser(
        prog="pimoe-export",
        description="PiMoE from PyTorch to ONNX custom ops, INT8 and TensorRT plugins, with parity checks.",
    )
    parser.add_argument("--version", action="version", version=f"pimoe-export {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = _module(name)
        module.configure(sub.add_parser(module.NAME, help=module.HELP, description=module.HELP))
    return parser


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM ends a command like Ctrl-C: records say "interrupted", exit code 130


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return int(_module(args.command).run(args))
    except KeyboardInterrupt:
        print(f"pimoe-export {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # one mapping for every failure: the user's to fix (a message, exit 2/3), or a bug (70)
        if args.debug:
            traceback.print_exc()
        message = user_message(exc)
        if message is None:
            print(f"pimoe-export {args.command}: internal error ({type(exc).__name__}: {exc}); this is a bug in "
                  "pimoe-export: rerun with --debug for the traceback and report it", file=sys.stderr)
            return EXIT_INTERNAL
        print(f"pimoe-export {args.command}: error: {message}", file=sys.stderr)
        return exit_code(exc)


if __name__ == "__main__":
    sys.exit(main())
