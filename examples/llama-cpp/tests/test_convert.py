"""The GGUF converters against llama.cpp (llama-cpp-python 0.3.36, low-level API) and the float64
references.

    examples/llama-cpp/provision.sh                       # builds llama.cpp once, prints its folder
    .venv/bin/pip install --no-deps "$(examples/llama-cpp/provision.sh)"/wheel/*.whl
    .venv/bin/python -m pytest examples/llama-cpp/tests -q

Needs numpy, pytest, gguf==0.19.0 and llama_cpp. Without llama_cpp the tests that run llama.cpp fail
with a message saying so, unless TILLER_LLAMA_OPTIONAL=1, which skips them instead. MiniLM comes from
TILLER_MINILM_DIR or the cached copy under $TILLER_CACHE_DIR (see the README's MiniLM section).
"""
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import gguf
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import convert  # noqa: E402
import reference  # noqa: E402

# Sentences for MiniLM: accents (stripped by both tokenizers), punctuation, numbers, mixed case,
# words split into several pieces, CJK (one word per character) and an out-of-vocabulary symbol.
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Crème brûlée, naïve café and façade: Ångström's résumé!",
    "In 2024, 3.14159 * 42 = 131.95 (approximately); see item #7 & $19.99.",
    "Tokenization of UNBELIEVABLY long-winded, hyphenated words... isn't trivial?!",
    "東京は日本の首都です。 Zürich — São Paulo",
    "emoji \U0001F600 and tabs\tand\nnewlines",
]

# llama.cpp computes in float32 (ggml f32 matmuls, f32 KV cache here). With logits of order 1 and
# 64-wide dot products, float32 round-off accumulates to ~1e-6 relative; 1e-4 leaves room for the
# different summation orders while catching any real layout or RoPE error (those give O(1) errors).
TINY_LOGITS_RTOL = 1e-4
# MiniLM: ggml evaluates GELU with the tanh approximation through an f16 table, the reference with erf
# in float64; over six layers this still keeps the pooled, normalised embedding within 1e-5 in cosine.
MINILM_COSINE = 0.99999
TINY_SEED = 1234


def _minilm_dir():
    if os.environ.get("TILLER_MINILM_DIR"):
        return Path(os.environ["TILLER_MINILM_DIR"])
    cache = os.environ.get("TILLER_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tiller")
    return Path(cache) / "all-MiniLM-L6-v2-0.1.0"


# ------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def llama():
    """The llama_cpp module, with the backend initialised."""
    try:
        import llama_cpp
    except ImportError as e:
        llama_cpp, why = None, str(e)
    if llama_cpp is None:
        msg = (f"llama_cpp cannot be imported ({why}). Build it with examples/llama-cpp/provision.sh and "
               "install the wheel it prints (pip install --no-deps DIR/wheel/*.whl), or set "
               "TILLER_LLAMA_OPTIONAL=1 to skip the llama.cpp tests.")
        if os.environ.get("TILLER_LLAMA_OPTIONAL") == "1":
            pytest.skip(msg)
        pytest.fail(msg, pytrace=False)
    llama_cpp.llama_backend_init()
    return llama_cpp


@pytest.fixture(scope="session")
def minilm_dir():
    d = _minilm_dir()
    if not (d / "model.safetensors").is_file():
        pytest.fail(f"all-MiniLM-L6-v2 not found at {d}: set TILLER_MINILM_DIR or provision it as the "
                    "README's MiniLM section says", pytrace=False)
    return d


@pytest.fixture(scope="session")
def minilm_gguf(minilm_dir, tmp_path_factory):
    """all-MiniLM-L6-v2 converted once per session (~90 MB)."""
    out = tmp_path_factory.mktemp("minilm") / "minilm.gguf"
    convert.main(["minilm", "--model-dir", str(minilm_dir), "--out", str(out)])
    return out


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """(GGUF path, float64 reference weights) of the tiny decoder."""
    d = tmp_path_factory.mktemp("tiny")
    convert.main(["tiny-llama", "--seed", str(TINY_SEED), "--out", str(d / "tiny.gguf"), "--npz", str(d / "tiny.npz")])
    return d / "tiny.gguf", reference.load_tiny_llama(d / "tiny.npz")


# ------------------------------------------------------------------------------------------------
# llama.cpp helpers
# ------------------------------------------------------------------------------------------------

