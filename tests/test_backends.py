"""One code path on every array library: every pair of ``npattn check`` (ops, tiled loop, layers,
GPT) run on each backend equals NumPy's float64 answer; a GPT trains, clips, steps AdamW and decodes
with the KV cache on each backend; gradcheck runs there. The ``no-host`` backend (array_api_strict's
second device, with every implicit conversion to the host raising, see conftest.py) proves that no
op moves data to the host or creates an array off the inputs' device. CuPy and torch CUDA run the
same tests where a GPU is present and skip, with the reason, where it is not."""

import numpy as np
import pytest

from npattn import GPT, AdamW, GPTConfig, clip_grad_norm, cross_entropy_backward, cross_entropy_forward, gradcheck
from npattn.backend import keep_mask, library, on_host, to_numpy
from npattn.checks import cases, on_backend

CASES = cases(seed=3)


def _as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _run(case, put=lambda a: a):
    """Forward, then backward with a fixed random dout (NumPy data, ``put`` on the case's backend):
    ``(outputs, grads)`` as NumPy arrays."""
    out, cache = case.forward(*case.inputs.values(), **case.kwargs)
    outs = _as_tuple(out)
    rng = np.random.default_rng(0)
    douts = [put(rng.standard_normal(tuple(o.shape))) for o in outs]
    grads = case.backward(tuple(douts) if isinstance(out, tuple) else douts[0], cache)
    return [to_numpy(o) for o in outs], [None if g is None else to_numpy(g) for g in _as_tuple(grads)]


@pytest.mark.parametrize("case", CASES, ids=[f"{c.op}: {c.name}" for c in CASES])
def test_every_check_case_matches_numpy(backend, case):
    if "dropout" in case.kwargs and case.kwargs["dropout_p"] and backend.name in ("cupy", "torch-cuda"):
        pytest.skip("dropout draws its own mask on a GPU (test_dropout_on_a_device_generator)")
    want_out, want_grads = _run(case)
    moved = on_backend(case, backend.xp, backend.device)
    assert all(type(a) is type(backend.asarray(np.zeros(1))) for a in moved.inputs.values()
               if a is not None and not isinstance(a, (int, float)))
    got_out, got_grads = _run(moved, backend.asarray)
    for got, want in zip(got_out + got_grads, want_out + want_grads):
        if want is None:
            assert got is None
            continue
        np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-12)


def test_gradcheck_runs_on_the_backend(backend):
    case = next(c for c in CASES if c.name == "GQA H=4 G=2 + causal")
    moved = on_backend(case, backend.xp, backend.device)
    report = gradcheck(moved.forward, moved.backward, moved.inputs, kwargs=moved.kwargs)
    assert report.ok and len(report.rows) == 3, str(report)


@pytest.mark.parametrize("positions", ["sinusoidal", "rope"])
def test_gpt_trains_and_decodes_on_the_backend(backend, positions):
    config = GPTConfig(vocab_size=13, max_len=12, embed_dim=8, num_heads=4, num_kv_heads=2, num_layers=2,
                       ffn_dim=12, positions=positions, norm="rmsnorm" if positions == "rope" else "layernorm")
    rng = np.random.default_rng(5)
    ids, targets = rng.integers(0, 13, (2, 6)), rng.integers(0, 13, (2, 6))
    results = {}
    for where in ("numpy", "backend"):
        model = GPT(config, seed=1)
        x_ids, x_targets = ids, targets
        if where == "backend":
            model.to(backend.xp, backend.device)
            x_ids, x_targets = backend.asarray(ids), backend.asarray(targets)
        opt = AdamW(model.params, lr=1e-2)
        for _ in range(2):                                    # two steps: AdamW's state is used
            logits = model.forward(x_ids)
            loss, c = cross_entropy_forward(logits, x_targets)
            model.backward(cross_entropy_backward(1.0, c)[0])
            norm = clip_grad_norm(model.grads, 1.0)
            opt.step(model.grads)
        out = model.generate(x_ids[:, :3], 4)
        assert type(out) is type(x_ids)
        results[where] = (to_numpy(loss), to_numpy(norm), {n: to_numpy(p) for n, p in model.params.items()},
                          to_numpy(out))
    (l0, n0, p0, o0), (l1, n1, p1, o1) = results["numpy"], results["backend"]
    np.testing.assert_allclose(l1, l0, rtol=1e-12)
    np.testing.assert_allclose(n1, n0, rtol=1e-12)
    for name in p0:
        np.testing.assert_allclose(p1[name], p0[name], rtol=1e-11, atol=1e-13, err_msg=name)
    np.testing.assert_array_equal(o1, o0)


