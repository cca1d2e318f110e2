"""Tiled, memory-efficient attention mirroring FlashAttention-2: forward and backward.

The same function as ``attention_forward`` (without dropout), computed tile by tile so that no
``(N, M)`` array ever exists: the forward keeps the online-softmax state ``m_i, l_i, acc`` per query
tile and saves only ``o`` and the log-sum-exp ``lse``; the backward recomputes each tile of ``p``
from ``lse``. Extra memory is O(N) per head instead of O(N M).

Shape legend as in ops/attention.py: ``q (..., H, N, D)``, ``k (..., G, M, D)``,
``v (..., G, M, Dv)``, ``o (..., H, N, Dv)``, ``lse (..., H, N)``. Inside the loops a query tile of a
kv group is ``(..., G, R*bq, ...)``: the group's ``R`` query heads stacked as rows, so each tile is
one batched matmul against the group's single K/V tile (no repeated K/V), and ``p^T dout`` sums the
group in the backward. ``bq <= block_q``, ``bk <= block_k`` (the last tiles may be ragged).

Forward for query tile i (derivations/04-online-softmax.md):
    m_i = -inf, l_i = 0, acc = 0
    for each key tile j that causal and the window do not hide entirely (eq. (13.4)):
        s     = scores(q_i, k_j): scale, softcap, bias, masks   eq. (4.5), ops/scores.py
        m_new = max(m_i, rowmax(s))                       eq. (4.6)
        alpha = exp(m_i - m_new)                          eq. (4.7)
        p     = exp(s - m_new)                            eq. (4.7)
        l_i   = alpha * l_i + rowsum(p)                   eq. (4.8), rowsum as the product p 1
        acc   = alpha * acc + p v_j                       eq. (4.9)
        m_i   = m_new
    o_i = acc / l_i,  lse_i = m_i + log(l_i)             eq. (4.10)
Backward (derivations/05-flash-backward.md):
    delta = rowsum(dout * o) - dlse                       eqs. (5.3), (5.6)
    delta = delta / l; per step, dout_i / l_i           eq. (5.8): 1/l folded into the small operands
    for each key tile j, for each query tile i that can see it:
        p    = exp(scores(q_i, k_j) - m_i)                eq. (5.4) times l_i (= l_i exp(s - lse_i), without lse's rounding)
        dv_j += p^T dout_i                                eqs. (5.5), (5.8)
        dp   = dout_i v_j^T                               eq. (5.5)
        ds   = p * (dp - delta_i)                         eqs. (5.6), (5.8)
        dmask_ij += ds (summed to the mask's block),  ds *= 1 - tanh^2 (softcap)   eqs. (13.5)-(13.6)
        dq_i += scale * ds k_j,  dk_j += scale * ds^T q_i eq. (5.5)
    (the backward scales each query tile exactly as the forward did, so the recomputed scores are
    bitwise the forward's and p <= 1; dq gets its scale once at the end. When one thread owns every
    tile, the same sums run with the query tiles outside, in the same order: bitwise the same, with
    q_i and dout_i / l scaled once per query tile)
Sinks (derivations/15-sinks-varlen.md): the loop starts from the sink instead of from nothing,
m_i = sink, l_i = 1, acc = 0 (eq. (15.2)); the backward's tile loop is unchanged and dsinks comes from
O(N) row statistics, -sum over rows of p_sink * delta (eqs. (15.3)-(15.4)). Packed sequences run the
loop once per sequence, so only tiles inside some sequence's block are visited (eq. (15.6)).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

from ..backend import (
    check_block,
    check_cache,
    check_dout,
    check_workers,
    compute_dtype,
    default_workers,
    device,
    exp_,
    namespace,
    run_grid,
    to_compute,
)
from .attention import _check_mask_grad, _concat_rows, _join_packed, _split, check_qkv
from .scores import Scores, make_scores, mask_grad_block, packed_sequences, sink_grad, sink_rows, softcap_backward

__all__ = ["flash_attention_forward", "flash_attention_backward", "FlashCache", "FlashTile"]


class FlashCache(NamedTuple):
    """Saved by the forward: the inputs, the output ``o`` and the log-sum-exp ``lse`` per query row.

    No array here has ``N*M`` elements (a mask is the caller's own array, kept by reference):
    O(N (D + Dv)) per head, derivations/05-flash-backward.md, eq. (5.7). The backward recomputes
    every tile of ``p = exp(s - lse) = exp(s - m) / l`` from q, k and the row statistics ``shift``
    (m) and ``inv_l`` (1/l), eq. (5.1).
    """

    q: object  # (..., H, N, D)
    k: object  # (..., G, M, D)
    v: object  # (..., G, M, Dv)
    o: object  # (..., H, N, Dv), the inputs' dtype
    lse: object  # (..., H, N), the compute dtype; -inf for rows that see no key
    mask: object  # the caller's mask (padded to the scores' ndim) or None
    causal: object  # False, True, "bottom-right" or "top-left"
    scale: float
    block_q: int
    block_k: int
    workers: int = 1  # the backward's default: threads over slices of batch or kv groups, or over key tiles
    sc: object = None  # the score pipeline (ops/scores.py): mask, band, ALiBi, softcap
    shift: object = None  # (..., H, N) the row max m the forward subtracted (0 for rows that see no key)
    inv_l: object = None  # (..., H, N) 1 / l (0 for rows that see no key): p = exp(s - shift) * inv_l
    packed: object = None  # packed sequences: [(q rows, key rows, that sequence's FlashCache)], or None


class FlashTile(NamedTuple):
    """The online-softmax state after one (query tile, key tile) step, for watching the loop.

    ``m_i, l_i, alpha`` are ``(..., H, bq)`` views of the running max, running sum and the factor
    that rescaled the old state in this step (derivations/04-online-softmax.md, eqs. (4.6)-(4.8)).
    """

    i: int  # query tile index; rows i*block_q : i*block_q + bq
    j: int  # key tile index; keys j*block_k : j*block_k + bk
    m_i: object
    l_i: object
    alpha: object


def _shares(n_tiles: int, workers: int) -> list:
    """Split the outer loop's tiles ``0..n_tiles-1`` among workers in a snake: round ``r`` hands the
    tiles ``rW .. rW + W - 1`` to workers ``0 .. W-1``, forward in even rounds and backward in odd
    ones, so share 0 of 2 gets ``0, 3, 4, 7, 8, ...``. Causal's tiles grow (or shrink) by one key tile
    per query tile, and the snake gives every share the same total where plain round robin gave
    share 1 of 2 one tile more per round (72 against 64 of 136 tiles at N=4096, tiles of 256). Fixed,
    not first-come: which thread adds which dq term, and so every rounding, does not depend on timing."""
    workers = max(1, min(workers, n_tiles))
    shares = [[] for _ in range(workers)]
    for r, start in enumerate(range(0, n_tiles, workers)):
        tiles = list(range(start, min(start + workers, n_tiles)))
        for w, i in enumerate(tiles if r % 2 == 0 else tiles[::-1]):
            shares[w].append(i)
    return shares


class _Tiles:
    """Tile bookkeeping shared by forward and backward: index ranges, which tiles the band lets
    through, the score pipeline on one tile, and slicing q-side arrays into the grouped
    ``(..., G, R*bq, C)`` layout and back."""

    def __init__(self, xp, q, k, sc: Scores, block_q, block_k):
        self.xp, self.sc = xp, sc
        self.N, self.M = q.shape[-2], k.shape[-2]
        self.lead, self.G, self.R = sc.lead, sc.G, sc.R
        self.rows = [(i0, min(i0 + block_q, self.N)) for i0 in range(0, self.N, block_q)]
        self.cols = [(j0, min(j0 + block_k, self.M)) for j0 in range(0, self.M, block_k)]
        self.neg_inf = xp.asarray(-xp.inf, dtype=compute_dtype(xp, q.dtype), device=device(q))
        self.like = q
        self.ones = xp.ones((block_k, 1), dtype=self.neg_inf.dtype, device=device(q))   # rowsum's 1

    def rowsum(self, p):
        """``rowsum(p)`` of a tile ``(..., R*bq, bk)`` as ``(..., R*bq, 1)``: the product ``p 1``, one
        BLAS matrix-vector call, 3x faster than a reduction along the rows' short last axis
        (benchmarks/RESULTS.md, "Close to the machine")."""
        return p @ self.ones[:p.shape[-1], :]

    def key_tiles(self, rows) -> list:
        """The key tiles query tile ``rows`` may see: causal and the window hide the others
        entirely, and they are skipped, not computed and masked (eq. (13.4)). O(w / bk) of them
        for a window of width w."""
        return [j for j, cols in enumerate(self.cols) if self.sc.visible(rows, cols)]

    def query_tiles(self, cols) -> list:
        """The query tiles that may see key tile ``cols`` (the backward's inner loop)."""
        return [i for i, rows in enumerate(self.rows) if self.sc.visible(rows, cols)]

    def scores(self, s, rows, cols):
        """The score pipeline on one tile of scaled scores ``(..., G, R*bq, bk)``: softcap, float
        mask, ALiBi, then -inf where a bool mask or the band forbids. Returns ``(s, t)`` with ``t``
        the softcap's tanh (None without softcap). Derivation: derivations/13-variants.md, eqs. (13.1)-(13.3)."""
        if not self.sc.has_bias() and self.sc.covered(rows, cols):
            return s, None                                              # nothing to add or mask
        xp, (i0, i1), (j0, j1) = self.xp, rows, cols
        s5 = xp.reshape(s, self.lead + (self.G, self.R, i1 - i0, j1 - j0))   # (..., G, R, bq, bk)
        s5, t = self.sc.apply(xp, s5, rows, cols)
        shape = tuple(s.shape)
        return xp.reshape(s5, shape), None if t is None else xp.reshape(t, shape)

    def grouped(self, a):
        """q-side ``(..., H, N, C)`` -> ``(..., G, R, N, C)``, once per array: free for a contiguous
        array, one copy for a strided view (e.g. heads split from ``(B, N, H, D)``), instead of a
        copy of the whole array per tile."""
        return self.xp.reshape(a, self.lead + (self.G, self.R, self.N, a.shape[-1]))

    def split(self, a5, rows):
        """Grouped ``(..., G, R, N, C)`` -> tile ``(..., G, R*bq, C)`` (a view when R == 1)."""
        (i0, i1), c = rows, a5.shape[-1]
        return self.xp.reshape(a5[..., i0:i1, :], self.lead + (self.G, self.R * (i1 - i0), c))

    def unsplit(self, tile, rows):
        """The inverse of ``split`` for one tile: ``(..., G, R*bq, C)`` -> ``(..., G, R, bq, C)``,
        ready to be written into rows ``i0:i1`` of a ``(..., G, R, N, C)`` array."""
        return self.xp.reshape(tile, self.lead + (self.G, self.R, rows[1] - rows[0], tile.shape[-1]))

    def zeros5(self, c, dtype):
        """A q-side ``(..., G, R, N, C)`` output, filled tile by tile (its reshape to ``(..., H, N, C)`` is free)."""
        return self.xp.zeros(self.lead + (self.G, self.R, self.N, c), dtype=dtype, device=device(self.like))

    def heads(self, x, rows):
        """A row statistic ``(..., G, R*bq, 1)`` as ``(..., H, bq)`` (a view), for ``FlashTile``."""
        return self.xp.reshape(x, self.lead + (self.G * self.R, rows[1] - rows[0]))

    def mask_index(self, rows, cols) -> tuple:
        """Where a tile's ``dmask`` block lands in the (padded) mask: its rows and columns, or
        ``0:1`` along an axis the mask is broadcast on."""
        mask = self.sc.mask
        r = slice(rows[0], rows[1]) if mask.shape[-2] != 1 else slice(0, 1)
        c = slice(cols[0], cols[1]) if mask.shape[-1] != 1 else slice(0, 1)
        return (Ellipsis, r, c)


# Defaults chosen by measurement (benchmarks/RESULTS.md, "Defaults"; fwd+bwd, H=8, D=64, 2 cores):
# tiles of 256 were fastest or within 4% at N = 1024-4096 in float32 and float64 (64: 2.05x slower at
# N=4096), and a second worker paid off only with at least two query tiles for each worker.
DEFAULT_BLOCK = 256
TILES_PER_WORKER = 2
# With batch entries or kv groups to split (eq. (14.3)), every core from this many score entries
# (B*H*N*M) up, whatever the tile count (benchmarks/RESULTS.md, "Close to the machine": 2 workers took
# 0.65-0.74x the time of 1 at B=4, H=8, N=512, 2^23 entries; 0.73-1.36x at 2^19-2^22, this machine's noise).
SLICE_THREADS_MIN_SCORES = 1 << 23


def default_tiling(like, N: int, block_q, block_k, workers, *, slices: int = 1, scores: int = 0):
    """The tiled op's ``None`` arguments resolved for inputs like ``like`` (an array or a namespace):
    ``block_q = block_k = DEFAULT_BLOCK``, and ``workers`` = the usable cores (host NumPy with
    threadpoolctl; see ``backend.default_workers``) when the workers can split ``slices >= 2`` batch
    entries or kv groups (the widest such axis) and there are at least ``SLICE_THREADS_MIN_SCORES``
    ``scores``; otherwise the cores but no more than ``ceil(N / block_q) // TILES_PER_WORKER``, at
    least 1. Explicit values are checked and honored. Depends only on the shapes and the machine, so
    results are reproducible run to run."""
    block_q = DEFAULT_BLOCK if block_q is None else check_block("block_q", block_q)
    block_k = DEFAULT_BLOCK if block_k is None else check_block("block_k", block_k)
    if workers is None and slices >= 2 and scores >= SLICE_THREADS_MIN_SCORES:
        workers = default_workers(like)
    elif workers is None:
        workers = max(1, min(default_workers(like), -(-N // block_q) // TILES_PER_WORKER))
    else:
        workers = check_workers(like, workers)
    return block_q, block_k, workers


def flash_attention_forward(q, k, v, *, mask=None, causal=False, scale=None, softcap=None, alibi_slopes=None,
                            window=None, sinks=None, cu_seqlens_q=None, cu_seqlens_k=None, block_q=None,
                            block_k=None, on_tile: Optional[Callable[[FlashTile], None]] = None, workers=None):
    """Attention computed tile by tile with an online softmax (FlashAttention-2 forward).

    Parameters
    ----------
    q, k, v, mask, causal, scale, softcap, alibi_slopes, window, sinks, cu_seqlens_q, cu_seqlens_k
        As ``attention_forward`` (no dropout). Tiles that causal or the window hide entirely are
        skipped, so a window of width w costs O(N w), not O(N M). Packed sequences are tiled one
        sequence at a time: only tiles inside some sequence's (queries x keys) block are visited,
        O(sum N_b M_b), and ``cache.lse`` is ``(H, total_q)``. Sinks enter ``lse`` too.
    block_q, block_k : int >= 1 or None
        Query and key tile sizes; they need not divide N or M (the last tiles are ragged). None:
        ``DEFAULT_BLOCK`` (256), see ``default_tiling``.
    on_tile : callable, optional
        Called with a ``FlashTile`` after every (query tile, key tile) step, to watch the online
        softmax state; costs nothing when None. With ``workers > 1`` it is called from the worker
        threads, key tiles in order within a query tile, query tiles interleaved. With packed
        sequences the tiles are each sequence's own, so ``i`` and ``j`` restart at 0 per sequence.
    workers : int >= 1 or None
        Threads. With two or more independent slices along some batch axis or the kv groups, each
        thread runs the whole loop on its own slices of the widest such axis (up to one thread per
        slice; derivations/14-parallel-tiles.md, eq. (14.3)); with one (one head), the query tiles are
        shared, as FlashAttention-2 spreads them over thread blocks (eq. (14.1)), and ``on_tile``
        always shares tiles. Either way each query tile
        is computed exactly as with 1 worker, so ``o`` and ``lse`` are bitwise the same. More than 1 needs
        threadpoolctl (BLAS runs single-threaded meanwhile) and host arrays. None: the cores once
        each worker gets two query tiles, or with slices from 2^23 score entries (``default_tiling``).
        Also the backward's default.

    Returns
    -------
    o : array (..., H, N, Dv), the inputs' dtype, equal to ``attention_forward``'s output.
    cache : FlashCache, with ``cache.lse (..., H, N)`` (``-inf`` for rows that see no key).

    NaN is never hidden: a NaN in q, k, v or a float mask reaches every row that may attend it, and
    the other rows of the tiles that hold it (rows whose tiles are all skipped stay clean).

    Derivation: derivations/04-online-softmax.md, eqs. (4.1)-(4.4) (why it is exact) and
    (4.5)-(4.10) (the loop).
    """
    xp = namespace(q=q, k=k, v=v, mask=mask, sinks=sinks)
    G, R = check_qkv(xp, q, k, v)
    if on_tile is not None and not callable(on_tile):
        raise TypeError(f"on_tile must be callable or None, got {on_tile!r}")
    variants = dict(causal=causal, scale=scale, softcap=softcap, alibi_slopes=alibi_slopes, window=window, sinks=sinks)
    if cu_seqlens_q is not None or cu_seqlens_k is not None:             # one tile loop per sequence: eq. (15.6)
        seqs = packed_sequences(q, k, v, cu_seqlens_q, cu_seqlens_k, mask)
        sc = make_scores(xp, q, k, mask=mask, G=G, R=R, **variants)
        block_q, block_k, workers = default_tiling(q, max([r.stop - r.start for r, _ in seqs], default=0),
                                                   block_q, block_k, workers)
        parts = [(rows, keys) + flash_attention_forward(q[:, rows, :], k[:, keys, :], v[:, keys, :], block_q=block_q,
                                                        block_k=block_k, on_tile=on_tile, workers=workers, **variants)
                 for rows, keys in seqs]
        total = tuple(q.shape[:-1])
        o = _concat_rows(xp, [o_b for _, _, o_b, _ in parts], total + (v.shape[-1],), q.dtype, q)   # (H, total_q, Dv)
        lse, shift, inv_l = (_concat_rows(xp, [getattr(c, name) for *_, c in parts], total,
                                          compute_dtype(xp, q.dtype), q)
                             for name in ("lse", "shift", "inv_l"))      # (H, total_q)
        return o, FlashCache(q=q, k=k, v=v, o=o, lse=lse, mask=None, causal=causal, scale=sc.scale,
                             block_q=block_q, block_k=block_k, workers=workers, sc=sc, shift=shift, inv_l=inv_l,
                             packed=[(rows, keys, c) for rows, keys, _, c in parts])
    block_q, block_k, workers = default_tiling(q, q.shape[-2], block_q, block_k, workers,
                                               slices=max(tuple(q.shape[:-3]) + (G,), default=1),
                                               scores=math.prod(q.shape[:-1]) * k.shape[-2])
    if q.ndim == 2:                                   # one head: run as (1, N, D) and drop the axis
        make_scores(xp, q, k, mask=mask, G=1, R=1, **variants)              # errors name the caller's 2-D shapes
        o, cache = flash_attention_forward(q[None, ...], k[None, ...], v[None, ...], mask=mask, block_q=block_q,
                                           block_k=block_k, on_tile=on_tile, workers=workers, **variants)
        return o[0, ...], cache._replace(q=q, k=k, v=v, o=o[0, ...], lse=cache.lse[0, ...],
                                         shift=cache.shift[0, ...], inv_l=cache.inv_l[0, ...])
    sc = make_scores(xp, q, k, mask=mask, G=G, R=R, **variants)
    ct, Dv = compute_dtype(xp, q.dtype), v.shape[-1]
    # the outputs in the grouped layout (..., G, R, N, C), written tile by tile; rows that see no key keep o = 0
    out5 = tuple(xp.zeros(sc.lead + (G, R, q.shape[-2], c), dtype=ct, device=device(q)) for c in (Dv, 1, 1, 1))
    split = None if on_tile is not None else _split(q, k, workers)
    if split is None:                                 # the tile loop, its query tiles shared by the workers
        _forward_loop(xp, q, k, v, sc, block_q, block_k, on_tile, workers, out5, (Ellipsis,))
    else:                                             # each worker one slice of batch or kv groups: eq. (14.3)
        run_grid(lambda w, _: _forward_loop(xp, split.q_side(q, w), split.kv_side(k, w), split.kv_side(v, w),
                                            split.scores(sc, w), block_q, block_k, None, 1, out5,
                                            split.index(w, 1)), split.ranges)
    o = xp.astype(xp.reshape(out5[0], tuple(q.shape[:-1]) + (Dv,)), q.dtype, copy=False)   # (..., H, N, Dv)
    lse, shift, inv_l = (xp.reshape(a, tuple(q.shape[:-1])) for a in out5[1:])             # (..., H, N)
    return o, FlashCache(q=q, k=k, v=v, o=o, lse=lse, mask=sc.mask, causal=causal, scale=sc.scale,
                         block_q=block_q, block_k=block_k, workers=workers, sc=sc, shift=shift, inv_l=inv_l)


def _forward_loop(xp, q, k, v, sc: Scores, block_q, block_k, on_tile, workers, out5, at) -> None:
    """The forward's tile loop over ``q (..., H, N, D)`` and its keys, its query tiles shared by
    ``workers`` threads (eq. (14.1)). Writes ``o``, ``lse``, ``shift`` (m) and ``inv_l`` (1/l) into
    ``out5``, the full outputs in the grouped layout ``(..., G, R, N, Dv|1)``, at ``at``: the index
    of this slice of batch or kv groups (eq. (14.3)), or ``(...,)`` for all of them."""
    scale, Dv = sc.scale, v.shape[-1]
    t = _Tiles(xp, q, k, sc, block_q, block_k)
    qc = to_compute(xp, q)
    kc, vc = to_compute(xp, k), to_compute(xp, v)
    zero = xp.zeros_like(t.neg_inf)
    q5 = t.grouped(qc)                                                      # (..., G, R, N, D)
    o5, lse5, shift5, inv_l5 = out5                                         # (..., G, R, N, Dv|1)

    def rows_of(rows):                                # this slice's rows i0:i1 of an output
        return at + (slice(rows[0], rows[1]), slice(None))

    def query_tiles(w, share):                        # query tiles are independent: eq. (14.1)
        for i in share:
            rows = t.rows[i]
            q_i = t.split(q5, rows) * scale                                 # (..., G, R*bq, D), scaled once per tile
            m_i = l_i = acc = None                                          # -inf, 0, 0 before the first key tile
            if sc.sinks is not None:                                        # or the sink, eq. (15.2)
                m_i = sink_rows(xp, sc, rows[1] - rows[0])                  # (..., G, R*bq, 1)
                l_i = xp.exp(m_i - xp.where(m_i == -xp.inf, zero, m_i))     # 1 (0 for a sink of -inf)
                acc = xp.zeros(tuple(m_i.shape[:-1]) + (Dv,), dtype=zero.dtype, device=device(q))
            for j in t.key_tiles(rows):                                     # the band's tiles only: eq. (13.4)
                cols = sc.band_cols(rows, t.cols[j])                        # and only the columns it lets through
                k_j, v_j = kc[..., cols[0]:cols[1], :], vc[..., cols[0]:cols[1], :]   # (..., G, bk, D|Dv)
                s, _ = t.scores(q_i @ k_j.mT, rows, cols)                   # (..., G, R*bq, bk)   eq. (4.5)
                m_tile = xp.max(s, axis=-1, keepdims=True)                  # (..., G, R*bq, 1)
                m_new = m_tile if m_i is None else xp.maximum(m_i, m_tile)  # eq. (4.6)
                m_safe = xp.where(m_new == -xp.inf, zero, m_new)            # all -inf so far: shift by 0
                s -= m_safe                                                 # in place: s is this step's own array
                p = exp_(xp, s)                                             # (..., G, R*bq, bk)   eq. (4.7), over s
                if l_i is None:
                    alpha = xp.zeros_like(m_safe)
                    l_i, acc = t.rowsum(p), p @ v_j                         # eqs. (4.8)-(4.9)
                else:
                    alpha = xp.exp(m_i - m_safe)                            # (..., G, R*bq, 1)    eq. (4.7)
                    l_i = alpha * l_i + t.rowsum(p)                         # eq. (4.8)
                    acc *= alpha                                            # eq. (4.9), in place: our own array
                    acc += p @ v_j                                          # (..., G, R*bq, Dv)
                m_i = m_new
                if on_tile is not None:
                    on_tile(FlashTile(i, j, *(xp.asarray(t.heads(x, rows), copy=True)   # copies: the
                                              for x in (m_i, l_i, alpha))))                # loop's state is not the callback's
            if m_i is None:                                                 # the band hid every key tile:
                lse5[rows_of(rows)] = t.neg_inf                             # o stays 0, lse = -inf
                continue
            # eq. (4.10); l_i == 0 exactly when the row saw no key: o = 0, lse = -inf
            empty = l_i == 0
            safe_l = xp.where(empty, xp.ones_like(l_i), l_i)
            inv_l = xp.where(empty, zero, 1.0 / safe_l)
            acc *= inv_l                                                    # in place: our own array
            o5[rows_of(rows)] = t.unsplit(acc, rows)
            lse5[rows_of(rows)] = t.unsplit(xp.where(empty, t.neg_inf, m_i + xp.log(safe_l)), rows)
            shift5[rows_of(rows)] = t.unsplit(xp.where(m_i == -xp.inf, zero, m_i), rows)
            inv_l5[rows_of(rows)] = t.unsplit(inv_l, rows)

    run_grid(query_tiles, _shares(len(t.rows), workers))


def flash_attention_backward(dout, cache: FlashCache, *, dlse=None, mask_grad: bool = False,
                             workers: Optional[int] = None):
    """Gradients of ``flash_attention_forward``: ``(dq, dk, dv)``, recomputing ``p`` tile by tile;
    with ``mask_grad=True`` also ``dmask`` in the float mask's own shape, accumulated tile by tile
    (no ``N x M`` array beyond the mask itself); with sinks ``dsinks`` last, in the sinks' shape,
    from O(N) row statistics (eq. (15.4)).

    Parameters
    ----------
    dout : array (..., H, N, Dv)
    cache : FlashCache
    dlse : array (..., H, N) or None
        Gradient flowing into ``cache.lse`` (e.g. from a loss that uses the log-partition);
        handled exactly: it shifts ``delta`` by ``-dlse`` (derivations/05-flash-backward.md, eq. (5.6)).
    workers : int >= 1, optional
        Threads. With two or more independent slices (batch entries, kv groups), each thread runs
        the whole loop on its own slices (derivations/14-parallel-tiles.md, eq. (14.3)): dq, dk, dv
        are bitwise the one-worker result (a float mask broadcast across the split axis gets its
        dmask summed per thread, so that one differs by rounding). With one slice, the outer (key tile) loop is
        shared, as FlashAttention-2 spreads key tiles over thread blocks; each share of key tiles
        adds into its own dq, and the shares are summed in a fixed order (eq. (14.2)), so results do
        not depend on timing. Defaults to the forward's ``workers``.

    Derivation: derivations/05-flash-backward.md, eq. (5.1) (p from the forward's statistics),
    eqs. (5.2)-(5.3) (chapter 3's backward, and delta = rowsum(dout * o)), eqs. (5.4)-(5.6) (the
    tile loop, and dlse).
    """
    check_cache(cache, FlashCache, "flash_attention_forward")
    q, k, v, o, lse, sc = cache.q, cache.k, cache.v, cache.o, cache.lse, cache.sc
    block_q, block_k = cache.block_q, cache.block_k
    xp = namespace(dout=dout, q=q, dlse=dlse)
    workers = check_workers(q, cache.workers if workers is None else workers)
    check_dout(xp, dout, o.shape, o.dtype)
    want_dmask = _check_mask_grad(xp, mask_grad, sc)
    if dlse is not None:
        check_dout(xp, dlse, lse.shape, lse.dtype, name="dlse", output="lse")
    if cache.packed is not None:                      # each sequence's backward: eq. (15.6)
        grads = [flash_attention_backward(dout[:, rows, :], c, dlse=None if dlse is None else dlse[:, rows],
                                          workers=workers) for rows, _, c in cache.packed]
        return _join_packed(xp, grads, q, k, v, sc)
    if q.ndim == 2:                                   # one head: run as (1, N, D) and drop the axis
        inner = cache._replace(q=q[None, ...], k=k[None, ...], v=v[None, ...], o=o[None, ...], lse=lse[None, ...],
                               shift=cache.shift[None, ...], inv_l=cache.inv_l[None, ...])
        grads = flash_attention_backward(dout[None, ...], inner, dlse=None if dlse is None else dlse[None, ...],
                                         mask_grad=mask_grad, workers=workers)
        return tuple(a[0, ...] for a in grads[:3]) + tuple(grads[3:])       # dmask, dsinks: in their own shapes
    ct = compute_dtype(xp, q.dtype)
    dout_c = to_compute(xp, dout)
    # eq. (5.3): delta = rowsum(dout * o) = rowsum(p * dp), O(N Dv) instead of O(N M); eq. (5.6): - dlse
    delta = xp.vecdot(dout_c, to_compute(xp, o))[..., None]                # (..., H, N, 1)
    if dlse is not None:
        delta = delta - xp.astype(dlse, ct)[..., None]
    # outputs written tile by tile; rows and keys no tile reaches keep their gradient 0. dq in the
    # grouped layout (..., G, R, N, D) (its reshape to (..., H, N, D) is free)
    dq5 = xp.zeros(sc.lead + (sc.G, sc.R, q.shape[-2], q.shape[-1]), dtype=ct, device=device(q))
    dk, dv = (xp.zeros(tuple(a.shape), dtype=ct, device=device(q)) for a in (k, v))   # (..., G, M, D|Dv)
    split = _split(q, k, workers)
    if split is None:                                 # the tile loop, its key tiles shared by the workers
        dmask = _backward_loop(xp, q, k, v, dout_c, delta, cache.shift, cache.inv_l, sc, block_q, block_k,
                               workers, want_dmask, (dq5, dk, dv), (Ellipsis,))
    else:                                             # each worker one slice of batch or kv groups: eq. (14.3)
        dmask_parts = [None] * len(split.ranges)

        def share(w, _):
            dmask_parts[w] = _backward_loop(
                xp, split.q_side(q, w), split.kv_side(k, w), split.kv_side(v, w),
                *(split.q_side(a, w) for a in (dout_c, delta, cache.shift, cache.inv_l)),
                split.scores(sc, w), block_q, block_k, 1, want_dmask, (dq5, dk, dv), split.index(w, 1))

        run_grid(share, split.ranges)
        dmask = split.join_mask(xp, sc.mask, dmask_parts) if want_dmask else None
    dq = xp.reshape(dq5, tuple(q.shape))                                    # (..., H, N, D)
    dt = q.dtype
    grads = tuple(xp.astype(a, dt, copy=False) for a in (dq, dk, dv))
    if want_dmask:
        grads += (xp.astype(xp.reshape(dmask, sc.mask_shape), dt, copy=False),)
    if sc.sinks is not None:
        # eqs. (15.3)-(15.4): the sink has no value, so its logit gets p_sink * (dlse - rowsum(dout * o))
        # = -p_sink * delta, with p_sink = exp(sink - m) / l from the forward's statistics: O(N)
        sink = xp.reshape(xp.broadcast_to(sc.sinks, sc.lead + (sc.G, sc.R, q.shape[-2], 1)),
                          tuple(q.shape[:-1]))                               # (..., H, N)
        p_sink = xp.exp(sink - cache.shift) * cache.inv_l                    # (..., H, N)
        grads += (xp.astype(sink_grad(xp, sc, -p_sink * delta[..., 0]), dt, copy=False),)
    return grads


def _backward_loop(xp, q, k, v, dout_c, delta, shift, inv_l, sc: Scores, block_q, block_k, workers,
                   want_dmask, out, at):
    """The backward's tile loop, its key tiles shared by ``workers`` threads (eq. (14.2)), from
    ``delta (..., H, N, 1)`` and the forward's row statistics ``shift``, ``inv_l (..., H, N)``.
    Writes ``dq`` (grouped, ``(..., G, R, N, D)``), ``dk`` and ``dv`` into ``out``, the full
    gradients, at ``at``: the index of this slice of batch or kv groups (eq. (14.3)), or ``(...,)``.
    Returns ``dmask`` in this slice's padded mask shape (None without ``want_dmask``)."""
    dq_out, dk, dv = out
    scale, D = sc.scale, q.shape[-1]
    t = _Tiles(xp, q, k, sc, block_q, block_k)
    ct = compute_dtype(xp, q.dtype)
    qc, kc, vc = to_compute(xp, q), to_compute(xp, k), to_compute(xp, v)
    # eq. (5.4) as exp(s - m) / l with the forward's own m and 1/l: the same p, without lse = m + log l,
    # which loses |m| eps in float32 at large scores; a row that saw no key has m = 0 and 1/l = 0: p = 0
    # eq. (5.8): 1/l folded into delta here and into each dout tile (bq x Dv) in the loop, so the loop
    # uses p~ = l p = exp(s - m) and never rescales a bq x bk tile
    inv_l = inv_l[..., None]                                                # (..., H, N, 1)
    q5, dout5, delta5, shift5, inv_l5 = (t.grouped(a) for a in (qc, dout_c, delta * inv_l, shift[..., None],
                                                                inv_l))     # (..., G, R, N, C)
    per_row = [tuple(t.split(a, rows) for a in (q5, dout5, shift5, delta5, inv_l5))
               for rows in t.rows]                    # q-side tiles, sliced once (views when R == 1)

    shares = _shares(len(t.cols), workers)
    # dq: the output itself for one share, else one partial per share beyond the first (eq. (14.2))
    dq5s = [None] + [t.zeros5(D, ct) for _ in shares[1:]]                  # (..., G, R, N, D)
    # dmask in the padded mask's shape: one array shared by the workers when the mask has a key axis
    # (each worker owns its key tiles' columns), one per worker when the mask is broadcast along keys
    # (then it is at most (..., N, 1), and the partials are summed in a fixed order like dq's)
    n_dmask = 0 if not want_dmask else (1 if sc.mask.shape[-1] != 1 else len(shares))
    dmasks = [xp.zeros(tuple(sc.mask.shape), dtype=ct, device=device(q)) for _ in range(n_dmask)]

    def step(i, cols, q_s, dout_l, dmask):
        """One tile of eqs. (5.4)-(5.8): query tile ``i`` (scaled, and ``dout_i / l``) against the key
        columns ``cols``; returns ``(dv_step, dk_step, dq_step)``, adds the tile's dmask block."""
        rows, (_, _, m_i, delta_l, _) = t.rows[i], per_row[i]               # delta_l: delta_i / l
        k_j, v_j = kc[..., cols[0]:cols[1], :], vc[..., cols[0]:cols[1], :]  # (..., G, bk', D|Dv)
        s, tanh_s = t.scores(q_s @ k_j.mT, rows, cols)                      # (..., G, R*bq, bk')
        s -= m_i                                                            # in place: this step's own array
        p = exp_(xp, s)                                                     # eq. (5.8): p~ = exp(s - m) = l p, over s
        dv_step = p.mT @ dout_l                                             # eqs. (5.5), (5.8): p^T dout
        dp = dout_l @ v_j.mT                                                # (..., G, R*bq, bk'): dp / l
        dp -= delta_l
        dp *= p                                                             # in place: dp is our own array
        ds = dp                                                             # eqs. (5.6), (5.8): p * (dp - delta_i)
        del s, p                                                            # two tiles alive, not three
        if dmask is not None:                                               # eq. (13.5): ds, summed to the mask
            idx = t.mask_index(rows, cols)
            ds5 = xp.reshape(ds, t.lead + (t.G, t.R, rows[1] - rows[0], cols[1] - cols[0]))
            dmask[idx] = dmask[idx] + mask_grad_block(xp, sc, ds5, rows)
        ds = softcap_backward(ds, tanh_s)                                   # eq. (13.6)
        return dv_step, ds.mT @ q_s, ds @ k_j                               # eq. (5.5); q_s carries the scale

    def scaled(i):                                    # q_i times the scale, bitwise the forward's tile, and
        q_i, dout_i, _, _, inv_l_i = per_row[i]       # dout_i / l (eq. (5.8)): bq x D tiles
        return q_i * scale, dout_i * inv_l_i

    def key_tiles(w, share):                          # key tiles own dk_j, dv_j; dq is shared: eq. (14.2)
        dq5, where = (dq_out, at) if w == 0 else (dq5s[w], (Ellipsis,))   # this share's dq, and its slice
        dmask = dmasks[min(w, len(dmasks) - 1)] if dmasks else None
        for j in share:
            j0, j1 = t.cols[j]
            dk_j = dv_j = None                                              # (..., G, bk, D|Dv) once a tile is seen
            for i in t.query_tiles((j0, j1)):                               # the band's tiles only: eq. (13.4)
                rows = t.rows[i]
                cols = sc.band_cols(rows, (j0, j1))                         # and only the columns it lets through
                dv_step, dk_step, dq_step = step(i, cols, *scaled(i), dmask)
                if dk_j is None:
                    dk_j = xp.zeros(t.lead + (t.G, j1 - j0, D), dtype=ct, device=device(q))
                    dv_j = xp.zeros(t.lead + (t.G, j1 - j0, vc.shape[-1]), dtype=ct, device=device(q))
                part = slice(cols[0] - j0, cols[1] - j0)                    # this step's columns of the key tile
                dv_j[..., part, :] += dv_step                               # (..., G, bk', Dv), summed in place
                dk_j[..., part, :] += dk_step                               # (..., G, bk', D)
                dq5[where + (slice(rows[0], rows[1]), slice(None))] += t.unsplit(dq_step, rows)   # (..., G, R, bq, D)
            if dk_j is not None:
                dk[at + (slice(j0, j1), slice(None))] = dk_j
                dv[at + (slice(j0, j1), slice(None))] = dv_j

    def query_tiles():                                # one thread owns every tile: the same sums, in the same
        dmask = dmasks[0] if dmasks else None         # order, with q_i and dout_i / l scaled once per query tile
        for i, rows in enumerate(t.rows):
            q_s, dout_l = scaled(i)
            dq_i = None
            for j in t.key_tiles(rows):                                     # the band's tiles only: eq. (13.4)
                cols = sc.band_cols(rows, t.cols[j])
                dv_step, dk_step, dq_step = step(i, cols, q_s, dout_l, dmask)
                dv[at + (slice(cols[0], cols[1]), slice(None))] += dv_step  # dk_j, dv_j: summed over i in place
                dk[at + (slice(cols[0], cols[1]), slice(None))] += dk_step
                if dq_i is None:
                    dq_i = dq_step
                else:
                    dq_i += dq_step                                         # dq_i: summed over j, kept here
            if dq_i is not None:
                dq_out[at + (slice(rows[0], rows[1]), slice(None))] = t.unsplit(dq_i, rows)

    if len(shares) == 1:
        query_tiles()
    else:
        run_grid(key_tiles, shares)
    for part in dq5s[1:]:                             # eq. (14.2): the shares' dq, summed in a fixed order
        dq_out[at] += part                            # in place into the output: no N x D temporary
    dq_out[at] *= scale                               # eq. (5.5): dq = scale * sum of ds k_j
    if not want_dmask:
        return None
    total = dmasks[0]
    for part in dmasks[1:]:                           # per-worker partials, in a fixed order
        total += part
    return total
