"""Learnable sinks and packed variable-length sequences on both attention ops
(derivations/15-sinks-varlen.md): the forward against an explicit loop reference and gpt-oss's
torch formula, every gradient (dsinks included) by finite differences and against torch autograd,
packing against per-sequence calls and against the dense op with the block-diagonal mask, the tiles
the packed tiled op visits, empty sequences, and every bad input named."""

import numpy as np
import pytest
from scipy.special import logsumexp

from npattn import attention_backward, attention_forward, flash_attention_backward, flash_attention_forward, gradcheck
from npattn.checks import flash_with_lse_backward, flash_with_lse_forward
from tests.reference import attention_reference

OPS = {"naive": (attention_forward, attention_backward),
       "tiled": (lambda *a, **kw: flash_attention_forward(*a, block_q=3, block_k=2, **kw), flash_attention_backward)}
SLOPES = np.array([0.5, 0.25, 0.125, 0.0625])


def make(rng, lead=(2,), h=4, g=2, n=5, m=7, d=3, dv=2):
    return (rng.standard_normal(lead + (h, n, d)), rng.standard_normal(lead + (g, m, d)),
            rng.standard_normal(lead + (g, m, dv)), rng.standard_normal(lead + (h, n, dv)))


def with_sinks(forward):
    """A pair whose sinks are an input, for gradcheck."""
    def pair_forward(q, k, v, sinks, **kwargs):
        return forward(q, k, v, sinks=sinks, **kwargs)
    return pair_forward


# --- sinks -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("kwargs", [{}, dict(causal=True), dict(causal="top-left"), dict(window=(1, 2)),
                                    dict(softcap=1.5, alibi_slopes=SLOPES), dict(causal=True, window=(2, 0), scale=0.4)],
                         ids=["plain", "causal", "top-left", "window", "softcap+alibi", "causal+window+scale"])
@pytest.mark.parametrize("n, m", [(5, 7), (7, 4)])
def test_sinks_forward_equals_the_loop_reference(rng, op, kwargs, n, m):
    q, k, v, _ = make(rng, n=n, m=m)
    sinks = rng.standard_normal(4) * 2
    o, cache = OPS[op][0](q, k, v, sinks=sinks, **kwargs)
    o_ref, p_ref, lse_ref = attention_reference(q, k, v, sinks=sinks, **kwargs)
    np.testing.assert_allclose(o, o_ref, rtol=1e-12, atol=1e-14)
    if op == "naive":
        np.testing.assert_allclose(cache.p, p_ref, rtol=1e-12, atol=1e-15)
        # the sink's weight and the keys' weights sum to 1 on every row: eq. (15.1)
        np.testing.assert_allclose(cache.p.sum(-1) + cache.p_sink, 1.0, rtol=1e-14)
    else:
        np.testing.assert_allclose(cache.lse, lse_ref, rtol=1e-13)


@pytest.mark.parametrize("op", OPS)
def test_a_row_with_no_key_gives_zero_and_lse_the_sink(rng, op):
    q, k, v, dout = make(rng, n=7, m=4)
    sinks = rng.standard_normal((2, 4))
    o, cache = OPS[op][0](q, k, v, sinks=sinks, causal=True)                  # rows 0-2 see no key
    assert np.all(o[..., :3, :] == 0)
    grads = OPS[op][1](dout, cache)
    assert not any(np.isnan(g).any() for g in grads)
    if op == "tiled":
        np.testing.assert_array_equal(cache.lse[..., :3], np.broadcast_to(sinks[..., None], (2, 4, 3)))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", [(4,), (2, 4), (1, 4), (2, 1), ()])
def test_dsinks_by_finite_differences_in_the_sinks_shape(rng, op, shape):
    q, k, v, _ = make(rng)
    sinks = rng.standard_normal(shape)
    forward, backward = OPS[op]
    report = gradcheck(with_sinks(forward), backward, dict(q=q, k=k, v=v, sinks=sinks),
                       kwargs=dict(causal=True, softcap=2.0))
    assert report.ok, str(report)
    assert report.rows[-1].shape == shape