@contextmanager
def loaded(llama, path, embeddings=False):
    """A model and a context on it: f32 KV cache, no flash attention, whole prompts in one ubatch."""
    mp = llama.llama_model_default_params()
    mp.n_gpu_layers = 0
    model = llama.llama_model_load_from_file(str(path).encode(), mp)
    assert model, f"llama.cpp could not load {path}"
    cp = llama.llama_context_default_params()
    cp.n_ctx = cp.n_batch = cp.n_ubatch = 256
    cp.n_threads = cp.n_threads_batch = 2
    cp.type_k = cp.type_v = int(gguf.GGMLQuantizationType.F32)
    cp.flash_attn_type = llama.LLAMA_FLASH_ATTN_TYPE_DISABLED
    cp.embeddings = embeddings
    if embeddings:
        cp.pooling_type = llama.LLAMA_POOLING_TYPE_MEAN
    ctx = llama.llama_init_from_model(model, cp)
    try:
        assert ctx, f"llama.cpp could not create a context for {path}"
        yield model, ctx
    finally:
        if ctx:
            llama.llama_free(ctx)
        llama.llama_model_free(model)


def decode(llama, ctx, tokens, start_pos=0, seq=0):
    """Decodes `tokens` at positions start_pos.. of sequence `seq`, every token an output."""
    batch = llama.llama_batch_init(len(tokens), 0, 1)
    try:
        for i, t in enumerate(tokens):
            batch.token[i] = t
            batch.pos[i] = start_pos + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = 1
        batch.n_tokens = len(tokens)
        rc = llama.llama_decode(ctx, batch)
        assert rc == 0, f"llama_decode returned {rc}"
    finally:
        llama.llama_batch_free(batch)


def logits_row(llama, ctx, model, i):
    n_vocab = llama.llama_vocab_n_tokens(llama.llama_model_get_vocab(model))
    ptr = llama.llama_get_logits_ith(ctx, i)
    assert ptr, f"no logits for output {i}"
    return np.ctypeslib.as_array(ptr, shape=(n_vocab,)).astype(np.float64)


def tokenize(llama, model, text):
    vocab = llama.llama_model_get_vocab(model)
    raw = text.encode("utf-8")
    buf = (llama.llama_token * (len(raw) + 8))()
    n = llama.llama_tokenize(vocab, raw, len(raw), buf, len(buf), True, False)
    assert n >= 0, f"llama_tokenize needs {-n} tokens for {text!r}"
    return list(buf[:n])


def rel_err(got, want):
    return float(np.abs(got - want).max() / np.abs(want).max())


# ------------------------------------------------------------------------------------------------
# the files themselves (gguf's reader; no llama.cpp)
# ------------------------------------------------------------------------------------------------

def _fields(reader):
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def test_minilm_gguf_layout(minilm_gguf, minilm_dir):
    r = gguf.GGUFReader(minilm_gguf)
    kv = _fields(r)
    assert kv["general.architecture"] == "bert"
    assert kv["bert.block_count"] == 6 and kv["bert.embedding_length"] == 384
    assert kv["bert.feed_forward_length"] == 1536 and kv["bert.attention.head_count"] == 12
    assert kv["bert.context_length"] == 512 and kv["bert.attention.causal"] is False
    assert kv["bert.pooling_type"] == gguf.PoolingType.MEAN
    assert kv["tokenizer.ggml.model"] == "bert"
    toks, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    assert len(toks) == 30522
    # word-start pieces carry U+2581, continuations lose "##", specials stay as they are
    assert toks[2009] == "\u2581it" and toks[101] == "[CLS]" and types[101] == gguf.TokenType.CONTROL
    assert not any(t.startswith("##") for t in toks)
    assert (kv["tokenizer.ggml.bos_token_id"], kv["tokenizer.ggml.seperator_token_id"],
            kv["tokenizer.ggml.unknown_token_id"], kv["tokenizer.ggml.padding_token_id"],
            kv["tokenizer.ggml.mask_token_id"]) == (101, 102, 100, 0, 103)
    names = {t.name for t in r.tensors}
    per_layer = ["attn_q", "attn_k", "attn_v", "attn_output", "attn_output_norm", "ffn_up", "ffn_down",
                 "layer_output_norm"]
    want = {"token_embd.weight", "token_types.weight", "position_embd.weight", "token_embd_norm.weight",
            "token_embd_norm.bias"}
    want |= {f"blk.{i}.{n}.{s}" for i in range(6) for n in per_layer for s in ("weight", "bias")}
    assert names == want
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in r.tensors)
    src = convert.read_safetensors(minilm_dir / "model.safetensors")
    q = next(t for t in r.tensors if t.name == "blk.3.attn_q.weight")
    np.testing.assert_array_equal(np.asarray(q.data), src["encoder.layer.3.attention.self.query.weight"])


