"""Scaled dot-product attention: forward and hand-derived backward (the naive, N x M form).

Shape legend (SPEC.md): ``q (..., H, N, D)``, ``k (..., G, M, D)``, ``v (..., G, M, Dv)``,
scores and weights ``(..., H, N, M)``, ``o (..., H, N, Dv)``; ``G == H`` for ordinary multi-head
attention, ``G < H`` with ``R = H // G`` query heads per key/value head for grouped-query attention.
2-D inputs ``q (N, D)``, ``k (M, D)``, ``v (M, Dv)`` are one head.

Grouped layout: query head ``h = g * R + r`` uses key/value head ``g``. Reshaping ``q`` to
``(..., G, R*N, D)`` is free (no copy) and stacks a group's ``R`` heads as extra rows, so
``q_g @ k_g^T`` serves the whole group and ``p^T @ dout`` sums the group in the backward without any
copy of K or V (derivations/03-attention.md, eq. (3.11)).

Forward, in steps (derivations/03-attention.md):
    1. s = scale * q k^T                        eq. (3.1)
    2. s = s + mask (float);  s = -inf where a bool mask or causal forbids     eqs. (3.2)-(3.3)
    3. p = softmax(s) along keys (fully masked rows give 0)                    eq. (3.4)
    4. p_d = p * z / (1 - dropout_p), z ~ Bernoulli(1 - dropout_p)              eq. (3.5)
    5. o = p_d v                                eq. (3.6)
Backward, the same steps in reverse:
    5. dv = p_d^T dout,  dp_d = dout v^T        eq. (3.7)
    4. dp = dp_d * z / (1 - dropout_p)          eq. (3.8)
    3. ds = p * (dp - rowsum(p * dp))           eq. (3.9)
    2. masked entries have p = 0, so ds = 0 there; nothing to undo
    1. dq = scale * ds k,  dk = scale * ds^T q  eq. (3.10), summed over each kv group: eq. (3.11)
"""

from __future__ import annotations

from typing import NamedTuple

from ..backend import (
    check_float,
    check_mask,
    check_same_dtype,
    check_scale,
    compute_dtype,
    device,
    from_numpy,
    host_rng,
    namespace,
    to_compute,
)
from .softmax import _stable_softmax

__all__ = ["attention_forward", "attention_backward", "AttentionCache", "causal_allowed", "check_qkv"]


class AttentionCache(NamedTuple):
    """Saved by ``attention_forward`` for ``attention_backward``.

    ``p`` is the attention weights after softmax and before dropout, ``(..., H, N, M)``, in the
    compute dtype (float32 for float16 inputs). ``keep`` is the dropout mask ``z`` (bool, the shape
    of ``p``) or None. K and V are kept as given: grouped-query attention never repeats them.
    Nothing is recomputed in the backward; the flash variant (ops/flash.py) recomputes ``p``.
    """

    q: object  # (..., H, N, D)
    k: object  # (..., G, M, D)
    v: object  # (..., G, M, Dv)
    p: object  # (..., H, N, M)
    keep: object  # (..., H, N, M) bool, or None without dropout
    scale: float
    dropout_p: float


