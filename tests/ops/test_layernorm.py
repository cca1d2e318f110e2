"""npattn/ops/layernorm.py: LayerNorm and RMSNorm vs explicit loops and torch, gradients, bad input."""

import numpy as np
import pytest

from npattn import gradcheck, layernorm_backward, layernorm_forward, rmsnorm_backward, rmsnorm_forward


def layernorm_loop(x, gamma, beta, eps):
    out = np.empty_like(x)
    for idx in np.ndindex(*x.shape[:-1]):
        row = x[idx]
        mu = sum(row) / len(row)
        var = sum((r - mu) ** 2 for r in row) / len(row)
        out[idx] = [(r - mu) / np.sqrt(var + eps) * g + b for r, g, b in zip(row, gamma, beta)]
    return out


def rmsnorm_loop(x, gamma, eps):
    out = np.empty_like(x)
    for idx in np.ndindex(*x.shape[:-1]):
        row = x[idx]
        rms = np.sqrt(sum(r * r for r in row) / len(row) + eps)
        out[idx] = [r / rms * g for r, g in zip(row, gamma)]
    return out


def test_forward_matches_loops(rng):
    x, g, b = rng.standard_normal((2, 3, 6)) * 3 + 1, rng.standard_normal(6), rng.standard_normal(6)
    np.testing.assert_allclose(layernorm_forward(x, g, b, eps=1e-3)[0], layernorm_loop(x, g, b, 1e-3), rtol=1e-12)
    np.testing.assert_allclose(rmsnorm_forward(x, g, eps=1e-3)[0], rmsnorm_loop(x, g, 1e-3), rtol=1e-12)


@pytest.mark.parametrize("shape", [(5,), (3, 6), (2, 3, 4)])
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck(rng, shape, affine):
    e = shape[-1]
    x = rng.standard_normal(shape) * 2 + 0.5
    g, b = (rng.standard_normal(e), rng.standard_normal(e)) if affine else (None, None)
    ln = gradcheck(layernorm_forward, layernorm_backward, dict(x=x, gamma=g, beta=b), kwargs=dict(eps=1e-3))
    rms = gradcheck(rmsnorm_forward, rmsnorm_backward, dict(x=x, gamma=g), kwargs=dict(eps=1e-3))
    assert ln.ok, ln
    assert rms.ok, rms
    assert [r.name for r in ln.rows] == (["x", "gamma", "beta"] if affine else ["x"])


def test_gamma_without_beta(rng):
    x, g = rng.standard_normal((3, 4)), rng.standard_normal(4)
    _, cache = layernorm_forward(x, g)
    dx, dgamma, dbeta = layernorm_backward(rng.standard_normal((3, 4)), cache)
    assert dgamma.shape == (4,) and dbeta is None


def test_rows_of_dx_sum_to_zero_for_layernorm(rng):
    """LayerNorm's output is invariant to adding a constant to a row, so dx is orthogonal to 1."""
    x, g = rng.standard_normal((4, 7)), rng.standard_normal(7)
    _, cache = layernorm_forward(x, g)
    dx = layernorm_backward(rng.standard_normal((4, 7)), cache)[0]
    np.testing.assert_allclose(dx.sum(-1), 0, atol=1e-13)


def layernorm_backward_without_mean_terms(dout, cache):
    """The planted bug: dx = rstd * dxhat, forgetting that mu and var depend on x."""
    dx, dg, db = layernorm_backward(dout, cache)
    return cache.rstd * dout * cache.gamma, dg, db


def rmsnorm_backward_without_projection(dout, cache):
    dx, dg = rmsnorm_backward(dout, cache)
    return cache.rrms * dout * cache.gamma, dg


def test_planted_bugs_fail(rng):
    x, g, b = rng.standard_normal((3, 5)), rng.standard_normal(5), rng.standard_normal(5)
    assert not gradcheck(layernorm_forward, layernorm_backward_without_mean_terms, dict(x=x, gamma=g, beta=b)).ok
    assert not gradcheck(rmsnorm_forward, rmsnorm_backward_without_projection, dict(x=x, gamma=g)).ok


def test_matches_torch(rng):
    torch = pytest.importorskip("torch")
    x, g, b, dout = rng.standard_normal((2, 3, 8)), rng.standard_normal(8), rng.standard_normal(8), rng.standard_normal((2, 3, 8))
    tx, tg, tb = (torch.tensor(a, requires_grad=True) for a in (x, g, b))
    torch.nn.functional.layer_norm(tx, (8,), tg, tb, eps=1e-5).backward(torch.tensor(dout))
    y, cache = layernorm_forward(x, g, b)
    for got, want in zip(layernorm_backward(dout, cache), (tx, tg, tb)):
        np.testing.assert_allclose(got, want.grad.numpy(), rtol=1e-12, atol=1e-13)
    tx, tg = (torch.tensor(a, requires_grad=True) for a in (x, g))
    ty = torch.nn.functional.rms_norm(tx, (8,), tg, eps=1e-6)
    ty.backward(torch.tensor(dout))
    y, cache = rmsnorm_forward(x, g)
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-13)
    for got, want in zip(rmsnorm_backward(dout, cache), (tx, tg)):
        np.testing.assert_allclose(got, want.grad.numpy(), rtol=1e-12, atol=1e-13)


def test_backends_and_dtypes(backend, rng):
    x, g, b, dout = rng.standard_normal((2, 5)), rng.standard_normal(5), rng.standard_normal(5), rng.standard_normal((2, 5))
    y, cache = layernorm_forward(*(backend.asarray(a) for a in (x, g, b)))
    grads = layernorm_backward(backend.asarray(dout), cache)
    y_np, c_np = layernorm_forward(x, g, b)
    np.testing.assert_allclose(backend.numpy(y), y_np, rtol=1e-14)
    for got, want in zip(grads, layernorm_backward(dout, c_np)):
        np.testing.assert_allclose(backend.numpy(got), want, rtol=1e-12, atol=1e-14)
    y32, c32 = rmsnorm_forward(x.astype(np.float32), g.astype(np.float32))
    assert y32.dtype == np.float32 and rmsnorm_backward(dout.astype(np.float32), c32)[0].dtype == np.float32


def test_inputs_not_modified(rng):
    x, g, b, dout = rng.standard_normal((3, 4)), rng.standard_normal(4), rng.standard_normal(4), rng.standard_normal((3, 4))
    saved = [a.copy() for a in (x, g, b, dout)]
    layernorm_backward(dout, layernorm_forward(x, g, b)[1])
    rmsnorm_backward(dout, rmsnorm_forward(x, g)[1])
    assert all(np.array_equal(a, s) for a, s in zip((x, g, b, dout), saved))


def test_bad_input(rng):
    x = rng.standard_normal((3, 4))
    with pytest.raises(ValueError, match=r"gamma must have shape \(4,\)"):
        layernorm_forward(x, rng.standard_normal(3))
    with pytest.raises(ValueError, match=r"beta must have shape \(4,\)"):
        layernorm_forward(x, None, rng.standard_normal(5))
    with pytest.raises(TypeError, match="gamma is float32"):
        rmsnorm_forward(x, np.ones(4, dtype=np.float32))
    with pytest.raises(ValueError, match="eps must be"):
        rmsnorm_forward(x, eps=-1.0)
    with pytest.raises(TypeError, match="x must be a real floating array"):
        layernorm_forward(np.ones((2, 3), dtype=np.int32))
    with pytest.raises(ValueError, match="dout must have the output's shape"):
        layernorm_backward(np.ones((3, 5)), layernorm_forward(x)[1])
