"""npattn/ops/cross_entropy.py and log_softmax: vs explicit loops and torch (ignore index, label
smoothing, soft targets), gradients, never NaN, bad input."""

import numpy as np
import pytest
from scipy.special import log_softmax as scipy_log_softmax
from scipy.special import softmax as scipy_softmax

from npattn import cross_entropy_backward, cross_entropy_forward, gradcheck, log_softmax_backward, log_softmax_forward


def ce_loop(logits, target, ignore_index=-100, eps=0.0):
    c = logits.shape[-1]
    total, count = 0.0, 0
    for idx in np.ndindex(*logits.shape[:-1]):
        if target[idx] == ignore_index:
            continue
        logp = scipy_log_softmax(logits[idx])
        total += -(1 - eps) * logp[target[idx]] - eps * logp.sum() / c
        count += 1
    return total / count


def test_log_softmax_matches_scipy_and_gradcheck(rng):
    x = rng.standard_normal((3, 4, 5)) * 4
    for axis in (-1, 1):
        y, _ = log_softmax_forward(x, axis=axis)
        np.testing.assert_allclose(y, scipy_log_softmax(x, axis=axis), rtol=1e-13)
        report = gradcheck(log_softmax_forward, log_softmax_backward, dict(x=x), kwargs=dict(axis=axis))
        assert report.ok, report


def test_log_softmax_extreme_and_masked():
    y, cache = log_softmax_forward(np.array([[1000.0, 0.0, -1000.0], [-np.inf, -np.inf, -np.inf]]))
    assert y[0].tolist() == [0.0, -1000.0, -2000.0]             # no log of an underflowed p
    assert np.all(y[1] == -np.inf)                              # log 0, not NaN
    assert not np.isnan(log_softmax_backward(np.ones((2, 3)), cache)).any()


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_forward_matches_loop(rng, eps):
    logits, target = rng.standard_normal((3, 5, 7)), rng.integers(0, 7, (3, 5))
    target[0, 2] = target[2, 4] = -100
    loss, _ = cross_entropy_forward(logits, target, label_smoothing=eps)
    assert float(loss) == pytest.approx(ce_loop(logits, target, eps=eps), rel=1e-13)
    assert loss.shape == () and loss.dtype == np.float64


@pytest.mark.parametrize("eps", [0.0, 0.25])
@pytest.mark.parametrize("soft", [False, True])
def test_gradcheck(rng, eps, soft):
    logits = rng.standard_normal((2, 3, 5))
    target = scipy_softmax(rng.standard_normal((2, 3, 5)), -1) if soft else rng.integers(0, 5, (2, 3))
    if not soft:
        target[1, 1] = 7
    # a soft target is a float array but gets no gradient: pass it as a keyword, not an input
    inputs, kwargs = (dict(logits=logits), dict(target=target)) if soft else (dict(logits=logits, target=target), {})
    report = gradcheck(cross_entropy_forward, cross_entropy_backward, inputs,
                       kwargs=dict(kwargs, label_smoothing=eps, ignore_index=7))
    assert report.ok, report
    assert [r.name for r in report.rows] == ["logits"]


@pytest.mark.parametrize("eps", [0.0, 0.2])
@pytest.mark.parametrize("soft", [False, True])
def test_matches_torch(rng, eps, soft):
    torch = pytest.importorskip("torch")
    logits = rng.standard_normal((4, 6, 9))
    target = scipy_softmax(rng.standard_normal((4, 6, 9)), -1) if soft else rng.integers(0, 9, (4, 6))
    if not soft:
        target[0, :3] = -100
    tl = torch.tensor(logits, requires_grad=True)
    tt = torch.tensor(target)
    want = torch.nn.functional.cross_entropy(tl.reshape(-1, 9), tt.reshape(-1, 9) if soft else tt.reshape(-1),
                                             label_smoothing=eps)
    want.backward(torch.tensor(2.5, dtype=torch.float64))
    loss, cache = cross_entropy_forward(logits, target, label_smoothing=eps)
    assert float(loss) == pytest.approx(want.item(), rel=1e-13)
    dlogits, none = cross_entropy_backward(np.asarray(2.5), cache)
    assert none is None
    np.testing.assert_allclose(dlogits, tl.grad.numpy(), rtol=1e-12, atol=1e-16)


