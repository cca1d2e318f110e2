"""npattn/ops/paged.py: attention over a paged KV cache equals ``attention_forward`` on each sequence's
gathered contiguous keys (forward, lse and every gradient, for every variant); a page shared by
several sequences gets the sum of their gradients and an unread page 0; sinks against a NumPy and a
torch (gpt-oss) reference; gradcheck with dsinks and dlse; dtypes; bad input; every backend."""

import numpy as np
import pytest

from npattn import attention_backward, attention_forward, gradcheck
from npattn.backend import to_numpy
from npattn.ops.paged import PagedCache, paged_attention_backward, paged_attention_forward
from tests.reference import attention_reference

# sequence 0: pages 0, 1 (3 keys, page 1 half used); sequence 1: pages 0, 3, 4 (5 keys); sequence 2:
# pages 5, 0 (4 keys). Page 0 is shared by all three (a prefix cached once), page 2 is read by nobody,
# -1 pads the table. Page size 2, so no length is a multiple of it except sequence 2's.
TABLE = np.array([[0, 1, -1], [0, 3, 4], [5, 0, -1]])
SEQLENS = np.array([3, 5, 4])
P, PAGE = 6, 2


def make(rng, *, b=3, h=4, g=2, n=2, d=3, dv=2, p=P, page=PAGE):
    return (rng.standard_normal((b, h, n, d)), rng.standard_normal((p, g, page, d)),
            rng.standard_normal((p, g, page, dv)), rng.standard_normal((b, h, n, dv)))


