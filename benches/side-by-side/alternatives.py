#!/usr/bin/env python3
"""The Python side of benches/compare: Tiller's Python binding, ONNX Runtime's own Python API and
NumPy, doing the same step on the same dictionary and inputs. Prints JSON lines on stdout.

    python benches/side-by-side/alternatives.py DIR [--quick]

DIR is the comparison folder `compare prepare` writes (target/bench-dicts/compare-2304x16384):
tiller.toml, sliced.onnx, encode.onnx, the weights as .npy, x.npy and meta.json.

The step, at batch 1 and 64, on fresh activations for every call (copied before each round,
outside the timed part), edited in place:
  - tiller_python: `with rt.step(ids, phases) as s: s.hook("h", x)`: Tiller encodes the 64
    monitored features, updates the request monitor and the metrics, applies the 4 rules;
  - ort_python: ONNX Runtime's Python API runs the 64-feature graph (`sess.run`), then NumPy
    compares the features with the monitor's threshold and applies the 4 edits;
  - numpy: the same with the encode in NumPy too: relu(x @ W[:, cols] + b).
The three are interleaved round by round so that drifting load hits them alike. Then the full
encode of one token (all 16384 features): ONNX Runtime's Python API on encode.onnx and NumPy, each
call after the caches have been flushed.
Set OMP_NUM_THREADS=OPENBLAS_NUM_THREADS=MKL_NUM_THREADS=1 before starting Python (benches/compare
does): BLAS reads them when it loads.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "python"))

import tiller_runtime as tiller  # noqa: E402


def emit(**rec) -> None:
    print(json.dumps(rec), flush=True)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class Monitor:
    """The config's request monitor: max over the monitored features, against a threshold."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.max = -np.inf
        self.fired = False

    def update(self, acts: np.ndarray) -> None:
        m = float(acts.max())
        if m > self.max:
            self.max = m
            self.fired = self.fired or m > self.threshold


def edits(meta: dict, w_dec_rules: np.ndarray):
    """The 4 rules as one vectorised edit: each coefficient is affine in its feature's activation
    (clamp v: v - f; add a: a; scale s: (s-1)·f; ablate: -f), then x += C @ D."""
    cols, a, b = [], [], []
    for r in meta["rules"]:
        op, p = r["op"], float(r["param"])
        cols.append(r["column"])
        slope, const = {"clamp": (-1.0, p), "add": (0.0, p), "scale": (p - 1.0, 0.0), "ablate": (-1.0, 0.0)}[op]
        a.append(slope)
        b.append(const)
    cols = np.array(cols)
    a, b = np.array(a, np.float32), np.array(b, np.float32)
    wd = np.ascontiguousarray(w_dec_rules, dtype=np.float32)

    def apply(x: np.ndarray, acts: np.ndarray) -> None:
        c = acts[:, cols] * a + b
        x += c @ wd

    return apply


