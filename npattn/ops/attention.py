"""Scaled dot-product attention: forward and hand-derived backward (the naive, N x M form).

Shape legend (docs/conventions.md): ``q (..., H, N, D)``, ``k (..., G, M, D)``, ``v (..., G, M, Dv)``,
scores and weights ``(..., H, N, M)``, ``o (..., H, N, Dv)``; ``G == H`` for ordinary multi-head
attention, ``G < H`` with ``R = H // G`` query heads per key/value head for grouped-query attention.
2-D inputs ``q (N, D)``, ``k (M, D)``, ``v (M, Dv)`` are one head.

Grouped layout: query head ``h = g * R + r`` uses key/value head ``g``. Reshaping ``q`` to
``(..., G, R*N, D)`` (free for a contiguous ``q``, one copy for a strided view) stacks a group's ``R`` heads as extra rows, so
``q_g @ k_g^T`` serves the whole group and ``p^T @ dout`` sums the group in the backward without any
copy of K or V (derivations/03-attention.md, eq. (3.11)).

Forward, in steps (derivations/03-attention.md):
    1. s = scale * q k^T                        eq. (3.1)
    2. the score pipeline (ops/scores.py): softcap, float mask and ALiBi added, then -inf wherever
       a bool mask, causal or the window forbids   eqs. (13.1)-(13.3), (3.2)-(3.3)
    3. p = softmax(s) along keys (fully masked rows give 0)                    eq. (3.4)
    4. p_d = p * z / (1 - dropout_p), z ~ Bernoulli(1 - dropout_p)              eq. (3.5)
    5. o = p_d v                                eq. (3.6)
Backward, the same steps in reverse:
    5. dv = p_d^T dout,  dp_d = dout v^T        eq. (3.7)
    4. dp = dp_d * z / (1 - dropout_p)          eq. (3.8)
    3. ds = p * (dp - rowsum(p * dp))           eq. (3.9)
    2. masked entries have p = 0, so ds = 0 there; additive terms pass ds through (dmask = ds summed
       to the mask's shape, eq. (13.5)); softcap multiplies it by 1 - tanh^2       eq. (13.6)
    1. dq = scale * ds k,  dk = scale * ds^T q  eq. (3.10), summed over each kv group: eq. (3.11)
With learnable sinks (derivations/15-sinks-varlen.md) step 3 is a softmax over the row's keys and one
more logit, the head's sink, that has no value (eq. (15.1)); its backward keeps eq. (3.9) as it is and
adds dsink = -rowsum over rows of p_sink * delta (eqs. (15.3)-(15.4)). Packed sequences
(``cu_seqlens_q``/``cu_seqlens_k``) run steps 1-5 once per sequence (eq. (15.6)).
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional

from ..backend import (
    check_cache,
    check_dout,
    check_float,
    check_same_dtype,
    check_workers,
    compute_dtype,
    default_workers,
    device,
    host_rng,
    keep_mask,
    namespace,
    run_grid,
    to_compute,
)
from .scores import (
    Scores,
    causal_offset,
    make_scores,
    mask_grad_block,
    packed_sequences,
    sink_grad,
    softcap_backward,
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
    t: object = None  # tanh(s / softcap) (..., H, N, M) for the softcap backward, or None
    sc: object = None  # the score pipeline (ops/scores.py): mask, band, ALiBi, softcap, sinks
    p_sink: object = None  # (..., H, N) the sink's weight exp(sink - lse) per row, or None without sinks
    packed: object = None  # packed sequences: [(q rows, key rows, that sequence's cache)], or None


def check_qkv(xp, q, k, v):
    """Validate q, k, v against docs/conventions.md and return ``(G, R)``: kv heads and query heads per group."""
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
    H, G = q.shape[-3], k.shape[-3]
    if G == 0 or H == 0:
        raise ValueError(f"q and k must have at least one head (H >= 1, G >= 1), got {shapes}")
    if v.shape[-3] != G:
        raise ValueError(f"k and v must have the same number of heads G (axis -3), got {shapes}")
    if G > H or H % G != 0:
        raise ValueError(f"query heads H={H} must be a multiple of key/value heads G={G} (H % G == 0), got {shapes}")
    return G, H // G


def causal_allowed(xp, rows, cols, N: int, M: int, like, causal=True):
    """Bool ``(len(rows), len(cols))``: query ``i`` may see key ``j`` iff ``j <= i + M - N``
    (bottom-right, as FlashAttention >= 2.1; ``causal="top-left"``: ``j <= i``). ``rows``/``cols``
    are ``(start, stop)`` index ranges. Derivation: derivations/03-attention.md, eq. (3.3).
    """
    dev = device(like)
    i = xp.arange(rows[0], rows[1], device=dev)[:, None]     # (n_rows, 1)
    j = xp.arange(cols[0], cols[1], device=dev)[None, :]     # (1, n_cols)
    return j <= i + causal_offset(causal, N, M)              # (n_rows, n_cols)


def _check_dropout(dropout_p):
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
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
        return a[(slice(None),) * self.axis + (slice(u0 * self.r, u1 * self.r), Ellipsis)]

    def kv_side(self, a, w):
        """Share ``w`` of a kv-side array (k, v, dk, dv)."""
        u0, u1 = self.ranges[w]
        return a[(slice(None),) * self.axis + (slice(u0, u1), Ellipsis)]

    def scores(self, sc: Scores, w) -> Scores:
        """The score pipeline of share ``w``: its mask and ALiBi slopes, and its kv groups."""
        slopes = sc.slopes
        if slopes is not None and slopes.shape[self.axis] != 1:
            slopes = self.kv_side(slopes, w)              # (..., G, R, 1, 1): the G axis is q's head axis
        u0, u1 = self.ranges[w]
        lead, G = sc.lead, sc.G
        if self.axis == len(lead):                        # cut on the head axis: its kv groups
            G = u1 - u0
        else:                                             # cut on a batch axis
            lead = lead[:self.axis] + (u1 - u0,) + lead[self.axis + 1:]
        sinks = sc.sinks
        if sinks is not None:
            sinks = self.kv_side(sinks, w)                # (..., G, R, 1, 1), full (broadcast when made)
        return sc._replace(mask=self.q_side(sc.mask, w), slopes=slopes, sinks=sinks, G=G, lead=lead)

    def join_mask(self, xp, mask, parts):
        """The shares' ``dmask`` blocks as one: summed in share order where the mask is broadcast
        along the split axis (every share saw all of it), else laid side by side."""
        if mask.shape[self.axis] == 1:
            total = parts[0]
            for part in parts[1:]:
                total = total + part
            return total
        return xp.concat(parts, axis=self.axis)

    def index(self, w, r=None):
        u0, u1 = self.ranges[w]
        r = self.r if r is None else r
        return (slice(None),) * self.axis + (slice(u0 * r, u1 * r), Ellipsis)   # whole: the array API wants every axis


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


def resolve_naive_workers(like, workers, scores: int) -> int:
    """``workers=None``: every core (see ``backend.default_workers``) once the scores have at least
    ``NAIVE_THREADS_MIN_SCORES`` entries, else 1. Explicit values are checked and honored."""
    if workers is None:
        return default_workers(like) if scores >= NAIVE_THREADS_MIN_SCORES else 1
    return check_workers(like, workers)


def attention_forward(q, k, v, *, mask=None, causal=False, scale=None, dropout_p=0.0, rng=None, softcap=None,
                      alibi_slopes=None, window=None, sinks=None, cu_seqlens_q=None, cu_seqlens_k=None,
                      workers=None):
    """Scaled dot-product attention ``o = dropout(softmax(scores(q, k))) v``.

    Parameters
    ----------
    q : array (..., H, N, D)
    k : array (..., G, M, D)      ``G == H``, or ``G < H`` with ``H % G == 0`` (grouped-query).
    v : array (..., G, M, Dv)
    mask : array or None
        Broadcastable to ``(..., H, N, M)``. bool: True = may attend. float (the inputs' dtype):
        added to the scores (a learnable bias: ``attention_backward(..., mask_grad=True)``).
    causal : bool or "bottom-right" / "top-left"
        True (= "bottom-right"): query ``i`` may attend key ``j`` iff ``j <= i + M - N``;
        "top-left": iff ``j <= i`` (torch's ``is_causal``). Combines with mask and window.
    scale : float or None
        Defaults to ``1/sqrt(D)``.
    dropout_p : float in [0, 1)
        Probability of zeroing an attention weight; kept weights are scaled by ``1/(1-dropout_p)``.
    rng : numpy.random.Generator, int seed or None
        Source of the dropout mask, drawn on the inputs' device (``backend.keep_mask``): an int
        seed gives the same mask on every host library; CuPy and torch CUDA use their own
        generator, reproducible from the seed but not equal to NumPy's.
    softcap : float > 0 or None
        Replaces the scaled scores by ``softcap * tanh(s / softcap)`` (Gemma 2), first.
    alibi_slopes : array broadcastable to ``(..., H)`` or None
        Adds ``-slope_h * |i + M - N - j|`` to head ``h``'s scores (ALiBi). No gradient.
    window : (left, right) or None
        Query ``i`` sees key ``j`` only if ``i + M - N - left <= j <= i + M - N + right``
        (None on a side: unbounded). Sliding-window attention (Longformer, Mistral).
    sinks : array broadcastable to ``(..., H)`` or None
        A learnable sink logit per query head (gpt-oss): an extra term ``exp(sink_h)`` in every
        row's softmax denominator, with no value. The backward returns ``dsinks`` last.
    cu_seqlens_q, cu_seqlens_k : integer arrays (S + 1,) or None
        Packed variable-length sequences: ``q (H, total_q, D)``, ``k (G, total_k, D)``; sequence
        ``b``'s queries ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` attend only its keys
        ``cu_seqlens_k[b]:cu_seqlens_k[b+1]``, every rule (causal, window, ALiBi, sinks) per sequence.
        ``cache.p`` is then a tuple of the sequences' weights; the rest of each sequence's state
        (``p_sink``, the dropout mask) is in its own cache, ``cache.packed[b][2]``. No ``mask`` with them.
    workers : int >= 1 or None
        Threads over independent (batch, kv-group) slices, each running steps 1-5 below on its
        slice (BLAS on one thread each; needs threadpoolctl). None: every core for NumPy inputs with
        at least ``NAIVE_THREADS_MIN_SCORES`` score entries, else 1. Also the backward's default.

    Returns
    -------
    o : array (..., H, N, Dv), the inputs' dtype.
    cache : AttentionCache (``cache.p`` is the weights before dropout; ``cache.p_sink`` the sink's).

    NaN is never hidden: a NaN in q, k, v or a float mask reaches every row that may attend it, and
    through ``p @ v`` (``0 * NaN``) also the other rows of its head.

    Derivation: derivations/03-attention.md, eqs. (3.1)-(3.6); the variants: derivations/13-variants.md.
    """
    xp = namespace(q=q, k=k, v=v, mask=mask, sinks=sinks)
    G, R = check_qkv(xp, q, k, v)
    dropout_p = _check_dropout(dropout_p)
    ct = compute_dtype(xp, q.dtype)
    M, Dv = k.shape[-2], v.shape[-1]
    scores_shape = tuple(q.shape[:-1]) + (M,)                             # (..., H, N, M)
    packed = cu_seqlens_q is not None or cu_seqlens_k is not None
    seqs = packed_sequences(q, k, v, cu_seqlens_q, cu_seqlens_k, mask) if packed else None
    sc = make_scores(xp, q, k, mask=mask, causal=causal, scale=scale, softcap=softcap,
                     alibi_slopes=alibi_slopes, window=window, G=G, R=R, sinks=sinks)
    if packed:                                                            # one call per sequence: eq. (15.6)
        gen = None if dropout_p == 0.0 else host_rng(rng)                 # one stream, drawn sequence by sequence
        kwargs = dict(causal=causal, scale=scale, dropout_p=dropout_p, rng=gen, softcap=softcap,
                      alibi_slopes=alibi_slopes, window=window, sinks=sinks, workers=workers)
        parts = [(rows, keys) + attention_forward(q[:, rows, :], k[:, keys, :], v[:, keys, :], **kwargs)
                 for rows, keys in seqs]
        o = _concat_rows(xp, [o_b for _, _, o_b, _ in parts], tuple(q.shape[:-1]) + (Dv,), q.dtype, q)   # (H, total_q, Dv)
        cache = AttentionCache(q=q, k=k, v=v, p=tuple(c.p for *_, c in parts), keep=None, scale=sc.scale,
                               dropout_p=dropout_p, sc=sc,
                               packed=[(rows, keys, c) for rows, keys, _, c in parts])
        return o, cache
    workers = resolve_naive_workers(q, workers, math.prod(scores_shape))
    keep = None
    if dropout_p > 0.0:                                                   # drawn whole, so shares don't matter
        keep = keep_mask(xp, scores_shape, dropout_p, rng, like=q)              # (..., H, N, M) on q's device
    split = _split(q, k, workers)
    if split is None:
        o, p, t, p_sink = _attend(xp, q, k, v, sc, keep, dropout_p)
    else:
        dev = device(q)
        o = xp.empty(tuple(q.shape[:-1]) + (Dv,), dtype=ct, device=dev)   # (..., H, N, Dv)
        p = xp.empty(scores_shape, dtype=ct, device=dev)                  # (..., H, N, M)
        t = xp.empty(scores_shape, dtype=ct, device=dev) if sc.softcap is not None else None
        p_sink = xp.empty(tuple(q.shape[:-1]), dtype=ct, device=dev) if sc.sinks is not None else None

        def share(w, _):
            o_w, p_w, t_w, p_sink_w = _attend(xp, split.q_side(q, w), split.kv_side(k, w), split.kv_side(v, w),
                                              split.scores(sc, w), split.q_side(keep, w), dropout_p)
            o[split.index(w)], p[split.index(w)] = o_w, p_w
            if t is not None:
                t[split.index(w)] = t_w
            if p_sink is not None:
                p_sink[split.index(w)] = p_sink_w

        run_grid(share, split.ranges)
    cache = AttentionCache(q=q, k=k, v=v, p=p, keep=keep, scale=sc.scale, dropout_p=dropout_p, workers=workers,
                           t=t, sc=sc, p_sink=p_sink)
    return xp.astype(o, q.dtype, copy=False), cache


def _concat_rows(xp, parts: list, shape: tuple, dtype, like):
    """Packed sequences' results side by side along the token axis, axis 1 of ``(H, total, C)``
    arrays and of ``(H, total)`` row statistics; with no sequence, zeros of ``shape``."""
    if not parts:
        return xp.zeros(shape, dtype=dtype, device=device(like))
    return xp.concat(parts, axis=1)


def _grouped5(xp, a, sc: Scores):
    """``(..., H, N, M)`` <-> ``(..., G, R, N, M)``, the score pipeline's layout (a free reshape)."""
    return xp.reshape(a, sc.lead + (sc.G, sc.R) + tuple(a.shape[-2:]))


def _attend(xp, q, k, v, sc: Scores, keep, dropout_p):
    """Steps 1-5 of the forward on one slice (or all of it): ``(o, p, t, p_sink)`` in the compute
    dtype (``p_sink`` None without sinks)."""
    G, R = sc.G, sc.R
    N, M, D, Dv = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    lead = tuple(q.shape[:-3])
    scores_shape = tuple(q.shape[:-1]) + (M,)                             # (..., H, N, M)
    qc, kc, vc = to_compute(xp, q), to_compute(xp, k), to_compute(xp, v)

    # 1. scores, one matmul per kv group: eq. (3.1)
    qg = xp.reshape(qc, lead + (G, R * N, D))                            # (..., G, R*N, D)
    s = xp.reshape((sc.scale * qg) @ kc.mT, lead + (G, R, N, M))          # (..., G, R, N, M)
    # 2. the score pipeline: softcap, float mask, ALiBi, then every bool constraint (mask, causal,
    #    window) as -inf: eqs. (13.1)-(13.3), (3.2)-(3.3)
    s, t = sc.apply(xp, s, (0, N), (0, M))
    p_sink = None
    if sc.sinks is None:
        s = xp.reshape(s, scores_shape)                                  # (..., H, N, M)
        # 3. softmax over keys; rows with no allowed key give p = 0: eq. (3.4)
        p, _, _ = _stable_softmax(xp, s, -1, overwrite=True)              # (..., H, N, M); s is ours
    else:
        # 3. softmax over keys and the head's sink: eq. (15.1)
        p, p_sink = _softmax_with_sink(xp, s, sc.sinks)                   # (..., G, R, N, M|1)
        p, p_sink = xp.reshape(p, scores_shape), xp.reshape(p_sink, tuple(q.shape[:-1]))
    # 4. dropout: eq. (3.5)
    p_d = p if keep is None else _dropout(xp, p, keep, dropout_p)
    # 5. weighted sum of values: eq. (3.6)
    o = xp.reshape(xp.reshape(p_d, lead + (G, R * N, M)) @ vc,
                   tuple(q.shape[:-1]) + (Dv,))                          # (..., H, N, Dv)
    return o, p, None if t is None else xp.reshape(t, scores_shape), p_sink


def _softmax_with_sink(xp, s5, sink5):
    """Softmax of each row of ``s5 (..., G, R, N, M)`` with one more logit, the head's sink
    ``sink5 (..., G, R, 1, 1)``, that has no value: ``p = exp(s - m) / l`` and the sink's own weight
    ``p_sink = exp(sink - m) / l`` with ``l = exp(sink - m) + rowsum(exp(s - m))`` and ``m`` the max
    over the row and the sink (eq. (15.1)). A row with no allowed key gives ``p = 0, p_sink = 1``."""
    rows = tuple(s5.shape[:-1]) + (1,)
    m = xp.broadcast_to(sink5, rows)                                       # (..., G, R, N, 1)
    if s5.shape[-1] > 0:
        m = xp.maximum(xp.max(s5, axis=-1, keepdims=True), m)
    m = xp.where(m == -xp.inf, xp.zeros_like(m), m)                        # a sink of -inf and no key
    s5 -= m                                                                # in place: the caller's scores
    e = xp.exp(s5)                                                         # (..., G, R, N, M)
    e_sink = xp.exp(sink5 - m)                                             # (..., G, R, N, 1)
    l = xp.sum(e, axis=-1, keepdims=True) + e_sink
    inv_l = xp.where(l == 0, xp.zeros_like(l), 1.0 / xp.where(l == 0, xp.ones_like(l), l))
    e *= inv_l
    return e, e_sink * inv_l


def attention_backward(dout, cache: AttentionCache, *, mask_grad: bool = False, workers=None):
    """Gradients of ``attention_forward``: ``(dq, dk, dv)`` in q, k, v's shapes, and ``dmask`` (in
    the float mask's own shape) too with ``mask_grad=True``, and ``dsinks`` (in the sinks' shape)
    last when the forward had sinks.

    With grouped-query attention ``dk``, ``dv`` are summed over the ``R`` query heads of each
    group. ``workers`` defaults to the forward's. Derivation: derivations/03-attention.md,
    eqs. (3.7)-(3.11); the variants' terms: derivations/13-variants.md, eqs. (13.5)-(13.6); sinks:
    derivations/15-sinks-varlen.md, eqs. (15.3)-(15.4).
    """
    check_cache(cache, AttentionCache, "attention_forward")
    q, k, v, p, keep, scale, dropout_p, cache_workers, t, sc, p_sink, packed = cache
    xp = namespace(dout=dout, q=q)
    check_dout(xp, dout, tuple(q.shape[:-1]) + (v.shape[-1],), q.dtype)
    want_dmask = _check_mask_grad(xp, mask_grad, sc)
    if workers is not None:
        workers = check_workers(q, workers)
    if packed is not None:                            # each sequence's backward: eq. (15.6)
        grads = [attention_backward(dout[:, rows, :], c, workers=workers) for rows, _, c in packed]
        return _join_packed(xp, grads, q, k, v, sc)
    workers = cache_workers if workers is None else workers
    split = _split(q, k, workers)
    if split is None:
        grads = _attend_backward(xp, dout, q, k, v, p, keep, t, p_sink, sc, dropout_p, want_dmask)
    else:
        ct = compute_dtype(xp, q.dtype)
        full = [xp.empty(tuple(a.shape), dtype=ct, device=device(q)) for a in (q, k, v)]
        if sc.sinks is not None:                      # each row's dsink share: (..., H, N)
            full.append(xp.empty(tuple(q.shape[:-1]), dtype=ct, device=device(q)))
        dmask_parts = [None] * len(split.ranges)

        def share(w, _):
            parts = _attend_backward(xp, split.q_side(dout, w), split.q_side(q, w), split.kv_side(k, w),
                                     split.kv_side(v, w), split.q_side(p, w), split.q_side(keep, w),
                                     split.q_side(t, w), split.q_side(p_sink, w), split.scores(sc, w), dropout_p,
                                     want_dmask)
            for whole, part, r in zip(full, parts, (None, 1, 1, None)):
                whole[split.index(w, r)] = part
            dmask_parts[w] = parts[-1] if want_dmask else None

        run_grid(share, split.ranges)
        grads = tuple(full)
        if want_dmask:
            grads += (split.join_mask(xp, sc.mask, dmask_parts),)
    dt = q.dtype
    out = tuple(xp.astype(a, dt, copy=False) for a in grads[:3])
    if want_dmask:                                    # in the mask's own shape (check_mask padded it)
        out += (xp.astype(xp.reshape(grads[-1], sc.mask_shape), dt, copy=False),)
    if sc.sinks is not None:                          # eq. (15.4): summed over rows, in the sinks' shape
        out += (xp.astype(sink_grad(xp, sc, grads[3]), dt, copy=False),)
    return out


def _join_packed(xp, grads: list, q, k, v, sc: Scores) -> tuple:
    """The sequences' gradients as the packed arrays': ``dq`` side by side along the queries, ``dk``
    and ``dv`` along the keys (each key belongs to one sequence), ``dsinks`` summed (every sequence
    shares the heads' sinks): eq. (15.6)."""
    out = tuple(_concat_rows(xp, [g[i] for g in grads], tuple(a.shape), q.dtype, q) for i, a in enumerate((q, k, v)))
    if sc.sinks is not None:                          # summed in the compute dtype (float32 for float16), cast once
        ct = compute_dtype(xp, q.dtype)
        dsinks = xp.zeros(sc.sinks_shape, dtype=ct, device=device(q))
        for g in grads:                               # in sequence order: reproducible
            dsinks = dsinks + xp.astype(g[3], ct)
        out += (xp.astype(dsinks, q.dtype, copy=False),)
    return out


def _check_mask_grad(xp, mask_grad, sc: Scores) -> bool:
    if not isinstance(mask_grad, bool):
        raise TypeError(f"mask_grad must be a bool, got {mask_grad!r}")
    if mask_grad and (sc.mask is None or not xp.isdtype(sc.mask.dtype, "real floating")):
        raise ValueError("mask_grad=True returns the gradient of a float mask; this forward had "
                         f"{'no mask' if sc.mask is None else 'a bool mask'}")
    return mask_grad


def _attend_backward(xp, dout, q, k, v, p, keep, t, p_sink, sc: Scores, dropout_p, want_dmask):
    """The backward's steps on one slice (or all of it): ``(dq, dk, dv[, dsink_rows][, dmask])`` in the
    compute dtype; ``dsink_rows (..., H, N)`` is each row's share of ``dsinks`` (with sinks only)."""
    N, M, D, Dv = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    lead = tuple(q.shape[:-3])
    G, R = sc.G, sc.R
    qc, kc, vc, dout_c = (to_compute(xp, a) for a in (q, k, v, dout))

    def grouped(a, cols):
        return xp.reshape(a, lead + (G, R * N, cols))                    # (..., G, R*N, cols)

    # in the forward pass this was step 4: p_d = p * z / (1 - dropout_p)
    p_d = p if keep is None else _dropout(xp, p, keep, dropout_p)
    # step 5, o = p_d v: eq. (3.7); the matmul over R*N rows sums each group's heads
    dout_g = grouped(dout_c, Dv)                                         # (..., G, R*N, Dv)
    dv = grouped(p_d, M).mT @ dout_g                                     # (..., G, M, Dv)
    dp = xp.reshape(dout_g @ vc.mT, p.shape)                             # (..., H, N, M)
    # step 4, dropout: eq. (3.8)
    if keep is not None:
        dp = _dropout(xp, dp, keep, dropout_p)
    # step 3, softmax: eq. (3.9); with a sink (no value, so dp_sink = 0), delta is the same rowsum
    # and the sink's logit gets -p_sink * delta: eq. (15.3)
    delta = xp.vecdot(p, dp)[..., None]                                  # (..., H, N, 1): rowsum(p * dp), no N x M temporary
    dsink_rows = None if p_sink is None else -p_sink * delta[..., 0]     # (..., H, N)
    dp -= delta                                                          # in place: dp is our own array
    ds = dp                                                              # (..., H, N, M)
    ds *= p                                                              # ds = p * (dp - rowsum(p * dp))
    # step 2, the score pipeline: additive terms pass ds through (dmask, eq. (13.5)); softcap
    # multiplies it by 1 - tanh^2 (eq. (13.6))
    dmask = mask_grad_block(xp, sc, _grouped5(xp, ds, sc), (0, N)) if want_dmask else None
    ds = softcap_backward(ds, t)
    # step 1, s = scale * q k^T: eq. (3.10)
    dsg = grouped(ds, M)                                                 # (..., G, R*N, M)
    dq = xp.reshape(sc.scale * (dsg @ kc), q.shape)                      # (..., H, N, D)
    dk = sc.scale * (dsg.mT @ grouped(qc, D))                            # (..., G, M, D)  eq. (3.11)
    grads = (dq, xp.reshape(dk, k.shape), xp.reshape(dv, v.shape))
    if dsink_rows is not None:
        grads += (dsink_rows,)
    return grads + (dmask,) if want_dmask else grads
