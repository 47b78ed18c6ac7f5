"""Operations and faults: the admin endpoints, a full queue, a client that goes away, reloads by
SIGHUP and by the endpoint (good and broken files), and SIGTERM with requests in flight.

Long generations (LONG tokens, `ignore_eos`) keep a request running while the test acts on the
server; the tests check that it still was where that matters, so that a faster machine fails
loudly instead of testing nothing.
"""

from __future__ import annotations

import concurrent.futures
import json
import signal
import socket
import threading

import httpx2
import openai
import pytest
from conftest import CONFIG, TOKEN, greedy, stream, wait_for, write_config

LONG = 2000
CTX = 2048
# A generation the disconnect test leaves long before it could end, however fast the machine: the
# faults server's context holds it.
ENDLESS = 60000

FRESH = """
[[profile]]
name = "fresh"
[[profile.steer]]
name = "add-0"
dictionary = "sae"
op = "add"
feature = 0
strength = 2.0
"""

BROKEN = """
[[profile]]
name = "broken"
[[profile.steer]]
dictionary = "missing"
op = "add"
feature = 1
strength = 1.0
"""


@pytest.fixture(scope="module")
def faults(start_server, sae, token_file, tmp_path_factory):
    """A server on its own copy of the config (the reload tests rewrite it), two slots, a queue
    of one, the admin endpoints on."""
    folder = tmp_path_factory.mktemp("faults")
    cfg = write_config(folder, sae[0])
    s = start_server(cfg, parallel=2, ctx=ENDLESS + 16, extra=["--queue", "1", "--admin-token-file", token_file])
    yield s, cfg, sae[0]
    s.close()


def error_of(r: httpx2.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) >= {"message", "type", "param", "code"}, body
    return body["error"]


def test_admin_endpoints_need_the_right_token(faults):
    server, _, _ = faults
    for token in (None, "wrong-token", TOKEN + "x"):
        for action in ("reload", "pause", "resume"):
            r = server.admin(action, token=token)
            assert r.status_code == 401, (action, token, r.text)
            assert error_of(r)["type"] == "invalid_request_error"
    before = server.metric("tiller_server_reloads_total", result="ok")
    r = server.admin("reload")
    assert r.status_code == 200, r.text
    assert server.metric("tiller_server_reloads_total", result="ok") == before + 1
    assert server.admin("pause").status_code == 200
    assert server.admin("resume").status_code == 200


def test_a_full_queue_is_429(faults):
    """Paused, the queue holds one request (--queue 1); the next is refused at once."""
    server, _, _ = faults
    before = server.metric("tiller_server_requests_total", endpoint="completions", status="429")
    assert server.admin("pause").status_code == 200
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            queued = pool.submit(server.post, "/v1/completions", greedy(4, prompt=[1, 72]))
            server.wait_metric("tiller_server_queue_depth", 1, timeout=30)
            r = server.post("/v1/completions", greedy(4, prompt=[1, 73]))
            assert r.status_code == 429, r.text
            assert r.headers.get("retry-after") == "1"
            err = error_of(r)
            assert err["type"] == "rate_limit_error" and err["code"] == "queue_full"
            with pytest.raises(openai.RateLimitError) as info:
                server.client().completions.create(model="tiny", prompt="x", max_tokens=2)
            assert info.value.code == "queue_full"
            assert server.gauge("tiller_server_queue_depth") == 1
            assert server.admin("resume").status_code == 200
            done = queued.result()
            assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 4
    finally:
        server.admin("resume")
    assert server.metric("tiller_server_requests_total", endpoint="completions", status="429") == before + 2