def test_dsinks_with_dropout_mask_grad_and_threads(rng):
    q, k, v, _ = make(rng)
    sinks, bias = rng.standard_normal(4), rng.standard_normal((4, 1, 7))

    def forward(q, k, v, mask, sinks, **kw):
        return attention_forward(q, k, v, mask=mask, sinks=sinks, **kw)

    def backward(dout, cache):
        grads = attention_backward(dout, cache, mask_grad=True)
        assert len(grads) == 5                                                # (dq, dk, dv, dmask, dsinks)
        return grads

    for workers in (1, 2):
        report = gradcheck(forward, backward, dict(q=q, k=k, v=v, mask=bias, sinks=sinks),
                           kwargs=dict(dropout_p=0.3, rng=5, window=(3, 1), workers=workers))
        assert report.ok, str(report)


def test_tiled_dsinks_takes_dlse(rng):
    q, k, v, _ = make(rng)
    sinks = rng.standard_normal(4)
    report = gradcheck(with_sinks(flash_with_lse_forward), flash_with_lse_backward, dict(q=q, k=k, v=v, sinks=sinks),
                       kwargs=dict(causal=True, block_q=2, block_k=3, alibi_slopes=SLOPES))
    assert report.ok, str(report)


def test_tiled_equals_naive_with_sinks_and_2d_inputs(rng):
    q, k, v, dout = make(rng, lead=(), h=1, g=1)
    q, k, v, dout = q[0], k[0], v[0], dout[0]
    for sinks in (np.array(0.7), np.array([0.7])):
        o_n, c_n = attention_forward(q, k, v, sinks=sinks, causal=True)
        o_t, c_t = flash_attention_forward(q, k, v, sinks=sinks, causal=True, block_q=2, block_k=2)
        np.testing.assert_allclose(o_t, o_n, rtol=1e-13)
        for a, b in zip(flash_attention_backward(dout, c_t), attention_backward(dout, c_n)):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
        assert flash_attention_backward(dout, c_t)[3].shape == sinks.shape


def test_sink_of_minus_inf_is_no_sink(rng):
    q, k, v, dout = make(rng, n=6, m=4)
    sinks = np.full(4, -np.inf)
    for forward, backward in OPS.values():
        o, c = forward(q, k, v, sinks=sinks, causal=True)
        o0, c0 = forward(q, k, v, causal=True)
        np.testing.assert_allclose(o, o0, rtol=1e-14)
        grads = backward(dout, c)
        for a, b in zip(grads[:3], backward(dout, c0)):
            np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)
        assert np.all(grads[3] == 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_sinks_dtypes(rng, dtype):
    q, k, v, dout = (a.astype(dtype) for a in make(rng))
    sinks = rng.standard_normal(4).astype(dtype)
    for forward, backward in OPS.values():
        o, c = forward(q, k, v, sinks=sinks)
        grads = backward(dout, c)
        assert o.dtype == dtype and all(g.dtype == dtype for g in grads)
        o_ref, _, _ = attention_reference(q, k, v, sinks=sinks)
        # float16 inputs are computed in float32 and rounded once: half an ulp of float16 on |o| <= max|v|
        tol = {np.float32: 1e-5, np.float16: 2e-3}[dtype]
        np.testing.assert_allclose(o.astype(np.float64), o_ref, rtol=tol, atol=tol)


def test_sinks_bad_input(rng):
    q, k, v, _ = make(rng)
    for forward, _ in OPS.values():
        with pytest.raises(ValueError, match="sinks of shape"):
            forward(q, k, v, sinks=np.zeros(3))
        with pytest.raises(ValueError, match="sinks of shape"):
            forward(q, k, v, sinks=np.zeros((3, 4)))
        with pytest.raises(TypeError, match="sinks must have the inputs' dtype"):
            forward(q, k, v, sinks=np.zeros(4, dtype=np.float32))
        with pytest.raises(TypeError, match="sinks must be a real floating array"):
            forward(q, k, v, sinks=np.zeros(4, dtype=np.int64))
        with pytest.raises(TypeError, match="sinks must be an array"):
            forward(q, k, v, sinks=[0.0] * 4)


def test_sinks_inputs_not_modified(rng):
    q, k, v, dout = make(rng)
    sinks = rng.standard_normal(4)
    before = [a.copy() for a in (q, k, v, dout, sinks)]
    for forward, backward in OPS.values():
        _, c = forward(q, k, v, sinks=sinks, causal=True)
        backward(dout, c)
    for a, b in zip((q, k, v, dout, sinks), before):
        np.testing.assert_array_equal(a, b)


def test_sinks_match_gpt_oss_torch_formula(rng):
    """gpt-oss's ``sdpa``: the sink as one more column of the scores, softmax, the column dropped;
    autograd gives every gradient, in float64."""
    torch = pytest.importorskip("torch")
    q, k, v, dout = make(rng, n=6, m=6)
    sinks = rng.standard_normal(4)
    tq, tk, tv, ts = (torch.tensor(a, requires_grad=True) for a in (q, k, v, sinks))
    kk, vv = tk.repeat_interleave(2, dim=1), tv.repeat_interleave(2, dim=1)
    scores = tq @ kk.transpose(-1, -2) / np.sqrt(3)
    scores = scores.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), -torch.inf)
    sink_col = ts.reshape(1, 4, 1, 1).expand(2, 4, 6, 1)
    w = torch.softmax(torch.cat([scores, sink_col], dim=-1), dim=-1)[..., :-1]
    (w @ vv).backward(torch.tensor(dout))
    want = [t.grad.numpy() for t in (tq, tk, tv, ts)]
    for forward, backward in OPS.values():
        o, c = forward(q, k, v, sinks=sinks, causal=True)
        np.testing.assert_allclose(o, (w @ vv).detach().numpy(), rtol=1e-12, atol=1e-14)
        for got, ref in zip(backward(dout, c), want):
            np.testing.assert_allclose(got, ref, rtol=1e-11, atol=1e-13)