def gather(pages, table, seqlens, b):
    """Sequence b's keys (or values), contiguous: ``(G, M_b, C)``, by a loop over its pages."""
    page = pages.shape[2]
    rows = [pages[table[b, j // page], :, j % page, :] for j in range(seqlens[b])]
    return np.stack(rows, axis=1)


def dense_reference(q, k_pages, v_pages, table, seqlens, dout, **kwargs):
    """``attention_forward``/``attention_backward`` per sequence on its gathered keys, then the
    gradients put back into the pool by a loop over keys (``+=``: a shared page sums)."""
    o, lse = np.zeros(dout.shape), np.zeros(dout.shape[:-1])
    dq, dk_pages, dv_pages = np.zeros(q.shape), np.zeros(k_pages.shape), np.zeros(v_pages.shape)
    page = k_pages.shape[2]
    for b in range(q.shape[0]):
        k, v = gather(k_pages, table, seqlens, b), gather(v_pages, table, seqlens, b)
        slopes = kwargs.get("alibi_slopes")
        kw = dict(kwargs, alibi_slopes=None if slopes is None else np.broadcast_to(slopes, (q.shape[0], q.shape[1]))[b])
        o[b], cache = attention_forward(q[b], k, v, **kw)
        lse[b] = attention_reference(q[b], k, v, **kw)[2]
        dq[b], dk, dv = attention_backward(dout[b], cache)
        for j in range(seqlens[b]):
            dk_pages[table[b, j // page], :, j % page, :] += dk[:, j, :]
            dv_pages[table[b, j // page], :, j % page, :] += dv[:, j, :]
    return o, lse, dq, dk_pages, dv_pages


def close(a, b, what, rtol=1e-12):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * max(np.abs(b).max(), 1.0), err_msg=what)


VARIANTS = {
    "plain": {},
    "causal": dict(causal=True),
    "top-left": dict(causal="top-left"),
    "window (2, 1)": dict(window=(2, 1)),
    "causal window (1, None)": dict(causal=True, window=(1, None)),
    "softcap": dict(softcap=1.2),
    "ALiBi": dict(alibi_slopes=np.array([0.5, 0.25, 0.125, 0.0625])),
    "everything": dict(causal=True, window=(2, 0), softcap=2.0, alibi_slopes=np.array([0.3, 0.2, 0.1, 0.05]),
                       scale=0.8),
}


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_equals_attention_on_gathered_keys(rng, variant, n):
    q, k_pages, v_pages, dout = make(rng, n=n)
    kwargs = VARIANTS[variant]
    o, cache = paged_attention_forward(q, k_pages, v_pages, TABLE, SEQLENS, **kwargs)
    dq, dk_pages, dv_pages, d_table, d_seqlens = paged_attention_backward(dout, cache)
    want = dense_reference(q, k_pages, v_pages, TABLE, SEQLENS, dout, **kwargs)
    for name, got, exp in zip(["o", "lse", "dq", "dk_pages", "dv_pages"], (o, cache.lse, dq, dk_pages, dv_pages), want):
        close(got, exp, name)
    assert d_table is None and d_seqlens is None


@pytest.mark.parametrize("h, g", [(3, 3), (4, 1), (6, 2)])
def test_gqa_and_mqa(rng, h, g):
    q, k_pages, v_pages, dout = make(rng, h=h, g=g, n=2, d=2, dv=3)
    o, cache = paged_attention_forward(q, k_pages, v_pages, TABLE, SEQLENS, causal=True)
    got = (o, cache.lse) + paged_attention_backward(dout, cache)[:3]
    for name, a, b in zip(["o", "lse", "dq", "dk", "dv"], got, dense_reference(q, k_pages, v_pages, TABLE, SEQLENS,
                                                                               dout, causal=True)):
        close(a, b, name)


def test_shared_page_sums_and_unread_pages_get_zero(rng):
    q, k_pages, v_pages, dout = make(rng)
    _, cache = paged_attention_forward(q, k_pages, v_pages, TABLE, SEQLENS, causal=True)
    _, dk_pages, dv_pages, _, _ = paged_attention_backward(dout, cache)
    assert np.all(dk_pages[2] == 0) and np.all(dv_pages[2] == 0)         # page 2: in no table
    assert np.all(dk_pages[1][:, 1:] == 0) and np.all(dv_pages[1][:, 1:] == 0)   # sequence 0 holds 3 keys
    # each sequence alone (B = 1): page 0's gradient is the sum of the three, not any one of them
    alone = []
    for b in range(3):
        _, c = paged_attention_forward(q[b:b + 1], k_pages, v_pages, TABLE[b:b + 1], SEQLENS[b:b + 1], causal=True)
        alone.append(paged_attention_backward(dout[b:b + 1], c))
    close(dk_pages[0], sum(a[1][0] for a in alone), "dk of the shared page")
    close(dv_pages[0], sum(a[2][0] for a in alone), "dv of the shared page")
    assert all(np.abs(a[2][0]).max() > 1e-3 for a in alone)              # each sequence really contributes
    assert np.abs(dv_pages[0] - alone[-1][2][0]).max() > 1e-3             # the last writer alone is wrong


def test_rows_that_are_not_keys_never_reach_the_result(rng):
    """Garbage (NaN) in an unread page, in the tail of a last page and in a page a sequence does not
    read but another does: o, lse and gradients as with clean pools, the garbage rows' gradients 0."""
    q, k_pages, v_pages, dout = make(rng)
    _, clean = paged_attention_forward(q, k_pages, v_pages, TABLE, SEQLENS, causal=True)
    dirty_k, dirty_v = k_pages.copy(), v_pages.copy()
    for a in (dirty_k, dirty_v):
        a[2] = np.nan                                                    # read by nobody
        a[1, :, 1] = np.nan                                              # past sequence 0's 3 keys
    o, cache = paged_attention_forward(q, dirty_k, dirty_v, TABLE, SEQLENS, causal=True)
    grads = paged_attention_backward(dout, cache)
    close(o, clean.o, "o")
    close(cache.lse, clean.lse, "lse")
    for got, want in zip(grads[:3], paged_attention_backward(dout, clean)[:3]):
        close(got, want, "grads")
    assert np.all(grads[1][2] == 0) and np.all(grads[1][1][:, 1] == 0)


def test_nan_in_a_key_propagates(rng):
    q, k_pages, v_pages, dout = make(rng, n=1)
    k_pages[3, 0, 1, 0] = np.nan                                         # key 3 of sequence 1, kv head 0
    o, cache = paged_attention_forward(q, k_pages, v_pages, TABLE, SEQLENS)
    assert np.isnan(o[1, :2]).all() and not np.isnan(o[[0, 2]]).any() and not np.isnan(o[1, 2:]).any()


def test_window_skips_slots_and_cache_holds_no_gathered_keys(rng):
    """A long sequence with a window of 3: only the last slots are walked; nothing in the cache is
    a sequence's keys (the pools are the caller's arrays, kept by reference)."""
    page, m, d = 2, 40, 3
    q = rng.standard_normal((2, 2, 1, d))
    k_pages, v_pages = rng.standard_normal((40, 2, page, d)), rng.standard_normal((40, 2, page, d))
    table = np.arange(40).reshape(2, 20)
    seqlens = np.array([m, m - 1])
    o, cache = paged_attention_forward(q, k_pages, v_pages, table, seqlens, causal=True, window=(3, 0))
    assert cache.walk.slots == [17, 18, 19]
    assert cache.k_pages is k_pages and cache.v_pages is v_pages
    for name, value in cache._asdict().items():
        if hasattr(value, "shape") and value is not k_pages and value is not v_pages:
            assert np.prod(value.shape) <= 2 * 2 * d, f"cache.{name} has shape {value.shape}"
    want = dense_reference(q, k_pages, v_pages, table, seqlens, np.ones_like(o), causal=True, window=(3, 0))
    close(o, want[0], "o")


# --- sinks -------------------------------------------------------------------------------------------

def sinks_reference(q, k_pages, v_pages, table, seqlens, sinks, *, causal=False, window=None, scale=None):
    """NumPy, loops: the sink as an extra score column with no value (gpt-oss), softmax, drop it."""
    b_, h_, n, d = q.shape
    g = k_pages.shape[1]
    scale = 1 / np.sqrt(d) if scale is None else scale
    sinks = np.broadcast_to(sinks, (h_,))
    o, lse = np.zeros(q.shape[:-1] + (v_pages.shape[-1],)), np.zeros(q.shape[:-1])
    for b in range(b_):
        k, v = gather(k_pages, table, seqlens, b), gather(v_pages, table, seqlens, b)
        m = seqlens[b]
        for h in range(h_):
            kv = h // (h_ // g)
            for i in range(n):
                row = np.array([scale * q[b, h, i] @ k[kv, j] for j in range(m)])
                allowed = np.ones(m, bool)
                j = np.arange(m)
                if causal:
                    allowed &= j <= (i if causal == "top-left" else i + m - n)
                if window is not None:
                    if window[0] is not None:
                        allowed &= j >= i + m - n - window[0]
                    if window[1] is not None:
                        allowed &= j <= i + m - n + window[1]
                logits = np.append(np.where(allowed, row, -np.inf), sinks[h])
                top = logits.max()
                w = np.exp(logits - top)
                lse[b, h, i] = top + np.log(w.sum())
                o[b, h, i] = (w[:-1] / w.sum()) @ v[kv]
    return o, lse


@pytest.mark.parametrize("kwargs", [{}, dict(causal=True), dict(causal="top-left", window=(0, None))],
                         ids=["plain", "causal", "empty rows"])
@pytest.mark.parametrize("sink_shape", [(4,), (1,), ()])
def test_sinks_match_reference(rng, kwargs, sink_shape):
    q, k_pages, v_pages, dout = make(rng, n=2)
    sinks = rng.standard_normal(sink_shape) + 1.0
    o, cache = paged_attention_forward(q, k_pages, v_pages, TABLE, SEQLENS, sinks=sinks, **kwargs)
    o_ref, lse_ref = sinks_reference(q, k_pages, v_pages, TABLE, SEQLENS, sinks, **kwargs)
    close(o, o_ref, "o")
    close(cache.lse, lse_ref, "lse")
    grads = paged_attention_backward(dout, cache)
    assert len(grads) == 6 and grads[5].shape == sink_shape
    if kwargs.get("window"):                       # top-left with window (0, None): row 0 of sequence 1 sees nothing
        assert np.all(o[1, :, 0] == 0)
        close(cache.lse[1, :, 0], np.broadcast_to(sinks, (4,)), "lse = sink")


def test_a_sink_of_minus_inf_is_no_sink(rng):
    q, k_pages, v_pages, dout = make(rng)
    o, cache = paged_attention_forward(q, k_pages, v_pages, TABLE, SEQLENS, sinks=np.full(4, -np.inf), causal=True)
    o0, cache0 = paged_attention_forward(q, k_pages, v_pages, TABLE, SEQLENS, causal=True)
    close(o, o0, "o")
    close(cache.lse, cache0.lse, "lse")
    grads = paged_attention_backward(dout, cache)
    assert np.all(grads[5] == 0)
    for a, b in zip(grads[:3], paged_attention_backward(dout, cache0)[:3]):
        close(a, b, "grads")


def paged_pair(q, k_pages, v_pages, sinks, **kwargs):
    """The pair as (o, lse) with sinks as an input, for gradcheck of every gradient and dlse."""
    o, cache = paged_attention_forward(q, k_pages, v_pages, TABLE, SEQLENS, sinks=sinks, **kwargs)
    return (o, cache.lse), cache


def paged_pair_backward(douts, cache):
    dq, dk, dv, _, _, dsinks = paged_attention_backward(douts[0], cache, dlse=douts[1])
    return dq, dk, dv, dsinks


EMPTY_ROWS_ALIBI = dict(causal="top-left", window=(0, None), alibi_slopes=np.array([0.5, 0.25, 0.1, 0.05]))


@pytest.mark.parametrize("kwargs", [dict(causal=True, softcap=1.5), EMPTY_ROWS_ALIBI],
                         ids=["causal softcap", "empty rows + ALiBi"])
def test_gradcheck_with_sinks_and_dlse(rng, kwargs):
    q, k_pages, v_pages, _ = make(rng, n=2)
    report = gradcheck(paged_pair, paged_pair_backward,
                       dict(q=q, k_pages=k_pages, v_pages=v_pages, sinks=rng.standard_normal(4)), kwargs=kwargs)
    assert report.ok and len(report.rows) == 4, report


def test_gradcheck_can_fail(rng):
    """The same check with the overwriting scatter (the last sequence wins a shared page) fails."""
    q, k_pages, v_pages, _ = make(rng, n=1)

    def overwrite_backward(douts, cache):
        dq, dk, dv, dsinks = paged_pair_backward(douts, cache)
        dk, dv = dk.copy(), dv.copy()
        for b in range(3):                                               # sequence b's own gradient, overwritten
            _, c = paged_attention_forward(q[b:b + 1], k_pages, v_pages, TABLE[b:b + 1], SEQLENS[b:b + 1],
                                           sinks=cache.sinks)
            g = paged_attention_backward(douts[0][b:b + 1], c, dlse=douts[1][b:b + 1])
            dk[0], dv[0] = g[1][0], g[2][0]
        return dq, dk, dv, dsinks

    report = gradcheck(paged_pair, overwrite_backward,
                       dict(q=q, k_pages=k_pages, v_pages=v_pages, sinks=rng.standard_normal(4)))
    assert not report.ok and [r.ok for r in report.rows] == [True, False, False, True], report


def test_torch_float64_gpt_oss_formula():
    """torch autograd on the gathered keys (index_select: its backward is torch's own scatter-add),
    with the sink concatenated as an extra column, softmax, dropped (gpt-oss's attention)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    q, k_pages, v_pages, dout = make(rng, n=2)
    sinks, dlse = rng.standard_normal(4), rng.standard_normal((3, 4, 2))
    o, cache = paged_attention_forward(q, k_pages, v_pages, TABLE, SEQLENS, sinks=sinks, causal=True)
    grads = paged_attention_backward(dout, cache, dlse=dlse)

    tq, tk, tv, ts = (torch.tensor(a, requires_grad=True) for a in (q, k_pages, v_pages, sinks))
    loss = 0
    for b in range(3):
        m, n_pages = int(SEQLENS[b]), -(-int(SEQLENS[b]) // PAGE)
        ids = torch.tensor(TABLE[b, :n_pages])
        k = tk.index_select(0, ids).permute(1, 0, 2, 3).reshape(2, n_pages * PAGE, 3)[:, :m]
        v = tv.index_select(0, ids).permute(1, 0, 2, 3).reshape(2, n_pages * PAGE, 2)[:, :m]
        k, v = k.repeat_interleave(2, dim=0), v.repeat_interleave(2, dim=0)          # (H, M, .)
        s = tq[b] @ k.mT / np.sqrt(3)                                                  # (H, N, M)
        s = s.masked_fill(torch.ones(2, m, dtype=torch.bool).tril(m - 2).logical_not(), -torch.inf)
        logits = torch.cat([s, ts[:, None, None].expand(4, 2, 1)], dim=-1)
        lse = torch.logsumexp(logits, dim=-1)
        ob = torch.softmax(logits, dim=-1)[..., :-1] @ v
        loss = loss + (ob * torch.tensor(dout[b])).sum() + (lse * torch.tensor(dlse[b])).sum()
        close(o[b], ob.detach().numpy(), "o")
        close(cache.lse[b], lse.detach().numpy(), "lse")
    loss.backward()
    for name, got, t in zip(["dq", "dk_pages", "dv_pages", "dsinks"], grads[:3] + grads[5:], (tq, tk, tv, ts)):
        close(got, t.grad.numpy(), name)


# --- dtypes, inputs, errors, backends ------------------------------------------------------------------

@pytest.mark.parametrize("dtype, rtol", [(np.float32, 2e-5), (np.float16, 3e-3)])
def test_float32_and_float16(rng, dtype, rtol):
    q, k_pages, v_pages, dout = make(rng)
    sinks = rng.standard_normal(4)
    low = [a.astype(dtype) for a in (q, k_pages, v_pages, dout, sinks)]
    o, cache = paged_attention_forward(*low[:3], TABLE, SEQLENS, sinks=low[4], causal=True)
    grads = paged_attention_backward(low[3], cache)
    assert o.dtype == dtype and cache.lse.dtype == (np.float32 if dtype == np.float16 else dtype)
    assert all(g.dtype == dtype for g in grads if g is not None)
    o64, c64 = paged_attention_forward(*(a.astype(np.float64) for a in low[:3]), TABLE, SEQLENS,
                                       sinks=low[4].astype(np.float64), causal=True)
    want = paged_attention_backward(low[3].astype(np.float64), c64)
    for got, exp in zip((o,) + grads[:3] + grads[5:], (o64,) + want[:3] + want[5:]):
        np.testing.assert_allclose(got.astype(np.float64), exp, rtol=rtol, atol=rtol * np.abs(exp).max())


def test_inputs_dout_and_cache_are_not_modified(rng):
    q, k_pages, v_pages, dout = make(rng)
    sinks, dlse = rng.standard_normal(4), rng.standard_normal((3, 4, 2))
    table, seqlens = TABLE.copy(), SEQLENS.copy()
    args = (q, k_pages, v_pages, table, seqlens, sinks, dout, dlse)
    before = [a.copy() for a in args]
    o, cache = paged_attention_forward(q, k_pages, v_pages, table, seqlens, sinks=sinks, causal=True, softcap=2.0)
    saved = [np.array(a, copy=True) for a in (cache.o, cache.lse, cache.shift, cache.inv_l)]
    first = paged_attention_backward(dout, cache, dlse=dlse)
    second = paged_attention_backward(dout, cache, dlse=dlse)
    for a, b in zip(args, before):
        np.testing.assert_array_equal(a, b)
    for a, b in zip((cache.o, cache.lse, cache.shift, cache.inv_l), saved):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(first, second):
        assert (a is None and b is None) or np.array_equal(a, b)


def _bad_cases():
    rng = np.random.default_rng(0)
    q, k, v, _ = make(rng)
    ok = dict(q=q, k_pages=k, v_pages=v, block_table=TABLE, seqlens=SEQLENS)
    return [
        ("q 3-D", dict(q=q[0]), ValueError, "4-D"),
        ("head dim", dict(k_pages=k[..., :2]), ValueError, "head dim"),
        ("k/v pages differ", dict(v_pages=v[:, :, :1]), ValueError, "k_pages and v_pages"),
        ("H % G", dict(q=q[:, :3]), ValueError, "H % G"),
        ("integer q", dict(q=q.astype(np.int64)), TypeError, "q must be a real floating"),
        ("mixed dtypes", dict(k_pages=k.astype(np.float32)), TypeError, "one dtype"),
        ("float block_table", dict(block_table=TABLE.astype(float)), TypeError, "block_table"),
        ("1-D block_table", dict(block_table=TABLE[0]), ValueError, "block_table"),
        ("block_table rows", dict(block_table=TABLE[:2]), ValueError, "block_table"),
        ("float seqlens", dict(seqlens=SEQLENS.astype(float)), TypeError, "seqlens"),
        ("seqlens shape", dict(seqlens=SEQLENS[:2]), ValueError, "seqlens"),
        ("page id too large", dict(block_table=np.where(TABLE == 5, P, TABLE)), ValueError,
         r"block_table\[2\] reads page 6"),
        ("-1 read", dict(seqlens=np.array([5, 5, 4])), ValueError, r"block_table\[0\] reads page -1"),
        ("beyond its pages", dict(seqlens=np.array([3, 7, 4])), ValueError, "seqlens.*beyond its pages"),
        ("seqlens below N", dict(seqlens=np.array([1, 5, 4])), ValueError, "seqlens.*below N"),
        ("sinks shape", dict(sinks=np.zeros(3)), ValueError, "sinks"),
        ("sinks 2-D", dict(sinks=np.zeros((1, 4))), ValueError, "sinks"),
        ("sinks dtype", dict(sinks=np.zeros(4, np.float32)), TypeError, "sinks"),
        ("sinks a float", dict(sinks=0.5), TypeError, "sinks"),
        ("scale", dict(scale="big"), TypeError, "scale"),
        ("softcap", dict(softcap=0.0), ValueError, "softcap"),
        ("window side", dict(window=(-1, 0)), ValueError, "window"),
        ("alibi shape", dict(alibi_slopes=np.ones(3)), ValueError, "alibi_slopes"),
        ("causal", dict(causal="upper"), ValueError, "causal"),
    ], ok


BAD, OK = _bad_cases()


@pytest.mark.parametrize("change, error, match", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_input_is_a_named_error(change, error, match):
    args = dict(OK, **{k: v for k, v in change.items() if k in OK})
    kwargs = {k: v for k, v in change.items() if k not in OK}
    with pytest.raises(error, match=match):
        paged_attention_forward(*args.values(), **kwargs)


def test_bad_backward_input(rng):
    q, k_pages, v_pages, dout = make(rng)
    _, cache = paged_attention_forward(q, k_pages, v_pages, TABLE, SEQLENS)
    with pytest.raises(TypeError, match="PagedCache"):
        paged_attention_backward(dout, tuple(cache))
    with pytest.raises(ValueError, match="dout"):
        paged_attention_backward(dout[:, :, :1], cache)
    with pytest.raises(ValueError, match="dlse"):
        paged_attention_backward(dout, cache, dlse=np.zeros((3, 4)))
    with pytest.raises(TypeError, match="dlse"):
        paged_attention_backward(dout, cache, dlse=np.zeros((3, 4, 2), np.float32))
    assert isinstance(cache, PagedCache)


def test_mixed_libraries_is_a_type_error(rng):
    import array_api_strict as xps

    q, k_pages, v_pages, _ = make(rng)
    with pytest.raises(TypeError, match="block_table"):
        paged_attention_forward(q, k_pages, v_pages, xps.asarray(TABLE), SEQLENS)


def test_every_backend(backend, rng):
    q, k_pages, v_pages, dout = make(rng)
    sinks, dlse = rng.standard_normal(4), rng.standard_normal((3, 4, 2))
    kwargs = dict(causal=True, softcap=2.0, alibi_slopes=np.array([0.3, 0.2, 0.1, 0.05]), window=(2, None))
    o, cache = paged_attention_forward(q, k_pages, v_pages, TABLE, SEQLENS, sinks=sinks, **kwargs)
    want = (o, cache.lse) + paged_attention_backward(dout, cache, dlse=dlse)
    put = backend.asarray
    o_b, cache_b = paged_attention_forward(put(q), put(k_pages), put(v_pages), put(TABLE), put(SEQLENS),
                                           sinks=put(sinks), **dict(kwargs, alibi_slopes=put(kwargs["alibi_slopes"])))
    got = (o_b, cache_b.lse) + paged_attention_backward(put(dout), cache_b, dlse=put(dlse))
    assert type(o_b) is type(put(q))
    for a, b in zip(got, want):
        if b is None:
            assert a is None
        else:
            np.testing.assert_allclose(to_numpy(a), b, rtol=1e-12, atol=1e-12)
