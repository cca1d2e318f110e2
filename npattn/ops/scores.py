"""The score pipeline shared by the naive and the tiled attention ops, for any block of rows and columns.

Order (FlashAttention's reference, docs/conventions.md "Attention semantics"), on a block of query rows
``i0:i1`` and key columns ``j0:j1``, in the grouped layout ``(..., G, R, bq, bk)``:
    1. s = scale * q k^T                                   (the caller's matmul)     eq. (3.1)
    2. s = c * tanh(s / c)                                 softcap                   eq. (13.1)
    3. s = s + mask (float) - slope_h * |i + M - N - j|    additive terms, ALiBi     eqs. (3.2), (13.2)
    4. s = -inf unless every bool constraint allows        mask, causal, window      eqs. (3.3), (13.3)
Causal and the window are both a band: row ``i`` may see columns ``i + lo <= j <= i + hi`` (eq.
(13.3)), so a tile that the band misses entirely is skipped, and one that it covers entirely needs
no masking (eq. (13.4)). Backward (derivations/13-variants.md): masks and ALiBi are constants, so
``ds`` passes through step 3 unchanged (and is ``dmask``, summed over the mask's broadcast axes:
eq. (13.5)); softcap multiplies it by ``1 - tanh^2`` (eq. (13.6)).

Two more things every attention call may carry, validated here so both ops share them
(derivations/15-sinks-varlen.md): a learnable **sink** per query head, an extra logit in every row's
softmax with no value (``Scores.sinks``, eq. (15.1)), and **packed sequences** (``cu_seqlens_q``,
``cu_seqlens_k``; ``packed_sequences``), run as one call per sequence, eq. (15.6).
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional

import numpy as np

from ..backend import check_float, check_mask, check_scale, compute_dtype, device, host_index, is_array_api_obj, where_

__all__ = ["Scores", "make_scores", "causal_offset", "softcap_backward", "mask_grad_block", "sink_rows",
           "sink_grad", "packed_sequences"]


def causal_offset(causal, N: int, M: int) -> Optional[int]:
    """``j <= i + offset`` for causal attention: bottom-right (``True`` or ``"bottom-right"``,
    FlashAttention >= 2.1) is ``M - N``, ``"top-left"`` (torch's ``is_causal``) is 0; None when not
    causal. Anything else is an error. Derivation: derivations/03-attention.md, eq. (3.3)."""
    if isinstance(causal, (bool, np.bool_)):                  # a Python or NumPy bool, never an array
        return M - N if causal else None
    if isinstance(causal, str):
        if causal == "bottom-right":
            return M - N
        if causal == "top-left":
            return 0
        raise ValueError(f"causal must be True, False, 'bottom-right' or 'top-left', got {causal!r}")
    raise TypeError(f"causal must be a bool or 'bottom-right'/'top-left', got {causal!r}")


class Scores(NamedTuple):
    """The validated score pipeline of one attention call (everything but q and k)."""

    N: int
    M: int
    scale: float
    softcap: Optional[float]
    mask: object                     # padded to the scores' ndim (..., H, N, M), or None
    mask_shape: tuple                # the mask's shape as passed (for dmask), or None
    slopes: object                   # ALiBi slopes as (..., G, R, 1, 1) in the compute dtype, or None
    lo: Optional[int]                # row i sees j >= i + lo (window left), None = unbounded
    hi: Optional[int]                # row i sees j <= i + hi (causal, window right), None = unbounded
    lead: tuple
    G: int
    R: int
    like: object                     # q, for namespace, dtype and device
    sinks: object = None             # sink logits as (..., G, R, 1, 1) in the compute dtype, or None
    sinks_shape: tuple = None        # the sinks' shape as passed (for dsinks), or None

    # --- the band of causal and the window: eqs. (13.3)-(13.4)
    def visible(self, rows, cols) -> bool:
        """Some (i, j) of the tile may be inside the band (and inside [0, M)): its columns cut to the
        band (``band_cols``) are not empty. (With ``lo > hi``, causal and a window that exclude
        each other, no row sees a key, and the cut is empty.)"""
        c0, c1 = self.band_cols(rows, cols)
        return c0 < c1

    def band_cols(self, rows, cols) -> tuple:
        """The columns of a tile that some row of it may see: ``cols`` cut to
        ``[i0 + lo, i1 - 1 + hi]``. A causal tile whose query rows end halfway through its keys
        computes only the keys up to the last row's diagonal (eq. (13.4), column by column)."""
        (i0, i1), (j0, j1) = rows, cols
        c0 = j0 if self.lo is None else max(j0, i0 + self.lo)
        c1 = j1 if self.hi is None else min(j1, i1 + self.hi)
        return c0, c1

    def covered(self, rows, cols) -> bool:
        """Every (i, j) of the tile is inside the band: no band mask is needed."""
        (i0, i1), (j0, j1) = rows, cols
        return (self.hi is None or j1 - 1 <= i0 + self.hi) and (self.lo is None or j0 >= i1 - 1 + self.lo)

    def has_bias(self) -> bool:
        return self.softcap is not None or self.slopes is not None or self.mask is not None

    def _mask_block(self, xp, rows, cols):
        """The mask's block for rows/cols as ``(..., G|1, R|1, bq|1, bk|1)`` (broadcast axes kept 1)."""
        (i0, i1), (j0, j1) = rows, cols
        mt = self.mask
        if mt.ndim < 3:                                                    # 2-D inputs: one head
            mt = xp.reshape(mt, (1,) * (3 - mt.ndim) + tuple(mt.shape))
        mt = mt[..., i0:i1, :] if mt.shape[-2] != 1 else mt
        mt = mt[..., j0:j1] if mt.shape[-1] != 1 else mt
        heads = (self.G, self.R) if mt.shape[-3] != 1 else (1, 1)
        return xp.reshape(mt, tuple(mt.shape[:-3]) + heads + tuple(mt.shape[-2:]))

    def apply(self, xp, s5, rows, cols):
        """Steps 2-4 on a block of scaled scores ``s5 (..., G, R, bq, bk)`` (the caller's own array).

        Returns ``(s5, t)``: the final scores with ``-inf`` where not allowed, and ``tanh(s/c)``
        for the softcap backward (None without softcap)."""
        (i0, i1), (j0, j1) = rows, cols
        dev = device(self.like)
        t = None
        if self.softcap is not None:                                       # 2. eq. (13.1)
            t = xp.tanh(s5 / self.softcap)
            s5 = self.softcap * t
        allowed = None
        if self.mask is not None:                                          # 3./4. eqs. (3.2)-(3.3)
            mt = self._mask_block(xp, rows, cols)
            if xp.isdtype(mt.dtype, "bool"):
                allowed = mt
            else:
                s5 = s5 + xp.astype(mt, s5.dtype)
        if self.slopes is not None:                                        # 3. ALiBi, eq. (13.2)
            i = xp.arange(i0, i1, dtype=s5.dtype, device=dev)[:, None]     # (bq, 1)
            j = xp.arange(j0, j1, dtype=s5.dtype, device=dev)[None, :]     # (1, bk)
            dist = xp.abs(i + (self.M - self.N) - j)                       # (bq, bk)
            # no penalty at distance 0 whatever the slope: a slope of +inf keeps the diagonal, not NaN
            near = dist > 0                                                # (bq, bk)
            one, zero = xp.ones_like(dist), xp.zeros_like(dist)
            s5 = s5 - xp.where(near, self.slopes * xp.where(near, dist, one), zero)   # (..., G, R, bq, bk)
        if not self.covered(rows, cols):                                   # 4. the band, eq. (13.3)
            i = xp.arange(i0, i1, device=dev)[:, None]
            j = xp.arange(j0, j1, device=dev)[None, :]
            band = None
            if self.hi is not None:
                band = j <= i + self.hi
            if self.lo is not None:
                low = j >= i + self.lo
                band = low if band is None else xp.logical_and(band, low)
            allowed = band if allowed is None else xp.logical_and(allowed, band)
        if allowed is not None:
            s5 = where_(xp, allowed, s5, xp.asarray(-xp.inf, dtype=s5.dtype, device=dev))   # over s5: ours
        return s5, t


def make_scores(xp, q, k, *, mask, causal, scale, softcap, alibi_slopes, window, G, R, sinks=None) -> Scores:
    """Validate the score pipeline's arguments against ``q (..., H, N, D)``, ``k (..., G, M, D)``."""
    N, M = q.shape[-2], k.shape[-2]
    ct = compute_dtype(xp, q.dtype)
    scores_shape = tuple(q.shape[:-1]) + (M,)
    mask_shape = None if mask is None else tuple(mask.shape)
    mask = check_mask(xp, mask, scores_shape, q.dtype)
    c_off = causal_offset(causal, N, M)
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real) or not math.isfinite(softcap):
            raise TypeError(f"softcap must be a finite real number or None, got {softcap!r}")
        if softcap <= 0:
            raise ValueError(f"softcap must be > 0, got {softcap}")
        softcap = float(softcap)
    lo = hi = None
    if window is not None:
        if not (isinstance(window, (tuple, list)) and len(window) == 2):
            raise TypeError(f"window must be a pair (left, right) of ints >= 0 or None, got {window!r}")
        for side, value in zip(("left", "right"), window):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"window's {side} side must be an int >= 0 or None, got {value!r}")
            if value < 0:
                raise ValueError(f"window's {side} side must be >= 0, got {value}")
        # a side of N + M or more excludes no key: unbounded, so a huge side (2**70) means what it says
        left, right = (None if side is None or side >= N + M else int(side) for side in window)
        lo = None if left is None else (M - N) - left
        hi = None if right is None else (M - N) + right
    if c_off is not None:
        hi = c_off if hi is None else min(hi, c_off)
    lead = tuple(q.shape[:-3])
    slopes = None
    if alibi_slopes is not None:
        slopes = alibi_slopes if is_array_api_obj(alibi_slopes) else xp.asarray(alibi_slopes, device=device(q))
        check_float(xp, "alibi_slopes", slopes)
        heads = tuple(q.shape[:-2]) or (1,)                               # (..., H); 2-D inputs: one head
        shape = tuple(slopes.shape)
        if len(shape) > len(heads) or not all(a in (1, b) for a, b in zip(reversed(shape), reversed(heads))):
            raise ValueError(f"alibi_slopes of shape {shape} does not broadcast to the heads {heads}")
        full = xp.broadcast_to(xp.astype(slopes, ct), heads)
        slopes = xp.reshape(full, lead + (G, R, 1, 1))                    # (..., G, R, 1, 1)
    sinks_shape = None
    if sinks is not None:
        if not is_array_api_obj(sinks):
            raise TypeError(f"sinks must be an array of the inputs' dtype {q.dtype} (one logit per query head), "
                            f"got {type(sinks).__name__}")
        check_float(xp, "sinks", sinks)
        if sinks.dtype != q.dtype:
            raise TypeError(f"sinks must have the inputs' dtype {q.dtype}, got {sinks.dtype} (npattn never casts silently)")
        heads = tuple(q.shape[:-2]) or (1,)                               # (..., H); 2-D inputs: one head
        sinks_shape = tuple(sinks.shape)
        if len(sinks_shape) > len(heads) or not all(a in (1, b) for a, b in zip(reversed(sinks_shape), reversed(heads))):
            raise ValueError(f"sinks of shape {sinks_shape} does not broadcast to the query heads {heads}")
        full = xp.broadcast_to(xp.astype(sinks, ct), heads)
        sinks = xp.reshape(full, lead + (G, R, 1, 1))                     # (..., G, R, 1, 1)
    return Scores(N=N, M=M, scale=check_scale(scale, q.shape[-1]), softcap=softcap, mask=mask,
                  mask_shape=mask_shape, slopes=slopes,
                  lo=lo, hi=hi, lead=lead, G=G, R=R, like=q, sinks=sinks, sinks_shape=sinks_shape)


