"""npattn/ops/flash.py: the tiled op equals the naive one (float64, ~1e-12) for every feature and
any block sizes; dlse by finite differences; the cache holds nothing N*M-sized; causal tiles are
skipped; the loop can be watched."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from npattn import attention_backward, attention_forward, gradcheck
from npattn.checks import flash_with_lse_backward, flash_with_lse_forward
from npattn.ops import FlashTile, flash_attention_backward, flash_attention_forward
from tests.reference import attention_reference


def make(rng, lead, h, g, n, m, d, dv):
    return (rng.standard_normal(lead + (h, n, d)), rng.standard_normal(lead + (g, m, d)),
            rng.standard_normal(lead + (g, m, dv)), rng.standard_normal(lead + (h, n, dv)))


def assert_tiled_equals_naive(q, k, v, dout, *, block_q, block_k, rtol=1e-12, **kwargs):
    o_n, c_n = attention_forward(q, k, v, **kwargs)
    o_t, c_t = flash_attention_forward(q, k, v, block_q=block_q, block_k=block_k, **kwargs)
    np.testing.assert_allclose(o_t, o_n, rtol=rtol, atol=rtol * max(np.abs(o_n).max(), 1.0))
    for name, a, b in zip("qkv", flash_attention_backward(dout, c_t), attention_backward(dout, c_n)):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * max(np.abs(b).max(), 1.0), err_msg=f"d{name}")
    assert not any(np.isnan(a).any() for a in (o_t, c_t.lse))
    return c_t


shapes = st.tuples(st.sampled_from([(), (2,)]), st.sampled_from([(1, 1), (2, 2), (4, 2), (3, 1), (3, 3)]),
                   st.integers(1, 12), st.integers(1, 12), st.integers(1, 4), st.integers(1, 4))
blocks = st.sampled_from([1, 2, 3, 5, 7, 13, 64])


@given(shapes, blocks, blocks, st.booleans(), st.sampled_from(["none", "bool", "float"]), st.integers(0, 2**16))
def test_tiled_equals_naive(shape, block_q, block_k, causal, mask_kind, seed):
    lead, (h, g), n, m, d, dv = shape
    rng = np.random.default_rng(seed)
    q, k, v, dout = make(rng, lead, h, g, n, m, d, dv)
    mask = {"none": None, "bool": rng.random((h, n, m)) > 0.4, "float": rng.standard_normal((1, n, m))}[mask_kind]
    assert_tiled_equals_naive(q, k, v, dout, block_q=block_q, block_k=block_k, causal=causal, mask=mask)


@pytest.mark.parametrize("n, m", [(7, 12), (12, 7), (9, 9), (1, 10)])
@pytest.mark.parametrize("block_q, block_k", [(1, 1), (3, 5), (4, 4), (16, 2), (100, 100)])
def test_causal_cross_lengths(rng, n, m, block_q, block_k):
    q, k, v, dout = make(rng, (2,), 4, 2, n, m, 3, 2)
    cache = assert_tiled_equals_naive(q, k, v, dout, block_q=block_q, block_k=block_k, causal=True)
    _, _, lse = attention_reference(q, k, v, causal=True)
    np.testing.assert_allclose(cache.lse, lse, rtol=1e-13)            # -inf rows compare equal
    assert np.all(np.isneginf(cache.lse[..., : max(0, n - m)]))


def test_fully_masked_rows_give_zero_and_lse_minus_inf(rng):
    q, k, v, dout = make(rng, (1,), 2, 2, 5, 6, 3, 2)
    mask = rng.random((5, 6)) > 0.5
    mask[2] = False
    o, cache = flash_attention_forward(q, k, v, mask=mask, block_q=2, block_k=4)
    assert np.all(o[..., 2, :] == 0) and np.all(np.isneginf(cache.lse[..., 2]))
    dq, dk, dv = flash_attention_backward(dout, cache)
    assert np.all(dq[..., 2, :] == 0) and not np.isnan(dk).any() and not np.isnan(dv).any()


def test_2d_single_head(rng):
    q, k, v = rng.standard_normal((6, 3)), rng.standard_normal((4, 3)), rng.standard_normal((4, 5))
    dout = rng.standard_normal((6, 5))
    cache = assert_tiled_equals_naive(q, k, v, dout, block_q=4, block_k=3, causal=True, scale=0.5)
    assert cache.lse.shape == (6,) and cache.o.shape == (6, 5)


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_including_dlse(rng, causal):
    q, k, v, _ = make(rng, (2,), 4, 2, 5, 7, 3, 2)
    report = gradcheck(flash_with_lse_forward, flash_with_lse_backward, dict(q=q, k=k, v=v),
                       kwargs=dict(causal=causal, block_q=2, block_k=3, mask=rng.standard_normal((4, 5, 7))))
    assert report.ok, report


def test_dlse_matches_naive_logsumexp_gradient(rng):
    """d lse / d s = p, so a dlse adds p * dlse to ds: compare against naive attention whose loss
    includes sum(lse * dlse) through the softmax identity dlse_i * p_ij."""
    q, k, v, dout = make(rng, (1,), 2, 2, 4, 5, 3, 2)
    dlse = rng.standard_normal((1, 2, 4))
    _, cache = flash_attention_forward(q, k, v, block_q=3, block_k=2)
    dq, dk, _ = flash_attention_backward(np.zeros_like(dout), cache, dlse=dlse)
    p = attention_forward(q, k, v)[1].p
    ds = p * dlse[..., None]                                            # (B, H, N, M)
    scale = 1 / np.sqrt(3)
    np.testing.assert_allclose(dq, scale * ds @ k, rtol=1e-12)
    np.testing.assert_allclose(dk, scale * np.swapaxes(ds, -1, -2) @ q, rtol=1e-12)


def test_cache_holds_no_n_by_m_array(rng):
    n = m = 64
    q, k, v, dout = make(rng, (1,), 2, 2, n, m, 4, 4)
    mask = rng.random((n, m)) > 0.5
    _, cache = flash_attention_forward(q, k, v, mask=mask, block_q=16, block_k=16)
    for name, value in cache._asdict().items():
        if hasattr(value, "shape") and value is not cache.mask:
            assert np.prod(value.shape) < n * m * 2, f"cache.{name} has shape {value.shape}"
    assert cache.mask.base is mask or cache.mask is mask                  # the caller's array, not a copy


def test_backward_never_allocates_n_by_m(rng, monkeypatch):
    """Every array the backward's tile loop creates is at most block_q x block_k per head."""
    import npattn.ops.flash as flash

    n, m, bq, bk = 40, 48, 8, 16
    q, k, v, dout = make(rng, (), 2, 2, n, m, 4, 4)
    _, cache = flash_attention_forward(q, k, v, block_q=bq, block_k=bk)
    largest = []
    real_exp_ = flash.exp_

    def spy_exp_(xp, x):                                                # every p tile goes through exp_
        largest.append(x.shape[-2] * x.shape[-1])
        return real_exp_(xp, x)

    monkeypatch.setattr(flash, "exp_", spy_exp_)
    flash.flash_attention_backward(dout, cache)
    assert largest and max(largest) <= bq * bk


