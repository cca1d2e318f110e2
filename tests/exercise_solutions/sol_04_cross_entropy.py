"""Solution of exercise 4: the cross-entropy backward, softmax minus one-hot.

Read derivations/10-cross-entropy.md (eqs. (10.3)-(10.5)). Write ``cross_entropy_backward``; check it
with ``npattn grade exercises/04_cross_entropy.py``.

Shapes: ``logits (..., C)``, ``target (...)`` class ids; a target equal to ``ignore_index`` adds
nothing to the loss and is not counted in the mean. ``label_smoothing`` mixes the one-hot target
with the uniform distribution, as torch. The loss is a 0-d array; ``dloss`` is its upstream gradient.
"""

import numpy as np


def cross_entropy_forward(logits, target, *, ignore_index=-100, label_smoothing=0.0):
    """Mean over the counted positions of ``-sum_c q_c log softmax(logits)_c``; returns ``(loss, cache)``."""
    c = logits.shape[-1]
    z = logits - np.max(logits, axis=-1, keepdims=True)
    logp = z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))       # (..., C)
    counted = target != ignore_index                                    # (...)
    onehot = np.eye(c)[np.where(counted, target, 0)]                     # (..., C)
    q = np.where(counted[..., None], (1 - label_smoothing) * onehot + label_smoothing / c, 0.0)
    count = int(np.sum(counted))
    loss = -np.sum(q * logp) / count if count else 0.0
    return np.asarray(loss, dtype=logits.dtype), (logp, q, counted, count)


def cross_entropy_backward(dloss, cache):
    """``(dlogits, None)``: the targets are integers and get no gradient."""
    logp, q, counted, count = cache
    if count == 0:
        return np.zeros_like(logp), None
    p = np.exp(logp)
    grad = (p * np.sum(q, axis=-1, keepdims=True) - q) * (dloss / count)       # eq. (10.5)
    return np.where(counted[..., None], grad, 0.0).astype(logp.dtype), None
