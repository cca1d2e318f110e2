"""LayerNorm and RMSNorm over the last axis: forward and hand-derived backward.

Shapes: ``x (..., E)``, ``gamma, beta (E,)``; statistics are per row, ``(..., 1)``. ``P`` is the
number of rows once the leading axes are flattened (``dgamma``, ``dbeta`` sum over them).

LayerNorm, in steps (derivations/07-layernorm.md), as ``torch.nn.functional.layer_norm``:
    1. mu = mean(x)                             eq. (7.1)
    2. var = mean((x - mu)^2)   (biased)        eq. (7.1)
    3. rstd = 1 / sqrt(var + eps)               eq. (7.1)
    4. xhat = (x - mu) * rstd                   eq. (7.1)
    5. y = xhat * gamma + beta                  eq. (7.2)
Backward, the same steps in reverse:
    5. dgamma = sum_P dout * xhat,  dbeta = sum_P dout,  dxhat = dout * gamma      eq. (7.3)
    4-1. dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))            eq. (7.4)

RMSNorm (no centring, no beta), as ``torch.nn.functional.rms_norm``:
    1. rrms = 1 / sqrt(mean(x^2) + eps),  xhat = x * rrms                         eq. (7.5)
    2. y = xhat * gamma                                                            eq. (7.5)
Backward:
    2. dgamma = sum_P dout * xhat,  dxhat = dout * gamma                           eq. (7.6)
    1. dx = rrms * (dxhat - xhat * mean(dxhat * xhat))                             eq. (7.6)
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

from ..backend import check_cache, check_dout, check_last_dim, float_namespace, namespace, to_compute

__all__ = ["layernorm_forward", "layernorm_backward", "LayerNormCache",
           "rmsnorm_forward", "rmsnorm_backward", "RMSNormCache"]


class LayerNormCache(NamedTuple):
    """Saved for the backward: the normalized ``xhat`` and ``rstd`` (so nothing is recomputed),
    ``gamma`` for ``dxhat``, and which of ``gamma``/``beta`` were given."""

    xhat: object  # (..., E), compute dtype
    rstd: object  # (..., 1), compute dtype
    gamma: object  # (E,) or None
    has_beta: bool
    dtype: object  # the input dtype


class RMSNormCache(NamedTuple):
    """Saved for the backward: ``xhat = x * rrms``, ``rrms``, and ``gamma``."""

    xhat: object  # (..., E), compute dtype
    rrms: object  # (..., 1), compute dtype
    gamma: object  # (E,) or None
    dtype: object


def _check_norm_inputs(x, gamma, beta, eps):
    xp = float_namespace(x=x, gamma=gamma, beta=beta)
    if x.ndim < 1:
        raise ValueError(f"x must have at least 1 axis (..., E), got shape {tuple(x.shape)}")
    e = x.shape[-1]
    check_last_dim("gamma", gamma, e, f"x's last axis of x {tuple(x.shape)}")
    check_last_dim("beta", beta, e, f"x's last axis of x {tuple(x.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite real number >= 0, got {eps!r}")
    return xp


def _sum_rows(xp, a):
    """Sum a ``(..., E)`` array over every leading axis: the P rows that shared one parameter."""
    return xp.sum(xp.reshape(a, (-1, a.shape[-1])), axis=0)                # (E,)


def layernorm_forward(x, gamma=None, beta=None, *, eps: float = 1e-5):
    """``y = (x - mean(x)) / sqrt(var(x) + eps) * gamma + beta`` over the last axis.

    Parameters
    ----------
    x : array (..., E)
    gamma, beta : array (E,) or None (None: 1 and 0, and no gradient is returned for it)
    eps : float >= 0, added to the biased variance.

    Returns
    -------
    y : array (..., E), the input dtype.
    cache : LayerNormCache

    Derivation: derivations/07-layernorm.md, eqs. (7.1)-(7.2).
    """
    xp = _check_norm_inputs(x, gamma, beta, eps)
    xc = to_compute(xp, x)
    mu = xp.mean(xc, axis=-1, keepdims=True)                               # (..., 1)   step 1
    xm = xc - mu                                                           # (..., E)
    var = xp.mean(xm * xm, axis=-1, keepdims=True)                         # (..., 1)   step 2
    rstd = 1.0 / xp.sqrt(var + eps)                                        # (..., 1)   step 3
    xhat = xm * rstd                                                       # (..., E)   step 4
    y = xhat if gamma is None else xhat * to_compute(xp, gamma)            # step 5: eq. (7.2)
    if beta is not None:
        y = y + to_compute(xp, beta)
    cache = LayerNormCache(xhat=xhat, rstd=rstd, gamma=gamma, has_beta=beta is not None, dtype=x.dtype)
    return xp.astype(y, x.dtype, copy=False), cache


def layernorm_backward(dout, cache: LayerNormCache):
    """Gradients of ``layernorm_forward``: ``(dx, dgamma, dbeta)``, None where the forward got None.

    Derivation: derivations/07-layernorm.md, eqs. (7.3)-(7.4).
    """
    check_cache(cache, LayerNormCache, "layernorm_forward")
    xhat, rstd, gamma, has_beta, dtype = cache
    xp = namespace(dout=dout, xhat=xhat)
    check_dout(xp, dout, xhat.shape, dtype)
    dout_c = to_compute(xp, dout)
    # step 5, y = xhat * gamma + beta: eq. (7.3)
    dgamma = None if gamma is None else _sum_rows(xp, dout_c * xhat)       # (E,)
    dbeta = _sum_rows(xp, dout_c) if has_beta else None                    # (E,)
    dxhat = dout_c if gamma is None else dout_c * to_compute(xp, gamma)    # (..., E)
    # steps 4-1, xhat = (x - mu) * rstd with mu and rstd functions of x: eq. (7.4)
    dx = rstd * (dxhat - xp.mean(dxhat, axis=-1, keepdims=True)
                 - xhat * xp.mean(dxhat * xhat, axis=-1, keepdims=True))   # (..., E)
    return tuple(None if a is None else xp.astype(a, dtype, copy=False) for a in (dx, dgamma, dbeta))


def rmsnorm_forward(x, gamma=None, *, eps: float = 1e-6):
    """``y = x / sqrt(mean(x^2) + eps) * gamma`` over the last axis (RMSNorm, Llama's norm).

    Parameters
    ----------
    x : array (..., E)
    gamma : array (E,) or None (None: 1, and ``dgamma`` is None)
    eps : float >= 0

    Returns
    -------
    y : array (..., E), the input dtype.
    cache : RMSNormCache

    Derivation: derivations/07-layernorm.md, eq. (7.5).
    """
    xp = _check_norm_inputs(x, gamma, None, eps)
    xc = to_compute(xp, x)
    rrms = 1.0 / xp.sqrt(xp.mean(xc * xc, axis=-1, keepdims=True) + eps)   # (..., 1)
    xhat = xc * rrms                                                       # (..., E)
    y = xhat if gamma is None else xhat * to_compute(xp, gamma)            # eq. (7.5)
    return xp.astype(y, x.dtype, copy=False), RMSNormCache(xhat=xhat, rrms=rrms, gamma=gamma, dtype=x.dtype)


def rmsnorm_backward(dout, cache: RMSNormCache):
    """Gradients of ``rmsnorm_forward``: ``(dx, dgamma)``, ``dgamma`` None without gamma.

    Derivation: derivations/07-layernorm.md, eq. (7.6).
    """
    check_cache(cache, RMSNormCache, "rmsnorm_forward")
    xhat, rrms, gamma, dtype = cache
    xp = namespace(dout=dout, xhat=xhat)
    check_dout(xp, dout, xhat.shape, dtype)
    dout_c = to_compute(xp, dout)
    dgamma = None if gamma is None else _sum_rows(xp, dout_c * xhat)       # (E,)      eq. (7.6)
    dxhat = dout_c if gamma is None else dout_c * to_compute(xp, gamma)    # (..., E)
    dx = rrms * (dxhat - xhat * xp.mean(dxhat * xhat, axis=-1, keepdims=True))   # eq. (7.6)
    return tuple(None if a is None else xp.astype(a, dtype, copy=False) for a in (dx, dgamma))
