"""One Runtime shared by threads (ctypes releases the GIL during each call): each thread's steps
give the same bits as the same work done on one thread."""

from __future__ import annotations

import threading

import numpy as np

import tiller_runtime as tiller
from conftest import HOOK


def work(rt, rid, profile, x):
    rt.begin_request(rid, profile)
    for i in range(len(x)):
        with rt.step([(rid, "generated")]) as step:
            step.hook(HOOK, x[i:i + 1])
    return rt.end_request(rid)


def test_threads_match_one_thread(workdir, activations):
    profiles = ["mixed", "calm", None, "mixed"]
    want = []
    with tiller.Runtime.from_file(workdir / "tiller.toml") as rt:
        for k, p in enumerate(profiles):
            x = activations.copy()
            want.append((x, work(rt, 100 + k, p, x)))

    got = [None] * len(profiles)
    errors = []
    with tiller.Runtime.from_file(workdir / "tiller.toml") as rt:
        def run(k):
            try:
                x = activations.copy()
                got[k] = (x, work(rt, 100 + k, profiles[k], x))
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=run, args=(k,)) for k in range(len(profiles))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    for (wx, ws), (gx, gs) in zip(want, got):
        assert np.array_equal(wx.view(np.uint32), gx.view(np.uint32))
        assert ws == gs