def test_tiny_gguf_matches_npz(tiny):
    path, w = tiny
    r = gguf.GGUFReader(path)
    kv = _fields(r)
    hp = convert.TINY_LLAMA
    assert kv["general.architecture"] == "llama"
    assert kv["llama.attention.head_count_kv"] == hp["n_head_kv"] and kv["llama.rope.dimension_count"] == 16
    assert kv["tokenizer.ggml.model"] == "llama" and len(kv["tokenizer.ggml.tokens"]) == 259
    assert kv["tokenizer.ggml.tokens"][3 + 0x41] == "<0x41>"
    assert kv["tokenizer.ggml.token_type"][3 + 0x41] == gguf.TokenType.BYTE
    assert {t.name for t in r.tensors} == {k for k in w if k != "hparams"}
    for t in r.tensors:
        np.testing.assert_array_equal(np.asarray(t.data).astype(np.float64), w[t.name], err_msg=t.name)
    # same seed, same weights: the file is reproducible
    again = convert.tiny_llama_weights(TINY_SEED)
    assert all(np.array_equal(again[k], w[k].astype(np.float32)) for k in again)


def test_reference_logits_from_hidden_agrees_with_forward(tiny):
    _, w = tiny
    out = reference.llama_forward(w, [1, 75, 104, 3, 200, 50])
    np.testing.assert_allclose(reference.llama_logits_from_hidden(w, out["hidden"][-1]), out["logits"], rtol=0, atol=1e-12)
    # causal: a prefix's logits do not depend on what follows it
    np.testing.assert_allclose(reference.llama_forward(w, [1, 75, 104])["logits"], out["logits"][:3], rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# against llama.cpp
# ------------------------------------------------------------------------------------------------

def test_minilm_tokens_and_embeddings_match_reference(llama, minilm_gguf, minilm_dir):
    ref = reference.minilm_reference(minilm_dir, SENTENCES)
    with loaded(llama, minilm_gguf, embeddings=True) as (model, ctx):
        assert llama.llama_pooling_type(ctx) == llama.LLAMA_POOLING_TYPE_MEAN
        n_embd = llama.llama_model_n_embd(model)
        worst = 1.0
        for text, ref_ids, ref_emb in zip(SENTENCES, ref["ids"], ref["embeddings"]):
            ids = tokenize(llama, model, text)
            assert ids == ref_ids, f"token ids differ for {text!r}"
            # an encoder-only model has no KV cache: llama_decode runs llama_encode for it
            decode(llama, ctx, ids)
            ptr = llama.llama_get_embeddings_seq(ctx, 0)
            assert ptr, "no pooled embedding for sequence 0"
            emb = np.ctypeslib.as_array(ptr, shape=(n_embd,)).astype(np.float64)
            emb /= np.linalg.norm(emb)
            cos = float(emb @ ref_emb)
            worst = min(worst, cos)
            assert cos > MINILM_COSINE, f"cosine {cos:.8f} for {text!r}"
    print(f"MiniLM: worst cosine {worst:.9f} over {len(SENTENCES)} sentences")


def test_tiny_llama_logits_and_cached_step_match_reference(llama, tiny):
    path, w = tiny
    prompt = [1] + [3 + b for b in "Hello tiny!".encode()]  # <s> then byte tokens: 12 tokens
    assert len(prompt) == 12
    ref = reference.llama_forward(w, prompt)["logits"]
    with loaded(llama, path) as (model, ctx):
        # the byte vocabulary works with llama.cpp's SPM tokenizer: "\u2581" for spaces, bytes for all
        spm = ("\u2581" + "Hello tiny!".replace(" ", "\u2581")).encode()
        assert tokenize(llama, model, "Hello tiny!") == [1] + [3 + b for b in spm]

        decode(llama, ctx, prompt)
        got = np.stack([logits_row(llama, ctx, model, i) for i in range(len(prompt))])
        err = rel_err(got, ref)
        assert err < TINY_LOGITS_RTOL, f"prompt logits: relative error {err:.3g}"

        # one greedy step through the KV cache: only the new token is decoded
        top2 = np.sort(ref[-1])[-2:]
        assert top2[1] - top2[0] > 10 * TINY_LOGITS_RTOL * np.abs(ref).max(), "greedy choice is a near tie"
        nxt = int(np.argmax(got[-1]))
        assert nxt == int(np.argmax(ref[-1]))
        decode(llama, ctx, [nxt], start_pos=len(prompt))
        step = logits_row(llama, ctx, model, 0)
        ref_step = reference.llama_forward(w, prompt + [nxt])["logits"][-1]
        step_err = rel_err(step, ref_step)
        assert step_err < TINY_LOGITS_RTOL, f"cached step logits: relative error {step_err:.3g}"
    print(f"tiny llama: prompt logits rel err {err:.3g}, cached step rel err {step_err:.3g}")
