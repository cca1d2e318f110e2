"""The split-KV combine behind flash-decoding and ring attention: forward and backward.

Attention over a set of keys split into ``S`` disjoint chunks can be computed chunk by chunk, on
``S`` devices or ``S`` thread blocks, each giving its own output ``o_s`` and log-sum-exp ``lse_s``
(``flash_attention_forward`` returns them as ``o`` and ``cache.lse``). The combine merges the parts
into attention over all keys, exactly: it is chapter 4's online softmax applied once to ``S`` parts.

Shape legend: ``o_parts (S, ..., N, Dv)``, ``lse_parts (S, ..., N)``, ``w (S, ..., N)`` (the parts'
weights), ``o (..., N, Dv)``, ``lse (..., N)``. ``...`` is whatever the parts share, e.g. ``(B, H)``.

Forward, per query row (derivations/17-split-kv-combine.md):
    1. m   = max_s lse_s  (0 when every part is empty)                  eq. (17.2)
    2. lse = m + log sum_s exp(lse_s - m)                               eq. (17.2)
    3. w_s = exp(lse_s - lse)  (0 for a part with lse_s = -inf)         eqs. (17.3)-(17.4)
    4. o   = sum_s w_s o_s                                              eq. (17.3)
Backward, the same steps in reverse (the combine's Jacobian, eq. (17.5)):
    4. do_s   = w_s dout                                                eq. (17.6)
    3-1. dlse_s = w_s (dlse + rowsum(dout * (o_s - o)))                 eq. (17.6)
    (the dlse_s of a row sum to its dlse: shifting every lse_s moves lse and leaves o, eq. (17.7))

Ring attention (``ring_attention_forward``/``ring_attention_backward`` below, and
examples/ring_attention.py): each chunk's ``flash_attention_backward(do_s, cache_s, dlse=dlse_s)``
then gives exactly that chunk's share of the gradients of attention over all keys, because dlse_s
shifts each chunk's delta to the global one (eqs. (17.8), (5.6)). Causal attention seen from key
chunk ``[j0, j1)`` of ``M`` keys is the chunk's own ``window=(None, M - j1)`` (eq. (17.9)).
"""

from __future__ import annotations

from typing import NamedTuple

from ..backend import (
    check_cache,
    check_dout,
    check_float,
    check_same_dtype,
    compute_dtype,
    device,
    host_index,
    namespace,
    to_compute,
)
from .flash import flash_attention_backward, flash_attention_forward

__all__ = ["combine_attention", "combine_attention_backward", "CombineCache",
           "ring_attention_forward", "ring_attention_backward", "RingCache"]


class CombineCache(NamedTuple):
    """Saved by ``combine_attention``: the parts' outputs (stacked, as given), their weights ``w``
    and the combined ``o`` (both in the compute dtype), and the two output dtypes. Nothing is
    recomputed: the backward needs only ``w``, ``o_s - o`` and ``dout`` (eq. (17.6))."""

    o_parts: object  # (S, ..., N, Dv), o_parts' dtype
    w: object  # (S, ..., N) the weights exp(lse_s - lse), compute dtype; 0 for empty parts
    o: object  # (..., N, Dv) the combined output, compute dtype
    o_dtype: object  # the dtype of o_parts (and of o, dout, do_parts)
    lse_dtype: object  # the dtype of lse_parts (and of lse, dlse, dlse_parts)


def _named(name: str, parts) -> dict:
    """The arrays of ``parts`` by name: ``{name: parts}`` for one stacked array, ``{name[s]: part}``
    for a list or tuple of per-part arrays (as S devices hand them over)."""
    if isinstance(parts, (list, tuple)):
        if len(parts) == 0:
            raise ValueError(f"{name} must hold at least one part (S >= 1), got an empty {type(parts).__name__}")
        return {f"{name}[{s}]": a for s, a in enumerate(parts)}
    return {name: parts}


