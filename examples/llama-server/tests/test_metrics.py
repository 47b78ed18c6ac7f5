"""The server's metrics against the answers it gave: token counters are the sums of the answers'
`usage`, requests are counted by endpoint and status, and Tiller's own token counter is the sum of
the summaries' `tokens`. A fresh server, so that every counter starts at zero.
"""

from __future__ import annotations

import openai
import pytest
from conftest import LAYER, extra, metric

PROMPTS = [[1, 72, 101, 108, 108, 111, 33], [1, 87, 104, 121, 63], [1, 70, 111, 111], "Hello there"]
MESSAGES = [[{"role": "user", "content": "Hi"}], [{"role": "system", "content": "Be brief."},
                                                  {"role": "user", "content": "Why?"}]]
EXTRA = {"ignore_eos": True}


@pytest.fixture(scope="module")
def server(start_server, config):
    s = start_server(config, parallel=4, extra=["--chat-template", "chatml"])
    yield s
    s.close()


def test_counters_are_the_sums_of_the_answers(server):
    client = server.client()
    prompt_tokens = generated = tiller_tokens = steered = 0
    ends = {"completions": 0, "chat": 0}

    def count(usage, tiller):
        nonlocal prompt_tokens, generated, tiller_tokens, steered
        prompt_tokens += usage.prompt_tokens
        generated += usage.completion_tokens
        tiller_tokens += tiller["tokens"]
        steered += tiller["steering"].get("add-2", 0)

    for k, p in enumerate(PROMPTS):
        profile = {"tiller_profile": "steer"} if k % 2 else {}
        r = client.completions.create(model="tiny", prompt=p, max_tokens=3 + k, temperature=0,
                                      extra_body={**EXTRA, **profile})
        count(r.usage, extra(r, "tiller"))
        ends["completions"] += 1
    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=5, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={**EXTRA, "tiller_profile": "steer"}))
    last = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
    count(chunks[-1].usage, extra(last, "tiller"))
    ends["completions"] += 1

    for k, m in enumerate(MESSAGES):
        r = client.chat.completions.create(model="tiny", messages=m, max_tokens=4 + k, temperature=0,
                                           extra_body=EXTRA, extra_headers={"X-Tiller-Profile": "steer"})
        count(r.usage, extra(r, "tiller"))
        ends["chat"] += 1
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES[0], max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body=EXTRA))
    last = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
    count(chunks[-1].usage, extra(last, "tiller"))
    ends["chat"] += 1

    # Refused before they were queued: counted by status, not as tokens.
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", max_tokens=2, extra_body={"tiller_profile": "nope"})
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=MESSAGES[0], n=2)

    m = server.metrics()
    assert metric(m, "tiller_server_prompt_tokens_total", required=True) == prompt_tokens
    assert metric(m, "tiller_server_generated_tokens_total", required=True) == generated
    assert metric(m, "tiller_server_requests_total", endpoint="completions", status="200") == ends["completions"]
    assert metric(m, "tiller_server_requests_total", endpoint="chat", status="200") == ends["chat"]
    assert metric(m, "tiller_server_requests_total", endpoint="completions", status="400") == 1
    assert metric(m, "tiller_server_requests_total", endpoint="chat", status="400") == 1
    assert metric(m, "tiller_server_requests_total") == ends["completions"] + ends["chat"] + 2
    assert metric(m, "tiller_server_finished_total", endpoint="completions", finish_reason="length") == ends["completions"]
    assert metric(m, "tiller_server_finished_total", endpoint="chat", finish_reason="length") == ends["chat"]
    assert metric(m, "tiller_server_finished_total") == ends["completions"] + ends["chat"]
    assert metric(m, "tiller_server_queue_depth", required=True) == 0
    assert metric(m, "tiller_server_running_sequences", required=True) == 0
    # One first token per answer.
    assert metric(m, "tiller_server_time_to_first_token_seconds_count") == ends["completions"] + ends["chat"]
    # Tiller's own: one hook, every token the summaries counted.
    assert metric(m, "tiller_tokens_total", hook=f"blk.{LAYER}") == tiller_tokens
    assert metric(m, "tiller_steering_tokens_total", rule="add-2") == steered
    assert steered > 0
