"""Stops: a monitor with `action = "stop"` ends its request's stream with finish_reason
"content_filter" at the decode that fired, while a request decoded beside it goes on to its full
length; a `stop` string ends a request with finish_reason "stop" and is not returned.

Where the monitor fires is predicted as in examples/llama-cpp/tests/test_stop.py: the float64
reference's layer-0 residual over the tokens of an unstopped run, encoded in NumPy. The feature and
threshold are picked so that prompt 0's generation crosses first at generated token j (fed to the
model by decode j + 1) with every earlier value, and every value of prompt 1's generation, at least
MARGIN below.
"""

from __future__ import annotations

import numpy as np
import pytest
import reference
from conftest import B_ENC, LAYER, greedy, metric, run_paused, stream, write_config

PROMPTS = [[1, 72, 101, 108, 108, 111, 33], [1, 87, 104, 121, 63]]
STEPS = 8
MARGIN = 1e-3

STOP_CONFIG = """
[runtime]
threads = 1
fvu_sample_rate = 0.0

[[dictionary]]
name = "sae"
path = "{sae}"

[[monitor]]
name = "halt"
dictionary = "sae"
features = [FEATURE]
threshold = THRESHOLD
window = "token"
action = "stop"
apply_to = "generated"
"""


@pytest.fixture(scope="module")
def stop_setup(steer_server, tiny, sae, start_server, token_file, tmp_path_factory):
    """(stop server, base generations, j): prompt 0 stops at decode j + 1."""
    _, weights = tiny
    sae_path, w_dec = sae
    base, values = [], []
    for p in PROMPTS:
        ids = steer_server.complete(greedy(STEPS, prompt=p))["choices"][0]["token_ids"]
        base.append(ids)
        h0 = reference.llama_forward(weights, p + ids)["hidden"][LAYER]
        values.append(np.maximum(h0 @ w_dec.T + B_ENC, 0.0)[len(p):])
    picked = reference.pick_stop(values, STEPS, MARGIN)
    assert picked is not None, "no feature of the SAE gives a stop the test can predict"
    feature, j, threshold = picked
    print(f"feature {feature}: prompt 0 crosses {threshold:.6f} at generated token {j}")
    text = STOP_CONFIG.replace("FEATURE", str(feature)).replace("THRESHOLD", repr(threshold))
    cfg = write_config(tmp_path_factory.mktemp("stop"), sae_path, text)
    server = start_server(cfg, parallel=2, extra=["--admin-token-file", token_file])
    yield server, base, j
    server.close()


def test_a_stopped_stream_ends_and_the_other_goes_on(stop_setup):
    server, base, j = stop_setup
    bodies = [greedy(STEPS, prompt=p, stream=True, stream_options={"include_usage": True}) for p in PROMPTS]
    # Both in the queue before either runs, so that they share their decodes.
    (s0, ev0, done0), (s1, ev1, done1) = run_paused(
        server, [lambda b=b: stream(server, "/v1/completions", b) for b in bodies])
    assert s0 == 200 and s1 == 200 and done0 and done1

    def finish(events):
        last = [e for e in events if e["choices"] and e["choices"][0]["finish_reason"] is not None]
        assert len(last) == 1, events
        return last[0]

    def usage(events):
        return next(e["usage"] for e in reversed(events) if e.get("usage"))

    f0, f1 = finish(ev0), finish(ev1)
    assert f0["choices"][0]["finish_reason"] == "content_filter"
    assert f1["choices"][0]["finish_reason"] == "length"
    # Generated tokens 0..j came before the decode that fed token j; nothing was sampled from it.
    assert usage(ev0)["completion_tokens"] == j + 1
    assert usage(ev1)["completion_tokens"] == STEPS
    t0, t1 = f0["tiller"], f1["tiller"]
    assert t0["stopped"] is True and t1["stopped"] is False
    assert t0["tokens"] == len(PROMPTS[0]) + j + 1
    assert [(e["monitor"], e["action"], e["token"]) for e in t0["events"]] == [("halt", "stop", len(PROMPTS[0]) + j)]
    assert t1["events"] == []
    # The chunk events carry the stop too.
    streamed = [e for chunk in ev0 if chunk.get("tiller") and "events" in chunk["tiller"]
                for e in chunk["tiller"]["events"]]
    assert ("halt", "stop") in [(e["monitor"], e["action"]) for e in streamed]

    m = server.metrics()
    assert metric(m, "tiller_server_finished_total", endpoint="completions", finish_reason="content_filter") == 1
    assert metric(m, "tiller_server_finished_total", endpoint="completions", finish_reason="length") == 1
    assert metric(m, "tiller_server_running_sequences", required=True) == 0


def test_a_stopped_request_keeps_what_it_generated(stop_setup):
    server, base, j = stop_setup
    a = server.complete(greedy(STEPS, prompt=PROMPTS[0]))
    assert a["choices"][0]["finish_reason"] == "content_filter"
    assert a["choices"][0]["token_ids"] == base[0][: j + 1]
    assert a["tiller"]["stopped"] is True
    assert a["usage"]["completion_tokens"] == j + 1
    b = server.complete(greedy(STEPS, prompt=PROMPTS[1]))
    assert b["choices"][0]["token_ids"] == base[1]


def test_a_stop_string_ends_with_stop(steer_server):
    """Find a greedy generation whose first two bytes are distinct printable ASCII characters; the
    second as a stop string leaves the first as the whole text."""
    for n in range(40):
        p = [1, 3 + 65 + n % 26, 3 + 97 + n // 26 % 26, 3 + 48 + n % 10]
        ids = steer_server.complete(greedy(2, prompt=p))["choices"][0]["token_ids"]
        b = [t - 3 for t in ids]
        if all(0x20 <= x < 0x7F for x in b) and b[0] != b[1]:
            break
    else:
        pytest.fail("no prompt starts its generation with two printable ASCII bytes")
    stop = chr(b[1])
    r = steer_server.complete(greedy(16, prompt=p, stop=stop))
    assert r["choices"][0]["finish_reason"] == "stop"
    assert r["choices"][0]["text"] == chr(b[0])
    status, events, done = stream(steer_server, "/v1/completions", greedy(16, prompt=p, stop=[stop, "zzzz"], stream=True))
    assert status == 200 and done
    assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == chr(b[0])
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
