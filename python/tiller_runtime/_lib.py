"""Finding and loading libtiller, and the ctypes prototypes of tiller.h.

Every call into C goes through the prototypes declared here and every status through `check`, so
the rest of the package never handles a raw status or a raw error buffer.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from ctypes import POINTER, c_char_p, c_size_t, c_uint32, c_uint64, c_void_p
from pathlib import Path
from typing import Callable, List, Optional

from ._errors import BUFFER_TOO_SMALL, OK, LibraryError, error_for

BUILD_HINT = "build it with `cargo build --release -p tiller-capi` (or set TILLER_LIB=/path/to/libtiller.so)"

_LIB_NAME = "libtiller.dylib" if sys.platform == "darwin" else "libtiller.so"

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_lib_path: Optional[Path] = None


def candidates() -> List[Path]:
    """The paths tried, in order: `$TILLER_LIB` alone when it is set; else beside the package,
    then, for a checkout (an editable install or PYTHONPATH), `target/release` and `target/debug`
    of the Cargo workspace that holds this package (`$CARGO_TARGET_DIR` when set)."""
    env = os.environ.get("TILLER_LIB")
    if env:
        return [Path(env)]
    here = Path(__file__).resolve().parent
    paths = [here / _LIB_NAME]
    repo = here.parent.parent
    if (repo / "Cargo.toml").is_file():
        target = Path(os.environ.get("CARGO_TARGET_DIR") or repo / "target")
        if not target.is_absolute():
            target = repo / target
        paths += [target / "release" / _LIB_NAME, target / "debug" / _LIB_NAME]
    return paths


def _declare(lib: ctypes.CDLL) -> None:
    """Sets the prototype of every function of tiller.h (argument conversions are then checked
    by ctypes: a wrong type raises instead of passing garbage)."""
    status = c_uint32
    buf_args = [ctypes.c_char_p, c_size_t, POINTER(c_size_t)]
    protos = {
        "tiller_version": (c_char_p, []),
        "tiller_build_info": (status, buf_args),
        "tiller_last_error": (status, buf_args),
        "tiller_runtime_new_from_file": (status, [c_char_p, POINTER(c_void_p)]),
        "tiller_runtime_new_from_toml": (status, [c_char_p, c_char_p, POINTER(c_void_p)]),
        "tiller_runtime_free": (None, [c_void_p]),
        "tiller_runtime_reload": (status, [c_void_p, c_char_p]),
        "tiller_request_begin": (status, [c_void_p, c_uint64, c_char_p, c_char_p]),
        "tiller_request_summary": (status, [c_void_p, c_uint64] + buf_args),
        "tiller_request_end": (status, [c_void_p, c_uint64] + buf_args),
        # The step functions take addresses (ints) where tiller.h has pointers: the binding
        # passes its scratch buffers and NumPy's token arrays by address, which ctypes converts
        # faster than arrays or `byref` (these run at every step).
        "tiller_step_open": (status, [c_void_p, c_void_p, c_void_p, c_size_t, c_void_p]),
        "tiller_step_hook": (status, [c_void_p, c_char_p, c_void_p, c_uint32, c_size_t, c_size_t]),
        "tiller_step_hook_cuda": (
            status,
            [c_void_p, c_char_p, c_void_p, c_uint32, c_size_t, c_size_t, c_void_p],
        ),
        "tiller_step_close": (status, [c_void_p, c_void_p, c_size_t, c_void_p]),
        "tiller_step_run": (
            status,
            [c_void_p, c_void_p, c_void_p, c_size_t, c_char_p, c_void_p, c_uint32, c_size_t,
             c_void_p, c_size_t, c_void_p],
        ),
        "tiller_step_free": (None, [c_void_p]),
        "tiller_metrics_text": (status, [c_void_p] + buf_args),
    }
    for name, (restype, argtypes) in protos.items():
        try:
            fn = getattr(lib, name)
        except AttributeError:
            raise LibraryError(
                f"{lib._name} has no symbol `{name}`: it is not libtiller, or an older build; "
                + BUILD_HINT
            ) from None
        fn.restype = restype
        fn.argtypes = argtypes


def lib() -> ctypes.CDLL:
    """The loaded library (loaded on first use, so that `import tiller_runtime` never fails)."""
    global _lib, _lib_path
    if _lib is not None:
        return _lib
    with _lock:
        if _lib is not None:
            return _lib
        tried = candidates()
        found = next((p for p in tried if p.is_file()), None)
        if found is None:
            where = "\n  ".join(str(p) for p in tried)
            origin = "TILLER_LIB points to a missing file" if os.environ.get("TILLER_LIB") else "libtiller not found"
            raise LibraryError(f"{origin}; looked at:\n  {where}\n{BUILD_HINT}")
        try:
            loaded = ctypes.CDLL(str(found))
        except OSError as e:
            raise LibraryError(f"cannot load {found}: {e}\n{BUILD_HINT}") from None
        _declare(loaded)
        _lib, _lib_path = loaded, found
        return loaded


def library_path() -> Path:
    """The file of the loaded library (loading it if need be)."""
    lib()
    assert _lib_path is not None
    return _lib_path


_tls = threading.local()


def _scratch(n: int) -> ctypes.Array:
    """A per-thread byte buffer of at least `n` bytes, reused between calls."""
    buf = getattr(_tls, "buf", None)
    if buf is None or len(buf) < n:
        buf = ctypes.create_string_buffer(max(n, 4096))
        _tls.buf = buf
    return buf


def last_error() -> str:
    """The message of the last failed call on this thread."""
    f = lib().tiller_last_error
    needed = c_size_t(0)
    # Big enough for any message on the first try: a too-small buffer is itself reported through
    # the last error, so a retry could read that report instead of the original message.
    buf = _scratch(65536)
    if f(buf, len(buf), ctypes.byref(needed)) == BUFFER_TOO_SMALL:
        buf = _scratch(needed.value)
        if f(buf, len(buf), ctypes.byref(needed)) != OK:
            return "(the error message could not be read)"
    return buf.value.decode("utf-8", "replace")


def check(status: int) -> None:
    """Raises the exception for a non-OK status, with the message of `tiller_last_error`."""
    if status != OK:
        raise error_for(status, last_error() or f"tiller_status {status}")


def read_string(call: Callable[[ctypes.Array, int, ctypes.c_size_t], int]) -> str:
    """Runs a `(buf, len, needed)` call, growing the buffer until the text fits."""
    needed = c_size_t(0)
    size = 0
    while True:
        buf = _scratch(size)
        s = call(buf, len(buf), needed)
        if s == BUFFER_TOO_SMALL and needed.value > len(buf):
            size = needed.value
            continue
        check(s)
        return buf.value.decode("utf-8")