def test_causal_skips_tiles_above_the_diagonal(rng):
    q, k, v, _ = make(rng, (1,), 1, 1, 16, 16, 2, 2)
    seen_full, seen_causal = [], []
    flash_attention_forward(q, k, v, block_q=4, block_k=4, workers=1, on_tile=lambda t: seen_full.append((t.i, t.j)))
    flash_attention_forward(q, k, v, block_q=4, block_k=4, workers=1, causal=True,
                            on_tile=lambda t: seen_causal.append((t.i, t.j)))
    assert len(seen_full) == 16
    assert seen_causal == [(i, j) for i in range(4) for j in range(i + 1)]   # 10 of 16 tiles


def test_watching_the_online_softmax(rng):
    q, k, v, _ = make(rng, (2,), 3, 3, 5, 9, 2, 2)
    tiles = []
    o, cache = flash_attention_forward(q, k, v, block_q=5, block_k=3, workers=1, on_tile=tiles.append)
    assert [(t.i, t.j) for t in tiles] == [(0, 0), (0, 1), (0, 2)]
    assert all(isinstance(t, FlashTile) and t.m_i.shape == (2, 3, 5) for t in tiles)
    assert np.all(tiles[0].alpha == 0)                                   # nothing to rescale at first
    assert all(np.all((t.alpha > 0) & (t.alpha <= 1)) for t in tiles[1:])
    # after the last tile, m_i + log(l_i) is the log-sum-exp the cache keeps
    np.testing.assert_allclose(tiles[-1].m_i + np.log(tiles[-1].l_i), cache.lse, rtol=1e-13)


