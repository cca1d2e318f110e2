"""Exercise 7: the online-softmax tile loop (the flash-attention forward).

Read derivations/04-online-softmax.md ("Merging two sets" and "The loop, as the code runs it").
Write the loop in ``online_softmax_attention``; check it with
``npattn grade exercises/07_online_softmax.py``.

Shapes: ``q (H, N, D)``, ``k (H, M, D)``, ``v (H, M, Dv)``; returns ``o (H, N, Dv)`` and the
log-sum-exp ``lse (H, N)`` of the scaled scores (natural log). Walk the keys in tiles of ``block_k``
(which need not divide M), keeping per row the running max ``m_i``, the running sum ``l_i`` and the
unnormalized output ``acc``; never form the N x M matrix of all scores. ``causal`` is bottom-right
(key ``j`` allowed for query ``i`` iff ``j <= i + M - N``); a row with no allowed key gives
``o = 0`` and ``lse = -inf``.
"""

import math

import numpy as np


def online_softmax_attention(q, k, v, *, causal=False, block_k=2):
    """``(o, lse)`` of ``softmax(q k^T / sqrt(D)) v``, computed tile by tile over the keys."""
    h, n, d = q.shape
    m = k.shape[-2]
    scale = 1.0 / math.sqrt(d)
    m_i = np.full((h, n, 1), -np.inf, dtype=q.dtype)                                  # running max of each row
    l_i = np.zeros((h, n, 1), dtype=q.dtype)                                          # running sum of exp(s - m_i)
    acc = np.zeros((h, n, v.shape[-1]), dtype=q.dtype)                                # running sum of exp(s - m_i) v
    for j0 in range(0, m, block_k):
        raise NotImplementedError("one key tile: derivations/04-online-softmax.md, eqs. (4.5)-(4.9)")
    raise NotImplementedError("eq. (4.10): o = acc / l_i, lse = m_i + log l_i (and the rows with no key)")
