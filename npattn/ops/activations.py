"""Elementwise activations: GELU (exact and tanh), ReLU, SiLU; forward and hand-derived backward.

Every backward here is ``dx = dout * f'(x)`` (a diagonal Jacobian, derivations/08-activations.md,
eq. (8.1)); what differs is ``f'``:
    relu:        f = max(x, 0),                      f' = [x > 0]                         eq. (8.2)
    silu:        f = x sigma(x),                     f' = sigma(x) (1 + x (1 - sigma(x)))  eq. (8.3)
    gelu "none": f = x Phi(x),  Phi = (1 + erf(x/sqrt 2)) / 2,   f' = Phi(x) + x phi(x)  eq. (8.4)
    gelu "tanh": f = x (1 + tanh u) / 2,  u = sqrt(2/pi) (x + 0.044715 x^3)             eq. (8.5)
                 f' = (1 + tanh u) / 2 + x (1 - tanh^2 u) sqrt(2/pi) (1 + 3 0.044715 x^2) / 2

NumPy and the array API standard have no ``erf``. ``erf`` below computes it with array-API
operations only, so exact GELU runs unchanged on NumPy, CuPy, torch and ``array_api_strict``:
a positive-term series below |x| = 2 and a continued fraction for erfc above, eqs. (8.6)-(8.7),
accurate to 6e-16 absolute (measured against ``scipy.special.erf`` on 2 million points in the tests).
"""

from __future__ import annotations

import math
from typing import NamedTuple

from ..backend import check_cache, check_dout, check_float, namespace, to_compute

__all__ = ["erf", "relu_forward", "relu_backward", "silu_forward", "silu_backward",
           "gelu_forward", "gelu_backward", "ActivationCache"]

GELU_TANH_C = 0.044715                       # the cubic coefficient of GPT-2's tanh GELU (Hendrycks & Gimpel)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_ERF_SPLIT = 2.0                             # series below, continued fraction above (eqs. (8.6), (8.7))
_ERF_SERIES_TERMS = 32                       # (2x^2)^n / (2n+1)!! < 1e-17 of the sum for n > 32 at x = 2
_ERF_CF_TERMS = 48                           # the continued fraction has converged to 1 ulp at x = 2


class ActivationCache(NamedTuple):
    """Saved for the backward: the input ``x`` (each ``f'`` is a function of x) and which
    activation it was; nothing else, the derivative is recomputed from ``x``."""

    x: object  # (...), the input
    kind: str  # "relu", "silu", "gelu_none" or "gelu_tanh"


def erf(x):
    """The error function ``erf(x) = 2/sqrt(pi) * integral_0^x exp(-t^2) dt`` in array-API code.

    |x| < 2: ``erf(a) = 2/sqrt(pi) a exp(-a^2) sum_n (2a^2)^n / (1*3*...*(2n+1))``, eq. (8.6), a
    series of positive terms (no cancellation), summed in Horner form.
    |x| >= 2: ``erfc(a) = exp(-a^2)/sqrt(pi) / (a + (1/2)/(a + 1/(a + (3/2)/(a + ...))))``,
    eq. (8.7), evaluated from the bottom, and ``erf = 1 - erfc``. ``erf(-x) = -erf(x)``.
    Max abs error 6e-16 in float64. Derivation: derivations/08-activations.md, eqs. (8.6)-(8.7).
    """
    xp = namespace(x=x)
    check_float(xp, "x", x)
    a = xp.abs(x)
    split = xp.full_like(a, _ERF_SPLIT)
    # eq. (8.6) on s = min(a, 2): 1 + c_1 (1 + c_2 (1 + ...)), c_n = 2 s^2 / (2n + 1)
    s = xp.minimum(a, split)
    two_s2 = 2.0 * s * s
    total = xp.ones_like(s)
    for n in range(_ERF_SERIES_TERMS, 0, -1):
        total = 1.0 + total * two_s2 / (2 * n + 1)
    small = (2.0 / math.sqrt(math.pi)) * s * xp.exp(-s * s) * total
    # eq. (8.7) on b = max(a, 2): the continued fraction's tail first
    b = xp.maximum(a, split)
    f = b
    for k in range(_ERF_CF_TERMS, 0, -1):
        f = b + (k / 2.0) / f
    large = 1.0 - xp.exp(-b * b) / (math.sqrt(math.pi) * f)
    r = xp.where(a < split, small, large)
    return xp.where(x < 0, -r, r)