def test_backends(backend, rng):
    q, k, v, dout = make(rng, (2,), 4, 2, 7, 5, 3, 2)
    mask = rng.random((4, 7, 5)) > 0.3
    args = [backend.asarray(a) for a in (q, k, v)]
    o, cache = flash_attention_forward(*args, mask=backend.asarray(mask), causal=True, block_q=3, block_k=2)
    assert type(o) is type(args[0])
    grads = flash_attention_backward(backend.asarray(dout), cache, dlse=backend.asarray(rng.standard_normal((2, 4, 7))))
    o_np, c_np = attention_forward(q, k, v, mask=mask, causal=True)
    np.testing.assert_allclose(backend.numpy(o), o_np, rtol=1e-12)
    assert len(grads) == 3 and grads[1].shape == k.shape


@pytest.mark.parametrize("dtype, rtol", [(np.float32, 1e-5), (np.float16, 5e-3)])
def test_low_precision(rng, dtype, rtol):
    q, k, v, dout = (a.astype(dtype) for a in make(rng, (1,), 2, 2, 9, 11, 8, 8))
    o, cache = flash_attention_forward(q, k, v, block_q=4, block_k=4)
    assert o.dtype == dtype and all(g.dtype == dtype for g in flash_attention_backward(dout, cache))
    np.testing.assert_allclose(o, attention_forward(q, k, v)[0], rtol=rtol, atol=rtol)


def test_inputs_not_modified(rng):
    q, k, v, dout = make(rng, (1,), 2, 2, 5, 6, 3, 2)
    saved = [a.copy() for a in (q, k, v, dout)]
    _, cache = flash_attention_forward(q, k, v, block_q=2, block_k=4)
    o, lse = cache.o.copy(), cache.lse.copy()
    flash_attention_backward(dout, cache)
    assert all(np.array_equal(a, s) for a, s in zip((q, k, v, dout), saved))
    assert np.array_equal(cache.o, o) and np.array_equal(cache.lse, lse)


@pytest.mark.parametrize("kwargs, err, words", [
    (dict(block_q=0), ValueError, "block_q must be >= 1, got 0"),
    (dict(block_k=-3), ValueError, "block_k must be >= 1, got -3"),
    (dict(block_q=2.5), TypeError, "block_q must be an int"),
    (dict(mask=np.ones((5, 5), bool)), ValueError, r"mask of shape \(5, 5\) does not broadcast"),
])
def test_bad_arguments(rng, kwargs, err, words):
    q, k, v, _ = make(rng, (1,), 2, 2, 4, 6, 3, 2)
    with pytest.raises(err, match=words):
        flash_attention_forward(q, k, v, **kwargs)


def test_bad_backward_arguments(rng):
    q, k, v, dout = make(rng, (1,), 2, 2, 4, 6, 3, 2)
    _, cache = flash_attention_forward(q, k, v)
    with pytest.raises(ValueError, match=r"dlse must have lse's shape \(1, 2, 4\)"):
        flash_attention_backward(dout, cache, dlse=np.ones((1, 2, 6)))
    with pytest.raises(ValueError, match="dout must have the output's shape"):
        flash_attention_backward(dout[..., :1], cache)
    with pytest.raises(ValueError, match="H % G"):
        flash_attention_forward(q, k[:, :1].repeat(3, 1), v[:, :1].repeat(3, 1))


# --- workers: FlashAttention-2's parallel grid on CPU threads (derivations/14-parallel-tiles.md, eqs. (14.1)-(14.2))

def run_pair(q, k, v, dout, workers, **kwargs):
    o, cache = flash_attention_forward(q, k, v, workers=workers, **kwargs)
    return (o, cache.lse) + flash_attention_backward(dout, cache)


