"""`Runtime.run_step`, one hook's whole step in one call into the library, is the same step as
`with rt.step(...) as s: s.hook(...)`: the same bits, summaries, metrics and stop ids, and the same
errors, with the activations left alone when it refuses."""

from __future__ import annotations

import numpy as np
import pytest

import tiller_runtime as tiller
from conftest import D_IN, HOOK
from test_parity import comparable


def three_calls(rt, tokens, x, phases=None):
    with rt.step(tokens, phases) as step:
        step.hook(HOOK, x)
    return step.stop


def one_call(rt, tokens, x, phases=None):
    return rt.run_step(tokens, HOOK, x, phases=phases)


@pytest.mark.parametrize("config", ["tiller.toml", "stop.toml"])
def test_same_step_as_open_hook_close(workdir, activations, config):
    """Two runtimes on the same config, one driven each way, over batches of several requests
    with profiles, prompt and generated tokens: every array, summary, metric and stop list is
    equal, bit for bit."""
    rts = [tiller.Runtime.from_file(workdir / config) for _ in range(2)]
    profiles = {1: "mixed", 2: "calm", 3: None} if config == "tiller.toml" else {1: None, 2: None, 3: None}
    for rt in rts:
        for r, p in profiles.items():
            rt.begin_request(r, p)
    ys = [activations.copy() for _ in rts]
    stops = [[], []]
    batches = [(0, 6, "prompt"), (6, 9, "generated"), (9, 10, "generated"), (10, 16, "generated")]
    for start, end, phase in batches:
        tokens = [((t % 3) + 1, phase) for t in range(start, end)]
        for k, (rt, run) in enumerate(zip(rts, (three_calls, one_call))):
            stops[k].append(sorted(run(rt, tokens, ys[k][start:end])))
    # The token arrays variant.
    ids = np.array([1, 2, 3, 1], np.uint64)
    ph = np.array([1, 1, 0, 1], np.uint8)
    for k, (rt, run) in enumerate(zip(rts, (three_calls, one_call))):
        stops[k].append(sorted(run(rt, ids, ys[k][16:20], phases=ph)))
    assert np.array_equal(ys[0].view(np.uint32), ys[1].view(np.uint32))
    if config == "tiller.toml":
        assert not np.array_equal(ys[1], activations), "the profiles edited something"
    assert stops[0] == stops[1]
    summaries = [[rt.end_request(r) for r in profiles] for rt in rts]
    assert summaries[0] == summaries[1]
    assert comparable(rts[0].metrics_text()) == comparable(rts[1].metrics_text())
    if config == "stop.toml":
        assert any(stops[1]), "the stop monitor fires on this data"
    for rt in rts:
        rt.close()


def test_refusals_are_those_of_the_three_calls(workdir, activations):
    """Each bad call raises the same error either way, leaves the activations alone and counts
    the same metrics."""
    rts = [tiller.Runtime.from_file(workdir / "tiller.toml") for _ in range(2)]
    for rt in rts:
        rt.begin_request(1, "mixed")
    x = activations[:2].copy()
    tokens = [(1, "generated")] * 2
    ro = x.copy()
    ro.flags.writeable = False
    bad = [
        (tiller.NotFoundError, "blocks.9", tokens, x),
        (tiller.NotFoundError, HOOK, [(99, "prompt")] * 2, x),
        (tiller.InvalidArgumentError, HOOK, tokens + [(1, "generated")], x),
        (tiller.InvalidArgumentError, HOOK, tokens, np.zeros((2, D_IN + 1), np.float32)),
        (tiller.InvalidArgumentError, HOOK, tokens, x.astype(np.float64)),
        (tiller.InvalidArgumentError, HOOK, [(1, "decode")] * 2, x),
        (tiller.InvalidArgumentError, HOOK, tokens, ro),
    ]
    for error, hook, toks, a in bad:
        messages = []
        with pytest.raises(error) as e:
            with rts[0].step(toks) as step:
                step.hook(hook, a)
        messages.append(str(e.value))
        with pytest.raises(error) as e:
            rts[1].run_step(toks, hook, a)
        messages.append(str(e.value))
        assert messages[0] == messages[1]
    assert np.array_equal(x, activations[:2])
    # A step that opened counts its tokens in the request either way; `run_step` checks the
    # activations before it opens one, so only the library's refusals (the unknown hook, the
    # width) opened a step.
    assert rts[0].request_summary(1)["tokens"] == 2 + 3 + 2 + 2 + 2
    assert rts[1].request_summary(1)["tokens"] == 2 + 2
    assert comparable(rts[0].metrics_text()) == comparable(rts[1].metrics_text())
    # And then it runs.
    assert rts[1].run_step(tokens, HOOK, x) == []
    assert not np.array_equal(x, activations[:2])
    for rt in rts:
        rt.close()
    with pytest.raises(tiller.ClosedError):
        rts[1].run_step(tokens, HOOK, x)


def test_half_precision(workdir, activations):
    rts = [tiller.Runtime.from_file(workdir / "tiller.toml") for _ in range(2)]
    for rt in rts:
        rt.begin_request(1, "mixed")
    ys = [activations[:4].astype(np.float16) for _ in rts]
    three_calls(rts[0], [(1, "prompt")] * 4, ys[0])
    one_call(rts[1], [(1, "prompt")] * 4, ys[1])
    assert np.array_equal(ys[0].view(np.uint16), ys[1].view(np.uint16))
    assert not np.array_equal(ys[1], activations[:4].astype(np.float16))
