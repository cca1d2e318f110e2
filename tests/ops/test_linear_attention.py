"""npattn/ops/linear_attention.py: the chunked forward equals the definition (S_i built row by row),
for every causal alignment, N != M both ways, grouped heads, normalize on and off, and any chunk;
the two-pass backward passes gradcheck; rows that see no key give 0, never NaN; the causal path
stays O(N) in memory; torch autograd on the explicit formula agrees."""

import tracemalloc

import numpy as np
import pytest

from npattn import gradcheck
from npattn.ops.linear_attention import (
    DEFAULT_CHUNK,
    LinearAttentionCache,
    feature_map,
    linear_attention_backward,
    linear_attention_forward,
)


def phi(x):
    return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))


def linear_attention_reference(q, k, v, *, causal=False, normalize=True, eps=1e-6):
    """The definition, slowly: for each row i, S_i = sum of phi(k_j) v_j^T and z_i = sum of phi(k_j)
    over the keys row i sees, then o_i = phi(q_i)^T S_i / (phi(q_i)^T z_i + eps). float64, loops."""
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    two_d = q.ndim == 2
    if two_d:
        q, k, v = q[None], k[None], v[None]
    H, G, N, M = q.shape[-3], k.shape[-3], q.shape[-2], k.shape[-2]
    offset = {False: None, True: M - N, "bottom-right": M - N, "top-left": 0}[causal]
    o = np.zeros(q.shape[:-1] + (v.shape[-1],))
    for lead in np.ndindex(q.shape[:-3]):
        for h in range(H):
            g = h // (H // G)
            for i in range(N):
                S, z = np.zeros((q.shape[-1], v.shape[-1])), np.zeros(q.shape[-1])
                for j in range(M):
                    if offset is None or j <= i + offset:
                        S += np.outer(phi(k[lead + (g, j)]), v[lead + (g, j)])
                        z += phi(k[lead + (g, j)])
                f = phi(q[lead + (h, i)])
                num, den = f @ S, f @ z + eps
                o[lead + (h, i)] = (num / den if den != 0 else 0.0) if normalize else num
    return o[0] if two_d else o


def make(rng, lead, h, g, n, m, d, dv):
    return (rng.standard_normal(lead + (h, n, d)), rng.standard_normal(lead + (g, m, d)),
            rng.standard_normal(lead + (g, m, dv)), rng.standard_normal(lead + (h, n, dv)))


@pytest.mark.parametrize("causal", [False, True, "top-left"])
@pytest.mark.parametrize("n, m", [(5, 8), (8, 5), (6, 6)])
@pytest.mark.parametrize("normalize", [True, False])
def test_forward_matches_the_definition(rng, causal, n, m, normalize):
    q, k, v, _ = make(rng, (2,), 4, 2, n, m, 3, 2)                       # GQA: H = 4, G = 2
    want = linear_attention_reference(q, k, v, causal=causal, normalize=normalize)
    for chunk in (1, 3, 4, 100, None):                                   # ragged, one row, one chunk, default
        o, _ = linear_attention_forward(q, k, v, causal=causal, normalize=normalize, chunk=chunk)
        np.testing.assert_allclose(o, want, rtol=1e-12, atol=1e-12, err_msg=f"chunk={chunk}")


@pytest.mark.parametrize("h, g", [(3, 3), (4, 1), (6, 2)])
def test_grouped_heads_and_2d(rng, h, g):
    q, k, v, _ = make(rng, (), h, g, 7, 9, 4, 3)
    o, _ = linear_attention_forward(q, k, v, causal=True, chunk=2)
    np.testing.assert_allclose(o, linear_attention_reference(q, k, v, causal=True), rtol=1e-12, atol=1e-13)
    o2, cache = linear_attention_forward(q[0], k[0], v[0], causal=True, chunk=2)   # 2-D: one head
    np.testing.assert_allclose(o2, o[0], rtol=1e-12, atol=1e-13)      # head 0 uses kv head 0
    grads = linear_attention_backward(o2 * 0.5 + 1.0, cache)
    assert [a.shape for a in grads] == [q[0].shape, k[0].shape, v[0].shape]