def _stacked(xp, name: str, parts):
    """One ``(S, ...)`` array from ``parts``: the array itself, or the list's parts stacked (they
    must share one shape and one dtype; npattn never casts silently)."""
    named = _named(name, parts)
    for part_name, a in named.items():
        check_float(xp, part_name, a)
    if not isinstance(parts, (list, tuple)):
        return parts
    shapes = [tuple(a.shape) for a in parts]
    if len(set(shapes)) > 1:
        raise ValueError(f"the parts of {name} must share one shape, got {shapes}")
    check_same_dtype(**named)
    return xp.stack(list(parts), axis=0)                                    # (S, ...)


def combine_attention(o_parts, lse_parts):
    """Merge attention computed over ``S`` disjoint key chunks into attention over all the keys.

    Parameters
    ----------
    o_parts : array (S, ..., N, Dv), or a list/tuple of S arrays (..., N, Dv)
        Each chunk's attention output (``flash_attention_forward``'s ``o``), real floating.
    lse_parts : array (S, ..., N), or a list/tuple of S arrays (..., N)
        Each chunk's log-sum-exp (``cache.lse``), in o_parts' dtype or its compute dtype (float32
        for float16, as the attention ops return it); ``-inf`` for a row that saw no key of its
        chunk (such a part weighs 0).

    Returns
    -------
    (o, lse) : o (..., N, Dv) in o_parts' dtype, lse (..., N) in lse_parts' dtype
        ``lse = log sum_s exp(lse_s)``, ``o = sum_s exp(lse_s - lse) o_s``; a row whose parts are
        all ``-inf`` gives ``o = 0``, ``lse = -inf``, never NaN. NaN in a part propagates.
    cache : CombineCache

    Computed in the compute dtype (float16 in float32). Derivation:
    derivations/17-split-kv-combine.md, eqs. (17.1)-(17.4).
    """
    xp = namespace(**_named("o_parts", o_parts), **_named("lse_parts", lse_parts))
    o_parts, lse_parts = _stacked(xp, "o_parts", o_parts), _stacked(xp, "lse_parts", lse_parts)
    shapes = f"o_parts {tuple(o_parts.shape)}, lse_parts {tuple(lse_parts.shape)}"
    if o_parts.ndim < 3:
        raise ValueError(f"o_parts must be (S, ..., N, Dv) with at least 3 axes, got {shapes}")
    if o_parts.shape[0] == 0:
        raise ValueError(f"o_parts must hold at least one part (S >= 1), got {shapes}")
    if tuple(lse_parts.shape) != tuple(o_parts.shape[:-1]):
        raise ValueError(f"lse_parts must have o_parts' shape without its last axis (S, ..., N), got {shapes}")
    ct = compute_dtype(xp, o_parts.dtype)
    if lse_parts.dtype not in (o_parts.dtype, ct):
        raise TypeError(f"lse_parts must have o_parts' dtype {o_parts.dtype} or its compute dtype {ct}, "
                        f"got {lse_parts.dtype} (npattn never casts silently)")
    dev = device(o_parts)
    zero, one = xp.asarray(0.0, dtype=ct, device=dev), xp.asarray(1.0, dtype=ct, device=dev)
    neg_inf = xp.asarray(-xp.inf, dtype=ct, device=dev)
    oc = to_compute(xp, o_parts)                                            # (S, ..., N, Dv)
    lse_c = xp.astype(lse_parts, ct, copy=False)                            # (S, ..., N)

    # 1. the largest part's lse; 0 in a row where every part is empty (-inf - (-inf) would be NaN)
    m = xp.max(lse_c, axis=0)                                               # (..., N)    eq. (17.2)
    m = xp.where(m == -xp.inf, zero, m)
    # 2. lse = m + log sum_s exp(lse_s - m): each exp <= 1, the largest is 1
    e = xp.exp(lse_c - m)                                                   # (S, ..., N)
    l = xp.sum(e, axis=0)                                                   # (..., N)
    empty = l == 0                                                          # every part -inf: eq. (17.4)
    safe_l = xp.where(empty, one, l)
    lse = xp.where(empty, neg_inf, m + xp.log(safe_l))                      # (..., N)    eq. (17.2)
    # 3. w_s = exp(lse_s - lse) = e_s / l; 0 for empty parts, and for every part of an empty row
    w = e / safe_l                                                          # (S, ..., N) eq. (17.3)
    # 4. o = sum_s w_s o_s
    o = xp.sum(w[..., None] * oc, axis=0)                                   # (..., N, Dv) eq. (17.3)

    out = (xp.astype(o, o_parts.dtype, copy=False), xp.astype(lse, lse_parts.dtype, copy=False))
    return out, CombineCache(o_parts=o_parts, w=w, o=o, o_dtype=o_parts.dtype, lse_dtype=lse_parts.dtype)


