"""The exceptions of the binding: one class per `tiller_status`, all subclasses of TillerError."""

from __future__ import annotations

from typing import Optional

# The fixed values of `enum tiller_status` in tiller.h.
OK = 0
NULL_ARGUMENT = 1
INVALID_ARGUMENT = 2
NOT_FOUND = 3
CONFIG = 4
DICTIONARY = 5
ONNXRUNTIME = 6
IO = 7
BUFFER_TOO_SMALL = 8
PANIC = 9
UNSUPPORTED = 10


class TillerError(Exception):
    """An error from libtiller (or found by the binding before calling it).

    `status` is the `tiller_status` value (None for errors that have none, such as a missing
    library) and `message` the text of `tiller_last_error` or of the binding's own check.
    """

    status: Optional[int] = None

    def __init__(self, message: str, status: Optional[int] = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status

    def __str__(self) -> str:
        return self.message


class NullArgumentError(TillerError):
    """TILLER_NULL_ARGUMENT: a required pointer was NULL (a bug in the binding if you see it)."""

    status = NULL_ARGUMENT


class InvalidArgumentError(TillerError, ValueError):
    """TILLER_INVALID_ARGUMENT: a malformed argument (dtype, shape, layout, phase, JSON...)."""

    status = INVALID_ARGUMENT


class NotFoundError(TillerError, LookupError):
    """TILLER_NOT_FOUND: an unknown request, hook or profile (or a request that has ended)."""

    status = NOT_FOUND


class ConfigError(TillerError):
    """TILLER_CONFIG: the configuration is invalid; the message names the file, line and key."""

    status = CONFIG


class DictionaryError(TillerError):
    """TILLER_DICTIONARY: a dictionary file is invalid."""

    status = DICTIONARY


class OnnxRuntimeError(TillerError):
    """TILLER_ONNXRUNTIME: ONNX Runtime could not be loaded or failed."""

    status = ONNXRUNTIME


class IoError(TillerError, OSError):
    """TILLER_IO: a file could not be read."""

    status = IO

    def __init__(self, message: str, status: Optional[int] = None) -> None:
        # OSError's own constructor would reinterpret two arguments as (errno, strerror).
        TillerError.__init__(self, message, status)


class BufferTooSmallError(TillerError):
    """TILLER_BUFFER_TOO_SMALL: handled inside the binding, which retries with a larger buffer."""

    status = BUFFER_TOO_SMALL


class PanicError(TillerError):
    """TILLER_PANIC: the runtime panicked; the call was contained and reported."""

    status = PANIC


class UnsupportedError(TillerError):
    """TILLER_UNSUPPORTED: not available in this build (e.g. CUDA pointers without CUDA)."""

    status = UNSUPPORTED


class LibraryError(TillerError, OSError):
    """libtiller could not be found or loaded (no status: nothing was called)."""

    def __init__(self, message: str, status: Optional[int] = None) -> None:
        TillerError.__init__(self, message, status)


class ClosedError(TillerError):
    """A runtime or step was used after it was closed (no status: nothing was called)."""


_BY_STATUS = {
    cls.status: cls
    for cls in (
        NullArgumentError,
        InvalidArgumentError,
        NotFoundError,
        ConfigError,
        DictionaryError,
        OnnxRuntimeError,
        IoError,
        BufferTooSmallError,
        PanicError,
        UnsupportedError,
    )
}


def error_for(status: int, message: str) -> TillerError:
    """The exception for a non-OK `status` (an unknown value gives a plain TillerError)."""
    cls = _BY_STATUS.get(status)
    if cls is None:
        return TillerError(f"{message} (unknown tiller_status {status})", status)
    return cls(message)
