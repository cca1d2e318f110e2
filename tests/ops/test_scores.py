"""npattn/ops/scores.py through both attention ops: softcap, ALiBi, sliding windows, top-left causal
and the learnable float-mask bias, against a looped reference that builds every score explicitly;
tiled == naive over drawn shapes, tiles and windows; the band's tile skipping; planted bugs."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import npattn.ops.scores as scores_module
from npattn import attention_backward, attention_forward, flash_attention_backward, flash_attention_forward, gradcheck
from npattn.checks import flash_with_lse_backward, flash_with_lse_forward
from tests.reference import attention_reference

SLOPES = np.array([0.5, 0.25, 0.125, 0.0625])                   # 4 query heads


def qkv(rng, n=7, m=9, h=4, g=2, lead=(2,), d=3, dv=2):
    return (rng.standard_normal(lead + (h, n, d)), rng.standard_normal(lead + (g, m, d)),
            rng.standard_normal(lead + (g, m, dv)))


VARIANTS = {
    "softcap": dict(softcap=1.5),
    "alibi": dict(alibi_slopes=SLOPES),
    "alibi causal": dict(alibi_slopes=SLOPES[None, :], causal=True),
    "window": dict(window=(2, 1)),
    "window left only, causal": dict(window=(3, None), causal=True),
    "window right only": dict(window=(None, 0)),
    "top-left causal": dict(causal="top-left"),
    "everything": dict(softcap=2.0, alibi_slopes=SLOPES, window=(3, 0), mask="float"),
    "window + bool mask": dict(window=(1, 1), mask="bool"),
}


def resolve(rng, kw, h=4, n=7, m=9):
    kw = dict(kw)
    if kw.get("mask") == "float":
        kw["mask"] = rng.standard_normal((h, 1, m))
    elif kw.get("mask") == "bool":
        kw["mask"] = rng.random((n, m)) > 0.3
    return kw


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("shape", [(7, 9), (9, 7), (6, 6)], ids=lambda s: f"N{s[0]}M{s[1]}")
def test_both_ops_match_the_reference(rng, name, shape):
    n, m = shape
    q, k, v = qkv(rng, n, m)
    kw = resolve(rng, VARIANTS[name], n=n, m=m)
    o_ref, p_ref, lse_ref = attention_reference(q, k, v, **kw)
    o, cache = attention_forward(q, k, v, **kw)
    np.testing.assert_allclose(o, o_ref, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(cache.p, p_ref, rtol=1e-12, atol=1e-15)
    o_t, c_t = flash_attention_forward(q, k, v, block_q=3, block_k=2, **kw)
    np.testing.assert_allclose(o_t, o_ref, rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(np.isinf(c_t.lse), np.isinf(lse_ref))
    np.testing.assert_allclose(c_t.lse[np.isfinite(lse_ref)], lse_ref[np.isfinite(lse_ref)], rtol=1e-12)
    assert not np.isnan(o).any() and not np.isnan(o_t).any()


@pytest.mark.parametrize("name", VARIANTS)
def test_gradcheck_both_ops(rng, name):
    q, k, v = qkv(rng)
    kw = resolve(rng, VARIANTS[name])
    report = gradcheck(attention_forward, attention_backward, dict(q=q, k=k, v=v), kwargs=dict(kw, dropout_p=0.3, rng=2))
    assert report.ok, report
    report = gradcheck(flash_with_lse_forward, flash_with_lse_backward, dict(q=q, k=k, v=v),
                       kwargs=dict(kw, block_q=3, block_k=4))
    assert report.ok, report


def with_mask(op, **kw):
    def forward(q, k, v, mask):
        return op[0](q, k, v, mask=mask, **kw)

    def backward(dout, cache):
        return op[1](dout, cache, mask_grad=True)

    return forward, backward


NAIVE, TILED = (attention_forward, attention_backward), (flash_attention_forward, flash_attention_backward)


@pytest.mark.parametrize("mask_shape", [(4, 7, 9), (4, 1, 9), (2, 1, 7, 9), (9,), (7, 9)], ids=str)
@pytest.mark.parametrize("op", ["naive", "tiled"])
@pytest.mark.parametrize("workers", [1, 2])
def test_mask_grad_is_ds_summed_to_the_mask(rng, mask_shape, op, workers):
    q, k, v = qkv(rng)
    extra = dict(block_q=3, block_k=2) if op == "tiled" else {}
    forward, backward = with_mask(NAIVE if op == "naive" else TILED, softcap=3.0, alibi_slopes=SLOPES,
                                  causal=True, workers=workers, **extra)
    mask = rng.standard_normal(mask_shape)
    report = gradcheck(forward, backward, dict(q=q, k=k, v=v, mask=mask), mode="directional")
    assert report.ok, report
    _, cache = forward(q, k, v, mask)
    dmask = backward(rng.standard_normal((2, 4, 7, 2)), cache)[3]
    assert dmask.shape == mask_shape


def test_mask_grad_naive_equals_tiled_and_a_row_constant_bias_gets_zero(rng):
    q, k, v = qkv(rng)
    dout = rng.standard_normal((2, 4, 7, 2))
    mask = rng.standard_normal((4, 7, 9))
    a = attention_backward(dout, attention_forward(q, k, v, mask=mask, window=(2, 2))[1], mask_grad=True)[3]
    b = flash_attention_backward(dout, flash_attention_forward(q, k, v, mask=mask, window=(2, 2), block_q=2,
                                                               block_k=3)[1], mask_grad=True)[3]
    np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-15)
    row_bias = rng.standard_normal((4, 7, 1))                   # constant along keys: softmax ignores it
    d = attention_backward(dout, attention_forward(q, k, v, mask=row_bias)[1], mask_grad=True)[3]
    assert np.abs(d).max() < 1e-14


@given(n=st.integers(2, 12), m=st.integers(2, 12), bq=st.integers(1, 6), bk=st.integers(1, 6),
       left=st.one_of(st.none(), st.integers(0, 6)), right=st.one_of(st.none(), st.integers(0, 6)),
       causal=st.sampled_from([False, True, "top-left"]), softcap=st.sampled_from([None, 0.7]),
       alibi=st.booleans(), mask_kind=st.sampled_from(["none", "float", "bool"]), seed=st.integers(0, 99))
def test_tiled_equals_naive_drawn(n, m, bq, bk, left, right, causal, softcap, alibi, mask_kind, seed):
    rng = np.random.default_rng(seed)
    q, k, v = qkv(rng, n, m, h=2, g=1, lead=(1,))
    mask = {"none": None, "float": rng.standard_normal((2, n, m)), "bool": rng.random((n, m)) > 0.3}[mask_kind]
    kw = dict(window=(left, right), causal=causal, softcap=softcap, mask=mask,
              alibi_slopes=np.array([0.3, 0.7]) if alibi else None)
    dout = rng.standard_normal((1, 2, n, 2))
    o, c = attention_forward(q, k, v, **kw)
    o_t, c_t = flash_attention_forward(q, k, v, block_q=bq, block_k=bk, **kw)
    np.testing.assert_allclose(o_t, o, rtol=1e-11, atol=1e-13)
    assert not np.isnan(o_t).any()                                # rows a window leaves empty: 0
    empty = ~(c.p > 0).any(-1)
    assert np.all(o[empty] == 0) and np.all(np.isinf(c_t.lse[empty]))
    for a, b in zip(flash_attention_backward(dout, c_t), attention_backward(dout, c)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n,m,block,window,causal", [(64, 64, 8, (7, 0), True), (48, 80, 8, (5, 3), False),
                                                      (80, 48, 16, (None, 0), "top-left")])
def test_tiled_op_visits_only_the_tiles_the_band_allows(rng, n, m, block, window, causal):
    q, k, v = qkv(rng, n, m, h=1, g=1, lead=())
    seen = []
    flash_attention_forward(q, k, v, block_q=block, block_k=block, window=window, causal=causal, workers=1,
                            on_tile=lambda t: seen.append((t.i, t.j)))
    _, cache = attention_forward(q, k, v, window=window, causal=causal)
    allowed = np.asarray(cache.p[0] > 0)                          # the band, from the naive op
    expected = [(i, j) for i in range(-(-n // block)) for j in range(-(-m // block))
                if allowed[i * block:(i + 1) * block, j * block:(j + 1) * block].any()]
    assert seen == expected
    assert len(seen) < (-(-n // block)) * (-(-m // block))


# --- planted bugs: each must make the reference comparison fail
def matches_reference(forward, q, k, v, **kw):
    o, _ = forward(q, k, v, **kw)
    return np.allclose(o, attention_reference(q, k, v, **kw)[0], rtol=1e-10, atol=1e-12)


def test_planted_window_off_by_one_is_caught(rng):
    q, k, v = qkv(rng, 7, 9)
    assert matches_reference(attention_forward, q, k, v, window=(2, 1))

    def off_by_one(q, k, v, window):
        return attention_forward(q, k, v, window=(window[0] + 1, window[1]))

    assert not matches_reference(off_by_one, q, k, v, window=(2, 1))


def test_planted_alibi_top_left_distance_is_caught(rng):
    q, k, v = qkv(rng, 5, 9)                                        # N != M: the two distances differ

    def top_left(q, k, v, alibi_slopes):
        n, m = q.shape[-2], k.shape[-2]
        dist = np.abs(np.arange(n)[:, None] - np.arange(m)[None, :])
        return attention_forward(q, k, v, mask=-alibi_slopes[:, None, None] * dist)

    assert matches_reference(attention_forward, q, k, v, alibi_slopes=SLOPES)
    assert not matches_reference(top_left, q, k, v, alibi_slopes=SLOPES)


def test_planted_softcap_after_the_bias_is_caught(rng, monkeypatch):
    q, k, v = qkv(rng)
    kw = dict(softcap=1.0, alibi_slopes=SLOPES)
    assert matches_reference(flash_attention_forward, q, k, v, **kw)
    original = scores_module.Scores.apply

    def softcap_last(self, xp, s5, rows, cols):
        s5, _ = original(self._replace(softcap=None), xp, s5, rows, cols)
        t = xp.tanh(s5 / self.softcap)
        return self.softcap * t, t

    monkeypatch.setattr(scores_module.Scores, "apply", softcap_last)
    assert not matches_reference(flash_attention_forward, q, k, v, **kw)
    assert not matches_reference(attention_forward, q, k, v, **kw)


@pytest.mark.parametrize("kw, err, words", [
    (dict(softcap=0.0), ValueError, "softcap must be > 0, got 0.0"),
    (dict(softcap="big"), TypeError, "softcap must be a finite real number"),
    (dict(window=(-1, 0)), ValueError, "window's left side must be >= 0, got -1"),
    (dict(window=(1, 2.5)), TypeError, "window's right side must be an int"),
    (dict(window=3), TypeError, r"window must be a pair \(left, right\)"),
    (dict(alibi_slopes=np.ones(3)), ValueError, r"alibi_slopes of shape \(3,\) does not broadcast to the heads \(2, 4\)"),
    (dict(alibi_slopes=np.ones(4, dtype=int)), TypeError, "alibi_slopes must be a real floating array"),
    (dict(causal="no"), ValueError, "causal must be True, False, 'bottom-right' or 'top-left', got 'no'"),
    (dict(causal=1), TypeError, "causal must be a bool"),
])
def test_bad_variant_arguments(rng, kw, err, words):
    q, k, v = qkv(rng)
    for forward in (attention_forward, flash_attention_forward):
        with pytest.raises(err, match=words):
            forward(q, k, v, **kw)


def test_mask_grad_needs_a_float_mask(rng):
    q, k, v = qkv(rng)
    dout = rng.standard_normal((2, 4, 7, 2))
    with pytest.raises(ValueError, match="mask_grad=True returns the gradient of a float mask; this forward had no mask"):
        attention_backward(dout, attention_forward(q, k, v)[1], mask_grad=True)
    with pytest.raises(ValueError, match="a bool mask"):
        flash_attention_backward(dout, flash_attention_forward(q, k, v, mask=np.ones((7, 9), bool))[1], mask_grad=True)
    with pytest.raises(TypeError, match="mask_grad must be a bool"):
        attention_backward(dout, attention_forward(q, k, v)[1], mask_grad=1)


def test_2d_inputs_take_scalar_slopes_and_windows(rng):
    q, k, v = rng.standard_normal((6, 3)), rng.standard_normal((8, 3)), rng.standard_normal((8, 2))
    kw = dict(alibi_slopes=np.array([0.4]), window=(1, 1), softcap=2.0, mask=rng.standard_normal((6, 8)))
    o_ref = attention_reference(q, k, v, **kw)[0]
    np.testing.assert_allclose(attention_forward(q, k, v, **kw)[0], o_ref, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(flash_attention_forward(q, k, v, block_q=4, block_k=3, **kw)[0], o_ref, rtol=1e-12,
                               atol=1e-14)
    dmask = flash_attention_backward(rng.standard_normal((6, 2)), flash_attention_forward(q, k, v, **kw)[1],
                                     mask_grad=True)[3]
    assert dmask.shape == (6, 8)


def test_backends(backend, rng):
    q, k, v = qkv(rng)
    kw = dict(softcap=2.0, window=(2, 1), causal=True)
    o_np = attention_forward(q, k, v, alibi_slopes=SLOPES, **kw)[0]
    args = [backend.asarray(a) for a in (q, k, v)]
    o, _ = attention_forward(*args, alibi_slopes=backend.asarray(SLOPES), **kw)
    o_t, _ = flash_attention_forward(*args, alibi_slopes=backend.asarray(SLOPES), block_q=3, block_k=2, **kw)
    np.testing.assert_allclose(backend.numpy(o), o_np, rtol=1e-13)
    np.testing.assert_allclose(backend.numpy(o_t), o_np, rtol=1e-12)
