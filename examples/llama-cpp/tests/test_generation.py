"""Generation with a KV cache in llama.cpp with Tiller attached, from C (`tiller-llama-run`, over
the C adapter) and from Python (`tiller_llama.Adapter` over llama-cpp-python).

Two sequences in one batch, one with a steering profile and one without:
- the unsteered sequence's logits are bit-identical to a run without Tiller attached;
- the steered sequence's logits are what the float64 reference gives with the edit the profile
  predicts (`add` of a unit decoder row after layer 0, on every token: prompt and generated), at
  relative error under 1e-4 (float32 llama.cpp against float64; its own error without the edit is
  ~2e-7), and they differ from the unsteered run;
- the Python adapter gives the C adapter's logits bit for bit, and both report the same summaries.
"""

from __future__ import annotations

import json
import os
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
FEATURE = 2
STRENGTH = 1.5
PROMPTS = [[1, 72, 101, 108, 108, 111, 33], [1, 87, 104, 121, 63]]  # two byte-level prompts
STEPS = 6

CONFIG = """
[runtime]
threads = 1
fvu_sample_rate = 0.0

[[dictionary]]
name = "sae"
path = "sae.onnx"

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
"""


def run_bin() -> Path:
    target = Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target")
    if not target.is_absolute():
        target = REPO / target
    path = target / "llama-cpp" / "tiller-llama-run"
    if not path.is_file():
        pytest.fail(f"{path} is missing: run examples/llama-cpp/build.sh (scripts/test does)")
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    gguf, npz = d / "tiny.gguf", d / "tiny.npz"
    convert.convert_tiny_llama(11, gguf, npz)
    return gguf, reference.load_tiny_llama(npz)


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    """A 64 -> 16 ReLU SAE on `blk.0` with unit decoder rows, and the config above."""
    d = tmp_path_factory.mktemp("sae")
    _, w_dec = unit_row_sae(d, 64, 16, "blk.0", -0.1, seed=5)
    (d / "tiller.toml").write_text(CONFIG)
    return d / "tiller.toml", w_dec


def generate(gguf: Path, config: Path | None, profiles=("steer", "")) -> dict:
    cmd = [str(run_bin()), "generate", "--model", str(gguf), "--steps", str(STEPS)]
    for p in PROMPTS:
        cmd += ["--prompt", ",".join(map(str, p))]
    if config is not None:
        cmd += ["--config", str(config), "--layer", str(LAYER)]
        for p in profiles:
            cmd += ["--profile", p]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def logits_of(run: dict, seq: int) -> np.ndarray:
    return np.asarray(run["sequences"][seq]["logits"], dtype=np.float32)


def test_steered_and_unsteered_sequences_in_one_batch(model, config):
    gguf, weights = model
    cfg, w_dec = config
    base = generate(gguf, None)
    hooked = generate(gguf, cfg)

    # The unsteered sequence (monitored only) is the model's own, bit for bit.
    assert np.array_equal(logits_of(hooked, 1), logits_of(base, 1))
    assert hooked["sequences"][1]["generated"] == base["sequences"][1]["generated"]

    # The steered one: the reference with the predicted edit on every token of sequence 0.
    tokens = PROMPTS[0] + hooked["sequences"][0]["generated"]
    edit = STRENGTH * w_dec[FEATURE]
    ref = reference.llama_forward(weights, tokens, edits={LAYER: edit})["logits"]
    # Logits of the last prompt position, then of each generated token.
    positions = range(len(PROMPTS[0]) - 1, len(tokens))
    expected = ref[list(positions)]
    got = logits_of(hooked, 0).astype(np.float64)
    err = np.abs(got - expected).max() / np.abs(expected).max()
    print(f"steered sequence: max relative error against the float64 reference {err:.2e}")
    assert err < 1e-4
    moved = np.abs(logits_of(hooked, 0) - logits_of(base, 0)).max() / np.abs(expected).max()
    assert moved > 1e-2, f"the edit changed the logits by only {moved}"
    # Without the edit the reference is far off: the test sees the edit.
    plain = reference.llama_forward(weights, tokens)["logits"][list(positions)]
    assert np.abs(got - plain).max() / np.abs(plain).max() > 100 * err

    s0, s1 = hooked["summaries"]
    assert s0["profile"] == "steer" and s1["profile"] is None
    assert s0["tokens"] == len(PROMPTS[0]) + STEPS and s1["tokens"] == len(PROMPTS[1]) + STEPS
    assert s0["steering"] == {"add-2": len(PROMPTS[0]) + STEPS}
    assert s1["steering"] == {}
    assert "tiller_tokens_total" in hooked["metrics"]


