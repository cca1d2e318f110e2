"""Solution of exercise 6: the multi-head self-attention backward, end to end.

The exercise file as shipped (its forward and helpers, exercises/06_multihead.py) with the learner's
part written out below."""

import math
import numpy as np

from tests.exercise_solutions import exercise

globals().update(exercise("06_multihead.py"))                      # the stub's forward and helpers


def mha_backward(dout, cache):
    """``(dx, dw_q, dw_k, dw_v, dw_o)``: x feeds three projections, so dx is a sum of three."""
    x, w_q, w_k, w_v, w_o, q, k, v, p, merged, heads = cache
    b, n, e = x.shape
    d = e // heads
    dw_o = merged.reshape(-1, e).T @ dout.reshape(-1, e)                 # (E, E)
    do = (dout @ w_o.T).reshape(b, n, heads, d).transpose(0, 2, 1, 3)    # (B, H, N, D): eq. (6.3)
    dv = np.swapaxes(p, -1, -2) @ do
    dp = do @ np.swapaxes(v, -1, -2)
    ds = p * (dp - np.sum(p * dp, axis=-1, keepdims=True))
    dq = ds @ k / math.sqrt(d)
    dk = np.swapaxes(ds, -1, -2) @ q / math.sqrt(d)

    def merge(a):                                                       # (B, H, N, D) -> (B, N, E)
        return a.transpose(0, 2, 1, 3).reshape(b, n, e)

    dQ, dK, dV = merge(dq), merge(dk), merge(dv)
    x2 = x.reshape(-1, e)
    dw_q, dw_k, dw_v = (x2.T @ g.reshape(-1, e) for g in (dQ, dK, dV))
    dx = dQ @ w_q.T + dK @ w_k.T + dV @ w_v.T                            # the fan-out sum: eq. (6.4)
    return dx, dw_q, dw_k, dw_v, dw_o
