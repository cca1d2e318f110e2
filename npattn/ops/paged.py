"""Attention over a paged KV cache (vLLM's PagedAttention, FlashAttention's ``flash_attn_with_kvcache``):
forward and hand-derived backward.

A serving engine keeps every sequence's keys and values in fixed-size pages from one pool and a
block table per sequence saying which pages, in which order, hold them. Pages are the key tiles of
chapter 4's online softmax: the forward walks page slots and reads one page per sequence at a time,
so no sequence's keys are ever gathered into one array.

Shape legend (SPEC.md, "Paged KV cache"): ``q (B, H, N, D)`` the newest ``N`` tokens of ``B``
sequences; ``k_pages (P, G, S, D)``, ``v_pages (P, G, S, Dv)`` a pool of ``P`` pages of
``S = page_size`` rows; ``block_table (B, max_pages)`` page ids; ``seqlens (B,)`` the key count
``M_b`` of each sequence (its newest ``N`` included); ``o (B, H, N, Dv)``, ``lse (B, H, N)``.
Inside the loop one page slot's tile is ``(B, G, S, D)`` (one page per sequence), and a kv group's
``R = H // G`` query heads are stacked as rows, ``(B, G, R*N, .)``, as in ops/flash.py.

Forward (derivations/16-paged-kv-cache.md):
    0. key j of sequence b is row j mod S of page block_table[b, j // S]           eq. (16.1)
       query i sits at position M_b - N + i: causal, window and ALiBi per sequence  eq. (16.2)
    1. m = sink, l = 1 (no sinks: m = -inf, l = 0), acc = 0                       eq. (16.4)
    for each page slot p that some sequence reads (the only Python loop of the math):
    2.   k_p, v_p = xp.take(pages, ids of slot p): one page per sequence,          eq. (16.3)
         rows that are not keys of that sequence set to 0
    3.   s = scale q k_p^T, softcap, ALiBi, -inf unless allowed       eqs. (13.1)-(13.3), (16.2)
    4.   m_new = max(m, rowmax s), alpha = exp(m - m_new), p = exp(s - m_new),
         l = alpha l + rowsum p, acc = alpha acc + p v_p, m = m_new             eqs. (4.6)-(4.9)
    5. o = acc / l, lse = m + log l                                            eqs. (4.10), (16.4)
Backward, the same steps in reverse:
    5. delta = rowsum(dout * o) - dlse; dsinks = -sum p_sink delta       eqs. (5.3), (5.6), (16.5)
    for each page slot p the forward visited:
    4.   p = exp(s - m) / l, recomputed from step 3 and the saved m, 1/l              eq. (5.4)
         dv_p = p^T dout, dp = dout v_p^T, ds = p (dp - delta)                   eqs. (5.5)-(5.6)
    3.   softcap: ds *= 1 - tanh^2; dq += scale ds k_p, dk_p = scale ds^T q       eqs. (13.6), (5.5)
    2.   the gather's adjoint, a scatter-add: dk_pages[block_table[b, p]] += dk_p[b] for every
         sequence b that read the page (a shared page sums, an unread page keeps 0)   eq. (16.6)
Extra memory: one page per sequence at a time, O(B G S (D + Dv)), and O(B H N) row statistics:
eq. (16.7).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..backend import (
    check_cache,
    check_dout,
    check_float,
    check_same_dtype,
    compute_dtype,
    device,
    from_numpy,
    host_index,
    is_array_api_obj,
    namespace,
    to_compute,
    where_,
)
from .scores import causal_offset, make_scores, softcap_backward

__all__ = ["paged_attention_forward", "paged_attention_backward", "PagedCache"]


class PagedCache(NamedTuple):
    """Saved by ``paged_attention_forward``: the inputs (the pools by reference, never copied), the
    output ``o``, the log-sum-exp ``lse`` and the row statistics ``shift`` (m) and ``inv_l`` (1/l).

    Nothing here holds a sequence's keys: the backward walks the same page slots (``walk``) and
    recomputes each page's ``p = exp(s - m) / l`` (derivations/05-flash-backward.md, eq. (5.4)).
    """

    q: object  # (B, H, N, D)
    k_pages: object  # (P, G, S, D)
    v_pages: object  # (P, G, S, Dv)
    sinks: object  # the caller's sinks (broadcastable to (H,)), or None
    o: object  # (B, H, N, Dv), the inputs' dtype
    lse: object  # (B, H, N), the compute dtype; -inf (or the sink) for rows that see no key
    shift: object  # (B, H, N) the row max m the forward subtracted (0 for rows that saw nothing)
    inv_l: object  # (B, H, N) 1 / l (0 for rows that saw nothing): p = exp(s - shift) * inv_l
    walk: object  # the _PageWalk: which page every sequence reads at every slot, and the scores


class _PageWalk:
    """The page-slot bookkeeping shared by forward and backward: which slots are visited, which
    page each sequence reads there, which of its rows are keys, and the score pipeline of one slot.

    Decided once on the host from the host copies of ``block_table`` and ``seqlens`` (as vLLM and
    FlashAttention decide their grids from host-side lengths); the small index arrays the math
    needs go to the inputs' device once, here, in explicit copies.
    """

    def __init__(self, xp, q, k_pages, table, seqlens, causal, window, softcap, slopes, scale):
        B, H, N, _ = q.shape
        _, G, S, _ = k_pages.shape
        self.xp, self.B, self.G, self.R, self.N, self.S = xp, B, G, H // G, N, S
        self.scale, self.softcap, self.slopes = scale, softcap, slopes      # slopes (B, G, R, 1, 1) or None
        # eq. (16.2): the band i + lo_b <= j <= i + hi_b of eq. (13.3) with each sequence's own M_b
        left, right = (None, None) if window is None else window
        lo, hi = [], []
        for m_b in seqlens.tolist():
            c_off = causal_offset(causal, N, m_b)
            h = None if right is None else m_b - N + int(right)
            hi.append(c_off if h is None else (h if c_off is None else min(h, c_off)))
            lo.append(None if left is None else m_b - N - int(left))
        self.has_lo = left is not None
        self.has_hi = right is not None or causal_offset(causal, N, N) is not None   # the same for every b
        used = -(-seqlens // S)                                              # (B,) pages each sequence holds
        n_slots = int(used.max()) if B else 0
        slot = np.arange(n_slots)[:, None]                                   # (n_slots, 1)
        j0, j1 = slot * S, np.minimum(slot * S + S, seqlens[None, :])       # (n_slots, B) its key rows
        read = slot < used[None, :]                                          # (n_slots, B)
        if self.has_hi:                                                      # the slot is right of the band
            read &= ~(j0 > N - 1 + np.asarray(hi)[None, :])
        if self.has_lo:                                                      # ... or left of it: eq. (13.4)
            read &= ~(j1 - 1 < np.asarray(lo)[None, :])
        self.slots = [p for p in range(n_slots) if read[p].any()]          # the slots someone reads
        ids = np.where(read, table[:, :n_slots].T, -1)                      # (n_slots, B)
        for p in self.slots:                                                 # a slot a sequence does not read:
            ids[p, ~read[p]] = ids[p, read[p]][0]                            # any page that is read, masked out
        self.ids, self.read = ids, read                                      # host (n_slots, B)
        # a slot whose every row is a key of the sequence reading it (the usual page of a long
        # sequence) needs no zeroing: only partly filled last pages and stand-ins do
        self.whole = read.all(axis=1) & (j1 - j0 == S).all(axis=1)          # host (n_slots,)
        like, dev = q, device(q)
        self.ids_dev = from_numpy(xp, ids, like)                             # (n_slots, B) on the device
        self.read_dev = from_numpy(xp, read, like)                           # (n_slots, B)
        self.m_b = xp.reshape(from_numpy(xp, seqlens, like), (B, 1, 1, 1, 1))    # (B, 1, 1, 1, 1)
        self.lo_b = None if not self.has_lo else xp.reshape(from_numpy(xp, np.asarray(lo, np.int64), like),
                                                            (B, 1, 1, 1, 1))     # (B, 1, 1, 1, 1)
        self.hi_b = None if not self.has_hi else xp.reshape(from_numpy(xp, np.asarray(hi, np.int64), like),
                                                            (B, 1, 1, 1, 1))     # (B, 1, 1, 1, 1)
        self.i = xp.reshape(xp.arange(N, device=dev), (1, 1, 1, N, 1))     # (1, 1, 1, N, 1)
        self.rows = xp.reshape(xp.arange(S, device=dev), (1, 1, 1, 1, S))  # (1, 1, 1, 1, S)
        self.neg_inf = xp.asarray(-xp.inf, dtype=compute_dtype(xp, q.dtype), device=dev)
        self.zero = xp.zeros_like(self.neg_inf)

    def page(self, pages, p):
        """Slot ``p``'s tile ``(B, G, S, C)`` of ``pages``: the page every sequence reads there, in
        the compute dtype, and the bool ``(B, 1, 1, 1, S)`` of its rows that are keys of that
        sequence (row < M_b of a page it reads). Other rows are set to 0: they are not inputs, and
        garbage or NaN there (an unwritten tail, a stand-in page) must not reach the result.
        Derivation: derivations/16-paged-kv-cache.md, eqs. (16.1), (16.3)."""
        xp = self.xp
        tile = to_compute(xp, xp.take(pages, self.ids_dev[p, ...], axis=0))  # (B, G, S, C): the gather
        if self.whole[p]:                                                   # every row a key: nothing to hide
            return tile, None
        j = self.rows + p * self.S                                          # (1, 1, 1, 1, S) key positions
        key = xp.logical_and(j < self.m_b, xp.reshape(self.read_dev[p, ...], (self.B, 1, 1, 1, 1)))
        return xp.where(xp.reshape(key, (self.B, 1, self.S, 1)), tile, self.zero), key   # (B, G, S, C)

    def scores(self, s, p, key):
        """The score pipeline on slot ``p``'s scaled scores ``(B, G, R*N, S)``: softcap, ALiBi at
        each sequence's own positions, then -inf where the key is not one of the sequence's or the
        band forbids it. Returns ``(s, t)`` with ``t`` the softcap's tanh (None without softcap).
        Derivation: derivations/13-variants.md, eqs. (13.1)-(13.3), per sequence as eq. (16.2)."""
        xp, B, G, R, N, S = self.xp, self.B, self.G, self.R, self.N, self.S
        s5 = xp.reshape(s, (B, G, R, N, S))                                 # (B, G, R, N, S)
        t = None
        if self.softcap is not None:                                        # eq. (13.1)
            t = xp.tanh(s5 / self.softcap)
            s5 = self.softcap * t
        j = self.rows + p * self.S                                          # (1, 1, 1, 1, S)
        if self.slopes is not None:                                         # eq. (13.2): |i + M_b - N - j|
            dist = xp.abs(self.i + self.m_b - N - j)                        # (B, 1, 1, N, S)
            s5 = s5 - self.slopes * xp.astype(dist, s5.dtype)               # (B, G, R, N, S)
        allowed = key                                                       # (B, 1, 1, 1, S), None: all keys
        if self.hi_b is not None:                                           # eq. (13.3), eq. (16.2)
            band = j <= self.i + self.hi_b                                  # (B, 1, 1, N, S)
            allowed = band if allowed is None else xp.logical_and(allowed, band)
        if self.lo_b is not None:
            band = j >= self.i + self.lo_b                                  # (B, 1, 1, N, S)
            allowed = band if allowed is None else xp.logical_and(allowed, band)
        if allowed is not None:
            s5 = where_(xp, allowed, s5, self.neg_inf)                      # (B, G, R, N, S), over s5: ours
        shape = (B, G, R * N, S)
        return xp.reshape(s5, shape), None if t is None else xp.reshape(t, shape)   # (B, G, R*N, S)

    def grouped(self, a):
        """q-side ``(B, H, N, C)`` -> ``(B, G, R*N, C)``: a kv group's heads stacked as rows."""
        return self.xp.reshape(a, (self.B, self.G, self.R * self.N, a.shape[-1]))