def test_grouped_heads_equal_repeated_keys(rng):
    """dk, dv of a group are the sums over its query heads: GQA equals MHA on repeated K, V summed back."""
    q, k, v, dout = make(rng, (2,), 6, 2, 5, 7, 3, 2)
    o, cache = linear_attention_forward(q, k, v, causal=True, chunk=2)
    k_rep, v_rep = np.repeat(k, 3, axis=-3), np.repeat(v, 3, axis=-3)
    o_rep, cache_rep = linear_attention_forward(q, k_rep, v_rep, causal=True, chunk=2)
    np.testing.assert_allclose(o, o_rep, rtol=1e-13)
    dq, dk, dv = linear_attention_backward(dout, cache)
    dq_r, dk_r, dv_r = linear_attention_backward(dout, cache_rep)
    np.testing.assert_allclose(dq, dq_r, rtol=1e-12)
    np.testing.assert_allclose(dk, dk_r.reshape(2, 2, 3, 7, 3).sum(2), rtol=1e-12)
    np.testing.assert_allclose(dv, dv_r.reshape(2, 2, 3, 7, 2).sum(2), rtol=1e-12)


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(causal=True, chunk=2),
    dict(causal=True, chunk=3, normalize=False),
    dict(causal="top-left", chunk=1, eps=0.0),
    dict(causal=True, chunk=100, eps=0.5),
])
@pytest.mark.parametrize("n, m", [(5, 7), (7, 4)])
def test_gradcheck(rng, kwargs, n, m):
    q, k, v, _ = make(rng, (2,), 4, 2, n, m, 3, 2)
    report = gradcheck(linear_attention_forward, linear_attention_backward, dict(q=q, k=k, v=v), kwargs=kwargs)
    assert report.ok, report
    assert len(report.rows) == 3


def test_chunk_does_not_change_the_result(rng):
    q, k, v, dout = make(rng, (1,), 2, 2, 37, 41, 4, 3)
    results = []
    for chunk in (1, 5, 16, 37, 1000):
        o, cache = linear_attention_forward(q, k, v, causal=True, chunk=chunk)
        results.append((o,) + linear_attention_backward(dout, cache))
    for other in results[1:]:
        for a, b in zip(other, results[0]):
            np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("eps", [1e-6, 0.0])
def test_rows_that_see_no_key_give_zero(rng, eps):
    q, k, v, dout = make(rng, (2,), 2, 2, 7, 4, 3, 2)                   # causal N > M: rows 0-2 see nothing
    o, cache = linear_attention_forward(q, k, v, causal=True, eps=eps, chunk=2)
    assert np.all(o[..., :3, :] == 0) and not np.isnan(o).any()
    dq, dk, dv = linear_attention_backward(dout, cache)
    assert np.all(dq[..., :3, :] == 0) and not any(np.isnan(a).any() for a in (dq, dk, dv))


def test_keys_no_row_sees_get_zero_gradient(rng):
    q, k, v, dout = make(rng, (1,), 2, 2, 4, 7, 3, 2)                   # top-left, M > N: keys 4-6 unseen
    o, cache = linear_attention_forward(q, k, v, causal="top-left", chunk=3)
    _, dk, dv = linear_attention_backward(dout, cache)
    assert np.all(dk[..., 4:, :] == 0) and np.all(dv[..., 4:, :] == 0)
    assert np.all(dv[..., :4, :] != 0)


def test_eps_zero_with_underflowing_features_is_not_nan(rng):
    """phi(-800) = exp(-800) underflows to 0: the row's denominator is exactly 0 with eps = 0."""
    q, k, v, dout = make(rng, (1,), 2, 2, 5, 6, 3, 2)
    q[..., 1, :] = -800.0
    k[..., 0, :] = -800.0                                               # row 0 (causal N < M sees keys 0, 1)
    for causal in (False, True):
        o, cache = linear_attention_forward(q, k, v, causal=causal, eps=0.0, chunk=2)
        assert np.all(o[..., 1, :] == 0) and not np.isnan(o).any()
        grads = linear_attention_backward(dout, cache)
        assert not any(np.isnan(a).any() for a in grads)


def test_large_inputs_do_not_overflow(rng):
    q, k, v, dout = make(rng, (1,), 2, 2, 5, 6, 3, 2)
    q, k = q * 1e3, k * 1e3                                             # exp(1000) would be inf; x + 1 is not
    o, cache = linear_attention_forward(q, k, v, causal=True, chunk=2)
    assert np.isfinite(o).all() and all(np.isfinite(a).all() for a in linear_attention_backward(dout, cache))
    np.testing.assert_allclose(o, linear_attention_reference(q, k, v, causal=True), rtol=1e-10)


def test_nan_propagates_to_the_rows_that_see_it(rng):
    q, k, v, _ = make(rng, (1,), 2, 2, 6, 6, 3, 2)
    k[0, 0, 3, 1] = np.nan                                              # key 3 of kv head 0
    o, _ = linear_attention_forward(q, k, v, causal=True, chunk=6)
    assert np.isnan(o[0, 0, 3:]).all()                                  # rows 3-5 of head 0 see it
    assert not np.isnan(o[0, 1]).any()                                  # head 1 does not
    q[0, 1, 2, 0] = np.nan
    o, _ = linear_attention_forward(q, k, v)
    assert np.isnan(o[0, 1, 2]).all()


