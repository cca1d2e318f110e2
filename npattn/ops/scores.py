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
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional

from ..backend import check_float, check_mask, check_scale, compute_dtype, device, is_array_api_obj

__all__ = ["Scores", "make_scores", "causal_offset", "softcap_backward", "mask_grad_block"]


def causal_offset(causal, N: int, M: int) -> Optional[int]:
    """``j <= i + offset`` for causal attention: bottom-right (``True`` or ``"bottom-right"``,
    FlashAttention >= 2.1) is ``M - N``, ``"top-left"`` (torch's ``is_causal``) is 0; None when not
    causal. Anything else is an error. Derivation: derivations/03-attention.md, eq. (3.3)."""
    if causal is False:
        return None
    if causal is True or causal == "bottom-right":
        return M - N
    if causal == "top-left":
        return 0
    if isinstance(causal, str):
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

    # --- the band of causal and the window: eqs. (13.3)-(13.4)
    def visible(self, rows, cols) -> bool:
        """Some (i, j) of the tile is inside the band (and inside [0, M))."""
        (i0, i1), (j0, j1) = rows, cols
        below = self.hi is not None and j0 > i1 - 1 + self.hi          # the whole tile right of the band
        above = self.lo is not None and j1 - 1 < i0 + self.lo          # the whole tile left of it
        return not (below or above)

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
            s5 = s5 - self.slopes * xp.abs(i + (self.M - self.N) - j)      # (..., G, R, bq, bk)
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
            s5 = xp.where(allowed, s5, xp.asarray(-xp.inf, dtype=s5.dtype, device=dev))
        return s5, t


def make_scores(xp, q, k, *, mask, causal, scale, softcap, alibi_slopes, window, G, R) -> Scores:
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
        left, right = window
        lo = None if left is None else (M - N) - int(left)
        hi = None if right is None else (M - N) + int(right)
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
    return Scores(N=N, M=M, scale=check_scale(scale, q.shape[-1]), softcap=softcap, mask=mask,
                  mask_shape=mask_shape, slopes=slopes,
                  lo=lo, hi=hi, lead=lead, G=G, R=R, like=q)


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
    axes = tuple(a for a in range(ds.ndim) if mask.shape[a] == 1 and ds.shape[a] != 1)
    if axes:
        ds = xp.sum(ds, axis=axes, keepdims=True)
    return ds
