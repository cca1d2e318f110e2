"""npattn/nn/mha.py: MultiHeadAttention vs torch.nn.MultiheadAttention and an independent float64
reference, gradients of every weight, GQA/RoPE/masks, flash == naive, params, bad input."""

import numpy as np
import pytest

from npattn import MultiHeadAttention, gradcheck
from npattn.checks import mha_case_inputs
from npattn.nn.mha import MHASpec
from tests.ops.test_rope import rope_loop
from tests.reference import attention_reference


def mha_reference(params, h, g, query, key, value, mask=None, causal=False, rope=False):
    """Projections, head split by explicit slicing, the looped attention reference, concat, output."""
    d = params["w_q"].shape[1] // h
    q = query @ params["w_q"] + params.get("b_q", 0)
    k = key @ params["w_k"] + params.get("b_k", 0)
    v = value @ params["w_v"] + params.get("b_v", 0)
    heads = []
    for i in range(h):
        gi = i // (h // g)                                   # contiguous groups
        qi, ki, vi = q[..., i * d:(i + 1) * d], k[..., gi * d:(gi + 1) * d], v[..., gi * d:(gi + 1) * d]
        if rope:
            qi = rope_loop(qi, np.arange(qi.shape[-2]), 10000.0, False)
            ki = rope_loop(ki, np.arange(ki.shape[-2]), 10000.0, False)
        mi = None if mask is None else np.broadcast_to(mask, (query.shape[0], h) + mask.shape[-2:])[:, i]
        heads.append(attention_reference(qi[:, None], ki[:, None], vi[:, None], mask=None if mi is None else mi[:, None],
                                         causal=causal)[0][:, 0])
    return np.concatenate(heads, axis=-1) @ params["w_o"] + params.get("b_o", 0)


def randomize(layer, rng):
    for name, a in list(layer.params.items()):
        layer.params[name] = rng.standard_normal(a.shape) * 0.4


@pytest.mark.parametrize("h,g,rope", [(4, 4, False), (4, 2, True), (6, 1, False)])
@pytest.mark.parametrize("causal", [False, True])
def test_self_attention_matches_reference(rng, h, g, rope, causal):
    layer = MultiHeadAttention(24, h, num_kv_heads=g, rope=rope, seed=3)   # head dims 6 and 4
    randomize(layer, rng)
    x = rng.standard_normal((2, 5, 24))
    mask = rng.random((5, 5)) > 0.3
    out = layer.forward(x, mask=mask, causal=causal)
    want = mha_reference(layer.params, h, g, x, x, x, mask=mask, causal=causal, rope=rope)
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-13)
    assert layer.last_weights.shape == (2, h, 5, 5)


def test_cross_attention_kdim_vdim_matches_reference(rng):
    layer = MultiHeadAttention(8, 2, kdim=5, vdim=3, seed=1)
    randomize(layer, rng)
    q, k, v = rng.standard_normal((2, 4, 8)), rng.standard_normal((2, 6, 5)), rng.standard_normal((2, 6, 3))
    np.testing.assert_allclose(layer.forward(q, k, v), mha_reference(layer.params, 2, 2, q, k, v), rtol=1e-12)
    dq, dk, dv = layer.backward(rng.standard_normal((2, 4, 8)))
    assert (dq.shape, dk.shape, dv.shape) == ((2, 4, 8), (2, 6, 5), (2, 6, 3))


@pytest.mark.parametrize("kind", ["self GQA rope causal", "cross key_mask", "no bias, float mask", "flash MQA"])
def test_gradcheck_every_weight(rng, kind):
    spec, kwargs = {
        "self GQA rope causal": (MHASpec(4, 2, rope=True), dict(causal=True)),
        "cross key_mask": (MHASpec(2, 2), dict(m=4, kdim=5, key_mask=np.array([[1, 1, 0, 1], [1, 0, 1, 1]], bool))),
        "no bias, float mask": (MHASpec(2, 1), dict(bias=False, mask=rng.standard_normal((3, 3)))),
        "flash MQA": (MHASpec(4, 1, attention="flash"), dict(causal=True)),
    }[kind]
    forward, backward, inputs, kw, atol = mha_case_inputs(rng, spec, 2, 3, 8, **kwargs)
    report = gradcheck(forward, backward, inputs, kwargs=kw, atol=atol)
    assert report.ok, report
    assert {r.name for r in report.rows} >= {"query", "w_q", "w_k", "w_v", "w_o"}


def mha_backward_without_fan_out(dout, cache):
    """The planted bug: in self-attention, dquery from the query projection only (the k and v
    paths' gradients dropped instead of added, eq. (6.4))."""
    from npattn.nn.mha import attention_backward, linear_backward, merge_heads, mha_backward, split_heads

    _, grads = mha_backward(dout, cache)
    dmerged = linear_backward(dout, cache.lin_o)[0]
    dq = attention_backward(split_heads(np, dmerged, cache.spec.num_heads), cache.attn)[0]
    return (linear_backward(merge_heads(np, dq), cache.lin_q)[0],), grads