def timed(fn, views) -> float:
    t0 = time.perf_counter_ns()
    for v in views:
        fn(v)
    return (time.perf_counter_ns() - t0) / len(views) / 1e3


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    quick = "--quick" in sys.argv
    if len(args) != 1:
        sys.exit(__doc__)
    d = Path(args[0])
    meta = json.loads((d / "meta.json").read_text())
    width = meta["d"]
    x = np.load(d / "x.npy")
    ws, bs = np.load(d / "w_enc_sliced.npy"), np.load(d / "b_enc_sliced.npy")
    apply = edits(meta, np.load(d / "w_dec_rules.npy"))
    log(f"python {sys.version.split()[0]}, numpy {np.__version__}, onnxruntime {ort.__version__}, "
        f"libtiller {tiller._lib.library_path()}")

    # The machine's dense FLOP/s as NumPy's BLAS reaches it on one thread.
    a = np.random.default_rng(0).standard_normal((1024, 1024), dtype=np.float32)
    bm = np.random.default_rng(1).standard_normal((1024, 1024), dtype=np.float32)
    a @ bm
    best = min(timed(lambda _: a @ bm, [None]) for _ in range(3 if quick else 6))
    emit(kind="limit", name="dense_gflops", value=2 * 1024**3 / (best * 1e-6) / 1e9,
         by=f"NumPy {np.__version__} sgemm 1024^3")
    # And as ONNX Runtime's own GEMM (MLAS) reaches it: gemm.onnx is one [1024, 1024] MatMul.
    gemm = session(d / "gemm.onnx")
    feed = {gemm.get_inputs()[0].name: a}
    gemm.run(None, feed)
    best = min(timed(lambda _: gemm.run(None, feed), [None]) for _ in range(3 if quick else 6))
    emit(kind="limit", name="dense_gflops", value=2 * 1024**3 / (best * 1e-6) / 1e9,
         by=f"ONNX Runtime {ort.__version__} MatMul (MLAS) 1024^3")
    del gemm

    rt = tiller.Runtime.from_file(d / "tiller.toml")
    rt.begin_request(1, "p")
    sliced = session(d / "sliced.onnx")
    rounds = 7 if quick else 41
    for batch in (1, 64):
        calls = (300 if quick else 2000) if batch == 1 else (20 if quick else 50)
        ids, phases = np.ones(batch, np.uint64), np.ones(batch, np.uint8)
        mon_ort, mon_np = Monitor(meta["threshold"]), Monitor(meta["threshold"])

        def binding(buf):
            with rt.step(ids, phases) as s:
                s.hook("h", buf)

        def binding_run(buf):
            rt.run_step(ids, "h", buf, phases=phases)

        def ort_step(buf):
            acts = sliced.run(["acts"], {"x": buf})[0]
            mon_ort.update(acts)
            apply(buf, acts)

        def numpy_step(buf):
            acts = buf @ ws
            acts += bs
            np.maximum(acts, 0, out=acts)
            mon_np.update(acts)
            apply(buf, acts)

        # The three agree (same edits, float32 rounding apart).
        outs = []
        for fn in (binding, binding_run, ort_step, numpy_step):
            buf = x[:batch].copy()
            fn(buf)
            outs.append(buf)
        err = max(float(np.abs(o - outs[0]).max()) for o in outs[1:])
        scale = float(np.abs(outs[0]).max())
        if not err <= 1e-4 * scale:
            sys.exit(f"batch {batch}: the implementations disagree (max abs difference {err:.3g})")

        fns = {"tiller_python": binding, "tiller_python_run": binding_run, "ort_python": ort_step,
               "numpy": numpy_step}
        per = {k: [] for k in fns}
        log(f"sliced step at batch {batch}: {rounds} rounds of {calls} calls each, interleaved")
        for r in range(rounds + 1):
            for name, fn in fns.items():
                views = list(np.broadcast_to(x[:batch], (calls, batch, width)).copy())
                us = timed(fn, views)
                if r > 0:
                    per[name].append(us)
        for name, v in per.items():
            emit(kind="time", workload=f"sliced_b{batch}", impl=name, batch=batch,
                 us=statistics.median(v), min_us=min(v), rounds=rounds)
    rt.end_request(1)
    rt.close()
    del sliced

    log("full encode at batch 1: ONNX Runtime's Python API and NumPy")
    full = session(d / "encode.onnx")
    w, b = np.load(d / "w_enc.npy"), np.load(d / "b_enc.npy")
    x1 = np.ascontiguousarray(x[:1])
    ref = full.run(["acts"], {"x": x1})[0]
    mine = np.maximum(x1 @ w + b, 0)
    if not np.allclose(ref, mine, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max())):
        sys.exit("full encode: ONNX Runtime and NumPy disagree")
    fns = {
        "ort_python": lambda: full.run(["acts"], {"x": x1}),
        "numpy": lambda: np.maximum(x1 @ w + b, 0),
    }
    # Each call is timed alone after 64 MiB have been rewritten, so that no call finds the previous
    # one's weights in the last-level cache (as the Rust run does; as in a server, where the model's
    # own weights pass through the caches between two hook calls).
    evict = np.zeros(64 << 20, np.uint8)
    rounds, calls = (5, 3) if quick else (21, 8)
    per = {k: [] for k in fns}
    for r in range(rounds + 1):
        for name, fn in fns.items():
            total = 0
            for _ in range(calls):
                evict += 1
                t0 = time.perf_counter_ns()
                fn()
                total += time.perf_counter_ns() - t0
            if r > 0:
                per[name].append(total / calls / 1e3)
    for name, v in per.items():
        emit(kind="time", workload="full_f32_b1", impl=name, batch=1,
             us=statistics.median(v), min_us=min(v), rounds=rounds)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        if os.environ.get(var) != "1":
            log(f"warning: {var} is not 1: NumPy's BLAS may use several threads")


if __name__ == "__main__":
    main()
