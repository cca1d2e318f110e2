"""Parameters as flat dicts, their initialization, and the small base the layer classes share.

A model's parameters are one flat dict, name -> array, with dotted names for nested layers
(``blocks.0.attn.w_q``). The functional layer code (``mha_forward(params, ...)``) reads a layer's
own entries through ``sub(params, "blocks.0.attn.")`` and returns gradients under the same names, so
the classes only hold state.

Initialization (GPT-2's scheme, from one ``numpy.random.Generator(seed)``, drawn in the order the
parameters are listed): every projection and embedding weight ``N(0, 0.02^2)``; the two projections
that write into the residual stream (``attn.w_o``, ``ffn.w_2``) ``N(0, (0.02 / sqrt(2 L))^2)`` in a
GPT of ``L`` layers (``L = 1`` for a standalone layer); biases 0; norm ``gamma`` 1 and ``beta`` 0.
``seed=None`` means seed 0, so an unseeded layer is reproducible too.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
from array_api_compat import is_array_api_obj

from .. import backend

__all__ = ["Params", "Initializer", "sub", "prefixed", "check_dtype_name", "check_real_arg", "check_flag",
           "check_choice", "Layer", "INIT_STD"]

INIT_STD = 0.02                               # GPT-2's initializer_range


class Params(dict):
    """A flat dict of weights whose assignments keep each weight's shape and dtype.

    ``params[name] = array`` replaces that weight; a different shape is a ``ValueError``, a different
    dtype a ``TypeError``, an unknown name a ``KeyError``, and on any error the weight is left as it was.
    """

    def __setitem__(self, name, value):
        self._check(name, value)
        dict.__setitem__(self, name, value)

    def update(self, other=(), **more):
        """Replace several weights at once: every one is checked first, so a bad entry leaves all
        of them as they were."""
        new = dict(other, **more)
        for name, value in new.items():
            self._check(name, value)
        for name, value in new.items():
            dict.__setitem__(self, name, value)

    def _check(self, name, value):
        if name not in self:
            raise KeyError(f"unknown parameter {name!r}; the parameters are {sorted(self)}")
        if not is_array_api_obj(value):
            raise TypeError(f"params[{name!r}] must be an array, got {type(value).__name__}")
        old = dict.__getitem__(self, name)
        if tuple(value.shape) != tuple(old.shape):
            raise ValueError(f"params[{name!r}] must keep its shape {tuple(old.shape)}, got {tuple(value.shape)}")
        if _dtype_name(value.dtype) != _dtype_name(old.dtype):   # by name: a weight may move library
            raise TypeError(f"params[{name!r}] must keep its dtype {old.dtype}, got {value.dtype}")


def _dtype_name(dtype) -> str:
    """``float64`` for NumPy's, CuPy's, torch's and array_api_strict's float64 alike."""
    return str(dtype).rsplit(".", 1)[-1]


class Initializer:
    """Draws the weights of a model in a fixed order from one seeded NumPy generator."""

    def __init__(self, seed, dtype: str):
        seed = backend.check_int_arg("seed", seed, minimum=0, maximum=None, allow_none=True)   # any size
        self.rng = np.random.default_rng(0 if seed is None else seed)
        self.dtype = np.dtype(dtype)

    def normal(self, shape, std: float = INIT_STD):
        return (std * self.rng.standard_normal(shape)).astype(self.dtype)

    def zeros(self, shape):
        return np.zeros(shape, dtype=self.dtype)

    def ones(self, shape):
        return np.ones(shape, dtype=self.dtype)


def residual_std(num_layers: int) -> float:
    """The std of the projections that add into the residual stream: 0.02 / sqrt(2 L)."""
    return INIT_STD / math.sqrt(2 * num_layers)


def sub(params, prefix: str) -> dict:
    """The entries of ``params`` under ``prefix``, with the prefix removed (a plain dict, no copies)."""
    return {name[len(prefix):]: a for name, a in params.items() if name.startswith(prefix)}


def prefixed(grads: dict, prefix: str) -> dict:
    """``grads`` with ``prefix`` put in front of every name."""
    return {prefix + name: grad for name, grad in grads.items()}


def check_dtype_name(dtype) -> str:
    """Layers hold float64 (default) or float32 weights."""
    name = np.dtype(dtype).name if isinstance(dtype, (np.dtype, type)) else dtype
    if not isinstance(name, str) or name not in ("float64", "float32"):
        raise ValueError(f"dtype must be 'float64' or 'float32', got {dtype!r}")
    return name


def check_real_arg(name: str, value, *, minimum: float = 0.0, strict: bool = False) -> float:
    """A finite real argument (``norm_eps``, ``rope_base``, a learning rate) as a Python float: not a
    real number (a string, a bool) is a ``TypeError``; NaN, an infinity or a value below ``minimum``
    (or equal to it, when ``strict``) a ``ValueError``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    if not math.isfinite(value) or value < minimum or (strict and value == minimum):
        raise ValueError(f"{name} must be a finite real number {'>' if strict else '>='} {minimum:g}, got {value!r}")
    return float(value)


def check_flag(name: str, value) -> bool:
    """A yes/no argument (``bias``, ``rope``): a bool (NumPy's included), anything else a ``TypeError``."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return bool(value)


def check_choice(name: str, value, choices: tuple) -> str:
    """One of a few names (``norm``, ``activation``, ``attention``)."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


class Layer:
    """What every layer class holds: ``params``, ``grads`` and the last forward's cache.

    ``backward`` uses the cache of the last ``forward`` only; calling it before any forward is a
    ``RuntimeError``.
    """

    params: Params
    grads: dict

    def __init__(self, params: dict):
        self.params = Params(params)
        self.grads = {}
        self._cache = None

    def to(self, library, device=None):
        """Move every weight to ``library`` (``"numpy"``, ``"cupy"``, ``"torch"``,
        ``"array_api_strict"`` or the module) on ``device`` (e.g. ``"cuda"`` for torch; None: the
        library's default), in place, and return the layer. Weights keep their dtype; ``grads`` and
        the last cache are dropped (they lived where the weights were). Inputs must then come from
        the same library and device: npattn reads the library from the arrays, never moves them
        inside a forward or backward."""
        xp = backend.library(library)
        for name, a in self.params.items():
            dict.__setitem__(self.params, name, backend.move(a, xp, device))
        self.grads, self._cache = {}, None
        return self

    def _last_cache(self):
        if self._cache is None:
            raise RuntimeError(f"{type(self).__name__}.backward needs a forward first")
        return self._cache

    def _in_params_order(self, grads: dict) -> dict:
        """``grads`` keyed and ordered as ``params`` (the backward produces them in reverse)."""
        return {name: grads[name] for name in self.params}

    def num_params(self) -> int:
        return sum(math.prod(a.shape) for a in self.params.values())
