"""Fixtures: small SAELens checkpoints written with NumPy, imported with the Rust CLI
(`tiller-export import`), and the configs the tests run them through."""

from __future__ import annotations

import json
import os
import struct
import subprocess
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
HOOK = "blocks.5.hook_resid_post"
D_IN, D_SAE = 16, 48


def export_bin() -> Path:
    """target/debug/tiller-export (`$TILLER_EXPORT` overrides), built when missing."""
    env = os.environ.get("TILLER_EXPORT")
    if env:
        return Path(env)
    target = Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target")
    path = target / "debug" / "tiller-export"
    if not path.is_file():
        subprocess.run(["cargo", "build", "-q", "-p", "tiller-export"], cwd=REPO, check=True)
    return path


def write_safetensors(path: Path, tensors: Dict[str, np.ndarray]) -> None:
    """A safetensors file by hand: an 8-byte little-endian header length, the JSON header (padded
    with spaces to 8 bytes), then the raw little-endian data."""
    codes = {np.dtype("<f4"): "F32", np.dtype("<f2"): "F16"}
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        t = np.ascontiguousarray(t)
        b = t.astype(t.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": codes[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def write_saelens(dir: Path, tensors: Dict[str, np.ndarray], **cfg: object) -> None:
    dir.mkdir(parents=True, exist_ok=True)
    (dir / "cfg.json").write_text(json.dumps(cfg, indent=1))
    write_safetensors(dir / "sae_weights.safetensors", tensors)


def import_saelens(src: Path, out: Path) -> Path:
    r = subprocess.run(
        [str(export_bin()), "import", str(src), "-o", str(out)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    return out


def unit_row_sae(
    folder: Path, d_in: int, d_sae: int, hook: str, b_enc: float, seed: int
) -> Tuple[Path, np.ndarray]:
    """A ReLU SAE with unit decoder rows and the encoder their transpose, written as a SAELens
    checkpoint under `folder` and imported to `folder/sae.onnx`. Returns the path and `W_dec`
    (float64, so that a reference can predict the edits exactly)."""
    rng = np.random.default_rng(seed)
    w_dec = rng.standard_normal((d_sae, d_in))
    w_dec /= np.linalg.norm(w_dec, axis=1, keepdims=True)
    write_saelens(
        folder / "ckpt",
        {
            "W_enc": w_dec.T.astype(np.float32),
            "b_enc": np.full(d_sae, b_enc, np.float32),
            "W_dec": w_dec.astype(np.float32),
            "b_dec": np.zeros(d_in, np.float32),
        },
        architecture="standard",
        d_in=d_in,
        d_sae=d_sae,
        apply_b_dec_to_input=False,
        metadata={"sae_lens_version": "6.0.0", "hook_name": hook},
    )
    return import_saelens(folder / "ckpt", folder / "sae.onnx"), w_dec


def random_sae(rng: np.random.Generator, d_in: int, d_sae: int, scale: float = 0.4) -> Dict[str, np.ndarray]:
    return {
        "W_enc": (rng.standard_normal((d_in, d_sae)) * scale).astype(np.float32),
        "b_enc": (rng.standard_normal(d_sae) * 0.1).astype(np.float32),
        "W_dec": (rng.standard_normal((d_sae, d_in)) * 0.3).astype(np.float32),
        "b_dec": (rng.standard_normal(d_in) * 0.1).astype(np.float32),
    }


# A config with a monitor of each window, a profile of every feature op, and a profile that a
# request-window monitor switches to; fvu_sample_rate 0 so that runs are deterministic.
CONFIG = """
[runtime]
fvu_sample_rate = 0.0

[[dictionary]]
name = "res"
path = "res.onnx"

[[monitor]]
name = "f2"
dictionary = "res"
features = [2, 3]
threshold = 0.0
window = "token"

[[monitor]]
name = "f5-count"
dictionary = "res"
features = [5]
threshold = 0.2
window = "request"
aggregate = "count"
count = 3
action = "switch_profile"
profile = "calm"

[[profile]]
name = "calm"
[[profile.steer]]
name = "clamp7"
dictionary = "res"
op = "clamp"
feature = 7
value = 0.5

[[profile]]
name = "mixed"
[[profile.steer]]
name = "add1"
dictionary = "res"
op = "add"
feature = 1
strength = 0.75
[[profile.steer]]
name = "scale4"
dictionary = "res"
op = "scale"
feature = 4
factor = 0.5
apply_to = "generated"
[[profile.steer]]
name = "ablate9"
dictionary = "res"
op = "ablate"
feature = 9
[[profile.steer]]
name = "cap11"
dictionary = "res"
op = "cap"
feature = 11
value = 0.1
only_active = true
"""

STOP_CONFIG = """
[runtime]
fvu_sample_rate = 0.0

[[dictionary]]
name = "res"
path = "res.onnx"

[[monitor]]
name = "stopper"
dictionary = "res"
features = [2]
threshold = 0.0
window = "token"
action = "stop"
"""


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with `res.onnx` (a 16 × 48 ReLU SAE imported from SAELens) and `tiller.toml`."""
    d = tmp_path_factory.mktemp("tiller")
    rng = np.random.default_rng(11)
    write_saelens(
        d / "ckpt",
        random_sae(rng, D_IN, D_SAE),
        architecture="standard",
        d_in=D_IN,
        d_sae=D_SAE,
        apply_b_dec_to_input=True,
        metadata={"sae_lens_version": "6.0.0", "hook_name": HOOK},
    )
    import_saelens(d / "ckpt", d / "res.onnx")
    (d / "tiller.toml").write_text(CONFIG)
    (d / "stop.toml").write_text(STOP_CONFIG)
    return d


@pytest.fixture
def rt(workdir: Path):
    import tiller_runtime as tiller

    r = tiller.Runtime.from_file(workdir / "tiller.toml")
    yield r
    r.close()


@pytest.fixture(scope="session")
def activations() -> np.ndarray:
    return np.random.default_rng(5).standard_normal((40, D_IN)).astype(np.float32)
