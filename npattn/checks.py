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
    ] + variant_cases(rng) + beyond_dense_cases(seed) + transformer_cases(rng)


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


def beyond_dense_cases(seed: int) -> list[Case]:
    """Attention beyond the dense op: sinks and packed sequences on both ops, the paged KV cache,
    the split-KV combine, linear attention. Each family draws from its own generator, so adding a
    case to one leaves the others' inputs as they were."""
    return (sink_varlen_cases(np.random.default_rng([seed, 1])) + paged_cases(np.random.default_rng([seed, 2]))
            + combine_cases(np.random.default_rng([seed, 3]))
            + linear_attention_cases(np.random.default_rng([seed, 4])))


def sink_pair(forward, backward, **fixed):
    """An attention pair whose sinks are an input (a learnable logit per head): the backward's last
    gradient is dsinks."""
    def pair_forward(q, k, v, sinks, **kwargs):
        return forward(q, k, v, sinks=sinks, **fixed, **kwargs)

    return pair_forward, backward


def sink_varlen_cases(rng) -> list[Case]:
    """Learnable sinks and packed variable-length sequences, on the naive and the tiled op."""
    normal = rng.standard_normal
    att, fl = (attention_forward, attention_backward), (flash_attention_forward, flash_attention_backward)
    lse_pair = (flash_with_lse_forward, flash_with_lse_backward)
    tiles = dict(block_q=2, block_k=3)
    cu_q, cu_k = np.array([0, 3, 3, 7]), np.array([0, 2, 5, 9])          # 3 sequences, one with no query

    def qkv(lead=(2,), n=5, m=7):
        return dict(q=normal(lead + (4, n, 3)), k=normal(lead + (2, m, 3)), v=normal(lead + (2, m, 2)))

    packed = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    return [
        Case("attention", "sinks (H,), causal N > M", *sink_pair(*att), dict(qkv(n=7, m=4), sinks=normal(4)),
             dict(causal=True)),
        Case("attention", "sinks (B, H) + all variants", *sink_pair(*att), dict(qkv(), sinks=normal((2, 4))),
             dict(softcap=1.5, window=(3, 1), causal=True, alibi_slopes=np.array([0.5, 0.25, 0.125, 0.0625]))),
        Case("flash", "sinks + dlse, ragged tiles", *sink_pair(*lse_pair), dict(qkv(), sinks=normal(4)),
             dict(causal=True, **tiles)),
        Case("attention", "packed, 3 sequences, causal", *att, qkv((), 7, 9), dict(causal=True, **packed)),
        Case("flash", "packed + sinks + dlse, window", *sink_pair(*lse_pair), dict(qkv((), 7, 9), sinks=normal(4)),
             dict(window=(2, 0), **packed, **tiles)),
        Case("flash", "packed, top-left causal", *fl, qkv((), 7, 9), dict(causal="top-left", **packed, **tiles)),
    ]


def paged_cases(rng) -> list[Case]:
    """The paged KV cache (ops/paged.py): prefix-shared pages (their gradients sum), -1 padding in the
    block table, lengths that are not multiples of the page size, decoding (N = 1), every variant,
    sinks and dlse. ``block_table`` and ``seqlens`` ride in the kwargs (integer, no gradient row);
    the pair below drops their two ``None`` gradients so the rows are q, k_pages, v_pages (, sinks)."""
    from .ops.paged import paged_attention_backward, paged_attention_forward

    def paged_pair(with_lse):
        def forward(q, k_pages, v_pages, sinks=None, *, block_table, seqlens, **kwargs):
            o, cache = paged_attention_forward(q, k_pages, v_pages, block_table, seqlens, sinks=sinks, **kwargs)
            return ((o, cache.lse) if with_lse else o), cache

        def backward(dout, cache):
            dout, dlse = dout if with_lse else (dout, None)
            grads = paged_attention_backward(dout, cache, dlse=dlse)
            return grads[:3] + grads[5:]                                   # (dq, dk_pages, dv_pages[, dsinks])

        return forward, backward

    normal = rng.standard_normal

    def pool(p, g, page_size, d, dv):
        return dict(k_pages=normal((p, g, page_size, d)), v_pages=normal((p, g, page_size, dv)))

    # sequence 0: pages 0, 1 (3 keys); sequence 1: pages 0, 3, 4 (5 keys) -- page 0 is a shared prefix,
    # page 2 is read by nobody, -1 pads the table
    shared = dict(block_table=np.array([[0, 1, -1], [0, 3, 4]]), seqlens=np.array([3, 5]))
    slopes = np.array([0.5, 0.25, 0.125, 0.0625])
    return [
        Case("paged", "GQA 4/2, shared page, causal", *paged_pair(False),
             dict(q=normal((2, 4, 2, 3)), **pool(5, 2, 2, 3, 2)), dict(shared, causal=True)),
        Case("paged", "N=1, softcap + ALiBi + window", *paged_pair(False),
             dict(q=normal((2, 4, 1, 3)), **pool(5, 2, 2, 3, 2)),
             dict(shared, softcap=1.5, alibi_slopes=slopes, window=(3, 0))),
        Case("paged", "sinks + dlse, top-left, MQA", *paged_pair(True),
             dict(q=normal((2, 3, 3, 2)), **pool(4, 1, 3, 2, 3), sinks=normal(3)),
             dict(block_table=np.array([[2, 0], [1, 2]]), seqlens=np.array([4, 6]), causal="top-left")),
    ]


