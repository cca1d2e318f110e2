"""The gradient checks behind ``npattn check``: every functional pair over a spread of cases.

Each case is float64 with a random ``dout`` (drawn by ``gradcheck``) and shapes whose heads,
query and key lengths all differ, so that a transposed or mis-summed gradient cannot pass.
The layers (multi-head attention, a Transformer block, a GPT) are checked through ``layer_pair``,
which presents a functional layer as a pair whose inputs are its data and every weight.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from .backend import library as backend_library
from .backend import move
from .gradcheck import GradcheckReport, gradcheck
from .nn.block import block_backward, block_forward, block_params, make_block_spec
from .nn.gpt import GPTConfig, gpt_backward, gpt_forward, gpt_params
from .nn.mha import MHASpec, mha_backward, mha_forward, mha_params
from .nn.params import Initializer
from .ops import (
    attention_backward,
    attention_forward,
    cross_entropy_backward,
    cross_entropy_forward,
    embedding_backward,
    embedding_forward,
    flash_attention_backward,
    flash_attention_forward,
    gelu_backward,
    gelu_forward,
    layernorm_backward,
    layernorm_forward,
    linear_backward,
    linear_forward,
    log_softmax_backward,
    log_softmax_forward,
    relu_backward,
    relu_forward,
    rmsnorm_backward,
    rmsnorm_forward,
    rope_backward,
    rope_forward,
    silu_backward,
    silu_forward,
    softmax_backward,
    softmax_forward,
)

__all__ = ["Case", "cases", "run_case", "on_backend", "flash_with_lse_forward", "flash_with_lse_backward", "layer_pair",
           "mha_case_inputs", "block_case_inputs", "gpt_case_inputs"]


class Case(NamedTuple):
    op: str
    name: str
    forward: Callable
    backward: Callable
    inputs: dict
    kwargs: dict
    # absolute tolerance: the layers' losses are sums over many outputs, so the float64 rounding
    # floor of a central difference, ~1e-16 |L| / eps, reaches ~1e-9; a gradient that is exactly 0
    # (attention's key bias b_k, derivations/06-multihead.md) must not fail on that noise
    atol: float = 1e-9


def flash_with_lse_forward(q, k, v, **kwargs):
    """The tiled forward seen as a two-output op ``(o, lse)``, so ``dlse`` can be gradchecked."""
    o, cache = flash_attention_forward(q, k, v, **kwargs)
    return (o, cache.lse), cache


def flash_with_lse_backward(douts, cache):
    dout, dlse = douts
    return flash_attention_backward(dout, cache, dlse=dlse)


def layer_pair(forward, backward, data_names, param_names):
    """A functional layer as a gradcheck pair whose inputs are its data arrays and then every weight.

    ``forward(params, *data) -> (out, cache)``, ``backward(dout, cache) -> (d_data, grads)`` where
    ``d_data`` is one gradient per data array (None for ids, or for key/value in self-attention)
    and ``grads`` a dict keyed by ``param_names``.
    """
    k = len(data_names)

    def pair_forward(*arrays, **kwargs):
        return forward(dict(zip(param_names, arrays[k:])), *arrays[:k], **kwargs)

    def pair_backward(dout, cache):
        d_data, grads = backward(dout, cache)
        return tuple(d_data) + tuple(grads.get(name) for name in param_names)

    return pair_forward, pair_backward


LAYER_ATOL = 1e-7


def _randomized(params: dict, rng, scale=0.5) -> dict:
    """Initialized weights moved off their init values (gamma != 1, beta and biases != 0), so that a
    gradient that ignored them could not pass."""
    return {name: a + scale * rng.standard_normal(a.shape) for name, a in params.items()}


def mha_case_inputs(rng, spec: MHASpec, b, n, e, *, kdim=None, m=None, bias=True, **kwargs):
    """``(forward, backward, inputs, kwargs)`` for gradchecking ``mha_forward`` with its weights;
    self-attention when ``m`` is None, else cross-attention with keys of length ``m``. ``kwargs``
    (e.g. ``key_mask``) go to the case, so that they move with its inputs to another library."""
    params = _randomized(mha_params(Initializer(0, "float64"), e, spec.num_heads, spec.num_kv_heads,
                                    kdim or e, kdim or e, bias), rng)
    data = dict(query=rng.standard_normal((b, n, e)))
    if m is not None:
        data.update(key=rng.standard_normal((b, m, kdim or e)), value=rng.standard_normal((b, m, kdim or e)))

    def fwd(p, *xs, **kw):
        return mha_forward(p, spec, *xs, **kw)

    def bwd(dout, cache):
        d_data, grads = mha_backward(dout, cache)
        return d_data[:len(data)], grads

    f, bk = layer_pair(fwd, bwd, list(data), list(params))
    return f, bk, dict(data, **params), kwargs, LAYER_ATOL


def block_case_inputs(rng, b, n, e, heads, kv_heads, *, norm="layernorm", activation="gelu_tanh", rope=False,
                      bias=True, ffn_dim=None, **kwargs):
    spec, h, g = make_block_spec(e, heads, kv_heads, norm, activation, rope, 10000.0, 1e-5, "naive")
    params = _randomized(block_params(Initializer(0, "float64"), e, h, g, ffn_dim or 2 * e, norm, activation, bias), rng)

    def fwd(p, x, **kw):
        return block_forward(p, spec, x, **kw)

    def bwd(dout, cache):
        dx, grads = block_backward(dout, cache)
        return (dx,), grads

    f, bk = layer_pair(fwd, bwd, ["x"], list(params))
    return f, bk, dict(x=rng.standard_normal((b, n, e)), **params), kwargs, LAYER_ATOL


def gpt_case_inputs(rng, config: GPTConfig, b, n):
    params = _randomized(gpt_params(config, Initializer(0, "float64")), rng, scale=0.3)

    def fwd(p, ids):
        return gpt_forward(p, config, ids)

    def bwd(dout, cache):
        return (None,), gpt_backward(dout, cache, config)

    f, bk = layer_pair(fwd, bwd, ["ids"], list(params))
    return f, bk, dict(ids=rng.integers(0, config.vocab_size, (b, n)), **params), {}, LAYER_ATOL


def cases(seed: int = 0) -> list[Case]:
    """All cases, with inputs drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    normal = rng.standard_normal

    def qkv(lead, h, g, n, m, d, dv):
        return dict(q=normal(lead + (h, n, d)), k=normal(lead + (g, m, d)), v=normal(lead + (g, m, dv)))

    masked = normal((3, 6))
    masked[1, :] = -np.inf                                 # a fully masked row
    masked[0, 2] = -np.inf
    sparse = rng.random((2, 1, 5, 7)) > 0.5                # bool (B, 1, N, M), broadcast over heads
    sparse[0, 0, 3, :] = False                             # a query that may attend nothing
    att, fl = (attention_forward, attention_backward), (flash_attention_forward, flash_attention_backward)
    lse_pair = (flash_with_lse_forward, flash_with_lse_backward)
    return [
        Case("linear", "bias, (B, N, E_in)", linear_forward, linear_backward,
             dict(x=normal((2, 3, 4)), w=normal((4, 5)), b=normal(5)), {}),
        Case("linear", "no bias, 1-D x", linear_forward, linear_backward,
             dict(x=normal(4), w=normal((4, 3)), b=None), {}),
        Case("softmax", "last axis", softmax_forward, softmax_backward, dict(x=normal((2, 3, 5))), {}),
        Case("softmax", "axis=1", softmax_forward, softmax_backward, dict(x=normal((2, 4, 3))), dict(axis=1)),
        Case("softmax", "-inf entries, fully masked row", softmax_forward, softmax_backward, dict(x=masked), {}),
        Case("attention", "MHA, N != M, D != Dv", *att, qkv((2,), 3, 3, 4, 5, 3, 2), {}),
        Case("attention", "single head, 2-D", *att,
             dict(q=normal((5, 4)), k=normal((3, 4)), v=normal((3, 2))), dict(scale=0.7)),
        Case("attention", "bool mask, fully masked row", *att, qkv((2,), 2, 2, 5, 7, 3, 2), dict(mask=sparse)),
        Case("attention", "float mask (H, 1, M)", *att, qkv((2,), 3, 3, 4, 5, 3, 3), dict(mask=normal((3, 1, 5)))),
        Case("attention", "causal N < M", *att, qkv((1,), 2, 2, 3, 6, 3, 2), dict(causal=True)),
        Case("attention", "causal N > M (empty rows)", *att, qkv((1,), 2, 2, 6, 4, 3, 2), dict(causal=True)),
        Case("attention", "GQA H=4 G=2 + causal", *att, qkv((2,), 4, 2, 4, 5, 3, 2), dict(causal=True)),
        Case("attention", "MQA G=1 + bool mask", *att, qkv((1,), 3, 1, 5, 7, 2, 3), dict(mask=sparse[:1])),
        Case("attention", "dropout 0.3, seed 7", *att, qkv((2,), 2, 2, 4, 5, 3, 2), dict(dropout_p=0.3, rng=7)),
        Case("flash", "ragged tiles 3x2", *fl, qkv((2,), 3, 3, 7, 5, 3, 2), dict(block_q=3, block_k=2)),
        Case("flash", "causal N > M, tiles 2x3", *fl, qkv((1,), 2, 2, 7, 4, 3, 2),
             dict(causal=True, block_q=2, block_k=3)),
        Case("flash", "GQA H=4 G=2, bool mask", *fl, qkv((2,), 4, 2, 5, 7, 3, 2),
             dict(mask=sparse, block_q=2, block_k=4)),
        Case("flash", "float mask, 2-D", *fl, dict(q=normal((5, 3)), k=normal((6, 3)), v=normal((6, 2))),
             dict(mask=normal((5, 6)), block_q=4, block_k=4)),
        Case("flash", "dlse, causal N < M", *lse_pair, qkv((2,), 2, 1, 4, 6, 3, 2),
             dict(causal=True, block_q=3, block_k=4)),
    ] + variant_cases(rng) + transformer_cases(rng)


