"""npattn/gradcheck.py: it passes correct pairs and, just as important, fails broken ones."""

import numpy as np
import pytest

from npattn import (
    attention_backward,
    attention_forward,
    gradcheck,
    linear_backward,
    linear_forward,
    softmax_backward,
    softmax_forward,
)
from npattn.ops import flash_attention_backward, flash_attention_forward


def softmax_backward_without_subtraction(dout, cache):
    """A classic mistake: dx = y * dout, forgetting the - sum(dout * y) term of eq. (2.7)."""
    return cache.y * dout


def softmax_backward_diagonal_only(dout, cache):
    """Another: using only the Jacobian's diagonal y (1 - y)."""
    return cache.y * (1 - cache.y) * dout


def attention_backward_unscaled(dout, cache):
    """Forgets the 1/sqrt(D) factor in dq and dk."""
    dq, dk, dv = attention_backward(dout, cache)
    return dq / cache.scale, dk / cache.scale, dv


def attention_backward_transposed_dk(dout, cache):
    """dk from ds instead of ds^T (only shape-compatible when N == M)."""
    q, k, v, p, *_ = cache
    dq, dk, dv = attention_backward(dout, cache)
    dp = dout @ np.swapaxes(v, -1, -2)
    ds = p * (dp - (p * dp).sum(-1, keepdims=True))
    return dq, cache.scale * ds @ q, dv


def linear_backward_wrong_db(dout, cache):
    dx, dw, db = linear_backward(dout, cache)
    return dx, dw, db.mean() * np.ones_like(db)


def flash_backward_ignoring_dlse(douts, cache):
    return flash_attention_backward(douts[0], cache)


def flash_lse_forward(q, k, v, **kw):
    o, cache = flash_attention_forward(q, k, v, **kw)
    return (o, cache.lse), cache


@pytest.fixture
def qkv(rng):
    return dict(q=rng.standard_normal((2, 3, 4, 3)), k=rng.standard_normal((2, 3, 4, 3)),
                v=rng.standard_normal((2, 3, 4, 2)))


@pytest.mark.parametrize("mode", ["full", "directional"])
@pytest.mark.parametrize("broken", [softmax_backward_without_subtraction, softmax_backward_diagonal_only])
def test_broken_softmax_backward_fails(rng, mode, broken):
    report = gradcheck(softmax_forward, broken, dict(x=rng.standard_normal((3, 5))), mode=mode)
    assert not report.ok
    assert report.rows[0].max_rel_err > 1e-2


@pytest.mark.parametrize("mode", ["full", "directional"])
def test_broken_attention_backwards_fail(qkv, mode):
    unscaled = gradcheck(attention_forward, attention_backward_unscaled, qkv, mode=mode)
    assert [r.ok for r in unscaled.rows] == [False, False, True]
    transposed = gradcheck(attention_forward, attention_backward_transposed_dk, qkv, mode=mode)
    assert [r.ok for r in transposed.rows] == [True, False, True]


def test_broken_linear_and_dlse_fail(rng, qkv):
    inputs = dict(x=rng.standard_normal((3, 4)), w=rng.standard_normal((4, 2)), b=rng.standard_normal(2))
    assert [r.ok for r in gradcheck(linear_forward, linear_backward_wrong_db, inputs).rows] == [True, True, False]
    report = gradcheck(flash_lse_forward, flash_backward_ignoring_dlse, qkv, kwargs=dict(block_q=3, block_k=2))
    assert not report.ok


def test_correct_pairs_pass_in_both_modes(qkv):
    for mode in ("full", "directional"):
        report = gradcheck(attention_forward, attention_backward, qkv, kwargs=dict(causal=True), mode=mode)
        assert report.ok, report
        assert [r.name for r in report.rows] == ["q", "k", "v"]
        assert all(r.max_rel_err < 1e-7 for r in report.rows)


