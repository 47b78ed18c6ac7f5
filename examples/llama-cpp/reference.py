"""Float64 NumPy references for the models convert.py writes, independent of llama.cpp.

The tiny decoder is defined by exactly what llama.cpp computes for arch `llama` from the stored
GGUF tensors (no Hugging Face Q/K permutation is involved: the weights were drawn in GGUF layout):

    h0      = token_embd[ids]
    per layer:
        x   = rms_norm(h) * attn_norm
        q,k,v = x @ attn_q.T, x @ attn_k.T, x @ attn_v.T       (heads of size n_embd / n_head)
        q,k = RoPE "normal": dims (2i, 2i+1) of each head rotated by pos * theta^(-2i / head_dim)
        a   = causal softmax(q k^T / sqrt(head_dim)) v           (query head j reads kv head
                                                                 j // (n_head / n_head_kv))
        h   = h + a @ attn_output.T
        x   = rms_norm(h) * ffn_norm
        h   = h + (silu(x @ ffn_gate.T) * (x @ ffn_up.T)) @ ffn_down.T
    logits  = (rms_norm(h) * output_norm) @ output.T
    rms_norm(x) = x / sqrt(mean(x^2) + eps)

MiniLM is covered by examples/minilm/tests/reference.py, run as the JSON-in/JSON-out program it is.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

MINILM_REFERENCE = Path(__file__).resolve().parents[1] / "minilm" / "tests" / "reference.py"


def load_tiny_llama(npz_path):
    """Reads the npz that `convert.py tiny-llama --npz` wrote: float64 tensors and an `hparams` dict."""
    with np.load(npz_path) as z:
        weights = {k: z[k].astype(np.float64) for k in z.files if not k.startswith("hparams.")}
        hp = {k[len("hparams."):]: z[k].item() for k in z.files if k.startswith("hparams.")}
    weights["hparams"] = hp
    return weights


def rms_norm(x, w, eps):
    """ggml_rms_norm followed by the elementwise weight."""
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def rope_normal(x, positions, theta):
    """llama.cpp's RoPE for arch llama (LLAMA_ROPE_TYPE_NORM): adjacent pairs (2i, 2i+1) of each
    head are rotated by angle pos * theta^(-2i / head_dim). x: (tokens, heads, head_dim)."""
    hd = x.shape[-1]
    inv_freq = theta ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
    ang = np.asarray(positions, dtype=np.float64)[:, None] * inv_freq[None, :]  # (T, hd/2)
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out


def _attention(x, w, layer, hp, positions):
    t = x.shape[0]
    n_head, n_kv = hp["n_head"], hp["n_head_kv"]
    hd = hp["n_embd"] // n_head
    p = f"blk.{layer}."
    q = (x @ w[p + "attn_q.weight"].T).reshape(t, n_head, hd)
    k = (x @ w[p + "attn_k.weight"].T).reshape(t, n_kv, hd)
    v = (x @ w[p + "attn_v.weight"].T).reshape(t, n_kv, hd)
    q = rope_normal(q, positions, hp["rope_theta"])
    k = rope_normal(k, positions, hp["rope_theta"])
    group = n_head // n_kv
    k = np.repeat(k, group, axis=1)  # query head j -> kv head j // group
    v = np.repeat(v, group, axis=1)
    s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd)
    s = s + np.triu(np.full((t, t), -np.inf), 1)[None]
    s = np.exp(s - s.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    ctx = np.einsum("hqk,khd->qhd", s, v).reshape(t, n_head * hd)
    return ctx @ w[p + "attn_output.weight"].T


def _ffn(x, w, layer):
    p = f"blk.{layer}."
    g = x @ w[p + "ffn_gate.weight"].T
    u = x @ w[p + "ffn_up.weight"].T
    return (g / (1.0 + np.exp(-g)) * u) @ w[p + "ffn_down.weight"].T


def llama_forward(weights, token_ids, edits=None):
    """Runs the tiny decoder over `token_ids` (positions 0..T-1, causal).

    `edits` maps a layer to an array added to the residual stream after that layer (before the
    next layer reads it): (n_embd,) for every position, or (T, n_embd) per position. That is what a
    steering edit at hook `l_out-N` does, including to the keys and values later layers cache.
    Returns {"hidden": [(T, n_embd)] residual stream after each layer (after its edit),
    "logits": (T, n_vocab)}.
    """
    edits = edits or {}
    hp = weights["hparams"]
    ids = np.asarray(token_ids, dtype=np.int64)
    positions = np.arange(len(ids))
    eps = hp["rms_eps"]
    h = weights["token_embd.weight"][ids]
    hidden = []
    for layer in range(hp["n_layer"]):
        h = h + _attention(rms_norm(h, weights[f"blk.{layer}.attn_norm.weight"], eps), weights, layer, hp, positions)
        h = h + _ffn(rms_norm(h, weights[f"blk.{layer}.ffn_norm.weight"], eps), weights, layer)
        if layer in edits:
            h = h + np.asarray(edits[layer], dtype=np.float64)
        hidden.append(h.copy())
    return {"hidden": hidden, "logits": llama_logits_from_hidden(weights, h)}


def llama_logits_from_hidden(weights, h):
    """Logits from last-layer residual rows (n_embd,) or (T, n_embd): final RMSNorm, then output."""
    hp = weights["hparams"]
    x = rms_norm(np.asarray(h, dtype=np.float64), weights["output_norm.weight"], hp["rms_eps"])
    return x @ weights["output.weight"].T


def minilm_reference(model_dir, texts, layer=-1, edit=None):
    """Token ids, hidden states after `layer` and L2-normalised mean-pooled embeddings of all-MiniLM-L6-v2
    from examples/minilm/tests/reference.py (float64, its own WordPiece tokenizer).

    That file is a program (it reads its request on stdin when loaded), so it is run, not imported.
    Returns {"ids": [[int]], "hidden": [array (T, d)], "embeddings": array (n, d)}.
    """
    req = {"model_dir": str(model_dir), "texts": list(texts), "layer": layer,
           "edit": None if edit is None else [float(x) for x in edit]}
    done = subprocess.run([sys.executable, str(MINILM_REFERENCE)], input=json.dumps(req),
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{MINILM_REFERENCE} failed ({done.returncode}): {done.stderr.strip()}")
    out = json.loads(done.stdout)
    return {"ids": out["ids"], "hidden": [np.asarray(h) for h in out["hidden"]],
            "embeddings": np.asarray(out["embeddings"])}


def pick_stop(values, steps, margin=1e-3):
    """A stop monitor the reference predicts, for two sequences' feature values at their generated
    tokens (`values[k]`: (tokens, features)): (feature, j, threshold) such that sequence 0 crosses
    the threshold first at generated token j (1 <= j < steps - 1) and sequence 1 never does, each
    value at least `margin` (relative to the largest) from the threshold; None when no feature
    qualifies."""
    m = margin * max(float(np.abs(v).max()) for v in values)
    v0, v1 = values
    for f in range(v0.shape[1]):
        for j in range(1, steps - 1):
            below = max(float(v0[:j, f].max()), float(v1[:, f].max()))
            if v0[j, f] - below > 2 * m:
                return f, j, (float(v0[j, f]) + below) / 2
    return None
