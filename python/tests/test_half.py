"""float16 (and bfloat16, through ml_dtypes) host memory: the runtime widens each row to f32,
runs the same f32 code path, and writes back the rows it edited, rounded to nearest even. So
the half result equals the f32 result of the widened input, rounded: bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

import tiller_runtime as tiller
from conftest import HOOK


def run(workdir, x, profile="mixed", phase="prompt"):
    with tiller.Runtime.from_file(workdir / "tiller.toml") as rt:
        rt.begin_request(1, profile)
        with rt.step([(1, phase)] * len(x)) as step:
            step.hook(HOOK, x)
        return rt.end_request(1)


def test_float16_matches_f32_path(workdir, activations):
    x16 = activations[:12].astype(np.float16)
    ptr = x16.__array_interface__["data"][0]
    wide = x16.astype(np.float32)
    s16 = run(workdir, x16)
    s32 = run(workdir, wide)
    assert x16.__array_interface__["data"][0] == ptr and x16.dtype == np.float16
    assert np.array_equal(x16.view(np.uint16), wide.astype(np.float16).view(np.uint16))
    assert not np.array_equal(x16, activations[:12].astype(np.float16)), "edited"
    assert s16 == s32


def test_bfloat16_matches_f32_path(workdir, activations):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = np.dtype(ml_dtypes.bfloat16)
    xb = activations[:12].astype(bf16)
    ptr = xb.__array_interface__["data"][0]
    wide = xb.astype(np.float32)
    sb = run(workdir, xb)
    s32 = run(workdir, wide)
    assert xb.__array_interface__["data"][0] == ptr and xb.dtype == bf16
    assert np.array_equal(xb.view(np.uint16), wide.astype(bf16).view(np.uint16))
    assert not np.array_equal(xb.view(np.uint16), activations[:12].astype(bf16).view(np.uint16))
    assert sb == s32


def test_half_errors_still_checked(rt):
    rt.begin_request(1)
    with rt.step([(1, "prompt")]) as step:
        x = np.zeros((1, 16), np.float16)
        x.flags.writeable = False
        with pytest.raises(tiller.InvalidArgumentError, match="read-only"):
            step.hook(HOOK, x)
