"""Rotary position embedding (RoPE): forward and its backward, the rotation by the opposite angle.

Shapes: ``x (..., N, D)`` with ``D`` even; ``positions`` integer, broadcastable to ``x.shape[:-1]``
(default ``arange(N)``); the angle table ``theta (..., N, D/2)``.

Forward (derivations/09-embeddings-positions.md):
    theta[t, c] = t * base^(-2c/D),  c = 0 .. D/2 - 1                  eq. (9.4)
    (y1, y2) = (x1 cos theta - x2 sin theta,  x2 cos theta + x1 sin theta)   eq. (9.5)
    where the pair (x1, x2) of channel c is (x[c], x[c + D/2]) (``interleaved=False``: Hugging Face
    Llama's ``rotate_half``, GPT-NeoX) or (x[2c], x[2c+1]) (``interleaved=True``: RoFormer, GPT-J).
Backward: each pair was multiplied by the orthogonal matrix R(theta), so dx = R(theta)^T dy = R(-theta) dy:
    (dx1, dx2) = (dy1 cos theta + dy2 sin theta,  dy2 cos theta - dy1 sin theta)   eq. (9.6)
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

from ..backend import check_cache, check_dout, check_float, check_int, compute_dtype, device, namespace, to_compute

__all__ = ["rope_forward", "rope_backward", "RopeCache", "rope_angles"]


class RopeCache(NamedTuple):
    """Saved for the backward: ``cos`` and ``sin`` of the angle table (the backward rotates by
    ``-theta``: same cos, negated sin), the pairing and the input's shape and dtype."""

    cos: object  # (..., N, D/2), compute dtype
    sin: object  # (..., N, D/2)
    interleaved: bool
    shape: tuple
    dtype: object


def rope_angles(xp, positions, d: int, base: float, like):
    """``theta = positions * base^(-2c/D)`` as ``(cos, sin)`` in float64 on ``like``'s device,
    shape ``positions.shape + (D/2,)``. Computed in float64 whatever the input dtype (a 4000-token
    angle in float32 is off by ~5e-4 rad) and cast by the caller. eq. (9.4)."""
    dev = device(like)
    c = xp.arange(d // 2, dtype=xp.float64, device=dev)                    # (D/2,)
    inv_freq = float(base) ** (-2.0 * c / d)                               # (D/2,)
    theta = xp.astype(positions, xp.float64)[..., None] * inv_freq         # (..., N, D/2)
    return xp.cos(theta), xp.sin(theta)


def _rotate(xp, x, cos, sin, interleaved: bool):
    """Rotate every channel pair of ``x (..., N, D)`` by the angle whose cos/sin are given: eq. (9.5)."""
    h = x.shape[-1] // 2
    if interleaved:
        pairs = xp.reshape(x, tuple(x.shape[:-1]) + (h, 2))                # (..., N, D/2, 2)
        x1, x2 = pairs[..., 0], pairs[..., 1]                              # (..., N, D/2) each
        y = xp.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), axis=-1)  # (..., N, D/2, 2)
        return xp.reshape(y, tuple(x.shape))                               # (..., N, D)
    x1, x2 = x[..., :h], x[..., h:]                                        # (..., N, D/2) each
    return xp.concat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), axis=-1)  # (..., N, D)


def rope_forward(x, *, positions=None, base: float = 10000.0, interleaved: bool = False):
    """Rotate channel pair ``c`` of the row at position ``t`` by ``t * base^(-2c/D)``.

    Parameters
    ----------
    x : array (..., N, D), D even.
    positions : integer array broadcastable to ``x.shape[:-1]``, or None for ``arange(N)``.
    base : float > 0
    interleaved : bool
        False pairs ``x[c]`` with ``x[c + D/2]`` (Llama's ``rotate_half``); True pairs ``x[2c]``
        with ``x[2c + 1]``.

    Returns
    -------
    y : array (..., N, D), the input dtype.
    cache : RopeCache

    Derivation: derivations/09-embeddings-positions.md, eqs. (9.4)-(9.5).
    """
    xp = namespace(x=x, positions=positions)
    check_float(xp, "x", x)
    if x.ndim < 2:
        raise ValueError(f"x must have at least 2 axes (..., N, D), got shape {tuple(x.shape)}")
    d, n = x.shape[-1], x.shape[-2]
    if d % 2:
        raise ValueError(f"RoPE rotates channel pairs: x's last axis D must be even, got shape {tuple(x.shape)}")
    if isinstance(base, bool) or not isinstance(base, numbers.Real) or not base > 0:
        raise ValueError(f"base must be a real number > 0, got {base!r}")
    if not isinstance(interleaved, bool):
        raise TypeError(f"interleaved must be a bool, got {interleaved!r}")
    if positions is None:
        positions = xp.arange(n, device=device(x))
    else:
        check_int(xp, "positions", positions)
        lead = tuple(x.shape[:-1])
        ps = tuple(positions.shape)
        if len(ps) > len(lead) or not all(p in (1, s) for p, s in zip(reversed(ps), reversed(lead))):
            raise ValueError(f"positions of shape {ps} does not broadcast to x's rows {lead}")
    ct = compute_dtype(xp, x.dtype)
    cos, sin = (xp.astype(a, ct) for a in rope_angles(xp, positions, d, base, like=x))   # (..., N, D/2)
    y = _rotate(xp, to_compute(xp, x), cos, sin, interleaved)
    return xp.astype(y, x.dtype, copy=False), RopeCache(cos=cos, sin=sin, interleaved=interleaved,
                                                         shape=tuple(x.shape), dtype=x.dtype)


def rope_backward(dout, cache: RopeCache):
    """``dx = R(-theta) dout``: the same rotation with the opposite angle (R is orthogonal).

    Derivation: derivations/09-embeddings-positions.md, eq. (9.6).
    """
    check_cache(cache, RopeCache, "rope_forward")
    cos, sin, interleaved, shape, dtype = cache
    xp = namespace(dout=dout, cos=cos)
    check_dout(xp, dout, shape, dtype)
    dx = _rotate(xp, to_compute(xp, dout), cos, -sin, interleaved)         # eq. (9.6)
    return xp.astype(dx, dtype, copy=False)
