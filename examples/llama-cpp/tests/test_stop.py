"""A stop is a stop: a sequence whose request a monitor stops generates nothing after the decode
that stopped it, from C (`tiller-llama-run`, over `tiller_llama_seq_stopped`) and from Python
(`tiller_llama.Adapter`), while the other sequence of the batch generates its full length.

The monitor (`action = "stop"`, token window, generated tokens) reads one feature of a ReLU SAE on
layer 0 of the seeded tiny decoder. Where it fires is predicted independently: the float64
reference decoder's layer-0 residual over the tokens of a run without Tiller, encoded in NumPy. The
feature and threshold are picked from those values so that sequence 0 crosses first at generated
token j (decode j + 1) with every earlier value, and every value of sequence 1, at least MARGIN
below (float32 llama.cpp is ~2e-7 from the reference, relatively).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parents[1]
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "python"))
sys.path.insert(0, str(REPO / "python" / "tests"))

import convert  # noqa: E402
import reference  # noqa: E402
from conftest import unit_row_sae  # noqa: E402

LAYER = 0
B_ENC = -0.1
PROMPTS = [[1, 72, 101, 108, 108, 111, 33], [1, 87, 104, 121, 63]]
STEPS = 6
# Relative to the largest feature value: how far from the threshold every value must lie.
MARGIN = 1e-3

CONFIG = """
[runtime]
threads = 1
fvu_sample_rate = 0.0

[[dictionary]]
name = "sae"
path = "sae.onnx"

[[monitor]]
name = "halt"
dictionary = "sae"
features = [{feature}]
threshold = {threshold!r}
window = "token"
action = "stop"
apply_to = "generated"
"""


def run_bin() -> Path:
    target = Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target")
    if not target.is_absolute():
        target = REPO / target
    path = target / "llama-cpp" / "tiller-llama-run"
    if not path.is_file():
        pytest.fail(f"{path} is missing: run examples/llama-cpp/build.sh (scripts/test does)")
    return path


def generate(gguf: Path, config: Path | None) -> dict:
    cmd = [str(run_bin()), "generate", "--model", str(gguf), "--steps", str(STEPS)]
    for p in PROMPTS:
        cmd += ["--prompt", ",".join(map(str, p))]
    if config is not None:
        cmd += ["--config", str(config), "--layer", str(LAYER)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The model, the base run (no Tiller) and a config whose stop is predicted: (gguf, config,
    weights, base, j), sequence 0 stopping at decode j + 1."""
    d = tmp_path_factory.mktemp("stop")
    gguf, npz = d / "tiny.gguf", d / "tiny.npz"
    convert.convert_tiny_llama(11, gguf, npz)
    weights = reference.load_tiny_llama(npz)
    _, w_dec = unit_row_sae(d, 64, 16, "blk.0", B_ENC, seed=5)
    base = generate(gguf, None)
    values = []
    for s, p in enumerate(PROMPTS):
        tokens = p + base["sequences"][s]["generated"]
        h0 = reference.llama_forward(weights, tokens)["hidden"][LAYER]
        feats = np.maximum(h0 @ w_dec.T + B_ENC, 0.0)
        values.append(feats[len(p) :])  # the generated tokens, as decodes 1..STEPS feed them
    picked = reference.pick_stop(values, STEPS, MARGIN)
    assert picked is not None, "no feature of the SAE gives a stop the test can predict"
    feature, j, threshold = picked
    print(f"feature {feature}: sequence 0 crosses {threshold:.6f} at generated token {j}")
    (d / "tiller.toml").write_text(CONFIG.format(feature=feature, threshold=threshold))
    return gguf, d / "tiller.toml", weights, base, j


def test_a_stopped_sequence_ends_and_the_other_goes_on(setup):
    gguf, cfg, weights, base, j = setup
    run = generate(gguf, cfg)
    s0, s1 = run["sequences"]
    b0, b1 = base["sequences"]

    # Sequence 0: stopped by decode j + 1, which fed its generated token j; nothing after it.
    assert s0["stopped_at"] == j + 1
    assert s0["generated"] == b0["generated"][: j + 1]
    assert len(s0["logits"]) == j + 1
    # Until the stop both runs decoded the same batches, and a monitor edits nothing: bit for bit.
    assert np.array_equal(np.asarray(s0["logits"], np.float32), np.asarray(b0["logits"][: j + 1], np.float32))

    # Sequence 1 went on alone: its full length, the model's own tokens and logits.
    assert s1["stopped_at"] is None
    assert s1["generated"] == b1["generated"] and len(s1["generated"]) == STEPS
    tokens = PROMPTS[1] + s1["generated"]
    ref = reference.llama_forward(weights, tokens)["logits"][len(PROMPTS[1]) - 1 :]
    got = np.asarray(s1["logits"], np.float64)
    assert got.shape == ref.shape
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err < 1e-4, f"sequence 1 after the stop: relative error {err:.2e}"

    r0, r1 = run["summaries"]
    assert r0["stopped"] and not r1["stopped"]
    assert r0["tokens"] == len(PROMPTS[0]) + j + 1
    assert r1["tokens"] == len(PROMPTS[1]) + STEPS
    assert [(e["monitor"], e["action"], e["token"]) for e in r0["events"]] == [
        ("halt", "stop", len(PROMPTS[0]) + j)
    ]
    assert r1["events"] == []
    assert 'tiller_monitor_events_total{action="stop",monitor="halt"} 1' in run["metrics"]


