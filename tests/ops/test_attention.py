"""npattn/ops/attention.py: forward vs a looped reference, gradients by finite differences,
grouped-query, masks, causal alignment, dropout, fully masked rows, backends, bad input, torch."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from npattn import attention_backward, attention_forward, gradcheck
from tests.reference import attention_reference

# (lead, H, G, N, M, D, Dv): heads, lengths and head dims all differ somewhere
SHAPES = [((2,), 3, 3, 4, 5, 3, 2), ((), 4, 2, 6, 3, 2, 4), ((2, 1), 3, 1, 5, 5, 4, 3), ((1,), 2, 2, 3, 7, 5, 5)]


def make_qkv(rng, lead, h, g, n, m, d, dv):
    return rng.standard_normal(lead + (h, n, d)), rng.standard_normal(lead + (g, m, d)), rng.standard_normal(lead + (g, m, dv))


def masks(rng, lead, h, n, m):
    """The mask kinds of SPEC.md: none, bool (N, M), bool per batch and head, float (H, 1, M), float with -inf."""
    fmask = rng.standard_normal((n, m))
    fmask[0, :] = -np.inf                       # a row no key can be attended by (float mask)
    bmask = rng.random(lead + (h, n, m)) > 0.4
    bmask[..., -1, :] = False                   # a row no key can be attended by (bool mask)
    return {"none": None, "bool NxM": rng.random((n, m)) > 0.3, "bool full": bmask,
            "float Hx1xM": rng.standard_normal((h, 1, m)), "float -inf row": fmask}


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_kind", ["none", "bool NxM", "bool full", "float Hx1xM", "float -inf row"])
def test_forward_matches_reference(rng, shape, causal, mask_kind):
    lead, h, g, n, m, d, dv = shape
    q, k, v = make_qkv(rng, *shape)
    mask = masks(rng, lead, h, n, m)[mask_kind]
    o, cache = attention_forward(q, k, v, mask=mask, causal=causal)
    o_ref, p_ref, _ = attention_reference(q, k, v, mask=mask, causal=causal)
    np.testing.assert_allclose(o, o_ref, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(cache.p, p_ref, rtol=1e-12, atol=1e-15)
    assert not np.isnan(o).any()


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_kind", ["none", "bool full", "float Hx1xM"])
def test_gradcheck(rng, shape, causal, mask_kind):
    lead, h, g, n, m, d, dv = shape
    q, k, v = make_qkv(rng, *shape)
    kwargs = dict(mask=masks(rng, lead, h, n, m)[mask_kind], causal=causal, scale=0.8)
    report = gradcheck(attention_forward, attention_backward, dict(q=q, k=k, v=v), kwargs=kwargs)
    assert report.ok, report


def test_single_head_2d_and_custom_scale(rng):
    q, k, v = rng.standard_normal((5, 3)), rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
    o, _ = attention_forward(q, k, v, scale=0.3, causal=True)
    np.testing.assert_allclose(o, attention_reference(q, k, v, scale=0.3, causal=True)[0], rtol=1e-12)
    assert gradcheck(attention_forward, attention_backward, [q, k, v], kwargs=dict(scale=0.3)).ok


def test_causal_is_bottom_right_aligned(rng):
    n, m = 3, 5
    q, k, v = make_qkv(rng, (), 1, 1, n, m, 2, 2)
    _, cache = attention_forward(q, k, v, causal=True)
    allowed = cache.p[0] > 0
    # query i sees keys j <= i + M - N: row 0 sees keys 0..2, the last row sees all 5
    assert allowed.tolist() == [[j <= i + m - n for j in range(m)] for i in range(n)]
    _, cache = attention_forward(q[:, :1], k, v, causal=True)          # decoding: N = 1 sees every key
    assert np.all(cache.p > 0)


def test_grouped_query_equals_repeated_kv(rng):
    q, k, v = make_qkv(rng, (2,), 6, 2, 4, 5, 3, 2)
    dout = rng.standard_normal((2, 6, 4, 2))
    o, cache = attention_forward(q, k, v, causal=True)
    k_rep, v_rep = np.repeat(k, 3, axis=1), np.repeat(v, 3, axis=1)    # head h uses kv head h // 3
    o_rep, cache_rep = attention_forward(q, k_rep, v_rep, causal=True)
    np.testing.assert_allclose(o, o_rep, rtol=1e-13)
    dq, dk, dv = attention_backward(dout, cache)
    dq_r, dk_r, dv_r = attention_backward(dout, cache_rep)
    np.testing.assert_allclose(dq, dq_r, rtol=1e-12)
    np.testing.assert_allclose(dk, dk_r.reshape(2, 2, 3, 5, 3).sum(2), rtol=1e-12)
    np.testing.assert_allclose(dv, dv_r.reshape(2, 2, 3, 5, 2).sum(2), rtol=1e-12)
    assert cache.k is k and cache.v is v                               # no repeated copies kept


@pytest.mark.parametrize("kind", ["bool", "float", "causal"])
def test_fully_masked_rows_give_zero_and_no_nan(rng, kind):
    q, k, v = make_qkv(rng, (1,), 2, 2, 4, 3, 2, 2)
    if kind == "bool":
        kwargs = dict(mask=np.array([[True, False, True], [False, False, False], [True, True, True], [False, True, False]]))
    elif kind == "float":
        kwargs = dict(mask=np.where(np.arange(4)[:, None] == 1, -np.inf, 0.0) * np.ones((4, 3)))
    else:
        kwargs = dict(causal=True)             # N=4 > M=3: query 0 sees j <= -1, nothing
    row = 0 if kind == "causal" else 1
    o, cache = attention_forward(q, k, v, **kwargs)
    dout = rng.standard_normal(o.shape)
    dq, dk, dv = attention_backward(dout, cache)
    for a in (o, cache.p, dq, dk, dv):
        assert not np.isnan(a).any()
    assert np.all(o[..., row, :] == 0) and np.all(cache.p[..., row, :] == 0) and np.all(dq[..., row, :] == 0)
    assert np.abs(o[..., 2, :]).max() > 0
    assert gradcheck(attention_forward, attention_backward, dict(q=q, k=k, v=v), kwargs=kwargs).ok


def test_nan_in_input_propagates(rng):
    q, k, v = make_qkv(rng, (1,), 2, 2, 3, 4, 2, 2)
    q[0, 1, 2, 0] = np.nan
    o, _ = attention_forward(q, k, v)
    assert np.isnan(o[0, 1, 2]).all()
    assert not np.isnan(o[0, 0]).any() and not np.isnan(o[0, 1, :2]).any()


@given(st.integers(1, 3), st.integers(1, 4), st.integers(2, 5), st.integers(2, 5), st.booleans())
def test_masks_that_allow_nothing_give_zero(b, h, n, m, as_float):
    rng = np.random.default_rng(b * 100 + h * 10 + n + m)
    q, k, v = make_qkv(rng, (b,), h, h, n, m, 3, 2)
    mask = np.full((n, m), -np.inf) if as_float else np.zeros((b, h, n, m), dtype=bool)
    o, cache = attention_forward(q, k, v, mask=mask)
    grads = attention_backward(rng.standard_normal(o.shape), cache)
    assert np.array_equal(o, np.zeros_like(o))
    assert all(np.array_equal(g, np.zeros_like(g)) for g in grads)


class TestDropout:
    def test_same_seed_same_result_and_p_is_before_dropout(self, rng):
        q, k, v = make_qkv(rng, (2,), 3, 3, 4, 6, 3, 2)
        o1, c1 = attention_forward(q, k, v, dropout_p=0.4, rng=11)
        o2, c2 = attention_forward(q, k, v, dropout_p=0.4, rng=np.random.default_rng(11))
        o3, _ = attention_forward(q, k, v, dropout_p=0.4, rng=12)
        np.testing.assert_array_equal(o1, o2)
        assert not np.allclose(o1, o3)
        o0, c0 = attention_forward(q, k, v)
        np.testing.assert_allclose(c1.p, c0.p, rtol=1e-15)              # cache.p: after softmax, before dropout
        expected = (np.where(c1.keep, c0.p / 0.6, 0.0)) @ v
        np.testing.assert_allclose(o1, expected, rtol=1e-13)

    def test_keep_rate_and_mask_depends_only_on_seed_and_shape(self, rng):
        q, k, v = make_qkv(rng, (4,), 4, 4, 32, 32, 2, 2)
        _, c = attention_forward(q, k, v, dropout_p=0.25, rng=5)
        assert abs(c.keep.mean() - 0.75) < 0.02                          # 16384 draws: 3 sigma ~ 0.01
        _, c2 = attention_forward(q * 2, k, v + 1, dropout_p=0.25, rng=5)
        np.testing.assert_array_equal(c.keep, c2.keep)

    def test_gradcheck(self, rng):
        q, k, v = make_qkv(rng, (2,), 4, 2, 3, 5, 3, 2)
        report = gradcheck(attention_forward, attention_backward, dict(q=q, k=k, v=v),
                           kwargs=dict(dropout_p=0.3, rng=3, causal=True))
        assert report.ok, report


def test_backends(backend, rng):
    q, k, v = make_qkv(rng, (2,), 4, 2, 3, 5, 3, 2)
    mask = rng.random((3, 5)) > 0.3
    dout = rng.standard_normal((2, 4, 3, 2))
    args = [backend.asarray(a) for a in (q, k, v)]
    o, cache = attention_forward(*args, mask=backend.asarray(mask), causal=True, dropout_p=0.2, rng=4)
    assert type(o) is type(args[0]) and o.dtype == args[0].dtype
    grads = attention_backward(backend.asarray(dout), cache)
    o_np, c_np = attention_forward(q, k, v, mask=mask, causal=True, dropout_p=0.2, rng=4)
    np.testing.assert_allclose(backend.numpy(o), o_np, rtol=1e-13)
    for got, want in zip(grads, attention_backward(dout, c_np)):
        np.testing.assert_allclose(backend.numpy(got), want, rtol=1e-12)


@pytest.mark.parametrize("dtype, rtol", [(np.float32, 2e-5), (np.float16, 5e-3)])
def test_low_precision_keeps_dtype(rng, dtype, rtol):
    q, k, v = make_qkv(rng, (1,), 2, 2, 4, 5, 8, 8)
    o, cache = attention_forward(*(a.astype(dtype) for a in (q, k, v)))
    assert o.dtype == dtype
    ref = attention_reference(*(a.astype(dtype) for a in (q, k, v)))[0]
    np.testing.assert_allclose(o, ref, rtol=rtol, atol=rtol)
    assert all(g.dtype == dtype for g in attention_backward(np.ones(o.shape, dtype), cache))


def test_inputs_and_cache_not_modified(rng):
    q, k, v = make_qkv(rng, (1,), 2, 2, 3, 4, 2, 2)
    mask = rng.random((3, 4)) > 0.2
    dout = rng.standard_normal((1, 2, 3, 2))
    saved = [a.copy() for a in (q, k, v, mask, dout)]
    _, cache = attention_forward(q, k, v, mask=mask, dropout_p=0.1, rng=0)
    p, keep = cache.p.copy(), cache.keep.copy()
    attention_backward(dout, cache)
    assert all(np.array_equal(a, s) for a, s in zip((q, k, v, mask, dout), saved))
    assert np.array_equal(cache.p, p) and np.array_equal(cache.keep, keep)


@pytest.mark.parametrize("q_shape, k_shape, v_shape, kwargs, err, words", [
    ((3,), (3,), (3,), {}, ValueError, "same ndim >= 2"),
    ((2, 3, 4), (2, 5, 4), (2, 5), {}, ValueError, "same ndim"),
    ((2, 3, 4), (2, 5, 3), (2, 5, 4), {}, ValueError, "share the head dim D"),
    ((2, 3, 4), (2, 5, 4), (2, 6, 4), {}, ValueError, "share the key length M"),
    ((2, 3, 3, 4), (3, 2, 5, 4), (3, 2, 5, 4), {}, ValueError, "equal leading"),
    ((3, 3, 4), (2, 5, 4), (2, 5, 4), {}, ValueError, r"H=3 must be a multiple of key/value heads G=2"),
    ((2, 3, 4), (4, 5, 4), (4, 5, 4), {}, ValueError, "H % G"),
    ((2, 3, 4), (2, 5, 4), (1, 5, 4), {}, ValueError, "same number of heads G"),
    ((2, 3, 4), (2, 5, 4), (2, 5, 4), dict(mask=np.ones((4, 5), bool)), ValueError, r"mask of shape \(4, 5\)"),
    ((2, 3, 4), (2, 5, 4), (2, 5, 4), dict(mask=np.ones((3, 5), int)), TypeError, "mask must be a bool or floating"),
    ((2, 3, 4), (2, 5, 4), (2, 5, 4), dict(mask=np.ones((3, 5), np.float32)), TypeError, "float mask must have"),
    ((2, 3, 4), (2, 5, 4), (2, 5, 4), dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\), got 1.0"),
    ((2, 3, 4), (2, 5, 4), (2, 5, 4), dict(dropout_p=-0.1), ValueError, "dropout_p"),
    ((2, 3, 4), (2, 5, 4), (2, 5, 4), dict(scale="big"), TypeError, "scale must be a finite real"),
    ((2, 3, 4), (2, 5, 4), (2, 5, 4), dict(dropout_p=0.1, rng="x"), TypeError, "rng must be"),
])
def test_bad_shapes_and_arguments(q_shape, k_shape, v_shape, kwargs, err, words):
    q, k, v = np.ones(q_shape), np.ones(k_shape), np.ones(v_shape)
    with pytest.raises(err, match=words):
        attention_forward(q, k, v, **kwargs)


def test_bad_dtypes(rng):
    q = rng.standard_normal((2, 3, 4))
    with pytest.raises(TypeError, match="q must be a real floating array, got dtype int64"):
        attention_forward(np.ones((2, 3, 4), dtype=np.int64), q, q)
    with pytest.raises(TypeError, match="q is float64, k is float32, v is float64"):
        attention_forward(q, q.astype(np.float32), q)
    _, cache = attention_forward(q, q, q)
    with pytest.raises(ValueError, match=r"dout must have the output's shape \(2, 3, 4\)"):
        attention_backward(np.ones((2, 4, 3)), cache)


class TestAgainstTorch:
    """PyTorch as an outside oracle; skipped when torch is not installed."""

    @pytest.fixture(autouse=True)
    def _torch(self):
        self.torch = pytest.importorskip("torch")

    def sdpa(self, q, k, v, dout, **kwargs):
        torch = self.torch
        tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
        if isinstance(kwargs.get("attn_mask"), np.ndarray):
            kwargs["attn_mask"] = torch.tensor(kwargs["attn_mask"])
        o = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, **kwargs)
        o.backward(torch.tensor(dout))
        return o.detach().numpy(), tq.grad.numpy(), tk.grad.numpy(), tv.grad.numpy()

    @pytest.mark.parametrize("case", ["plain", "causal N=M", "bool mask", "float mask", "gqa", "causal N<M"])
    def test_forward_and_gradients(self, rng, case):
        n, m = (4, 6) if case == "causal N<M" else (5, 5) if case == "causal N=M" else (4, 6)
        g = 2 if case == "gqa" else 4
        q, k, v = make_qkv(rng, (2,), 4, g, n, m, 3, 5)
        dout = rng.standard_normal((2, 4, n, 5))
        ours, theirs = {}, {}
        if case == "causal N=M":
            ours, theirs = dict(causal=True), dict(is_causal=True)
        elif case == "causal N<M":                # torch's is_causal is top-left: pass bottom-right as a mask
            ours, theirs = dict(causal=True), dict(attn_mask=np.tril(np.ones((n, m), bool), k=m - n))
        elif case == "bool mask":
            mask = rng.random((2, 1, n, m)) > 0.3
            mask[..., 0] = True                   # torch gives NaN for rows with no key; npattn gives 0
            ours, theirs = dict(mask=mask), dict(attn_mask=mask)
        elif case == "float mask":
            mask = rng.standard_normal((n, m))
            ours, theirs = dict(mask=mask), dict(attn_mask=mask)
        elif case == "gqa":
            theirs = dict(enable_gqa=True)
        o, cache = attention_forward(q, k, v, **ours)
        expected = self.sdpa(q, k, v, dout, **theirs)
        got = (o,) + attention_backward(dout, cache)
        for a, b in zip(got, expected):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)


# --- workers: the naive op's independent (batch, kv-group) slices on threads
@pytest.mark.parametrize("shape", [((3,), 4, 2, 5, 6, 3, 2), ((1,), 6, 3, 4, 4, 2, 3), ((2, 3), 2, 1, 3, 5, 4, 4)], ids=str)
@pytest.mark.parametrize("mask_kind", ["none", "bool full", "float Hx1xM"])
@pytest.mark.parametrize("workers", [2, 3, 5])
def test_workers_match_one_worker(rng, shape, mask_kind, workers):
    lead, h, g, n, m, d, dv = shape
    q, k, v = make_qkv(rng, *shape)
    mask = masks(rng, lead, h, n, m)[mask_kind]
    dout = rng.standard_normal(lead + (h, n, dv))
    kw = dict(mask=mask, causal=True, dropout_p=0.2, rng=5)
    o1, c1 = attention_forward(q, k, v, workers=1, **kw)
    ow, cw = attention_forward(q, k, v, workers=workers, **kw)
    assert cw.workers == workers and c1.workers == 1
    np.testing.assert_allclose(ow, o1, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(cw.p, c1.p, rtol=1e-13, atol=1e-15)
    for a, b in zip(attention_backward(dout, cw), attention_backward(dout, c1)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(attention_backward(dout, cw)[0], attention_backward(dout, cw)[0])   # reproducible


def test_workers_split_the_widest_axis_at_group_boundaries(rng):
    from npattn.ops.attention import _split

    q, k, _ = make_qkv(rng, (1,), 6, 3, 2, 2, 2, 2)
    split = _split(q, k, 2)
    assert split.axis == 1 and split.r == 2 and split.ranges == [(0, 1), (1, 3)]   # kv groups, 2 q heads each
    q, k, _ = make_qkv(rng, (4,), 8, 8, 2, 2, 2, 2)
    assert _split(q, k, 2).axis == 0                                             # outermost axis that fits
    q, k, _ = make_qkv(rng, (5,), 2, 2, 2, 2, 2, 2)
    assert _split(q, k, 2).axis == 0                                             # the batch axis is wider
    assert _split(q[0, 0], k[0, 0], 2) is None                                   # 2-D: one head, nothing to cut


def test_workers_gradcheck_and_default_rule(rng):
    from npattn.ops.attention import NAIVE_THREADS_MIN_SCORES, resolve_naive_workers

    q, k, v = make_qkv(rng, (2,), 4, 2, 3, 4, 2, 2)
    report = gradcheck(attention_forward, attention_backward, dict(q=q, k=k, v=v), kwargs=dict(workers=2, causal=True))
    assert report.ok, report
    assert attention_forward(q, k, v)[1].workers == 1                            # small: one worker by default
    assert resolve_naive_workers(np, None, NAIVE_THREADS_MIN_SCORES - 1) == 1
    from npattn.backend import default_workers

    assert resolve_naive_workers(np, None, NAIVE_THREADS_MIN_SCORES) == default_workers(np)
    assert resolve_naive_workers(np, 3, 10) == 3
    with pytest.raises(ValueError, match="workers must be >= 1"):
        attention_forward(q, k, v, workers=0)