def combine_attention_backward(douts, cache: CombineCache):
    """Gradients of ``combine_attention``: ``(do_parts, dlse_parts)``.

    Parameters
    ----------
    douts : the pair (dout, dlse)
        ``dout (..., N, Dv)`` in o's dtype, the gradient flowing into ``o``; ``dlse (..., N)`` in
        lse's dtype, the gradient flowing into ``lse``, or None (no loss uses ``lse``).
    cache : CombineCache

    Returns
    -------
    do_parts : array (S, ..., N, Dv), o_parts' dtype: ``do_s = w_s dout``.
    dlse_parts : array (S, ..., N), lse_parts' dtype: ``dlse_s = w_s (dlse + rowsum(dout * (o_s - o)))``.
        Each row's ``dlse_s`` sum to its ``dlse`` (eq. (17.7)). Stacked arrays even when the
        forward got lists: part ``s`` is ``do_parts[s]``, ``dlse_parts[s]``.

    Fed into each chunk's ``flash_attention_backward(do_parts[s], cache_s, dlse=dlse_parts[s])``
    they give that chunk's share of the gradients of attention over all keys (eq. (17.8)).

    Derivation: derivations/17-split-kv-combine.md, eqs. (17.5)-(17.7).
    """
    check_cache(cache, CombineCache, "combine_attention")
    if not (isinstance(douts, (tuple, list)) and len(douts) == 2):
        raise TypeError("douts must be the pair (dout, dlse) of gradients for combine_attention's outputs "
                        f"(o, lse), dlse may be None; got {type(douts).__name__}")
    dout, dlse = douts
    w, o = cache.w, cache.o
    xp = namespace(dout=dout, dlse=dlse, o_parts=cache.o_parts)
    check_dout(xp, dout, o.shape, cache.o_dtype)
    if dlse is not None:
        check_dout(xp, dlse, o.shape[:-1], cache.lse_dtype, name="dlse")
    dout_c = to_compute(xp, dout)                                           # (..., N, Dv)

    # 4. o = sum_s w_s o_s: o_s enters linearly with weight w_s
    do_parts = w[..., None] * dout_c                                        # (S, ..., N, Dv) eq. (17.6)
    # 3-1. lse_s moves o through every weight (dw_t/dlse_s = w_t (1[t=s] - w_s)) and lse with
    # weight w_s: dlse_s = w_s (rowsum(dout * (o_s - o)) + dlse)
    g = xp.sum(dout_c * (to_compute(xp, cache.o_parts) - o), axis=-1)      # (S, ..., N)    eq. (17.5)
    if dlse is not None:
        g = g + xp.astype(dlse, w.dtype, copy=False)
    dlse_parts = w * g                                                      # (S, ..., N)    eq. (17.6)
    return (xp.astype(do_parts, cache.o_dtype, copy=False),
            xp.astype(dlse_parts, cache.lse_dtype, copy=False))


# --- ring attention on one machine: the combine's reason to exist -----------------------------------

class RingCache(NamedTuple):
    """Saved by ``ring_attention_forward``: each chunk's ``FlashCache`` (what its device keeps),
    the combine's cache, the chunk bounds, and ``lse`` over all keys. No N*M array."""

    parts: tuple  # S FlashCaches, chunk s over keys bounds[s]:bounds[s+1]
    combine: CombineCache
    bounds: tuple  # (S + 1,) ints: 0 = j_0 <= j_1 <= ... <= j_S = M
    lse: object  # (..., H, N) log-sum-exp over all keys, the compute dtype


def _check_bounds(bounds, M: int) -> tuple:
    """Chunk bounds ``(0, j_1, ..., M)``, non-decreasing, as Python ints (one host copy)."""
    b = host_index("bounds", bounds, 1)
    if b.shape[0] < 2 or b[0] != 0 or b[-1] != M or (b[1:] < b[:-1]).any():
        raise ValueError(f"bounds must be non-decreasing ints from 0 to the key length M={M}, at least two of "
                         f"them, got {b.tolist()}")
    return tuple(int(j) for j in b)