def test_a_client_that_goes_away_frees_its_sequence(faults):
    server, _, _ = faults
    before = server.metric("tiller_server_finished_total", endpoint="completions", finish_reason="disconnected")
    with httpx2.Client(base_url=server.url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=greedy(ENDLESS, prompt=[1, 72, 105], stream=True)) as r:
            assert r.status_code == 200
            # The line iterator is kept until the client leaves: dropping it (as a `break` out of a
            # for loop does) closes the connection at once.
            lines = r.iter_lines()
            seen = []
            while len(seen) < 3:
                line = next(lines)
                if line.startswith("data:"):
                    seen.append(line)
            assert server.gauge("tiller_server_running_sequences") == 1, (
                f"the generation ended before the client left: {seen}\n{server.log()}")
            lines.close()
    server.wait_metric("tiller_server_finished_total", before + 1, endpoint="completions", finish_reason="disconnected")
    server.wait_metric("tiller_server_running_sequences", 0)
    # The server goes on serving.
    r = server.complete(greedy(3, prompt=[1, 72]))
    assert r["choices"][0]["finish_reason"] == "length"


def long_stream(server, **fields):
    body = greedy(LONG, prompt=[1, 76, 111, 110, 103], stream=True, stream_options={"include_usage": True}, **fields)
    result = {}

    def run():
        result["status"], result["events"], result["done"] = stream(server, "/v1/completions", body)

    t = threading.Thread(target=run)
    t.start()
    return t, result


def finish_and_usage(result) -> tuple[dict, dict]:
    events = result["events"]
    assert result["status"] == 200 and result["done"], events[-1:]
    last = [e for e in events if e["choices"] and e["choices"][0]["finish_reason"] is not None]
    assert len(last) == 1
    return last[0], next(e["usage"] for e in reversed(events) if e.get("usage"))


def test_sighup_reloads_and_a_running_request_keeps_its_profile(faults):
    server, cfg, sae_path = faults
    fresh = greedy(3, prompt=[1, 72], tiller_profile="fresh")
    r = server.post("/v1/completions", fresh)
    assert r.status_code == 400 and error_of(r)["code"] == "tiller_profile_unknown"
    ok = server.metric("tiller_server_reloads_total", result="ok")

    t, result = long_stream(server, tiller_profile="steer")
    server.wait_metric("tiller_server_running_sequences", 1)
    write_config(cfg.parent, sae_path, CONFIG + FRESH)
    server.signal(signal.SIGHUP)
    server.wait_metric("tiller_server_reloads_total", ok + 1, result="ok")
    assert server.gauge("tiller_server_running_sequences") == 1, "the long request ended before the reload"
    # The new profile serves beside the running request.
    a = server.complete(fresh)
    assert a["tiller"]["profile"] == "fresh"
    assert a["tiller"]["steering"] == {"add-0": a["tiller"]["tokens"]}
    t.join(300)
    last, usage = finish_and_usage(result)
    assert last["choices"][0]["finish_reason"] == "length" and usage["completion_tokens"] == LONG
    # Kept by name through the reload: every token was steered by `steer`.
    assert last["tiller"]["profile"] == "steer"
    assert last["tiller"]["steering"] == {"add-2": last["tiller"]["tokens"]}

    # A broken file is refused; the running config keeps serving.
    write_config(cfg.parent, sae_path, CONFIG + FRESH + BROKEN)
    server.signal(signal.SIGHUP)
    server.wait_metric("tiller_server_reloads_total", 1, result="error")
    assert "missing" in server.log()
    assert server.metric("tiller_server_reloads_total", result="ok") == ok + 1
    assert server.complete(fresh)["tiller"]["profile"] == "fresh"
    r = server.post("/v1/completions", greedy(3, prompt=[1, 72], tiller_profile="broken"))
    assert r.status_code == 400 and error_of(r)["code"] == "tiller_profile_unknown"
    write_config(cfg.parent, sae_path, CONFIG + FRESH)


