"""npattn/ops/softmax.py: forward vs SciPy, closed-form backward vs explicit Jacobian and finite
differences, properties, backends, and bad input."""

import numpy as np
import pytest
import scipy.special
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from npattn import gradcheck, softmax, softmax_backward, softmax_forward, softmax_jacobian

finite_rows = arrays(np.float64, st.tuples(st.integers(1, 3), st.integers(2, 6)),
                     elements=st.floats(-30, 30, allow_nan=False))


@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_forward_matches_scipy(rng, axis):
    x = rng.standard_normal((3, 4, 5)) * 5
    np.testing.assert_allclose(softmax(x, axis=axis), scipy.special.softmax(x, axis=axis), rtol=1e-13, atol=0)


def test_large_logits_do_not_overflow():
    x = np.array([[1000.0, 1001.0, 999.0], [-1000.0, -1001.0, -1002.0]])
    y = softmax(x)
    np.testing.assert_allclose(y, scipy.special.softmax(x, axis=-1), rtol=1e-13)
    assert np.all(np.isfinite(y))


@pytest.mark.parametrize("axis", [-1, 1])
def test_gradcheck(rng, axis):
    report = gradcheck(softmax_forward, softmax_backward, dict(x=rng.standard_normal((2, 4, 3))), kwargs=dict(axis=axis))
    assert report.ok, report


def test_backward_equals_jacobian_transpose_times_dout(rng):
    x = rng.standard_normal((2, 3, 6))
    dout = rng.standard_normal(x.shape)
    y, cache = softmax_forward(x)
    jac = softmax_jacobian(y)                                          # (2, 3, 6, 6)
    expected = np.einsum("...ij,...i->...j", jac, dout)                # J^T dout, the slow way
    np.testing.assert_allclose(softmax_backward(dout, cache), expected, rtol=1e-12, atol=1e-15)


def test_jacobian_matches_finite_differences(rng):
    x = rng.standard_normal(5)
    eps = 1e-6
    numeric = np.stack([(softmax(x + eps * e) - softmax(x - eps * e)) / (2 * eps) for e in np.eye(5)], axis=1)
    np.testing.assert_allclose(softmax_jacobian(softmax(x)), numeric, atol=1e-9)


def test_jacobian_is_symmetric_with_zero_row_sums(rng):
    jac = softmax_jacobian(softmax(rng.standard_normal((4, 7))))
    np.testing.assert_allclose(jac, np.swapaxes(jac, -1, -2), atol=0)
    np.testing.assert_allclose(jac.sum(-1), 0, atol=1e-15)


@given(finite_rows)
def test_rows_sum_to_one_and_are_shift_invariant(x):
    y = softmax(x)
    np.testing.assert_allclose(y.sum(-1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(softmax(x + 17.5), y, rtol=1e-9, atol=1e-15)


@given(finite_rows, st.integers(0, 2**32 - 1))
def test_gradient_sums_to_zero(x, seed):
    dout = np.random.default_rng(seed).standard_normal(x.shape)
    y, cache = softmax_forward(x)
    dx = softmax_backward(dout, cache)
    np.testing.assert_allclose(dx.sum(-1), 0.0, atol=1e-12 * (1 + np.abs(dout).max()))


@given(st.integers(1, 3), st.integers(2, 6))
def test_fully_masked_rows_give_zero(rows, cols):
    x = np.full((rows, cols), -np.inf)
    y, cache = softmax_forward(x)
    assert np.array_equal(y, np.zeros_like(x))
    dx = softmax_backward(np.ones_like(x), cache)
    assert np.array_equal(dx, np.zeros_like(x))


def test_partially_masked_row_ignores_masked_entries(rng):
    x = rng.standard_normal((2, 5))
    x[0, [1, 3]] = -np.inf
    y = softmax(x)
    assert y[0, 1] == 0 and y[0, 3] == 0
    np.testing.assert_allclose(y[0, [0, 2, 4]], scipy.special.softmax(x[0, [0, 2, 4]]), rtol=1e-13)


def test_nan_propagates():
    y = softmax(np.array([[1.0, np.nan, 2.0], [1.0, 2.0, 3.0]]))
    assert np.all(np.isnan(y[0])) and np.all(np.isfinite(y[1]))


def test_backends(backend, rng):
    x = rng.standard_normal((2, 3, 5))
    dout = rng.standard_normal(x.shape)
    xb = backend.asarray(x)
    y, cache = softmax_forward(xb, axis=1)
    assert type(y) is type(xb) and y.dtype == xb.dtype and y.shape == xb.shape
    dx = softmax_backward(backend.asarray(dout), cache)
    y_np, c_np = softmax_forward(x, axis=1)
    np.testing.assert_allclose(backend.numpy(y), y_np, rtol=1e-14)
    np.testing.assert_allclose(backend.numpy(dx), softmax_backward(dout, c_np), rtol=1e-13)
    np.testing.assert_allclose(backend.numpy(softmax_jacobian(y)), softmax_jacobian(y_np), rtol=1e-14)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_dtypes_are_kept(rng, dtype):
    x = rng.standard_normal((3, 4)).astype(dtype)
    y, cache = softmax_forward(x)
    assert y.dtype == dtype
    np.testing.assert_allclose(y, scipy.special.softmax(x.astype(np.float64), axis=-1),
                               rtol=1e-2 if dtype == np.float16 else 1e-6)
    assert softmax_backward(np.ones_like(x), cache).dtype == dtype


def test_inputs_not_modified(rng):
    x = rng.standard_normal((3, 4))
    dout = rng.standard_normal((3, 4))
    x0, dout0 = x.copy(), dout.copy()
    y, cache = softmax_forward(x)
    y0 = y.copy()
    softmax_backward(dout, cache)
    assert np.array_equal(x, x0) and np.array_equal(dout, dout0) and np.array_equal(cache.y, y0)


@pytest.mark.parametrize("bad, err, words", [
    (np.arange(6).reshape(2, 3), TypeError, "x must be a real floating array"),
    (np.ones((2, 3), dtype=bool), TypeError, "dtype bool"),
    (np.float64(1.0), ValueError, "at least one axis"),
    ([1.0, 2.0], TypeError, "x must be an array"),
])
def test_bad_input(bad, err, words):
    with pytest.raises(err, match=words):
        softmax_forward(np.asarray(bad) if not isinstance(bad, list) else bad)


def test_bad_axis_and_dout(rng):
    x = rng.standard_normal((2, 3))
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        softmax_forward(x, axis=2)
    _, cache = softmax_forward(x)
    with pytest.raises(ValueError, match=r"dout must have the output's shape \(2, 3\)"):
        softmax_backward(np.ones((3, 2)), cache)
    with pytest.raises(TypeError, match="dout must have the output's dtype float64"):
        softmax_backward(np.ones((2, 3), dtype=np.float32), cache)
