"""npattn/ops/linear.py: forward vs an explicit sum, gradients, backends, and bad input."""

import numpy as np
import pytest

from npattn import gradcheck, linear_backward, linear_forward


def test_forward_matches_explicit_sum(rng):
    x, w, b = rng.standard_normal((2, 3, 4)), rng.standard_normal((4, 5)), rng.standard_normal(5)
    y, _ = linear_forward(x, w, b)
    expected = np.zeros((2, 3, 5))
    for i, j, o in np.ndindex(2, 3, 5):
        expected[i, j, o] = sum(x[i, j, e] * w[e, o] for e in range(4)) + b[o]
    np.testing.assert_allclose(y, expected, rtol=1e-13)


@pytest.mark.parametrize("x_shape", [(4,), (3, 4), (2, 3, 4)])
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck(rng, x_shape, bias):
    inputs = dict(x=rng.standard_normal(x_shape), w=rng.standard_normal((4, 5)),
                  b=rng.standard_normal(5) if bias else None)
    report = gradcheck(linear_forward, linear_backward, inputs)
    assert report.ok, report
    assert [r.name for r in report.rows] == (["x", "w", "b"] if bias else ["x", "w"])


def test_no_bias_gives_db_none(rng):
    y, cache = linear_forward(rng.standard_normal((3, 4)), rng.standard_normal((4, 2)))
    assert linear_backward(np.ones_like(y), cache)[2] is None


def test_backends(backend, rng):
    x, w, b, dout = (rng.standard_normal(s) for s in [(2, 3, 4), (4, 5), (5,), (2, 3, 5)])
    y, cache = linear_forward(*(backend.asarray(a) for a in (x, w, b)))
    grads = linear_backward(backend.asarray(dout), cache)
    y_np, c_np = linear_forward(x, w, b)
    np.testing.assert_allclose(backend.numpy(y), y_np, rtol=1e-14)
    for got, want in zip(grads, linear_backward(dout, c_np)):
        np.testing.assert_allclose(backend.numpy(got), want, rtol=1e-13)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_dtypes_are_kept(rng, dtype):
    x, w, b = (rng.standard_normal(s).astype(dtype) for s in [(3, 4), (4, 5), (5,)])
    y, cache = linear_forward(x, w, b)
    assert y.dtype == dtype
    assert all(g.dtype == dtype for g in linear_backward(np.ones_like(y), cache))


def test_inputs_not_modified(rng):
    x, w, b, dout = (rng.standard_normal(s) for s in [(3, 4), (4, 5), (5,), (3, 5)])
    saved = [a.copy() for a in (x, w, b, dout)]
    _, cache = linear_forward(x, w, b)
    linear_backward(dout, cache)
    assert all(np.array_equal(a, s) for a, s in zip((x, w, b, dout), saved))


def test_bad_input(rng):
    x, w = rng.standard_normal((3, 4)), rng.standard_normal((4, 5))
    with pytest.raises(ValueError, match=r"x's last axis \(4\) must equal w's first \(3\)"):
        linear_forward(x, rng.standard_normal((3, 5)))
    with pytest.raises(ValueError, match="w must be 2-D"):
        linear_forward(x, rng.standard_normal(4))
    with pytest.raises(ValueError, match=r"b must have shape \(5,\)"):
        linear_forward(x, w, rng.standard_normal(4))
    with pytest.raises(TypeError, match="arrays must share one dtype: x is float64, w is float32"):
        linear_forward(x, w.astype(np.float32))
    with pytest.raises(TypeError, match="x must be a real floating array, got dtype int64"):
        linear_forward(np.ones((3, 4), dtype=np.int64), w)