@given(shapes, blocks, blocks, st.booleans(), st.sampled_from(["none", "bool"]), st.integers(2, 5),
       st.integers(0, 2**16))
def test_workers_match_one_worker(shape, block_q, block_k, causal, mask_kind, workers, seed):
    lead, (h, g), n, m, d, dv = shape
    rng = np.random.default_rng(seed)
    q, k, v, dout = make(rng, lead, h, g, n, m, d, dv)
    mask = None if mask_kind == "none" else rng.random((h, n, m)) > 0.4
    kw = dict(block_q=block_q, block_k=block_k, causal=causal, mask=mask)
    o1, lse1, dq1, dk1, dv1 = run_pair(q, k, v, dout, 1, **kw)
    o, lse, dq, dk, dv = run_pair(q, k, v, dout, workers, **kw)
    # each query tile (forward) and key tile (dk, dv) runs the same operations: the same bits
    for name, a, b in [("o", o, o1), ("lse", lse, lse1), ("dk", dk, dk1), ("dv", dv, dv1)]:
        np.testing.assert_array_equal(a, b, err_msg=name)
    # dq sums the shares' partials: regrouped, so equal only to rounding
    np.testing.assert_allclose(dq, dq1, rtol=1e-13, atol=1e-13 * max(np.abs(dq1).max(), 1.0))
    # the share of every tile is fixed, so a rerun gives the same bits
    np.testing.assert_array_equal(run_pair(q, k, v, dout, workers, **kw)[2], dq)


def test_workers_gradcheck_and_backward_override(rng):
    q, k, v, dout = make(rng, (2,), 4, 2, 17, 21, 3, 5)
    report = gradcheck(flash_with_lse_forward, flash_with_lse_backward, dict(q=q, k=k, v=v),
                       kwargs=dict(causal=True, block_q=4, block_k=3, workers=3))
    assert report.ok, report
    _, cache = flash_attention_forward(q, k, v, block_q=4, block_k=3, workers=1)      # forward on 1 worker
    assert cache.workers == 1
    serial = flash_attention_backward(dout, cache)
    for a, b in zip(flash_attention_backward(dout, cache, workers=4), serial):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-14)


def test_workers_see_every_tile_and_pass_errors_on(rng):
    q, k, v, _ = make(rng, (1,), 2, 2, 10, 10, 3, 2)
    seen = []
    flash_attention_forward(q, k, v, causal=True, block_q=3, block_k=3, workers=2,
                            on_tile=lambda t: seen.append((t.i, t.j)))
    assert sorted(seen) == [(i, j) for i in range(4) for j in range(i + 1)]

    def fail(t):
        if t.i == 3:
            raise RuntimeError("raised in a worker")
    with pytest.raises(RuntimeError, match="raised in a worker"):
        flash_attention_forward(q, k, v, block_q=3, block_k=3, workers=2, on_tile=fail)


