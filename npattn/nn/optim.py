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
    total = sqrt(sum of every gradient's squared entries)
    every gradient *= min(1, max_norm / (total + 1e-6))
"""

from __future__ import annotations

import math
import numbers

from ..backend import namespace

__all__ = ["SGD", "AdamW", "clip_grad_norm"]


def _positive(name, value, allow_zero=True):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite real number {'>=' if allow_zero else '>'} 0, got {value!r}")
    return float(value)


def _check_grads(params, grads):
    if not isinstance(grads, dict):
        raise TypeError(f"grads must be a dict name -> array, got {type(grads).__name__}")
    unknown = sorted(set(grads) - set(params))
    if unknown:
        raise KeyError(f"grads has names that are not parameters: {unknown}")
    for name, g in grads.items():
        if g is not None and tuple(g.shape) != tuple(params[name].shape):
            raise ValueError(f"grads[{name!r}] has shape {tuple(g.shape)}, its parameter {tuple(params[name].shape)}")


class SGD:
    """Stochastic gradient descent with optional momentum and (coupled) weight decay, as torch."""

    def __init__(self, params, *, lr, momentum=0.0, weight_decay=0.0):
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
    clipping as a 0-d array (of the gradients' library and dtype)."""
    max_norm = _positive("max_norm", max_norm)
    arrays = [g for g in grads.values() if g is not None]
    if not arrays:
        raise ValueError("grads has no gradient to clip")
    xp = namespace(**{f"grads[{n!r}]": g for n, g in grads.items() if g is not None})
    total = xp.sqrt(sum(xp.sum(g * g) for g in arrays))
    coef = xp.minimum(max_norm / (total + 1e-6), xp.ones_like(total))
    for name, g in grads.items():
        if g is not None:
            grads[name] = g * coef
    return total
