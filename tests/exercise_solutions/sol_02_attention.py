"""Solution of exercise 2: the attention backward.

The exercise file as shipped (its forward and helpers, exercises/02_attention.py) with the learner's
part written out below."""

import numpy as np

from tests.exercise_solutions import exercise

globals().update(exercise("02_attention.py"))                      # the stub's forward and helpers


def attention_backward(dout, cache):
    """``(dq, dk, dv)`` given ``dout = dL/do (H, N, Dv)``, in the shapes of ``q, k, v``."""
    q, k, v, p, scale = cache
    dv = np.swapaxes(p, -1, -2) @ dout                                  # (H, M, Dv)  eq. (3.7)
    dp = dout @ np.swapaxes(v, -1, -2)                                  # (H, N, M)
    ds = p * (dp - np.sum(p * dp, axis=-1, keepdims=True))              # eq. (3.9)
    dq = scale * ds @ k                                                 # (H, N, D)   eq. (3.10)
    dk = scale * np.swapaxes(ds, -1, -2) @ q                            # (H, M, D)
    return dq, dk, dv
