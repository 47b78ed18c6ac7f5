"""Generation throughput of tiller-llama-server against llama.cpp's own llama-server.

A random llama-architecture decoder (examples/llama-cpp/convert.py) large enough that its own
compute dominates, 32 concurrent streams, greedy decoding with `ignore_eos`, fixed prompt lengths
and `max_tokens`. Four configurations, each its own server process with the same threads, slots,
context and batch size:

  upstream   llama.cpp's `llama-server`, built from the same pinned sources (bench/upstream.sh)
  plain      tiller-llama-server with no Tiller config
  monitor    a 16x SAE at one layer, a monitor on 64 of its features (action "flag"), no steering
  profiles   the monitor, plus 32 profiles (one `add` or `clamp` rule each on a different feature)
             in the config, every stream sending its own `tiller_profile`

Measured per run: generated tokens/s (all streams' generated tokens over the wall time from the
first request to the last answer's end) and the 99th percentile of inter-token latency, client
side, from SSE chunk arrival times. Servers send several tokens in one chunk when a byte token
leaves an incomplete UTF-8 character (llama-server holds it back); such a chunk counts as that many
intervals of an equal share of its gap, so that both servers are judged on their decode pace. The
token counts come from `timings.predicted_n` (llama-server, `timings_per_token`) or `token_ids`
(tiller-llama-server, `return_token_ids`), and the totals from `usage`.

Runs alternate the configurations (forwards, then backwards) to spread the machine's noise; each
run starts a fresh server, warms it up with a short request per slot (a monitoring server until
its FVU worker has measured once, which builds that worker's ONNX Runtime session), then
measures. The table gives the median over runs (and min-max), the ratio against the
configuration's reference and whether the target holds. Below it, the machine's floor: the model's FLOPs per generated token
against a float32 matmul measured with NumPy on the same number of threads. NumPy's BLAS picks the
widest vector unit the CPU has; llama.cpp here is built with GGML_NATIVE off (AVX2 at most), so on
a machine with AVX-512 its share of that peak is bounded well below 100%.

llama-server runs with the KV cache shared between its slots (`--kv-unified`), as
tiller-llama-server's context does (llama_host.c); `--upstream-split-kv` gives its own default.

    .venv/bin/python examples/llama-server/bench/bench.py                      # all four, 5 runs each
    .venv/bin/python examples/llama-server/bench/bench.py --configs plain,monitor --runs 1 --max-tokens 16

The model, SAE and configs are written once into `--work` (target/bench-llama-server/<sizes>).
The SAE is imported with `tiller-export` ($TILLER_EXPORT, default target/debug/tiller-export).
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
LLAMA_CPP = REPO / "examples" / "llama-cpp"
sys.path.insert(0, str(LLAMA_CPP))

import convert  # noqa: E402

CONFIGS = ("upstream", "plain", "monitor", "profiles")
# The reference each configuration is judged against, and the least ratio of tokens/s it must reach.
TARGETS = {"plain": ("upstream", 0.95), "monitor": ("plain", 0.97), "profiles": ("monitor", 0.95)}
LABELS = {
    "upstream": "llama.cpp llama-server",
    "plain": "tiller-llama-server, no config",
    "monitor": "+ monitor (64 features)",
    "profiles": "+ 32 profiles, one per stream",
}
BOS = 1
BYTE0 = 3  # the tiny decoder's vocabulary: <unk>, <s>, </s>, then one token per byte value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    p.add_argument("--runs", type=int, default=5, help="runs per configuration (alternating)")
    p.add_argument("--streams", type=int, default=32, help="concurrent streams, and the servers' slots")
    p.add_argument("--prompt-tokens", type=int, default=32, help="prompt length in tokens (BOS included)")
    p.add_argument("--max-tokens", type=int, default=128, help="generated tokens per stream")
    p.add_argument("--warmup-tokens", type=int, default=4, help="generated tokens per stream in the warm-up")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="the servers' threads (and the matmul's)")
    p.add_argument("--batch", type=int, default=512, help="n_batch = n_ubatch of both servers")
    p.add_argument("--ctx-per-seq", type=int, default=0,
                   help="context per sequence (default: prompt + max tokens + 16, rounded up to 256)")
    p.add_argument("--seed", type=int, default=1,
                   help="the model's seed (the SAE's and the prompts' derive from it)")
    p.add_argument("--n-embd", type=int, default=1024)
    p.add_argument("--n-layer", type=int, default=8)
    p.add_argument("--n-head", type=int, default=16)
    p.add_argument("--n-head-kv", type=int, default=4)
    p.add_argument("--n-ff", type=int, default=2816)
    p.add_argument("--sae-mult", type=int, default=16, help="d_sae = this x n_embd")
    p.add_argument("--layer", type=int, default=4, help="the hooked layer (hook blk.N)")
    p.add_argument("--monitored", type=int, default=64, help="features the monitor watches")
    p.add_argument("--threshold", type=float, default=6.0,
                   help="the monitor's threshold; with the default model and SAE, a watched feature "
                        "is over 6 at a few percent of the generated tokens")
    p.add_argument("--strength", type=float, default=0.25, help="the profiles' add strength and clamp value")
    p.add_argument("--fvu-sample-rate", type=float, default=None,
                   help="the config's fvu_sample_rate (default: the runtime's own, 0.01)")
    p.add_argument("--work", type=Path, default=None, help="where the model, SAE and configs are written")
    p.add_argument("--server", type=Path, default=REPO / "target" / "release" / "tiller-llama-server")
    p.add_argument("--lib", type=Path, default=None,
                   help="libtiller_llama_host.so, passed as the server's --lib")
    p.add_argument("--upstream", type=Path, default=None,
                   help="llama-server (default: what bench/upstream.sh prints)")
    p.add_argument("--upstream-split-kv", action="store_true",
                   help="run llama-server with its own per-slot KV cache instead of the unified one "
                        "tiller-llama-server's context uses")
    p.add_argument("--keep-logs", action="store_true", help="keep every server's log in the work folder")
    a = p.parse_args(argv)
    a.configs = [c.strip() for c in a.configs.split(",") if c.strip()]
    for c in a.configs:
        if c not in CONFIGS:
            p.error(f"--configs: unknown configuration {c!r} (known: {', '.join(CONFIGS)})")
    if a.streams < 1 or a.runs < 1 or a.max_tokens < 2 or a.prompt_tokens < 2:
        p.error("--streams and --runs must be at least 1, --max-tokens and --prompt-tokens at least 2")
    if a.monitored + a.streams > a.sae_mult * a.n_embd:
        p.error("the SAE is too small for the monitored and steered features")
    if not a.ctx_per_seq:
        a.ctx_per_seq = -(-(a.prompt_tokens + a.max_tokens + 16) // 256) * 256
    return a


# ---------------------------------------------------------------------------------------------
# The work folder: model, SAE, configs.


def hparams(a):
    hp = dict(convert.TINY_LLAMA)
    hp.update(n_embd=a.n_embd, n_layer=a.n_layer, n_head=a.n_head, n_head_kv=a.n_head_kv, n_ff=a.n_ff)
    return hp


def work_root(a) -> Path:
    if a.work is not None:
        return a.work
    target = Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target")
    if not target.is_absolute():
        target = REPO / target
    return target / "bench-llama-server"


def model_dir(a) -> Path:
    """The model's folder, named by its sizes; it holds the SAEs of its layers too."""
    return work_root(a) / (f"llama-s{a.seed}-e{a.n_embd}-l{a.n_layer}-h{a.n_head}-kv{a.n_head_kv}"
                           f"-ff{a.n_ff}")


