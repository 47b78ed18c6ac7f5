#!/usr/bin/env python3
"""Writes a small synthetic SAELens checkpoint (cfg.json + sae_weights.safetensors) for the C host
example, with the standard library only: a 256 x 512 ReLU SAE whose decoder rows are random unit
directions and whose encoder is the decoder's transpose, so that a token built as a sum of a few
decoder rows fires exactly those features. Usage: make_sae.py OUT_DIR

Besides the checkpoint it writes w_dec.f32 (the decoder rows, [512, 256] little-endian float32): the
C host stands in for a model by building its activations from these directions.
"""
import json
import math
import random
import struct
import sys
from array import array
from pathlib import Path

D_IN, D_SAE = 256, 512
HOOK = "blocks.6.hook_resid_post"


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(6)
    w_dec = []
    for _ in range(D_SAE):
        row = [rng.gauss(0.0, 1.0) for _ in range(D_IN)]
        norm = math.sqrt(sum(v * v for v in row))
        w_dec.append([v / norm for v in row])
    w_enc = [w_dec[f][i] for i in range(D_IN) for f in range(D_SAE)]  # [d_in, d_sae]
    tensors = {
        "W_enc": ([D_IN, D_SAE], w_enc),
        "b_enc": ([D_SAE], [-0.5] * D_SAE),
        "W_dec": ([D_SAE, D_IN], [v for row in w_dec for v in row]),
        "b_dec": ([D_IN], [0.0] * D_IN),
    }
    header, blobs, offset = {}, [], 0
    for name, (shape, values) in tensors.items():
        data = array("f", values)
        if sys.byteorder != "little":
            data.byteswap()
        blob = data.tobytes()
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header to 8 bytes
    with open(out / "sae_weights.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for blob in blobs:
            f.write(blob)
    with open(out / "w_dec.f32", "wb") as f:
        f.write(blobs[2])
    cfg = {
        "architecture": "standard",
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "float32",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "metadata": {"sae_lens_version": "6.18.0", "model_name": "demo-model", "hook_name": HOOK},
    }
    (out / "cfg.json").write_text(json.dumps(cfg, indent=2))


if __name__ == "__main__":
    main()