# --- packed variable-length sequences -----------------------------------------------------------------

def packed(rng, q_lens, k_lens, h=4, g=2, d=3, dv=2):
    cq, ck = np.concatenate([[0], np.cumsum(q_lens)]), np.concatenate([[0], np.cumsum(k_lens)])
    q, k, v = rng.standard_normal((h, cq[-1], d)), rng.standard_normal((g, ck[-1], d)), rng.standard_normal((g, ck[-1], dv))
    return q, k, v, rng.standard_normal((h, cq[-1], dv)), cq, ck


VARIANTS = [{}, dict(causal=True), dict(causal="top-left", sinks=True), dict(window=(2, 1), alibi_slopes=SLOPES),
            dict(causal=True, softcap=1.5, sinks=True, scale=0.3)]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("kwargs", VARIANTS, ids=["plain", "causal", "top-left+sinks", "window+alibi", "everything"])
def test_packed_equals_each_sequence_alone(rng, op, kwargs):
    q, k, v, dout, cq, ck = packed(rng, [3, 6, 1, 4], [5, 2, 4, 4])
    kwargs = dict(kwargs)
    if kwargs.pop("sinks", False):
        kwargs["sinks"] = rng.standard_normal(4)
    forward, backward = OPS[op]
    o, cache = forward(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, **kwargs)
    grads = backward(dout, cache)
    dsinks = 0
    for b in range(4):
        rows, keys = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        o_b, c_b = forward(q[:, rows], k[:, keys], v[:, keys], **kwargs)
        g_b = backward(dout[:, rows], c_b)
        np.testing.assert_array_equal(o[:, rows], o_b)                         # the same calls: bitwise
        for got, want, sl in zip(grads[:3], g_b[:3], (rows, keys, keys)):
            np.testing.assert_array_equal(got[:, sl], want)
        if "sinks" in kwargs:
            dsinks = dsinks + g_b[3]
        if op == "tiled":
            np.testing.assert_array_equal(cache.lse[:, rows], c_b.lse)
    if "sinks" in kwargs:
        np.testing.assert_allclose(grads[3], dsinks, rtol=1e-13)


def block_diagonal(cq, ck, causal=False):
    """The dense mask packing stands for, built directly: query r of sequence b sees key c of the
    same sequence (and, causal, with its own bottom-right alignment)."""
    mask = np.zeros((cq[-1], ck[-1]), dtype=bool)
    for b in range(len(cq) - 1):
        n, m = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
        block = np.ones((n, m), dtype=bool)
        if causal:
            block = np.arange(m)[None, :] <= np.arange(n)[:, None] + m - n
        mask[cq[b]:cq[b + 1], ck[b]:ck[b + 1]] = block
    return mask


