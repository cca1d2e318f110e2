"""Linear attention (Katharopoulos et al. 2020): forward and hand-derived backward, in O(N) memory.

Softmax's ``exp(q.k)`` is replaced by a kernel ``phi(q)^T phi(k)`` with ``phi(x) = elu(x) + 1``, so the
weighted sum over keys can be regrouped: ``(phi(Q) phi(K)^T) V = phi(Q) (phi(K)^T V)``. The keys and
values are summarized once in a state ``S = phi(K)^T V (D, Dv)`` and ``z = phi(K)^T 1 (D,)``, and every
query reads the state: O(N D Dv) work and no ``(N, M)`` array. No scale.

Shape legend as in ops/attention.py: ``q (..., H, N, D)``, ``k (..., G, M, D)``, ``v (..., G, M, Dv)``,
``o (..., H, N, Dv)``; grouped-query heads as ``attention_forward`` (query head ``h`` uses key/value
head ``h // R``, ``R = H // G``), with a group's ``R`` heads stacked as rows ``(..., G, R*n, D)`` so
one matmul against the group's state serves all of them and ``phi(Q)^T dU`` sums the group. 2-D
inputs are one head. ``C`` is the chunk length, ``n <= C`` the rows of one chunk, ``m <= n`` its keys.

Causal (query ``i`` sees key ``j`` iff ``j <= i + c``, ``c = M - N`` bottom-right or ``0`` top-left):
the state is a prefix sum ``S_i = sum_{j <= i + c} phi(k_j) v_j^T``. It is never materialized per row
(that is ``(N, D, Dv)``): the rows are cut into chunks of ``C`` (Algorithm 1 of the paper, chunked);
the running ``S, z`` carry the keys of the past chunks, and a chunk's own keys enter through its
``C x C`` causal block. The keys every row sees (``j < c``) form the initial state; the keys no row
sees (``j >= N + c``, top-left with ``M > N``) get gradient 0. Non-causal is the same code with every
key in the initial state and one chunk of all rows that has no keys of its own.

Forward, in steps (derivations/18-linear-attention.md):
    1. Qf = phi(q), Kf = phi(k),  phi(x) = x + 1 (x > 0), exp(x) (x <= 0)          eq. (18.2)
    2. S = Kf_<^T V, z = Kf_<^T 1 over the keys every row sees                     eqs. (18.3)-(18.4)
    3. per chunk of rows I with its keys J:                                        eq. (18.5)
         A   = (Qf_I Kf_J^T) masked to j <= i + c                      (..., G, R*n, m)
         u_I = Qf_I S + A V_J,  den_I = Qf_I z + rowsum(A) + eps
         S  += Kf_J^T V_J,  z += Kf_J^T 1
    4. o = u / den (normalize=True; a row with den == 0 gives 0), or o = u          eq. (18.3)
Backward, the same steps in reverse:
    4. du = dout / den,  dden = -rowsum(dout * o) / den   (du = dout without normalize)   eq. (18.6)
    3. forward order, the state as in the forward (the prefix sums):               eqs. (18.7), (18.9)
         dA = (du_I V_J^T + dden_I) masked,  dQf_I = du_I S^T + dden_I z^T + dA Kf_J
       reverse order, carrying dS = sum_{later rows} Qf_i du_i^T, dz = sum Qf_i dden_i
       (the backward of a prefix sum is a suffix sum):                             eqs. (18.8)-(18.9)
         dKf_J = V_J dS^T + 1 dz^T + dA^T Qf_I,  dV_J = Kf_J dS + A^T du_I
         dS += Qf_I^T du_I,  dz += Qf_I^T dden_I
    2. the keys every row sees: dKf = V dS^T + 1 dz^T,  dV = Kf dS                 eq. (18.8)
    1. dq = dQf * phi'(q), dk = dKf * phi'(k),  phi'(x) = 1 (x > 0), exp(x) (x <= 0)   eq. (18.10)
Memory: O(N (D + Dv) + D Dv + C^2) per head, eq. (18.11).
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional

from ..backend import check_block, check_cache, check_dout, device, namespace, to_compute
from .attention import check_qkv
from .scores import causal_offset

__all__ = ["linear_attention_forward", "linear_attention_backward", "LinearAttentionCache", "feature_map",
           "DEFAULT_CHUNK"]

# Rows per chunk of the causal loop. One chunk costs O(C^2 (D + Dv)) for its causal block and
# O(C D Dv) to read and update the state, so the block's extra work is C (D + Dv) / (2 D Dv) of the
# state's: at C = 64 and the usual D = Dv = 64 the two are equal, and the block is C^2 = 4096 entries
# per head. Smaller chunks mean more Python steps (N / C of them); larger ones grow the block
# quadratically. Measured (2 shared cores, float32, H = 4, N = 4096, D = Dv = 64, causal forward +
# backward, best of 7, three runs): C = 16: 1.07-1.19x, 32: 0.98-1.03x, 128: 1.08-1.12x, 256: 1.22-1.42x
# the time at C = 64 (0.13-0.16 s); 32 and 64 tie, and 64 keeps the Python loop half as long.
DEFAULT_CHUNK = 64


class LinearAttentionCache(NamedTuple):
    """Saved by ``linear_attention_forward`` for ``linear_attention_backward``.

    The inputs as given, the output ``o`` and the denominators ``den`` in the compute dtype (float32
    for float16 inputs): O(N (D + Dv)) per head, nothing ``N x M`` and no per-row state. The backward
    recomputes ``phi(q)``, ``phi(k)``, the running state and each chunk's ``C x C`` block.
    """

    q: object            # (..., H, N, D)
    k: object            # (..., G, M, D)
    v: object            # (..., G, M, Dv)
    o: object            # (..., H, N, Dv), compute dtype
    den: object          # (..., H, N, 1) phi(q_i)^T z_i + eps, compute dtype; None without normalize
    offset: Optional[int]  # causal: row i sees keys j <= i + offset; None: every key
    normalize: bool
    eps: float
    chunk: int


def feature_map(xp, x):
    """``(phi(x), phi'(x))`` for ``phi(x) = elu(x) + 1``: ``x + 1`` and 1 for ``x > 0``, ``exp(x)`` and
    ``exp(x)`` for ``x <= 0`` (so ``phi' = phi`` there). Always > 0; ``exp`` is taken of
    ``min(x, 0)`` only, so large inputs never overflow; NaN stays NaN.
    Derivation: derivations/18-linear-attention.md, eqs. (18.2) and (18.10)."""
    zero = xp.zeros_like(x)
    e = xp.exp(xp.minimum(x, zero))                  # exp(x) for x <= 0, exp(0) = 1 for x > 0: phi'; NaN stays
    return e + xp.maximum(x, zero), e                # x + 1 for x > 0, exp(x) for x <= 0
    # (arithmetic, not xp.where on x > 0: where's data-dependent selection measured 7x slower)


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a finite float >= 0, got {eps!r}")
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite float >= 0, got {eps!r}")
    return float(eps)


def _chunks(N: int, M: int, offset: Optional[int], C: int):
    """``(a0, chunks, b_end)``: keys ``[0, a0)`` are seen by every row (the initial state), chunk
    ``(rows, keys)`` pairs its rows ``[i0, i1)`` with the keys ``[a, b)`` that its first row does not see
    and its last row does (the keys its causal block holds), and keys ``[b_end, M)`` are seen by no row.
    Non-causal: every key is in the initial state, one chunk of all rows, no keys of its own."""
    if offset is None:
        return M, [((0, N), (M, M))], M

    def clip(j):
        return min(max(j, 0), M)

    starts = range(0, max(N, 1), C)                                        # N = 0: one empty chunk
    chunks = [((i0, min(i0 + C, N)), (clip(i0 + offset), clip(min(i0 + C, N) + offset))) for i0 in starts]
    return clip(offset), chunks, clip(N + offset)


class _Groups:
    """q-side arrays in the grouped layout: ``(..., H, N, C)`` <-> ``(..., G, R, N, C)`` (free for a
    contiguous array), and the rows of one chunk as ``(..., G, R*n, C)`` and back."""

    def __init__(self, xp, q, G: int, R: int):
        self.xp, self.G, self.R = xp, G, R
        self.lead, self.N = tuple(q.shape[:-3]), q.shape[-2]

    def grouped(self, a):
        return self.xp.reshape(a, self.lead + (self.G, self.R, self.N, a.shape[-1]))   # (..., G, R, N, C)

    def rows(self, a5, rows):
        (i0, i1), c = rows, a5.shape[-1]
        return self.xp.reshape(a5[..., i0:i1, :], self.lead + (self.G, self.R * (i1 - i0), c))   # (..., G, R*n, C)

    def join(self, tiles, c: int):
        """Chunk results ``(..., G, R*n, C)`` in row order as one ``(..., H, N, C)`` array."""
        xp = self.xp
        parts = [xp.reshape(t, self.lead + (self.G, self.R, t.shape[-2] // self.R, c)) for t in tiles]
        joined = parts[0] if len(parts) == 1 else xp.concat(parts, axis=-2)          # (..., G, R, N, C)
        return xp.reshape(joined, self.lead + (self.G * self.R, self.N, c))          # (..., H, N, C)


def _causal_block(xp, x, rows, keys, offset, R: int, like):
    """``x (..., G, R*n, m)`` with the entries ``j > i + offset`` set to 0: a chunk's causal block."""
    (i0, i1), (a, b) = rows, keys
    dev = device(like)
    i = xp.arange(i0, i1, device=dev)[:, None]                             # (n, 1)
    j = xp.arange(a, b, device=dev)[None, :]                               # (1, m)
    x5 = xp.reshape(x, tuple(x.shape[:-2]) + (R, i1 - i0, b - a))          # (..., G, R, n, m)
    x5 = xp.where(j <= i + offset, x5, xp.zeros_like(x5))
    return xp.reshape(x5, tuple(x.shape))                                  # (..., G, R*n, m)


def _as_heads(a):
    """2-D inputs are one head: ``(N, C)`` -> ``(1, N, C)``."""
    return a[None, ...] if a.ndim == 2 else a


def linear_attention_forward(q, k, v, *, causal=False, normalize=True, eps=1e-6, chunk=None):
    """Linear attention ``o_i = phi(q_i)^T S_i / (phi(q_i)^T z_i + eps)``, ``phi = elu + 1``.

    Parameters
    ----------
    q : array (..., H, N, D)
    k : array (..., G, M, D)      ``G == H``, or ``G < H`` with ``H % G == 0`` (grouped-query).
    v : array (..., G, M, Dv)
    causal : bool or "bottom-right" / "top-left"
        False: ``S_i = sum_j phi(k_j) v_j^T`` and ``z_i = sum_j phi(k_j)`` over all keys. True (=
        "bottom-right"): over ``j <= i + M - N``; "top-left": over ``j <= i``. A row that sees no key
        gives 0.
    normalize : bool
        True: divide by ``phi(q_i)^T z_i + eps``; False: ``o_i = phi(q_i)^T S_i``.
    eps : float >= 0
        Added to the denominator. With ``eps = 0`` a row whose denominator is exactly 0 (no key
        seen, or every feature underflowed) gives 0, never NaN.
    chunk : int >= 1 or None
        Rows per chunk of the causal loop (need not divide N); None: ``DEFAULT_CHUNK``. The result
        does not depend on it beyond rounding. Unused without causal.

    Returns
    -------
    o : array (..., H, N, Dv), the inputs' dtype.
    cache : LinearAttentionCache

    No ``N x M`` array and no per-row state is built: extra memory is O(N (D + Dv) + D Dv + C^2)
    per head. NaN in a key or value reaches the rows that see it (and, through a chunk's masked
    block, possibly the chunk's earlier rows); it is never hidden.

    Derivation: derivations/18-linear-attention.md, eqs. (18.1)-(18.5); memory: eq. (18.11).
    """
    xp = namespace(q=q, k=k, v=v)
    G, R = check_qkv(xp, q, k, v)
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {normalize!r}")
    eps = _check_eps(eps)
    C = DEFAULT_CHUNK if chunk is None else check_block("chunk", chunk)
    N, M, Dv = q.shape[-2], k.shape[-2], v.shape[-1]
    offset = causal_offset(causal, N, M)
    q3, k3, v3 = (to_compute(xp, _as_heads(a)) for a in (q, k, v))       # (..., H|G, N|M, D|Dv)
    g = _Groups(xp, q3, G, R)

    # 1. the feature map: eq. (18.2)
    qf5 = g.grouped(feature_map(xp, q3)[0])                              # (..., G, R, N, D)
    kf = feature_map(xp, k3)[0]                                          # (..., G, M, D)
    # 2. the keys every row sees as the initial state: eqs. (18.3)-(18.4)
    a0, chunks, _ = _chunks(N, M, offset, C)
    S = kf[..., :a0, :].mT @ v3[..., :a0, :]                             # (..., G, D, Dv)
    z = xp.sum(kf[..., :a0, :], axis=-2)[..., None]                      # (..., G, D, 1)
    # 3. per chunk: the state of the past, the causal block of the present: eq. (18.5)
    u_parts, den_parts = [], []
    for rows, keys in chunks:
        qf = g.rows(qf5, rows)                                           # (..., G, R*n, D)
        u, den = qf @ S, qf @ z                                          # (..., G, R*n, Dv|1)
        if keys[1] > keys[0]:
            kf_j, v_j = kf[..., keys[0]:keys[1], :], v3[..., keys[0]:keys[1], :]   # (..., G, m, D|Dv)
            A = _causal_block(xp, qf @ kf_j.mT, rows, keys, offset, R, q3)        # (..., G, R*n, m)
            u = u + A @ v_j
            den = den + xp.sum(A, axis=-1, keepdims=True)
            S = S + kf_j.mT @ v_j
            z = z + xp.sum(kf_j, axis=-2)[..., None]
        u_parts.append(u)
        den_parts.append(den)
    u = g.join(u_parts, Dv)                                              # (..., H, N, Dv)
    # 4. the quotient: eq. (18.3); den == 0 only with eps = 0 and then u == 0 too: o = 0, not 0/0
    den = None
    o = u
    if normalize:
        den = g.join(den_parts, 1) + eps                                 # (..., H, N, 1)
        empty = den == 0
        o = xp.where(empty, xp.zeros_like(u), u / xp.where(empty, xp.ones_like(den), den))
    if q.ndim == 2:
        o, den = o[0, ...], None if den is None else den[0, ...]         # (N, Dv), (N, 1)
    cache = LinearAttentionCache(q=q, k=k, v=v, o=o, den=den, offset=offset, normalize=normalize, eps=eps, chunk=C)
    return xp.astype(o, q.dtype, copy=False), cache


def linear_attention_backward(dout, cache: LinearAttentionCache):
    """Gradients of ``linear_attention_forward``: ``(dq, dk, dv)`` in q, k, v's shapes.

    Two passes over the chunks, as the paper's Algorithm 1: forward order for ``dq`` (it needs
    the prefix state ``S_i, z_i``), reverse order for ``dk``, ``dv`` (carrying ``dS, dz``, the
    gradients flowing into the running sums: the backward of a prefix sum is a suffix sum). With
    grouped-query attention ``dk``, ``dv`` are summed over the ``R`` query heads of each group.

    Derivation: derivations/18-linear-attention.md, eqs. (18.6)-(18.10).
    """
    check_cache(cache, LinearAttentionCache, "linear_attention_forward")
    q, k, v, o, den, offset, normalize, eps, C = cache
    xp = namespace(dout=dout, q=q)
    check_dout(xp, dout, tuple(q.shape[:-1]) + (v.shape[-1],), q.dtype)
    G, R = check_qkv(xp, q, k, v)
    N, M, D, Dv = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    q3, k3, v3, dout3, o3 = (to_compute(xp, _as_heads(a)) for a in (q, k, v, dout, o))
    g = _Groups(xp, q3, G, R)

    # in the forward pass this was step 4, o = u / den: eq. (18.6)
    du, dden = dout3, None                                               # (..., H, N, Dv)
    if normalize:
        den = _as_heads(den)                                             # (..., H, N, 1)
        empty = den == 0                                                 # o = 0 there, whatever u: no gradient
        safe = xp.where(empty, xp.ones_like(den), den)
        delta = xp.sum(dout3 * o3, axis=-1, keepdims=True)               # (..., H, N, 1)
        du = xp.where(empty, xp.zeros_like(du), du / safe)               # (..., H, N, Dv)
        dden = xp.where(empty, xp.zeros_like(delta), -delta / safe)      # (..., H, N, 1)
    # step 1 recomputed: phi and phi', eqs. (18.2), (18.10)
    qf3, dphi_q = feature_map(xp, q3)                                    # (..., H, N, D)
    kf, dphi_k = feature_map(xp, k3)                                     # (..., G, M, D)
    qf5, du5 = g.grouped(qf3), g.grouped(du)                             # (..., G, R, N, D|Dv)
    dden5 = None if dden is None else g.grouped(dden)                    # (..., G, R, N, 1)
    a0, chunks, b_end = _chunks(N, M, offset, C)

    def block(qf, du_i, dden_i, rows, keys):
        """A chunk's causal block ``A`` and its gradient ``dA = du V_J^T + dden`` (eq. (18.9))."""
        kf_j, v_j = kf[..., keys[0]:keys[1], :], v3[..., keys[0]:keys[1], :]   # (..., G, m, D|Dv)
        A = _causal_block(xp, qf @ kf_j.mT, rows, keys, offset, R, q3)          # (..., G, R*n, m)
        dA = du_i @ v_j.mT if dden_i is None else du_i @ v_j.mT + dden_i        # (..., G, R*n, m)
        return kf_j, v_j, A, _causal_block(xp, dA, rows, keys, offset, R, q3)

    # step 3 in forward order: dQf_I = du_I S^T + dden_I z^T + dA Kf_J, the state as the forward built
    # it (eqs. (18.7), (18.9))
    S = kf[..., :a0, :].mT @ v3[..., :a0, :]                             # (..., G, D, Dv)
    z = xp.sum(kf[..., :a0, :], axis=-2)[..., None]                      # (..., G, D, 1)
    dqf_parts = []
    for rows, keys in chunks:
        qf, du_i = g.rows(qf5, rows), g.rows(du5, rows)                  # (..., G, R*n, D|Dv)
        dden_i = None if dden5 is None else g.rows(dden5, rows)          # (..., G, R*n, 1)
        dqf = du_i @ S.mT                                                # (..., G, R*n, D)
        if dden_i is not None:
            dqf = dqf + dden_i @ z.mT
        if keys[1] > keys[0]:
            kf_j, v_j, _, dA = block(qf, du_i, dden_i, rows, keys)
            dqf = dqf + dA @ kf_j
            S = S + kf_j.mT @ v_j
            z = z + xp.sum(kf_j, axis=-2)[..., None]
        dqf_parts.append(dqf)
    # step 3 in reverse order, carrying dS, dz: the suffix sums of eq. (18.8), chunked as eq. (18.9)
    dS = xp.zeros(tuple(S.shape), dtype=S.dtype, device=device(q3))     # (..., G, D, Dv)
    dz = xp.zeros(tuple(z.shape), dtype=z.dtype, device=device(q3))     # (..., G, D, 1)
    dkf_parts, dv_parts = [], []
    for rows, keys in reversed(chunks):
        qf, du_i = g.rows(qf5, rows), g.rows(du5, rows)                  # (..., G, R*n, D|Dv)
        dden_i = None if dden5 is None else g.rows(dden5, rows)          # (..., G, R*n, 1)
        if keys[1] > keys[0]:
            kf_j, v_j, A, dA = block(qf, du_i, dden_i, rows, keys)
            dkf_parts.append(v_j @ dS.mT + dz.mT + dA.mT @ qf)           # (..., G, m, D)
            dv_parts.append(kf_j @ dS + A.mT @ du_i)                     # (..., G, m, Dv)
        dS = dS + qf.mT @ du_i                                           # (..., G, D, Dv)
        if dden_i is not None:
            dz = dz + qf.mT @ dden_i                                     # (..., G, D, 1)
    # step 2: the keys every row sees get the whole sums: eq. (18.8)
    kf_0, v_0 = kf[..., :a0, :], v3[..., :a0, :]                         # (..., G, a0, D|Dv)
    dkf_parts.append(v_0 @ dS.mT + dz.mT)                                # (..., G, a0, D)
    dv_parts.append(kf_0 @ dS)                                           # (..., G, a0, Dv)
    dkf_parts.reverse()
    dv_parts.reverse()
    if b_end < M:                                                        # keys no row sees
        unseen = tuple(k3.shape[:-2]) + (M - b_end,)
        dkf_parts.append(xp.zeros(unseen + (D,), dtype=kf.dtype, device=device(q3)))    # (..., G, M - b_end, D)
        dv_parts.append(xp.zeros(unseen + (Dv,), dtype=kf.dtype, device=device(q3)))    # (..., G, M - b_end, Dv)
    dkf = xp.concat(dkf_parts, axis=-2)                                  # (..., G, M, D)
    dv = xp.concat(dv_parts, axis=-2)                                    # (..., G, M, Dv)
    # step 1, phi: eq. (18.10)
    dq = g.join(dqf_parts, D) * dphi_q                                   # (..., H, N, D)
    dk = dkf * dphi_k                                                    # (..., G, M, D)
    grads = (dq, dk, dv)
    if q.ndim == 2:
        grads = tuple(a[0, ...] for a in grads)                          # (N|M, D|Dv)
    return tuple(xp.astype(a, q.dtype, copy=False) for a in grads)
