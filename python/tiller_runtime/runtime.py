"""`Runtime` and `Step`: the host API of tiller.h over ctypes.

Activations are handed to the library by their data pointer: a NumPy array is edited where it
lies, never copied. Everything the library would refuse with a vaguer message (dtype, layout,
writability, shape) is checked here first.
"""

from __future__ import annotations

import ctypes
import json
import os
import threading
from ctypes import byref, c_size_t, c_uint8, c_uint64, c_void_p
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from . import _lib
from ._errors import ClosedError, InvalidArgumentError

# `enum tiller_dtype` and `enum tiller_phase` of tiller.h.
F32, F16, BF16 = 0, 1, 2
PROMPT, GENERATED = 0, 1

_PHASES = {"prompt": PROMPT, "generated": GENERATED, PROMPT: PROMPT, GENERATED: GENERATED}

try:  # bfloat16 NumPy arrays exist only through ml_dtypes.
    import ml_dtypes as _ml_dtypes

    _BF16_DTYPE: Optional[np.dtype] = np.dtype(_ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - depends on the environment
    _BF16_DTYPE = None

_DTYPES: Dict[np.dtype, int] = {np.dtype(np.float32): F32, np.dtype(np.float16): F16}
if _BF16_DTYPE is not None:
    _DTYPES[_BF16_DTYPE] = BF16

_U64_MAX = (1 << 64) - 1
_U64, _U8 = np.dtype(np.uint64), np.dtype(np.uint8)

_from_buffer = ctypes.c_char.from_buffer
_addressof = ctypes.addressof


def _ro_address(a: np.ndarray) -> int:
    """The address of a contiguous array that is only read (it may be read-only)."""
    if a.flags.writeable:
        return _addressof(_from_buffer(a))
    return a.__array_interface__["data"][0]


class _Scratch:
    """Per-thread ctypes buffers for the token map, the step handle and the stop ids, reused by
    every step of the thread (the library copies what it keeps), so a step allocates no ctypes
    objects on the hot path. The step functions take them by address (`*_addr`, plain ints):
    ctypes converts an int argument in a fraction of the time it takes to convert an array or a
    `byref` (measured in docs/benchmarks.md#the-python-binding)."""

    __slots__ = (
        "cap", "ids", "ph", "stop", "out", "n",
        "ids_addr", "ph_addr", "stop_addr", "out_addr", "n_addr",
    )

    def __init__(self) -> None:
        self.out = c_void_p()
        self.out_addr = _addressof(self.out)
        self.n = c_size_t()
        self.n_addr = _addressof(self.n)
        self.grow(64)

    def grow(self, cap: int) -> None:
        self.cap = cap
        self.ids = (c_uint64 * cap)()
        self.ph = (c_uint8 * cap)()
        self.stop = (c_uint64 * cap)()
        self.ids_addr = _addressof(self.ids)
        self.ph_addr = _addressof(self.ph)
        self.stop_addr = _addressof(self.stop)


_tls = threading.local()


def _scratch(n: int) -> _Scratch:
    sc = getattr(_tls, "sc", None)
    if sc is None:
        sc = _tls.sc = _Scratch()
    if sc.cap < n:
        sc.grow(max(n, 2 * sc.cap))
    return sc


PathLike = Union[str, "os.PathLike[str]"]
Tokens = Union[Sequence[Tuple[int, Union[str, int]]], np.ndarray]


def _path(p: PathLike) -> bytes:
    return os.fsencode(p)


def _request_id(id: int) -> int:
    if isinstance(id, bool) or not isinstance(id, (int, np.integer)):
        raise InvalidArgumentError(f"a request id is an int in [0, 2**64), not {type(id).__name__}")
    id = int(id)
    if not 0 <= id <= _U64_MAX:
        raise InvalidArgumentError(f"request id {id} is not in [0, 2**64)")
    return id


def _dtype_name(dt: np.dtype) -> str:
    if dt.names is not None:
        return str(dt)
    return dt.name if dt.isnative else f"{dt.name} ({dt.str}, not the machine's byte order)"


def version() -> str:
    """The version of the loaded libtiller."""
    v = _lib.lib().tiller_version()
    return v.decode("utf-8")


def build_info() -> Dict[str, Any]:
    """The library's build information: `version`, `onnxruntime`, `cuda` (and the file loaded)."""
    f = _lib.lib().tiller_build_info
    info = json.loads(_lib.read_string(lambda buf, n, needed: f(buf, n, needed)))
    info.setdefault("library", str(_lib.library_path()))
    return info


class Runtime:
    """A tiller runtime: dictionaries, monitors and steering profiles from one TOML config.

    Thread-safe: share one `Runtime` between all of the server's threads (each thread opens its
    own steps). The library releases the GIL during every call (ctypes does), so hooks on
    different threads run in parallel.
    """

    __slots__ = ("_h", "_names", "__weakref__")

    def __init__(self, handle: int) -> None:
        """Wraps a raw `tiller_runtime*`; use `from_file` or `from_toml` instead."""
        self._h: Optional[int] = handle
        # Hook names encoded once: they are a small, fixed set per config.
        self._names: Dict[str, bytes] = {}

    @classmethod
    def from_file(cls, path: PathLike) -> "Runtime":
        """Builds a runtime from the TOML config file at `path`."""
        out = c_void_p()
        _lib.check(_lib.lib().tiller_runtime_new_from_file(_path(path), byref(out)))
        return cls(out.value)

    @classmethod
    def from_toml(cls, text: str, base_dir: Optional[PathLike] = None) -> "Runtime":
        """Builds a runtime from a TOML config held in `text`; its relative paths resolve against
        `base_dir` (None: the current directory)."""
        if not isinstance(text, str):
            raise InvalidArgumentError(f"the config is a str of TOML, not {type(text).__name__}")
        out = c_void_p()
        base = None if base_dir is None else _path(base_dir)
        _lib.check(_lib.lib().tiller_runtime_new_from_toml(text.encode("utf-8"), base, byref(out)))
        return cls(out.value)

    # -- lifetime -------------------------------------------------------------------------------

    def close(self) -> None:
        """Frees the runtime handle (steps still open keep the native runtime alive)."""
        h, self._h = self._h, None
        if h:
            _lib.lib().tiller_runtime_free(h)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - never raise from a finaliser (e.g. at interpreter exit)
            pass

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _handle(self) -> int:
        h = self._h
        if not h:
            raise ClosedError("the runtime is closed")
        return h

    # -- config ---------------------------------------------------------------------------------

    def reload(self, path: Optional[PathLike] = None) -> None:
        """Reloads the config (from `path`, or the file it was built from). On error the running
        state is untouched and the error raised."""
        p = None if path is None else _path(path)
        _lib.check(_lib.lib().tiller_runtime_reload(self._handle(), p))

    # -- requests -------------------------------------------------------------------------------

    def begin_request(
        self,
        id: int,
        profile: Optional[str] = None,
        overrides: Union[None, str, Mapping[str, Any]] = None,
    ) -> None:
        """Begins request `id` with a steering profile (None: none) and per-request overrides
        (a dict, serialised to JSON, or a JSON string)."""
        rid = _request_id(id)
        prof = None if profile is None else profile.encode("utf-8")
        if overrides is None:
            ov = None
        elif isinstance(overrides, (str, bytes)):
            ov = overrides.encode("utf-8") if isinstance(overrides, str) else overrides
        else:
            ov = json.dumps(overrides).encode("utf-8")
        _lib.check(_lib.lib().tiller_request_begin(self._handle(), rid, prof, ov))

    def end_request(self, id: int) -> Dict[str, Any]:
        """Ends request `id` and returns its summary: `request`, `profile`, `tokens`,
        `features` (dictionary → feature id (str) → {max, count}), `events`, `steering`
        (rule → tokens edited), `flagged`, `stopped`."""
        rid, h, f = _request_id(id), self._handle(), _lib.lib().tiller_request_end
        # A buffer too small leaves the request running: read_string retries with the size needed.
        return json.loads(_lib.read_string(lambda buf, n, needed: f(h, rid, buf, n, needed)))

    def request_summary(self, id: int) -> Dict[str, Any]:
        """The summary so far of running request `id` (as `end_request` returns it)."""
        rid, h, f = _request_id(id), self._handle(), _lib.lib().tiller_request_summary
        return json.loads(_lib.read_string(lambda buf, n, needed: f(h, rid, buf, n, needed)))

    # -- steps ----------------------------------------------------------------------------------

    def step(self, tokens: Tokens, phases: Optional[Any] = None) -> "Step":
        """Opens a forward step over the batch's tokens, in the order of the activation rows.

        `tokens` is a list of `(request_id, phase)` with phase "prompt" or "generated" (or
        `tiller.PROMPT`/`tiller.GENERATED`); or, for large batches, two arrays: `step(ids, phases)`
        with request ids (any unsigned/non-negative integer dtype) and phases (0 prompt,
        1 generated). Use it as a context manager: it is closed (and `step.stop` set) on exit.
        """
        h = self._h
        if not h:
            raise ClosedError("the runtime is closed")
        if phases is None:
            n, sc = _tokens_from_pairs(tokens)
            st = _step_open(h, sc.ids_addr, sc.ph_addr, n, sc.out_addr)
        else:
            # `keep` holds the converted token arrays alive through the call.
            n, ids_p, ph_p, keep = _tokens_from_arrays(tokens, phases)
            sc = _scratch(n)
            st = _step_open(h, ids_p, ph_p, n, sc.out_addr)
            del keep
        if st:
            _lib.check(st)
        return Step(self, sc.out.value, n)

    def run_step(
        self, tokens: Tokens, name: str, activations: np.ndarray, *, phases: Optional[Any] = None
    ) -> List[int]:
        """One whole step with a single hook, in one call into the library: the same as

            with rt.step(tokens, phases) as step:
                step.hook(name, activations)
            return step.stop

        (the same checks, edits and events), for hosts with one hook per forward pass, at a
        fraction of the binding's cost: one crossing instead of three, and no step object.
        Returns the ids of the requests a monitor asked to stop. The activations are checked
        before the step opens; if the library refuses the hook (an unknown name, a wrong width),
        the step is dropped unclosed, as the `with` block drops it when its body raises.
        """
        h = self._h
        if not h:
            raise ClosedError("the runtime is closed")
        if phases is None:
            n, sc = _tokens_from_pairs(tokens)
            ids_p, ph_p, keep = sc.ids_addr, sc.ph_addr, None
        else:
            n, ids_p, ph_p, keep = _tokens_from_arrays(tokens, phases)
            sc = _scratch(n)
        addr, code, width = _host_activations(activations, n)
        st = _step_run(
            h, ids_p, ph_p, n, self._name(name), addr, code, width, sc.stop_addr, sc.cap, sc.n_addr
        )
        del keep
        if st:
            _lib.check(st)
        # At most one stop per request, and every request of the step has a token.
        k = sc.n.value
        return sc.stop[:k] if k else []

    def _name(self, hook: str) -> bytes:
        b = self._names.get(hook)
        if b is None:
            if not isinstance(hook, str):
                raise InvalidArgumentError(f"a hook name is a str, not {type(hook).__name__}")
            b = hook.encode("utf-8")
            if len(self._names) < 4096:  # a bound, should a host pass ever-new names
                self._names[hook] = b
        return b

    # -- metrics --------------------------------------------------------------------------------

    def metrics_text(self) -> str:
        """The Prometheus text exposition of the runtime's metrics."""
        h, f = self._handle(), _lib.lib().tiller_metrics_text
        return _lib.read_string(lambda buf, n, needed: f(h, buf, n, needed))


class _Recheck(Exception):
    """The fast path met something it does not take; the checked path says what."""


def _tokens_from_pairs(tokens: Any) -> Tuple[int, _Scratch]:
    """Writes the pairs into the thread's scratch token map; returns their count and the scratch."""
    if type(tokens) is not list and not isinstance(tokens, (list, tuple)):
        if isinstance(tokens, np.ndarray):
            raise InvalidArgumentError(
                "a step over arrays takes two: step(request_ids, phases); or pass a list of "
                "(request_id, phase) pairs"
            )
        try:
            tokens = list(tokens)
        except TypeError:
            raise InvalidArgumentError(
                f"tokens are a list of (request_id, phase) pairs, not {type(tokens).__name__}"
            ) from None
    n = len(tokens)
    sc = _scratch(n)
    ids, ph = sc.ids, sc.ph
    phases = _PHASES
    # The hot path (every forward step): plain ints and known phases, nothing else.
    try:
        i = 0
        for rid, phase in tokens:
            if type(rid) is not int or rid < 0 or rid > _U64_MAX:
                raise _Recheck
            ids[i] = rid
            ph[i] = phases[phase]
            i += 1
    except (_Recheck, TypeError, ValueError, KeyError):
        _check_pairs(tokens, ids, ph)
    return n, sc


def _check_pairs(tokens: Sequence[Any], ids: Any, ph: Any) -> None:
    """Fills `ids`/`ph` from `tokens`, raising on the first bad pair (NumPy integer ids pass)."""
    for i, t in enumerate(tokens):
        try:
            rid, phase = t
        except (TypeError, ValueError):
            raise InvalidArgumentError(f"tokens[{i}] = {t!r} is not a (request_id, phase) pair") from None
        try:
            code = _PHASES[phase]
        except (KeyError, TypeError):
            raise InvalidArgumentError(
                f"tokens[{i}] has phase {phase!r}: not \"prompt\" or \"generated\""
            ) from None
        ids[i] = _request_id(rid)
        ph[i] = code


def _tokens_from_arrays(ids: Any, phases: Any) -> Tuple[int, Any, Any, Any]:
    ids_a = ids if isinstance(ids, np.ndarray) else np.asarray(ids)
    ph_a = phases if isinstance(phases, np.ndarray) else np.asarray(phases)
    if ids_a.ndim != 1 or ph_a.ndim != 1 or ids_a.shape != ph_a.shape:
        raise InvalidArgumentError(
            f"request ids {ids_a.shape} and phases {ph_a.shape} must be 1-D arrays of one length"
        )
    # The common case, uint64 ids and uint8 phases already contiguous, converts nothing.
    if ids_a.dtype != _U64 or not ids_a.flags.c_contiguous:
        if ids_a.dtype.kind not in "iu":
            raise InvalidArgumentError(f"request ids have dtype {ids_a.dtype}: an integer dtype is needed")
        if ids_a.dtype.kind == "i" and ids_a.size and ids_a.min() < 0:
            raise InvalidArgumentError("request ids must not be negative")
        ids_a = np.ascontiguousarray(ids_a, dtype=_U64)
    if ph_a.dtype != _U8 or not ph_a.flags.c_contiguous:
        if ph_a.dtype.kind not in "iub":
            raise InvalidArgumentError(
                f"phases have dtype {ph_a.dtype}: 0 (prompt) or 1 (generated) expected"
            )
        if ph_a.size and (ph_a.min() < 0 or ph_a.max() > 1):
            raise InvalidArgumentError("phases must be 0 (prompt) or 1 (generated)")
        ph_a = np.ascontiguousarray(ph_a, dtype=_U8)
    # (Phases of a uint8 array above 1 are refused by the library, naming the index.)
    n = ids_a.shape[0]
    if n == 0:
        return 0, None, None, None
    return n, _ro_address(ids_a), _ro_address(ph_a), (ids_a, ph_a)


def _check_activations(a: Any, n_tokens: int) -> int:
    """Validates a host activation array and returns its tiller dtype code."""
    if not isinstance(a, np.ndarray):
        raise InvalidArgumentError(
            f"activations must be a numpy.ndarray, not {type(a).__name__} "
            "(for torch tensors use tiller.torch)"
        )
    code = _DTYPES.get(a.dtype)
    if code is None:
        if _BF16_DTYPE is None and a.dtype.name == "bfloat16":
            hint = " (bfloat16 arrays need ml_dtypes installed: pip install ml_dtypes)"
        else:
            hint = ""
        raise InvalidArgumentError(
            f"activations have dtype {_dtype_name(a.dtype)}: float32, float16"
            + (" or bfloat16" if _BF16_DTYPE is not None else "")
            + " expected; no copy is made, so convert it yourself" + hint
        )
    if a.ndim != 2:
        raise InvalidArgumentError(
            f"activations have shape {a.shape}: [n_tokens, width] (2-D) expected; "
            "reshape it (a view of a contiguous array costs no copy)"
        )
    if a.shape[0] != n_tokens:
        raise InvalidArgumentError(
            f"activations have {a.shape[0]} rows but the step has {n_tokens} tokens"
        )
    flags = a.flags
    if not flags.c_contiguous:
        raise InvalidArgumentError(
            "activations are not C-contiguous (a transposed or strided view?): they are edited "
            "in place, so pass the contiguous array itself (np.ascontiguousarray makes a copy)"
        )
    if not flags.writeable:
        raise InvalidArgumentError("activations are read-only: they are edited in place")
    if not flags.aligned:
        raise InvalidArgumentError("activations are not aligned to their dtype")
    return code


def _host_activations(a: Any, n: int) -> Tuple[int, int, int]:
    """The address, dtype code and width of host activations for a step of `n` tokens.

    The hot path checks dtype and shape here; NumPy's buffer export refuses read-only and
    non-C-contiguous arrays, and the library checks the width and alignment. Anything unusual
    goes through the full check, which says exactly what is wrong.
    """
    try:
        code = _DTYPES[a.dtype]
        shape = a.shape
        if len(shape) != 2 or shape[0] != n or code == BF16:
            raise _Recheck
        return _addressof(_from_buffer(a)), code, shape[1]
    except (_Recheck, AttributeError, KeyError, TypeError, ValueError, BufferError):
        code = _check_activations(a, n)
        return _address(a, code), code, a.shape[1]


def _address(a: np.ndarray, code: int) -> int:
    """The address of a validated array's first element, taken without a copy.

    Through the buffer protocol rather than `a.ctypes.data`, which takes several times longer;
    bfloat16 arrays are exported as their uint16 view (NumPy cannot put ml_dtypes' dtype in a
    buffer), and empty arrays (which export no byte to point at) through the array interface.
    """
    if a.size == 0:
        return a.__array_interface__["data"][0]
    if code == BF16:
        a = a.view(np.uint16)
    return _addressof(_from_buffer(a))


# The step functions, bound to the C functions on first use (saves a lookup per call).
def _step_open(*args: Any) -> int:
    _bind_step_functions()
    return _step_open(*args)


def _step_hook(*args: Any) -> int:
    _bind_step_functions()
    return _step_hook(*args)


def _step_close(*args: Any) -> int:
    _bind_step_functions()
    return _step_close(*args)


def _step_run(*args: Any) -> int:
    _bind_step_functions()
    return _step_run(*args)


def _bind_step_functions() -> None:
    global _step_open, _step_hook, _step_close, _step_run
    lib = _lib.lib()
    _step_open, _step_hook, _step_close = lib.tiller_step_open, lib.tiller_step_hook, lib.tiller_step_close
    _step_run = lib.tiller_step_run


class Step:
    """One forward step: call `hook` at each hook in model order, then `close`.

    Not thread-safe: one thread uses a step at a time. As a context manager it closes on a
    normal exit (the requests to stop land in `step.stop`) and is freed without closing when
    the block raises.
    """

    __slots__ = ("_rt", "_s", "n_tokens", "stop")

    def __init__(self, runtime: Runtime, handle: int, n_tokens: int) -> None:
        self._rt = runtime
        self._s: Optional[int] = handle
        self.n_tokens = n_tokens
        #: The request ids a monitor asked to stop, set when the step closes.
        self.stop: Optional[List[int]] = None

    def hook(self, name: str, activations: np.ndarray) -> None:
        """Runs hook `name` on `activations` ([n_tokens, width] float32/float16/bfloat16,
        C-contiguous, writable), editing them in place: no copy, the array's own memory."""
        s = self._s
        if not s:
            raise ClosedError("the step is closed")
        n = self.n_tokens
        addr, code, width = _host_activations(activations, n)
        st = _step_hook(s, self._rt._name(name), addr, code, n, width)
        if st:
            _lib.check(st)

    def hook_ptr(self, name: str, data: int, dtype: int, n_tokens: int, width: int) -> None:
        """Runs hook `name` on raw host memory at address `data` (`n_tokens × width` values of
        `dtype`: tiller.F32/F16/BF16). For adapters (tiller.torch) that hold tensors NumPy cannot
        wrap; the caller guarantees the memory is valid, aligned, writable and unshared."""
        s = self._s
        if not s:
            raise ClosedError("the step is closed")
        if n_tokens != self.n_tokens:
            raise InvalidArgumentError(
                f"activations have {n_tokens} rows but the step has {self.n_tokens} tokens"
            )
        _lib.check(_lib.lib().tiller_step_hook(s, self._rt._name(name), data, dtype, n_tokens, width))

    def hook_cuda(
        self, name: str, data: int, dtype: int, n_tokens: int, width: int, stream: int
    ) -> None:
        """Runs hook `name` on device memory at `data` on CUDA stream `stream` (a `cudaStream_t`
        as an int; 0 the default stream). Builds without CUDA raise UnsupportedError."""
        s = self._s
        if not s:
            raise ClosedError("the step is closed")
        if n_tokens != self.n_tokens:
            raise InvalidArgumentError(
                f"activations have {n_tokens} rows but the step has {self.n_tokens} tokens"
            )
        _lib.check(
            _lib.lib().tiller_step_hook_cuda(
                s, self._rt._name(name), data, dtype, n_tokens, width, stream or None
            )
        )

    def close(self) -> List[int]:
        """Closes the step and returns the ids of the requests a monitor asked to stop."""
        s, self._s = self._s, None
        if not s:
            if self.stop is not None:
                return self.stop
            raise ClosedError("the step is closed")
        # At most one stop per request, and every request of the step has a token.
        sc = _scratch(self.n_tokens)
        st = _step_close(s, sc.stop_addr, sc.cap, sc.n_addr)
        if st:
            _lib.check(st)
        k = sc.n.value
        stop = self.stop = sc.stop[:k] if k else []
        return stop

    def free(self) -> None:
        """Frees the step without closing it (its events are dropped)."""
        s, self._s = self._s, None
        if s:
            _lib.lib().tiller_step_free(s)

    def __enter__(self) -> "Step":
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            if self._s:
                self.close()
        else:
            self.free()

    def __del__(self) -> None:
        try:
            self.free()
        except Exception:  # noqa: BLE001 - never raise from a finaliser
            pass

