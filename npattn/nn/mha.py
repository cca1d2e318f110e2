"""Multi-head attention as a functional pair over a params dict, and the thin class that holds it.

Shape legend: ``query (B, N, E)``, ``key (B, M, kdim)``, ``value (B, M, vdim)``; ``H`` query heads,
``G`` key/value heads, head dim ``D = Dv = E / H``. Parameters (head-major columns: head ``h`` owns
columns ``h*D:(h+1)*D``): ``w_q (E, H*D)``, ``w_k (kdim, G*D)``, ``w_v (vdim, G*Dv)``,
``w_o (H*Dv, E)``, and biases ``b_* `` of the output widths.

Forward, in steps (derivations/06-multihead.md):
    1. q = query w_q + b_q,  k = key w_k + b_k,  v = value w_v + b_v     eq. (6.1)
    2. split heads: (B, N, H*D) -> (B, N, H, D) -> (B, H, N, D)          eq. (6.2)
    3. RoPE on q and k at positions offset .. offset+N-1 (rope=True)     eq. (9.5)
    4. with a KV cache: k, v = concat(past, new) along the key axis      derivations/12-kv-cache.md, eq. (12.1)
    5. o = attention(q, k, v, mask, causal)                              eqs. (3.1)-(3.6)
    6. merge heads: (B, H, N, Dv) -> (B, N, H, Dv) -> (B, N, H*Dv)       eq. (6.2)
    7. out = merged w_o + b_o                                            eq. (6.1)
Backward, the same steps in reverse (step 4 is inference only):
    7. dmerged, dw_o, db_o                                               eq. (1.3)-(1.5)
    6. do = dmerged split back into heads (a reshape is its own adjoint)  eq. (6.3)
    5. dq, dk, dv from the attention backward                            eqs. (3.7)-(3.11)
    3. dq, dk rotated back by -theta                                     eq. (9.6)
    2. dq, dk, dv merged back to (B, N, H*D)                             eq. (6.3)
    1. the three linear backwards; in self-attention query = key = value, so
       dquery = dx_q + dx_k + dx_v (the fan-out sum)                     eq. (6.4)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from ..backend import check_cache, check_float, check_int_arg, device, namespace
from ..ops import (
    attention_backward,
    attention_forward,
    flash_attention_backward,
    flash_attention_forward,
    linear_backward,
    linear_forward,
    rope_backward,
    rope_forward,
)
from .params import Initializer, Layer, check_choice, check_dtype_name, check_flag, check_real_arg, residual_std

__all__ = ["MHASpec", "MHACache", "mha_forward", "mha_backward", "mha_params", "MultiHeadAttention",
           "split_heads", "merge_heads", "make_mha_spec"]

ATTENTIONS = ("naive", "flash")


@dataclass(frozen=True)
class MHASpec:
    """The structure of a multi-head attention layer (what is not a weight)."""

    num_heads: int                  # H
    num_kv_heads: int               # G: H for multi-head, 1 < G < H grouped-query, 1 multi-query
    rope: bool = False              # rotate q and k heads (self-attention only)
    rope_base: float = 10000.0
    attention: str = "naive"        # "naive" (attention_forward) or "flash" (the tiled op)


class MHACache(NamedTuple):
    """The last forward's caches, nested as the steps were: three input projections, the two RoPE
    rotations, the attention op's cache, and the output projection."""

    lin_q: object
    lin_k: object
    lin_v: object
    rope_q: object                   # RopeCache or None
    rope_k: object
    attn: object                     # AttentionCache or FlashCache
    lin_o: object
    self_attention: bool
    has_past: bool                   # a KV-cache forward (past or not): inference only
    spec: MHASpec
    k: object                        # (B, G, M, D) keys after RoPE, past included (for a KV cache)
    v: object                        # (B, G, M, Dv); both None when recomputed (flash, no KV cache)
    recompute: object = None         # flash: (params, query, key, value, offset) to rebuild q, k, v


