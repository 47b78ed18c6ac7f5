"""The OpenAI-compatible surface, through the official `openai` client (raw HTTP where the client
hides what is checked: SSE framing, headers, status codes).

The tiny decoder has no chat template, so its server runs with `--chat-template chatml`; its
vocabulary is bytes, so expected prompt tokens are computed here from the text.
"""

from __future__ import annotations

import sys

import numpy as np
import openai
import pytest
from conftest import (
    LLAMA_CPP,
    byte_tokens,
    decode_base64_embedding,
    extra,
    greedy,
    stream,
)

sys.path.insert(0, str(LLAMA_CPP / "tests"))
from test_convert import MINILM_COSINE, SENTENCES, _minilm_dir  # noqa: E402

import convert  # noqa: E402
import reference  # noqa: E402

PROMPT = [1, 72, 101, 108, 108, 111, 33]
EXTRA = {"ignore_eos": True, "return_token_ids": True}


@pytest.fixture(scope="module")
def client(steer_server):
    return steer_server.client()


def completion(client, max_tokens=6, prompt=PROMPT, model="tiny", **kw):
    extra_body = dict(EXTRA)
    extra_body.update(kw.pop("extra_body", {}))
    kw.setdefault("temperature", 0)
    return client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, extra_body=extra_body, **kw)


# ------------------------------------------------------------------------------------------------
# completions
# ------------------------------------------------------------------------------------------------


def test_completion_of_a_string_prompt(client):
    r = completion(client, max_tokens=5, prompt="Hello world")
    assert r.object == "text_completion"
    assert r.model == "tiny"
    assert len(r.choices) == 1
    c = r.choices[0]
    assert c.index == 0 and c.finish_reason == "length"
    assert isinstance(c.text, str)
    assert extra(r, "prompt_token_ids") == byte_tokens("Hello world")
    ids = extra(c, "token_ids")
    assert len(ids) == 5 and all(0 <= t < 259 for t in ids)
    assert r.usage.prompt_tokens == len(byte_tokens("Hello world"))
    assert r.usage.completion_tokens == 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + 5
    # Without a profile the summary is there, naming none, steering nothing.
    t = extra(r, "tiller")
    assert t["profile"] is None and t["steering"] == {} and t["stopped"] is False


def test_greedy_is_deterministic_and_token_prompts_are_used_as_given(client):
    a, b = completion(client, max_tokens=8), completion(client, max_tokens=8)
    assert extra(a.choices[0], "token_ids") == extra(b.choices[0], "token_ids")
    assert a.choices[0].text == b.choices[0].text
    assert extra(a, "prompt_token_ids") == PROMPT
    # A shorter generation is a prefix of the longer one.
    c = completion(client, max_tokens=3)
    assert extra(c.choices[0], "token_ids") == extra(a.choices[0], "token_ids")[:3]


def test_seeded_sampling_is_reproducible(client):
    def sample(seed):
        r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=1.0, seed=seed,
                                      extra_body=EXTRA)
        return extra(r.choices[0], "token_ids")

    first = sample(7)
    assert sample(7) == first
    # Twelve draws from a near-uniform vocabulary of 259: other seeds give other sequences.
    assert any(sample(s) != first for s in (8, 9, 10))


def test_context_end_is_length(client):
    """A prompt of CTX - 6 tokens leaves room for 6 generated ones in --ctx-size 256."""
    prompt = [1] + [72] * 249
    r = completion(client, max_tokens=16, prompt=prompt)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == 250
    assert r.usage.prompt_tokens + r.usage.completion_tokens == 256


