"""The float64 truth for someone else's attention in one call: ``reference(q, k, v, ...)`` from NumPy
arrays, anything ``numpy.asarray`` takes, or torch tensors on any device."""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

from ..backend import to_numpy
from ..ops import attention_forward, flash_attention_backward, flash_attention_forward

__all__ = ["Reference", "reference"]


class Reference(NamedTuple):
    """float64 NumPy arrays; the gradients are None without ``dout``/``dlse``, ``dsinks`` None
    without ``sinks``. ``p`` is a tuple of the sequences' weights for packed inputs."""

    o: np.ndarray
    lse: np.ndarray
    p: object
    dq: Optional[np.ndarray]
    dk: Optional[np.ndarray]
    dv: Optional[np.ndarray]
    dsinks: Optional[np.ndarray] = None


def _f64(x):
    """A host NumPy copy: floating data as float64, bool and integer arrays (masks, cu_seqlens) as they are."""
    if x is None:
        return None
    if hasattr(x, "detach") and x.is_floating_point():       # torch, any float dtype (bfloat16 has no NumPy twin)
        x = x.detach().double()
    a = to_numpy(x) if hasattr(x, "__array_namespace__") or hasattr(x, "detach") else np.asarray(x)
    return a if a.dtype == bool or np.issubdtype(a.dtype, np.integer) else np.asarray(a, dtype=np.float64)


def truth(q, k, v, *, dout=None, dlse=None, **attention_kwargs) -> dict:
    """The float64 outputs and gradients as a dict ``o, lse`` (and ``dq, dk, dv``, ``dsinks`` with
    sinks, given ``dout``/``dlse``): npattn's tiled op, without the naive op's ``p``. Inputs are
    already float64 NumPy (``reference`` converts)."""
    o, cache = flash_attention_forward(q, k, v, workers=1, **attention_kwargs)
    out = dict(o=o, lse=cache.lse)
    if dout is not None or dlse is not None:
        g = np.zeros_like(o) if dout is None else dout
        grads = flash_attention_backward(g, cache, dlse=dlse)
        out.update(zip(("dq", "dk", "dv"), grads[:3]))
        if attention_kwargs.get("sinks") is not None:
            out["dsinks"] = grads[-1]
    return out


def reference(q, k, v, *, dout=None, dlse=None, **attention_kwargs) -> Reference:
    """The float64 truth for ``q (..., H, N, D)``, ``k (..., G, M, D)``, ``v (..., G, M, Dv)``:
    ``o``, ``lse``, ``p`` and, given ``dout`` (and/or ``dlse``), ``dq, dk, dv`` (and ``dsinks`` when
    ``sinks`` are given). Keyword arguments are ``attention_forward``'s (mask, causal, scale,
    softcap, alibi_slopes, window, sinks, cu_seqlens_q, cu_seqlens_k); no dropout."""
    if "dropout_p" in attention_kwargs:
        raise ValueError("reference has no dropout: its masks are random, not a reference")
    q64, k64, v64 = _f64(q), _f64(k), _f64(v)
    kwargs = {name: _f64(val) if hasattr(val, "shape") else val for name, val in attention_kwargs.items()}
    mask = kwargs.get("mask")
    if mask is not None and mask.dtype != bool and not np.issubdtype(mask.dtype, np.floating):
        raise TypeError(f"mask must be bool (True = may attend) or floating (added to the scores), got dtype "
                        f"{mask.dtype}: an integer 0/1 mask is ambiguous, pass mask.astype(bool)")
    found = truth(q64, k64, v64, dout=_f64(dout), dlse=_f64(dlse), **kwargs)
    _, naive = attention_forward(q64, k64, v64, workers=1, **kwargs)
    p = naive.p if isinstance(naive.p, tuple) else np.asarray(naive.p)
    return Reference(o=found["o"], lse=found["lse"], p=p, dq=found.get("dq"), dk=found.get("dk"),
                     dv=found.get("dv"), dsinks=found.get("dsinks"))