def ring_attention_forward(q, k, v, *, bounds, causal=False, scale=None, block_q=None, block_k=None):
    """Attention over all keys computed as ring attention does: one ``flash_attention_forward`` per
    key chunk (one device each), then ``combine_attention``.

    Parameters
    ----------
    q, k, v : as ``flash_attention_forward`` (grouped-query heads included).
    bounds : ints (S + 1,), ``0 = j_0 <= j_1 <= ... <= j_S = M``
        Chunk ``s`` holds keys ``j_s:j_{s+1}`` (an empty chunk is allowed: it weighs 0).
    causal : bool or "bottom-right"
        Bottom-right causal over all keys: each chunk runs with ``window=(None, M - j_{s+1})``
        (eq. (17.9)), so a chunk entirely in a row's future gives it ``lse_s = -inf``.
    scale, block_q, block_k : as ``flash_attention_forward``.

    Returns
    -------
    o : (..., H, N, Dv), equal to ``attention_forward(q, k, v, causal=causal)`` to rounding.
    cache : RingCache, with ``cache.lse (..., H, N)``.

    Derivation: derivations/17-split-kv-combine.md, eqs. (17.1)-(17.3), (17.9).
    """
    xp = namespace(q=q, k=k, v=v)
    M = k.shape[-2] if k.ndim >= 2 else 0
    bounds = _check_bounds(bounds, M)
    if not (causal is False or causal is True or causal == "bottom-right"):
        raise ValueError(f"ring_attention_forward's causal must be False, True or 'bottom-right', got {causal!r}")
    outs, caches = [], []
    for j0, j1 in zip(bounds[:-1], bounds[1:]):                             # one device per chunk
        window = (None, M - j1) if causal else None                         # eq. (17.9)
        o_s, cache_s = flash_attention_forward(q, k[..., j0:j1, :], v[..., j0:j1, :], scale=scale,
                                               window=window, block_q=block_q, block_k=block_k)   # (..., H, N, Dv)
        outs.append(o_s)
        caches.append(cache_s)
    o_parts = xp.stack(outs, axis=0)                                        # (S, ..., H, N, Dv)
    lse_parts = xp.stack([c.lse for c in caches], axis=0)                   # (S, ..., H, N)
    (o, lse), combine = combine_attention(o_parts, lse_parts)               # (..., H, N, Dv), (..., H, N)
    return o, RingCache(parts=tuple(caches), combine=combine, bounds=bounds, lse=lse)


def ring_attention_backward(dout, cache: RingCache, *, dlse=None):
    """Gradients of ``ring_attention_forward``: ``(dq, dk, dv)``. The combine's backward hands chunk
    ``s`` its ``(do_s, dlse_s)``; the chunk's ``flash_attention_backward(do_s, cache_s, dlse=dlse_s)``
    gives its ``dq_s`` (summed over chunks: every chunk saw every query, an all-reduce on devices)
    and its own keys' ``dk``, ``dv`` (concatenated). ``dlse`` flows into ``cache.lse``.

    Derivation: derivations/17-split-kv-combine.md, eqs. (17.6), (17.8).
    """
    check_cache(cache, RingCache, "ring_attention_forward")
    q = cache.parts[0].q
    xp = namespace(dout=dout, q=q, dlse=dlse)
    do_parts, dlse_parts = combine_attention_backward((dout, dlse), cache.combine)   # eq. (17.6)
    dq, dks, dvs = None, [], []
    for s, cache_s in enumerate(cache.parts):                               # each device, its own chunk
        dq_s, dk_s, dv_s = flash_attention_backward(do_parts[s, ...], cache_s, dlse=dlse_parts[s, ...])
        dq = dq_s if dq is None else dq + dq_s                              # (..., H, N, D)   eq. (17.8)
        dks.append(dk_s)
        dvs.append(dv_s)
    return dq, xp.concat(dks, axis=-2), xp.concat(dvs, axis=-2)             # (..., G, M, D|Dv)
