"""Activations are edited where they lie: no copy on the way in or out."""

from __future__ import annotations

import numpy as np

import tiller_runtime as tiller
from conftest import D_IN, HOOK


def test_numpy_array_is_edited_in_place(rt, activations):
    x = activations[:4].copy()
    before = x.copy()
    ptr = x.__array_interface__["data"][0]
    view = x[1:3]  # a view taken before the call: it must see the edits
    view_before = view.copy()
    rt.begin_request(1, "mixed")
    with rt.step([(1, "prompt")] * 4) as step:
        assert step.hook(HOOK, x) is None
    rt.end_request(1)
    assert x.__array_interface__["data"][0] == ptr
    assert np.shares_memory(view, x)
    assert not np.array_equal(x, before), "the profile edits these rows"
    assert not np.array_equal(view, view_before)
    assert np.array_equal(view, x[1:3])


def test_row_view_of_a_larger_buffer(rt, activations):
    """A host's preallocated [max_tokens, width] buffer: the step's rows are a leading view."""
    buf = np.zeros((16, D_IN), np.float32)
    buf[:3] = activations[:3]
    rows = buf[:3]
    rt.begin_request(1, "mixed")
    with rt.step([(1, "generated")] * 3) as step:
        step.hook(HOOK, rows)
    rt.end_request(1)
    assert np.shares_memory(rows, buf)
    assert not np.array_equal(buf[:3], activations[:3])
    assert not buf[3:].any(), "rows past the step are untouched"


def test_without_profile_nothing_changes(rt, activations):
    x = activations[:5].copy()
    rt.begin_request(3)
    with rt.step([(3, "prompt")] * 5) as step:
        step.hook(HOOK, x)
    assert np.array_equal(x, activations[:5])
    s = rt.end_request(3)
    assert s["tokens"] == 5 and s["steering"] == {}


def test_stop_ids_come_back_from_close(workdir, activations):
    rt = tiller.Runtime.from_file(workdir / "stop.toml")
    for r in (10, 11, 12):
        rt.begin_request(r)
    x = activations[:3].copy()
    with rt.step([(10, "generated"), (11, "generated"), (12, "generated")]) as step:
        step.hook(HOOK, x)
    s = {r: rt.end_request(r) for r in (10, 11, 12)}
    stopped = sorted(r for r in s if s[r]["stopped"])
    assert sorted(step.stop) == stopped
    assert step.close() == step.stop  # idempotent once closed
    assert stopped, "feature 2 fires on this data"
