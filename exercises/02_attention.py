"""Exercise 2: the attention backward.

Read derivations/03-attention.md ("Backward, the same steps in reverse": eqs. (3.7)-(3.10)).
Write ``attention_backward``; check it with ``npattn grade exercises/02_attention.py``.

Shapes: ``q (H, N, D)``, ``k (H, M, D)``, ``v (H, M, Dv)``, ``p (H, N, M)``, ``o (H, N, Dv)`` (any
leading axes work the same way). ``mask`` (bool, True = may attend) and ``causal`` (query ``i`` sees
key ``j <= i + M - N``, bottom-right) set scores to ``-inf``; a query row that sees no key gives
``o = 0`` and gradients 0. The grader uses N < M, N > M, N = M, causal and a fully masked row.
"""

import math

import numpy as np


def attention_forward(q, k, v, *, mask=None, causal=False, scale=None):
    """``o = softmax(scale * q k^T) v``; returns ``(o, cache)``."""
    n, m, d = q.shape[-2], k.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    s = scale * q @ np.swapaxes(k, -1, -2)                              # (H, N, M)
    allowed = np.ones(s.shape, dtype=bool)
    if mask is not None:
        allowed = allowed & mask
    if causal:
        allowed = allowed & (np.arange(m)[None, :] <= np.arange(n)[:, None] + m - n)
    s = np.where(allowed, s, -np.inf)
    mx = np.max(s, axis=-1, keepdims=True)
    e = np.exp(s - np.where(np.isfinite(mx), mx, 0.0))
    l = np.sum(e, axis=-1, keepdims=True)
    p = e / np.where(l > 0, l, 1.0)                                     # (H, N, M); masked rows: 0
    o = p @ v                                                           # (H, N, Dv)
    return o, (q, k, v, p, scale)


def attention_backward(dout, cache):
    """``(dq, dk, dv)`` given ``dout = dL/do (H, N, Dv)``, in the shapes of ``q, k, v``."""
    q, k, v, p, scale = cache
    raise NotImplementedError("dv, dp, ds, dq, dk: derivations/03-attention.md, eqs. (3.7)-(3.10)")