def test_workers_restore_blas_threads(rng):
    threadpoolctl = pytest.importorskip("threadpoolctl")

    def blas_threads():
        return [lib["num_threads"] for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas"]

    before, inside = blas_threads(), []
    q, k, v, dout = make(rng, (1,), 2, 2, 12, 12, 3, 2)
    _, cache = flash_attention_forward(q, k, v, block_q=4, block_k=4, workers=2,
                                       on_tile=lambda t: inside.append(blas_threads()))
    flash_attention_backward(dout, cache)
    assert inside and all(n == [1] * len(before) for n in inside)         # one BLAS thread per worker
    assert blas_threads() == before


def test_workers_on_backends(backend, rng):
    q, k, v, dout = make(rng, (1,), 4, 2, 9, 7, 3, 2)
    args = [backend.asarray(a) for a in (q, k, v)]
    if backend.name in ("cupy", "torch-cuda", "no-host"):
        with pytest.raises(ValueError, match="arrays on a device .* need workers=1"):
            flash_attention_forward(*args, workers=2)
        return
    o, cache = flash_attention_forward(*args, causal=True, block_q=2, block_k=3, workers=2)
    dq, dk, dv = flash_attention_backward(backend.asarray(dout), cache)
    o_n, c_n = attention_forward(q, k, v, causal=True)
    np.testing.assert_allclose(backend.numpy(o), o_n, rtol=1e-12)
    for a, b in zip((dq, dk, dv), attention_backward(dout, c_n)):
        np.testing.assert_allclose(backend.numpy(a), b, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("workers, err, words", [
    (0, ValueError, "workers must be >= 1, got 0"),
    (2.0, TypeError, "workers must be an int, got 2.0"),
    (True, TypeError, "workers must be an int, got True"),
])
def test_bad_workers(rng, workers, err, words):
    q, k, v, dout = make(rng, (1,), 2, 2, 4, 6, 3, 2)
    with pytest.raises(err, match=words):
        flash_attention_forward(q, k, v, workers=workers)
    _, cache = flash_attention_forward(q, k, v)
    with pytest.raises(err, match=words):
        flash_attention_backward(dout, cache, workers=workers)


def test_workers_without_threadpoolctl_is_a_clear_error(rng, monkeypatch):
    import npattn.backend
    monkeypatch.setattr(npattn.backend, "_blas_controller", lambda: None)
    q, k, v, _ = make(rng, (1,), 2, 2, 4, 6, 3, 2)
    with pytest.raises(ModuleNotFoundError, match=r"workers=2 needs threadpoolctl.*npattn\[threads\]"):
        flash_attention_forward(q, k, v, workers=2)
    flash_attention_forward(q, k, v, workers=1)                          # one worker needs nothing


def test_against_torch_fused_kernel(rng):
    torch = pytest.importorskip("torch")
    q, k, v, dout = make(rng, (2,), 4, 4, 33, 33, 8, 8)
    o, cache = flash_attention_forward(q, k, v, causal=True, block_q=8, block_k=16)
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    to = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True)
    to.backward(torch.tensor(dout))
    np.testing.assert_allclose(o, to.detach().numpy(), rtol=1e-10, atol=1e-12)
    for ours, theirs in zip(flash_attention_backward(dout, cache), (tq.grad, tk.grad, tv.grad)):
        np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-10, atol=1e-12)