def sae_name(a) -> str:
    return f"sae-{a.n_embd}x{a.sae_mult * a.n_embd}-L{a.layer}"


def run_dir(a) -> Path:
    """The configs and logs, named by what the configs hold."""
    fvu = "" if a.fvu_sample_rate is None else f"-fvu{a.fvu_sample_rate:g}"
    return model_dir(a) / (f"{sae_name(a)}-m{a.monitored}-p{a.streams}-t{a.threshold:g}"
                           f"-s{a.strength:g}{fvu}")


def features(a):
    """The monitored features and, disjoint from them, one steered feature per stream."""
    rng = np.random.default_rng(a.seed + 2)
    picked = rng.choice(a.sae_mult * a.n_embd, size=a.monitored + a.streams, replace=False)
    return sorted(int(f) for f in picked[: a.monitored]), [int(f) for f in picked[a.monitored:]]


def config_text(a, with_profiles: bool) -> str:
    monitored, steered = features(a)
    lines = [
        "[runtime]",
        "threads = 1",
        *([f"fvu_sample_rate = {a.fvu_sample_rate!r}"] if a.fvu_sample_rate is not None else []),
        "",
        "[[dictionary]]",
        'name = "sae"',
        f'path = "../{sae_name(a)}/sae.onnx"',
        "",
        "[[monitor]]",
        'name = "watch"',
        'dictionary = "sae"',
        f"features = [{', '.join(map(str, monitored))}]",
        f"threshold = {a.threshold!r}",
        'window = "token"',
        'action = "flag"',
    ]
    if with_profiles:
        for i, f in enumerate(steered):
            lines += ["", "[[profile]]", f'name = "p{i}"', "[[profile.steer]]", f'name = "p{i}"',
                      'dictionary = "sae"', f"feature = {f}"]
            if i % 2 == 0:
                lines += ['op = "add"', f"strength = {a.strength!r}"]
            else:
                lines += ['op = "clamp"', f"value = {a.strength!r}"]
    return "\n".join(lines) + "\n"


