"""Solution of exercise 1: the softmax backward.

Read derivations/02-softmax.md (the Jacobian, eq. (2.5), and why the backward never forms it,
eqs. (2.6)-(2.7)). Write ``softmax_backward``; check it with ``npattn grade exercises/01_softmax.py``.

Shapes: ``x (..., n)`` along ``axis``; ``y`` and ``dout`` the same shape. A row that is all ``-inf``
(fully masked) gives ``y = 0``, and its gradient must be 0 too, never NaN.
"""

import numpy as np


def softmax_forward(x, *, axis=-1):
    """``y = exp(x - max) / sum(exp(x - max))`` along ``axis``; returns ``(y, cache)``."""
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)              # a fully masked row: keep m = 0, so y = 0
    e = np.exp(x - m)
    l = np.sum(e, axis=axis, keepdims=True)
    y = e / np.where(l > 0, l, 1.0)
    return y, (y, axis)


def softmax_backward(dout, cache):
    """``dx`` given ``dout = dL/dy``: same shape as ``y``, O(n) per row (no Jacobian matrix)."""
    y, axis = cache
    return y * (dout - np.sum(dout * y, axis=axis, keepdims=True))             # eq. (2.7)