def _check_inputs(xp, q, k_pages, v_pages):
    for name, a in (("q", q), ("k_pages", k_pages), ("v_pages", v_pages)):
        check_float(xp, name, a)
    check_same_dtype(q=q, k_pages=k_pages, v_pages=v_pages)
    shapes = f"q {tuple(q.shape)}, k_pages {tuple(k_pages.shape)}, v_pages {tuple(v_pages.shape)}"
    if q.ndim != 4 or k_pages.ndim != 4 or v_pages.ndim != 4:
        raise ValueError("q, k_pages, v_pages must be 4-D: (B, H, N, D), (P, G, page_size, D), "
                         f"(P, G, page_size, Dv), got {shapes}")
    if q.shape[-1] != k_pages.shape[-1]:
        raise ValueError(f"q and k_pages must share the head dim D (last axis), got {shapes}")
    if tuple(k_pages.shape[:3]) != tuple(v_pages.shape[:3]):
        raise ValueError(f"k_pages and v_pages must share (P, G, page_size), got {shapes}")
    H, G, S = q.shape[1], k_pages.shape[1], k_pages.shape[2]
    if G < 1 or H < 1 or H % G != 0:
        raise ValueError(f"query heads H={H} must be a multiple of key/value heads G={G} (H % G == 0), got {shapes}")
    if S < 1:
        raise ValueError(f"page_size (axis 2 of k_pages) must be >= 1, got {shapes}")


