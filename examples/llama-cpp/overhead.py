#!/usr/bin/env python3
"""What attaching Tiller costs llama.cpp: tokens per second without Tiller, with monitoring only,
and with monitoring and steering, on two workloads, one thread each:

- all-MiniLM-L6-v2 (llama.cpp arch `bert`) embedding six sentences, hook after layer 3, a
  384 -> 6144 ReLU SAE (16x), 16 monitored features, 3 steering rules;
- a random decoder (arch `llama`, 512 wide, 8 layers, GQA) generating 64 tokens for each of 4
  sequences in one batch, hook after layer 4, a 512 -> 8192 ReLU SAE, the same monitors and rules.

Each figure is the best of `--rounds` runs of `tiller-llama-run` (release libtiller), the three
variants interleaved in each round. Prints a markdown table. Needs the venv of scripts/test (gguf,
numpy) and llama.cpp (provision.sh).

    .venv/bin/python examples/llama-cpp/overhead.py            # builds what it needs first
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "python" / "tests"))

import convert  # noqa: E402
from conftest import unit_row_sae  # noqa: E402

TEXTS = [
    "The licensee may redistribute the software under the terms of this license.",
    "def parse(self, path): return open(path).read()",
    "A small cafe in Zurich serves creme brulee on Sundays.",
    "In 1969, 3 astronauts flew 384,400 km to the Moon!",
    "Rust's borrow checker rejects data races at compile time.",
    "Where the river bends, the old mill still turns slowly.",
]


def config(d_sae: int) -> str:
    feats = ", ".join(str(i * 97 % d_sae) for i in range(16))
    return f"""
[runtime]
threads = 1
fvu_sample_rate = 0.0

[[dictionary]]
name = "sae"
path = "sae.onnx"

[[monitor]]
name = "watch"
dictionary = "sae"
features = [{feats}]
threshold = 0.5
window = "token"
action = "flag"

[[profile]]
name = "steer"
[[profile.steer]]
name = "add"
dictionary = "sae"
op = "add"
feature = 97
strength = 2.0
[[profile.steer]]
name = "ablate"
dictionary = "sae"
op = "ablate"
feature = 194
[[profile.steer]]
name = "clamp"
dictionary = "sae"
op = "clamp"
feature = 291
value = 1.0
"""


def write_dictionary(folder: Path, d: int, f: int, hook: str) -> Path:
    unit_row_sae(folder, d, f, hook, -0.3, seed=1)
    (folder / "tiller.toml").write_text(config(f))
    return folder / "tiller.toml"


def tokens_per_second(cmd, stdin=None):
    r = subprocess.run(cmd, input=stdin, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {r.stderr}")
    out = json.loads(r.stdout)
    return out["tokens"] / out["seconds"]


def best(cmds, rounds, stdin=None):
    """The best tokens/s of each command over `rounds`, the commands interleaved in every round so
    that a slower stretch of the machine hits all of them alike."""
    tps = [0.0] * len(cmds)
    for _ in range(rounds):
        for i, cmd in enumerate(cmds):
            tps[i] = max(tps[i], tokens_per_second(cmd, stdin))
    return tps


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--no-build", action="store_true", help="use the binaries built last time")
    a = p.parse_args()
    target = Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target")
    if not target.is_absolute():
        target = REPO / target
    if not a.no_build:
        subprocess.run([str(HERE / "build.sh"), "--release"], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["cargo", "build", "-q", "-p", "tiller-export", "-p", "tiller-minilm"], cwd=REPO,
                       check=True)
    run = target / "llama-cpp-release" / "tiller-llama-run"
    minilm_dir = Path(subprocess.run(
        [str(target / "debug" / "minilm"), "fetch"], check=True,
        capture_output=True, text=True).stdout.strip().splitlines()[-1])

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "bert").mkdir()
        (tmp / "llama").mkdir()
        bert = tmp / "minilm.gguf"
        convert.convert_minilm(minilm_dir, bert)
        cfg = write_dictionary(tmp / "bert", 384, 6144, "encoder.layer.3")
        stdin = "\n".join(TEXTS * 8) + "\n"
        base = [str(run), "embed", "--model", str(bert), "--repeat", "20"]
        hooked = base + ["--config", str(cfg), "--layer", "3", "--hook-format", "encoder.layer.%d"]
        rows.append(("all-MiniLM-L6-v2 embeddings (bert, 6 layers, 384 wide), 48 texts",
                     *best([base, hooked + ["--profile", ""], hooked + ["--profile", "steer"]],
                           a.rounds, stdin)))

        dec = tmp / "decoder.gguf"
        hp = dict(convert.TINY_LLAMA, n_embd=512, n_layer=8, n_head=8, n_head_kv=4, n_ff=1536, n_ctx=512)
        convert.convert_tiny_llama(3, dec, None, hp)
        cfg = write_dictionary(tmp / "llama", 512, 8192, "blk.4")
        prompts = []
        for s in range(4):
            prompts += ["--prompt", ",".join(str(1 + (s * 31 + j * 7) % 250) for j in range(16))]
        base = [str(run), "generate", "--model", str(dec), "--steps", "64"] + prompts
        hooked = base + ["--config", str(cfg), "--layer", "4"]
        rows.append(("random decoder (llama, 8 layers, 512 wide), 4 sequences x (16 prompt + 64 generated)",
                     *best([base, hooked + ["--profile", ""] * 4, hooked + ["--profile", "steer"] * 4],
                           a.rounds)))

    print("| workload | llama.cpp alone | + Tiller, monitoring | + Tiller, monitoring and steering |")
    print("| --- | ---: | ---: | ---: |")
    for name, b, m, s in rows:
        print(f"| {name} | {b:,.0f} tok/s | {m:,.0f} tok/s ({(b / m - 1) * 100:+.1f}% time) "
              f"| {s:,.0f} tok/s ({(b / s - 1) * 100:+.1f}% time) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