def test_streamed_completion(client, steer_server):
    whole = completion(client, max_tokens=6)
    chunks = list(completion(client, max_tokens=6, stream=True, stream_options={"include_usage": True}))
    text_chunks = [c for c in chunks if c.choices]
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    finishes = [c.choices[0].finish_reason for c in text_chunks]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    # include_usage: one last chunk without choices, carrying the usage.
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 6
    assert chunks[-1].usage.prompt_tokens == len(PROMPT)

    # On the wire: SSE `data:` lines ended by `data: [DONE]`; the chunk with the finish_reason
    # carries the whole summary.
    status, events, done = stream(steer_server, "/v1/completions",
                                  greedy(6, prompt=PROMPT, stream=True, tiller_profile="steer"))
    assert status == 200 and done
    last = [e for e in events if e["choices"] and e["choices"][0]["finish_reason"] is not None]
    assert len(last) == 1 and last[0]["choices"][0]["finish_reason"] == "length"
    assert last[0]["tiller"]["profile"] == "steer"
    assert last[0]["tiller"]["steering"]["add-2"] == last[0]["tiller"]["tokens"]


def test_logprobs_are_the_models(client):
    r = completion(client, max_tokens=4, logprobs=5, extra_body={"return_tokens_as_token_ids": True})
    lp = r.choices[0].logprobs
    ids = extra(r.choices[0], "token_ids")
    assert lp.tokens == [f"token_id:{t}" for t in ids]
    assert len(lp.token_logprobs) == 4 and len(lp.top_logprobs) == 4
    for tok, chosen, top in zip(ids, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 5
        # Greedy: the chosen token is the most likely one, and its logprob is the top entry's.
        best = max(top, key=top.get)
        assert best == f"token_id:{tok}" and top[best] == chosen
        assert all(v <= 0 for v in top.values())


# ------------------------------------------------------------------------------------------------
# chat
# ------------------------------------------------------------------------------------------------

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"}]
CHATML = "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"


def chat(client, messages=MESSAGES, **kw):
    return client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=5, temperature=0,
                                          extra_body=EXTRA, **kw)


def test_chat_completion_renders_chatml(client):
    r = chat(client)
    assert r.object == "chat.completion"
    c = r.choices[0]
    assert c.message.role == "assistant" and isinstance(c.message.content, str)
    assert c.finish_reason == "length"
    assert r.usage.completion_tokens == 5
    assert extra(r, "prompt_token_ids") == byte_tokens(CHATML)
    assert r.usage.prompt_tokens == len(byte_tokens(CHATML))
    # Content as a list of text parts renders the same.
    parts = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in MESSAGES]
    p = chat(client, messages=parts)
    assert extra(p, "prompt_token_ids") == byte_tokens(CHATML)
    assert extra(p.choices[0], "token_ids") == extra(c, "token_ids")
    # max_tokens is max_completion_tokens.
    m = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3, temperature=0, extra_body=EXTRA)
    assert m.usage.completion_tokens == 3
    assert extra(m.choices[0], "token_ids") == extra(c, "token_ids")[:3]