def softcap_backward(ds5, t):
    """``ds_raw = ds * (1 - tanh^2(s/c))``: the chain rule through ``c tanh(s / c)``, eq. (13.6)."""
    return ds5 if t is None else ds5 * (1.0 - t * t)


def mask_grad_block(xp, sc: Scores, ds5, rows):
    """``ds`` of a block, ``(..., G, R, bq, bk)``, summed to the shape of the mask's block: over the
    axes the mask is broadcast along (eq. (13.5)). Returns an array to add into the mask's rows
    (``rows``, or ``0:1`` if the mask has one row) and columns."""
    mask = sc.mask
    shape5 = tuple(ds5.shape)
    shape = shape5[:-4] + (sc.G * sc.R,) + shape5[-2:]
    ds = xp.reshape(ds5, shape)                                              # (..., H, bq, bk)
    if ds.ndim > mask.ndim:                                                  # 2-D inputs: one head, no head axis
        ds = xp.sum(ds, axis=tuple(range(ds.ndim - mask.ndim)))
    axes = tuple(a for a in range(ds.ndim) if mask.shape[a] == 1 and ds.shape[a] != 1)
    if axes:
        ds = xp.sum(ds, axis=axes, keepdims=True)
    return ds


def sink_rows(xp, sc: Scores, rows: int):
    """The sink logit of every query row, ``(..., G, R*rows, 1)``: the grouped tile layout of the
    tiled op, one logit per head repeated down its rows (eq. (15.1))."""
    sink = xp.broadcast_to(sc.sinks, sc.lead + (sc.G, sc.R, rows, 1))      # (..., G, R, rows, 1)
    return xp.reshape(sink, sc.lead + (sc.G, sc.R * rows, 1))              # (..., G, R*rows, 1)


