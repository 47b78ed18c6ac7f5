"""Tiller attached to llama.cpp from Python, for `llama-cpp-python` users.

The eval callback is the C adapter's (`libtiller_llama.so`, built by `examples/llama-cpp/build.sh`):
llama.cpp calls it straight from its graph, with no Python in the per-node path. Python opens and
closes the Tiller step around each `llama_decode`, on top of the Tiller Python binding (`tiller`).

    import llama_cpp, tiller_runtime
    from tiller_llama import Adapter

    rt = tiller.Runtime.from_file("tiller.toml")
    model = llama_cpp.llama_model_load_from_file(b"model.gguf", llama_cpp.llama_model_default_params())
    adapter = Adapter(rt, model, layers=[12])               # hooks "blk.12"
    params = llama_cpp.llama_context_default_params()
    adapter.attach(params)                                   # sets params.cb_eval
    ctx = llama_cpp.llama_init_from_model(model, params)

    rt.begin_request(7, profile="careful")
    adapter.seq_begin(0, 7)                                  # sequence 0 is request 7
    adapter.decode(ctx, batch)                               # instead of llama_cpp.llama_decode
    adapter.seq_end(0)
    summary = rt.end_request(7)

`adapter.stopped` lists the requests a monitor asked to stop during the last decode, and
`adapter.seq_stopped(seq)` says whether sequence `seq`'s request was stopped. A stopped sequence ends
there: sample nothing from that decode's logits for it, leave it out of later batches (a batch with
one of its tokens raises `AdapterError`) and `seq_end` it; the other sequences go on. Errors raise
`AdapterError` with the adapter's message; a hook that fails leaves that decode's outputs as the
unedited model computed them. A decode that fails (an error raised, or llama_decode's result
returned) still sets `stopped` and marks the sequences a monitor stopped before the failure.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import List, Optional, Sequence, Union

import llama_cpp
import tiller_runtime as tiller
from tiller_runtime import _lib as _tiller_lib

__all__ = ["Adapter", "AdapterError", "library_path"]


class AdapterError(RuntimeError):
    """The llama.cpp adapter refused a call; the message says what and where."""


def library_path() -> Path:
    """`$TILLER_LLAMA_ADAPTER`, else `libtiller_llama.so` in the workspace's `target/llama-cpp`."""
    env = os.environ.get("TILLER_LLAMA_ADAPTER")
    if env:
        return Path(env)
    root = Path(__file__).resolve().parents[3]
    target = Path(os.environ.get("CARGO_TARGET_DIR", root / "target"))
    if not target.is_absolute():
        target = root / target
    return target / "llama-cpp" / "libtiller_llama.so"


_adapter_lib: Optional[ctypes.CDLL] = None


def _lib() -> ctypes.CDLL:
    global _adapter_lib
    if _adapter_lib is not None:
        return _adapter_lib
    path = library_path()
    if not path.is_file():
        raise AdapterError(
            f"{path} does not exist: build it with examples/llama-cpp/build.sh "
            "(or set TILLER_LLAMA_ADAPTER)"
        )
    # libllama and libtiller must be the copies llama_cpp and tiller already loaded: load those
    # first, so that the adapter's dependencies resolve to them.
    tl = _tiller_lib.lib()
    lib = ctypes.CDLL(str(path))
    same_tiller = ctypes.cast(lib.tiller_version, ctypes.c_void_p).value == ctypes.cast(
        tl.tiller_version, ctypes.c_void_p
    ).value
    if not same_tiller:
        raise AdapterError(
            f"{path} links a different libtiller than the tiller package loaded "
            f"({_tiller_lib.library_path()}): set TILLER_LIB to the library the adapter was built with"
        )
    same_llama = ctypes.cast(lib.llama_decode, ctypes.c_void_p).value == ctypes.cast(
        llama_cpp.llama_cpp._lib.llama_decode, ctypes.c_void_p
    ).value
    if not same_llama:
        raise AdapterError(
            f"{path} links a different libllama than llama_cpp loaded: build the adapter against "
            "the llama-cpp-python wheel's libraries (examples/llama-cpp/provision.sh does)"
        )
    vp, i32, u64, u32, sz = ctypes.c_void_p, ctypes.c_int32, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_size_t
    lib.tiller_llama_new.argtypes = [vp, vp, ctypes.POINTER(i32), sz, ctypes.c_char_p]
    lib.tiller_llama_new.restype = vp
    lib.tiller_llama_free.argtypes = [vp]
    lib.tiller_llama_free.restype = None
    lib.tiller_llama_seq_begin.argtypes = [vp, i32, u64]
    lib.tiller_llama_seq_begin.restype = ctypes.c_int
    lib.tiller_llama_seq_end.argtypes = [vp, i32]
    lib.tiller_llama_seq_end.restype = ctypes.c_int
    lib.tiller_llama_seq_prompt.argtypes = [vp, i32, sz]
    lib.tiller_llama_seq_prompt.restype = ctypes.c_int
    lib.tiller_llama_begin.argtypes = [vp, llama_cpp.llama_batch, u32]
    lib.tiller_llama_begin.restype = ctypes.c_int
    lib.tiller_llama_end.argtypes = [vp, i32]
    lib.tiller_llama_end.restype = ctypes.c_int
    lib.tiller_llama_stopped.argtypes = [vp, ctypes.POINTER(u64), sz]
    lib.tiller_llama_stopped.restype = sz
    lib.tiller_llama_seq_stopped.argtypes = [vp, i32]
    lib.tiller_llama_seq_stopped.restype = ctypes.c_int
    lib.tiller_llama_last_error.argtypes = []
    lib.tiller_llama_last_error.restype = ctypes.c_char_p
    _adapter_lib = lib
    return lib


