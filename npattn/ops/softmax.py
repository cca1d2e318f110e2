"""Softmax: forward, closed-form backward, and the explicit Jacobian for teaching.

Shapes: ``x (..., n)`` along the softmax axis (any axis; the Jacobian uses the last).

Forward, in steps (derivations/02-softmax.md):
    1. m = max_j x_j                      eq. (2.4)   (a row of -inf keeps m = 0, see 00-notation)
    2. e_j = exp(x_j - m)                 eq. (2.4)
    3. l = sum_j e_j                      eq. (2.4)
    4. y_j = e_j / l                      eq. (2.1)   (l = 0, a fully masked row, gives y = 0)
Backward:
    dx = y * (dout - sum(dout * y))       eq. (2.7)

Log-softmax, the form cross-entropy uses (derivations/10-cross-entropy.md):
    y = x - m - log(l)                    eq. (10.1)
    dx = dout - exp(y) * sum(dout)        eq. (10.2)
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import numpy as np

from ..backend import check_cache, check_dout, check_float, device, exp_, namespace, to_compute

__all__ = ["softmax", "softmax_forward", "softmax_backward", "softmax_jacobian", "SoftmaxCache",
           "log_softmax_forward", "log_softmax_backward", "LogSoftmaxCache"]


class SoftmaxCache(NamedTuple):
    """What ``softmax_backward`` needs: the output ``y`` (the Jacobian is a function of y alone).

    Nothing is recomputed in the backward.
    """

    y: object  # (..., n) softmax output, in the input dtype
    axis: int


def _stable_softmax(xp, x, axis, *, overwrite: bool = False):
    """Steps 1-4 of the forward. Returns ``(y, m, l)``; ``m``, ``l`` keep their reduced axis.

    Shared with attention, which needs the same fully-masked-row rule (and ``m``, ``l`` for the
    log-sum-exp). Subtracting the max changes nothing (shift invariance) and keeps exp <= 1.
    ``overwrite=True`` lets it subtract in place in ``x`` and normalize in place in ``e``, for a
    caller whose ``x`` is its own scratch array (attention's scores): two fewer full-size arrays.
    Derivation: derivations/02-softmax.md, eqs. (2.2) and (2.4).
    """
    if x.shape[axis] == 0:                                    # no entries: nothing to normalize
        stat = xp.zeros(tuple(1 if a == axis % x.ndim else s for a, s in enumerate(x.shape)), dtype=x.dtype,
                        device=device(x))
        return xp.zeros_like(x), stat, stat                   # l = 0: like a fully masked row
    m = xp.max(x, axis=axis, keepdims=True)                   # (..., 1)
    # A row that is all -inf (fully masked) would give exp(-inf - -inf) = NaN; shift it by 0
    # instead, so its exponentials are exp(-inf) = 0 and its sum l is 0. NaN rows stay NaN.
    m = xp.where(m == -xp.inf, xp.zeros_like(m), m)
    if overwrite:
        x -= m                                                # in place: the caller's own scratch
        e = exp_(xp, x)                                       # (..., n), over x: no second full-size array
    else:
        e = xp.exp(x - m)                                     # (..., n)
    l = xp.sum(e, axis=axis, keepdims=True)                   # (..., 1)
    # y = e / l, with y = 0 where l == 0 (fully masked). Dividing by a (..., 1) reciprocal keeps
    # the full-size pass a single multiply; NaN in l still propagates (NaN == 0 is False).
    inv_l = xp.where(l == 0, xp.zeros_like(l), 1.0 / xp.where(l == 0, xp.ones_like(l), l))
    if overwrite:
        e *= inv_l                                            # in place: e is this call's own array
        return e, m, l
    return e * inv_l, m, l


def softmax(x, *, axis: int = -1):
    """Numerically stable softmax along ``axis``: ``y_j = exp(x_j) / sum_k exp(x_k)``.

    Rows that are entirely ``-inf`` give 0 (not NaN). Derivation: derivations/02-softmax.md,
    eq. (2.1), computed as eq. (2.4).
    """
    y, _ = softmax_forward(x, axis=axis)
    return y


def softmax_forward(x, *, axis: int = -1):
    """Forward of softmax along ``axis``, returning ``(y, cache)``.

    Parameters
    ----------
    x : array (..., n, ...)
        Real floating logits; ``-inf`` entries are masked out.
    axis : int
        The axis the probabilities sum over.

    Returns
    -------
    y : array, same shape and dtype as ``x``.
    cache : SoftmaxCache

    Derivation: derivations/02-softmax.md, eqs. (2.1) and (2.4).
    """
    xp = namespace(x=x)
    check_float(xp, "x", x)
    axis = _check_axis(x, axis)
    y, _, _ = _stable_softmax(xp, to_compute(xp, x), axis)
    y = xp.astype(y, x.dtype, copy=False)
    return y, SoftmaxCache(y=y, axis=axis)


def softmax_backward(dout, cache: SoftmaxCache):
    """Backward of softmax: ``dx = y * (dout - sum(dout * y))`` along the cached axis.

    This is ``J^T dout`` with ``J = diag(y) - y y^T`` (from dy_i/dx_j = y_i (delta_ij - y_j))
    applied without forming ``J``; each row of ``dx`` sums to zero.
    Derivation: derivations/02-softmax.md, eqs. (2.3) and (2.6)-(2.8).
    """
    check_cache(cache, SoftmaxCache, "softmax_forward")
    y, axis = cache
    xp = namespace(dout=dout, y=y)
    check_dout(xp, dout, y.shape, y.dtype)
    yc, dout_c = to_compute(xp, y), to_compute(xp, dout)
    # step 4 (y = e / l) and steps 1-3 together: eq. (2.7)
    dx = yc * (dout_c - xp.sum(dout_c * yc, axis=axis, keepdims=True))  # (..., n)
    return xp.astype(dx, y.dtype, copy=False)


def softmax_jacobian(y):
    """The explicit softmax Jacobian ``J[..., i, j] = dy_i/dx_j = y_i (delta_ij - y_j)``.

    For teaching and tests only: it costs O(n^2) per row, which the backward never pays.

    Parameters
    ----------
    y : array (..., n)
        A softmax output along the last axis.

    Returns
    -------
    J : array (..., n, n)
        ``diag(y) - y y^T`` per row. Derivation: derivations/02-softmax.md, eq. (2.5).
    """
    xp = namespace(y=y)
    check_float(xp, "y", y)
    if y.ndim == 0:
        raise ValueError("y must have at least one axis, got a 0-d array")
    n = y.shape[-1]
    col = y[..., :, None]                                          # (..., n, 1)
    eye = xp.eye(n, dtype=y.dtype, device=device(y))              # (n, n)
    return col * eye - col * y[..., None, :]                       # (..., n, n)


class LogSoftmaxCache(NamedTuple):
    """What ``log_softmax_backward`` needs: the output ``y = log p``; ``p = exp(y)`` is recomputed."""

    y: object  # (..., n) log-probabilities, in the input dtype
    axis: int


def _check_axis(x, axis) -> int:
    """``axis`` as a Python int: any integer type (NumPy's too) within ``[-ndim, ndim)``."""
    if x.ndim == 0:
        raise ValueError("x must have at least one axis, got a 0-d array")
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"axis must be an int, got {axis!r}")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis {axis} is out of range for x of shape {tuple(x.shape)}")
    return int(axis)


def _stable_log_softmax(xp, x, axis):
    """``y = x - m - log(l)`` with the row max ``m`` and ``l = sum exp(x - m)``: eq. (10.1).

    Never forms ``log(p)`` of an underflowed ``p``, so ``y`` stays finite for very negative
    logits. A row that is all ``-inf`` has ``l = 0`` and gives ``y = -inf`` (``log 0``), not NaN.
    """
    if x.shape[axis] == 0:
        return xp.zeros_like(x)                               # no entries, nothing to compute
    m = xp.max(x, axis=axis, keepdims=True)                   # (..., 1)
    m = xp.where(m == -xp.inf, xp.zeros_like(m), m)           # fully masked row: shift by 0
    shifted = x - m                                           # (..., n)
    l = xp.sum(xp.exp(shifted), axis=axis, keepdims=True)     # (..., 1)
    # a fully masked row has shifted = -inf and l = 0: take log(1) so y = -inf - 0, not -inf - -inf
    return shifted - xp.log(xp.where(l == 0, xp.ones_like(l), l))


def log_softmax_forward(x, *, axis: int = -1):
    """``y = log softmax(x) = x - logsumexp(x)`` along ``axis``, returning ``(y, cache)``.

    Parameters
    ----------
    x : array (..., n, ...), real floating.
    axis : int

    Returns
    -------
    y : array, same shape and dtype as ``x``.
    cache : LogSoftmaxCache

    Derivation: derivations/10-cross-entropy.md, eq. (10.1).
    """
    xp = namespace(x=x)
    check_float(xp, "x", x)
    axis = _check_axis(x, axis)
    y = xp.astype(_stable_log_softmax(xp, to_compute(xp, x), axis), x.dtype, copy=False)
    return y, LogSoftmaxCache(y=y, axis=axis)


def log_softmax_backward(dout, cache: LogSoftmaxCache):
    """``dx = dout - p * sum(dout)`` along the cached axis, with ``p = exp(y)``.

    The Jacobian of ``y_i = x_i - lse(x)`` is ``I - 1 p^T``; applied to ``dout`` from the left
    it gives this line without forming it. Derivation: derivations/10-cross-entropy.md, eq. (10.2).
    """
    check_cache(cache, LogSoftmaxCache, "log_softmax_forward")
    y, axis = cache
    xp = namespace(dout=dout, y=y)
    check_dout(xp, dout, y.shape, y.dtype)
    dout_c, p = to_compute(xp, dout), xp.exp(to_compute(xp, y))  # p = exp(y) = softmax(x)
    dx = dout_c - p * xp.sum(dout_c, axis=axis, keepdims=True)  # (..., n)   eq. (10.2)
    return xp.astype(dx, y.dtype, copy=False)
