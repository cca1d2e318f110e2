"""Exercise 5: the RoPE backward.

Read derivations/09-embeddings-positions.md ("Rotary positions (RoPE)", eqs. (9.4)-(9.6)). Write
``rope_backward``; check it with ``npattn grade exercises/05_rope.py``.

Shapes: ``x (..., N, D)``, ``D`` even. Channel pair ``c`` of the row at position ``t`` is rotated by
``t * base^(-2c/D)``; the pair is ``(x[c], x[c + D/2])`` (``interleaved=False``) or
``(x[2c], x[2c+1])`` (``interleaved=True``).
"""

import numpy as np


def _pairs(a, interleaved):
    h = a.shape[-1] // 2
    return (a[..., 0::2], a[..., 1::2]) if interleaved else (a[..., :h], a[..., h:])


def _unpairs(a1, a2, interleaved):
    if interleaved:
        return np.stack((a1, a2), axis=-1).reshape(a1.shape[:-1] + (2 * a1.shape[-1],))
    return np.concatenate((a1, a2), axis=-1)


def rope_forward(x, *, positions=None, base=10000.0, interleaved=False):
    """Rotate every channel pair by its angle; returns ``(y, cache)``."""
    n, d = x.shape[-2], x.shape[-1]
    t = np.arange(n) if positions is None else positions
    theta = np.asarray(t, dtype=np.float64)[..., None] * base ** (-2.0 * np.arange(d // 2) / d)   # (N, D/2)
    cos, sin = np.cos(theta).astype(x.dtype), np.sin(theta).astype(x.dtype)
    x1, x2 = _pairs(x, interleaved)
    y = _unpairs(x1 * cos - x2 * sin, x2 * cos + x1 * sin, interleaved)
    return y, (cos, sin, interleaved)


def rope_backward(dout, cache):
    """``dx`` given ``dout = dL/dy``."""
    cos, sin, interleaved = cache
    raise NotImplementedError("derivations/09-embeddings-positions.md, eq. (9.6)")