def test_float32_pair_against_float64_truth(rng):
    x = rng.standard_normal((3, 5)).astype(np.float32)
    report = gradcheck(softmax_forward, softmax_backward, [x], rtol=1e-5, atol=1e-6)
    assert report.ok and report.rows[0].name == "arg0"
    assert 1e-12 < report.rows[0].max_rel_err < 1e-5                   # float32 rounding is visible


def test_float32_pair_with_a_float_mask_in_kwargs(rng):
    # the mask must match the inputs' dtype: float32 for the analytic run, float64 for the numeric one
    q, k, v = (rng.standard_normal((2, 4, 3)).astype(np.float32) for _ in range(3))
    mask = rng.standard_normal((4, 4)).astype(np.float32)
    report = gradcheck(attention_forward, attention_backward, dict(q=q, k=k, v=v),
                       kwargs=dict(mask=mask, causal=True), rtol=1e-4, atol=1e-6)
    assert report.ok, report
    assert mask.dtype == np.float32                                       # the caller's mask untouched


def test_nan_gradient_is_not_ok(rng):
    report = gradcheck(softmax_forward, lambda d, c: d * np.nan, [rng.standard_normal((2, 3))])
    assert not report.ok


def test_wrong_shape_gradient_is_not_ok(rng):
    report = gradcheck(softmax_forward, lambda d, c: d[:, :1], [rng.standard_normal((2, 3))])
    assert not report.ok and report.rows[0].max_abs_err == float("inf")


def test_report_prints_a_table(qkv):
    text = str(gradcheck(attention_forward, attention_backward, qkv))
    assert text.splitlines()[0].split()[:2] == ["input", "shape"]
    assert len(text.splitlines()) == 4 and "(2, 3, 4, 3)" in text


def test_bad_arguments(rng):
    with pytest.raises(ValueError, match="mode must be 'full' or 'directional'"):
        gradcheck(softmax_forward, softmax_backward, [rng.standard_normal(3)], mode="fast")
    with pytest.raises(ValueError, match="eps must be > 0"):
        gradcheck(softmax_forward, softmax_backward, [rng.standard_normal(3)], eps=0)


def test_gradcheck_reports_relative_error_against_the_numeric_gradient():
    """Planted: the denominator max|analytic| (or any other) instead of max|numeric|."""
    seen = {}

    def forward(x):
        return 2.0 * x, None

    def backward(dout, cache):
        seen["dout"] = dout
        grad = 2.0 * dout
        worst = np.argmax(np.abs(dout))
        grad[worst] += 0.5 * np.sign(dout[worst])         # a known error, on the largest entry
        return (grad,)

    report = gradcheck(forward, backward, {"x": np.array([0.3, -1.2, 0.7, 2.0])}, rtol=1e-9, atol=0)
    (row,) = report.rows
    numeric_max = 2.0 * np.max(np.abs(seen["dout"]))     # the numeric gradient is 2 dout (linear: no truncation)
    # the differences' only error is cancellation, ~2^-52 |L| / eps ~ 1e-9 relative here: rel=1e-8 holds it
    assert row.max_abs_err == pytest.approx(0.5, rel=1e-8)
    assert row.max_rel_err == pytest.approx(0.5 / numeric_max, rel=1e-8)
    assert row.max_rel_err != pytest.approx(0.5 / (numeric_max + 0.5), rel=1e-3)
    assert not row.ok and not report.ok
    loose = gradcheck(forward, backward, {"x": np.array([0.3, -1.2, 0.7, 2.0])}, rtol=0.5 / numeric_max * 1.01,
                      atol=0)
    assert loose.ok                                       # ok iff abs <= atol + rtol * max|numeric|


def test_only_integer_inputs_is_an_error():
    """Before: ok with 0 rows, a check that checked nothing."""
    with pytest.raises(ValueError, match="inputs must hold at least one floating array"):
        gradcheck(lambda i: (i * 1.0, None), lambda d, c: (None,), {"ids": np.array([[1, 2]])})
