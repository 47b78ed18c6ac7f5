"""A stop is a stop in the PyTorch adapter: a request a monitor stops is kept in `adapter.stopped`,
the generation loop leaves it out, and a step with its tokens is refused before the model runs.

The stop logic of `tiller.torch.Adapter` needs no torch (its steps are the runtime's), so these
tests drive it with NumPy activations through `step.hook`, as the forward hooks would. Where the
monitor fires is predicted independently: the SAE's pre-activations of feature 2 in NumPy float64
from the same seeded weights (`stop.toml`: stop when feature 2 is above 0).
"""

from __future__ import annotations

import numpy as np
import pytest

import tiller_runtime as tiller
from conftest import D_IN, D_SAE, HOOK, random_sae

# Rows whose pre-activation is within this of 0 are not used: float32 might round them either way.
MARGIN = 1e-3


def feature2_preact(x: np.ndarray) -> np.ndarray:
    """Feature 2's pre-activation of the `workdir` SAE (SAELens standard, b_dec subtracted)."""
    w = random_sae(np.random.default_rng(11), D_IN, D_SAE)
    x64 = x.astype(np.float64)
    return (x64 - w["b_dec"].astype(np.float64)) @ w["W_enc"][:, 2].astype(np.float64) + w["b_enc"][2]


@pytest.fixture
def rows(activations):
    """Row indices of `activations`: quiet ones (feature 2 off) and firing ones (on)."""
    pre = feature2_preact(activations)
    quiet = [i for i in range(len(pre)) if pre[i] < -MARGIN]
    firing = [i for i in range(len(pre)) if pre[i] > MARGIN]
    assert len(quiet) >= 10 and len(firing) >= 2, (quiet, firing)
    return quiet, firing


def test_a_stopped_request_ends_and_the_other_goes_on(workdir, activations, rows):
    from tiller_runtime.torch import Adapter, StoppedError

    quiet, firing = rows
    steps, stop_at = 6, 2
    # Request 1 meets a firing row at step `stop_at`; request 2 never does.
    feed = {1: quiet[:stop_at] + [firing[0]] + quiet[stop_at : steps - 1], 2: quiet[steps - 1 : 2 * steps - 1]}
    rt = tiller.Runtime.from_file(workdir / "stop.toml")
    adapter = Adapter(rt, {}, [])  # no model: the hooks are called by hand below
    try:
        rt.begin_request(1)
        rt.begin_request(2)
        ran = {1: 0, 2: 0}
        stops = []
        for step in range(steps):
            ids = adapter.running([1, 2])
            x = np.ascontiguousarray(activations[[feed[r][step] for r in ids]])
            with adapter.step([(r, "generated") for r in ids]) as s:
                s.hook(HOOK, x)
            for r in ids:
                ran[r] += 1
            stops.append(list(s.stop))
        assert stops == [[] if k != stop_at else [1] for k in range(steps)]
        assert ran == {1: stop_at + 1, 2: steps}
        assert adapter.stopped == {1}
        assert adapter.is_stopped(1) and not adapter.is_stopped(2)

        # A host that ignores the stop is refused before any hook runs, with the request named.
        before = rt.request_summary(1)["tokens"]
        with pytest.raises(StoppedError, match="token 1 belongs to request 1, which a monitor stopped"):
            with adapter.step([(2, "generated"), (1, "generated")]):
                pytest.fail("the block ran")
        with pytest.raises(StoppedError, match="request 1"):
            with adapter.step(np.array([2, 1], np.uint64), np.array([1, 1], np.uint8)):
                pytest.fail("the block ran")
        assert adapter.current is None
        assert rt.request_summary(1)["tokens"] == before == stop_at + 1

        s1 = adapter.end_request(1)
        assert s1["stopped"] and [e["token"] for e in s1["events"]] == [stop_at]
        assert not adapter.is_stopped(1) and adapter.stopped == frozenset()
        # The id is free again: a new request 1 runs.
        rt.begin_request(1)
        with adapter.step([(1, "prompt")]) as s:
            s.hook(HOOK, np.ascontiguousarray(activations[[quiet[0]]]))
        assert s.stop == []
        assert not adapter.end_request(1)["stopped"]
        assert not adapter.end_request(2)["stopped"]
    finally:
        rt.close()



@pytest.mark.parametrize("failure", ["model", "hook"])
def test_a_stop_before_the_block_raises_still_stops_the_request(workdir, activations, rows, monkeypatch, failure):
    """The monitor stops request 1 at the step's first hook, then the block raises: the model
    itself, or a later hook (the runtime's debug-build panic). The exception propagates unchanged,
    and the stop reaches the adapter as after a step that succeeded; request 2 goes on."""
    from tiller_runtime.torch import Adapter, StoppedError

    quiet, firing = rows
    rt = tiller.Runtime.from_file(workdir / "stop.toml")
    adapter = Adapter(rt, {}, [])
    try:
        rt.begin_request(1)
        rt.begin_request(2)
        x = np.ascontiguousarray(activations[[firing[0], quiet[0]]])
        with pytest.raises(Exception) as raised:
            with adapter.step([(1, "generated"), (2, "generated")]) as s:
                s.hook(HOOK, x)
                if failure == "model":
                    raise RuntimeError("the model failed after the hook")
                monkeypatch.setenv("TILLER_TEST_PANIC_AT_HOOK", HOOK)
                s.hook(HOOK, x)
                pytest.fail(
                    "the hook returned with TILLER_TEST_PANIC_AT_HOOK set: the injected panic needs "
                    f"a debug build of libtiller ({tiller._lib.library_path()})"
                )
        monkeypatch.delenv("TILLER_TEST_PANIC_AT_HOOK", raising=False)
        if failure == "model":
            assert raised.type is RuntimeError and str(raised.value) == "the model failed after the hook"
        else:
            assert raised.type is tiller.PanicError and "injected panic" in raised.value.message
        assert adapter.current is None
        assert s.stop == [1]
        assert adapter.stopped == {1} and adapter.running([1, 2]) == [2]
        assert rt.request_summary(1)["stopped"] and not rt.request_summary(2)["stopped"]

        with pytest.raises(StoppedError, match="token 0 belongs to request 1"):
            with adapter.step([(1, "generated")]):
                pytest.fail("the block ran")
        with adapter.step([(2, "generated")]) as s:
            s.hook(HOOK, np.ascontiguousarray(activations[[quiet[1]]]))
        assert s.stop == [] and adapter.stopped == {1}

        # A block that raises with no stop marks nothing.
        with pytest.raises(RuntimeError):
            with adapter.step([(2, "generated")]) as s:
                s.hook(HOOK, np.ascontiguousarray(activations[[quiet[2]]]))
                raise RuntimeError("the model failed")
        assert s.stop == [] and adapter.stopped == {1}
        assert adapter.end_request(1)["stopped"] and not adapter.end_request(2)["stopped"]
    finally:
        rt.close()
