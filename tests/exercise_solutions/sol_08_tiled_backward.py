"""Solution of exercise 8: the tiled attention backward (the flash-attention backward).

The exercise file as shipped (its forward and helpers, exercises/08_tiled_backward.py) with the learner's
part written out below."""

import math
import numpy as np

from tests.exercise_solutions import exercise

globals().update(exercise("08_tiled_backward.py"))                      # the stub's forward and helpers


def tiled_attention_backward(dout, q, k, v, o, lse, *, causal=False, block_q=2, block_k=2):
    """``(dq, dk, dv)`` of ``o = softmax(q k^T / sqrt(D)) v``, tile by tile."""
    h, n, d = q.shape
    m = k.shape[-2]
    scale = 1.0 / math.sqrt(d)
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    delta = np.sum(dout * o, axis=-1, keepdims=True)                     # (H, N, 1)  eq. (5.3)
    lse = np.where(np.isfinite(lse), lse, np.inf)[..., None]             # no key: p = exp(-inf) = 0
    for i0 in range(0, n, block_q):
        qi, di, dl, li = (a[:, i0:i0 + block_q] for a in (q, dout, delta, lse))
        rows = np.arange(i0, i0 + qi.shape[-2])
        for j0 in range(0, m, block_k):
            kj, vj = k[:, j0:j0 + block_k], v[:, j0:j0 + block_k]
            s = scale * qi @ np.swapaxes(kj, -1, -2)                     # eq. (5.4)
            if causal:
                cols = np.arange(j0, j0 + kj.shape[-2])
                s = np.where(cols[None, :] <= rows[:, None] + m - n, s, -np.inf)
            p = np.exp(s - li)                                           # eq. (5.1)
            dv[:, j0:j0 + block_k] += np.swapaxes(p, -1, -2) @ di       # eq. (5.5)
            ds = p * (di @ np.swapaxes(vj, -1, -2) - dl)
            dq[:, i0:i0 + block_q] += scale * ds @ kj
            dk[:, j0:j0 + block_k] += scale * np.swapaxes(ds, -1, -2) @ qi
    return dq, dk, dv