@pytest.mark.parametrize("causal", [False, True])
def test_packed_equals_the_dense_op_with_the_block_diagonal_mask(rng, causal):
    q, k, v, dout, cq, ck = packed(rng, [4, 2, 5], [6, 2, 3])
    o_d, c_d = attention_forward(q, k, v, mask=block_diagonal(cq, ck, causal))
    want = attention_backward(dout, c_d)
    for forward, backward in OPS.values():
        o, c = forward(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, causal=causal)
        np.testing.assert_allclose(o, o_d, rtol=1e-12, atol=1e-15)
        for got, ref in zip(backward(dout, c), want):
            np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-15)


def test_packed_gradcheck_with_sinks_and_dlse(rng):
    q, k, v, _, cq, ck = packed(rng, [3, 0, 4], [4, 2, 3])
    sinks = rng.standard_normal(4)
    kwargs = dict(cu_seqlens_q=cq, cu_seqlens_k=ck, causal=True, window=(3, None))
    report = gradcheck(with_sinks(flash_with_lse_forward), flash_with_lse_backward, dict(q=q, k=k, v=v, sinks=sinks),
                       kwargs=dict(kwargs, block_q=2, block_k=2))
    assert report.ok, str(report)
    report = gradcheck(with_sinks(attention_forward), attention_backward, dict(q=q, k=k, v=v, sinks=sinks),
                       kwargs=dict(kwargs, dropout_p=0.25, rng=2))
    assert report.ok, str(report)