def test_feature_map_and_its_derivative():
    x = np.array([-3.0, -1e-9, 0.0, 1e-9, 2.0, 800.0, np.nan])
    f, df = feature_map(np, x)
    np.testing.assert_allclose(f[:-1], [np.exp(-3.0), np.exp(-1e-9), 1.0, 1 + 1e-9, 3.0, 801.0], rtol=1e-15)
    np.testing.assert_allclose(df[:-1], [np.exp(-3.0), np.exp(-1e-9), 1.0, 1.0, 1.0, 1.0], rtol=1e-15)
    assert np.isnan(f[-1]) and np.isnan(df[-1])
    h = 1e-6                                                            # phi' by central differences
    xs = np.array([-2.0, -0.3, 0.4, 1.5])
    np.testing.assert_allclose((phi(xs + h) - phi(xs - h)) / (2 * h), feature_map(np, xs)[1], rtol=1e-8)


def _peak_bytes(n, d):
    rng = np.random.default_rng(0)
    q, k, v, dout = (rng.standard_normal((1, n, d)) for _ in range(4))
    tracemalloc.start()
    try:
        _, cache = linear_attention_forward(q, k, v, causal=True)
        linear_attention_backward(dout, cache)
        return tracemalloc.get_traced_memory()[1], cache
    finally:
        tracemalloc.stop()


def test_causal_path_never_builds_n_by_m():
    """Peak memory of the causal forward + backward at N = M = 4096 stays far below one N x M
    float64 array (128 MiB) and grows linearly in N (an N x M array would grow 16x for 4x N)."""
    n, d = 4096, 8
    peak, cache = _peak_bytes(n, d)
    small, _ = _peak_bytes(n // 4, d)
    assert peak < n * n * 8 / 20, peak                                  # ~3.7 MB; one N x M: 134 MB
    assert peak < 5 * small, (peak, small)                              # ~4x: O(N), not O(N^2)
    for name, value in cache._asdict().items():
        if hasattr(value, "shape"):
            assert value.size <= n * d, f"cache.{name} has shape {value.shape}"


@pytest.mark.parametrize("dtype, rtol", [(np.float32, 1e-5), (np.float16, 5e-3)])
def test_low_precision(rng, dtype, rtol):
    q, k, v, dout = make(rng, (1,), 4, 2, 9, 11, 8, 8)
    o64, c64 = linear_attention_forward(q, k, v, causal=True, chunk=4)
    g64 = linear_attention_backward(dout, c64)
    q, k, v, dout = (a.astype(dtype) for a in (q, k, v, dout))
    o, cache = linear_attention_forward(q, k, v, causal=True, chunk=4)
    grads = linear_attention_backward(dout, cache)
    assert o.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert cache.o.dtype == np.float32                                  # float16 is computed in float32
    want_o = linear_attention_forward(*(a.astype(np.float64) for a in (q, k, v)), causal=True, chunk=4)[0]
    np.testing.assert_allclose(o, want_o, rtol=rtol, atol=rtol)
    for got, want in zip(grads, g64):
        scale = np.abs(want).max()
        assert np.abs(got.astype(np.float64) - want).max() < 10 * rtol * scale + (0.05 * scale if dtype == np.float16 else 0)


def test_inputs_dout_and_cache_not_modified(rng):
    q, k, v, dout = make(rng, (1,), 2, 2, 5, 6, 3, 2)
    saved = [a.copy() for a in (q, k, v, dout)]
    o, cache = linear_attention_forward(q, k, v, causal=True, chunk=2)
    o_saved, den_saved = cache.o.copy(), cache.den.copy()
    linear_attention_backward(dout, cache)
    assert all(np.array_equal(a, s) for a, s in zip((q, k, v, dout), saved))
    assert np.array_equal(cache.o, o_saved) and np.array_equal(cache.den, den_saved)


@pytest.mark.parametrize("kwargs, err, words", [
    (dict(eps=-1e-3), ValueError, "eps must be a finite float >= 0, got -0.001"),
    (dict(eps=float("nan")), ValueError, "eps must be a finite float >= 0"),
    (dict(eps=float("inf")), ValueError, "eps must be a finite float >= 0"),
    (dict(eps="1e-6"), TypeError, "eps must be a finite float >= 0"),
    (dict(eps=True), TypeError, "eps must be a finite float >= 0"),
    (dict(normalize="yes"), TypeError, "normalize must be a bool, got 'yes'"),
    (dict(chunk=0), ValueError, "chunk must be >= 1, got 0"),
    (dict(chunk=2.5), TypeError, "chunk must be an int"),
    (dict(causal="diagonal"), ValueError, "causal must be True, False, 'bottom-right' or 'top-left'"),
    (dict(causal=1.0), TypeError, "causal must be a bool"),
])
def test_bad_arguments(rng, kwargs, err, words):
    q, k, v, _ = make(rng, (1,), 2, 2, 4, 6, 3, 2)
    with pytest.raises(err, match=words):
        linear_attention_forward(q, k, v, **kwargs)


def test_bad_inputs(rng):
    q, k, v, dout = make(rng, (1,), 4, 2, 4, 6, 3, 2)
    with pytest.raises(TypeError, match="q must be a real floating array, got dtype int64"):
        linear_attention_forward(q.astype(np.int64), k, v)
    with pytest.raises(TypeError, match="arrays must share one dtype"):
        linear_attention_forward(q, k.astype(np.float32), v)
    with pytest.raises(ValueError, match="must be a multiple of key/value heads G=3"):
        linear_attention_forward(q, np.concatenate([k, k[:, :1]], 1), np.concatenate([v, v[:, :1]], 1))
    with pytest.raises(ValueError, match="q and k must share the head dim D"):
        linear_attention_forward(q, k[..., :2], v)
    with pytest.raises(ValueError, match="k and v must share the key length M"):
        linear_attention_forward(q, k, v[..., :5, :])
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="one array library"):
        linear_attention_forward(q, torch.tensor(k), v)