def test_planted_bug_fan_out_fails(rng):
    from npattn.checks import layer_pair
    from npattn.nn.mha import mha_forward

    spec = MHASpec(2, 2)
    forward, _, inputs, kw, atol = mha_case_inputs(rng, spec, 2, 3, 4)
    names = [n for n in inputs if n != "query"]
    f, broken = layer_pair(lambda p, x: mha_forward(p, spec, x), mha_backward_without_fan_out, ["query"], names)
    report = gradcheck(f, broken, inputs, atol=atol)
    assert not report.ok and [r.name for r in report.rows if not r.ok] == ["query"]


def test_flash_layer_equals_naive_layer(rng):
    naive = MultiHeadAttention(16, 4, num_kv_heads=2, rope=True, seed=5)
    flash = MultiHeadAttention(16, 4, num_kv_heads=2, rope=True, seed=5, attention="flash")
    x, dout = rng.standard_normal((2, 70, 16)), rng.standard_normal((2, 70, 16))
    key_mask = rng.random((2, 70)) > 0.2
    np.testing.assert_allclose(flash.forward(x, key_mask=key_mask, causal=True),
                               naive.forward(x, key_mask=key_mask, causal=True), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(flash.backward(dout)[0], naive.backward(dout)[0], rtol=1e-11, atol=1e-13)
    for name in naive.grads:
        np.testing.assert_allclose(flash.grads[name], naive.grads[name], rtol=1e-11, atol=1e-13)
    assert flash.last_weights is None


@pytest.mark.parametrize("cross", [False, True])
def test_matches_torch_multihead_attention(rng, cross):
    torch = pytest.importorskip("torch")
    e, h, b, n, m = 12, 3, 2, 5, 7
    kdim = 5 if cross else e
    layer = MultiHeadAttention(e, h, kdim=kdim, vdim=kdim, seed=2)
    randomize(layer, rng)
    ref = torch.nn.MultiheadAttention(e, h, batch_first=True, kdim=kdim, vdim=kdim, dtype=torch.float64)
    p = {k: torch.tensor(v) for k, v in layer.params.items()}
    with torch.no_grad():
        if cross:
            ref.q_proj_weight.copy_(p["w_q"].T)
            ref.k_proj_weight.copy_(p["w_k"].T)
            ref.v_proj_weight.copy_(p["w_v"].T)
        else:
            ref.in_proj_weight.copy_(torch.cat([p["w_q"].T, p["w_k"].T, p["w_v"].T]))
        ref.in_proj_bias.copy_(torch.cat([p["b_q"], p["b_k"], p["b_v"]]))
        ref.out_proj.weight.copy_(p["w_o"].T)
        ref.out_proj.bias.copy_(p["b_o"])
    x = rng.standard_normal((b, n, e))
    kv = rng.standard_normal((b, m, kdim)) if cross else x
    key_mask = np.ones((b, m if cross else n), bool)
    key_mask[1, -2:] = False                                  # padding in the second sequence
    dout = rng.standard_normal((b, n, e))
    tx = torch.tensor(x, requires_grad=True)
    tkv = torch.tensor(kv, requires_grad=True) if cross else tx
    # torch: key_padding_mask True = IGNORE; npattn key_mask True = a real token
    out_t, _ = ref(tx, tkv, tkv, key_padding_mask=torch.tensor(~key_mask), need_weights=False)
    out_t.backward(torch.tensor(dout))
    out = layer.forward(x, kv, kv, key_mask=key_mask) if cross else layer.forward(x, key_mask=key_mask)
    np.testing.assert_allclose(out, out_t.detach().numpy(), rtol=1e-12, atol=1e-14)
    dq, dk, dv = layer.backward(dout)
    np.testing.assert_allclose(dq, tx.grad.numpy(), rtol=1e-11, atol=1e-13)
    if cross:
        np.testing.assert_allclose(dk + dv, tkv.grad.numpy(), rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(layer.grads["w_o"], ref.out_proj.weight.grad.numpy().T, rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(layer.grads["b_o"], ref.out_proj.bias.grad.numpy(), rtol=1e-11, atol=1e-13)
    w_grad = ref.q_proj_weight.grad.numpy() if cross else ref.in_proj_weight.grad.numpy()[:e]
    np.testing.assert_allclose(layer.grads["w_q"], w_grad.T, rtol=1e-11, atol=1e-13)
    bias_grad = ref.in_proj_bias.grad.numpy()
    np.testing.assert_allclose(np.concatenate([layer.grads[k] for k in ("b_q", "b_k", "b_v")]), bias_grad,
                               rtol=1e-11, atol=1e-13)


def test_key_bias_gets_zero_gradient(rng):
    """Adding b_k shifts every score of a query row by q.b_k, which softmax ignores: dL/db_k = 0
    (without RoPE, which rotates the bias differently at each position)."""
    layer = MultiHeadAttention(8, 2, seed=0)
    randomize(layer, rng)
    layer.forward(rng.standard_normal((2, 5, 8)), causal=True)
    layer.backward(rng.standard_normal((2, 5, 8)))
    assert np.max(np.abs(layer.grads["b_k"])) < 1e-14 * np.max(np.abs(layer.grads["b_q"]))


def test_array_api_strict(rng):
    xs = pytest.importorskip("array_api_strict")
    layer = MultiHeadAttention(8, 4, num_kv_heads=2, rope=True, seed=0)
    want = layer.forward(x := rng.standard_normal((2, 3, 8)), causal=True)
    dwant = layer.backward(dout := rng.standard_normal((2, 3, 8)))[0]
    layer.params.update({k: xs.asarray(v) for k, v in layer.params.items()})
    out = layer.forward(xs.asarray(x), causal=True)
    assert type(out).__module__.startswith("array_api_strict")
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-14)
    np.testing.assert_allclose(np.asarray(layer.backward(xs.asarray(dout))[0]), dwant, rtol=1e-13)


def test_float32_layer_and_inputs_not_modified(rng):
    layer = MultiHeadAttention(8, 2, dtype="float32", seed=0)
    x = rng.standard_normal((2, 3, 8)).astype(np.float32)
    dout = rng.standard_normal((2, 3, 8)).astype(np.float32)
    saved = x.copy(), dout.copy()
    assert layer.forward(x).dtype == np.float32
    assert layer.backward(dout)[0].dtype == np.float32
    assert all(g.dtype == np.float32 for g in layer.grads.values())
    assert np.array_equal(x, saved[0]) and np.array_equal(dout, saved[1])


def test_seed_reproducible_and_keys():
    a, b = MultiHeadAttention(8, 2, seed=4), MultiHeadAttention(8, 2, seed=4)
    assert list(a.params) == ["w_q", "b_q", "w_k", "b_k", "w_v", "b_v", "w_o", "b_o"]
    assert all(np.array_equal(a.params[k], b.params[k]) for k in a.params)
    assert list(MultiHeadAttention(8, 2, bias=False).params) == ["w_q", "w_k", "w_v", "w_o"]
    gqa = MultiHeadAttention(8, 4, num_kv_heads=2, kdim=6)
    assert gqa.params["w_k"].shape == (6, 4) and gqa.params["w_o"].shape == (8, 8)


def test_params_assignment_rules(rng):
    layer = MultiHeadAttention(8, 2)
    new = rng.standard_normal((8, 8))
    layer.params["w_q"] = new
    assert layer.params["w_q"] is new
    with pytest.raises(ValueError, match=r"params\['w_q'\] must keep its shape \(8, 8\), got \(8, 4\)"):
        layer.params["w_q"] = np.ones((8, 4))
    with pytest.raises(TypeError, match=r"params\['w_q'\] must keep its dtype float64, got float32"):
        layer.params["w_q"] = np.ones((8, 8), dtype=np.float32)
    with pytest.raises(KeyError, match="unknown parameter 'w_x'"):
        layer.params["w_x"] = new
    assert layer.params["w_q"] is new                          # left as it was


def test_bad_input(rng):
    with pytest.raises(ValueError, match="embed_dim must be divisible by num_heads"):
        MultiHeadAttention(10, 3)
    with pytest.raises(ValueError, match="num_kv_heads must divide num_heads=4"):
        MultiHeadAttention(8, 4, num_kv_heads=3)
    with pytest.raises(ValueError, match="attention must be one of"):
        MultiHeadAttention(8, 2, attention="fast")
    layer = MultiHeadAttention(8, 2, rope=True)
    x = rng.standard_normal((2, 3, 8))
    with pytest.raises(ValueError, match="rope=True .* self-attention only"):
        layer.forward(x, x, x)
    with pytest.raises(ValueError, match="query must be 3-D"):
        layer.forward(x[0])
    with pytest.raises(TypeError, match="query must have the layer's dtype float64, got float32"):
        layer.forward(x.astype(np.float32))
    with pytest.raises(ValueError, match="query's last axis must be 8"):
        layer.forward(x[..., :6])
    with pytest.raises(ValueError, match=r"key_mask must have shape \(B, M\) = \(2, 3\)"):
        layer.forward(x, key_mask=np.ones((2, 4), bool))
    with pytest.raises(TypeError, match="key_mask must be bool"):
        layer.forward(x, key_mask=np.ones((2, 3)))
    with pytest.raises(ValueError, match="mask of shape"):
        layer.forward(x, mask=np.ones((4, 4), bool))
    with pytest.raises(ValueError, match="key and value must be given together"):
        MultiHeadAttention(8, 2).forward(x, x)
    with pytest.raises(RuntimeError, match="needs a forward first"):
        MultiHeadAttention(8, 2).backward(x)
