"""A PyTorch adapter: forward hooks that hand a model's activations to tiller by pointer.

    import tiller_runtime as tiller, tiller_runtime.torch

    rt = tiller.Runtime.from_file("tiller.toml")
    adapter = tiller.torch.attach(model, rt, {"model.layers.12": "model.layers.12"})
    rt.begin_request(7, profile="careful")
    with torch.inference_mode(), adapter.step([(7, "prompt")] * n_prompt) as step:
        model(input_ids)
    print(step.stop)          # request ids a monitor asked to stop
    adapter.remove()

A stop is a stop: the requests a monitor stopped are kept in `adapter.stopped` (`is_stopped(id)`,
`running(ids)`); the host generates nothing more for them, and a later `adapter.step` with one of
their tokens raises `StoppedError` before the model runs. `adapter.end_request(id)` ends the request
and forgets its stop.

Each hooked module's output (a tensor, or element 0 of the `(hidden, residual)` / `(hidden, ...)`
tuples decoder layers return) is edited in place: CPU tensors through their data pointer, CUDA
tensors through `tiller_step_hook_cuda` with the current stream (this needs a CUDA build of
libtiller; other builds raise `tiller.UnsupportedError`). Rows are the tensor flattened to
`[n_tokens, hidden]` (a `[batch, seq, hidden]` tensor gives `batch × seq` rows, row-major), and
must match the tokens given to `adapter.step`, padding positions included.

Importing this module does not import torch: that happens when a model is attached.
"""

from __future__ import annotations

import contextlib
import threading
from typing import (
    TYPE_CHECKING,
    Any,
    Dict,
    FrozenSet,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Set,
    Union,
)

import numpy as np

from ._errors import InvalidArgumentError, NotFoundError, TillerError, UnsupportedError
from .runtime import BF16, F16, F32, Runtime, Step

if TYPE_CHECKING:  # pragma: no cover
    import torch as _torch

__all__ = ["Adapter", "StoppedError", "attach", "steer_tensor"]


class StoppedError(TillerError):
    """A step was opened with tokens of a request a monitor had stopped."""


def _import_torch() -> Any:
    """torch, imported on first use so that `import tiller_runtime.torch` works without it."""
    try:
        import torch
    except ImportError as e:  # torch absent, or hidden with sys.modules["torch"] = None
        raise ImportError(
            "tiller.torch needs PyTorch (pip install torch); the NumPy API (tiller.Runtime) does not"
        ) from e
    return torch


_dtype_codes: Optional[Dict[Any, int]] = None


def _dtype_code(torch: Any, dtype: Any) -> Optional[int]:
    global _dtype_codes
    if _dtype_codes is None:
        _dtype_codes = {torch.float32: F32, torch.float16: F16, torch.bfloat16: BF16}
    return _dtype_codes.get(dtype)


def steer_tensor(step: Step, hook: str, t: "_torch.Tensor", where: str = "") -> None:
    """Runs `hook` of `step` on tensor `t` in place, by pointer (no copy).

    `t` is float32/float16/bfloat16, contiguous, at least 2-D (flattened to `[-1, t.shape[-1]]`),
    on the CPU or a CUDA device, and not tracked by autograd.
    """
    torch = _import_torch()
    at = f" at `{where}`" if where else ""
    if not isinstance(t, torch.Tensor):
        raise InvalidArgumentError(f"the activations{at} are a {type(t).__name__}, not a torch.Tensor")
    code = _dtype_code(torch, t.dtype)
    if code is None:
        raise InvalidArgumentError(
            f"the activations{at} have dtype {t.dtype}: float32, float16 or bfloat16 expected"
        )
    if t.dim() < 2:
        raise InvalidArgumentError(
            f"the activations{at} have shape {tuple(t.shape)}: at least [n_tokens, hidden] expected"
        )
    if not t.is_contiguous():
        raise InvalidArgumentError(
            f"the activations{at} are not contiguous (strides {t.stride()}): they are edited in "
            "place by pointer, so the module must return a contiguous tensor"
        )
    if t.requires_grad and torch.is_grad_enabled():
        raise InvalidArgumentError(
            f"the activations{at} require grad: tiller edits them by pointer, which autograd "
            "cannot track; run the model under torch.inference_mode() or torch.no_grad()"
        )
    width = int(t.shape[-1])
    n = t.numel() // width if width else 0
    _hook_on_device(torch, step, hook, t.device, t.data_ptr(), code, n, width, at)