def _sigmoid(xp, x):
    """``1 / (1 + exp(-x))`` without overflow: ``exp`` only ever sees ``-|x|``."""
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _prepare(x):
    xp = namespace(x=x)
    check_float(xp, "x", x)
    return xp, to_compute(xp, x)


def _finish(xp, y, x, kind):
    return xp.astype(y, x.dtype, copy=False), ActivationCache(x=x, kind=kind)


def _derivative(dout, cache: ActivationCache, kind: str):
    """``(xp, dout, x)`` in the compute dtype, after checking ``dout`` and the cache's kind."""
    check_cache(cache, ActivationCache, f"{kind.split('_')[0]}_forward")
    if cache.kind != kind:
        raise TypeError(f"cache is from {cache.kind!r}, not {kind!r}: pass it to its own backward")
    xp = namespace(dout=dout, x=cache.x)
    check_dout(xp, dout, cache.x.shape, cache.x.dtype)
    return xp, to_compute(xp, dout), to_compute(xp, cache.x)


def relu_forward(x):
    """``y = max(x, 0)``. Derivation: derivations/08-activations.md, eq. (8.2)."""
    xp, xc = _prepare(x)
    return _finish(xp, xp.where(xc < 0, xp.zeros_like(xc), xc), x, "relu")    # NaN < 0 is False: NaN stays


def relu_backward(dout, cache: ActivationCache):
    """``dx = dout * [x > 0]`` (the subgradient 0 at x = 0, as torch). eq. (8.2)."""
    xp, dout_c, xc = _derivative(dout, cache, "relu")
    dx = xp.where(xc > 0, dout_c, xp.zeros_like(dout_c))
    return xp.astype(dx, cache.x.dtype, copy=False)


def silu_forward(x):
    """``y = x sigma(x)`` (SiLU, Swish-1; the gate of Llama's SwiGLU). eq. (8.3)."""
    xp, xc = _prepare(x)
    return _finish(xp, xc * _sigmoid(xp, xc), x, "silu")


def silu_backward(dout, cache: ActivationCache):
    """``dx = dout * sigma(x) (1 + x (1 - sigma(x)))``. Derivation: derivations/08-activations.md, eq. (8.3)."""
    xp, dout_c, xc = _derivative(dout, cache, "silu")
    sig = _sigmoid(xp, xc)
    return xp.astype(dout_c * sig * (1.0 + xc * (1.0 - sig)), cache.x.dtype, copy=False)


def _tanh_u(xp, xc):
    return xp.tanh(_SQRT_2_OVER_PI * (xc + GELU_TANH_C * xc * xc * xc))


def gelu_forward(x, *, approximate: str = "none"):
    """GELU, as ``torch.nn.functional.gelu``: ``"none"`` is ``x Phi(x)`` with the exact normal CDF
    (eq. (8.4), through ``erf``), ``"tanh"`` GPT-2's approximation (eq. (8.5))."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    xp, xc = _prepare(x)
    if approximate == "tanh":
        y = 0.5 * xc * (1.0 + _tanh_u(xp, xc))                              # eq. (8.5)
    else:
        y = 0.5 * xc * (1.0 + erf(xc / math.sqrt(2.0)))                     # eq. (8.4)
    return _finish(xp, y, x, f"gelu_{approximate}")


def gelu_backward(dout, cache: ActivationCache):
    """``dx = dout * f'(x)`` for either GELU form. Derivation: derivations/08-activations.md,
    eqs. (8.4)-(8.5)."""
    kind = getattr(cache, "kind", None) if getattr(cache, "kind", None) in ("gelu_none", "gelu_tanh") else "gelu_none"
    xp, dout_c, xc = _derivative(dout, cache, kind)
    if kind == "gelu_tanh":
        t = _tanh_u(xp, xc)
        du = _SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_TANH_C * xc * xc)
        d = 0.5 * (1.0 + t) + 0.5 * xc * (1.0 - t * t) * du                  # eq. (8.5)
    else:
        cdf = 0.5 * (1.0 + erf(xc / math.sqrt(2.0)))
        pdf = xp.exp(-0.5 * xc * xc) / math.sqrt(2.0 * math.pi)
        d = cdf + xc * pdf                                                   # eq. (8.4)
    return xp.astype(dout_c * d, cache.x.dtype, copy=False)
