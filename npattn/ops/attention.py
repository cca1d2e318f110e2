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

import math
from typing import NamedTuple, Optional

from ..backend import (
    check_dout,
    check_float,
    check_mask,
    check_same_dtype,
    check_scale,
    check_workers,
    compute_dtype,
    default_workers,
    device,
    from_numpy,
    host_rng,
    namespace,
    run_grid,
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
    workers: int = 1  # the backward's default: threads over independent (batch, kv-group) slices


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


class _Split(NamedTuple):
    """How the naive op's independent slices are shared among workers: one axis of q (and of k, v,
    the scores and a mask that is not broadcast along it) cut into contiguous ranges. The axis is a
    batch axis, or the head axis cut at kv-group boundaries (q-side index = kv index * R), so no
    share needs another's keys and no gradient is summed across shares."""

    axis: int                        # an axis of q counted from the front
    r: int                           # q-side units per kv-side unit: R on the head axis, 1 on a batch axis
    ranges: list                     # per share: (u0, u1) in kv-side units

    def q_side(self, a, w):
        """Share ``w`` of a q-side array (q, o, dout, dq, p, keep, mask); broadcast axes stay whole."""
        if a is None or a.shape[self.axis] == 1:
            return a
        u0, u1 = self.ranges[w]
        return a[(slice(None),) * self.axis + (slice(u0 * self.r, u1 * self.r),)]

    def kv_side(self, a, w):
        """Share ``w`` of a kv-side array (k, v, dk, dv)."""
        u0, u1 = self.ranges[w]
        return a[(slice(None),) * self.axis + (slice(u0, u1),)]

    def index(self, w, r=None):
        u0, u1 = self.ranges[w]
        r = self.r if r is None else r
        return (slice(None),) * self.axis + (slice(u0 * r, u1 * r),)


# Below this many score entries (B*H*N*M) threads cost more than they save (measured in
# benchmarks/RESULTS.md, "Defaults": on the 2-core AMD machine 2 workers were 1.11-1.35x slower up to
# 2^23 entries and 0.74-0.90x from 2^23 to 2^25: the passes are memory-bound and the shares' results
# are copied into the full o and p).
NAIVE_THREADS_MIN_SCORES = 1 << 24


def _split(q, k, workers: int) -> Optional[_Split]:
    """The widest of q's batch axes and the kv-group axis, cut into ``workers`` near-equal ranges;
    None for one worker or nothing to cut."""
    if workers < 2 or q.ndim < 3:
        return None
    G, R = k.shape[-3], q.shape[-3] // k.shape[-3]
    units = [(q.shape[a], a, 1) for a in range(q.ndim - 3)] + [(G, q.ndim - 3, R)]
    # the outermost axis that gives every worker a slice (its slices are contiguous blocks, so the
    # shares' results land in the full arrays as contiguous copies), else the widest one
    wide = [u for u in units if u[0] >= workers]
    size, axis, r = wide[0] if wide else max(units, key=lambda u: u[0])
    if size < 2:
        return None
    w = min(workers, size)
    cuts = [size * i // w for i in range(w + 1)]
    return _Split(axis=axis, r=r, ranges=list(zip(cuts[:-1], cuts[1:])))


def resolve_naive_workers(xp, workers, scores: int) -> int:
    """``workers=None``: every core (see ``backend.default_workers``) once the scores have at least
    ``NAIVE_THREADS_MIN_SCORES`` entries, else 1. Explicit values are checked and honored."""
    if workers is None:
        return default_workers(xp) if scores >= NAIVE_THREADS_MIN_SCORES else 1
    return check_workers(xp, workers)


def attention_forward(q, k, v, *, mask=None, causal=False, scale=None, dropout_p=0.0, rng=None, workers=None):
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
    workers : int >= 1 or None
        Threads over independent (batch, kv-group) slices, each running steps 1-5 below on its
        slice (BLAS on one thread each; needs threadpoolctl). None: every core for NumPy inputs with
        at least ``NAIVE_THREADS_MIN_SCORES`` score entries, else 1. Also the backward's default.

    Returns
    -------
    o : array (..., H, N, Dv), the inputs' dtype.
    cache : AttentionCache (``cache.p`` is the weights before dropout).

    Derivation: derivations/03-attention.md, eqs. (3.1)-(3.6).
    """
    xp = namespace(q=q, k=k, v=v, mask=mask)
    check_qkv(xp, q, k, v)
    scale = check_scale(scale, q.shape[-1])
    dropout_p = _check_dropout(dropout_p)
    ct = compute_dtype(xp, q.dtype)
    m, dv = k.shape[-2], v.shape[-1]
    scores_shape = tuple(q.shape[:-1]) + (m,)                             # (..., H, N, M)
    mask = check_mask(xp, mask, scores_shape, q.dtype)
    workers = resolve_naive_workers(xp, workers, math.prod(scores_shape))
    keep = None
    if dropout_p > 0.0:                                                   # drawn whole, so shares don't matter
        keep = from_numpy(xp, host_rng(rng).random(scores_shape) >= dropout_p, like=q)   # (..., H, N, M)
    split = _split(q, k, workers)
    if split is None:
        o, p = _attend(xp, q, k, v, mask, keep, causal, scale, dropout_p)
    else:
        o = xp.empty(tuple(q.shape[:-1]) + (dv,), dtype=ct, device=device(q))   # (..., H, N, Dv)
        p = xp.empty(scores_shape, dtype=ct, device=device(q))                  # (..., H, N, M)

        def share(w, _):
            o_w, p_w = _attend(xp, split.q_side(q, w), split.kv_side(k, w), split.kv_side(v, w),
                               split.q_side(mask, w), split.q_side(keep, w), causal, scale, dropout_p)
            o[split.index(w)], p[split.index(w)] = o_w, p_w

        run_grid(share, split.ranges)
    cache = AttentionCache(q=q, k=k, v=v, p=p, keep=keep, scale=scale, dropout_p=dropout_p, workers=workers)
    return xp.astype(o, q.dtype, copy=False), cache


def _attend(xp, q, k, v, mask, keep, causal, scale, dropout_p):
    """Steps 1-5 of the forward on one slice (or all of it): ``(o, p)`` in the compute dtype."""
    G, R = (1, 1) if q.ndim == 2 else (k.shape[-3], q.shape[-3] // k.shape[-3])
    ct = compute_dtype(xp, q.dtype)
    n, m, d, dv = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    lead = tuple(q.shape[:-3])
    scores_shape = tuple(q.shape[:-1]) + (m,)                             # (..., H, N, M)
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
    p_d = p if keep is None else _dropout(xp, p, keep, dropout_p)
    # 5. weighted sum of values: eq. (3.6)
    o = xp.reshape(xp.reshape(p_d, lead + (G, R * n, m)) @ vc,
                   tuple(q.shape[:-1]) + (dv,))                          # (..., H, N, Dv)
    return o, p


def attention_backward(dout, cache: AttentionCache, *, workers=None):
    """Gradients of ``attention_forward``: returns ``(dq, dk, dv)`` in q, k, v's shapes.

    With grouped-query attention ``dk``, ``dv`` are summed over the ``R`` query heads of each
    group. ``workers`` defaults to the forward's. Derivation: derivations/03-attention.md,
    eqs. (3.7)-(3.11).
    """
    q, k, v, p, keep, scale, dropout_p, cache_workers = cache
    xp = namespace(dout=dout, q=q)
    check_dout(xp, dout, tuple(q.shape[:-1]) + (v.shape[-1],), q.dtype)
    workers = cache_workers if workers is None else check_workers(xp, workers)
    split = _split(q, k, workers)
    if split is None:
        grads = _attend_backward(xp, dout, q, k, v, p, keep, scale, dropout_p)
    else:
        ct = compute_dtype(xp, q.dtype)
        grads = tuple(xp.empty(tuple(a.shape), dtype=ct, device=device(q)) for a in (q, k, v))

        def share(w, _):
            parts = _attend_backward(xp, split.q_side(dout, w), split.q_side(q, w), split.kv_side(k, w),
                                     split.kv_side(v, w), split.q_side(p, w), split.q_side(keep, w), scale, dropout_p)
            for full, part, r in zip(grads, parts, (None, 1, 1)):
                full[split.index(w, r)] = part

        run_grid(share, split.ranges)
    dt = q.dtype
    return tuple(xp.astype(a, dt, copy=False) for a in grads)


def _attend_backward(xp, dout, q, k, v, p, keep, scale, dropout_p):
    """The backward's steps on one slice (or all of it): ``(dq, dk, dv)`` in the compute dtype."""
    n, m, d, dv = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
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
    return dq, xp.reshape(dk, k.shape), xp.reshape(dv_, v.shape)