def test_the_reload_endpoint(faults):
    server, cfg, sae_path = faults
    errors = server.metric("tiller_server_reloads_total", result="error")
    ok = server.metric("tiller_server_reloads_total", result="ok")
    write_config(cfg.parent, sae_path, CONFIG + BROKEN)
    r = server.admin("reload")
    assert r.status_code == 400
    err = error_of(r)
    assert err["type"] == "invalid_request_error" and "missing" in err["message"]
    assert server.metric("tiller_server_reloads_total", result="error") == errors + 1
    assert server.complete(greedy(2, prompt=[1, 72], tiller_profile="fresh"))["tiller"]["profile"] == "fresh"
    # A good file: `fresh` is gone, `steer` serves.
    write_config(cfg.parent, sae_path, CONFIG)
    r = server.admin("reload")
    assert r.status_code == 200, r.text
    assert server.metric("tiller_server_reloads_total", result="ok") == ok + 1
    r = server.post("/v1/completions", greedy(2, prompt=[1, 72], tiller_profile="fresh"))
    assert r.status_code == 400 and error_of(r)["code"] == "tiller_profile_unknown"
    assert server.complete(greedy(2, prompt=[1, 72], tiller_profile="steer"))["tiller"]["profile"] == "steer"


class RawConnection:
    """One HTTP/1.1 connection by hand, so that a request goes over exactly this socket (a client
    library would quietly open a new one when the server has closed it)."""

    def __init__(self, url: str):
        host, port = url.removeprefix("http://").rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=30)
        self.buf = b""

    def request(self, method: str, path: str, body: dict | None = None):
        """(status, headers, body bytes), or None when the server closed the connection."""
        data = b"" if body is None else json.dumps(body).encode()
        head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
        try:
            self.sock.sendall(head.encode() + data)
            while b"\r\n\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return None
                self.buf += chunk
        except (ConnectionResetError, BrokenPipeError):
            return None
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        n = int(headers.get("content-length", "0"))
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buf += chunk
        content, self.buf = self.buf[:n], self.buf[n:]
        return status, headers, content

    def close(self):
        self.sock.close()


def test_sigterm_drains_then_exits(start_server):
    """One slot: one request running, one queued, when SIGTERM comes. Both finish in full, and the
    process exits 0. Meanwhile new connections are refused (or answered 503), and an idle connection
    opened before the signal is closed or, when a request still reaches the server on it, answered
    503 `draining`: never served."""
    server = start_server(None, parallel=1, ctx=CTX)
    opened = [RawConnection(server.url), RawConnection(server.url)]
    for c in opened:
        assert c.request("GET", "/healthz")[0] == 200
    runs = [long_stream(server), long_stream(server)]
    server.wait_metric("tiller_server_running_sequences", 1)
    server.wait_metric("tiller_server_queue_depth", 1)
    server.signal(signal.SIGTERM)

    # The signal is handled asynchronously: wait until a new connection is no longer served.
    new_connection = []

    def draining():
        try:
            r = httpx2.post(server.url + "/v1/completions", json=greedy(2, prompt=[1, 72]), timeout=30)
        except httpx2.TransportError as e:
            new_connection.append(type(e).__name__)
            return True
        if r.status_code == 200:
            return False
        new_connection.append(r.status_code)
        assert r.status_code == 503 and error_of(r)["code"] == "draining"
        return True

    wait_for(draining, 30, "the server to start draining", server)
    health = opened[0].request("GET", "/healthz")
    completion = opened[1].request("POST", "/v1/completions", greedy(2, prompt=[1, 72]))
    still_running = server.proc.poll() is None
    print(f"during the drain: a new connection got {new_connection[-1]}; on connections opened before, "
          f"/healthz got {health and health[:2]}, a completion {completion and completion[:2]}")
    assert still_running, "the server exited before the drain could be observed: make LONG longer"

    for t, result in runs:
        t.join(300)
        last, usage = finish_and_usage(result)
        assert last["choices"][0]["finish_reason"] == "length"
        assert usage["completion_tokens"] == LONG
    assert server.proc.wait(120) == 0
    for c in opened:
        c.close()
    server.close()

    if health is not None:
        assert health[0] == 503 and json.loads(health[2]) == {"status": "draining"}
    if completion is not None:
        status, headers, content = completion
        assert status == 503 and headers.get("retry-after") == "5"
        err = json.loads(content)["error"]
        assert err["type"] == "server_error" and err["code"] == "draining"