def split_heads(xp, x, heads: int):
    """``(B, N, heads*D) -> (B, heads, N, D)``: eq. (6.2). Returned as a contiguous copy, so the
    attention ops' per-head reshapes are free and the projection itself can be freed."""
    b, n, width = x.shape
    heads_view = xp.permute_dims(xp.reshape(x, (b, n, heads, width // heads)), (0, 2, 1, 3))
    return xp.reshape(heads_view, (b, heads, n, width // heads), copy=True)


def merge_heads(xp, x):
    """``(B, heads, N, D) -> (B, N, heads*D)``, the inverse of ``split_heads``: eq. (6.2)."""
    b, heads, n, d = x.shape
    return xp.reshape(xp.permute_dims(x, (0, 2, 1, 3)), (b, n, heads * d))


def combine_masks(xp, mask, key_mask, like):
    """One attention mask from ``mask`` (broadcastable to ``(B, H, N, M)``, bool or float) and a
    key-padding ``key_mask (B, M)`` (bool, True = a real token). A bool pair combines with AND; a
    float mask gets ``-inf`` where the key is padding."""
    if key_mask is None:
        return mask
    km = key_mask[:, None, None, :]                                          # (B, 1, 1, M)
    if mask is None:
        return km
    if xp.isdtype(mask.dtype, "bool"):
        return xp.logical_and(mask, km)
    neg_inf = xp.asarray(-xp.inf, dtype=mask.dtype, device=device(like))
    return xp.where(km, mask, neg_inf)


def _check_inputs(xp, params, query, key, value, key_mask, spec):
    dtype = params["w_q"].dtype
    for name, a in (("query", query), ("key", key), ("value", value)):
        if a is None:
            continue
        check_float(xp, name, a)
        if a.ndim != 3:
            raise ValueError(f"{name} must be 3-D (B, length, features), got shape {tuple(a.shape)}")
        if a.dtype != dtype:
            raise TypeError(f"{name} must have the layer's dtype {dtype}, got {a.dtype}")
    for name, a, w in (("query", query, "w_q"), ("key", key, "w_k"), ("value", value, "w_v")):
        if a is not None and a.shape[-1] != params[w].shape[0]:
            raise ValueError(f"{name}'s last axis must be {params[w].shape[0]} (the width {w} takes), "
                             f"got shape {tuple(a.shape)}")
    if (key is None) != (value is None):
        raise ValueError("key and value must be given together (both None means self-attention)")
    if key is not None:
        if key.shape[:2] != value.shape[:2] or key.shape[0] != query.shape[0]:
            raise ValueError(f"key and value must share (B, M) with query's B: query {tuple(query.shape)}, "
                             f"key {tuple(key.shape)}, value {tuple(value.shape)}")
        if spec.rope:
            raise ValueError("rope=True rotates q and k by their positions in one sequence: it is for "
                             "self-attention only, got a separate key (cross-attention)")
    if key_mask is not None:
        m = query.shape[1] if key is None else key.shape[1]
        if not xp.isdtype(key_mask.dtype, "bool"):
            raise TypeError(f"key_mask must be bool (True = a real token), got dtype {key_mask.dtype}")
        if tuple(key_mask.shape) != (query.shape[0], m):
            raise ValueError(f"key_mask must have shape (B, M) = {(query.shape[0], m)}, got {tuple(key_mask.shape)}")


def mha_forward(params, spec: MHASpec, query, key=None, value=None, *, mask=None, key_mask=None,
                causal=False, past=None, offset: int = 0, kv_cache: bool = False):
    """Multi-head attention: returns ``(out (B, N, E), MHACache)``.

    ``key=None`` (and ``value=None``) is self-attention. ``past`` is ``(k, v)`` of earlier tokens,
    ``(B, G, M_past, D)`` after RoPE, for KV-cache decoding; ``offset`` the position of the first
    new token (RoPE); ``kv_cache=True`` marks an inference forward whose ``cache.k``, ``cache.v``
    (past included) go into a KV cache, even when there is no past yet. Derivation: derivations/06-multihead.md, eqs. (6.1)-(6.2).
    """
    xp = namespace(query=query, key=key, value=value, mask=mask, key_mask=key_mask)
    _check_inputs(xp, params, query, key, value, key_mask, spec)
    self_attention = key is None
    key = query if self_attention else key
    value = query if self_attention else value
    q, k, v, lin_q, lin_k, lin_v, rope_q, rope_k = _heads(xp, params, spec, query, key, value, offset)   # 1.-3.
    # 4. KV cache: the keys and values of earlier tokens come first
    if past is not None:
        k, v = xp.concat((past[0], k), axis=-2), xp.concat((past[1], v), axis=-2)   # (B, G, M_past+M, D)
    # 5. attention
    full_mask = combine_masks(xp, mask, key_mask, like=query)
    if spec.attention == "flash":
        o, attn = flash_attention_forward(q, k, v, mask=full_mask, causal=causal)   # (B, H, N, Dv)
    else:
        o, attn = attention_forward(q, k, v, mask=full_mask, causal=causal)
    # 6.-7. merge heads, output projection: eqs. (6.2), (6.1)
    out, lin_o = linear_forward(merge_heads(xp, o), params["w_o"], params.get("b_o"))   # (B, N, E)
    recompute = None
    inference = kv_cache or past is not None
    if spec.attention == "flash" and not inference:
        # The tiled op is about memory, so its layer keeps what the backward can rebuild cheaply:
        # the merged heads are the flash cache's o merged again, and q, k, v are recomputed from
        # the inputs by steps 1-3 (activation recomputation, as the tiled op recomputes p).
        lin_o = lin_o._replace(x=None)
        attn = attn._replace(q=None, k=None, v=None)
        recompute = (dict(params), query, key, value, offset)
        k = v = None
    cache = MHACache(lin_q=lin_q, lin_k=lin_k, lin_v=lin_v, rope_q=rope_q, rope_k=rope_k, attn=attn,
                     lin_o=lin_o, self_attention=self_attention, has_past=inference, spec=spec, k=k, v=v,
                     recompute=recompute)
    return out, cache


def _heads(xp, params, spec: MHASpec, query, key, value, offset: int):
    """Steps 1-3 of the forward: the projections, split into heads, RoPE'd. Returns
    ``(q, k, v, lin_q, lin_k, lin_v, rope_q, rope_k)``."""
    H, G = spec.num_heads, spec.num_kv_heads
    # 1. the three input projections: eq. (6.1)
    q, lin_q = linear_forward(query, params["w_q"], params.get("b_q"))       # (B, N, H*D)
    k, lin_k = linear_forward(key, params["w_k"], params.get("b_k"))         # (B, M, G*D)
    v, lin_v = linear_forward(value, params["w_v"], params.get("b_v"))       # (B, M, G*Dv)
    # 2. split heads: eq. (6.2)
    q, k, v = split_heads(xp, q, H), split_heads(xp, k, G), split_heads(xp, v, G)   # (B, H|G, N|M, D)
    # 3. RoPE on the new tokens' q and k, at their absolute positions: eq. (9.5)
    rope_q = rope_k = None
    if spec.rope:
        positions = xp.arange(offset, offset + query.shape[1], device=device(query))
        q, rope_q = rope_forward(q, positions=positions, base=spec.rope_base)
        k, rope_k = rope_forward(k, positions=positions, base=spec.rope_base)
    return q, k, v, lin_q, lin_k, lin_v, rope_q, rope_k


def mha_backward(dout, cache: MHACache):
    """Gradients of ``mha_forward``: ``((dquery, dkey, dvalue), grads)``.

    In self-attention ``dquery`` is the fan-out sum of the three projections' input gradients and
    ``dkey``, ``dvalue`` are None. ``grads`` has the keys of the params dict.
    Derivation: derivations/06-multihead.md, eqs. (6.3)-(6.4).
    """
    check_cache(cache, MHACache, "mha_forward")
    if cache.has_past:
        raise RuntimeError("a forward with a KV cache is inference only: it keeps no graph for backward")
    xp = namespace(dout=dout)
    spec = cache.spec
    grads = {}
    # 7. out = merged w_o + b_o
    lin_o = cache.lin_o if cache.lin_o.x is not None else cache.lin_o._replace(x=merge_heads(xp, cache.attn.o))
    dmerged, grads["w_o"], db_o = linear_backward(dout, lin_o)               # (B, N, H*Dv)
    del lin_o
    # 6. merge was a reshape: split the gradient the same way (eq. (6.3))
    do = split_heads(xp, dmerged, spec.num_heads)                            # (B, H, N, Dv)
    del dmerged
    # 5. attention
    if spec.attention == "flash":
        attn = cache.attn
        if cache.recompute is not None:                # steps 1-3 again: q, k, v were not kept
            q, k, v = _heads(xp, *cache.recompute[:1], spec, *cache.recompute[1:])[:3]
            attn = attn._replace(q=q, k=k, v=v)
            del q, k, v
        dq, dk, dv = flash_attention_backward(do, attn)
        del attn
    else:
        dq, dk, dv = attention_backward(do, cache.attn)
    del do                                            # no longer needed: keep the peak low
    # 3. RoPE rotated q and k by theta: rotate their gradients by -theta (eq. (9.6))
    if spec.rope:
        dq, dk = rope_backward(dq, cache.rope_q), rope_backward(dk, cache.rope_k)
    # 2.-1. merge each gradient back to (B, N|M, H*D) (eq. (6.3)) and run its projection's
    # backward, one projection at a time, so that only one merged copy is alive at once
    pending = {"q": dq, "k": dk, "v": dv}
    del dq, dk, dv
    dx = {}
    for name in ("q", "k", "v"):
        merged = merge_heads(xp, pending.pop(name))                          # (B, N|M, H*D|G*D)
        dx[name], grads[f"w_{name}"], db = linear_backward(merged, getattr(cache, f"lin_{name}"))
        del merged
        if db is not None:
            grads[f"b_{name}"] = db
    if db_o is not None:
        grads["b_o"] = db_o
    if cache.self_attention:
        dx_q = dx.pop("q")
        dx_q += dx.pop("k")                           # eq. (6.4): the fan-out sum, in place (our own array)
        dx_q += dx.pop("v")
        return (dx_q, None, None), grads
    return (dx["q"], dx["k"], dx["v"]), grads


def mha_params(init: Initializer, embed_dim, num_heads, num_kv_heads, kdim, vdim, bias, num_layers=1) -> dict:
    """Freshly initialized MHA weights (module docstring of npattn/nn/params.py), in the documented key order (docs/conventions.md)."""
    d = embed_dim // num_heads
    shapes = dict(w_q=(embed_dim, num_heads * d), w_k=(kdim, num_kv_heads * d),
                  w_v=(vdim, num_kv_heads * d), w_o=(num_heads * d, embed_dim))
    params = {}
    for name in ("q", "k", "v", "o"):
        w = shapes[f"w_{name}"]
        params[f"w_{name}"] = init.normal(w, residual_std(num_layers) if name == "o" else 0.02)
        if bias:
            params[f"b_{name}"] = init.zeros((w[1],))
    return params


def check_heads(embed_dim, num_heads, num_kv_heads):
    """``(E, H, G)`` as Python ints after checking each is an int >= 1, ``E % H == 0`` and ``H % G == 0``."""
    embed_dim = check_int_arg("embed_dim", embed_dim, minimum=1)
    num_heads = check_int_arg("num_heads", num_heads, minimum=1)
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim must be divisible by num_heads: embed_dim={embed_dim}, num_heads={num_heads}")
    G = check_int_arg("num_kv_heads", num_kv_heads, minimum=1, allow_none=True)
    G = num_heads if G is None else G
    if num_heads % G:
        raise ValueError(f"num_kv_heads must divide num_heads={num_heads} (H % G == 0), got {num_kv_heads!r}")
    return embed_dim, num_heads, G


def make_mha_spec(embed_dim, num_heads, num_kv_heads, rope, rope_base, attention):
    """Validate a layer's structure and return ``(MHASpec, E)``: the heads (``check_heads``), ``rope``
    a bool needing an even head dim, ``rope_base`` a finite real > 0 (checked even without RoPE: a
    constructor checks every argument), ``attention`` one of ``ATTENTIONS``."""
    e, h, g = check_heads(embed_dim, num_heads, num_kv_heads)
    rope = check_flag("rope", rope)
    rope_base = check_real_arg("rope_base", rope_base, strict=True)
    if rope and (e // h) % 2:
        raise ValueError(f"rope=True needs an even head dim, got embed_dim // num_heads = {e // h}")
    spec = MHASpec(num_heads=h, num_kv_heads=g, rope=rope, rope_base=rope_base,
                   attention=check_attention_name(attention))
    return spec, e


def check_attention_name(attention):
    return check_choice("attention", attention, ATTENTIONS)


class MultiHeadAttention(Layer):
    """Multi-head (grouped-query, multi-query) attention with hand-derived gradients.

    Holds ``params`` (``w_q b_q w_k b_k w_v b_v w_o b_o``), the last forward's cache, ``grads`` and
    ``last_weights`` (the attention weights ``(B, H, N, M)``; None with ``attention="flash"``).
    Inputs are batch-first ``(B, N, E)``. Derivation: derivations/06-multihead.md.
    """

    def __init__(self, embed_dim, num_heads, *, num_kv_heads=None, kdim=None, vdim=None, bias=True,
                 rope=False, rope_base=10000.0, attention="naive", dtype="float64", seed=None):
        self.spec, self.embed_dim = make_mha_spec(embed_dim, num_heads, num_kv_heads, rope, rope_base, attention)
        kdim = check_int_arg("kdim", kdim, minimum=1, allow_none=True)                 # None: embed_dim
        vdim = check_int_arg("vdim", vdim, minimum=1, allow_none=True)
        bias = check_flag("bias", bias)
        init = Initializer(seed, check_dtype_name(dtype))
        e, spec = self.embed_dim, self.spec
        super().__init__(mha_params(init, e, spec.num_heads, spec.num_kv_heads, e if kdim is None else kdim,
                                    e if vdim is None else vdim, bias))
        self.last_weights = None

    def forward(self, query, key=None, value=None, *, mask=None, key_mask=None, causal=False):
        """``(B, N, E)`` attention output; ``key=None`` is self-attention. Masks as in docs/conventions.md: ``mask``
        broadcasts to ``(B, H, N, M)``; ``key_mask (B, M)`` bool, True = a real token."""
        out, self._cache = mha_forward(self.params, self.spec, query, key, value, mask=mask,
                                       key_mask=key_mask, causal=causal)
        self.last_weights = getattr(self._cache.attn, "p", None) if self.spec.attention == "naive" else None
        return out

    def backward(self, dout):
        """``(dquery, dkey, dvalue)`` (self-attention: ``(dquery, None, None)``); fills ``grads``."""
        dinputs, grads = mha_backward(dout, self._last_cache())
        self.grads = self._in_params_order(grads)
        return dinputs