def _hook_on_device(
    torch: Any, step: Step, hook: str, device: Any, ptr: int, code: int, n: int, width: int, at: str
) -> None:
    """Hands `n × width` values at `ptr` on `device` to the step: host memory by pointer, CUDA
    memory by device pointer and the device's current stream (the CUDA build of libtiller
    enqueues its work there, so it is ordered with the model's kernels without a sync)."""
    if device.type == "cpu":
        step.hook_ptr(hook, ptr, code, n, width)
    elif device.type == "cuda":
        stream = torch.cuda.current_stream(device).cuda_stream
        try:
            step.hook_cuda(hook, ptr, code, n, width, stream)
        except UnsupportedError as e:
            raise UnsupportedError(f"a tensor on {device}{at}: {e.message}") from None
    else:
        raise UnsupportedError(f"the activations{at} are on {device}: tiller takes CPU or CUDA tensors")


class Adapter:
    """Forward hooks on a model's submodules, steering through one tiller runtime.

    Open a step around each forward pass with `with adapter.step(tokens):`; hooks that run
    outside a step leave the activations untouched (or raise, with `require_step=True`). Steps
    are per thread, so one adapter serves a model used by several threads.
    """

    def __init__(
        self,
        runtime: Runtime,
        hooks: Mapping[str, str],
        handles: List[Any],
        require_step: bool = False,
    ) -> None:
        self.runtime = runtime
        #: module name → tiller hook name
        self.hooks: Dict[str, str] = dict(hooks)
        self.require_step = require_step
        self._handles = handles
        self._local = threading.local()
        # Requests a monitor stopped in a step of this adapter, until `end_request` forgets them.
        self._stopped: Set[int] = set()
        self._stopped_lock = threading.Lock()

    @property
    def stopped(self) -> FrozenSet[int]:
        """Ids of the requests a monitor stopped in this adapter's steps (not yet ended)."""
        with self._stopped_lock:
            return frozenset(self._stopped)

    def is_stopped(self, request_id: int) -> bool:
        """Whether a monitor stopped request `request_id`: generate nothing more for it."""
        with self._stopped_lock:
            return int(request_id) in self._stopped

    def running(self, request_ids: Iterable[int]) -> List[int]:
        """`request_ids` without the stopped ones, in order: the next step's requests."""
        with self._stopped_lock:
            return [r for r in request_ids if int(r) not in self._stopped]

    def end_request(self, request_id: int) -> Dict[str, Any]:
        """Ends request `request_id` (`Runtime.end_request`, whose summary it returns) and
        forgets its stop, so that the id may carry a new request."""
        summary = self.runtime.end_request(request_id)
        with self._stopped_lock:
            self._stopped.discard(int(request_id))
        return summary

    @property
    def current(self) -> Optional[Step]:
        """The step open on this thread, if any."""
        return getattr(self._local, "step", None)

    @contextlib.contextmanager
    def step(self, tokens: Any, phases: Any = None) -> Iterator[Step]:
        """Opens a step over the batch's tokens (as `Runtime.step` takes them) for the forward
        passes run inside the block; closes it on exit (its `stop` then holds the requests to
        stop, which the adapter keeps in `stopped`), also when the block raises: the requests a
        monitor stopped before the error are stopped all the same, and the error propagates.
        Tokens of a stopped request raise `StoppedError`: the host must leave the request out."""
        if self.current is not None:
            raise TillerError("a step is already open on this thread for this adapter")
        self._refuse_stopped(tokens, phases)
        s = self.runtime.step(tokens, phases)
        self._local.step = s
        try:
            yield s
        except BaseException as e:
            # The runtime has already stopped those requests (their summary says so); freeing the
            # step unclosed would lose the ids, and the host would generate on for them.
            try:
                self._close(s)
            except TillerError as close_error:
                if hasattr(e, "add_note"):  # Python 3.11+
                    e.add_note(f"closing the step also failed: {close_error}")
            raise
        else:
            self._close(s)
        finally:
            self._local.step = None

    def _close(self, s: Step) -> None:
        """Closes `s` unless the block closed or freed it, and keeps the requests it stopped."""
        if s.stop is None and s._s:
            s.close()
        if s.stop:
            with self._stopped_lock:
                self._stopped.update(int(r) for r in s.stop)

    def _refuse_stopped(self, tokens: Any, phases: Any) -> None:
        with self._stopped_lock:
            if not self._stopped:
                return
            stopped = set(self._stopped)
        if phases is None:
            hit = next(((i, int(t[0])) for i, t in enumerate(tokens) if int(t[0]) in stopped), None)
        else:
            # An id array (a large batch): one vectorised membership test.
            ids = np.asarray(tokens).reshape(-1)
            where = np.flatnonzero(np.isin(ids, np.fromiter(stopped, np.uint64, len(stopped))))
            hit = (int(where[0]), int(ids[where[0]])) if where.size else None
        if hit is not None:
            raise StoppedError(
                f"token {hit[0]} belongs to request {hit[1]}, which a monitor stopped: leave it "
                "out of the batch (adapter.running(ids)) and end it (adapter.end_request)"
            )

    def _forward_hook(self, module_name: str, hook: str) -> Any:
        def fn(module: Any, args: Any, output: Any) -> None:
            step = self.current
            if step is None:
                if self.require_step:
                    raise TillerError(
                        f"`{module_name}` ran outside `adapter.step(...)`: tiller needs the "
                        "batch's token → request map"
                    )
                return None
            t = output[0] if isinstance(output, (tuple, list)) else output
            steer_tensor(step, hook, t, module_name)
            return None  # edited in place: the module's output object is unchanged

        return fn

    def remove(self) -> None:
        """Removes the forward hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "Adapter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def attach(
    model: "_torch.nn.Module",
    runtime: Runtime,
    hooks: Union[Mapping[str, str], Iterable[str]],
    *,
    require_step: bool = False,
) -> Adapter:
    """Registers forward hooks on `model`'s submodules named in `hooks` (module name → tiller
    hook name; a list of names uses each module name as the hook name) and returns the adapter.
    """
    torch = _import_torch()
    if not isinstance(model, torch.nn.Module):
        raise InvalidArgumentError(f"attach takes a torch.nn.Module, not {type(model).__name__}")
    if not isinstance(runtime, Runtime):
        raise InvalidArgumentError(f"attach takes a tiller.Runtime, not {type(runtime).__name__}")
    mapping = dict(hooks) if isinstance(hooks, Mapping) else {h: h for h in hooks}
    modules = dict(model.named_modules())
    missing = [m for m in mapping if m not in modules]
    if missing:
        near = [n for n in modules if n and n.rsplit(".", 1)[-1] == missing[0].rsplit(".", 1)[-1]]
        hint = f" (modules with that last part: {', '.join(near[:5])})" if near else ""
        raise NotFoundError(f"the model has no submodule `{missing[0]}`{hint}")
    adapter = Adapter(runtime, mapping, [], require_step)
    for module_name, hook in mapping.items():
        handle = modules[module_name].register_forward_hook(adapter._forward_hook(module_name, hook))
        adapter._handles.append(handle)
    return adapter