def mask_grad_pair(forward, backward):
    """An attention pair whose float mask is an input (a learnable bias): backward returns dmask too."""
    def pair_forward(q, k, v, mask, **kwargs):
        return forward(q, k, v, mask=mask, **kwargs)

    def pair_backward(dout, cache):
        return backward(dout, cache, mask_grad=True)

    return pair_forward, pair_backward


def variant_cases(rng) -> list[Case]:
    """Softcap, ALiBi, windows, top-left causal and the float-mask gradient, on both ops."""
    normal = rng.standard_normal

    def qkv():
        return dict(q=normal((2, 4, 5, 3)), k=normal((2, 2, 7, 3)), v=normal((2, 2, 7, 2)))

    slopes = np.array([0.5, 0.25, 0.125, 0.0625])
    att, fl = (attention_forward, attention_backward), (flash_attention_forward, flash_attention_backward)
    lse_pair = (flash_with_lse_forward, flash_with_lse_backward)
    tiles = dict(block_q=2, block_k=3)
    everything = dict(softcap=1.5, alibi_slopes=slopes, window=(3, 1), causal=True)
    return [
        Case("attention", "softcap 1.5", *att, qkv(), dict(softcap=1.5)),
        Case("attention", "ALiBi, GQA, N < M", *att, qkv(), dict(alibi_slopes=slopes)),
        Case("attention", "window (2, 1)", *att, qkv(), dict(window=(2, 1))),
        Case("attention", "top-left causal", *att, qkv(), dict(causal="top-left")),
        Case("attention", "all variants + dropout", *att, qkv(), dict(everything, dropout_p=0.2, rng=3)),
        Case("attention", "dmask (H, 1, M) + variants", *mask_grad_pair(*att),
             dict(qkv(), mask=normal((4, 1, 7))), everything),
        Case("flash", "softcap, ragged tiles", *fl, qkv(), dict(softcap=1.5, **tiles)),
        Case("flash", "ALiBi + window, tiles skipped", *fl, qkv(), dict(alibi_slopes=slopes, window=(1, 1), **tiles)),
        Case("flash", "all variants + dlse", *lse_pair, qkv(), dict(everything, **tiles)),
        Case("flash", "dmask (N, M) + variants", *mask_grad_pair(*fl),
             dict(qkv(), mask=normal((5, 7))), dict(everything, **tiles)),
    ]


