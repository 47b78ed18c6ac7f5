#!/usr/bin/env python3
"""A minimal Python host: continuous batching of requests with different steering profiles,
through the `tiller` binding (ctypes over libtiller).

Requests arrive and leave at different steps; each step carries the prompt tokens of new
requests and one generated token of the others, and the activations at the hook are edited in
place. At the end it prints each request's summary (the features that fired, events, edits) and
the runtime's metrics.

    cargo build --release -p tiller-capi -p tiller-export
    pip install -e ./python              # or PYTHONPATH=python
    python examples/python-host/host.py  # or --dictionary my.onnx --hook model.layers.12

Without `--dictionary`, it writes a small SAELens checkpoint (64 × 1024 ReLU SAE) with NumPy and
imports it with `tiller-export import` into `--dir`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
try:
    import tiller_runtime as tiller
except ImportError:  # run from a checkout without installing the binding
    sys.path.insert(0, str(REPO / "python"))
    import tiller_runtime as tiller

D, F = 64, 1024
HOOK = "model.layers.12"

CONFIG = """
[runtime]
fvu_sample_rate = 0.25

[[dictionary]]
name = "res12"
path = "{path}"
hook = "{hook}"

[[monitor]]
name = "feature-7"
dictionary = "res12"
features = [7]
threshold = 0.3
window = "request"
aggregate = "count"
count = 3
action = "flag"

[[profile]]
name = "suppress-7"
[[profile.steer]]
name = "ablate-7"
dictionary = "res12"
op = "ablate"
feature = 7

[[profile]]
name = "boost-100"
[[profile.steer]]
name = "add-100"
dictionary = "res12"
op = "add"
feature = 100
strength = 4.0
apply_to = "generated"

# What a request's overrides may steer: feature 3 (request 3 clamps it).
[[requests.dictionary]]
name = "res12"
features = [3]
"""


def tiller_export() -> str:
    for p in (os.environ.get("TILLER_EXPORT"), REPO / "target/release/tiller-export",
              REPO / "target/debug/tiller-export", shutil.which("tiller-export")):
        if p and Path(p).is_file():
            return str(p)
    sys.exit("tiller-export not found: cargo build -p tiller-export (or set TILLER_EXPORT)")


def write_demo_dictionary(dir: Path) -> Path:
    """A SAELens checkpoint (cfg.json + sae_weights.safetensors) written by hand, imported."""
    out = dir / "res12.onnx"
    if out.is_file():
        return out
    rng = np.random.default_rng(1)
    w_dec = (rng.standard_normal((F, D)) / np.sqrt(D)).astype(np.float32)
    tensors = {
        "W_enc": np.ascontiguousarray(w_dec.T * 1.5),
        "b_enc": np.full(F, -0.05, np.float32),
        "W_dec": w_dec,
        "b_dec": np.zeros(D, np.float32),
    }
    ckpt = dir / "ckpt"
    ckpt.mkdir(parents=True, exist_ok=True)
    header, offset = {}, 0
    for name, t in tensors.items():
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(ckpt / "sae_weights.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(t.astype("<f4").tobytes() for t in tensors.values()))
    (ckpt / "cfg.json").write_text(json.dumps({
        "architecture": "standard", "d_in": D, "d_sae": F, "apply_b_dec_to_input": True,
        "metadata": {"sae_lens_version": "6.0.0", "hook_name": HOOK},
    }))
    subprocess.run([tiller_export(), "import", str(ckpt), "-o", str(out)], check=True, stdout=subprocess.DEVNULL)
    return out


def dictionary_width(path: Path) -> int:
    """The activations' width at the hook: the dictionary's d_in, from `tiller-export inspect`."""
    info = json.loads(subprocess.run([tiller_export(), "inspect", str(path), "--json"], check=True,
                                     capture_output=True, text=True).stdout)
    return int(info["d_in"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dictionary", type=Path, help="an existing Tiller dictionary (.onnx)")
    p.add_argument("--hook", default=HOOK, help="the hook it is attached to (default %(default)s)")
    p.add_argument("--dir", type=Path, default=REPO / "target" / "python-host-example")
    a = p.parse_args()

    a.dir.mkdir(parents=True, exist_ok=True)
    dictionary = (a.dictionary or write_demo_dictionary(a.dir)).resolve()
    rt = tiller.Runtime.from_toml(CONFIG.format(path=dictionary, hook=a.hook), base_dir=a.dir)
    print(f"libtiller {tiller.version()} from {tiller.library_path()}")

    # (request id, profile, overrides, arrival step, prompt length, tokens to generate)
    plan = [
        (1, "suppress-7", None, 0, 6, 5),
        (2, "boost-100", None, 2, 4, 4),
        (3, None, {"steer": [{"dictionary": "res12", "op": "clamp", "feature": 3, "value": 0.0}]}, 3, 3, 3),
    ]
    generated = [0] * len(plan)
    rng = np.random.default_rng(7)
    width = None
    summaries = {}
    step_no = 0
    while True:
        tokens = []
        for i, (rid, profile, overrides, arrive, prompt, gen_len) in enumerate(plan):
            if step_no == arrive:
                rt.begin_request(rid, profile, overrides)
                tokens += [(rid, "prompt")] * prompt
            elif step_no > arrive and generated[i] < gen_len:
                generated[i] += 1
                tokens.append((rid, "generated"))
        if not tokens:
            break
        if width is None:
            width = D if a.dictionary is None else dictionary_width(dictionary)
        hidden = rng.standard_normal((len(tokens), width), dtype=np.float32)
        before = hidden.copy()
        with rt.step(tokens) as step:
            step.hook(a.hook, hidden)  # edited in place
        moved = np.linalg.norm(hidden - before, axis=1)
        cells = " ".join(f"r{r}{ph[0]}:{m:.2f}" for (r, ph), m in zip(tokens, moved))
        stop = f", stop {step.stop}" if step.stop else ""
        print(f"step {step_no:>2}: {len(tokens):>2} tokens, edit norms [{cells}]{stop}")
        for i, (rid, *_rest) in enumerate(plan):
            arrive, gen_len = plan[i][3], plan[i][5]
            if step_no > arrive and generated[i] == gen_len:
                generated[i] += 1
                s = summaries[rid] = rt.end_request(rid)
                print(f"  request {rid} done: profile {s['profile']}, {s['tokens']} tokens, "
                      f"steering {s['steering']}, flagged {s['flagged']}")
        step_no += 1

    print("\nfeatures per request (the features the config names: max activation, tokens active):")
    for rid, s in summaries.items():
        feats = ", ".join(
            f"{d}/{f}: max {v['max']:.2f} on {v['count']}" for d, fs in s["features"].items() for f, v in fs.items()
        )
        events = [e["monitor"] for e in s["events"]]
        print(f"  request {rid}: {feats or '(none fired)'}; events {events}")

    print("\nmetrics:")
    for line in rt.metrics_text().splitlines():
        if not line.startswith("#") and any(k in line for k in ("tokens_total", "monitor_events", "steering_tokens")):
            print(f"  {line}")
    rt.close()



if __name__ == "__main__":
    main()
