"""Solution of exercise 6: the multi-head self-attention backward, end to end.

Read derivations/06-multihead.md (the head split as a reshape, eqs. (6.2)-(6.3), and the fan-out sum
of self-attention, eq. (6.4)); the attention in the middle is exercise 2's. Write ``mha_backward``;
check it with ``npattn grade exercises/06_multihead.py``.

Shapes: ``x (B, N, E)``; ``w_q, w_k, w_v (E, E)`` with ``heads`` heads of ``D = E / heads``
(head ``h`` owns columns ``h*D:(h+1)*D``), ``w_o (E, E)``; no biases.
"""

import math

import numpy as np


def _attention(q, k, v, causal):
    n, m, d = q.shape[-2], k.shape[-2], q.shape[-1]
    s = q @ np.swapaxes(k, -1, -2) / math.sqrt(d)                       # (B, H, N, M)
    if causal:
        s = np.where(np.arange(m)[None, :] <= np.arange(n)[:, None] + m - n, s, -np.inf)
    p = np.exp(s - np.max(s, axis=-1, keepdims=True))
    p = p / np.sum(p, axis=-1, keepdims=True)
    return p @ v, p                                                     # (B, H, N, D)


def mha_forward(x, w_q, w_k, w_v, w_o, *, heads, causal=False):
    """``out = merge(attention(split(x w_q), split(x w_k), split(x w_v))) w_o``; returns ``(out, cache)``."""
    b, n, e = x.shape
    d = e // heads

    def split(a):                                                       # (B, N, E) -> (B, H, N, D)
        return a.reshape(b, n, heads, d).transpose(0, 2, 1, 3)

    q, k, v = split(x @ w_q), split(x @ w_k), split(x @ w_v)
    o, p = _attention(q, k, v, causal)                                  # (B, H, N, D)
    merged = o.transpose(0, 2, 1, 3).reshape(b, n, e)                   # (B, N, E)
    out = merged @ w_o
    return out, (x, w_q, w_k, w_v, w_o, q, k, v, p, merged, heads)


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