@contextlib.contextmanager
def python_host(gguf: Path, cfg: Path, layers: list[int]):
    """The Python adapter on a llama.cpp context made as tiller-llama-run makes it: yields
    (runtime, adapter, ctx, batch, n_vocab), all freed on exit."""
    import llama_cpp
    import tiller_runtime as tiller
    from tiller_llama import Adapter

    rt = tiller.Runtime.from_file(cfg)
    llama_cpp.llama_backend_init()
    m = llama_cpp.llama_model_load_from_file(str(gguf).encode(), llama_cpp.llama_model_default_params())
    assert m
    adapter = Adapter(rt, m, layers=layers)
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = 1024, 512, 512, 2
    cp.n_threads = cp.n_threads_batch = 1
    cp.type_k = cp.type_v = 0  # GGML_TYPE_F32, as tiller-llama-run
    cp.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    cp.no_perf = True
    adapter.attach(cp)
    ctx = llama_cpp.llama_init_from_model(m, cp)
    assert ctx
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(m))
    batch = llama_cpp.llama_batch_init(512, 0, 1)
    try:
        yield rt, adapter, ctx, batch, n_vocab
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
        adapter.close()
        llama_cpp.llama_model_free(m)
        rt.close()


def fill(batch, tokens: list[tuple[int, int, int]]) -> None:
    """Puts (token, position, sequence) triples in `batch`, every token an output."""
    for k, (t, pos, s) in enumerate(tokens):
        batch.token[k], batch.pos[k], batch.n_seq_id[k] = t, pos, 1
        batch.seq_id[k][0], batch.logits[k] = s, 1
    batch.n_tokens = len(tokens)


def test_python_adapter_stops_the_sequence(setup):
    import llama_cpp
    from tiller_llama import AdapterError

    gguf, cfg, _, base, j = setup
    c_run = generate(gguf, cfg)

    with python_host(gguf, cfg, [LAYER]) as (rt, adapter, ctx, batch, n_vocab):
        for s in range(2):
            rt.begin_request(1 + s)
            adapter.seq_begin(s, 1 + s)
        n = 0
        last = {}
        for s, p in enumerate(PROMPTS):
            for k, t in enumerate(p):
                batch.token[n], batch.pos[n], batch.n_seq_id[n] = t, k, 1
                batch.seq_id[n][0], batch.logits[n] = s, 1
                n += 1
            last[s] = n - 1
        batch.n_tokens = n
        assert adapter.decode(ctx, batch) == 0
        generated = {0: [], 1: []}
        stopped_at = {}
        stopped_lists = []
        for step in range(STEPS + 1):
            stopped_lists.append(list(adapter.stopped))
            for s in list(last):
                if adapter.seq_stopped(s):
                    stopped_at[s] = step
                    del last[s]
            if step == STEPS or not last:
                break
            nxt = {}
            for s, i in last.items():
                row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(n_vocab,))
                nxt[s] = int(row.argmax())
                generated[s].append(nxt[s])
            for k, s in enumerate(sorted(nxt)):
                batch.token[k], batch.pos[k], batch.n_seq_id[k] = nxt[s], len(PROMPTS[s]) + step, 1
                batch.seq_id[k][0], batch.logits[k] = s, 1
                last[s] = k
            batch.n_tokens = len(nxt)
            assert adapter.decode(ctx, batch) == 0

        assert stopped_at == {0: j + 1}
        assert [k for k, ids in enumerate(stopped_lists) if ids] == [j + 1]
        assert stopped_lists[j + 1] == [1]
        assert generated[0] == c_run["sequences"][0]["generated"] == base["sequences"][0]["generated"][: j + 1]
        assert generated[1] == c_run["sequences"][1]["generated"] and len(generated[1]) == STEPS

        # A host that decodes the stopped sequence again is refused, the sequence and request named.
        batch.token[0], batch.pos[0], batch.n_seq_id[0] = 72, len(PROMPTS[0]) + j + 1, 1
        batch.seq_id[0][0], batch.logits[0] = 0, 1
        batch.n_tokens = 1
        with pytest.raises(AdapterError, match="sequence 0, whose request 1 a monitor stopped"):
            adapter.decode(ctx, batch)
        # Ended and bound again, the sequence id serves a new request.
        adapter.seq_end(0)
        assert rt.end_request(1)["stopped"]
        rt.begin_request(3)
        adapter.seq_begin(0, 3)
        assert not adapter.seq_stopped(0)
        adapter.seq_end(0)
        adapter.seq_end(1)
        assert not rt.end_request(2)["stopped"]
        rt.end_request(3)
        with pytest.raises(AdapterError, match="sequence 1 carries no request"):
            adapter.seq_stopped(1)