def prepare(a) -> Path:
    """Writes the model and (when a configuration needs it) the SAE once; later calls with the same
    sizes reuse them. The configs are small and written every time. Returns the run's folder."""
    m = model_dir(a)
    m.mkdir(parents=True, exist_ok=True)
    if not (m / "model.ready").is_file():
        print(f"writing {m / 'model.gguf'}", file=sys.stderr)
        convert.convert_tiny_llama(a.seed, m / "model.gguf", hp=hparams(a))
        (m / "model.ready").touch()
    sae = m / sae_name(a)
    if any(c in ("monitor", "profiles") for c in a.configs) and not (sae / "ready").is_file():
        print(f"writing {sae / 'sae.onnx'}", file=sys.stderr)
        sae.mkdir(exist_ok=True)
        write_sae(a, sae)
        (sae / "ready").touch()
    d = run_dir(a)
    (d / "logs").mkdir(parents=True, exist_ok=True)
    (d / "monitor.toml").write_text(config_text(a, with_profiles=False))
    (d / "profiles.toml").write_text(config_text(a, with_profiles=True))
    return d


def write_sae(a, d: Path) -> None:
    export = Path(os.environ.get("TILLER_EXPORT") or REPO / "target" / "debug" / "tiller-export")
    if not export.is_file():
        sys.exit(f"bench.py: {export} is missing (cargo build -p tiller-export, or set TILLER_EXPORT)")
    os.environ["TILLER_EXPORT"] = str(export)
    path = REPO / "python" / "tests" / "conftest.py"
    spec = importlib.util.spec_from_file_location("tiller_python_test_fixtures", path)
    fixtures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fixtures)
    # Unit decoder rows and the encoder their transpose: f_i = relu(w_i . x), no bias.
    fixtures.unit_row_sae(d, a.n_embd, a.sae_mult * a.n_embd, f"blk.{a.layer}", 0.0, seed=a.seed + 1)
    shutil.rmtree(d / "ckpt")  # the SAELens checkpoint the import read


# ---------------------------------------------------------------------------------------------
# Servers.


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One server process; `body` holds the fields its requests add to the common ones."""

    def __init__(self, name, cmd, log: Path, body, ready):
        self.name, self.cmd, self.log, self.body, self._ready = name, cmd, log, body, ready
        self.proc = None
        self.host, self.port = "127.0.0.1", None

    def start(self, timeout=600.0):
        self.log_file = open(self.log, "wb")
        self.proc = subprocess.Popen(self.cmd, stdout=self.log_file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before it was ready:\n"
                                   f"{self.tail()}")
            if self._ready(self):
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} was not ready after {timeout:.0f} s:\n{self.tail()}")

    def stop(self):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()
        self.proc = None

    def tail(self, n=30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def listening_line(server: Server) -> bool:
    m = re.search(r"listening on http://([^\s/]+):(\d+)", server.log.read_text(errors="replace"))
    if m:
        server.host, server.port = m.group(1), int(m.group(2))
    return m is not None


def health_ok(server: Server) -> bool:
    try:
        c = http.client.HTTPConnection(server.host, server.port, timeout=2)
        c.request("GET", "/health")
        ok = c.getresponse().status == 200
        c.close()
        return ok
    except OSError:
        return False


def upstream_binary(a) -> Path:
    if a.upstream is not None:
        return a.upstream
    r = subprocess.run([str(HERE / "upstream.sh")], stdout=subprocess.PIPE, text=True)
    if r.returncode != 0:
        sys.exit("bench.py: bench/upstream.sh failed (see above)")
    return Path(r.stdout.strip().splitlines()[-1])


def make_server(a, name: str, d: Path) -> Server:
    """The server of configuration `name`; `d` is the run's folder (prepare)."""
    log = d / "logs" / f"{name}.log"
    model = model_dir(a) / "model.gguf"
    if name == "upstream":
        port = free_port()
        cmd = [str(upstream_binary(a)), "-m", str(model), "--host", "127.0.0.1",
               "--port", str(port), "-np", str(a.streams), "-c", str(a.ctx_per_seq * a.streams),
               "-t", str(a.threads), "-tb", str(a.threads), "-b", str(a.batch), "-ub", str(a.batch),
               "--cont-batching", "--no-warmup",
               # No prompt cache in host memory (tiller-llama-server keeps none either).
               "--cache-ram", "0", "--no-context-shift", "--alias", "bench"]
        if not a.upstream_split_kv:
            # tiller-llama-server's context shares its cells between sequences (llama_host.c).
            cmd.append("--kv-unified")
        s = Server(name, cmd, log, {"timings_per_token": True}, health_ok)
        s.port = port
        return s
    cmd = [str(a.server), "--model", str(model), "--listen", "127.0.0.1:0",
           "--parallel", str(a.streams), "--ctx-size", str(a.ctx_per_seq), "--threads", str(a.threads),
           "--batch", str(a.batch), "--queue", str(max(64, 2 * a.streams)), "--model-alias", "bench"]
    if a.lib is not None:
        cmd += ["--lib", str(a.lib)]
    if name in ("monitor", "profiles"):
        cmd += ["--config", str(d / f"{name}.toml"), "--layer", str(a.layer)]
    return Server(name, cmd, log, {"return_token_ids": True}, listening_line)