def test_bad_backward_arguments(rng):
    q, k, v, dout = make(rng, (1,), 2, 2, 4, 6, 3, 2)
    _, cache = linear_attention_forward(q, k, v, causal=True)
    with pytest.raises(ValueError, match=r"dout must have the output's shape \(1, 2, 4, 2\)"):
        linear_attention_backward(dout[..., :3, :], cache)
    with pytest.raises(TypeError, match="dout must have the output's dtype float64, got float32"):
        linear_attention_backward(dout.astype(np.float32), cache)
    with pytest.raises(TypeError, match="cache must be the LinearAttentionCache returned by linear_attention_forward"):
        linear_attention_backward(dout, tuple(cache))
    assert isinstance(cache, LinearAttentionCache) and cache.chunk == DEFAULT_CHUNK


def test_wrong_backward_forms_are_caught(rng):
    """The test is able to fail: the classic mistakes of derivations/18-linear-attention.md fail gradcheck."""
    q, k, v, _ = make(rng, (1,), 2, 2, 5, 5, 3, 2)

    def no_denominator(dout, cache):                                    # dden dropped: only du = dout / den
        return linear_attention_backward(dout / cache.den, cache._replace(normalize=False))

    report = gradcheck(linear_attention_forward, no_denominator, dict(q=q, k=k, v=v), kwargs=dict(causal=True))
    assert not report.ok
    assert [r.ok for r in report.rows] == [False, False, True]          # dv never sees the denominator


def test_backends(backend, rng):
    q, k, v, dout = make(rng, (2,), 4, 2, 7, 5, 3, 2)
    args = [backend.asarray(a) for a in (q, k, v)]
    for causal in (True, False):
        o, cache = linear_attention_forward(*args, causal=causal, chunk=3)
        assert type(o) is type(args[0])
        grads = linear_attention_backward(backend.asarray(dout), cache)
        o_np, c_np = linear_attention_forward(q, k, v, causal=causal, chunk=3)
        np.testing.assert_allclose(backend.numpy(o), o_np, rtol=1e-12)
        for got, want in zip(grads, linear_attention_backward(dout, c_np)):
            np.testing.assert_allclose(backend.numpy(got), want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("causal", [False, True, "top-left"])
@pytest.mark.parametrize("n, m", [(9, 13), (13, 9)])
def test_against_torch_autograd(rng, causal, n, m):
    """torch float64: the explicit quadratic formula, (phi(Q) phi(K)^T masked) V / rowsum + eps,
    differentiated by autograd."""
    torch = pytest.importorskip("torch")
    q, k, v, dout = make(rng, (2,), 4, 2, n, m, 5, 3)
    o, cache = linear_attention_forward(q, k, v, causal=causal, chunk=4)
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    fq = torch.nn.functional.elu(tq) + 1
    fk = (torch.nn.functional.elu(tk) + 1).repeat_interleave(2, dim=-3)
    a = fq @ fk.transpose(-1, -2)                                       # (B, H, N, M)
    if causal is not False:
        offset = m - n if causal is True else 0
        a = a * torch.ones(n, m, dtype=torch.bool).tril(offset)
    to = (a @ tv.repeat_interleave(2, dim=-3)) / (a.sum(-1, keepdim=True) + 1e-6)
    to.backward(torch.tensor(dout))
    np.testing.assert_allclose(o, to.detach().numpy(), rtol=1e-12, atol=1e-13)
    for ours, theirs in zip(linear_attention_backward(dout, cache), (tq.grad, tk.grad, tv.grad)):
        np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-11, atol=1e-12)