def test_all_ignored_gives_zero_not_nan(rng):
    logits = rng.standard_normal((2, 3, 4))
    loss, cache = cross_entropy_forward(logits, np.full((2, 3), -100))
    assert float(loss) == 0.0
    assert np.all(cross_entropy_backward(1.0, cache)[0] == 0)


def cross_entropy_backward_without_count(dloss, cache):
    """The planted bug: the mean's 1/count forgotten (a sum's gradient for a mean's loss)."""
    dlogits, _ = cross_entropy_backward(dloss, cache)
    return dlogits * cache.count, None


def test_planted_bug_fails(rng):
    inputs = dict(logits=rng.standard_normal((3, 4)), target=rng.integers(0, 4, 3))
    assert not gradcheck(cross_entropy_forward, cross_entropy_backward_without_count, inputs).ok


def test_backends(backend, rng):
    logits, target = rng.standard_normal((3, 5)), rng.integers(0, 5, 3)
    loss, cache = cross_entropy_forward(backend.asarray(logits), backend.asarray(target), label_smoothing=0.1)
    want, c_np = cross_entropy_forward(logits, target, label_smoothing=0.1)
    assert float(backend.numpy(loss)) == pytest.approx(float(want), rel=1e-14)
    np.testing.assert_allclose(backend.numpy(cross_entropy_backward(1.0, cache)[0]),
                               cross_entropy_backward(1.0, c_np)[0], rtol=1e-14)


def test_float32_and_inputs_not_modified(rng):
    logits = rng.standard_normal((3, 5)).astype(np.float32)
    target = rng.integers(0, 5, 3)
    saved = logits.copy(), target.copy()
    loss, cache = cross_entropy_forward(logits, target)
    assert loss.dtype == np.float32 and cross_entropy_backward(1.0, cache)[0].dtype == np.float32
    assert np.array_equal(logits, saved[0]) and np.array_equal(target, saved[1])


def test_bad_input(rng):
    logits = rng.standard_normal((3, 5))
    with pytest.raises(ValueError, match=r"target must be class ids in \[0, 5\) or ignore_index=-100, got values from 0 to 5"):
        cross_entropy_forward(logits, np.array([0, 5, 1]))
    with pytest.raises(ValueError, match="target must have the logits' leading shape"):
        cross_entropy_forward(logits, np.array([0, 1]))
    with pytest.raises(ValueError, match="label_smoothing must be"):
        cross_entropy_forward(logits, np.array([0, 1, 2]), label_smoothing=1.5)
    with pytest.raises(TypeError, match="soft target must have the logits' dtype"):
        cross_entropy_forward(logits, np.ones((3, 5), dtype=np.float32))
    with pytest.raises(TypeError, match="target must be integer class ids or float probabilities"):
        cross_entropy_forward(logits, np.array([True, False, True]))
    _, cache = cross_entropy_forward(logits, np.array([0, 1, 2]))
    with pytest.raises(TypeError, match="dloss must be a real number or a 0-d array"):
        cross_entropy_backward(np.ones(2), cache)


def test_soft_targets_not_summing_to_one(rng):
    """Planted: the backward ``p - q`` instead of ``p * sum(q) - q`` (equal only when sum(q) = 1)."""
    logits = rng.standard_normal((2, 3, 5))
    target = 0.5 * rng.dirichlet(np.ones(5), size=(2, 3))              # each row sums to 0.5
    report = gradcheck(cross_entropy_forward, cross_entropy_backward, {"logits": logits}, kwargs={"target": target})
    assert report.ok, report
    _, cache = cross_entropy_forward(logits, target)
    dlogits, _ = cross_entropy_backward(1.0, cache)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    # eq. (10.5) with sum(q) = 0.5; both sides are a few float64 roundings of O(1) numbers, so 1e-12 is
    # thousands of ulps; atol for entries near 0, where q and p / 2 cancel
    np.testing.assert_allclose(dlogits, (0.5 * p - target) / 6, rtol=1e-12, atol=1e-15)
