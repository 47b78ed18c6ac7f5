"""Tiller for Python: read sparse-dictionary features and steer activations in place.

A thin ctypes binding of libtiller (the C ABI in `plugin-abi/c/include/tiller.h`): the same
library C hosts load, with NumPy arrays passed by pointer, never copied.

    import numpy as np, tiller_runtime as tiller

    rt = tiller.Runtime.from_file("tiller.toml")
    rt.begin_request(1, profile="careful")
    hidden = np.zeros((1, 2304), np.float32)
    with rt.step([(1, "generated")]) as step:
        step.hook("model.layers.12", hidden)      # edited in place
    print(step.stop, rt.end_request(1))

The library is found through `$TILLER_LIB`, else beside this package, else in the Cargo
workspace's `target/release` or `target/debug` (see `tiller.library_path()` and the README).
PyTorch models: `tiller.torch.attach`.
"""

from ._errors import (
    BufferTooSmallError,
    ClosedError,
    ConfigError,
    DictionaryError,
    InvalidArgumentError,
    IoError,
    LibraryError,
    NotFoundError,
    NullArgumentError,
    OnnxRuntimeError,
    PanicError,
    TillerError,
    UnsupportedError,
)
from ._lib import candidates as library_candidates
from ._lib import library_path
from .runtime import BF16, F16, F32, GENERATED, PROMPT, Runtime, Step, build_info, version

__version__ = "0.1.0"

__all__ = [
    "BF16",
    "F16",
    "F32",
    "GENERATED",
    "PROMPT",
    "BufferTooSmallError",
    "ClosedError",
    "ConfigError",
    "DictionaryError",
    "InvalidArgumentError",
    "IoError",
    "LibraryError",
    "NotFoundError",
    "NullArgumentError",
    "OnnxRuntimeError",
    "PanicError",
    "Runtime",
    "Step",
    "TillerError",
    "UnsupportedError",
    "build_info",
    "library_candidates",
    "library_path",
    "version",
]
