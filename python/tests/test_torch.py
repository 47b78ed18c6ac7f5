"""The PyTorch adapter. `import tiller_runtime.torch` works without torch (checked in a subprocess with
torch hidden); the adapter's own tests need torch and are skipped cleanly without it."""

from __future__ import annotations

import subprocess
import sys

import pytest

import tiller_runtime as tiller
from conftest import D_IN, HOOK

HIDE_TORCH = "import sys\nsys.modules['torch'] = None  # `import torch` now raises ImportError\n"


def test_import_without_torch():
    code = HIDE_TORCH + (
        "import tiller_runtime as tiller, tiller_runtime.torch\n"
        "assert callable(tiller.torch.attach)\n"
        "try:\n"
        "    tiller.torch.attach(object(), None, {})\n"
        "except ImportError as e:\n"
        "    print('ImportError:', e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "tiller.torch needs PyTorch" in r.stdout


# Everything below needs torch.


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


def make_model(torch, tuple_output: bool):
    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(D_IN, D_IN)

        def forward(self, h):
            out = self.lin(h)
            return (out, h) if tuple_output else out  # decoder layers return (hidden, residual)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([Layer(), Layer()])

        def forward(self, h):
            for layer in self.layers:
                out = layer(h)
                h = out[0] if isinstance(out, tuple) else out
            return h

    torch.manual_seed(0)
    return Model()


@pytest.mark.parametrize("tuple_output", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_adapter_steers_like_numpy(torch, workdir, activations, tuple_output, dtype):
    import tiller_runtime.torch as tt

    model = make_model(torch, tuple_output).to(getattr(torch, dtype))
    x = torch.from_numpy(activations[:6].copy()).to(getattr(torch, dtype)).reshape(2, 3, D_IN)

    # What layer 0 outputs, unsteered; the NumPy path on it is the reference.
    with torch.inference_mode():
        plain0 = model.layers[0](x)
        plain0 = (plain0[0] if tuple_output else plain0).clone()
    ref_rt = tiller.Runtime.from_file(workdir / "tiller.toml")
    ref_rt.begin_request(1, "mixed")
    ref = plain0.reshape(6, D_IN).float().numpy().copy()
    with ref_rt.step([(1, "prompt")] * 6) as s:
        s.hook(HOOK, ref)
    want = torch.from_numpy(ref).to(getattr(torch, dtype))

    rt = tiller.Runtime.from_file(workdir / "tiller.toml")
    seen = {}
    model.layers[0].register_forward_hook(lambda m, a, o: seen.setdefault("out", o[0] if isinstance(o, tuple) else o))
    n_hooks = len(model.layers[0]._forward_hooks)
    adapter = tt.attach(model, rt, {"layers.0": HOOK})
    assert len(model.layers[0]._forward_hooks) == n_hooks + 1
    rt.begin_request(1, "mixed")
    with torch.inference_mode(), adapter.step([(1, "prompt")] * 6) as step:
        model(x)
    assert step.stop == []
    got = seen["out"].reshape(6, D_IN)
    assert torch.equal(got.float(), want.float())
    assert rt.end_request(1) == ref_rt.end_request(1)

    # Outside a step the hook leaves the output alone; after remove() nothing is hooked.
    with torch.inference_mode():
        model(x)
    adapter.remove()
    assert len(model.layers[0]._forward_hooks) == n_hooks


def test_adapter_errors(torch, workdir):
    import tiller_runtime.torch as tt

    rt = tiller.Runtime.from_file(workdir / "tiller.toml")
    model = make_model(torch, False)
    with pytest.raises(tiller.NotFoundError, match="layers.7"):
        tt.attach(model, rt, {"layers.7": HOOK})
    adapter = tt.attach(model, rt, {"layers.0": HOOK}, require_step=True)
    x = torch.zeros(1, D_IN)
    with pytest.raises(tiller.TillerError, match="outside `adapter.step"):
        with torch.inference_mode():
            model(x)
    rt.begin_request(1)
    # Autograd cannot see an edit made by pointer.
    with pytest.raises(tiller.InvalidArgumentError, match="require grad"):
        with adapter.step([(1, "prompt")]):
            model(x)
    with pytest.raises(tiller.InvalidArgumentError, match="float64"):
        with torch.inference_mode(), adapter.step([(1, "prompt")]):
            model.double()(x.double())
    adapter.remove()


def test_cuda_tensor_is_refused_clearly(torch, workdir):
    import tiller_runtime.torch as tt

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    rt = tiller.Runtime.from_file(workdir / "tiller.toml")
    rt.begin_request(1)
    t = torch.zeros(1, D_IN, device="cuda")
    with rt.step([(1, "prompt")]) as step:
        with pytest.raises(tiller.UnsupportedError, match="cuda:0.*CUDA support"):
            tt.steer_tensor(step, HOOK, t, "layers.0")


def test_cuda_path_passes_pointer_and_stream(torch, workdir, monkeypatch):
    """The CUDA branch without a GPU: the current stream is faked; this build of libtiller then
    answers TILLER_UNSUPPORTED, which reaches the caller naming the device and the hook."""
    import types

    import tiller_runtime.torch as tt

    calls = []
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: calls.append(device) or types.SimpleNamespace(cuda_stream=0x5EED))
    rt = tiller.Runtime.from_file(workdir / "tiller.toml")
    rt.begin_request(1)
    with rt.step([(1, "prompt")]) as step:
        with pytest.raises(tiller.UnsupportedError, match=r"a tensor on cuda:0 at `layers.0`: .*no CUDA support") as e:
            tt._hook_on_device(torch, step, HOOK, torch.device("cuda:0"), 0x1000, tiller.F32, 1, D_IN, " at `layers.0`")
        assert e.value.status == 10
        with pytest.raises(tiller.UnsupportedError, match="are on meta"):
            tt._hook_on_device(torch, step, HOOK, torch.device("meta"), 0x1000, tiller.F32, 1, D_IN, "")
    assert calls == [torch.device("cuda:0")]
