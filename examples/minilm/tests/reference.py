"""A float64 NumPy implementation of all-MiniLM-L6-v2 (BERT + mean pooling + normalisation), with
its own WordPiece tokenizer, independent of the Rust code under test.

Reads a JSON request on stdin: {"model_dir", "texts", "layer", "edit": [d floats] or null}; the
edit, when given, is added to every real token's residual stream after `layer`. Prints
{"ids": [[int]], "hidden": [[[float]]] (after `layer`, before the edit), "embeddings": [[float]]}.
"""
import json
import math
import struct
import sys
import unicodedata

import numpy as np


def load_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__" or info["dtype"] != "F32":
            continue
        a, b = info["data_offsets"]
        out[name] = np.frombuffer(data[a:b], dtype="<f4").reshape(info["shape"]).astype(np.float64)
    return out


def is_punct(ch):
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def is_cjk(cp):
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


def basic_tokenize(text):
    chars = []
    for ch in text:
        cp = ord(ch)
        if cp == 0 or cp == 0xFFFD or (unicodedata.category(ch).startswith("C") and ch not in "\t\n\r"):
            continue
        if ch in " \t\n\r" or unicodedata.category(ch) == "Zs":
            chars.append(" ")
        elif is_cjk(cp):
            chars.append(" " + ch + " ")
        else:
            chars.append(ch)
    words = []
    for w in "".join(chars).split():
        w = unicodedata.normalize("NFD", w.lower())
        w = "".join(c for c in w if unicodedata.category(c) != "Mn")
        cur = ""
        for c in w:
            if is_punct(c):
                if cur:
                    words.append(cur)
                words.append(c)
                cur = ""
            else:
                cur += c
        if cur:
            words.append(cur)
    return words


def wordpiece(word, vocab):
    if len(word) > 100:
        return ["[UNK]"]
    pieces, start = [], 0
    while start < len(word):
        end, found = len(word), None
        while start < end:
            sub = word[start:end] if start == 0 else "##" + word[start:end]
            if sub in vocab:
                found = sub
                break
            end -= 1
        if found is None:
            return ["[UNK]"]
        pieces.append(found)
        start = end
    return pieces


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


ERF = np.vectorize(math.erf)


def bert_layer(h, W, p, heads, eps):
    t, d = h.shape
    hd = d // heads

    def lin(x, name):
        return x @ W[name + ".weight"].T + W[name + ".bias"]

    q = lin(h, p + ".attention.self.query").reshape(t, heads, hd).transpose(1, 0, 2)
    k = lin(h, p + ".attention.self.key").reshape(t, heads, hd).transpose(1, 0, 2)
    v = lin(h, p + ".attention.self.value").reshape(t, heads, hd).transpose(1, 0, 2)
    s = q @ k.transpose(0, 2, 1) / math.sqrt(hd)
    s = np.exp(s - s.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    ctx = (s @ v).transpose(1, 0, 2).reshape(t, d)
    h1 = layer_norm(lin(ctx, p + ".attention.output.dense") + h,
                    W[p + ".attention.output.LayerNorm.weight"], W[p + ".attention.output.LayerNorm.bias"], eps)
    inter = lin(h1, p + ".intermediate.dense")
    inter = 0.5 * inter * (1.0 + ERF(inter / math.sqrt(2.0)))
    return layer_norm(lin(inter, p + ".output.dense") + h1,
                      W[p + ".output.LayerNorm.weight"], W[p + ".output.LayerNorm.bias"], eps)


def main():
    req = json.load(sys.stdin)
    d = req["model_dir"]
    cfg = json.load(open(d + "/config.json"))
    vocab = json.load(open(d + "/tokenizer.json"))["model"]["vocab"]
    W = load_safetensors(d + "/model.safetensors")
    eps, heads, n_layers = cfg["layer_norm_eps"], cfg["num_attention_heads"], cfg["num_hidden_layers"]
    edit = None if req.get("edit") is None else np.asarray(req["edit"], dtype=np.float64)
    out = {"ids": [], "hidden": [], "embeddings": []}
    for text in req["texts"]:
        toks = ["[CLS]"] + [p for w in basic_tokenize(text) for p in wordpiece(w, vocab)][:254] + ["[SEP]"]
        ids = [vocab[t] for t in toks]
        t = len(ids)
        h = (W["embeddings.word_embeddings.weight"][ids] + W["embeddings.position_embeddings.weight"][:t]
             + W["embeddings.token_type_embeddings.weight"][0])
        h = layer_norm(h, W["embeddings.LayerNorm.weight"], W["embeddings.LayerNorm.bias"], eps)
        for l in range(n_layers):
            h = bert_layer(h, W, "encoder.layer.%d" % l, heads, eps)
            if l == req["layer"]:
                out["hidden"].append(h.tolist())
                if edit is not None:
                    h = h + edit
        e = h.mean(0)
        e /= max(np.linalg.norm(e), 1e-12)
        out["ids"].append(ids)
        out["embeddings"].append(e.tolist())
    json.dump(out, sys.stdout)


main()