def test_packed_tiled_visits_only_tiles_inside_a_sequence(rng):
    lens = [5, 9, 3, 7]
    q, k, v, _, cq, ck = packed(rng, lens, lens)
    tiles = []
    flash_attention_forward(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, block_q=2, block_k=2, workers=1,
                            on_tile=tiles.append)
    assert len(tiles) == sum((n + 1) // 2 * ((n + 1) // 2) for n in lens)   # each sequence's own grid
    dense = []
    flash_attention_forward(q, k, v, mask=block_diagonal(cq, ck), block_q=2, block_k=2, workers=1, on_tile=dense.append)
    assert len(dense) == ((sum(lens) + 1) // 2) ** 2 and len(tiles) < len(dense) / 2    # 54 of 144


def test_packed_empty_sequences(rng):
    q, k, v, dout, cq, ck = packed(rng, [2, 3, 0], [0, 4, 2])                 # seq 0 has no key, seq 2 no query
    sinks = rng.standard_normal(4)
    for forward, backward in OPS.values():
        o, c = forward(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck)
        assert np.all(o[:, :2] == 0)
        grads = backward(dout, c)
        assert not any(np.isnan(g).any() for g in grads)
        np.testing.assert_array_equal(grads[1][:, 4:], 0)                     # keys of seq 2: no query saw them
        o, c = forward(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, sinks=sinks)
        assert np.all(o[:, :2] == 0)
        if forward is not attention_forward:
            np.testing.assert_array_equal(c.lse[:, :2], np.broadcast_to(sinks[:, None], (4, 2)))
    _, c = flash_attention_forward(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck)
    assert np.all(np.isneginf(c.lse[:, :2]))


def test_packed_lse_is_each_sequences_logsumexp(rng):
    q, k, v, _, cq, ck = packed(rng, [3, 4], [5, 2])
    _, c = flash_attention_forward(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, block_q=2, block_k=3)
    for b in range(2):
        s = q[:, cq[b]:cq[b + 1]] @ np.repeat(k[:, ck[b]:ck[b + 1]], 2, axis=0).transpose(0, 2, 1) / np.sqrt(3)
        np.testing.assert_allclose(c.lse[:, cq[b]:cq[b + 1]], logsumexp(s, axis=-1), rtol=1e-13)


def test_packed_dropout_is_reproducible(rng):
    q, k, v, _, cq, ck = packed(rng, [3, 4], [5, 2])
    a, _ = attention_forward(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, dropout_p=0.5, rng=11)
    b, _ = attention_forward(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, dropout_p=0.5, rng=11)
    c, _ = attention_forward(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, dropout_p=0.5, rng=12)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_packed_matches_torch_per_sequence(rng):
    torch = pytest.importorskip("torch")
    q, k, v, dout, cq, ck = packed(rng, [4, 6], [4, 6], h=2, g=2)
    o, c = flash_attention_forward(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, causal=True)
    grads = flash_attention_backward(dout, c)
    for b in range(2):
        rows = slice(cq[b], cq[b + 1])
        tq, tk, tv = (torch.tensor(a[:, rows], requires_grad=True) for a in (q, k, v))
        to = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True)   # N_b == M_b
        to.backward(torch.tensor(dout[:, rows]))
        np.testing.assert_allclose(o[:, rows], to.detach().numpy(), rtol=1e-12, atol=1e-14)
        for got, t in zip(grads, (tq, tk, tv)):
            np.testing.assert_allclose(got[:, rows], t.grad.numpy(), rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("cu, message", [
    ([1, 3, 8], "cu_seqlens_q must start at 0"),
    ([0, 5, 3, 8], "must be non-decreasing"),
    ([0, 3, 7], "must end at the packed length 8"),
    ([0, 8], "must have the same length"),
    (np.array([0.0, 3.0, 8.0]), "must be an integer array"),
    ([0, 3.5, 8], "must hold integers"),
    (np.array([[0, 3, 8]]), "must have 1 axis"),
])
def test_cu_seqlens_bad_input(rng, cu, message):
    q, k, v, _, _, ck = packed(rng, [3, 5], [4, 4])
    for forward, _ in OPS.values():
        with pytest.raises((ValueError, TypeError), match=message):
            forward(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=ck)


def test_cu_seqlens_refuses_a_mask_a_lone_half_and_4d(rng):
    q, k, v, _, cq, ck = packed(rng, [3, 5], [4, 4])
    for forward, _ in OPS.values():
        with pytest.raises(ValueError, match="mask cannot be combined"):
            forward(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, mask=np.ones((8, 8), dtype=bool))
        with pytest.raises(ValueError, match="come as a pair; got only cu_seqlens_q"):
            forward(q, k, v, cu_seqlens_q=cq)
        with pytest.raises(ValueError, match=r"q \(H, total_q, D\)"):
            forward(q[None], k[None], v[None], cu_seqlens_q=cq, cu_seqlens_k=ck)
        with pytest.raises(ValueError, match="mask_grad=True"):
            _, c = forward(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck)
            (attention_backward if forward is attention_forward else flash_attention_backward)(
                np.zeros((4, 8, 2)), c, mask_grad=True)


def test_packed_inputs_not_modified(rng):
    q, k, v, dout, cq, ck = packed(rng, [3, 5], [4, 4])
    before = [a.copy() for a in (q, k, v, dout, cq, ck)]
    for forward, backward in OPS.values():
        _, c = forward(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, causal=True)
        backward(dout, c)
    for a, b in zip((q, k, v, dout, cq, ck), before):
        np.testing.assert_array_equal(a, b)


def test_packed_float16_dsinks_summed_in_float32(rng):
    """Many short sequences: their dsinks are added in the compute dtype and cast once (a float16 running
    sum was 4% off at 2048 sequences). v, dout >= 0 make every sequence's share the same sign, so the
    shares cannot cancel and hide the running sum's rounding."""
    n = 1024
    q, k, v, dout, cq, ck = packed(rng, [1] * n, [1] * n, h=1, g=1)
    half = [a.astype(np.float16) for a in (q, k, np.abs(v), np.abs(dout), np.zeros(1))]
    exact = [a.astype(np.float64) for a in half]                              # the same inputs, float64
    want = attention_backward(exact[3], attention_forward(*exact[:3], sinks=exact[4], cu_seqlens_q=cq,
                                                          cu_seqlens_k=ck)[1])[3][0]
    for forward, backward in OPS.values():
        got = backward(half[3], forward(*half[:3], sinks=half[4], cu_seqlens_q=cq, cu_seqlens_k=ck)[1])[3]
        # each share is rounded to float16 once and the total once more: 2 * 2**-11 of |sum| (same signs)
        assert abs(float(got[0]) - want) <= 2 * 2.0**-11 * abs(want), (float(got[0]), want)


def test_packed_checks_mask_first_and_huge_unsigned_boundaries(rng):
    q, k, v, _, cq, ck = packed(rng, [3, 5], [4, 4])
    for forward, _ in OPS.values():
        with pytest.raises(ValueError, match="mask cannot be combined"):
            forward(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, mask=np.ones((3, 3), dtype=bool))   # misshapen too
        with pytest.raises(ValueError, match="above 2"):
            forward(q, k, v, cu_seqlens_q=np.array([0, 2**63 + 1, 8], dtype=np.uint64), cu_seqlens_k=ck)
