"""Finite-difference gradient checking for any forward/backward pair.

The pair protocol is all this module knows: ``forward(*inputs, **kwargs) -> (out, cache)`` and
``backward(dout, cache) -> grads`` in the order of ``inputs``. A forward may return a tuple of
outputs (e.g. ``(o, lse)``); then ``dout`` is a tuple too.

The loss is ``L = sum_k sum(out_k * dout_k)`` (derivations/00-notation.md, eq. (0.1)) with a
random ``dout`` (never all ones: the gradient of ``sum(softmax(x))`` is identically zero, which
would make the check empty). Its derivative is estimated by central differences in float64, ``(L(x + eps e) - L(x - eps e)) / (2 eps)``, whose
truncation error is O(eps^2) (eq. (0.2)).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from array_api_compat import is_array_api_obj

from .backend import device, from_numpy, namespace, to_numpy

__all__ = ["gradcheck", "GradcheckReport", "GradcheckRow"]


class GradcheckRow(NamedTuple):
    """One input's verdict. ``max_rel_err`` is ``max_abs_err / max|numeric|`` (the error relative
    to the size of the gradient, so entries that are near zero do not blow it up)."""

    name: str
    shape: tuple
    max_abs_err: float
    max_rel_err: float
    ok: bool


@dataclass(frozen=True)
class GradcheckReport:
    """The result of ``gradcheck``: ``.ok`` is True iff every row is ok."""

    rows: tuple
    mode: str

    @property
    def ok(self) -> bool:
        return all(row.ok for row in self.rows)

    def __str__(self) -> str:
        lines = [f"{'input':<8} {'shape':<20} {'max abs err':>12} {'max rel err':>12}  ok"]
        for r in self.rows:
            lines.append(f"{r.name:<8} {str(r.shape):<20} {r.max_abs_err:>12.3e} {r.max_rel_err:>12.3e}  "
                         f"{'yes' if r.ok else 'NO'}")
        return "\n".join(lines)


def _is_float_array(xp, x) -> bool:
    return is_array_api_obj(x) and xp.isdtype(x.dtype, "real floating")


def _scalar(x) -> float:
    """A 0-d result as a Python float, by an explicit copy to the host: finite differences need the
    loss as a number, so the checker reads one scalar per evaluation (the ops never do)."""
    return float(to_numpy(x))


def _as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def gradcheck(forward, backward, inputs, *, kwargs=None, eps=1e-6, rtol=1e-6, atol=1e-9,
              mode="full", seed=0, directions=8):
    """Compare ``backward`` with central differences of ``sum(forward(*inputs) * dout)``.

    Parameters
    ----------
    forward, backward : a functional pair (docs/conventions.md).
    inputs : dict name -> array, or a sequence (named ``arg0, arg1, ...``)
        The forward's array arguments, in the forward's positional order. A None entry (e.g. no
        bias) and integer or bool arrays (ids, class targets) are passed through unchanged and get
        no row.
    kwargs : dict, optional
        Passed to ``forward`` on every call. Dropout must get an int seed, not a Generator, so
        that every call draws the same mask.
    eps : float
        Finite-difference step, applied to float64 copies of the inputs.
    rtol, atol : float
        A row is ok when ``max|analytic - numeric| <= atol + rtol * max|numeric|``.
    mode : "full" or "directional"
        "full" perturbs every element; "directional" checks ``<grad, u>`` along ``directions``
        random unit directions ``u`` per input, for inputs too large for the full check.
    seed : int
        Seeds ``dout`` and the directions.

    Returns
    -------
    GradcheckReport with ``.ok`` and ``.rows`` (name, shape, max_abs_err, max_rel_err, ok).

    The analytic backward runs on the inputs as given (their dtype); the numeric derivative always
    runs on float64 copies (of the inputs and of any float array in ``kwargs``), so a float32 pair
    is compared against its float64 ground truth.
    """
    if mode not in ("full", "directional"):
        raise ValueError(f"mode must be 'full' or 'directional', got {mode!r}")
    for name, value, low in (("eps", eps, "> 0"), ("rtol", rtol, ">= 0"), ("atol", atol, ">= 0")):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise TypeError(f"{name} must be a finite real number {low}, got {value!r}")
        if value < 0 or (name == "eps" and value == 0):
            raise ValueError(f"{name} must be {low}, got {value}")
    for name, value, low in (("seed", seed, 0), ("directions", directions, 1)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {value!r}")
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    kwargs = dict(kwargs or {})
    if kwargs.get("dropout_p", 0) and isinstance(kwargs.get("rng"), np.random.Generator):
        raise ValueError("rng is a numpy.random.Generator, which draws a new dropout mask on every call, so "
                         "the finite differences would compare different functions: pass an int seed")
    if isinstance(inputs, dict):
        names, arrays = list(inputs), list(inputs.values())
    else:
        arrays = list(inputs)
        names = [f"arg{i}" for i in range(len(arrays))]
    if not any(a is not None for a in arrays):
        raise ValueError(f"inputs must hold at least one array, got {inputs!r}")
    xp = namespace(**{name: a for name, a in zip(names, arrays)})
    if not any(_is_float_array(xp, a) for a in arrays):
        got = ", ".join(f"{n} {a.dtype}" for n, a in zip(names, arrays) if a is not None)
        raise ValueError(f"inputs must hold at least one floating array to check (integer and bool inputs get "
                         f"no row, so the report would be empty), got {got}")
    rng = np.random.default_rng(seed)
    like = next(a for a in arrays if a is not None)

    # analytic: one forward and one backward with a random dout per output
    out, cache = forward(*arrays, **kwargs)
    outs = _as_tuple(out)
    douts = tuple(xp.astype(from_numpy(xp, rng.standard_normal(tuple(o.shape)), like), o.dtype) for o in outs)
    grads = _as_tuple(backward(douts if isinstance(out, tuple) else douts[0], cache))
    if len(grads) < len(arrays):
        raise ValueError(f"backward returned {len(grads)} gradients for {len(arrays)} inputs")

    # numeric: the same loss in float64 (float arrays among the kwargs, e.g. an additive mask, too)
    x64 = [xp.astype(a, xp.float64) if _is_float_array(xp, a) else a for a in arrays]   # ids stay as they are
    d64 = [xp.astype(d, xp.float64) for d in douts]
    kwargs64 = {key: xp.astype(val, xp.float64) if _is_float_array(xp, val) else val
                for key, val in kwargs.items()}

    def loss(xs) -> float:
        res = _as_tuple(forward(*xs, **kwargs64)[0])
        return sum(_scalar(xp.sum(xp.astype(o, xp.float64) * d)) for o, d in zip(res, d64))

    def derivative(i, direction) -> float:
        plus, minus = list(x64), list(x64)
        plus[i] = x64[i] + eps * direction
        minus[i] = x64[i] - eps * direction
        return (loss(plus) - loss(minus)) / (2 * eps)

    rows = []
    for i, (name, a, grad) in enumerate(zip(names, arrays, grads)):
        if a is None or not _is_float_array(xp, a):
            continue                                  # no bias, or integer/bool data (ids, targets): no row
        shape = tuple(a.shape)
        if grad is None or tuple(grad.shape) != shape:
            rows.append(GradcheckRow(name, shape, float("inf"), float("inf"), False))
            continue
        g64 = xp.reshape(xp.astype(grad, xp.float64), (-1,))
        size = g64.shape[0]
        index = xp.arange(size, device=device(like))
        if mode == "full":
            numeric = [derivative(i, xp.reshape(xp.astype(index == t, xp.float64), shape)) for t in range(size)]
            analytic = g64                                                  # compared on its own device
        else:
            numeric, analytic = [], []
            for _ in range(directions):
                u = rng.standard_normal(size)
                u /= np.linalg.norm(u)
                u_x = from_numpy(xp, u, like)
                numeric.append(derivative(i, xp.reshape(u_x, shape)))
                analytic.append(_scalar(xp.sum(g64 * u_x)))
            analytic = from_numpy(xp, np.asarray(analytic), like)
        numeric_x = from_numpy(xp, np.asarray(numeric, dtype=np.float64), like)
        scale = _scalar(xp.max(xp.abs(numeric_x))) if size else 0.0
        max_abs = _scalar(xp.max(xp.abs(analytic - numeric_x))) if size else 0.0
        max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
        ok = bool(max_abs <= atol + rtol * scale)  # False for NaN
        rows.append(GradcheckRow(name, shape, max_abs, max_rel, ok))
    return GradcheckReport(rows=tuple(rows), mode=mode)