# ---------------------------------------------------------------------------------------------
# Streams.


def prompts(a, salt: int):
    """One prompt per stream, new for every run (no server can reuse a cached prefix): BOS, then
    printable ASCII byte tokens."""
    rng = np.random.default_rng([a.seed, salt])
    return [[BOS] + [BYTE0 + int(b) for b in rng.integers(0x20, 0x7F, a.prompt_tokens - 1)]
            for _ in range(a.streams)]


def stream(server: Server, body: dict, start: threading.Barrier, out: dict):
    """One streamed completion; records each SSE data line with its arrival time."""
    payload = json.dumps(body).encode()
    conn = http.client.HTTPConnection(server.host, server.port, timeout=600)
    try:
        conn.connect()
        start.wait()
        out["t0"] = time.perf_counter()
        conn.request("POST", "/v1/completions", body=payload,
                     headers={"Content-Type": "application/json", "Accept": "text/event-stream"})
        r = conn.getresponse()
        if r.status != 200:
            out["error"] = f"HTTP {r.status}: {r.read()[:2000].decode(errors='replace')}"
            return
        lines = []
        while True:
            line = r.readline()
            if not line:
                break
            if line.startswith(b"data:"):
                t = time.perf_counter()
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                lines.append((t, data))
        out["end"] = time.perf_counter()
        out["lines"] = lines
    except Exception as e:  # noqa: BLE001 -- reported with the run
        out["error"] = f"{type(e).__name__}: {e}"
        try:
            start.abort()
        except threading.BrokenBarrierError:
            pass
    finally:
        conn.close()


def tokens_of(lines):
    """(arrival time, tokens in the chunk) per chunk, the generated tokens from `usage`, and the
    request's Tiller summary (the `tiller` object of the chunk with `finish_reason`; None without).

    The tokens come from `timings.predicted_n` when the server sends it, else from `token_ids`
    (a chunk without them, such as text held back for an incomplete UTF-8 character and sent at
    the end, carries none), else one per chunk with text."""
    parsed = [(t, json.loads(data)) for t, data in lines]
    choice = [(j.get("choices") or [{}])[0] for _, j in parsed]
    by_timings = any("predicted_n" in (j.get("timings") or {}) for _, j in parsed)
    by_ids = any(c.get("token_ids") is not None for c in choice)
    chunks, usage, predicted, summary = [], None, 0, None
    for (t, j), c in zip(parsed, choice):
        if j.get("usage"):
            usage = j["usage"].get("completion_tokens", usage)
        if c.get("finish_reason") is not None and isinstance(j.get("tiller"), dict):
            summary = j["tiller"]
        if by_timings:
            n = (j.get("timings") or {}).get("predicted_n", predicted)
            k, predicted = n - predicted, n
        elif by_ids:
            k = len(c.get("token_ids") or [])
        else:
            k = 1 if c.get("text") else 0
        if k > 0:
            chunks.append((t, k))
    return chunks, usage, summary


