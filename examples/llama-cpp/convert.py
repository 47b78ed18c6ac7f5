#!/usr/bin/env python3
"""Writes the GGUF models the llama.cpp integration is tested with.

    convert.py minilm --model-dir DIR --out minilm.gguf
        all-MiniLM-L6-v2 (a Hugging Face BERT folder: config.json, model.safetensors,
        tokenizer.json, 1_Pooling/config.json) as llama.cpp arch `bert`, f32, mean pooling.
    convert.py tiny-llama --seed S --out tiny.gguf [--npz weights.npz]
        a small random decoder as llama.cpp arch `llama`, f32, with a byte-level SPM vocabulary;
        `--npz` also saves the exact stored tensors (float32) for reference.py.

Needs numpy and the `gguf` package (gguf==0.19.0).
"""
import argparse
import json
import struct
import sys
from pathlib import Path

import gguf
import numpy as np

# ---------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2 -> arch `bert`
# ---------------------------------------------------------------------------------------------

# HF tensors llama.cpp's BERT graph has no use for: the pooler and the pre-training heads.
_BERT_SKIPPED_PREFIXES = ("embeddings.position_ids", "pooler.", "cls.")


def read_safetensors(path):
    """Maps each tensor of a safetensors file to a read-only float32 array (memory-mapped)."""
    path = Path(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        if info["dtype"] != "F32":
            out[name] = None  # only integer bookkeeping tensors (position_ids) are not f32
            continue
        out[name] = data[a:b].view("<f4").reshape(info["shape"])
    return out


def _bert_token_list(tokenizer, vocab_size):
    """Tokens and token types laid out as llama.cpp's BERT converter lays them out.

    llama.cpp's WPM tokenizer marks the start of every word with U+2581 ("phantom space") and looks
    up continuation pieces without a prefix, so `##ing` is stored as `ing` and a word-start piece
    `play` as `\u2581play`. Control tokens ([CLS], [SEP], ...) are stored verbatim.
    """
    model = tokenizer["model"]
    if model.get("type") != "WordPiece" or model.get("continuing_subword_prefix", "##") != "##":
        raise ValueError("tokenizer.json: expected a WordPiece model with the '##' continuation prefix")
    id_to_text = {i: t for t, i in model["vocab"].items()}
    added = {t["id"]: t for t in tokenizer.get("added_tokens", [])}
    for i, t in added.items():
        id_to_text[i] = t["content"]
    if max(id_to_text) >= vocab_size:
        raise ValueError(f"tokenizer.json: token id {max(id_to_text)} is outside vocab_size {vocab_size}")

    tokens, types = [], []
    for i in range(vocab_size):
        text = id_to_text.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added and added[i].get("special", False):
            tokens.append(text)
            types.append(gguf.TokenType.CONTROL)
        elif i in added:
            tokens.append(text)
            types.append(gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(text[2:] if text.startswith("##") else "\u2581" + text)
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _bert_special_ids(tokenizer, config):
    """Ids of [CLS], [SEP], [UNK], [PAD], [MASK], found by name in tokenizer.json."""
    by_text = {t: i for t, i in tokenizer["model"]["vocab"].items()}
    by_text.update({t["content"]: t["id"] for t in tokenizer.get("added_tokens", [])})

    def find(text):
        if text not in by_text:
            raise ValueError(f"tokenizer.json: special token {text!r} is not in the vocabulary")
        return by_text[text]

    specials = (tokenizer.get("post_processor") or {}).get("special_tokens", {})
    cls = specials["[CLS]"]["ids"][0] if "[CLS]" in specials else find("[CLS]")
    sep = specials["[SEP]"]["ids"][0] if "[SEP]" in specials else find("[SEP]")
    pad = config.get("pad_token_id")
    return {
        "cls": cls,
        "sep": sep,
        "unk": find(tokenizer["model"].get("unk_token", "[UNK]")),
        "pad": find("[PAD]") if pad is None else pad,
        "mask": find("[MASK]"),
    }


def _pooling_type(model_dir):
    """The sentence-transformers pooling mode (1_Pooling/config.json), MEAN when absent."""
    path = model_dir / "1_Pooling" / "config.json"
    if not path.is_file():
        return gguf.PoolingType.MEAN
    cfg = json.loads(path.read_text())
    if cfg.get("pooling_mode_mean_tokens"):
        return gguf.PoolingType.MEAN
    if cfg.get("pooling_mode_cls_token"):
        return gguf.PoolingType.CLS
    raise ValueError(f"{path}: unsupported pooling mode (only mean and cls are)")


def convert_minilm(model_dir, out):
    """Writes a BERT sentence-embedding folder (all-MiniLM-L6-v2) as a GGUF of arch `bert`."""
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    tensors = read_safetensors(model_dir / "model.safetensors")
    if config.get("model_type") != "bert":
        raise ValueError(f"{model_dir / 'config.json'}: model_type is {config.get('model_type')!r}, not 'bert'")

    arch = gguf.MODEL_ARCH.BERT
    n_layer = config["num_hidden_layers"]
    w = gguf.GGUFWriter(out, gguf.MODEL_ARCH_NAMES[arch])
    w.add_name(model_dir.name)
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_block_count(n_layer)
    w.add_head_count(config["num_attention_heads"])
    w.add_layer_norm_eps(config["layer_norm_eps"])
    w.add_causal_attention(False)
    w.add_pooling_type(_pooling_type(model_dir))
    w.add_file_type(gguf.LlamaFileType.ALL_F32)

    tokens, types = _bert_token_list(tokenizer, config["vocab_size"])
    ids = _bert_special_ids(tokenizer, config)
    w.add_tokenizer_model("bert")
    # llama.cpp selects no pre-tokenizer for WPM vocabularies; its BERT normaliser (lowercase,
    # strip accents) is on unless the tokenizer.ggml.normalizer.* keys turn it off.
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_type_count(config.get("type_vocab_size", 1))
    # llama.cpp's WPM tokenizer prepends the BOS id as [CLS] and appends the SEP id.
    w.add_bos_token_id(ids["cls"])
    w.add_sep_token_id(ids["sep"])
    w.add_unk_token_id(ids["unk"])
    w.add_pad_token_id(ids["pad"])
    w.add_mask_token_id(ids["mask"])
    w.add_add_bos_token(True)
    w.add_add_sep_token(True)
    w.add_add_eos_token(False)

    names = gguf.get_tensor_name_map(arch, n_layer)
    for hf_name, data in tensors.items():
        name = hf_name[len("bert."):] if hf_name.startswith("bert.") else hf_name
        if name.startswith(_BERT_SKIPPED_PREFIXES):
            continue
        if data is None:
            raise ValueError(f"model.safetensors: tensor {hf_name!r} is not f32")
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ValueError(f"model.safetensors: no GGUF name for tensor {hf_name!r}")
        # numpy (out, in) is ggml's ne = [in, out]: the layout llama.cpp expects for weights.
        w.add_tensor(new, np.ascontiguousarray(data, dtype=np.float32))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ---------------------------------------------------------------------------------------------
# tiny random decoder -> arch `llama`
# ---------------------------------------------------------------------------------------------

TINY_LLAMA = {
    "n_vocab": 259,
    "n_embd": 64,
    "n_layer": 2,
    "n_head": 4,
    "n_head_kv": 2,
    "n_ff": 160,
    "n_ctx": 256,
    "rms_eps": 1e-5,
    "rope_theta": 10000.0,
}

# <unk>, <s>, </s>, then one BYTE token per byte value: a vocabulary llama.cpp's SPM tokenizer
# accepts, with every string falling back to bytes.
_SPM_SPECIALS = [("<unk>", gguf.TokenType.UNKNOWN), ("<s>", gguf.TokenType.CONTROL), ("</s>", gguf.TokenType.CONTROL)]


def tiny_llama_weights(seed, hp=TINY_LLAMA):
    """Random weights for the tiny decoder, keyed by GGUF tensor name, float32, (out, in) matrices.

    Matrices are N(0, 1/fan_in) so every projection keeps the scale of its input; norm weights
    are 1 + N(0, 0.1^2). q/k rows are used exactly as stored: llama.cpp applies its normal
    (adjacent-pair) RoPE to them, and there is no Hugging Face layout to permute from.
    """
    rng = np.random.default_rng(seed)
    d, ff, v = hp["n_embd"], hp["n_ff"], hp["n_vocab"]
    hd = d // hp["n_head"]
    d_kv = hd * hp["n_head_kv"]

    def mat(n_out, n_in):
        return rng.normal(0.0, 1.0 / np.sqrt(n_in), size=(n_out, n_in)).astype(np.float32)

    def norm():
        return (1.0 + 0.1 * rng.standard_normal(d)).astype(np.float32)

    t = gguf.TENSOR_NAMES
    M = gguf.MODEL_TENSOR
    w = {t[M.TOKEN_EMBD] + ".weight": rng.standard_normal((v, d)).astype(np.float32)}
    for i in range(hp["n_layer"]):
        def name(kind, i=i):
            return t[kind].format(bid=i) + ".weight"

        w[name(M.ATTN_NORM)] = norm()
        w[name(M.ATTN_Q)] = mat(d, d)
        w[name(M.ATTN_K)] = mat(d_kv, d)
        w[name(M.ATTN_V)] = mat(d_kv, d)
        w[name(M.ATTN_OUT)] = mat(d, d)
        w[name(M.FFN_NORM)] = norm()
        w[name(M.FFN_GATE)] = mat(ff, d)
        w[name(M.FFN_UP)] = mat(ff, d)
        w[name(M.FFN_DOWN)] = mat(d, ff)
    w[t[M.OUTPUT_NORM] + ".weight"] = norm()
    w[t[M.OUTPUT] + ".weight"] = mat(v, d)
    return w


def convert_tiny_llama(seed, out, npz=None, hp=TINY_LLAMA):
    """Writes the tiny decoder drawn from `seed` as a GGUF of arch `llama` (and its weights to npz)."""
    weights = tiny_llama_weights(seed, hp)
    arch = gguf.MODEL_ARCH.LLAMA
    w = gguf.GGUFWriter(out, gguf.MODEL_ARCH_NAMES[arch])
    w.add_name(f"tiny-llama-seed{seed}")
    w.add_vocab_size(hp["n_vocab"])
    w.add_context_length(hp["n_ctx"])
    w.add_embedding_length(hp["n_embd"])
    w.add_feed_forward_length(hp["n_ff"])
    w.add_block_count(hp["n_layer"])
    w.add_head_count(hp["n_head"])
    w.add_head_count_kv(hp["n_head_kv"])
    w.add_rope_dimension_count(hp["n_embd"] // hp["n_head"])
    w.add_rope_freq_base(hp["rope_theta"])
    w.add_layer_norm_rms_eps(hp["rms_eps"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)

    tokens = [s for s, _ in _SPM_SPECIALS] + [f"<0x{b:02X}>" for b in range(256)]
    types = [k for _, k in _SPM_SPECIALS] + [gguf.TokenType.BYTE] * 256
    if len(tokens) != hp["n_vocab"]:
        raise ValueError(f"tiny-llama: vocabulary has {len(tokens)} tokens, n_vocab is {hp['n_vocab']}")
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)

    for name, data in weights.items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    if npz is not None:
        hparams = {"hparams." + k: np.asarray(v) for k, v in hp.items()}
        np.savez(npz, **weights, **hparams)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("minilm", help="all-MiniLM-L6-v2 folder -> GGUF (arch bert)")
    m.add_argument("--model-dir", required=True, type=Path)
    m.add_argument("--out", required=True, type=Path)
    t = sub.add_parser("tiny-llama", help="random tiny decoder -> GGUF (arch llama)")
    t.add_argument("--seed", required=True, type=int)
    t.add_argument("--out", required=True, type=Path)
    t.add_argument("--npz", type=Path, help="also save the stored tensors (float32) here")
    for key in ("n_embd", "n_layer", "n_head", "n_head_kv", "n_ff"):
        t.add_argument("--" + key.replace("_", "-"), type=int, default=TINY_LLAMA[key],
                       help=f"default {TINY_LLAMA[key]} (larger sizes: the overhead measurement)")
    a = p.parse_args(argv)
    if a.cmd == "minilm":
        convert_minilm(a.model_dir, a.out)
    else:
        hp = dict(TINY_LLAMA, **{k: getattr(a, k) for k in ("n_embd", "n_layer", "n_head", "n_head_kv", "n_ff")})
        if hp["n_embd"] % hp["n_head"] or hp["n_head"] % hp["n_head_kv"] or (hp["n_embd"] // hp["n_head"]) % 2:
            p.error("n_embd must split into n_head heads of even size, n_head into n_head_kv groups")
        convert_tiny_llama(a.seed, a.out, a.npz, hp)
    print(a.out)


if __name__ == "__main__":
    sys.exit(main())