def sink_grad(xp, sc: Scores, dsink_rows):
    """``dsinks`` in the sinks' own shape from each row's share ``(..., H, N)``: summed over the rows
    of a head (eq. (15.4)), then over the axes the sinks were broadcast along."""
    dsink = xp.sum(dsink_rows, axis=-1)                                    # (..., H)
    if dsink.ndim == 0:                                                    # 2-D inputs: one head
        dsink = xp.reshape(dsink, (1,))
    shape = sc.sinks_shape
    extra = dsink.ndim - len(shape)
    axes = tuple(range(extra)) + tuple(extra + a for a, n in enumerate(shape) if n == 1 and dsink.shape[extra + a] != 1)
    if axes:
        dsink = xp.sum(dsink, axis=axes, keepdims=True)
    return xp.reshape(dsink, shape)


def packed_sequences(q, k, v, cu_seqlens_q, cu_seqlens_k, mask) -> list:
    """Validate packed variable-length inputs and return each sequence's ``(q rows, key rows)`` as
    slices: ``q (H, total_q, D)``, ``k (G, total_k, D)``, ``v (G, total_k, Dv)``, sequence ``b``'s
    queries ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` attend its keys ``cu_seqlens_k[b]:cu_seqlens_k[b+1]``
    only: the block-diagonal mask of eq. (15.5), never built. The boundaries come to the host once
    (``backend.host_index``): the loop over sequences is steered from there."""
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        given = "cu_seqlens_q" if cu_seqlens_k is None else "cu_seqlens_k"
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k come as a pair; got only {given}")
    if mask is not None:
        raise ValueError("mask cannot be combined with cu_seqlens_q/cu_seqlens_k: packing is itself the "
                         "block-diagonal mask (pass per-sequence rules as causal, window, alibi_slopes, sinks)")
    if q.ndim != 3:
        raise ValueError("packed sequences take q (H, total_q, D), k (G, total_k, D), v (G, total_k, Dv); "
                         f"got q of shape {tuple(q.shape)}")
    bounds = {}
    for name, cu, total in (("cu_seqlens_q", cu_seqlens_q, q.shape[-2]), ("cu_seqlens_k", cu_seqlens_k, k.shape[-2])):
        c = host_index(name, cu, 1)
        if c.shape[0] < 1 or c[0] != 0:
            raise ValueError(f"{name} must start at 0, got {c.tolist()}")
        if (c[1:] < c[:-1]).any():
            raise ValueError(f"{name} must be non-decreasing, got {c.tolist()}")
        if c[-1] != total:
            raise ValueError(f"{name} must end at the packed length {total} (axis -2), got {c.tolist()}")
        bounds[name] = c
    cq, ck = bounds["cu_seqlens_q"], bounds["cu_seqlens_k"]
    if cq.shape != ck.shape:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length (S + 1), got {cq.shape[0]} "
                         f"and {ck.shape[0]}")
    return [(slice(int(cq[b]), int(cq[b + 1])), slice(int(ck[b]), int(ck[b + 1]))) for b in range(cq.shape[0] - 1)]