# --- defaults (issue 8): None resolves to the measured rule, and gives the naive op's numbers
def test_default_tiling_rule():
    from npattn.backend import default_workers
    from npattn.ops.flash import DEFAULT_BLOCK, SLICE_THREADS_MIN_SCORES, TILES_PER_WORKER, default_tiling

    cores = default_workers(np)
    assert default_tiling(np, 4096, None, None, None) == (DEFAULT_BLOCK, DEFAULT_BLOCK, min(cores, 16 // TILES_PER_WORKER))
    assert default_tiling(np, 512, None, None, None)[2] == 1                 # 2 query tiles: one worker
    assert default_tiling(np, 1024, None, None, None)[2] == min(cores, 2)
    assert default_tiling(np, 100, 7, 9, 3) == (7, 9, 3)                     # explicit values are honored
    big = SLICE_THREADS_MIN_SCORES                                           # slices to split: every core
    assert default_tiling(np, 512, None, None, None, slices=4, scores=big)[2] == cores
    assert default_tiling(np, 512, None, None, None, slices=4, scores=big - 1)[2] == 1
    assert default_tiling(np, 512, None, None, None, slices=1, scores=big)[2] == 1   # one head: tiles
    q = np.zeros((4, 8, 512, 1), dtype=np.float32)                          # B*H*N*M = 2^23, two query tiles
    assert flash_attention_forward(q, q, q)[1].workers == cores


def test_defaults_equal_the_naive_op_and_are_reproducible(rng):
    q, k, v, dout = make(rng, (1,), 4, 2, 600, 530, 16, 8)
    o, cache = flash_attention_forward(q, k, v, causal=True)
    assert (cache.block_q, cache.block_k) == (256, 256)
    o_n, c_n = attention_forward(q, k, v, causal=True)
    np.testing.assert_allclose(o, o_n, rtol=1e-12, atol=1e-14)
    grads = flash_attention_backward(dout, cache)
    for a, b in zip(grads, attention_backward(dout, c_n)):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-13)
    again = flash_attention_backward(dout, flash_attention_forward(q, k, v, causal=True)[1])
    for a, b in zip(grads, again):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("size", [1e4, 1e10])
def test_backward_recomputes_the_forwards_scores_exactly(rng, size):
    """The backward recomputes p as exp(s - m) / l with the forward's own scaled q tiles, m and 1/l:
    at float32 scores ~1e4 dv is as accurate as the naive op's (recomputing from lse = m + log l
    lost |m| eps and put dv off by 9e-5), and nothing overflows at 1e10."""
    q, k = (rng.standard_normal((1, 2, 64, 16)) * np.sqrt(size) for _ in range(2))
    v, dout = rng.standard_normal((1, 2, 64, 8)), rng.standard_normal((1, 2, 64, 8))
    q32, k32, v32, d32 = (a.astype(np.float32) for a in (q, k, v, dout))
    truth = attention_backward(d32.astype(np.float64), attention_forward(*(a.astype(np.float64) for a in (q32, k32, v32)))[1])
    grads = flash_attention_backward(d32, flash_attention_forward(q32, k32, v32, block_q=16, block_k=16)[1])
    assert all(np.isfinite(g).all() for g in grads)
    if size < 1e5:                                  # at 1e10, float32 scores themselves round past near-ties
        np.testing.assert_allclose(grads[2], truth[2], atol=2e-6)       # measured 3.3e-7; via lse: 9e-5


@pytest.mark.parametrize("mask_kind", [None, "float"])
def test_workers_over_slices_are_bitwise_the_one_worker_result(rng, mask_kind):
    """With at least as many batch entries or kv groups as workers, each worker runs its own slices
    (derivations/14-parallel-tiles.md, eq. (14.3)): every output, dq and dmask included, is bitwise
    the one-worker result. One head falls back to sharing tiles: o, dk, dv bitwise, dq by rounding."""
    for shape_q, shape_k in (((2, 4, 37, 5), (2, 2, 29, 5)), ((1, 1, 37, 5), (1, 1, 29, 5))):
        q, k, v = rng.standard_normal(shape_q), rng.standard_normal(shape_k), rng.standard_normal(shape_k)
        dout = rng.standard_normal(shape_q)
        mask = None if mask_kind is None else rng.standard_normal((shape_q[1], 37, 29))
        out = {}
        for w in (1, 2):
            o, cache = flash_attention_forward(q, k, v, mask=mask, causal=True, block_q=8, block_k=8, workers=w)
            out[w] = (o,) + flash_attention_backward(dout, cache, mask_grad=mask is not None)
        slices = shape_q[0] * shape_k[1] >= 2
        for name, a, b in zip(("o", "dq", "dk", "dv", "dmask"), out[1], out[2]):
            if (slices and name != "dmask") or name not in ("dq", "dmask"):
                assert np.array_equal(a, b), (shape_q, name)
            else:                                     # dq from tile shares; dmask summed per worker
                np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-14)


def test_causal_and_a_window_that_exclude_each_other_give_zero(rng):
    """causal="top-left" with M > N and a window right of the diagonal: no row sees a key, and
    every tile's columns cut to the band are empty (lo > hi). o = 0 and zero gradients, as the
    naive op, for one worker and for two (regression: an empty tile reached max())."""
    q, k, v, dout = make(rng, (1,), 2, 2, 7, 13, 3, 2)
    kwargs = dict(causal="top-left", window=(0, 0))
    o_n, c_n = attention_forward(q, k, v, **kwargs)
    for w in (1, 2):
        o, cache = flash_attention_forward(q, k, v, block_q=3, block_k=5, workers=w, **kwargs)
        assert np.array_equal(o, o_n) and not o.any() and np.all(cache.lse == -np.inf)
        for g, g_n in zip(flash_attention_backward(dout, cache), attention_backward(dout, c_n)):
            assert np.array_equal(g, g_n) and not g.any()


def test_snake_shares_balance_causal_tiles():
    """Causal query tile i has i + 1 key tiles; the snake gives both shares the same total."""
    from npattn.ops.flash import _shares

    shares = _shares(16, 2)
    assert sorted(i for s in shares for i in s) == list(range(16))
    assert [sum(i + 1 for i in s) for s in shares] == [68, 68]
    assert _shares(5, 3) == [[0, 4], [1, 3], [2]] and _shares(1, 4) == [[0]]
