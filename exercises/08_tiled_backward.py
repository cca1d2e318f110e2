"""Exercise 8: the tiled attention backward (the flash-attention backward).

Read derivations/05-flash-backward.md (recomputing p from lse, eq. (5.1); delta = rowsum(dout * o),
eq. (5.3); the loop, eqs. (5.4)-(5.5)). Write ``tiled_attention_backward``; check it with
``npattn grade exercises/08_tiled_backward.py``.

Shapes: ``q (H, N, D)``, ``k (H, M, D)``, ``v (H, M, Dv)``, ``o`` and ``dout (H, N, Dv)``,
``lse (H, N)`` (``-inf`` on a row with no allowed key). Walk query tiles of ``block_q`` and key tiles
of ``block_k`` (neither need divide N or M), recomputing each tile's ``p = exp(s - lse)``; never
form the N x M matrix. ``causal`` is bottom-right, as in exercise 7.
"""

import math

import numpy as np


def tiled_attention_backward(dout, q, k, v, o, lse, *, causal=False, block_q=2, block_k=2):
    """``(dq, dk, dv)`` of ``o = softmax(q k^T / sqrt(D)) v``, tile by tile."""
    h, n, d = q.shape
    m = k.shape[-2]
    scale = 1.0 / math.sqrt(d)
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    raise NotImplementedError("delta, then the loop over (query tile, key tile): derivations/05-flash-backward.md")