def _check_index(q, k_pages, table, seqlens):
    """``block_table`` and ``seqlens`` (host copies) against the pool: named ValueErrors."""
    B, N = q.shape[0], q.shape[2]
    P, S = k_pages.shape[0], k_pages.shape[2]
    if table.shape[0] != B:
        raise ValueError(f"block_table must have one row per sequence, (B={B}, max_pages), got {table.shape}")
    if seqlens.shape != (B,):
        raise ValueError(f"seqlens must have shape (B,) = ({B},), got {seqlens.shape}")
    capacity = table.shape[1] * S
    for b, m_b in enumerate(seqlens.tolist()):
        if m_b < N:
            raise ValueError(f"seqlens[{b}] = {m_b} is below N = {N}: the sequence must hold its newest N tokens")
        if m_b > capacity:
            raise ValueError(f"seqlens[{b}] = {m_b} is beyond its pages: block_table has {table.shape[1]} "
                             f"pages of {S} rows ({capacity} keys)")
        ids = table[b, :-(-m_b // S)]                                       # the entries actually read
        bad = ids[(ids < 0) | (ids >= P)]
        if bad.size:
            raise ValueError(f"block_table[{b}] reads page {int(bad[0])}, out of range for {P} pages "
                             f"(k_pages has shape {tuple(k_pages.shape)})")


def _check_sinks(xp, sinks, q):
    """``sinks`` broadcastable to ``(H,)``, of the inputs' dtype; returns it as ``(1, G, R*N, 1)``
    rows in the compute dtype (one logit per query head, the same for every row of that head)."""
    check_float(xp, "sinks", sinks)
    if sinks.dtype != q.dtype:
        raise TypeError(f"sinks must have the inputs' dtype {q.dtype}, got {sinks.dtype} (npattn never casts silently)")
    H = q.shape[1]
    if sinks.ndim > 1 or (sinks.ndim == 1 and sinks.shape[0] not in (1, H)):
        raise ValueError(f"sinks must be broadcastable to the query heads (H,) = ({H},), got {tuple(sinks.shape)}")


def paged_attention_forward(q, k_pages, v_pages, block_table, seqlens, *, causal=False, scale=None, softcap=None,
                            alibi_slopes=None, window=None, sinks=None):
    """Attention of each sequence's newest ``N`` queries over its keys in a paged KV cache.

    Parameters
    ----------
    q : array (B, H, N, D)
        The newest ``N`` tokens of each sequence; query ``i`` of sequence ``b`` sits at position
        ``seqlens[b] - N + i``.
    k_pages : array (P, G, page_size, D),  v_pages : array (P, G, page_size, Dv)
        The pool of pages; ``H % G == 0`` (grouped-query: head ``h`` uses kv head ``h // (H // G)``).
    block_table : integer array (B, max_pages)
        Sequence ``b``'s keys are the first ``seqlens[b]`` rows of pages ``block_table[b, 0], ...``.
        Only the entries holding those keys are read; the rest may be anything (e.g. -1). A page
        may appear in several rows (prefix caching).
    seqlens : integer array (B,)
        ``M_b``, the keys of sequence ``b`` (its newest ``N`` included), ``N <= M_b <= max_pages * page_size``.
    causal, scale, softcap, alibi_slopes, window
        As ``attention_forward``, aligned per sequence with ``M = M_b`` (bottom-right: query ``i``
        sees key ``j <= M_b - N + i``; ``"top-left"``: ``j <= i``). ``alibi_slopes`` broadcastable
        to ``(B, H)``.
    sinks : array broadcastable to (H,) or None
        One learnable logit per query head, an extra softmax entry with no value (gpt-oss): the
        online softmax starts from ``m = sink, l = 1``.

    Returns
    -------
    o : array (B, H, N, Dv), the inputs' dtype: ``attention_forward`` on each sequence's gathered keys.
    cache : PagedCache, with ``cache.lse (B, H, N)`` (``-inf``, or the sink, for rows that see no key).

    The index arrays come to the host once (``backend.host_index``: which pages to visit is decided
    there); the float data never does. Slots that a sequence does not read (beyond its pages, or
    hidden by causal/window) get a stand-in page, fully masked, so the loop stays one batched step
    per slot; slots no sequence reads are skipped. NaN in a key or value of a page a sequence reads
    reaches that sequence's rows (as in ops/flash.py); rows beyond ``seqlens`` are not inputs.

    Derivation: derivations/16-paged-kv-cache.md, eqs. (16.1)-(16.4) (the index map, the pages as
    key tiles, the sink as the initial state), with derivations/04-online-softmax.md, eqs. (4.6)-(4.10).
    """
    xp = namespace(q=q, k_pages=k_pages, v_pages=v_pages, sinks=sinks,
                   block_table=block_table if is_array_api_obj(block_table) else None,
                   seqlens=seqlens if is_array_api_obj(seqlens) else None)
    _check_inputs(xp, q, k_pages, v_pages)
    table = host_index("block_table", block_table, 2)                       # (B, max_pages) host int64
    lengths = host_index("seqlens", seqlens, 1)                             # (B,) host int64
    _check_index(q, k_pages, table, lengths)
    B, H, N, D = q.shape
    G, Dv = k_pages.shape[1], v_pages.shape[-1]
    R = H // G
    # the score pipeline's checks (scale, softcap, alibi_slopes, window, causal), on q and one page
    sc = make_scores(xp, q, k_pages[:1, ...], mask=None, causal=causal, scale=scale, softcap=softcap,
                     alibi_slopes=alibi_slopes, window=window, G=G, R=R)
    if sinks is not None:
        _check_sinks(xp, sinks, q)
    walk = _PageWalk(xp, q, k_pages, table, lengths, causal, window, sc.softcap, sc.slopes, sc.scale)
    ct = compute_dtype(xp, q.dtype)
    dev = device(q)
    q_s = walk.grouped(to_compute(xp, q)) * sc.scale                       # (B, G, R*N, D), scaled once

    # 1. the initial state: the sink's logit, weight e^0 = 1, no value (eq. (16.4)); else -inf, 0, 0
    m_i = None if sinks is None else _sink_rows(xp, sinks, walk, ct)       # (B, G, R*N, 1)
    l_i = None if sinks is None else xp.ones_like(m_i)                     # (B, G, R*N, 1)
    acc = None if sinks is None else xp.zeros((B, G, R * N, Dv), dtype=ct, device=dev)
    for p in walk.slots:                                                    # pages are key tiles: eq. (16.3)
        k_p, key = walk.page(k_pages, p)                                    # (B, G, S, D)
        v_p, _ = walk.page(v_pages, p)                                      # (B, G, S, Dv)
        s, _ = walk.scores(q_s @ k_p.mT, p, key)                            # (B, G, R*N, S)  eqs. (13.1)-(13.3)
        m_tile = xp.max(s, axis=-1, keepdims=True)                          # (B, G, R*N, 1)
        m_new = m_tile if m_i is None else xp.maximum(m_i, m_tile)          # eq. (4.6)
        m_safe = xp.where(m_new == -xp.inf, walk.zero, m_new)               # all -inf so far: shift by 0
        s -= m_safe                                                         # in place: this step's own array
        p_tile = xp.exp(s)                                                  # (B, G, R*N, S)  eq. (4.7)
        if m_i is None:
            l_i, acc = xp.sum(p_tile, axis=-1, keepdims=True), p_tile @ v_p  # eqs. (4.8)-(4.9)
        else:
            alpha = xp.exp(m_i - m_safe)                                    # eq. (4.7)
            l_i = alpha * l_i + xp.sum(p_tile, axis=-1, keepdims=True)     # eq. (4.8)
            acc = alpha * acc + p_tile @ v_p                                # (B, G, R*N, Dv)  eq. (4.9)
        m_i = m_new

    # 5. eq. (4.10); l == 0 exactly when the row saw no key and has no sink: o = 0, lse = -inf
    if m_i is None:                                                         # no slot read at all
        m_i = xp.full((B, G, R * N, 1), -xp.inf, dtype=ct, device=dev)
        l_i, acc = xp.zeros_like(m_i), xp.zeros((B, G, R * N, Dv), dtype=ct, device=dev)
    empty = l_i == 0
    safe_l = xp.where(empty, xp.ones_like(l_i), l_i)
    inv_l = xp.where(empty, walk.zero, 1.0 / safe_l)
    o = xp.reshape(acc * inv_l, (B, H, N, Dv))                              # (B, H, N, Dv)
    lse = xp.reshape(xp.where(empty, walk.neg_inf, m_i + xp.log(safe_l)), (B, H, N))     # (B, H, N)
    shift = xp.reshape(xp.where(m_i == -xp.inf, walk.zero, m_i), (B, H, N))              # (B, H, N)
    inv_l = xp.reshape(inv_l, (B, H, N))                                                 # (B, H, N)
    o = xp.astype(o, q.dtype, copy=False)
    return o, PagedCache(q=q, k_pages=k_pages, v_pages=v_pages, sinks=sinks, o=o, lse=lse, shift=shift,
                         inv_l=inv_l, walk=walk)


def _sink_rows(xp, sinks, walk: _PageWalk, ct):
    """The sink logit of every query row, ``(B, G, R*N, 1)`` in the compute dtype."""
    H = walk.G * walk.R
    heads = xp.broadcast_to(xp.reshape(xp.astype(sinks, ct), (-1,)), (H,))   # (H,)
    rows = xp.broadcast_to(xp.reshape(heads, (1, walk.G, walk.R, 1)), (walk.B, walk.G, walk.R, walk.N))
    return xp.reshape(rows, (walk.B, walk.G, walk.R * walk.N, 1))           # (B, G, R*N, 1)


def paged_attention_backward(dout, cache: PagedCache, *, dlse=None):
    """Gradients of ``paged_attention_forward``: ``(dq, dk_pages, dv_pages, None, None)``, and
    ``dsinks`` (in the sinks' shape) last when the forward had sinks.

    ``dk_pages``, ``dv_pages`` have the pools' shapes: a page read by several sequences (prefix
    caching) gets the sum of their gradients, a page nobody read gets 0, and so do the rows of a
    page beyond a sequence's ``seqlens``. ``dlse (B, H, N)`` (the compute dtype, as ``cache.lse``),
    the gradient flowing into ``lse``, shifts ``delta`` (derivations/05-flash-backward.md,
    eq. (5.6)) and reaches ``dsinks``.

    Derivation: derivations/16-paged-kv-cache.md, eqs. (16.5)-(16.7) (dsinks, the gather's adjoint,
    memory), with derivations/05-flash-backward.md, eqs. (5.3)-(5.6) for each page.
    """
    check_cache(cache, PagedCache, "paged_attention_forward")
    q, k_pages, v_pages, sinks, o, lse, walk = (cache.q, cache.k_pages, cache.v_pages, cache.sinks, cache.o,
                                                cache.lse, cache.walk)
    xp = namespace(dout=dout, q=q, dlse=dlse)
    check_dout(xp, dout, o.shape, o.dtype)
    if dlse is not None:
        check_dout(xp, dlse, lse.shape, lse.dtype, name="dlse", output="lse")
    B, H, N, D = q.shape
    ct = compute_dtype(xp, q.dtype)
    dev = device(q)

    # 5. delta = rowsum(dout * o) = rowsum(p * dp) (eq. (5.3)), shifted by -dlse (eq. (5.6))
    dout_c = to_compute(xp, dout)
    delta = xp.sum(dout_c * to_compute(xp, o), axis=-1, keepdims=True)     # (B, H, N, 1)
    if dlse is not None:
        delta = delta - xp.astype(dlse, ct)[..., None]
    shift, inv_l, delta, dout_g = (walk.grouped(a) for a in (cache.shift[..., None], cache.inv_l[..., None],
                                                              delta, dout_c))   # (B, G, R*N, 1|Dv)
    q_s = walk.grouped(to_compute(xp, q)) * walk.scale                     # (B, G, R*N, D), as the forward's
    dsinks = None
    if sinks is not None:                                                   # eq. (16.5): p_sink (dlse - rowsum(dout o))
        p_sink = xp.exp(_sink_rows(xp, sinks, walk, ct) - shift) * inv_l     # (B, G, R*N, 1)
        per_head = xp.sum(xp.reshape(-p_sink * delta, (B, H, N)), axis=(0, 2))   # (H,): summed over b, i
        if tuple(sinks.shape) != (H,):                                      # one sink shared by every head
            per_head = xp.sum(per_head)                                     # ()
        dsinks = xp.reshape(per_head, tuple(sinks.shape))                   # the sinks' shape

    dq = xp.zeros(tuple(q_s.shape), dtype=ct, device=dev)                   # (B, G, R*N, D)
    dk_pages = xp.zeros(tuple(k_pages.shape), dtype=ct, device=dev)         # (P, G, S, D)
    dv_pages = xp.zeros(tuple(v_pages.shape), dtype=ct, device=dev)         # (P, G, S, Dv)
    for p in walk.slots:                                                    # the forward's slots
        k_p, key = walk.page(k_pages, p)                                    # (B, G, S, D)
        v_p, _ = walk.page(v_pages, p)                                      # (B, G, S, Dv)
        # 4. p = exp(s - m) / l with the forward's own m and 1/l: eq. (5.4)
        s, tanh_s = walk.scores(q_s @ k_p.mT, p, key)                       # (B, G, R*N, S)
        s -= shift                                                          # in place: this step's own array
        p_tile = xp.exp(s)
        p_tile *= inv_l
        dv_p = p_tile.mT @ dout_g                                           # (B, G, S, Dv)   eq. (5.5)
        dp = dout_g @ v_p.mT                                                # (B, G, R*N, S)  eq. (5.5)
        dp -= delta
        dp *= p_tile
        ds = softcap_backward(dp, tanh_s)                                   # eqs. (5.6), (13.6)
        # 3. s = scale q k_p^T: q_s carries the scale into dk_p; dq gets it once, at the end: eq. (5.5)
        dk_p = ds.mT @ q_s                                                  # (B, G, S, D)
        dq += ds @ k_p                                                      # in place: our own buffer
        # 2. the gather's adjoint is a scatter-add, eq. (16.6). The array API has no index_add (and
        # ``dk_pages[ids] += dk_p`` would keep one of two equal ids), so each sequence that read a
        # page adds its share in turn: a shared page sums, in a fixed order (b ascending).
        for b in np.flatnonzero(walk.read[p]).tolist():
            u = int(walk.ids[p, b])
            dk_pages[u, ...] += dk_p[b, ...]                                # in place: our own buffers
            dv_pages[u, ...] += dv_p[b, ...]
    dq *= walk.scale
    dt = q.dtype
    grads = (xp.astype(xp.reshape(dq, (B, H, N, D)), dt, copy=False), xp.astype(dk_pages, dt, copy=False),
             xp.astype(dv_pages, dt, copy=False), None, None)
    return grads if dsinks is None else grads + (xp.astype(dsinks, dt, copy=False),)
