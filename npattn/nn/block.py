"""The pre-norm Transformer block and its feed-forward network, as functional pairs over a params
dict, and the thin class that holds them.

Shape legend: ``x, h, y (B, N, E)``; FFN hidden ``(B, N, F)`` with ``F = ffn_dim``.
Keys: ``norm1.gamma norm1.beta attn.<MHA keys> norm2.gamma norm2.beta ffn.w_1 ffn.b_1 ffn.w_2 ffn.b_2
[ffn.w_3 ffn.b_3]`` (no ``*.beta`` with RMSNorm; ``bias=False`` drops the projections' ``b_*``).

Forward, in steps (derivations/11-transformer-block.md):
    1. a = norm1(x)                                   eqs. (7.1)-(7.2) or (7.5)
    2. h = x + attn(a)                                eq. (11.1)
    3. xi = norm2(h)                                   (the chapter's ξ; b is kept for the biases)
    4. f = ffn(xi) = act(xi w_1 + b_1) w_2 + b_2      eq. (11.2)
       swiglu: (silu(xi w_1 + b_1) * (xi w_3 + b_3)) w_2 + b_2     eq. (11.3)
    5. y = h + f                                      eq. (11.1)
Backward, the same steps in reverse; each residual ``+`` copies its gradient to both inputs, and the
stream's two uses of x (and of h) add up:
    5. dh = dy,  df = dy                              eq. (11.4)
    4. db from the FFN backward                       eq. (11.5)
    3. dh = dy + norm2_backward(db)                   eq. (11.4)
    2. da from the attention backward, dx = dh
    1. dx = dh + norm1_backward(da)                   eq. (11.4)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from ..ops import (
    gelu_backward,
    gelu_forward,
    layernorm_backward,
    layernorm_forward,
    linear_backward,
    linear_forward,
    relu_backward,
    relu_forward,
    rmsnorm_backward,
    rmsnorm_forward,
    silu_backward,
    silu_forward,
)
from ..backend import check_cache, check_int_arg
from .mha import MHASpec, make_mha_spec, mha_backward, mha_forward, mha_params
from .params import Initializer, Layer, check_choice, check_dtype_name, check_flag, check_real_arg, prefixed, residual_std, sub

__all__ = ["BlockSpec", "BlockCache", "block_forward", "block_backward", "block_params",
           "ffn_forward", "ffn_backward", "norm_forward", "norm_backward", "TransformerBlock"]

NORMS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("gelu_tanh", "gelu", "relu", "swiglu")


@dataclass(frozen=True)
class BlockSpec:
    """The structure of a block (what is not a weight)."""

    attn: MHASpec
    norm: str = "layernorm"         # "layernorm" or "rmsnorm"
    activation: str = "gelu_tanh"   # "gelu_tanh" (GPT-2), "gelu", "relu" or "swiglu" (Llama)
    norm_eps: float = 1e-5


class BlockCache(NamedTuple):
    norm1: object
    attn: object                     # MHACache
    norm2: object
    ffn: tuple
    spec: BlockSpec


def norm_forward(params, kind: str, x, eps: float):
    """LayerNorm (gamma, beta) or RMSNorm (gamma) with the weights under ``params``."""
    if kind == "rmsnorm":
        return rmsnorm_forward(x, params["gamma"], eps=eps)
    return layernorm_forward(x, params["gamma"], params.get("beta"), eps=eps)


def norm_backward(dout, cache, kind: str):
    """``(dx, grads)`` with grads keyed ``gamma`` (and ``beta`` for LayerNorm)."""
    if kind == "rmsnorm":
        dx, dgamma = rmsnorm_backward(dout, cache)
        return dx, dict(gamma=dgamma)
    dx, dgamma, dbeta = layernorm_backward(dout, cache)
    return dx, {k: g for k, g in (("gamma", dgamma), ("beta", dbeta)) if g is not None}


_ACT = {"gelu_tanh": (lambda x: gelu_forward(x, approximate="tanh"), gelu_backward),
        "gelu": (gelu_forward, gelu_backward),
        "relu": (relu_forward, relu_backward),
        "swiglu": (silu_forward, silu_backward)}


def ffn_forward(params, activation: str, x):
    """``act(x w_1 + b_1) w_2 + b_2``, or Llama's ``(silu(x w_1 + b_1) * (x w_3 + b_3)) w_2 + b_2``.

    Derivation: derivations/11-transformer-block.md, eqs. (11.2)-(11.3).
    """
    u, lin1 = linear_forward(x, params["w_1"], params.get("b_1"))          # (B, N, F)
    z, act = _ACT[activation][0](u)                                        # (B, N, F)
    lin3 = gate = None
    if activation == "swiglu":
        gate, lin3 = linear_forward(x, params["w_3"], params.get("b_3"))    # (B, N, F) the "up" projection
        z_act = z
        z = z_act * gate                                                   # eq. (11.3)
        act = (act, z_act)
    f, lin2 = linear_forward(z, params["w_2"], params.get("b_2"))          # (B, N, E)
    return f, (lin1, act, lin3, gate, lin2, activation)


def ffn_backward(dout, cache):
    """``(dx, grads)`` for ``ffn_forward``. Derivation: derivations/11-transformer-block.md, eq. (11.5)."""
    lin1, act, lin3, gate, lin2, activation = cache
    grads = {}
    dz, grads["w_2"], db2 = linear_backward(dout, lin2)
    dx3 = None
    if activation == "swiglu":                        # z = silu(u) * gate: the product rule
        act, z_act = act
        dgate = dz * z_act
        dz = dz * gate
        dx3, grads["w_3"], db3 = linear_backward(dgate, lin3)
        if db3 is not None:
            grads["b_3"] = db3
    du = _ACT[activation][1](dz, act)
    dx, grads["w_1"], db1 = linear_backward(du, lin1)
    for name, db in (("b_1", db1), ("b_2", db2)):
        if db is not None:
            grads[name] = db
    return (dx if dx3 is None else dx + dx3), grads                       # x fans out to w_1 and w_3


def block_forward(params, spec: BlockSpec, x, *, mask=None, key_mask=None, causal=False, past=None, offset=0,
                  kv_cache=False):
    """Pre-norm block ``h = x + attn(norm1(x))``, ``y = h + ffn(norm2(h))``: ``(y, BlockCache)``.

    Derivation: derivations/11-transformer-block.md, eqs. (11.1)-(11.3).
    """
    a, n1 = norm_forward(sub(params, "norm1."), spec.norm, x, spec.norm_eps)             # 1.
    att, attn = mha_forward(sub(params, "attn."), spec.attn, a, mask=mask, key_mask=key_mask,
                            causal=causal, past=past, offset=offset, kv_cache=kv_cache)
    h = x + att                                                                          # 2. eq. (11.1)
    xi, n2 = norm_forward(sub(params, "norm2."), spec.norm, h, spec.norm_eps)            # 3.
    f, ffn = ffn_forward(sub(params, "ffn."), spec.activation, xi)                        # 4.
    return h + f, BlockCache(norm1=n1, attn=attn, norm2=n2, ffn=ffn, spec=spec)           # 5. eq. (11.1)


def block_backward(dout, cache: BlockCache):
    """``(dx, grads)`` for ``block_forward``: each residual passes its gradient through unchanged and
    the two uses of the stream add up. Derivation: derivations/11-transformer-block.md, eq. (11.4)."""
    check_cache(cache, BlockCache, "block_forward")
    spec = cache.spec
    grads = {}
    # 5. y = h + f: dh = dy, df = dy
    db, g = ffn_backward(dout, cache.ffn)                                                # 4.
    grads.update(prefixed(g, "ffn."))
    dnorm2, g = norm_backward(db, cache.norm2, spec.norm)                                # 3.
    grads.update(prefixed(g, "norm2."))
    dh = dout + dnorm2                                          # h fans out to the residual and norm2: eq. (11.4)
    (da, _, _), g = mha_backward(dh, cache.attn)                                         # 2. h = x + attn(a)
    grads.update(prefixed(g, "attn."))
    dnorm1, g = norm_backward(da, cache.norm1, spec.norm)                                # 1.
    grads.update(prefixed(g, "norm1."))
    return dh + dnorm1, grads                                   # x fans out to the residual and norm1: eq. (11.4)


def block_params(init: Initializer, embed_dim, num_heads, num_kv_heads, ffn_dim, norm, activation, bias,
                 num_layers=1) -> dict:
    """Freshly initialized block weights, in the documented key order (scheme: npattn/nn/params.py)."""
    params = {}

    def norm_params(prefix):
        params[prefix + "gamma"] = init.ones((embed_dim,))
        if norm == "layernorm":
            params[prefix + "beta"] = init.zeros((embed_dim,))

    norm_params("norm1.")
    params.update(prefixed(mha_params(init, embed_dim, num_heads, num_kv_heads, embed_dim, embed_dim, bias,
                                      num_layers), "attn."))
    norm_params("norm2.")
    params["ffn.w_1"] = init.normal((embed_dim, ffn_dim))
    if bias:
        params["ffn.b_1"] = init.zeros((ffn_dim,))
    params["ffn.w_2"] = init.normal((ffn_dim, embed_dim), residual_std(num_layers))
    if bias:
        params["ffn.b_2"] = init.zeros((embed_dim,))
    if activation == "swiglu":
        params["ffn.w_3"] = init.normal((embed_dim, ffn_dim))
        if bias:
            params["ffn.b_3"] = init.zeros((ffn_dim,))
    return params


def make_block_spec(embed_dim, num_heads, num_kv_heads, norm, activation, rope, rope_base, norm_eps, attention):
    """Validate a block's structure and return ``(BlockSpec, H, G)``: the attention's arguments
    (``make_mha_spec``), ``norm`` and ``activation`` by name, ``norm_eps`` a finite real >= 0."""
    attn, _ = make_mha_spec(embed_dim, num_heads, num_kv_heads, rope, rope_base, attention)
    norm = check_choice("norm", norm, NORMS)
    activation = check_choice("activation", activation, ACTIVATIONS)
    norm_eps = check_real_arg("norm_eps", norm_eps)
    return BlockSpec(attn=attn, norm=norm, activation=activation, norm_eps=norm_eps), attn.num_heads, attn.num_kv_heads


class TransformerBlock(Layer):
    """Pre-norm Transformer block: ``h = x + attn(norm1(x))``, ``y = h + ffn(norm2(h))``.

    Derivation: derivations/11-transformer-block.md.
    """

    def __init__(self, embed_dim, num_heads, *, num_kv_heads=None, ffn_dim=None, norm="layernorm",
                 activation="gelu_tanh", bias=True, rope=False, rope_base=10000.0, norm_eps=1e-5,
                 attention="naive", dtype="float64", seed=None):
        self.spec, h, g = make_block_spec(embed_dim, num_heads, num_kv_heads, norm, activation, rope,
                                          rope_base, norm_eps, attention)
        embed_dim = int(embed_dim)                                              # checked above
        ffn_dim = check_int_arg("ffn_dim", ffn_dim, minimum=1, allow_none=True)
        ffn_dim = 4 * embed_dim if ffn_dim is None else ffn_dim
        bias = check_flag("bias", bias)
        init = Initializer(seed, check_dtype_name(dtype))
        super().__init__(block_params(init, embed_dim, h, g, ffn_dim, norm, activation, bias))

    def forward(self, x, *, mask=None, key_mask=None, causal=False):
        """``(B, N, E)`` output of the block for ``x (B, N, E)``."""
        y, self._cache = block_forward(self.params, self.spec, x, mask=mask, key_mask=key_mask, causal=causal)
        return y

    def backward(self, dout):
        """``dx``; fills ``grads`` with every parameter's gradient."""
        dx, grads = block_backward(dout, self._last_cache())
        self.grads = self._in_params_order(grads)
        return dx
