"""Optimizers over a params dict, with the semantics of their torch namesakes, and gradient clipping.

An optimizer holds a reference to a model's ``params`` and its own state (momentum, moments) per
name; ``step(grads)`` replaces each ``params[name]`` by its updated value (a new array, so the
params dict's shape and dtype checks apply). Names in ``params`` missing from ``grads`` are left as
they are (as torch skips a parameter whose ``.grad`` is None).

SGD (``torch.optim.SGD``, dampening 0, no Nesterov):
    g = grad + weight_decay * p
    buf = g (first step),  buf = momentum * buf + g (later)       (momentum > 0)
    p = p - lr * buf   (or lr * g without momentum)
AdamW (``torch.optim.AdamW``, decoupled weight decay, Loshchilov & Hutter):
    p = p * (1 - lr * weight_decay)
    m = beta1 m + (1 - beta1) g,   v = beta2 v + (1 - beta2) g^2
    p = p - lr * (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)
clip_grad_norm (``torch.nn.utils.clip_grad_norm_``):
    total = sqrt(sum of every gradient's squared entries), accumulated in float64
    every gradient *= min(1, max_norm / (total + 1e-6)), each in its own dtype

Nothing is half done: ``step`` checks every gradient (an array of its parameter's shape, dtype and
library) before it updates any parameter or any state.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

from array_api_compat import is_array_api_obj

from ..backend import check_float, compute_dtype, namespace, to_compute
from .params import check_real_arg

__all__ = ["SGD", "AdamW", "clip_grad_norm"]


def _positive(name, value, allow_zero=True):
    return check_real_arg(name, value, strict=not allow_zero)


def _check_params(params) -> None:
    """An optimizer updates a model's ``params`` dict in place: a list of arrays is refused."""
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a dict name -> array (a model's params), got {type(params).__name__}")
    for name, p in params.items():
        if not is_array_api_obj(p):
            raise TypeError(f"params[{name!r}] must be an array, got {type(p).__name__}")


def _check_grad_dict(grads) -> None:
    if not isinstance(grads, Mapping):
        raise TypeError(f"grads must be a dict name -> array, got {type(grads).__name__}")


def _check_grads(params, grads):
    """Every gradient at once, before anything is updated: a known name, an array of its
    parameter's shape, dtype and library."""
    _check_grad_dict(grads)
    unknown = sorted(set(grads) - set(params), key=str)
    if unknown:
        raise KeyError(f"grads has names that are not parameters: {unknown}")
    for name, g in grads.items():
        if g is None:
            continue
        p = params[name]
        if not is_array_api_obj(g):
            raise TypeError(f"grads[{name!r}] must be an array, got {type(g).__name__}")
        namespace(**{f"grads[{name!r}]": g, f"params[{name!r}]": p})
        if tuple(g.shape) != tuple(p.shape):
            raise ValueError(f"grads[{name!r}] has shape {tuple(g.shape)}, its parameter {tuple(p.shape)}")
        if g.dtype != p.dtype:
            raise TypeError(f"grads[{name!r}] has dtype {g.dtype}, its parameter {p.dtype}")


class SGD:
    """Stochastic gradient descent with optional momentum and (coupled) weight decay, as torch."""

    def __init__(self, params, *, lr, momentum=0.0, weight_decay=0.0):
        _check_params(params)
        self.params = params
        self.lr = _positive("lr", lr)
        self.momentum = _positive("momentum", momentum)
        self.weight_decay = _positive("weight_decay", weight_decay)
        self.state = {}                              # name -> momentum buffer

    def step(self, grads):
        _check_grads(self.params, grads)
        for name, g in grads.items():
            if g is None:
                continue
            p = self.params[name]
            if self.weight_decay:
                g = g + self.weight_decay * p
            if self.momentum:
                buf = self.state.get(name)
                buf = g if buf is None else self.momentum * buf + g
                self.state[name] = buf
                g = buf
            self.params[name] = p - float(self.lr) * g


class AdamW:
    """Adam with decoupled weight decay, as ``torch.optim.AdamW`` (no amsgrad)."""

    def __init__(self, params, *, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        _check_params(params)
        self.params = params
        self.lr = _positive("lr", lr)
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(
                isinstance(b, numbers.Real) and not isinstance(b, bool) and 0.0 <= b < 1.0 for b in betas)):
            raise ValueError(f"betas must be two real numbers in [0, 1), got {betas!r}")
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = _positive("eps", eps)
        self.weight_decay = _positive("weight_decay", weight_decay)
        self.state = {}                              # name -> (step t, m, v)

    def step(self, grads):
        _check_grads(self.params, grads)
        b1, b2 = self.betas
        lr = float(self.lr)                              # a Python float keeps float32 weights float32
        for name, g in grads.items():
            if g is None:
                continue
            p = self.params[name]
            xp = namespace(p=p, g=g)
            t, m, v = self.state.get(name, (0, xp.zeros_like(p), xp.zeros_like(p)))
            t += 1
            p = p * (1.0 - lr * self.weight_decay)                          # decoupled decay
            m = b1 * m + (1.0 - b1) * g
            v = b2 * v + (1.0 - b2) * (g * g)
            bias1, bias2 = 1.0 - b1 ** t, 1.0 - b2 ** t
            denom = xp.sqrt(v) / math.sqrt(bias2) + self.eps
            self.params[name] = p - (lr / bias1) * (m / denom)
            self.state[name] = (t, m, v)


def clip_grad_norm(grads: dict, max_norm):
    """Scale every gradient in ``grads`` (the dict's entries are replaced) so that their global L2
    norm is at most ``max_norm``, as ``torch.nn.utils.clip_grad_norm_``; returns the norm before
    clipping as a 0-d array of the gradients' library and (widest) dtype.

    The sum of squares is accumulated in float64, so float16 gradients of a few hundred do not
    overflow (300^2 > 65504, float16's largest); each gradient keeps its own dtype (float16 scaled
    in float32)."""
    _check_grad_dict(grads)
    max_norm = _positive("max_norm", max_norm)
    named = {f"grads[{n!r}]": g for n, g in grads.items() if g is not None}
    if not named:
        raise ValueError("grads has no gradient to clip")
    xp = namespace(**named)
    for label, g in named.items():
        check_float(xp, label, g)
    squares = [xp.sum(xp.astype(g, xp.float64) ** 2) for g in named.values()]   # 0-d float64 each
    total = xp.sqrt(xp.sum(xp.stack(squares)))
    coef = xp.minimum(max_norm / (total + 1e-6), xp.ones_like(total))      # float64, 0-d
    for name, g in grads.items():
        if g is not None:
            grads[name] = xp.astype(to_compute(xp, g) * xp.astype(coef, compute_dtype(xp, g.dtype)), g.dtype)
    return xp.astype(total, xp.result_type(*(g.dtype for g in named.values())))
