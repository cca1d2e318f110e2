"""npattn/nn/block.py: the pre-norm block vs the same block written with torch autograd (every norm,
activation, GQA, RoPE), gradients of every weight, the residual fan-in as a planted bug, bad input."""

import numpy as np
import pytest

from npattn import TransformerBlock, gradcheck
from npattn.checks import block_case_inputs, layer_pair
from npattn.nn.block import block_backward


def torch_block(torch, p, x, h, g, norm, activation, rope, causal, eps):
    """The block in torch ops, for autograd to differentiate: an independent backward."""
    F = torch.nn.functional
    e = x.shape[-1]
    d = e // h

    def normed(t, prefix):
        if norm == "rmsnorm":
            return F.rms_norm(t, (e,), p[prefix + "gamma"], eps=eps)
        return F.layer_norm(t, (e,), p[prefix + "gamma"], p[prefix + "beta"], eps=eps)

    def proj(t, name):
        return t @ p["attn.w_" + name] + (p["attn.b_" + name] if "attn.b_" + name in p else 0)

    def heads(t, n_heads):
        return t.reshape(t.shape[0], t.shape[1], n_heads, d).transpose(1, 2)

    def rotate(t):
        n = t.shape[-2]
        inv = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
        ang = torch.arange(n, dtype=torch.float64)[:, None] * inv
        emb = torch.cat([ang, ang], -1)
        return t * emb.cos() + torch.cat([-t[..., d // 2:], t[..., :d // 2]], -1) * emb.sin()

    a = normed(x, "norm1.")
    q, k, v = heads(proj(a, "q"), h), heads(proj(a, "k"), g), heads(proj(a, "v"), g)
    if rope:
        q, k = rotate(q), rotate(k)
    k, v = k.repeat_interleave(h // g, dim=1), v.repeat_interleave(h // g, dim=1)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    hh = x + proj(o.transpose(1, 2).reshape(x.shape), "o")
    b = normed(hh, "norm2.")

    def lin(t, i):
        return t @ p[f"ffn.w_{i}"] + (p[f"ffn.b_{i}"] if f"ffn.b_{i}" in p else 0)

    u = lin(b, 1)
    z = {"gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "gelu": F.gelu, "relu": F.relu,
         "swiglu": lambda t: F.silu(t) * lin(b, 3)}[activation](u)
    return hh + lin(z, 2)


@pytest.mark.parametrize("norm,activation,rope,g,bias", [
    ("layernorm", "gelu_tanh", False, 4, True), ("layernorm", "gelu", False, 2, True),
    ("rmsnorm", "swiglu", True, 2, False), ("layernorm", "relu", True, 1, True)])
def test_matches_torch_autograd(rng, norm, activation, rope, g, bias):
    torch = pytest.importorskip("torch")
    block = TransformerBlock(16, 4, num_kv_heads=g, ffn_dim=24, norm=norm, activation=activation, rope=rope,
                             bias=bias, seed=1)
    for name, a in list(block.params.items()):
        block.params[name] = a + 0.3 * rng.standard_normal(a.shape)
    x, dout = rng.standard_normal((2, 6, 16)), rng.standard_normal((2, 6, 16))
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in block.params.items()}
    tx = torch.tensor(x, requires_grad=True)
    ty = torch_block(torch, tp, tx, 4, g, norm, activation, rope, True, 1e-5)
    ty.backward(torch.tensor(dout))
    np.testing.assert_allclose(block.forward(x, causal=True), ty.detach().numpy(), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(block.backward(dout), tx.grad.numpy(), rtol=1e-11, atol=1e-12)
    assert set(block.grads) == set(block.params)
    for name, t in tp.items():
        np.testing.assert_allclose(block.grads[name], t.grad.numpy(), rtol=1e-10, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("norm,activation", [("layernorm", "gelu"), ("rmsnorm", "swiglu")])
def test_gradcheck_every_weight(rng, norm, activation):
    forward, backward, inputs, kw, atol = block_case_inputs(rng, 2, 3, 4, 2, 1, norm=norm, activation=activation,
                                                            rope=True, causal=True)
    report = gradcheck(forward, backward, inputs, kwargs=kw, mode="directional", atol=atol)
    assert report.ok, report
    assert len(report.rows) == len(inputs)


def block_backward_without_residual_fan_in(dout, cache):
    """The planted bug: dh = norm2_backward(db) only, dropping the residual's copy of dout (eq. (11.4))."""
    from npattn.nn.block import ffn_backward, mha_backward, norm_backward

    spec = cache.spec
    db, _ = ffn_backward(dout, cache.ffn)
    dh, _ = norm_backward(db, cache.norm2, spec.norm)
    (da, _, _), _ = mha_backward(dh, cache.attn)
    dx, _ = norm_backward(da, cache.norm1, spec.norm)
    return (dh + dx,), block_backward(dout, cache)[1]


def test_planted_bug_residual_fails(rng):
    forward, _, inputs, kw, atol = block_case_inputs(rng, 2, 3, 4, 2, 2)
    names = [n for n in inputs if n != "x"]
    _, broken = layer_pair(None, block_backward_without_residual_fan_in, ["x"], names)   # same forward
    report = gradcheck(forward, broken, inputs, atol=atol)
    assert [r.name for r in report.rows if not r.ok] == ["x"]


def test_keys_and_defaults():
    block = TransformerBlock(8, 2, activation="swiglu", norm="rmsnorm", bias=False)
    assert list(block.params) == ["norm1.gamma", "attn.w_q", "attn.w_k", "attn.w_v", "attn.w_o", "norm2.gamma",
                                  "ffn.w_1", "ffn.w_2", "ffn.w_3"]
    assert block.params["ffn.w_1"].shape == (8, 32)           # ffn_dim = 4 E by default
    ln = TransformerBlock(8, 2, bias=False)
    assert "norm1.beta" in ln.params and "ffn.b_1" not in ln.params     # LayerNorm keeps its beta


def test_key_mask_and_mask_pass_through(rng):
    block = TransformerBlock(8, 2, seed=0)
    x = rng.standard_normal((2, 4, 8))
    key_mask = np.array([[True] * 4, [True, True, False, False]])
    y = block.forward(x, key_mask=key_mask)
    y_changed = block.forward(np.where(key_mask[..., None], x, 99.0), key_mask=key_mask)
    np.testing.assert_allclose(y[1, :2], y_changed[1, :2], rtol=1e-12)     # padded keys are never seen


def test_bad_input():
    with pytest.raises(ValueError, match="norm must be one of"):
        TransformerBlock(8, 2, norm="batchnorm")
    with pytest.raises(ValueError, match="activation must be one of"):
        TransformerBlock(8, 2, activation="tanh")
    with pytest.raises(ValueError, match="ffn_dim must be >= 1, got 0"):
        TransformerBlock(8, 2, ffn_dim=0)
    with pytest.raises(ValueError, match="dtype must be 'float64' or 'float32'"):
        TransformerBlock(8, 2, dtype="float16")