def test_chat_logprobs(client):
    r = chat(client, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == entry.logprob


def test_streamed_chat(client, steer_server):
    whole = chat(client)
    chunks = list(chat(client, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in with_choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5

    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 5, "temperature": 0, "stream": True,
            "ignore_eos": True}
    status, events, done = stream(steer_server, "/v1/chat/completions", body)
    assert status == 200 and done
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert events[-1]["tiller"]["profile"] is None


# ------------------------------------------------------------------------------------------------
# profiles and overrides
# ------------------------------------------------------------------------------------------------


def test_profile_by_body_and_by_header(client):
    plain = completion(client, max_tokens=8, logprobs=3)
    body = completion(client, max_tokens=8, logprobs=3, extra_body={"tiller_profile": "steer"})
    header = completion(client, max_tokens=8, logprobs=3, extra_headers={"X-Tiller-Profile": "steer"})
    assert extra(body.choices[0], "token_ids") == extra(header.choices[0], "token_ids")
    assert body.choices[0].logprobs.token_logprobs == header.choices[0].logprobs.token_logprobs
    for r in (body, header):
        t = extra(r, "tiller")
        assert t["profile"] == "steer"
        # Every token that went through the hook was edited: the prompt's and the generated ones
        # (all but the last, which no decode has read yet, unless the server decoded it too).
        assert t["tokens"] in (len(PROMPT) + 7, len(PROMPT) + 8)
        assert t["steering"] == {"add-2": t["tokens"]}
    # The edit shows in the model's logprobs.
    assert body.choices[0].logprobs.token_logprobs != plain.choices[0].logprobs.token_logprobs
    assert extra(plain, "tiller")["steering"] == {}
    # The body wins over the header.
    both = completion(client, max_tokens=8, extra_body={"tiller_profile": "steer"},
                      extra_headers={"X-Tiller-Profile": "other"})
    assert extra(both, "tiller")["profile"] == "steer"
    assert extra(both.choices[0], "token_ids") == extra(body.choices[0], "token_ids")


def test_allowed_overrides_steer(client):
    over = {"steer": [{"dictionary": "sae", "op": "add", "feature": 0, "strength": 3.0}]}
    r = completion(client, max_tokens=4, extra_body={"tiller_overrides": over})
    t = extra(r, "tiller")
    # One rule, the request's own (the runtime names it after the request), on every token.
    assert list(t["steering"].values()) == [t["tokens"]]
    assert "add-2" not in t["steering"]


def bad_request(call) -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as info:
        call()
    e = info.value
    assert e.status_code == 400
    assert e.type == "invalid_request_error"
    return e


def test_unknown_profile_is_refused(client):
    e = bad_request(lambda: completion(client, extra_body={"tiller_profile": "nope"}))
    assert e.param == "tiller_profile" and e.code == "tiller_profile_unknown"
    assert "nope" in e.message
    e = bad_request(lambda: completion(client, extra_headers={"X-Tiller-Profile": "nope"}))
    assert e.param == "tiller_profile" and e.code == "tiller_profile_unknown"
    e = bad_request(lambda: chat(client, extra_headers={"X-Tiller-Profile": "nope"}))
    assert e.code == "tiller_profile_unknown"


@pytest.mark.parametrize(
    "rule, field",
    [
        ({"dictionary": "sae", "op": "add", "feature": 0, "strength": 50.0}, "steer[0].strength"),
        ({"dictionary": "sae", "op": "add", "feature": 9, "strength": 1.0}, "steer[0].feature"),
        ({"dictionary": "sae", "op": "add", "feature": 2, "strength": 1.0}, "steer[0].feature"),
    ],
)
def test_refused_overrides(client, rule, field):
    """Past max_abs_strength, a feature no monitor names, a feature a profile steers."""
    e = bad_request(lambda: completion(client, extra_body={"tiller_overrides": {"steer": [rule]}}))
    assert e.code == "tiller_overrides_refused"
    assert field in e.message or e.param == field, (e.param, e.message)


@pytest.mark.parametrize(
    "kw, param",
    [
        ({"n": 2}, "n"),
        ({"temperature": -1.0}, "temperature"),
        ({"logprobs": 21}, "logprobs"),
        ({"extra_body": {"frobnicate": 1}}, "frobnicate"),
        ({"echo": True}, "echo"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"prompt": [1] + [72] * 300}, "prompt"),
    ],
)
def test_bad_requests_name_their_field(client, kw, param):
    e = bad_request(lambda: completion(client, **kw))
    assert e.param == param, (e.param, e.message)


def test_a_malformed_body(steer_server):
    r = steer_server.http.post("/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_a_body_over_4_mib(steer_server):
    r = steer_server.post("/v1/completions", greedy(1, prompt="x" * (4 * 1024 * 1024 + 10)))
    assert r.status_code == 413
    assert r.json()["error"]["type"] == "invalid_request_error"


# ------------------------------------------------------------------------------------------------
# the rest of the surface
# ------------------------------------------------------------------------------------------------


def test_models_and_health(client, steer_server):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"]
    assert models[0].object == "model"
    r = steer_server.http.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok", "model": "tiny", "tiller": True}


def test_model_alias(start_server):
    s = start_server(None, parallel=1, extra=["--model-alias", "tiny-alias"])
    c = s.client()
    assert [m.id for m in c.models.list().data] == ["tiny-alias"]
    r = completion(c, max_tokens=2, model="tiny-alias")
    assert r.model == "tiny-alias"
    # Without a config the tiller field is there and null.
    assert extra(r, "tiller") is None
    # A profile needs a config.
    e = bad_request(lambda: completion(c, model="tiny-alias", extra_body={"tiller_profile": "steer"}))
    assert e.code == "tiller_disabled" and e.param == "tiller_profile"
    s.close()


def test_unknown_paths_and_admin_without_a_token_file(client, steer_server):
    with pytest.raises(openai.NotFoundError) as info:
        client.get("/nope", cast_to=object)
    assert info.value.type == "invalid_request_error"
    r = steer_server.http.get("/v1/nope")
    assert r.status_code == 404
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    # A method the endpoint does not take: 405, in the same shape.
    r = steer_server.http.get("/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    for action in ("reload", "pause", "resume"):
        r = steer_server.admin(action)
        assert r.status_code == 404, action
        assert r.json()["error"]["type"] == "invalid_request_error"


# ------------------------------------------------------------------------------------------------
# embeddings
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm(tmp_path_factory, start_server):
    d = _minilm_dir()
    if not (d / "model.safetensors").is_file():
        pytest.fail(f"all-MiniLM-L6-v2 not found at {d}: set TILLER_MINILM_DIR or provision it as the "
                    "README's MiniLM section says", pytrace=False)
    out = tmp_path_factory.mktemp("minilm") / "minilm.gguf"
    convert.main(["minilm", "--model-dir", str(d), "--out", str(out)])
    server = start_server(None, parallel=2, ctx=512, model=out, extra=["--embeddings"])
    yield server, d
    server.close()


def test_embeddings_match_the_reference(minilm):
    server, model_dir = minilm
    client = server.client()
    texts = SENTENCES[:3]
    ref = reference.minilm_reference(model_dir, texts)
    r = client.embeddings.create(model="minilm", input=texts, encoding_format="float")
    assert [d.index for d in r.data] == [0, 1, 2]
    assert r.usage.prompt_tokens == sum(len(ids) for ids in ref["ids"])
    for d, want in zip(r.data, ref["embeddings"]):
        v = np.asarray(d.embedding, dtype=np.float64)
        assert v.shape == (384,)
        assert abs(np.linalg.norm(v) - 1) < 1e-5
        assert float(v @ want) / np.linalg.norm(v) > MINILM_COSINE


def test_embeddings_float_and_base64_agree(minilm):
    server, _ = minilm
    texts = ["The same text twice.", "Another one."]
    as_float = server.post("/v1/embeddings", {"model": "minilm", "input": texts, "encoding_format": "float"}).json()
    as_b64 = server.post("/v1/embeddings", {"model": "minilm", "input": texts, "encoding_format": "base64"}).json()
    single = server.post("/v1/embeddings", {"model": "minilm", "input": texts[0], "encoding_format": "float"}).json()
    assert as_float["object"] == "list" and len(as_float["data"]) == 2
    for f, b in zip(as_float["data"], as_b64["data"]):
        assert isinstance(b["embedding"], str)
        assert np.array_equal(np.asarray(f["embedding"], dtype=np.float32), decode_base64_embedding(b["embedding"]))
    # The same text gives the same vector, alone or in a list.
    assert single["data"][0]["embedding"] == as_float["data"][0]["embedding"]
    assert as_float["data"][0]["embedding"] != as_float["data"][1]["embedding"]
    bad = server.post("/v1/embeddings", {"model": "minilm", "input": texts, "encoding_format": "int8"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "encoding_format"
