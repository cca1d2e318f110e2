"""Solution of exercise 3: the LayerNorm and RMSNorm backwards.

Read derivations/07-layernorm.md: the three paths of eq. (7.4) (direct, through the mean, through the
variance) and RMSNorm's eq. (7.6). Write ``layernorm_backward`` and ``rmsnorm_backward``; check them
with ``npattn grade exercises/03_layernorm.py``.

Shapes: ``x (..., E)`` normalized over the last axis; ``gamma``, ``beta (E,)`` shared by every row,
so their gradients sum over rows.
"""

import numpy as np


def layernorm_forward(x, gamma, beta, *, eps=1e-5):
    """``y = (x - mean) / sqrt(var + eps) * gamma + beta`` (biased variance); returns ``(y, cache)``."""
    mu = np.mean(x, axis=-1, keepdims=True)
    rstd = 1.0 / np.sqrt(np.mean((x - mu) ** 2, axis=-1, keepdims=True) + eps)   # (..., 1)
    xhat = (x - mu) * rstd
    return xhat * gamma + beta, (xhat, rstd, gamma)


def layernorm_backward(dout, cache):
    """``(dx, dgamma, dbeta)``."""
    xhat, rstd, gamma = cache
    rows = tuple(range(dout.ndim - 1))
    dgamma, dbeta = np.sum(dout * xhat, axis=rows), np.sum(dout, axis=rows)   # eq. (7.3)
    dxhat = dout * gamma
    dx = rstd * (dxhat - np.mean(dxhat, axis=-1, keepdims=True)
                 - xhat * np.mean(dxhat * xhat, axis=-1, keepdims=True))      # eq. (7.4)
    return dx, dgamma, dbeta


def rmsnorm_forward(x, gamma, *, eps=1e-6):
    """``y = x / sqrt(mean(x^2) + eps) * gamma``; returns ``(y, cache)``."""
    rrms = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)   # (..., 1)
    xhat = x * rrms
    return xhat * gamma, (xhat, rrms, gamma)


def rmsnorm_backward(dout, cache):
    """``(dx, dgamma)``."""
    xhat, rrms, gamma = cache
    dxhat = dout * gamma
    dgamma = np.sum(dout * xhat, axis=tuple(range(dout.ndim - 1)))
    dx = rrms * (dxhat - xhat * np.mean(dxhat * xhat, axis=-1, keepdims=True))   # eq. (7.6)
    return dx, dgamma