def _error(lib: ctypes.CDLL) -> AdapterError:
    return AdapterError((lib.tiller_llama_last_error() or b"").decode("utf-8", "replace"))


def _model_pointer(model: object) -> int:
    """A `llama_model*` from a low-level model pointer or a high-level `llama_cpp.Llama`."""
    if isinstance(model, llama_cpp.Llama):
        model = model.model
    if isinstance(model, int):
        return model
    value = ctypes.cast(model, ctypes.c_void_p).value
    if not value:
        raise AdapterError("the model pointer is NULL")
    return value


class Adapter:
    """Tiller on one llama.cpp context: hooks the residual stream after each of `layers`."""

    def __init__(
        self,
        runtime: tiller.Runtime,
        model: object,
        layers: Sequence[int],
        hook_format: Optional[str] = None,
    ) -> None:
        self._lib = _lib()
        self._runtime = runtime  # kept alive: the adapter holds its handle
        arr = (ctypes.c_int32 * len(layers))(*[int(x) for x in layers])
        fmt = hook_format.encode() if hook_format is not None else None
        h = self._lib.tiller_llama_new(runtime._handle(), _model_pointer(model), arr, len(layers), fmt)
        if not h:
            raise _error(self._lib)
        self._h: Optional[int] = h
        self._callback = llama_cpp.ggml_backend_sched_eval_callback(
            ctypes.cast(self._lib.tiller_llama_eval_callback, ctypes.c_void_p).value
        )
        self._stops = (ctypes.c_uint64 * 0)()
        self.stopped: List[int] = []

    def _handle(self) -> int:
        if not self._h:
            raise AdapterError("the adapter is closed")
        return self._h

    def attach(self, params: llama_cpp.llama_context_params) -> None:
        """Sets `params.cb_eval` (the C callback) and its user data before the context is made, and
        `params.kv_unified` (llama.cpp then keeps a batch's tokens in order)."""
        params.cb_eval = self._callback
        params.cb_eval_user_data = ctypes.c_void_p(self._handle())
        params.kv_unified = True

    def seq_begin(self, seq: int, request_id: int) -> None:
        """Sequence `seq` now carries request `request_id` (begun with `Runtime.begin_request`)."""
        if self._lib.tiller_llama_seq_begin(self._handle(), seq, request_id) != 0:
            raise _error(self._lib)

    def seq_prompt(self, seq: int, n_prompt: int) -> None:
        """The first `n_prompt` tokens sequence `seq` decodes are its prompt, whichever decodes carry
        them (a prompt prefilled in chunks). Call after `seq_begin`, before its first decode."""
        if self._lib.tiller_llama_seq_prompt(self._handle(), seq, n_prompt) != 0:
            raise _error(self._lib)

    def seq_end(self, seq: int) -> None:
        """Sequence `seq` no longer carries a request (end the request with `Runtime.end_request`)."""
        if self._lib.tiller_llama_seq_end(self._handle(), seq) != 0:
            raise _error(self._lib)

    def seq_stopped(self, seq: int) -> bool:
        """Whether a monitor stopped the request sequence `seq` carries: then generate nothing more
        for it (its later tokens are refused) and `seq_end` it."""
        r = self._lib.tiller_llama_seq_stopped(self._handle(), seq)
        if r < 0:
            raise _error(self._lib)
        return r == 1

    def decode(self, ctx: object, batch: Union[llama_cpp.llama_batch, object]) -> int:
        """`llama_cpp.llama_decode(ctx, batch)` inside a Tiller step; returns llama_decode's result
        (0 on success) and raises `AdapterError` when the adapter or a hook failed; `stopped` is
        set either way."""
        if not isinstance(batch, llama_cpp.llama_batch):
            batch = batch.batch  # llama_cpp._internals.LlamaBatch
        n_ubatch = llama_cpp.llama_n_ubatch(ctx)
        if self._lib.tiller_llama_begin(self._handle(), batch, n_ubatch) != 0:
            raise _error(self._lib)
        rc = llama_cpp.llama_decode(ctx, batch)
        failed = self._lib.tiller_llama_end(self._handle(), rc) != 0
        # A failed decode still reports the stops of the hooks that ran before the failure (the
        # C adapter has marked their sequences): read them before the error.
        error = _error(self._lib) if failed else None
        n = self._lib.tiller_llama_stopped(self._handle(), None, 0)
        if n:
            buf = (ctypes.c_uint64 * n)()
            self._lib.tiller_llama_stopped(self._handle(), buf, n)
            self.stopped = list(buf)
        else:
            self.stopped = []
        if error is not None:
            if rc != 0:
                return rc
            raise error
        return 0

    def close(self) -> None:
        """Frees the adapter; free the context it is attached to first."""
        if self._h:
            self._lib.tiller_llama_free(self._h)
            self._h = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
