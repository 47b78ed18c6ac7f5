#!/usr/bin/env python3
"""What the Python binding adds to one hook call, at batch 1.

The setup of `benches/benches/hook.rs`: d_in 2304, a 16384-feature ReLU SAE (written here as a
SAELens checkpoint with NumPy and imported with `tiller-export import`), 64 monitored features,
4 steering rules. One call is a whole step, as in the criterion bench: open the step over one
generated token, run the hook on fresh activations, close it.

It times, in this process and on the same dictionary:
  - C:       a small C host calling libtiller directly (compiled here with `cc`), the floor;
  - ctypes:  the three C calls through ctypes with arguments (the address too) made ahead of
             time: the cost of crossing into C from Python, with no checks;
  - binding: `with rt.step([(1, "generated")]) as s: s.hook("h", x)`, the public API;
  - binding (arrays): the same with `rt.step(ids, phases)` from NumPy arrays;
  - binding, one call: `rt.run_step([(1, "generated")], "h", x)`, the whole step in one call
             into the library (`tiller_step_run`).
The overhead is binding − C. `--cargo-bench` also runs the criterion bench
(`cargo bench -p tiller-benches --bench hook -- tiller/1`) and prints its figure.

    cargo build --release -p tiller-capi -p tiller-export
    TILLER_LIB=target/release/libtiller.so python python/bench_overhead.py [--cargo-bench]

Each figure is the median over `--repeats` rounds of `--calls` calls (fresh activations for
every call are made before each round, outside the timed part, as criterion's
`iter_batched_ref` does); the machine's other load moves the absolute numbers, not much the
difference.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import tiller_runtime as tiller  # noqa: E402
from tiller_runtime import _lib  # noqa: E402

D, F = 2304, 16384
FEATURES = [i * 251 % F for i in range(64)]

CONFIG = """
[runtime]
fvu_sample_rate = 0.0
[[dictionary]]
name = "res"
path = "sae.onnx"
hook = "h"
[[monitor]]
name = "m"
dictionary = "res"
features = [{features}]
threshold = 1e9
window = "request"
aggregate = "max"
[[profile]]
name = "p"
[[profile.steer]]
dictionary = "res"
op = "clamp"
feature = {f0}
value = 1.0
[[profile.steer]]
dictionary = "res"
op = "add"
feature = {f1}
strength = 0.5
[[profile.steer]]
dictionary = "res"
op = "scale"
feature = {f2}
factor = 0.5
[[profile.steer]]
dictionary = "res"
op = "ablate"
feature = {f3}
"""

C_HOST = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "tiller.h"

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }

int main(int argc, char **argv) {
    const char *cfg = argv[1]; int calls = atoi(argv[2]), repeats = atoi(argv[3]), d = atoi(argv[4]);
    tiller_runtime *rt; char err[4096];
    if (tiller_runtime_new_from_file(cfg, &rt) || tiller_request_begin(rt, 1, "p", NULL)) {
        tiller_last_error(err, sizeof err, NULL); fprintf(stderr, "%s\n", err); return 1;
    }
    float *x = malloc(sizeof(float) * d);
    FILE *f = fopen(argv[5], "rb"); if (!f || fread(x, sizeof(float), d, f) != (size_t)d) return 2; fclose(f);
    float *bufs = malloc(sizeof(float) * d * (size_t)calls);
    uint64_t id = 1; uint8_t phase = TILLER_GENERATED;
    for (int r = 0; r < repeats; r++) {
        for (int i = 0; i < calls; i++) memcpy(bufs + (size_t)i * d, x, sizeof(float) * d);
        double t0 = now();
        for (int i = 0; i < calls; i++) {
            tiller_step *s;
            if (tiller_step_open(rt, &id, &phase, 1, &s)) return 3;
            if (tiller_step_hook(s, "h", bufs + (size_t)i * d, TILLER_F32, 1, d)) return 4;
            uint64_t stop[1]; size_t n_stop;
            if (tiller_step_close(s, stop, 1, &n_stop)) return 5;
        }
        printf("%.6f\n", (now() - t0) / calls * 1e6);
    }
    return 0;
}
"""


