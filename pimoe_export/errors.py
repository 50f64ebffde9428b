"""Error types of pimoe-export.

Every user-facing failure raises one of these with a message that names what was expected, what was
found and what to do about it. They subclass the built-in exception a caller would naturally catch
(ValueError for bad values, RuntimeError for environment problems) so generic handlers keep working.
"""

from __future__ import annotations


class PiMoEError(Exception):
    """Base class of every pimoe-export error."""


class PiMoEConfigError(PiMoEError, ValueError):
    """A configuration field is missing, of the wrong type or outside its allowed range.

    Attributes:
        field: name of the offending field (as spelled in :class:`PiMoEConfig`).
    """

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"PiMoEConfig.{field}: {message}")


class PiMoEInputError(PiMoEError, ValueError):
    """A tensor given to a PiMoE layer or op has the wrong rank, size or dtype."""


class PiMoEExportError(PiMoEError, RuntimeError):
    """Exporting to ONNX failed or the model cannot be expressed with op contract v1."""


class PluginLoadError(PiMoEError, RuntimeError):
    """The pimoe custom-op/plugin library is missing, unloadable or does not match this package."""


class ArtifactError(PiMoEError, RuntimeError):
    """An artefact (ONNX, engine, manifest, checkpoint) is corrupt, tampered with or mismatched."""


class BackendUnavailableError(PiMoEError, RuntimeError):
    """A backend (TensorRT, TensorRT-RTX, CUDA) is not installed or not usable on this machine."""


class OutputError(PiMoEError, RuntimeError):
    """An output cannot be written: it would replace a file pimoe-export did not write (without --force), lies
    outside the directory the user named, or the location is not writable."""


class RunError(PiMoEError, RuntimeError):
    """A backend refused to run an artefact on these inputs (its own message is kept): the graph or the inputs are
    not what the ops accept."""


class ParityError(PiMoEError, RuntimeError):
    """A parity check ran to the end and the artefact does not match the PyTorch reference (exit code 1)."""


#: The command line's exit codes (README: "Exit codes"). Bad input, bad artefacts and outputs that would be
#: overwritten are the user's to fix (2); a missing backend, GPU or plugin library is the machine's (3).
EXIT_OK, EXIT_PARITY_FAILED, EXIT_BAD_INPUT, EXIT_ENVIRONMENT, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 70, 130


#: The libraries pimoe-export hands the user's files and data to (by the module of their exception types). One of
#: their exceptions reaching the command line means that library refused an input the user gave: a corrupt
#: protobuf, a graph or inputs ONNX Runtime will not run, an unreadable safetensors file. It is bad input (exit 2),
#: reported with the library's own message; the readers of the package turn the common cases into typed errors
#: with a fix first.
INPUT_LIBRARIES = ("google.protobuf", "onnx", "onnxruntime", "safetensors", "json")


def refused_input(error: BaseException) -> bool:
    """Whether ``error`` is an input-handling library refusing an input (see :data:`INPUT_LIBRARIES`)."""
    if isinstance(error, UnicodeDecodeError):  # a text or JSON file that is not UTF-8
        return True
    module = type(error).__module__ or ""
    return any(module == name or module.startswith(name + ".") for name in INPUT_LIBRARIES)


def exit_code(error: BaseException) -> int:
    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(error, ParityError):
        return EXIT_PARITY_FAILED
    if isinstance(error, (BackendUnavailableError, PluginLoadError)):
        return EXIT_ENVIRONMENT
    if isinstance(error, (PiMoEError, OSError)) or refused_input(error):
        return EXIT_BAD_INPUT
    return EXIT_INTERNAL


def user_message(error: BaseException) -> str | None:
    """The one message the command line prints for a failure the user can fix (None: an internal error, a bug)."""
    if isinstance(error, PiMoEError):
        return str(error)
    if isinstance(error, OSError):  # a file a command reads or writes (permissions, a full disk, a vanished path)
        where = f" {error.filename}" if getattr(error, "filename", None) else ""
        return f"cannot access{where}: {error.strerror or error}; check the path and its permissions"
    if refused_input(error):
        lines = str(error).strip().splitlines()
        module = type(error).__module__ or ""
        library = next((name for name in INPUT_LIBRARIES if module == name or module.startswith(name + ".")),
                       "a text decoder")
        return (f"{library} refused an input of this command ({type(error).__name__}: "
                f"{lines[0] if lines else 'no detail'}); check the files and data you passed (--debug shows where)")
    return None