def check_qkv(xp, q, k, v):
    """Validate q, k, v against SPEC.md and return ``(G, R)``: kv heads and query heads per group."""
    for name, a in (("q", q), ("k", k), ("v", v)):
        check_float(xp, name, a)
    check_same_dtype(q=q, k=k, v=v)
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if q.ndim < 2 or k.ndim != q.ndim or v.ndim != q.ndim:
        raise ValueError(f"q, k, v must have the same ndim >= 2 ((..., N, D), (..., M, D), (..., M, Dv)), got {shapes}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must share the head dim D (last axis), got {shapes}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"k and v must share the key length M (axis -2), got {shapes}")
    if q.ndim == 2:
        return 1, 1
    if not (q.shape[:-3] == k.shape[:-3] == v.shape[:-3]):
        raise ValueError(f"q, k, v must have equal leading (batch) dims, got {shapes}")
    h, g = q.shape[-3], k.shape[-3]
    if v.shape[-3] != g:
        raise ValueError(f"k and v must have the same number of heads G (axis -3), got {shapes}")
    if g > h or h % g != 0:
        raise ValueError(f"query heads H={h} must be a multiple of key/value heads G={g} (H % G == 0), got {shapes}")
    return g, h // g


def causal_allowed(xp, rows, cols, n: int, m: int, like):
    """Bool ``(len(rows), len(cols))``: query ``i`` may see key ``j`` iff ``j <= i + M - N``.

    Bottom-right alignment, as FlashAttention >= 2.1. ``rows``/``cols`` are ``(start, stop)``
    index ranges so tiles can ask for their own block. Derivation: derivations/03-attention.md,
    eq. (3.3).
    """
    dev = device(like)
    i = xp.arange(rows[0], rows[1], device=dev)[:, None]     # (n_rows, 1)
    j = xp.arange(cols[0], cols[1], device=dev)[None, :]     # (1, n_cols)
    return j <= i + (m - n)                                  # (n_rows, n_cols)


def _check_dropout(dropout_p):
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return float(dropout_p)


def _dropout(xp, x, keep, dropout_p):
    """``x * z / (1 - dropout_p)``: the forward of step 4 on ``p`` (eq. (3.5)) and, being linear with
    a constant mask, its own backward on ``dp`` (eq. (3.8))."""
    return xp.where(keep, x / (1.0 - dropout_p), xp.zeros_like(x))


def attention_forward(q, k, v, *, mask=None, causal=False, scale=None, dropout_p=0.0, rng=None):
    """Scaled dot-product attention ``o = dropout(softmax(scale * q k^T + mask)) v``.

    Parameters
    ----------
    q : array (..., H, N, D)
    k : array (..., G, M, D)      ``G == H``, or ``G < H`` with ``H % G == 0`` (grouped-query).
    v : array (..., G, M, Dv)
    mask : array or None
        Broadcastable to ``(..., H, N, M)``. bool: True = may attend. float (the inputs' dtype):
        added to the scores.
    causal : bool
        Query ``i`` may attend key ``j`` iff ``j <= i + M - N`` (bottom-right). Combines with mask.
    scale : float or None
        Defaults to ``1/sqrt(D)``.
    dropout_p : float in [0, 1)
        Probability of zeroing an attention weight; kept weights are scaled by ``1/(1-dropout_p)``.
    rng : numpy.random.Generator, int seed or None
        Source of the dropout mask; an int seed gives the same mask on every library.

    Returns
    -------
    o : array (..., H, N, Dv), the inputs' dtype.
    cache : AttentionCache (``cache.p`` is the weights before dropout).

    Derivation: derivations/03-attention.md, eqs. (3.1)-(3.6).
    """
    xp = namespace(q=q, k=k, v=v, mask=mask)
    G, R = check_qkv(xp, q, k, v)
    scale = check_scale(scale, q.shape[-1])
    dropout_p = _check_dropout(dropout_p)
    ct = compute_dtype(xp, q.dtype)
    n, m, d, dv = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    lead = tuple(q.shape[:-3])
    scores_shape = tuple(q.shape[:-1]) + (m,)                             # (..., H, N, M)
    mask = check_mask(xp, mask, scores_shape, q.dtype)
    qc, kc, vc = to_compute(xp, q), to_compute(xp, k), to_compute(xp, v)

    # 1. scores, one matmul per kv group: eq. (3.1)
    qg = xp.reshape(qc, lead + (G, R * n, d))                            # (..., G, R*N, D)
    s = xp.reshape((scale * qg) @ kc.mT, scores_shape)                   # (..., H, N, M)
    # 2. masks: float masks add, bool masks and causal forbid: eqs. (3.2)-(3.3)
    if mask is not None and xp.isdtype(mask.dtype, "real floating"):
        s += xp.astype(mask, ct)                                         # in place: s is our own array
    allowed = mask if mask is not None and xp.isdtype(mask.dtype, "bool") else None
    if causal:
        tri = causal_allowed(xp, (0, n), (0, m), n, m, like=q)             # (N, M)
        allowed = tri if allowed is None else xp.logical_and(allowed, tri)
    if allowed is not None:
        s = xp.where(allowed, s, xp.asarray(-xp.inf, dtype=ct, device=device(q)))
    # 3. softmax over keys; rows with no allowed key give p = 0: eq. (3.4)
    p, _, _ = _stable_softmax(xp, s, -1, overwrite=True)                  # (..., H, N, M); s is ours
    # 4. dropout: eq. (3.5)
    keep = None
    p_d = p
    if dropout_p > 0.0:
        z = host_rng(rng).random(scores_shape) >= dropout_p              # (..., H, N, M) on host
        keep = from_numpy(xp, z, like=q)
        p_d = _dropout(xp, p, keep, dropout_p)
    # 5. weighted sum of values: eq. (3.6)
    o = xp.reshape(xp.reshape(p_d, lead + (G, R * n, m)) @ vc,
                   tuple(q.shape[:-1]) + (dv,))                          # (..., H, N, Dv)
    cache = AttentionCache(q=q, k=k, v=v, p=p, keep=keep, scale=scale, dropout_p=dropout_p)
    return xp.astype(o, q.dtype, copy=False), cache


def attention_backward(dout, cache: AttentionCache):
    """Gradients of ``attention_forward``: returns ``(dq, dk, dv)`` in q, k, v's shapes.

    With grouped-query attention ``dk``, ``dv`` are summed over the ``R`` query heads of each
    group. Derivation: derivations/03-attention.md, eqs. (3.7)-(3.11).
    """
    q, k, v, p, keep, scale, dropout_p = cache
    xp = namespace(dout=dout, q=q)
    check_float(xp, "dout", dout)
    n, m, d, dv = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    out_shape = tuple(q.shape[:-1]) + (dv,)
    if tuple(dout.shape) != out_shape:
        raise ValueError(f"dout must have the output's shape {out_shape}, got {tuple(dout.shape)}")
    if dout.dtype != q.dtype:
        raise TypeError(f"dout must have the output's dtype {q.dtype}, got {dout.dtype}")
    lead = tuple(q.shape[:-3])
    G = 1 if q.ndim == 2 else k.shape[-3]
    R = (1 if q.ndim == 2 else q.shape[-3]) // G
    qc, kc, vc, g = (to_compute(xp, a) for a in (q, k, v, dout))

    def grouped(a, cols):
        return xp.reshape(a, lead + (G, R * n, cols))                    # (..., G, R*N, cols)

    # in the forward pass this was step 4: p_d = p * z / (1 - dropout_p)
    p_d = p if keep is None else _dropout(xp, p, keep, dropout_p)
    # step 5, o = p_d v: eq. (3.7); the matmul over R*N rows sums each group's heads
    gg = grouped(g, dv)                                                  # (..., G, R*N, Dv)
    dv_ = grouped(p_d, m).mT @ gg                                        # (..., G, M, Dv)
    dp = xp.reshape(gg @ vc.mT, p.shape)                                 # (..., H, N, M)
    # step 4, dropout: eq. (3.8)
    if keep is not None:
        dp = _dropout(xp, dp, keep, dropout_p)
    # step 3, softmax: eq. (3.9)
    dp -= xp.sum(p * dp, axis=-1, keepdims=True)                          # in place: dp is our own array
    ds = dp                                                              # (..., H, N, M)
    ds *= p                                                              # ds = p * (dp - rowsum(p * dp))
    # step 1, s = scale * q k^T: eq. (3.10)
    dsg = grouped(ds, m)                                                 # (..., G, R*N, M)
    dq = xp.reshape(scale * (dsg @ kc), q.shape)                         # (..., H, N, D)
    dk = scale * (dsg.mT @ grouped(qc, d))                               # (..., G, M, D)  eq. (3.11)
    dk, dv_ = xp.reshape(dk, k.shape), xp.reshape(dv_, v.shape)
    dt = q.dtype
    return tuple(xp.astype(a, dt, copy=False) for a in (dq, dk, dv_))