def test_layer_to_moves_every_weight_and_keeps_dtypes(backend):
    model = GPT(GPTConfig(vocab_size=7, max_len=5, embed_dim=4, num_heads=2, num_layers=1, ffn_dim=6),
                dtype="float32", seed=0)
    before = {n: p.copy() for n, p in model.params.items()}
    assert model.to(backend.xp, backend.device) is model
    for name, p in model.params.items():
        assert type(p) is type(backend.asarray(np.zeros(1, np.float32)))
        assert str(p.dtype).endswith("float32")
        np.testing.assert_array_equal(to_numpy(p), before[name])
    model.to("numpy")
    assert all(isinstance(p, np.ndarray) for p in model.params.values())


def test_library_names_and_errors():
    import array_api_strict

    assert library("numpy").__name__ == "array_api_compat.numpy"
    assert library(np).__name__ == "array_api_compat.numpy"
    assert library(array_api_strict) is array_api_strict
    with pytest.raises(ValueError, match="must be one of .* got 'jax'"):
        library("jax")


# --- dropout's mask: where it is drawn

def test_dropout_mask_is_the_same_on_every_host_library(backend):
    if not on_host(backend.asarray(np.zeros(1))) and backend.name != "no-host":
        pytest.skip("a GPU library draws its own mask (test_dropout_on_a_device_generator)")
    like = backend.asarray(np.zeros(1))
    got = to_numpy(keep_mask(backend.xp, (3, 4, 50), 0.3, 11, like))
    want = np.random.default_rng(11).random((3, 4, 50)) >= 0.3
    np.testing.assert_array_equal(got, want)


def test_dropout_on_a_device_generator(monkeypatch):
    """The torch branch of keep_mask (CUDA's in use), run on the CPU by calling it a device: drawn
    by torch from the seed, reproducible, at the right rate, and not NumPy's stream."""
    torch = pytest.importorskip("torch")
    import npattn.backend as backend_module

    monkeypatch.setattr(backend_module, "on_host", lambda x: False)
    xt = library("torch")
    like = torch.zeros(1, dtype=torch.float64)
    a = keep_mask(xt, (4, 64, 64), 0.25, 7, like)
    b = keep_mask(xt, (4, 64, 64), 0.25, 7, like)
    c = keep_mask(xt, (4, 64, 64), 0.25, 8, like)
    assert isinstance(a, torch.Tensor) and a.dtype == torch.bool and a.device == like.device
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert abs(a.double().mean().item() - 0.75) < 0.02
    assert not np.array_equal(a.numpy(), np.random.default_rng(7).random((4, 64, 64)) >= 0.25)
    gen = np.random.default_rng(7)                            # a NumPy Generator: NumPy's mask, copied over
    np.testing.assert_array_equal(keep_mask(xt, (3, 5), 0.5, gen, like).numpy(),
                                  np.random.default_rng(7).random((3, 5)) >= 0.5)


def test_no_host_guard_catches_a_host_conversion(backend):
    """The guard itself can fail: float() of a device array raises under it."""
    if backend.name != "no-host":
        pytest.skip("the guard is the no-host backend's")
    x = backend.asarray(np.ones(3))
    with pytest.raises(RuntimeError, match="implicit transfer to the host"):
        float(backend.xp.sum(x))
    with pytest.raises(RuntimeError, match="to a NumPy array"):
        np.asarray(x)
    with pytest.raises(ValueError, match="different devices"):
        x + backend.xp.asarray(np.ones(3))                    # an array made without the inputs' device


# --- the command line on another backend

def test_check_on_a_backend(backend, capsys):
    from npattn.cli import main

    if backend.name == "numpy":
        pytest.skip("the plain `npattn check` is test_cli's")
    args = ["check", "-k", "GQA H=4 G=2", "--backend", backend.xp.__name__.split(".")[-1]]
    if backend.device_name is not None:
        args += ["--device", backend.device_name]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"on {args[4]}" in out and "all 3 cases passed" in out


def test_bench_on_the_no_host_device(backend, capsys):
    """The bench's npattn rows on a device: timed, with no host transfer inside (the guard is on)."""
    from npattn.bench import BenchConfig, run_bench

    if backend.name != "no-host":
        pytest.skip("the bench on a device is exercised through the no-host backend")
    rows = run_bench(BenchConfig(lengths=[40], dtypes=["float64"], causal=[True], passes=["fwd+bwd"],
                                 impls=["naive", "tiled"], heads=2, dim=8, block=16, repeats=1,
                                 backend="array_api_strict", device="device1"))
    assert [r["impl"] for r in rows] == ["naive", "tiled"]
    assert all(r["backend"] == "array_api_strict on device1" and r["median_ms"] > 0 for r in rows)
