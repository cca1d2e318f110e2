"""The float64 truth for someone else's attention in one call: ``reference(q, k, v, ...)`` from NumPy
arrays, anything ``numpy.asarray`` takes, or torch tensors on any device."""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

from ..backend import to_numpy
from ..ops import attention_forward, flash_attention_backward, flash_attention_forward

__all__ = ["Reference", "reference"]


class Reference(NamedTuple):
    """float64 NumPy arrays; the gradients are None without ``dout``/``dlse``."""

    o: np.ndarray
    lse: np.ndarray
    p: np.ndarray
    dq: Optional[np.ndarray]
    dk: Optional[np.ndarray]
    dv: Optional[np.ndarray]


def _f64(x):
    if x is None:
        return None
    a = to_numpy(x) if hasattr(x, "__array_namespace__") or hasattr(x, "detach") else np.asarray(x)
    return a if a.dtype == bool else np.asarray(a, dtype=np.float64)


def reference(q, k, v, *, dout=None, dlse=None, **attention_kwargs) -> Reference:
    """The float64 truth for ``q (..., H, N, D)``, ``k (..., G, M, D)``, ``v (..., G, M, Dv)``:
    ``o``, ``lse``, ``p`` and, given ``dout`` (and/or ``dlse``), ``dq, dk, dv``. Keyword arguments
    are ``attention_forward``'s (mask, causal, scale, softcap, alibi_slopes, window); no dropout."""
    if "dropout_p" in attention_kwargs:
        raise ValueError("reference has no dropout: its masks are random, not a reference")
    q64, k64, v64 = _f64(q), _f64(k), _f64(v)
    kwargs = {name: _f64(val) if hasattr(val, "shape") else val for name, val in attention_kwargs.items()}
    o, cache = flash_attention_forward(q64, k64, v64, workers=1, **kwargs)
    _, naive = attention_forward(q64, k64, v64, workers=1, **kwargs)
    dq = dk = dv = None
    if dout is not None or dlse is not None:
        g = np.zeros_like(o) if dout is None else _f64(dout)
        dq, dk, dv = flash_attention_backward(g, cache, dlse=None if dlse is None else _f64(dlse))
    return Reference(o=o, lse=cache.lse, p=np.asarray(naive.p), dq=dq, dk=dk, dv=dv)
