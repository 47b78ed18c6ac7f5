"""Shared set-up for the end-to-end tests of `tiller-llama-server` (docs/integrations/llama-server.md).

The server binary comes from `$TILLER_LLAMA_SERVER` (required), the host library from
`$TILLER_LLAMA_HOST_LIB` when set (given as `--lib`). The model is the seeded tiny llama decoder of
examples/llama-cpp/convert.py, whose float64 reference (examples/llama-cpp/reference.py) predicts
its logits; the dictionary is a 64 -> 16 ReLU SAE on `blk.0` with unit decoder rows
(python/tests/conftest.py), so that an `add` of strength s on feature f moves the residual after
layer 0 by exactly s * W_dec[f].

Servers are started with `--listen 127.0.0.1:0` and found by the `listening on http://ADDR` line
they print; each test module starts the ones it needs, and they are stopped when it ends.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2
import numpy as np
import openai
import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
LLAMA_CPP = REPO / "examples" / "llama-cpp"
sys.path.insert(0, str(LLAMA_CPP))

import convert  # noqa: E402
import reference  # noqa: E402


def _python_test_fixtures():
    """python/tests/conftest.py, loaded under its own name: `conftest` is this file's."""
    path = REPO / "python" / "tests" / "conftest.py"
    spec = importlib.util.spec_from_file_location("tiller_python_test_fixtures", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


unit_row_sae = _python_test_fixtures().unit_row_sae

TINY_SEED = 11
LAYER = 0
D_SAE = 16
B_ENC = -0.1
FEATURE = 2
STRENGTH = 1.5
TOKEN = "secret-admin-token"
# The tiny decoder's training context; the servers use it as --ctx-size unless a test needs more.
CTX = 256

# Profiles: `steer` adds feature 2, `other` subtracts feature 5, `third` clamps feature 7. The
# monitor only flags (it edits nothing). Requests may add to the monitor's features that no profile
# steers (0, 1 and 3), with |strength| up to 5.
CONFIG = """
[runtime]
threads = 1
fvu_sample_rate = 0.0

[[dictionary]]
name = "sae"
path = "{sae}"

[[monitor]]
name = "watch"
dictionary = "sae"
features = [0, 1, 2, 3]
threshold = 0.3
window = "token"
action = "flag"

[[profile]]
name = "steer"
[[profile.steer]]
name = "add-2"
dictionary = "sae"
op = "add"
feature = 2
strength = 1.5

[[profile]]
name = "other"
[[profile.steer]]
name = "sub-5"
dictionary = "sae"
op = "add"
feature = 5
strength = -2.0

[[profile]]
name = "third"
[[profile.steer]]
name = "clamp-7"
dictionary = "sae"
op = "clamp"
feature = 7
value = 0.5

[requests]
max_abs_strength = 5.0
"""


# ------------------------------------------------------------------------------------------------
# files
# ------------------------------------------------------------------------------------------------


def server_bin() -> Path:
    env = os.environ.get("TILLER_LLAMA_SERVER")
    if not env:
        pytest.fail(
            "TILLER_LLAMA_SERVER is not set: it must name the tiller-llama-server binary "
            "(the Rust integration test of examples/llama-server sets it)",
            pytrace=False,
        )
    path = Path(env)
    if not path.is_absolute():
        path = Path.cwd() / path
    if not path.is_file():
        pytest.fail(f"TILLER_LLAMA_SERVER={env}: no such file", pytrace=False)
    return path


@pytest.fixture(scope="session")
def binary() -> Path:
    return server_bin()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """(GGUF path, float64 reference weights) of the tiny decoder."""
    d = tmp_path_factory.mktemp("tiny")
    gguf, npz = d / "tiny.gguf", d / "tiny.npz"
    convert.convert_tiny_llama(TINY_SEED, gguf, npz)
    return gguf, reference.load_tiny_llama(npz)


@pytest.fixture(scope="session")
def sae(tmp_path_factory):
    """(path of sae.onnx, W_dec float64 (16, 64)): the dictionary every config reads."""
    d = tmp_path_factory.mktemp("sae")
    return unit_row_sae(d, 64, D_SAE, f"blk.{LAYER}", B_ENC, seed=5)


def write_config(folder: Path, sae_path: Path, text: str = CONFIG, name: str = "tiller.toml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text.replace("{sae}", str(sae_path)))
    return path


@pytest.fixture(scope="session")
def config(tmp_path_factory, sae) -> Path:
    return write_config(tmp_path_factory.mktemp("config"), sae[0])


@pytest.fixture(scope="session")
def token_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("admin") / "token"
    path.write_text(TOKEN + "\n")
    return path


# ------------------------------------------------------------------------------------------------
# the server process
# ------------------------------------------------------------------------------------------------


class Server:
    """A running tiller-llama-server: its URL, an OpenAI client, raw HTTP, metrics, signals."""

    def __init__(self, args: list[str], log: Path):
        cmd = [str(server_bin()), *args, "--listen", "127.0.0.1:0"]
        lib = os.environ.get("TILLER_LLAMA_HOST_LIB")
        if lib:
            cmd += ["--lib", lib]
        self.cmd = cmd
        self.log_path = log
        self._log = open(log, "w")
        self._log.write(" ".join(cmd) + "\n")
        self._log.flush()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, text=True, bufsize=1)
        self.url = None
        ready = threading.Event()

        def read_stdout():
            for line in self.proc.stdout:
                self._log.write(line)
                self._log.flush()
                m = re.search(r"listening on (http://\S+)", line)
                if m and self.url is None:
                    self.url = m.group(1).rstrip("/")
                    ready.set()
            ready.set()

        self._reader = threading.Thread(target=read_stdout, daemon=True)
        self._reader.start()
        ready.wait(120)
        if self.url is None:
            self.kill()
            pytest.fail(f"the server printed no `listening on http://ADDR` line:\n{self.log()}", pytrace=False)
        self.http = httpx2.Client(base_url=self.url, timeout=300)

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def client(self, **kw) -> openai.OpenAI:
        # No retries: a 429 or a 503 is what some tests are looking for.
        return openai.OpenAI(base_url=self.base_url, api_key="none", max_retries=0, timeout=300, **kw)

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        text = self.log_path.read_text(errors="replace")
        return text[-6000:]

    def post(self, path: str, body: dict, **kw) -> httpx2.Response:
        return self.http.post(path, json=body, **kw)

    def complete(self, body: dict, **kw) -> dict:
        """POST /v1/completions, asserting 200; the answer's JSON."""
        r = self.post("/v1/completions", body, **kw)
        assert r.status_code == 200, f"{r.status_code}: {r.text}"
        return r.json()

    def admin(self, action: str, token: str | None = TOKEN) -> httpx2.Response:
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        return self.http.post(f"/admin/{action}", headers=headers)

    def metrics(self) -> str:
        r = self.http.get("/metrics")
        assert r.status_code == 200, r.text
        return r.text

    def metric(self, name: str, **labels) -> float:
        return metric(self.metrics(), name, **labels)

    def gauge(self, name: str) -> float:
        return metric(self.metrics(), name, required=True)

    def wait_metric(self, name: str, value: float, timeout: float = 60, **labels) -> None:
        wait_for(lambda: self.metric(name, **labels) == value, timeout, f"{name}{labels} == {value}", self)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def close(self) -> None:
        """Kills the process (if it still runs); closing twice is harmless."""
        if getattr(self, "http", None) is not None:
            self.http.close()
        self.kill()
        self._reader.join(10)
        self._log.close()


@pytest.fixture(scope="session")
def start_server(tmp_path_factory, binary, tiny):
    """start_server(config=None, *, parallel=4, ctx=CTX, extra=(), model=None) -> Server, stopped at
    the end of the test run (tests that need a fresh server per module close it themselves)."""
    started = []

    def start(config: Path | None = None, *, parallel: int = 4, ctx: int = CTX, extra=(), model=None) -> Server:
        args = ["--model", str(model or tiny[0]), "--threads", "1", "--parallel", str(parallel),
                "--ctx-size", str(ctx)]
        if config is not None:
            args += ["--config", str(config), "--layer", str(LAYER)]
        args += [str(a) for a in extra]
        log = tmp_path_factory.mktemp("server") / "server.log"
        s = Server(args, log)
        started.append(s)
        return s

    yield start
    for s in started:
        s.close()


@pytest.fixture(scope="session")
def steer_server(start_server, config) -> Server:
    """The config above, layer 0, chatml chat template, no admin token: the shared server of the
    API and steering tests. An f32 KV cache, so that its logits are float32 llama.cpp's, within
    the reference tolerance (an f16 cache rounds every key and value to 11 bits)."""
    return start_server(config, extra=["--chat-template", "chatml", "--cache-type", "f32"])


# ------------------------------------------------------------------------------------------------
# answers
# ------------------------------------------------------------------------------------------------


def extra(obj, name: str):
    """A field the OpenAI types do not declare (`tiller`, `token_ids`, ...), which the client keeps."""
    fields = obj.model_extra or {}
    assert name in fields, f"{type(obj).__name__} has no field {name!r}: {obj}"
    return fields[name]


def greedy(max_tokens: int, **fields) -> dict:
    """A completion body for deterministic, full-length generations."""
    body = {"model": "tiny", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    body.update(fields)
    return body


def byte_tokens(text: str) -> list[int]:
    """The tiny vocabulary's tokens for `text` as llama.cpp's SPM tokenizer gives them: <s>, then
    the UTF-8 bytes of the text with a space prefix and spaces as U+2581, each byte at 3 + b."""
    spm = "\u2581" + text.replace(" ", "\u2581")
    return [1] + [3 + b for b in spm.encode()]


def sse(response: httpx2.Response) -> tuple[list[dict], bool]:
    """The `data:` events of a streamed answer, parsed, and whether `data: [DONE]` ended it."""
    events, done = [], False
    for line in response.iter_lines():
        if not line.startswith("data:"):
            continue
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            done = True
            break
        events.append(json.loads(data))
    return events, done


def stream(server: Server, path: str, body: dict) -> tuple[int, list[dict], bool]:
    """A streamed POST read to its end: (status, events, whether [DONE] came)."""
    with server.http.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, [r.json()], False
        events, done = sse(r)
    return 200, events, done


def decode_base64_embedding(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4")


def log_softmax(logits: np.ndarray) -> np.ndarray:
    m = logits.max(-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))


def top_logprobs_by_id(entry: dict) -> dict[int, float]:
    """A completions top_logprobs entry written with return_tokens_as_token_ids: {id: logprob}."""
    out = {}
    for key, value in entry.items():
        assert key.startswith("token_id:"), f"top_logprobs key {key!r} is not token_id:N"
        out[int(key[len("token_id:"):])] = value
    return out


# ------------------------------------------------------------------------------------------------
# metrics and waiting
# ------------------------------------------------------------------------------------------------

_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def samples(text: str):
    """(name, labels, value) for every sample line of Prometheus text."""
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m:
            labels = dict(_LABEL.findall(m.group(2) or ""))
            yield m.group(1), labels, float(m.group(3))


def metric(text: str, name: str, *, required: bool = False, **labels) -> float:
    """The sum of the samples of `name` whose labels include `labels`; 0 when there is none (a
    labelled counter appears only once incremented). `required`: fail when `name` has no sample."""
    found = [(lab, v) for n, lab, v in samples(text) if n == name]
    if required and not found:
        pytest.fail(f"/metrics has no {name}:\n{text[:3000]}", pytrace=False)
    return sum(v for lab, v in found if all(lab.get(k) == str(w) for k, w in labels.items()))


def wait_for(predicate, timeout: float, what: str, server: Server | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    log = f"\nserver log:\n{server.log()}" if server is not None else ""
    pytest.fail(f"waited {timeout} s for {what}{log}", pytrace=False)


def run_paused(server: Server, calls: list) -> list:
    """Runs `calls` (each a function of no arguments that sends one request and returns what it
    got) in a fixed queue order: pause, send them one at a time, each one waiting until the queue
    holds it, resume; returns their results, in the order of `calls`."""
    import concurrent.futures

    r = server.admin("pause")
    assert r.status_code == 200, r.text
    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        futures = []
        for k, call in enumerate(calls):
            futures.append(pool.submit(call))
            server.wait_metric("tiller_server_queue_depth", k + 1, timeout=30)
        # Nothing left the queue while paused.
        assert server.gauge("tiller_server_running_sequences") == 0
        r = server.admin("resume")
        assert r.status_code == 200, r.text
        return [f.result() for f in futures]


def paused_schedule(server: Server, bodies: list[dict], path: str = "/v1/completions") -> list[dict]:
    """The answers (JSON, each asserted 200) of `bodies` run in a fixed queue order (run_paused)."""
    answers = run_paused(server, [lambda b=b: server.post(path, b) for b in bodies])
    for k, r in enumerate(answers):
        assert r.status_code == 200, f"request {k}: {r.status_code} {r.text}"
    return [r.json() for r in answers]
