"""Linear (affine) projection: forward and hand-derived backward.

Shapes: ``x (..., E_in)``, ``w (E_in, E_out)``, ``b (E_out,)``, ``y (..., E_out)``; any number of
leading batch axes, flattened to ``P`` rows in the backward.

Forward (derivations/01-linear.md):
    1. y = x @ w + b                     eq. (1.1)
Backward:
    dx = dout @ w^T                      eq. (1.3)
    dw = sum over rows of x^T dout       eq. (1.4)
    db = sum over rows of dout           eq. (1.5)
"""

from __future__ import annotations

import math
from typing import NamedTuple

from ..backend import check_cache, check_dout, float_namespace, namespace, to_compute

__all__ = ["linear_forward", "linear_backward", "LinearCache"]


class LinearCache(NamedTuple):
    """Saved for the backward: the input ``x`` (for dw) and weight ``w`` (for dx); nothing is
    recomputed. ``has_bias`` says whether a ``db`` is returned."""

    x: object  # (..., E_in)
    w: object  # (E_in, E_out)
    has_bias: bool


def linear_forward(x, w, b=None):
    """``y = x @ w + b``.

    Parameters
    ----------
    x : array (..., E_in)
    w : array (E_in, E_out)
    b : array (E_out,) or None

    Returns
    -------
    y : array (..., E_out)
    cache : LinearCache

    Derivation: derivations/01-linear.md, eq. (1.1).
    """
    xp = float_namespace(x=x, w=w, b=b)
    if x.ndim < 1:
        raise ValueError(f"x must have at least 1 axis (..., E_in), got shape {tuple(x.shape)}")
    if w.ndim != 2:
        raise ValueError(f"w must be 2-D (E_in, E_out), got shape {tuple(w.shape)}")
    if x.shape[-1] != w.shape[0]:
        raise ValueError(f"x's last axis ({x.shape[-1]}) must equal w's first ({w.shape[0]}): "
                         f"x {tuple(x.shape)}, w {tuple(w.shape)}")
    if b is not None and tuple(b.shape) != (w.shape[1],):
        raise ValueError(f"b must have shape ({w.shape[1]},) to match w {tuple(w.shape)}, got {tuple(b.shape)}")

    # one (P, E_in) @ (E_in, E_out) product over all P leading positions: one BLAS call instead of one
    # per leading index, 17-24% faster (benchmarks/RESULTS.md, "Close to the machine")
    rows, (e_in, e_out) = math.prod(x.shape[:-1]), w.shape
    y = xp.reshape(xp.reshape(to_compute(xp, x), (rows, e_in)) @ to_compute(xp, w),
                   tuple(x.shape[:-1]) + (e_out,))           # (..., E_out)   eq. (1.1)
    if b is not None:
        y += to_compute(xp, b)                               # in place: y is our own array
    return xp.astype(y, x.dtype, copy=False), LinearCache(x=x, w=w, has_bias=b is not None)


def linear_backward(dout, cache: LinearCache):
    """Gradients of ``y = x @ w + b``: returns ``(dx, dw, db)``, ``db`` None without a bias.

    Each is the chain rule (1.2) summed over the outputs an input touches.
    Derivation: derivations/01-linear.md, eqs. (1.2)-(1.5).
    """
    check_cache(cache, LinearCache, "linear_forward")
    x, w, has_bias = cache
    xp = namespace(dout=dout, x=x)
    check_dout(xp, dout, tuple(x.shape[:-1]) + (w.shape[1],), x.dtype)
    e_in, e_out = w.shape
    dout_c, xc, wc = to_compute(xp, dout), to_compute(xp, x), to_compute(xp, w)

    # every leading index is a row P that used the same w and b: their gradients add up
    rows = math.prod(x.shape[:-1])
    x2 = xp.reshape(xc, (rows, e_in))                        # (P, E_in)
    dout2 = xp.reshape(dout_c, (rows, e_out))                # (P, E_out)
    dx = xp.reshape(dout2 @ wc.mT, tuple(x.shape))           # (..., E_in)    eq. (1.3)
    dw = x2.mT @ dout2                                       # (E_in, E_out)  eq. (1.4)
    db = xp.sum(dout2, axis=0) if has_bias else None         # (E_out,)       eq. (1.5)

    dt = x.dtype
    return tuple(None if a is None else xp.astype(a, dt, copy=False) for a in (dx, dw, db))
