"""Solution of exercise 7: the online-softmax tile loop (the flash-attention forward).

The exercise file as shipped (its forward and helpers, exercises/07_online_softmax.py) with the learner's
part written out below."""

import math
import numpy as np

from tests.exercise_solutions import exercise

globals().update(exercise("07_online_softmax.py"))                      # the stub's forward and helpers


def online_softmax_attention(q, k, v, *, causal=False, block_k=2):
    """``(o, lse)`` of ``softmax(q k^T / sqrt(D)) v``, computed tile by tile over the keys."""
    h, n, d = q.shape
    m = k.shape[-2]
    scale = 1.0 / math.sqrt(d)
    m_i = np.full((h, n, 1), -np.inf, dtype=q.dtype)                                  # running max of each row
    l_i = np.zeros((h, n, 1), dtype=q.dtype)                                          # running sum of exp(s - m_i)
    acc = np.zeros((h, n, v.shape[-1]), dtype=q.dtype)                                # running sum of exp(s - m_i) v
    for j0 in range(0, m, block_k):
        kj, vj = k[:, j0:j0 + block_k], v[:, j0:j0 + block_k]
        s = scale * q @ np.swapaxes(kj, -1, -2)                         # (H, N, bk)   eq. (4.5)
        if causal:
            cols = np.arange(j0, j0 + kj.shape[-2])
            s = np.where(cols[None, :] <= np.arange(n)[:, None] + m - n, s, -np.inf)
        m_new = np.maximum(m_i, np.max(s, axis=-1, keepdims=True))      # eq. (4.6)
        shift = np.where(np.isfinite(m_new), m_new, 0.0)                # a row with no key yet
        alpha = np.exp(m_i - shift)                                     # eq. (4.7)
        p = np.exp(s - shift)
        l_i = alpha * l_i + np.sum(p, axis=-1, keepdims=True)           # eq. (4.8)
        acc = alpha * acc + p @ vj                                      # eq. (4.9)
        m_i = m_new
    seen = l_i > 0
    o = np.where(seen, acc / np.where(seen, l_i, 1.0), 0.0)             # eq. (4.10)
    lse = np.where(seen, m_i + np.log(np.where(seen, l_i, 1.0)), -np.inf)
    return o, lse[..., 0]