def run_once(a, server: Server, max_tokens: int, salt: int, profiles: bool):
    """All streams at once; returns (generated tokens, window seconds, inter-token intervals,
    monitor events)."""
    outs = [dict() for _ in range(a.streams)]
    start = threading.Barrier(a.streams + 1)
    threads = []
    for i, p in enumerate(prompts(a, salt)):
        body = {"model": "bench", "prompt": p, "max_tokens": max_tokens, "temperature": 0.0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
                **server.body}
        if profiles:
            body["tiller_profile"] = f"p{i}"
        th = threading.Thread(target=stream, args=(server, body, start, outs[i]), daemon=True)
        th.start()
        threads.append(th)
    try:
        start.wait()
    except threading.BrokenBarrierError:
        pass
    t0 = time.perf_counter()
    for th in threads:
        th.join()
    errors = [o["error"] for o in outs if "error" in o]
    if errors:
        raise RuntimeError(f"{server.name}: {len(errors)} of {a.streams} streams failed; first: {errors[0]}")
    total, itl, events = 0, [], 0
    for i, o in enumerate(outs):
        chunks, usage, summary = tokens_of(o["lines"])
        if summary is not None:
            events += len(summary.get("events") or [])
        elif server.name in ("monitor", "profiles"):
            raise RuntimeError(f"{server.name}: stream {i} ended without a Tiller summary")
        if profiles and (summary is None or summary.get("profile") != f"p{i}"
                         or not any((summary.get("steering") or {}).values())):
            raise RuntimeError(f"{server.name}: stream {i} was not steered by profile p{i}: {summary}")
        n = sum(k for _, k in chunks)
        if usage is not None and usage != n:
            print(f"  note: {server.name}: usage says {usage} tokens, the chunks {n}", file=sys.stderr)
        total += usage if usage is not None else n
        for (t1, _), (t2, k) in zip(chunks, chunks[1:]):
            itl += [(t2 - t1) / k] * k
    window = max(o["end"] for o in outs) - t0
    return total, window, itl, events


# ---------------------------------------------------------------------------------------------
# The machine's floor.


def model_flops_per_token(a) -> tuple[float, float]:
    """(matmul parameters x 2, attention FLOPs at the mean context), per generated token. The token
    embedding is a lookup, not a matmul; norms and activations are left out."""
    d, ff, L = a.n_embd, a.n_ff, a.n_layer
    d_kv = d // a.n_head * a.n_head_kv
    params = L * (2 * d * d + 2 * d * d_kv + 3 * d * ff) + convert.TINY_LLAMA["n_vocab"] * d
    mean_ctx = a.prompt_tokens + a.max_tokens / 2
    return 2.0 * params, 4.0 * L * d * mean_ctx


MATMUL = r"""
import sys, time, numpy as np
m, k, n = map(int, sys.argv[1:4])
rng = np.random.default_rng(0)
x = rng.standard_normal((m, k), dtype=np.float32)
w = rng.standard_normal((k, n), dtype=np.float32)
x @ w
reps, t = 1, 0.0
while True:
    t0 = time.perf_counter()
    for _ in range(reps):
        x @ w
    t = time.perf_counter() - t0
    if t > 1.0:
        break
    reps *= 2
print(2.0 * m * k * n * reps / t)
"""


def matmul_flops(threads: int, m: int, k: int, n: int) -> float:
    """float32 GEMM FLOP/s with NumPy's BLAS on `threads` threads (a fresh process, so the BLAS
    reads its thread count)."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    r = subprocess.run([sys.executable, "-c", MATMUL, str(m), str(k), str(n)], env=env,
                       stdout=subprocess.PIPE, text=True, check=True)
    return float(r.stdout.strip())


# ---------------------------------------------------------------------------------------------
# Main.


def fvu_measured(server: Server) -> float:
    """The runtime's count of tokens its FVU worker has measured (0 before the first measurement)."""
    c = http.client.HTTPConnection(server.host, server.port, timeout=30)
    try:
        c.request("GET", "/metrics")
        text = c.getresponse().read().decode()
    finally:
        c.close()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("tiller_fvu_samples_total{") and 'result="measured"' in line)


def warm_fvu(a, server: Server, name: str, r: int) -> None:
    """Warms a monitoring server up until its FVU worker has measured once: the first measurement
    also builds the dictionary's full ONNX Runtime session (a few hundred ms of one core), a cost a
    server pays once in its life, which a run of a few seconds would otherwise count."""
    if name not in ("monitor", "profiles") or a.fvu_sample_rate == 0:
        return
    for k in range(20):
        if fvu_measured(server) > 0:
            return
        run_once(a, server, a.warmup_tokens, salt=2_000_000 + 100 * r + k, profiles=name == "profiles")
    raise RuntimeError(f"{name}: the FVU worker measured nothing during 20 warm-up rounds")