def transformer_cases(rng) -> list[Case]:
    """The pairs around attention, and the layers (directional: every weight, random directions)."""
    normal = rng.standard_normal
    x = normal((2, 3, 5)) * 2
    x_relu = np.where(np.abs(x) < 1e-2, 0.5, x)                   # no input on ReLU's kink
    soft = np.exp(normal((2, 3, 5)))
    soft /= soft.sum(-1, keepdims=True)
    hard = rng.integers(0, 5, (2, 3))
    hard[1, 2] = -100                                              # an ignored position
    mha = MHASpec(num_heads=4, num_kv_heads=2, rope=True)
    gpt2 = GPTConfig(vocab_size=11, max_len=8, embed_dim=8, num_heads=2, num_layers=2, ffn_dim=12)
    llama = GPTConfig(vocab_size=13, max_len=8, embed_dim=8, num_heads=4, num_kv_heads=2, num_layers=2, ffn_dim=12,
                      norm="rmsnorm", activation="swiglu", positions="rope", bias=False, tie_embeddings=False)
    sinus = GPTConfig(vocab_size=9, max_len=8, embed_dim=6, num_heads=2, num_layers=1, ffn_dim=10,
                      activation="relu", positions="sinusoidal")
    return [
        Case("log_softmax", "axis=-1", log_softmax_forward, log_softmax_backward, dict(x=normal((3, 4, 5))), {}),
        Case("layernorm", "gamma, beta", layernorm_forward, layernorm_backward,
             dict(x=x, gamma=normal(5), beta=normal(5)), dict(eps=1e-3)),
        Case("rmsnorm", "gamma", rmsnorm_forward, rmsnorm_backward, dict(x=x, gamma=normal(5)), dict(eps=1e-3)),
        Case("gelu", "exact (erf)", gelu_forward, gelu_backward, dict(x=x), {}),
        Case("gelu", "tanh", gelu_forward, gelu_backward, dict(x=x), dict(approximate="tanh")),
        Case("relu", "elementwise", relu_forward, relu_backward, dict(x=x_relu), {}),
        Case("silu", "elementwise", silu_forward, silu_backward, dict(x=x), {}),
        Case("embedding", "repeated ids", embedding_forward, embedding_backward,
             dict(ids=np.array([[1, 4, 1], [0, 4, 4]]), weight=normal((6, 3))), {}),
        Case("rope", "rotate_half, positions", rope_forward, rope_backward, dict(x=normal((2, 3, 4, 6))),
             dict(positions=np.array([0, 2, 5, 9]))),
        Case("rope", "interleaved", rope_forward, rope_backward, dict(x=normal((5, 4))), dict(interleaved=True)),
        Case("cross_entropy", "ignore_index, smoothing 0.1", cross_entropy_forward, cross_entropy_backward,
             dict(logits=normal((2, 3, 5)), target=hard), dict(label_smoothing=0.1)),
        Case("cross_entropy", "soft targets", cross_entropy_forward, cross_entropy_backward,
             dict(logits=normal((2, 3, 5))), dict(target=soft, label_smoothing=0.2)),
        Case("mha", "self, GQA H=4 G=2, RoPE, causal",
             *mha_case_inputs(rng, mha, 2, 5, 8, causal=True)),
        Case("mha", "cross, kdim=6, key_mask",
             *mha_case_inputs(rng, MHASpec(num_heads=2, num_kv_heads=2), 2, 3, 4, kdim=6, m=5,
                              key_mask=np.array([[True] * 5, [True, True, False, True, False]]))),
        Case("block", "LayerNorm + GELU, causal", *block_case_inputs(rng, 2, 4, 6, 2, 2, causal=True)),
        Case("block", "RMSNorm + SwiGLU, GQA, RoPE", *block_case_inputs(
            rng, 2, 4, 8, 4, 2, norm="rmsnorm", activation="swiglu", rope=True, bias=False, causal=True)),
        Case("gpt", "GPT-2 shape, tied, learned pos.", *gpt_case_inputs(rng, gpt2, 2, 5)),
        Case("gpt", "Llama shape, untied, RoPE, GQA", *gpt_case_inputs(rng, llama, 2, 5)),
        Case("gpt", "sinusoidal pos., ReLU", *gpt_case_inputs(rng, sinus, 2, 4)),
    ]


# layers with many weights: checked along random directions (each weight still gets its own row)
DIRECTIONAL_OPS = ("mha", "block", "gpt")


def on_backend(case: Case, library="numpy", device=None) -> Case:
    """The case with every array of its inputs and kwargs (masks, slopes, positions, targets) moved
    to ``library`` on ``device`` (``backend.library`` names them); NumPy: the case itself."""
    if library in ("numpy", None) and device is None:
        return case
    xp = backend_library(library)

    def moved(value):
        return move(value, xp, device) if isinstance(value, np.ndarray) else value

    return case._replace(inputs={k: moved(a) for k, a in case.inputs.items()},
                         kwargs={k: moved(a) for k, a in case.kwargs.items()})


def run_case(case: Case, *, mode: str = "full", seed: int = 0, library="numpy", device=None) -> GradcheckReport:
    """One case's report, on ``library``/``device`` (see ``on_backend``); layers always run in
    directional mode (full would cost one pair of forwards per weight entry)."""
    case = on_backend(case, library, device)
    mode = "directional" if case.op in DIRECTIONAL_OPS else mode
    return gradcheck(case.forward, case.backward, case.inputs, kwargs=case.kwargs, mode=mode, seed=seed,
                     atol=case.atol)