def combine_cases(rng) -> list[Case]:
    """The split-KV combine (ops/combine.py): the combine alone with both output gradients (a part
    that is empty in some rows, lse spread wide), and ring attention, the combine between per-chunk
    tiled forwards and backwards, checked against finite differences of q, k, v themselves."""
    from .ops.combine import (combine_attention, combine_attention_backward, ring_attention_backward,
                              ring_attention_forward)

    normal = rng.standard_normal
    pair = (combine_attention, combine_attention_backward)
    lse = 3 * normal((3, 2, 3, 4))                          # (S, B, H, N)
    lse[1, 0, 2, 1] = -np.inf                              # part 1 saw no key in one row: weighs 0
    lse[:2, 1, 0, 3] = -np.inf                             # only part 2 in another row

    def ring_with_lse_forward(q, k, v, **kwargs):           # ring attention seen as (o, lse), for dlse
        o, cache = ring_attention_forward(q, k, v, **kwargs)
        return (o, cache.lse), cache

    def ring_with_lse_backward(douts, cache):
        return ring_attention_backward(douts[0], cache, dlse=douts[1])

    ring = (ring_with_lse_forward, ring_with_lse_backward)
    qkv = dict(q=normal((2, 4, 5, 3)), k=normal((2, 2, 9, 3)), v=normal((2, 2, 9, 2)))   # GQA H=4 G=2
    return [
        Case("combine", "S=3 (B, H, N, Dv), empty parts", *pair,
             dict(o_parts=normal((3, 2, 3, 4, 2)), lse_parts=lse), {}),
        Case("combine", "S=2 one head, lse 20 apart", *pair,
             dict(o_parts=normal((2, 5, 3)), lse_parts=normal((2, 5)) + np.array([[10.0], [-10.0]])), {}),
        Case("combine", "ring: 4 chunks, 1 empty, GQA", *ring, qkv, dict(bounds=(0, 3, 3, 7, 9))),
        Case("combine", "ring: causal, future chunks", *ring, qkv,
             dict(bounds=(0, 2, 6, 9), causal=True, block_q=2, block_k=3)),
    ]


def linear_attention_cases(rng) -> list[Case]:
    """Linear attention (ops/linear_attention.py): causal chunks that do not divide N, both causal
    alignments, N != M both ways (rows that see no key), grouped heads, normalize on and off."""
    from .ops.linear_attention import linear_attention_backward, linear_attention_forward

    normal = rng.standard_normal
    pair = (linear_attention_forward, linear_attention_backward)

    def qkv(lead, h, g, n, m, d, dv):
        return dict(q=normal(lead + (h, n, d)), k=normal(lead + (g, m, d)), v=normal(lead + (g, m, dv)))

    return [
        Case("linear_attention", "causal GQA 4/2, N < M, chunk 2", *pair, qkv((2,), 4, 2, 5, 7, 3, 2),
             dict(causal=True, chunk=2)),
        Case("linear_attention", "causal N > M, eps=0, chunk 3", *pair, qkv((1,), 2, 2, 7, 4, 3, 2),
             dict(causal=True, chunk=3, eps=0.0)),
        Case("linear_attention", "not causal, MQA, N > M", *pair, qkv((2,), 3, 1, 6, 4, 2, 3), {}),
        Case("linear_attention", "top-left, unnormalized, 2-D", *pair,
             dict(q=normal((5, 3)), k=normal((6, 3)), v=normal((6, 2))),
             dict(causal="top-left", normalize=False, chunk=2)),
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