def write_safetensors(path: Path, tensors: dict) -> None:
    tensors = {k: np.ascontiguousarray(t, dtype="<f4") for k, t in tensors.items()}
    header, offset = {}, 0
    for name, t in tensors.items():
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for t in tensors.values():
            f.write(t.tobytes())


def make_dictionary(dir: Path, export: Path) -> Path:
    onnx = dir / "sae.onnx"
    if onnx.is_file():
        return onnx
    print(f"writing a {D}x{F} SAELens checkpoint and importing it (once, into {dir})", flush=True)
    rng = np.random.default_rng(11)
    scale = float(1.0 / np.sqrt(D))
    ckpt = dir / "ckpt"
    ckpt.mkdir(parents=True, exist_ok=True)
    write_safetensors(
        ckpt / "sae_weights.safetensors",
        {
            "W_enc": (rng.standard_normal((D, F), dtype=np.float32) * scale),
            "b_enc": np.full(F, -0.1, np.float32),
            "W_dec": (rng.standard_normal((F, D), dtype=np.float32) * scale),
            "b_dec": np.zeros(D, np.float32),
        },
    )
    (ckpt / "cfg.json").write_text(json.dumps({
        "architecture": "standard", "d_in": D, "d_sae": F, "apply_b_dec_to_input": True,
        "metadata": {"sae_lens_version": "6.0.0", "hook_name": "h"},
    }))
    subprocess.run([str(export), "import", str(ckpt), "-o", str(onnx)], check=True, stdout=subprocess.DEVNULL)
    shutil.rmtree(ckpt)
    return onnx


def rounds(fn, x: np.ndarray, calls: int, repeats: int, prep=None) -> float:
    """Median over rounds of the µs per call of `fn(buf)`, each call on fresh activations
    (`prep` turns each [1, D] view into what `fn` takes, outside the timed part)."""
    out = []
    for _ in range(repeats):
        bufs = np.broadcast_to(x, (calls, 1, D)).copy()
        views = list(bufs) if prep is None else [prep(v) for v in bufs]
        t0 = time.perf_counter_ns()
        for v in views:
            fn(v)
        out.append((time.perf_counter_ns() - t0) / calls / 1e3)
    return statistics.median(out)


