"""npattn/ops/activations.py: erf vs SciPy, each activation vs an obvious formula and torch,
gradients, planted bugs, backends, bad input."""

import math

import numpy as np
import pytest
from scipy import special

from npattn import (
    gelu_backward,
    gelu_forward,
    gradcheck,
    relu_backward,
    relu_forward,
    silu_backward,
    silu_forward,
)
from npattn.ops import erf

PAIRS = {
    "relu": (relu_forward, relu_backward, {}),
    "silu": (silu_forward, silu_backward, {}),
    "gelu": (gelu_forward, gelu_backward, {}),
    "gelu_tanh": (gelu_forward, gelu_backward, dict(approximate="tanh")),
}


def obvious(kind, x):
    """Each activation from its textbook formula, element by element, with math.erf."""
    f = {"relu": lambda t: max(t, 0.0),
         "silu": lambda t: t / (1 + math.exp(-t)),
         "gelu": lambda t: 0.5 * t * (1 + math.erf(t / math.sqrt(2))),
         "gelu_tanh": lambda t: 0.5 * t * (1 + math.tanh(math.sqrt(2 / math.pi) * (t + 0.044715 * t ** 3)))}[kind]
    return np.vectorize(f)(x)


def test_erf_matches_scipy_within_its_error_budget():
    x = np.linspace(-9, 9, 2_000_001)
    # derivations/08: the longest Horner chain rounds 48 times by at most half an ulp of a value
    # below 1 (24 ulp(0.5) = 2.7e-15); measured 6.7e-16 on AMD EPYC with AVX2 and with AVX-512
    assert np.max(np.abs(erf(x) - special.erf(x))) <= 24 * np.spacing(0.5)
    tiny = np.linspace(-1e-3, 1e-3, 10_001)
    np.testing.assert_allclose(erf(tiny), special.erf(tiny), rtol=1e-15, atol=0)   # relative near 0
    assert erf(np.array([np.inf, -np.inf]) ).tolist() == [1.0, -1.0]
    assert np.isnan(erf(np.array([np.nan])))[0]


def test_erf_float32():
    x = np.linspace(-5, 5, 10_001).astype(np.float32)
    assert erf(x).dtype == np.float32
    assert np.max(np.abs(erf(x) - special.erf(x.astype(np.float64)))) < 5e-7


@pytest.mark.parametrize("kind", PAIRS)
def test_forward_matches_formula(rng, kind):
    f, _, kw = PAIRS[kind]
    x = np.concatenate([rng.standard_normal(50) * 3, [-12.0, -3.0, 0.0, 1e-9, 3.0, 12.0]])
    np.testing.assert_allclose(f(x, **kw)[0], obvious(kind, x), rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("kind", PAIRS)
def test_gradcheck(rng, kind):
    f, b, kw = PAIRS[kind]
    x = rng.standard_normal((3, 7)) * 2
    x = np.where(np.abs(x) < 1e-3, 0.5, x)                  # keep ReLU's kink out of the differences
    report = gradcheck(f, b, dict(x=x), kwargs=kw)
    assert report.ok, report


@pytest.mark.parametrize("kind", PAIRS)
def test_matches_torch(rng, kind):
    torch = pytest.importorskip("torch")
    f, b, kw = PAIRS[kind]
    x, dout = rng.standard_normal((4, 9)) * 3, rng.standard_normal((4, 9))
    tf = {"relu": torch.relu, "silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu,
          "gelu_tanh": lambda t: torch.nn.functional.gelu(t, approximate="tanh")}[kind]
    tx = torch.tensor(x, requires_grad=True)
    ty = tf(tx)
    ty.backward(torch.tensor(dout))
    y, cache = f(x, **kw)
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(b(dout, cache), tx.grad.numpy(), rtol=1e-13, atol=1e-14)   # f' crosses 0


def gelu_backward_without_pdf_term(dout, cache):
    """The planted bug: f'(x) = Phi(x), forgetting the x phi(x) term of the product rule."""
    x = cache.x
    return dout * 0.5 * (1 + special.erf(x / math.sqrt(2)))


def silu_backward_sigmoid_only(dout, cache):
    return dout / (1 + np.exp(-cache.x))


def test_planted_bugs_fail(rng):
    x = rng.standard_normal((3, 5)) * 2
    assert not gradcheck(gelu_forward, gelu_backward_without_pdf_term, dict(x=x)).ok
    assert not gradcheck(silu_forward, silu_backward_sigmoid_only, dict(x=x)).ok


def test_large_inputs_no_overflow_no_nan():
    x = np.array([-800.0, -50.0, 50.0, 800.0])
    for kind, (f, b, kw) in PAIRS.items():
        y, cache = f(x, **kw)
        dx = b(np.ones_like(x), cache)
        assert np.all(np.isfinite(y)) and np.all(np.isfinite(dx)), kind
    nan_in = np.array([np.nan, 1.0])
    for kind, (f, _, kw) in PAIRS.items():
        assert np.isnan(f(nan_in, **kw)[0][0]), f"{kind} hid a NaN"


@pytest.mark.parametrize("kind", PAIRS)
def test_backends(backend, rng, kind):
    f, b, kw = PAIRS[kind]
    x, dout = rng.standard_normal((2, 6)), rng.standard_normal((2, 6))
    y, cache = f(backend.asarray(x), **kw)
    dx = b(backend.asarray(dout), cache)
    y_np, c_np = f(x, **kw)
    np.testing.assert_allclose(backend.numpy(y), y_np, rtol=1e-14, atol=1e-16)
    np.testing.assert_allclose(backend.numpy(dx), b(dout, c_np), rtol=1e-14, atol=1e-16)


def test_dtypes_and_inputs_not_modified(rng):
    x = rng.standard_normal((3, 4)).astype(np.float32)
    dout = rng.standard_normal((3, 4)).astype(np.float32)
    saved = x.copy(), dout.copy()
    for f, b, kw in PAIRS.values():
        y, cache = f(x, **kw)
        assert y.dtype == np.float32 and b(dout, cache).dtype == np.float32
    assert np.array_equal(x, saved[0]) and np.array_equal(dout, saved[1])


def test_bad_input(rng):
    with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh'"):
        gelu_forward(np.ones(3), approximate="fast")
    with pytest.raises(TypeError, match="x must be a real floating array"):
        relu_forward(np.arange(3))
    _, cache = relu_forward(np.ones(3))
    with pytest.raises(TypeError, match="cache is from 'relu', not 'silu'"):
        silu_backward(np.ones(3), cache)
    with pytest.raises(ValueError, match="dout must have the output's shape"):
        relu_backward(np.ones(4), cache)