def main(argv=None):
    a = parse_args(argv)
    d = prepare(a)
    if any(c != "upstream" for c in a.configs) and not a.server.is_file():
        sys.exit(f"bench.py: {a.server} is missing (build tiller-llama-server, or give --server)")
    if "upstream" in a.configs and a.upstream is None:
        a.upstream = upstream_binary(a)

    results = {c: [] for c in a.configs}  # (tokens/s, itl p99 s, tokens, window s)
    for r in range(a.runs):
        order = a.configs if r % 2 == 0 else list(reversed(a.configs))
        for name in order:
            s = make_server(a, name, d)
            try:
                s.start()
                run_once(a, s, a.warmup_tokens, salt=1_000_000 + r, profiles=name == "profiles")
                warm_fvu(a, s, name, r)
                tokens, window, itl, events = run_once(a, s, a.max_tokens, salt=r,
                                                       profiles=name == "profiles")
            except RuntimeError as e:
                s.stop()
                sys.exit(f"bench.py: {e}\n--- {s.log} ---\n{s.tail()}")
            s.stop()
            p99 = float(np.percentile(itl, 99)) if itl else float("nan")
            results[name].append((tokens / window, p99, tokens, window))
            print(f"run {r + 1}/{a.runs} {name:9s} {tokens:6d} tokens in {window:7.2f} s: "
                  f"{tokens / window:8.1f} tok/s, inter-token p99 {1e3 * p99:7.1f} ms"
                  + (f", {events} monitor events" if name in ("monitor", "profiles") else ""),
                  file=sys.stderr)
            if not a.keep_logs:
                s.log.unlink(missing_ok=True)

    dense, attn = model_flops_per_token(a)
    mm_decode = matmul_flops(a.threads, a.streams, a.n_embd, a.n_ff)
    mm_square = matmul_flops(a.threads, 2048, 2048, 2048)
    peak = max(mm_decode, mm_square)

    med = {c: statistics.median(x[0] for x in v) for c, v in results.items()}
    print()
    print(f"{a.streams} streams, prompts of {a.prompt_tokens} tokens, {a.max_tokens} generated each "
          f"(greedy, ignore_eos), {a.threads} threads, batch {a.batch}, {a.ctx_per_seq} cells per "
          f"sequence; model n_embd {a.n_embd}, {a.n_layer} layers, {a.n_head}/{a.n_head_kv} heads, "
          f"n_ff {a.n_ff}; SAE {a.n_embd} x {a.sae_mult * a.n_embd} on blk.{a.layer}; "
          f"{a.runs} run(s) each, median (min-max).")
    print()
    print("| configuration | generated tok/s | inter-token p99 ms | of matmul peak | ratio | target |")
    print("| --- | --- | --- | --- | --- | --- |")
    for c in a.configs:
        v = results[c]
        tps = [x[0] for x in v]
        p99 = statistics.median(x[1] for x in v) * 1e3
        flops = med[c] * (dense + attn)
        ratio, target = "", ""
        if c in TARGETS:
            ref, least = TARGETS[c]
            if ref in med:
                q = med[c] / med[ref]
                ratio = f"{q:.3f} of {ref}"
                target = f"≥ {least:.2f}: {'holds' if q >= least else 'misses'}"
        print(f"| {c}: {LABELS[c]} | {med[c]:.1f} ({min(tps):.1f}–{max(tps):.1f}) | {p99:.1f} | "
              f"{100 * flops / peak:.0f}% | {ratio} | {target} |")
    print()
    print(f"Floor: {dense / 1e6:.1f} MFLOP of matmuls per generated token (2 x {dense / 2e6:.1f} M "
          f"parameters) plus {attn / 1e6:.1f} MFLOP of attention at the mean context. NumPy float32 "
          f"matmul on {a.threads} threads: {mm_decode / 1e9:.1f} GFLOP/s at the decode shape "
          f"({a.streams} x {a.n_embd} @ {a.n_embd} x {a.n_ff}), {mm_square / 1e9:.1f} GFLOP/s at "
          f"2048^3; the peak bounds generation at {peak / (dense + attn):.0f} tok/s.")


if __name__ == "__main__":
    main()