def c_host(cfg: Path, x: np.ndarray, calls: int, work: Path):
    """Compiles the C host; returns a function running one round of it (after a warm-up round
    in the same process), or None without a C compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    lib = _lib.library_path()
    src, exe, xin = work / "c_host.c", work / "c_host", work / "x.f32"
    src.write_text(C_HOST)
    x.astype(np.float32).tofile(xin)
    subprocess.run([cc, "-O2", "-o", str(exe), str(src), f"-I{REPO / 'plugin-abi' / 'c' / 'include'}",
                    f"-L{lib.parent}", "-ltiller", f"-Wl,-rpath,{lib.parent}"], check=True)

    def one_round() -> float:
        r = subprocess.run([str(exe), str(cfg), str(calls), "2", str(D), str(xin)],
                           capture_output=True, text=True, check=True)
        return float(r.stdout.split()[-1])

    return one_round


def cargo_bench() -> str:
    r = subprocess.run(["cargo", "bench", "-q", "-p", "tiller-benches", "--bench", "hook", "--", "tiller/1"],
                       cwd=REPO, capture_output=True, text=True)
    m = re.search(r"tiller/1\s*\n?\s*time:\s*\[([^\]]+)\]", r.stdout)
    return m.group(1) if m else f"(could not parse criterion output; rc {r.returncode})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "tiller-bench-2304x16384")
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--export", type=Path, default=REPO / "target" / "debug" / "tiller-export")
    p.add_argument("--cargo-bench", action="store_true", help="also run the criterion bench (tiller/1)")
    a = p.parse_args()

    a.dir.mkdir(parents=True, exist_ok=True)
    make_dictionary(a.dir, a.export)
    cfg = a.dir / "tiller.toml"
    cfg.write_text(CONFIG.format(features=", ".join(map(str, FEATURES)), f0=FEATURES[0], f1=FEATURES[1],
                                 f2=FEATURES[2], f3=FEATURES[3]))
    lib_path = _lib.library_path()
    print(f"libtiller: {lib_path}  (python {sys.version.split()[0]}, numpy {np.__version__})")
    if "/debug/" in str(lib_path):
        print("warning: a debug build of libtiller; build with cargo build --release -p tiller-capi")

    rt = tiller.Runtime.from_file(cfg)
    rt.begin_request(1, "p")
    x = np.random.default_rng(5).standard_normal((1, D), dtype=np.float32)
    tokens = [(1, "generated")]
    ids, phases = np.array([1], np.uint64), np.array([1], np.uint8)

    def binding(buf):
        with rt.step(tokens) as s:
            s.hook("h", buf)

    def binding_arrays(buf):
        with rt.step(ids, phases) as s:
            s.hook("h", buf)

    def binding_run(buf):
        rt.run_step(tokens, "h", buf)

    lib = _lib.lib()
    h = rt._h
    c_ids, c_ph = (ctypes.c_uint64 * 1)(1), (ctypes.c_uint8 * 1)(1)
    out, stop, n_stop = ctypes.c_void_p(), (ctypes.c_uint64 * 1)(), ctypes.c_size_t()
    # Every pointer as an int, as the binding passes them: what ctypes itself costs.
    a_ids, a_ph, a_stop = (ctypes.addressof(v) for v in (c_ids, c_ph, stop))
    a_out, a_n = ctypes.addressof(out), ctypes.addressof(n_stop)
    open_, hook_, close_ = lib.tiller_step_open, lib.tiller_step_hook, lib.tiller_step_close

    def raw(addr):  # the address is taken outside the timed part
        open_(h, a_ids, a_ph, 1, a_out)
        hook_(out.value, b"h", addr, 0, 1, D)
        close_(out.value, a_stop, 1, a_n)

    def address(v):
        return v.ctypes.data

    for fn, prep in ((binding, None), (binding_arrays, None), (binding_run, None), (raw, address)):  # warm up
        rounds(fn, x, 200, 2, prep)
    # Interleave the rounds so that drifting load hits every variant alike.
    per = {k: [] for k in ("c", "binding", "binding_arrays", "binding_run", "ctypes")}
    with tempfile.TemporaryDirectory() as work:
        c_round = c_host(cfg, x, a.calls, Path(work))
        for _ in range(a.repeats):
            if c_round is not None:
                per["c"].append(c_round())
            per["binding"].append(rounds(binding, x, a.calls, 1))
            per["binding_arrays"].append(rounds(binding_arrays, x, a.calls, 1))
            per["binding_run"].append(rounds(binding_run, x, a.calls, 1))
            per["ctypes"].append(rounds(raw, x, a.calls, 1, address))
    res = {k: statistics.median(v) if v else None for k, v in per.items()}
    c_us = res["c"]

    print(f"\none hook call at batch 1 (open step, hook, close), d_in {D}, {F} features, 64 monitored, 4 rules")
    print(f"median of {a.repeats} rounds × {a.calls} calls, µs per call:\n")
    rows = [
        ("C host (libtiller directly)", c_us),
        ("ctypes: the 3 calls, arguments prepared", res["ctypes"]),
        ('binding: rt.step([(1, "generated")]) + hook', res["binding"]),
        ("binding: rt.step(ids, phases) + hook", res["binding_arrays"]),
        ('binding, one call: rt.run_step(tokens, "h", x)', res["binding_run"]),
    ]
    for label, us in rows:
        print(f"  {label:46s} {us:8.2f}" if us is not None else f"  {label:46s} (no C compiler)")
    if c_us is not None:
        print(f"\n  binding overhead over C: {res['binding'] - c_us:.2f} µs per call "
              f"(ctypes alone {res['ctypes'] - c_us:.2f}, the binding's checks and conversions "
              f"{res['binding'] - res['ctypes']:.2f}); one call: {res['binding_run'] - c_us:.2f} µs")
    if a.cargo_bench:
        print(f"\n  criterion, Rust API (cargo bench -p tiller-benches --bench hook -- tiller/1): {cargo_bench()} per call")
    rt.end_request(1)


if __name__ == "__main__":
    main()