def test_python_adapter_matches_the_c_adapter(model, config):
    import llama_cpp
    import tiller_runtime as tiller
    from tiller_llama import Adapter, AdapterError

    gguf, _ = model
    cfg, _ = config
    c_run = generate(gguf, cfg)

    rt = tiller.Runtime.from_file(cfg)
    llama_cpp.llama_backend_init()
    mp = llama_cpp.llama_model_default_params()
    m = llama_cpp.llama_model_load_from_file(str(gguf).encode(), mp)
    assert m
    adapter = Adapter(rt, m, layers=[LAYER])
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
    try:
        for s, profile in enumerate(["steer", None]):
            rt.begin_request(1 + s, profile=profile)
            adapter.seq_begin(s, 1 + s)
        batch = llama_cpp.llama_batch_init(512, 0, 1)
        last = []
        n = 0
        for s, p in enumerate(PROMPTS):
            for j, t in enumerate(p):
                batch.token[n], batch.pos[n], batch.n_seq_id[n] = t, j, 1
                batch.seq_id[n][0], batch.logits[n] = s, 1
                n += 1
            last.append(n - 1)
        batch.n_tokens = n
        assert adapter.decode(ctx, batch) == 0
        logits = [[], []]
        for step in range(STEPS + 1):
            nxt = []
            for s in range(2):
                row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, last[s]), shape=(n_vocab,)).copy()
                logits[s].append(row)
                nxt.append(int(row.argmax()))
            if step == STEPS:
                break
            for s in range(2):
                batch.token[s], batch.pos[s], batch.n_seq_id[s] = nxt[s], len(PROMPTS[s]) + step, 1
                batch.seq_id[s][0], batch.logits[s] = s, 1
            batch.n_tokens = 2
            last = [0, 1]
            assert adapter.decode(ctx, batch) == 0
        for s in range(2):
            assert np.array_equal(np.asarray(logits[s]), logits_of(c_run, s)), f"sequence {s}"
        # A prompt's length is given before the sequence's first decode, not after.
        with pytest.raises(AdapterError, match="has decoded 13 tokens already"):
            adapter.seq_prompt(0, 3)
        summaries = []
        for s in range(2):
            adapter.seq_end(s)
            summaries.append(rt.end_request(1 + s))
        assert summaries[0]["steering"] == c_run["summaries"][0]["steering"]
        assert summaries[0]["features"] == c_run["summaries"][0]["features"]
        assert summaries[1]["features"] == c_run["summaries"][1]["features"]

        # A token of a sequence that carries no request is refused, with the sequence named.
        batch.n_tokens = 1
        batch.seq_id[0][0] = 1
        with pytest.raises(AdapterError, match="sequence 1"):
            adapter.decode(ctx, batch)
        llama_cpp.llama_batch_free(batch)
    finally:
        llama_cpp.llama_free(ctx)
        adapter.close()
        llama_cpp.llama_model_free(m)
        rt.close()


def test_refusals(model, config):
    """Bad layers and formats are refused by name; a batch over n_ubatch is refused before llama.cpp runs."""
    import llama_cpp
    import tiller_runtime as tiller
    from tiller_llama import Adapter, AdapterError

    gguf, _ = model
    cfg, _ = config
    rt = tiller.Runtime.from_file(cfg)
    m = llama_cpp.llama_model_load_from_file(str(gguf).encode(), llama_cpp.llama_model_default_params())
    try:
        with pytest.raises(AdapterError, match="layer 7 does not exist"):
            Adapter(rt, m, layers=[7])
        with pytest.raises(AdapterError, match="exactly one %d"):
            Adapter(rt, m, layers=[0], hook_format="blk")
        with pytest.raises(AdapterError, match="listed twice"):
            Adapter(rt, m, layers=[0, 0])
        # The last layer is computed for the output tokens only: refused with the way out named.
        a = Adapter(rt, m, layers=[1])
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = 256, 8, 8, 1
        cp.n_threads = cp.n_threads_batch = 1
        a.attach(cp)
        ctx = llama_cpp.llama_init_from_model(m, cp)
        rt.begin_request(9)
        a.seq_begin(0, 9)
        batch = llama_cpp.llama_batch_init(16, 0, 1)
        for j in range(4):
            batch.token[j], batch.pos[j], batch.n_seq_id[j] = 72 + j, j, 1
            batch.seq_id[j][0], batch.logits[j] = 0, int(j == 3)
        batch.n_tokens = 4
        with pytest.raises(AdapterError, match="last: llama.cpp computes it for the batch's output tokens only"):
            a.decode(ctx, batch)
        batch.n_tokens = 12
        for j in range(12):
            batch.token[j], batch.pos[j], batch.n_seq_id[j] = 72, j, 1
            batch.seq_id[j][0], batch.logits[j] = 0, 1
        with pytest.raises(AdapterError, match="micro-batches of 8"):
            a.decode(ctx, batch)
        rt.end_request(9)
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
        a.close()
    finally:
        llama_cpp.llama_model_free(m)
        rt.close()
