"""Slow, obvious references written independently of npattn: explicit loops over batch, heads
and query rows, ``np.repeat`` for grouped-query attention, and SciPy's softmax."""

import numpy as np
from scipy.special import logsumexp, softmax


def attention_reference(q, k, v, mask=None, causal=False, scale=None, softcap=None, alibi_slopes=None, window=None,
                        sinks=None):
    """Returns ``(o, p, lse)`` for ``q (..., H, N, D)``, ``k, v (..., G, M, .)``, by loops, with the
    variants written out per score: softcap, then the float mask and ALiBi, then every bool rule; a
    sink is one more logit appended to the row (gpt-oss), softmaxed with it and dropped."""
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    single = q.ndim == 2
    if single:
        q, k, v = q[None], k[None], v[None]
    n, m, d = q.shape[-2], k.shape[-2], q.shape[-1]
    h, g = q.shape[-3], k.shape[-3]
    k = np.repeat(k, h // g, axis=-3)
    v = np.repeat(v, h // g, axis=-3)
    scale = 1 / np.sqrt(d) if scale is None else scale
    lead = q.shape[:-2]
    o = np.zeros(lead + (n, v.shape[-1]))
    p = np.zeros(lead + (n, m))
    lse = np.full(lead + (n,), -np.inf)
    if mask is not None:
        full_mask = np.broadcast_to(mask if not single else np.asarray(mask)[None], lead + (n, m))
    if alibi_slopes is not None:
        slopes = np.broadcast_to(np.asarray(alibi_slopes, dtype=np.float64), lead)
    if sinks is not None:
        sink = np.broadcast_to(np.asarray(sinks, dtype=np.float64), lead)
    for idx in np.ndindex(*lead):
        for i in range(n):
            row = np.array([scale * np.dot(q[idx][i], k[idx][j]) for j in range(m)])
            if softcap is not None:
                row = np.array([softcap * np.tanh(x / softcap) for x in row])
            if alibi_slopes is not None:
                row = row - np.array([slopes[idx] * abs(i + m - n - j) for j in range(m)])
            allowed = np.ones(m, dtype=bool)
            if mask is not None:
                mrow = full_mask[idx][i]
                if mrow.dtype == bool:
                    allowed &= mrow
                else:
                    row = row + mrow
            if causal:
                allowed &= np.arange(m) <= (i if causal == "top-left" else i + m - n)
            if window is not None:
                left, right = window
                j = np.arange(m)
                if left is not None:
                    allowed &= j >= i + m - n - left
                if right is not None:
                    allowed &= j <= i + m - n + right
            row = np.where(allowed, row, -np.inf)
            if sinks is not None:
                extended = np.append(row, sink[idx])
                p[idx][i] = softmax(extended)[:-1]
                lse[idx][i] = logsumexp(extended)
                o[idx][i] = p[idx][i] @ v[idx]
                continue
            if np.all(row == -np.inf):
                continue                                    # no key: o, p stay 0, lse -inf
            p[idx][i] = softmax(row)
            lse[idx][i] = logsumexp(row)
            o[idx][i] = p[idx][i] @ v[idx]
    if single:
        return o[0], p[0], lse[0]
    return o, p, lse
