"""Token embedding (a table lookup) with its scatter-add backward, and the sinusoidal position table.

Shapes: ``ids (...)`` integer in ``[0, V)``, ``weight (V, E)``, ``out (..., E)``; ``P`` is the number
of ids once flattened.

Forward (derivations/09-embeddings-positions.md):
    out[p] = weight[ids[p]]                               eq. (9.1)
Backward:
    dweight = onehot(ids)^T dout: row v sums dout over every p with ids[p] = v      eq. (9.2)

The array API has no scatter-add (``np.add.at``), so eq. (9.2) is computed as written, a one-hot
matmul, over chunks of ids so that the one-hot block stays under ``_ONEHOT_ELEMENTS``. Its cost is
``P V E`` multiply-adds, paid once per step; for V = 512 it is a few milliseconds.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

from array_api_compat import numpy as np_compat

from ..backend import check_cache, check_dout, check_float, check_int, device, namespace, read_back

__all__ = ["embedding_forward", "embedding_backward", "EmbeddingCache", "sinusoidal_positions"]

_ONEHOT_ELEMENTS = 1 << 22          # 4 Mi entries per one-hot block (32 MiB in float64)


class EmbeddingCache(NamedTuple):
    """Saved for the backward: the ids (which rows were read) and the table's shape and dtype."""

    ids: object  # (...) integer
    weight_shape: tuple  # (V, E)
    dtype: object
    like: object  # the weight, for the namespace and device of dweight


def check_ids(xp, name: str, ids, vocab: int):
    """``ids`` must be integer and inside ``[0, vocab)``; the message names the bad values."""
    check_int(xp, name, ids)
    if math.prod(ids.shape) > 0:
        lo, hi = read_back(xp, xp.min(ids), xp.max(ids))                    # one explicit host read
        if lo < 0 or hi >= vocab:
            raise ValueError(f"{name} must be in [0, {vocab}), got values from {lo} to {hi}")


def embedding_forward(ids, weight):
    """``out = weight[ids]``: row ``ids[p]`` of the table for every position.

    Parameters
    ----------
    ids : integer array (...), values in ``[0, V)``
    weight : array (V, E)

    Returns
    -------
    out : array (..., E), the weight's dtype.
    cache : EmbeddingCache

    Derivation: derivations/09-embeddings-positions.md, eq. (9.1).
    """
    xp = namespace(ids=ids, weight=weight)
    check_float(xp, "weight", weight)
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D (V, E), got shape {tuple(weight.shape)}")
    check_ids(xp, "ids", ids, weight.shape[0])
    flat = xp.reshape(ids, (-1,))                                           # (P,)
    out = xp.reshape(xp.take(weight, flat, axis=0), tuple(ids.shape) + (weight.shape[1],))   # (..., E)
    return out, EmbeddingCache(ids=ids, weight_shape=tuple(weight.shape), dtype=weight.dtype, like=weight)


def embedding_backward(dout, cache: EmbeddingCache):
    """``(None, dweight)``: ids get no gradient; ``dweight = onehot(ids)^T dout`` (repeated ids add up).

    Derivation: derivations/09-embeddings-positions.md, eq. (9.2).
    """
    check_cache(cache, EmbeddingCache, "embedding_forward")
    ids, (vocab, e), dtype, like = cache
    xp = namespace(dout=dout, weight=like)
    check_dout(xp, dout, tuple(ids.shape) + (e,), dtype)
    flat = xp.reshape(ids, (-1,))                                           # (P,)
    g = xp.reshape(dout, (-1, e))                                           # (P, E)
    rows = xp.arange(vocab, device=device(like))[:, None]                   # (V, 1)
    dweight = xp.zeros((vocab, e), dtype=dtype, device=device(like))        # (V, E)
    total = flat.shape[0]
    chunk = max(1, _ONEHOT_ELEMENTS // max(vocab, 1))
    for p0 in range(0, total, chunk):
        p1 = min(p0 + chunk, total)
        onehot_t = xp.astype(rows == flat[None, p0:p1], dtype)             # (V, chunk): onehot^T
        dweight = dweight + onehot_t @ g[p0:p1, :]                          # (V, E)   eq. (9.2)
    return None, dweight


def sinusoidal_positions(n: int, dim: int, *, base: float = 10000.0, like=None):
    """The sinusoidal position table of Vaswani et al., ``(n, dim)``: float64 NumPy, or with ``like``
    an array of ``like``'s library, device and dtype (computed there in float64, then cast).

    Column ``2c`` holds ``sin(t / base^(2c/dim))``, column ``2c+1`` ``cos(t / base^(2c/dim))``, for
    position ``t = 0 .. n-1``. A fixed table: no parameters, no backward. Derivation:
    derivations/09-embeddings-positions.md, eq. (9.3).
    """
    for name, value in (("n", n), ("dim", dim)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if isinstance(base, bool) or not isinstance(base, numbers.Real) or not base > 0:
        raise ValueError(f"base must be a real number > 0, got {base!r}")
    xp = np_compat if like is None else namespace(like=like)
    dev = None if like is None else device(like)
    t = xp.arange(n, dtype=xp.float64, device=dev)[:, None]                 # (n, 1)
    c = xp.astype(xp.arange(dim, device=dev) // 2, xp.float64)              # pair index of each column
    angle = t / float(base) ** (2.0 * c / dim)                              # (n, dim)  eq. (9.3)
    even = xp.arange(dim, device=dev) % 2 == 0
    table = xp.where(even, xp.sin(angle), xp.cos(angle))                    # (n, dim)
    return table if like is None else xp.astype(table, like.dtype)
