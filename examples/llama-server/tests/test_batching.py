"""Continuous batching: 16 greedy requests over 4 profiles (one of them none) through 8 slots, so
that half of them wait in the queue and enter as others finish.

- Each request generates exactly the tokens it generates alone.
- The unsteered requests' logprobs are bit-identical to the same binary's without `--config`
  (nothing attached to llama.cpp), given the same schedule.
"""

from __future__ import annotations

import pytest
from conftest import greedy, paused_schedule

PROFILES = [None, "steer", "other", "third"]
N = 16
STEPS = 8


def prompt(i: int) -> list[int]:
    # Different lengths and contents: <s>, then 3 + (i % 5) bytes.
    return [1] + [3 + ((37 * i + 11 * k) % 256) for k in range(3 + i % 5)]


def body(i: int, with_profile: bool) -> dict:
    b = greedy(STEPS, prompt=prompt(i), logprobs=20, return_tokens_as_token_ids=True)
    if with_profile and PROFILES[i % 4] is not None:
        b["tiller_profile"] = PROFILES[i % 4]
    return b


@pytest.fixture(scope="module")
def servers(start_server, config, token_file):
    """A server with the config and one without, both fresh, both --parallel 8, both paused by
    the admin endpoints."""
    admin = ["--admin-token-file", token_file]
    hooked = start_server(config, parallel=8, extra=admin)
    base = start_server(None, parallel=8, extra=admin)
    yield hooked, base
    hooked.close()
    base.close()


def test_batched_requests_match_alone_and_the_unhooked_server(servers):
    """Why the same schedule on both servers: llama.cpp's unified KV cache places a sequence's
    cells by what else is in the batch and in the cache, and the attention sums then add the same
    values in another order. The tokens do not depend on it (greedy, far from ties); the last bits
    of the logits can. With the queue order fixed (pause, submit one at a time, resume) and both
    servers fresh, both decode the same batches into the same cells, and the only difference left
    is Tiller, which must not touch an unsteered sequence's bits."""
    hooked, base = servers
    batched = paused_schedule(hooked, [body(i, True) for i in range(N)])
    plain = paused_schedule(base, [body(i, False) for i in range(N)])

    for i in range(N):
        a, b = batched[i], plain[i]
        assert a["choices"][0]["finish_reason"] == "length"
        assert len(a["choices"][0]["token_ids"]) == STEPS
        assert a["prompt_token_ids"] == prompt(i)
        t = a["tiller"]
        assert t["profile"] == PROFILES[i % 4], f"request {i}"
        assert "tiller" in b and b["tiller"] is None
        if PROFILES[i % 4] is None:
            assert t["steering"] == {}
            assert a["choices"][0]["token_ids"] == b["choices"][0]["token_ids"], f"request {i}"
            # Exact equality: every logprob, top list and token, bit for bit.
            assert a["choices"][0]["logprobs"] == b["choices"][0]["logprobs"], f"request {i}"
        else:
            (rule, count), = t["steering"].items()
            assert count == t["tokens"], f"request {i}"
            # The steered ones were steered: their logprobs are not the model's own.
            assert (a["choices"][0]["logprobs"]["token_logprobs"]
                    != b["choices"][0]["logprobs"]["token_logprobs"]), f"request {i}"

    # Alone, one at a time, each request generates the same tokens.
    for i in range(N):
        alone = hooked.complete(body(i, True))
        assert alone["choices"][0]["token_ids"] == batched[i]["choices"][0]["token_ids"], f"request {i}"
        assert alone["tiller"]["steering"] == batched[i]["tiller"]["steering"], f"request {i}"

    # Half of them waited for a slot: every request went through the queue, which is empty now.
    assert hooked.gauge("tiller_server_queue_depth") == 0
    assert hooked.gauge("tiller_server_running_sequences") == 0
    assert hooked.metric("tiller_server_finished_total", endpoint="completions", finish_reason="length") == 2 * N
