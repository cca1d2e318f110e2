"""Cross-entropy over logits, as ``torch.nn.functional.cross_entropy`` (mean reduction), with its
hand-derived backward ``(softmax - q) / count``.

Shapes: ``logits (..., C)``; ``target (...)`` integer class ids (hard targets) or ``(..., C)``
float probabilities (soft targets). The loss is a 0-d array.

Forward (derivations/10-cross-entropy.md):
    1. logp = log_softmax(logits)                          eq. (10.1)
    2. q = (1 - eps) onehot(target) + eps / C               eq. (10.3)  (soft: q = (1 - eps) target + eps / C)
    3. loss = sum over counted rows of -sum_c q_c logp_c, divided by the count      eq. (10.4)
       counted rows: target != ignore_index (hard); every row (soft). No counted row: loss = 0.
Backward:
    dlogits = dloss * (softmax(logits) * sum_c q_c - q) / count on counted rows, 0 elsewhere   eq. (10.5)
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

from ..backend import check_cache, check_float, compute_dtype, device, namespace, read_back, to_compute
from .softmax import _stable_log_softmax

__all__ = ["cross_entropy_forward", "cross_entropy_backward", "CrossEntropyCache"]


class CrossEntropyCache(NamedTuple):
    """Saved for the backward: ``logp`` (``softmax = exp(logp)``), the smoothed targets ``q``
    with ignored rows zeroed, and ``count``, the number of rows the mean divides by."""

    logp: object  # (..., C), compute dtype
    q: object  # (..., C), compute dtype; 0 on ignored rows
    counted: object  # (..., 1) bool, True where the row counts
    count: int
    dtype: object


def _check_smoothing(label_smoothing):
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real) \
            or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be a real number in [0, 1], got {label_smoothing!r}")
    return float(label_smoothing)


def cross_entropy_forward(logits, target, *, ignore_index: int = -100, label_smoothing: float = 0.0):
    """Mean cross-entropy of ``logits`` against ``target``, returning ``(loss, cache)``.

    Parameters
    ----------
    logits : array (..., C), real floating.
    target : integer array (...) of class ids in ``[0, C)`` or ``ignore_index``; or a float array
        ``(..., C)`` of probabilities (soft targets: every row counts, no ignore index).
    ignore_index : int
        Hard-target rows with this id add nothing and are not counted. If every row is ignored the
        loss is 0 and its gradient 0 (torch returns NaN; npattn never does).
    label_smoothing : float in [0, 1]
        Mixes the target with the uniform distribution, as torch: ``q = (1 - eps) target + eps / C``.

    Returns
    -------
    loss : 0-d array, the logits' dtype.
    cache : CrossEntropyCache

    Derivation: derivations/10-cross-entropy.md, eqs. (10.1), (10.3) and (10.4).
    """
    xp = namespace(logits=logits, target=target)
    check_float(xp, "logits", logits)
    if logits.ndim < 1:
        raise ValueError(f"logits must have at least 1 axis (..., C), got shape {tuple(logits.shape)}")
    eps = _check_smoothing(label_smoothing)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    c = logits.shape[-1]
    ct = compute_dtype(xp, logits.dtype)
    lc = to_compute(xp, logits)
    logp = _stable_log_softmax(xp, lc, -1)                                  # (..., C)   step 1, eq. (10.1)
    if xp.isdtype(target.dtype, "real floating"):
        # soft targets: probabilities of the logits' shape and dtype
        if target.dtype != logits.dtype:
            raise TypeError(f"soft target must have the logits' dtype {logits.dtype}, got {target.dtype}")
        if tuple(target.shape) != tuple(logits.shape):
            raise ValueError(f"soft target must have the logits' shape {tuple(logits.shape)}, got {tuple(target.shape)}")
        q = (1.0 - eps) * to_compute(xp, target) + eps / c                  # step 2, eq. (10.3)
        counted = xp.ones(tuple(logits.shape[:-1]) + (1,), dtype=xp.bool, device=device(logits))
        count = math.prod(logits.shape[:-1])
    elif xp.isdtype(target.dtype, "integral"):
        if tuple(target.shape) != tuple(logits.shape[:-1]):
            raise ValueError(f"target must have the logits' leading shape {tuple(logits.shape[:-1])} "
                             f"(class ids), got {tuple(target.shape)}")
        counted = (target != ignore_index)[..., None]                       # (..., 1)
        bad = xp.logical_and(counted[..., 0], xp.logical_or(target < 0, target >= c))
        n_bad = count = lo = hi = 0
        if math.prod(target.shape):                                         # one explicit host read
            n_bad, count, lo, hi = read_back(xp, xp.sum(xp.astype(bad, xp.int64)),
                                             xp.sum(xp.astype(counted, xp.int64)), xp.min(target), xp.max(target))
        if n_bad:
            raise ValueError(f"target must be class ids in [0, {c}) or ignore_index={ignore_index}, "
                             f"got values from {lo} to {hi}")
        classes = xp.arange(c, device=device(logits))                       # (C,)
        onehot = xp.astype(target[..., None] == classes, ct)                # (..., C); ignored rows: all 0
        q = xp.where(counted, (1.0 - eps) * onehot + eps / c, xp.zeros_like(onehot))   # eq. (10.3)
    else:
        raise TypeError(f"target must be integer class ids or float probabilities, got dtype {target.dtype}")
    # step 3, eq. (10.4): -sum q logp over counted rows / count; q is 0 on ignored rows, and
    # where() keeps -inf logp (a masked class with q = 0) from making 0 * -inf = NaN
    per_class = q * xp.where(q == 0, xp.zeros_like(logp), logp)
    loss = -xp.sum(per_class) / count if count else xp.sum(per_class) * 0.0
    cache = CrossEntropyCache(logp=logp, q=q, counted=counted, count=count, dtype=logits.dtype)
    return xp.astype(loss, logits.dtype, copy=False), cache


def cross_entropy_backward(dloss, cache: CrossEntropyCache):
    """``(dlogits, None)``: ``dlogits = dloss * (softmax * sum(q) - q) / count`` on counted rows.

    ``dloss`` is a float or a 0-d array. Derivation: derivations/10-cross-entropy.md, eq. (10.5).
    """
    check_cache(cache, CrossEntropyCache, "cross_entropy_forward")
    logp, q, counted, count, dtype = cache
    xp = namespace(logp=logp)
    if isinstance(dloss, bool) or not (isinstance(dloss, numbers.Real) or
                                       (hasattr(dloss, "shape") and tuple(dloss.shape) == ())):
        raise TypeError(f"dloss must be a real number or a 0-d array, got {dloss!r}")
    if hasattr(dloss, "dtype"):
        namespace(dloss=dloss, logp=logp)
        check_float(xp, "dloss", dloss)
        dloss = xp.astype(dloss, logp.dtype)
    if count == 0:
        return xp.astype(xp.zeros_like(logp), dtype), None
    p = xp.exp(logp)                                                        # softmax(logits)
    grad = (p * xp.sum(q, axis=-1, keepdims=True) - q) * (dloss / count)    # (..., C)   eq. (10.5)
    dlogits = xp.where(counted, grad, xp.zeros_like(grad))
    return xp.astype(dlogits, dtype, copy=False), None
