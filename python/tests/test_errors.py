"""Every error path raises the right TillerError subclass, with its status and a message that
says what was wrong (from `tiller_last_error`, or the binding's own check before the call)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tiller_runtime as tiller
from conftest import CONFIG, D_IN, HOOK


def one_token_step(rt, request=1):
    rt.begin_request(request)
    return rt.step([(request, "generated")])


def test_unknown_hook(rt):
    with one_token_step(rt) as step:
        with pytest.raises(tiller.NotFoundError, match="blocks.9") as e:
            step.hook("blocks.9", np.zeros((1, D_IN), np.float32))
    assert e.value.status == 3 and isinstance(e.value, tiller.TillerError)
    assert "no dictionary or rule" in e.value.message


def test_unknown_request(rt):
    with pytest.raises(tiller.NotFoundError, match="99") as e:
        rt.step([(99, "prompt")])
    assert e.value.status == 3
    with pytest.raises(tiller.NotFoundError, match="never begun or has ended"):
        rt.end_request(99)
    with pytest.raises(tiller.NotFoundError):
        rt.request_summary(99)
    rt.begin_request(5)
    rt.end_request(5)
    with pytest.raises(tiller.NotFoundError):
        rt.end_request(5)  # ended already


def test_request_already_running(rt):
    rt.begin_request(1)
    with pytest.raises(tiller.NotFoundError, match="already running"):
        rt.begin_request(1)


@pytest.mark.parametrize("bad", [-1, 2**64, "7", 1.0, True])
def test_bad_request_id(rt, bad):
    with pytest.raises(tiller.InvalidArgumentError, match="request id"):
        rt.begin_request(bad)


@pytest.mark.parametrize("dtype", [np.float64, np.int32, np.uint16, np.complex64])
def test_bad_dtype(rt, dtype):
    with one_token_step(rt) as step:
        with pytest.raises(tiller.InvalidArgumentError, match=r"dtype .*float32, float16") as e:
            step.hook(HOOK, np.zeros((1, D_IN), dtype))
        assert e.value.status == 2
        assert np.dtype(dtype).name in str(e.value)


def test_not_an_array(rt):
    with one_token_step(rt) as step:
        with pytest.raises(tiller.InvalidArgumentError, match="numpy.ndarray"):
            step.hook(HOOK, [[0.0] * D_IN])


def test_non_contiguous(rt):
    rt.begin_request(1)
    with rt.step([(1, "prompt")] * 2) as step:
        wide = np.zeros((2, 2 * D_IN), np.float32)
        with pytest.raises(tiller.InvalidArgumentError, match="C-contiguous"):
            step.hook(HOOK, wide[:, ::2])
        with pytest.raises(tiller.InvalidArgumentError, match="C-contiguous"):
            step.hook(HOOK, np.zeros((D_IN, 2), np.float32).T)
        with pytest.raises(tiller.InvalidArgumentError, match="C-contiguous"):
            step.hook(HOOK, np.asfortranarray(np.zeros((2, D_IN), np.float32)))


def test_read_only(rt):
    x = np.zeros((1, D_IN), np.float32)
    x.flags.writeable = False
    with one_token_step(rt) as step:
        with pytest.raises(tiller.InvalidArgumentError, match="read-only"):
            step.hook(HOOK, x)


def test_unaligned_and_byte_swapped(rt):
    rt.begin_request(1)
    with rt.step([(1, "prompt")]) as step:
        raw = np.zeros(4 * D_IN + 1, np.uint8)
        unaligned = raw[1:].view(np.float32).reshape(1, D_IN)
        assert not unaligned.flags.aligned
        with pytest.raises(tiller.InvalidArgumentError, match="aligned"):
            step.hook(HOOK, unaligned)
        swapped = np.zeros((1, D_IN), np.dtype(np.float32).newbyteorder())
        with pytest.raises(tiller.InvalidArgumentError, match="byte order"):
            step.hook(HOOK, swapped)


def test_wrong_shape(rt):
    rt.begin_request(1)
    with rt.step([(1, "prompt")] * 2) as step:
        with pytest.raises(tiller.InvalidArgumentError, match=r"2-D"):
            step.hook(HOOK, np.zeros(2 * D_IN, np.float32))
        with pytest.raises(tiller.InvalidArgumentError, match=r"2-D"):
            step.hook(HOOK, np.zeros((1, 2, D_IN), np.float32))
        with pytest.raises(tiller.InvalidArgumentError, match="3 rows but the step has 2 tokens"):
            step.hook(HOOK, np.zeros((3, D_IN), np.float32))
        # A wrong width reaches the library, which knows the hook's width.
        with pytest.raises(tiller.InvalidArgumentError, match=f"width {D_IN}") as e:
            step.hook(HOOK, np.zeros((2, D_IN + 1), np.float32))
        assert e.value.status == 2


def test_bad_tokens(rt):
    rt.begin_request(1)
    with pytest.raises(tiller.InvalidArgumentError, match="phase 'decode'"):
        rt.step([(1, "decode")])
    with pytest.raises(tiller.InvalidArgumentError, match="not a \\(request_id, phase\\) pair"):
        rt.step([1])
    with pytest.raises(tiller.InvalidArgumentError, match="two: step\\(request_ids, phases\\)"):
        rt.step(np.array([1]))
    with pytest.raises(tiller.InvalidArgumentError, match="one length"):
        rt.step(np.array([1, 1]), np.array([0]))
    with pytest.raises(tiller.InvalidArgumentError, match="0 \\(prompt\\) or 1 \\(generated\\)"):
        rt.step(np.array([1]), np.array([2]))
    with pytest.raises(tiller.InvalidArgumentError, match="negative"):
        rt.step(np.array([-1]), np.array([0]))


def test_bad_profile(rt):
    with pytest.raises(tiller.NotFoundError, match="nosuch") as e:
        rt.begin_request(1, "nosuch")
    assert e.value.status == 3 and "profile" in e.value.message
    rt.begin_request(1, "calm")  # the failed begin left no request behind


def test_bad_overrides(rt):
    with pytest.raises(tiller.InvalidArgumentError, match="overrides") as e:
        rt.begin_request(1, None, "{not json")
    assert e.value.status == 2
    # A dict is serialised to JSON; a rule over another feature is accepted.
    rt.begin_request(2, None, {"steer": [{"dictionary": "res", "op": "ablate", "feature": 5}]})
    x = np.ones((1, D_IN), np.float32)
    with rt.step([(2, "prompt")]) as step:
        step.hook(HOOK, x)
    assert rt.end_request(2)["steering"].get("request_override", 0) in (0, 1)


def test_bad_toml(workdir):
    with pytest.raises(tiller.ConfigError) as e:
        tiller.Runtime.from_toml("[runtime\nthreads = 1\n")
    assert e.value.status == 4 and e.value.message.startswith("<config>:1:")  # file:line
    # A key in the wrong place names the key.
    with pytest.raises(tiller.ConfigError, match="op"):
        tiller.Runtime.from_toml(CONFIG.replace('op = "clamp"', 'op = "squash"'), base_dir=workdir)


def test_from_toml_resolves_against_base_dir(workdir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # res.onnx is not here
    with pytest.raises(tiller.TillerError, match="res.onnx"):
        tiller.Runtime.from_toml(CONFIG)
    tiller.Runtime.from_toml(CONFIG, base_dir=workdir).close()


def test_missing_config_file(tmp_path):
    with pytest.raises(tiller.TillerError, match="nope.toml") as e:
        tiller.Runtime.from_file(tmp_path / "nope.toml")
    assert e.value.status in (4, 7)


def test_bad_reload_keeps_serving(workdir, tmp_path, activations):
    cfg = tmp_path / "t.toml"
    cfg.write_text(CONFIG.replace('path = "res.onnx"', f'path = "{workdir / "res.onnx"}"'))
    rt = tiller.Runtime.from_file(cfg)
    bad = tmp_path / "bad.toml"
    bad.write_text("[[dictionary]]\nname = 3\n")
    with pytest.raises(tiller.ConfigError, match="bad.toml"):
        rt.reload(bad)
    rt.reload()  # the original file is fine
    rt.begin_request(1, "calm")
    x = activations[:2].copy()
    with rt.step([(1, "prompt")] * 2) as step:
        step.hook(HOOK, x)
    assert 'tiller_config_reloads_total{result="rejected"} 1' in rt.metrics_text()


def test_closed_objects(workdir):
    rt = tiller.Runtime.from_file(workdir / "tiller.toml")
    rt.begin_request(1)
    step = rt.step([(1, "prompt")])
    assert step.close() == []
    with pytest.raises(tiller.ClosedError):
        step.hook(HOOK, np.zeros((1, D_IN), np.float32))
    rt.close()
    with pytest.raises(tiller.ClosedError):
        rt.begin_request(2)
    rt.close()  # twice is fine


def test_exception_in_block_frees_the_step(rt):
    rt.begin_request(1)
    with pytest.raises(RuntimeError):
        with rt.step([(1, "prompt")]) as step:
            raise RuntimeError("model failed")
    assert step.stop is None  # freed, not closed
    with pytest.raises(tiller.ClosedError):
        step.close()


def test_cuda_hook_unsupported(rt):
    with one_token_step(rt) as step:
        with pytest.raises(tiller.UnsupportedError, match="CUDA") as e:
            step.hook_cuda(HOOK, 0x1000, tiller.F32, 1, D_IN, 0)
    assert e.value.status == 10


def test_panic_is_contained(rt, monkeypatch):
    # Debug builds of the runtime panic on purpose at this hook (TILLER_TEST_PANIC_AT_HOOK).
    monkeypatch.setenv("TILLER_TEST_PANIC_AT_HOOK", HOOK)
    with one_token_step(rt) as step:
        try:
            step.hook(HOOK, np.zeros((1, D_IN), np.float32))
        except tiller.PanicError as e:
            assert e.status == 9 and "injected panic" in e.message
        else:
            pytest.skip("a release build of libtiller: no injected panic")


def test_missing_library_says_how_to_build(tmp_path):
    code = "import tiller_runtime as tiller\ntry:\n    tiller.version()\nexcept tiller.LibraryError as e:\n    print(e)\n"
    env = dict(os.environ, TILLER_LIB=str(tmp_path / "libtiller.so"))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "TILLER_LIB points to a missing file" in r.stdout
    assert "cargo build --release -p tiller-capi" in r.stdout


def test_not_a_library(tmp_path):
    fake = tmp_path / "libtiller.so"
    fake.write_text("not an ELF file")
    code = "import tiller_runtime as tiller\ntry:\n    tiller.version()\nexcept tiller.LibraryError as e:\n    print(e)\n"
    env = dict(os.environ, TILLER_LIB=str(fake))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "cannot load" in r.stdout and "cargo build --release -p tiller-capi" in r.stdout


def test_library_search_order(monkeypatch):
    monkeypatch.delenv("TILLER_LIB", raising=False)
    monkeypatch.delenv("CARGO_TARGET_DIR", raising=False)
    paths = tiller.library_candidates()
    pkg = Path(tiller.__file__).resolve().parent
    assert paths[0] == pkg / "libtiller.so"
    repo = pkg.parent.parent
    assert paths[1:] == [repo / "target" / "release" / "libtiller.so", repo / "target" / "debug" / "libtiller.so"]
    monkeypatch.setenv("TILLER_LIB", "/x/libtiller.so")
    assert tiller.library_candidates() == [Path("/x/libtiller.so")]


def test_version_and_build_info():
    assert tiller.version().count(".") == 2
    info = tiller.build_info()
    assert info["version"] == tiller.version()
    assert info["cuda"] is False
    assert Path(info["library"]) == tiller.library_path()