@pytest.mark.parametrize("failure", ["hook", "llama_decode"])
def test_a_stop_in_a_failing_decode_still_stops_the_sequence(setup, monkeypatch, failure):
    """The decode that stops sequence 0 fails after the monitor fired at layer 0: the hook of
    layer 1 fails (the runtime's debug-build panic at `blk.1`), or llama_decode returns an error.
    The decode reports the failure, and the stop still reaches the host: sequence 0 is stopped and
    refused in later batches, sequence 1 is not and goes on."""
    import llama_cpp
    import tiller_runtime as tiller
    from tiller_llama import AdapterError

    gguf, cfg, _, base, j = setup
    d = cfg.parent
    # A monitoring-only dictionary on layer 1, so that the decode has a hook after the stop's.
    unit_row_sae(d / "blk1", 64, 16, "blk.1", B_ENC, seed=6)
    two = d / "two_layers.toml"
    two.write_text(cfg.read_text() + '\n[[dictionary]]\nname = "sae1"\npath = "blk1/sae.onnx"\n')
    b0, b1 = (s["generated"] for s in base["sequences"])
    p0, p1 = len(PROMPTS[0]), len(PROMPTS[1])

    with python_host(gguf, two, [LAYER, 1]) as (rt, adapter, ctx, batch, _):
        for s in range(2):
            rt.begin_request(1 + s)
            adapter.seq_begin(s, 1 + s)
        # The prompts, then the base run's tokens: decode k >= 1 feeds generated token k - 1, and
        # decodes 0..j stop nothing with both layers hooked.
        fill(batch, [(t, k, s) for s, p in enumerate(PROMPTS) for k, t in enumerate(p)])
        assert adapter.decode(ctx, batch) == 0
        for k in range(1, j + 1):
            fill(batch, [(b0[k - 1], p0 + k - 1, 0), (b1[k - 1], p1 + k - 1, 1)])
            assert adapter.decode(ctx, batch) == 0
            assert adapter.stopped == [] and adapter.seq_stopped(0) is False
        assert rt.request_summary(1)["stopped"] is False

        # Decode j + 1, whose token j crosses the threshold at layer 0, fails after that hook.
        fill(batch, [(b0[j], p0 + j, 0), (b1[j], p1 + j, 1)])
        if failure == "hook":
            monkeypatch.setenv("TILLER_TEST_PANIC_AT_HOOK", "blk.1")
            try:
                rc = adapter.decode(ctx, batch)
            except AdapterError as e:
                assert re.search(r"hook blk\.1 \(layer 1\): .*injected panic", str(e)), str(e)
            else:
                pytest.fail(
                    f"the decode returned {rc} with TILLER_TEST_PANIC_AT_HOOK=blk.1: the injected "
                    f"panic needs a debug build of libtiller ({tiller._lib.library_path()})"
                )
            monkeypatch.delenv("TILLER_TEST_PANIC_AT_HOOK")
        else:
            real = llama_cpp.llama_decode
            # The graph ran (and with it both hooks); llama.cpp then reports an error.
            monkeypatch.setattr(llama_cpp, "llama_decode", lambda c, b: real(c, b) or 2)
            assert adapter.decode(ctx, batch) == 2
            monkeypatch.setattr(llama_cpp, "llama_decode", real)
            assert "llama_decode returned 2" in adapter._lib.tiller_llama_last_error().decode()

        assert adapter.seq_stopped(0) is True  # tiller_llama_seq_stopped, the C adapter's mark
        assert adapter.seq_stopped(1) is False
        assert adapter.stopped == [1]  # the Python adapter's list of the last decode's stops
        r0, r1 = rt.request_summary(1), rt.request_summary(2)
        assert r0["stopped"] and not r1["stopped"]
        assert [(e["monitor"], e["action"], e["token"]) for e in r0["events"]] == [("halt", "stop", p0 + j)]

        # The stopped sequence is refused, the other goes on.
        fill(batch, [(b0[j + 1], p0 + j + 1, 0), (b1[j + 1], p1 + j + 1, 1)])
        with pytest.raises(AdapterError, match="sequence 0, whose request 1 a monitor stopped"):
            adapter.decode(ctx, batch)
        fill(batch, [(b1[j + 1], p1 + j + 1, 1)])
        assert adapter.decode(ctx, batch) == 0
        assert adapter.stopped == [] and adapter.seq_stopped(1) is False
        adapter.seq_end(0)
        adapter.seq_end(1)
        assert rt.end_request(1)["stopped"] and not rt.end_request(2)["stopped"]
