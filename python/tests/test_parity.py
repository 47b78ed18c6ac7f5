"""The binding gives the Rust API's results bit for bit: the same activations run through
`tiller-export replay` (the Rust `Runtime` directly) and through the Python binding (libtiller
over ctypes) give identical float32 bits, the same request summary and the same metrics."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Optional

import numpy as np
import pytest

import tiller_runtime as tiller
from conftest import HOOK, export_bin


def rust_replay(workdir: Path, x: np.ndarray, tmp: Path, profile: Optional[str], phase: str, batch: int):
    inp, out, metrics, summary = tmp / "x.npy", tmp / "y.npy", tmp / "m.txt", tmp / "s.json"
    np.save(inp, x)
    cmd = [str(export_bin()), "replay", "--config", str(workdir / "tiller.toml"), "--hook", HOOK,
           "--input", str(inp), "--output", str(out), "--phase", phase, "--batch", str(batch),
           "--metrics", str(metrics), "--summary", str(summary)]
    if profile:
        cmd += ["--profile", profile]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return np.load(out), json.loads(summary.read_text()), metrics.read_text()


def python_replay(workdir: Path, x: np.ndarray, profile: Optional[str], phase: str, batch: int):
    """What `replay` does, through the binding: one request, steps of `batch` prompt tokens or
    one generated token, each edited in place in a view of the whole array."""
    y = x.copy()
    step_len = 1 if phase == "generated" else batch
    with tiller.Runtime.from_file(workdir / "tiller.toml") as rt:
        rt.begin_request(1, profile)
        for start in range(0, len(y), step_len):
            rows = y[start:start + step_len]  # a view: contiguous rows of a C-contiguous array
            with rt.step([(1, phase)] * len(rows)) as step:
                step.hook(HOOK, rows)
        summary = rt.end_request(1)
        return y, summary, rt.metrics_text()


def comparable(metrics: str) -> list:
    # Durations are wall-clock; everything else is a count or a value from the same code path.
    return [l for l in metrics.splitlines() if "_duration_seconds" not in l]


@pytest.mark.parametrize(
    "profile,phase,batch",
    [("calm", "generated", 1), ("mixed", "prompt", 8), ("mixed", "generated", 1), (None, "prompt", 7)],
)
def test_same_bits_summary_and_metrics_as_rust(workdir, activations, tmp_path, profile, phase, batch):
    want_y, want_summary, want_metrics = rust_replay(workdir, activations, tmp_path, profile, phase, batch)
    got_y, got_summary, got_metrics = python_replay(workdir, activations, profile, phase, batch)

    assert got_y.dtype == want_y.dtype == np.float32
    assert got_y.shape == want_y.shape
    # Bit for bit, not approximately: the same library code ran on the same floats.
    assert np.array_equal(got_y.view(np.uint32), want_y.view(np.uint32))
    assert got_summary == want_summary
    assert comparable(got_metrics) == comparable(want_metrics)
    if profile is not None:
        # The comparison means something: the config edited the activations and fired events.
        assert not np.array_equal(got_y, activations)
        assert sum(got_summary["steering"].values()) > 0
    assert got_summary["events"], "the token monitor fires on this data"


def test_switch_profile_reached(workdir, activations):
    # The "mixed" run above crosses the request monitor's count and switches to "calm": both
    # profiles' rules appear in the summary, so the parity covers a mid-request switch too.
    _, summary, _ = python_replay(workdir, activations, "mixed", "generated", 1)
    assert summary["profile"] == "calm"
    assert "clamp7" in summary["steering"] and "add1" in summary["steering"]


def test_array_tokens_equal_pairs(workdir, activations):
    """`step(ids, phases)` with NumPy arrays is the same step as the list of pairs."""
    ids = np.array([1, 2] * 20, dtype=np.int64)
    phases = np.array([0, 1] * 20, dtype=np.uint8)
    out = []
    for form in ("pairs", "arrays"):
        y = activations.copy()
        with tiller.Runtime.from_file(workdir / "tiller.toml") as rt:
            rt.begin_request(1, "mixed")
            rt.begin_request(2, "calm")
            if form == "pairs":
                step = rt.step([(int(i), "prompt" if p == 0 else "generated") for i, p in zip(ids, phases)])
            else:
                step = rt.step(ids, phases)
            with step:
                step.hook(HOOK, y)
            out.append((y, rt.end_request(1), rt.end_request(2)))
    assert np.array_equal(out[0][0], out[1][0])
    assert out[0][1:] == out[1][1:]
