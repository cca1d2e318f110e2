"""Solution of exercise 3: the LayerNorm and RMSNorm backwards.

The exercise file as shipped (its forward and helpers, exercises/03_layernorm.py) with the learner's
part written out below."""

import numpy as np

from tests.exercise_solutions import exercise

globals().update(exercise("03_layernorm.py"))                      # the stub's forward and helpers


def layernorm_backward(dout, cache):
    """``(dx, dgamma, dbeta)``."""
    xhat, rstd, gamma = cache
    rows = tuple(range(dout.ndim - 1))
    dgamma, dbeta = np.sum(dout * xhat, axis=rows), np.sum(dout, axis=rows)   # eq. (7.3)
    dxhat = dout * gamma
    dx = rstd * (dxhat - np.mean(dxhat, axis=-1, keepdims=True)
                 - xhat * np.mean(dxhat * xhat, axis=-1, keepdims=True))      # eq. (7.4)
    return dx, dgamma, dbeta


def rmsnorm_backward(dout, cache):
    """``(dx, dgamma)``."""
    xhat, rrms, gamma = cache
    dxhat = dout * gamma
    dgamma = np.sum(dout * xhat, axis=tuple(range(dout.ndim - 1)))
    dx = rrms * (dxhat - xhat * np.mean(dxhat * xhat, axis=-1, keepdims=True))   # eq. (7.6)
    return dx, dgamma
