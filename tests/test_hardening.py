"""Edge inputs and the suite's former blind spots (issue 14): empty axes, zero-size heads, caches from
the wrong op, silent casts, gradcheck's own arguments, and bugs that used to pass the suite."""

import numpy as np
import pytest

from npattn import (
    attention_backward,
    attention_forward,
    flash_attention_backward,
    flash_attention_forward,
    gradcheck,
    layernorm_backward,
    linear_backward,
    linear_forward,
    softmax,
    softmax_backward,
    softmax_forward,
)
from npattn.checks import flash_with_lse_backward, flash_with_lse_forward


@pytest.mark.parametrize("op", ["naive", "tiled"])
def test_no_keys_gives_zero_output_and_minus_inf_lse(op):
    q, k, v = np.ones((2, 3, 4)), np.ones((2, 0, 4)), np.ones((2, 0, 5))
    forward, backward = (attention_forward, attention_backward) if op == "naive" else \
        (flash_attention_forward, flash_attention_backward)
    o, cache = forward(q, k, v)
    assert o.shape == (2, 3, 5) and np.all(o == 0)
    dq, dk, dv = backward(np.ones((2, 3, 5)), cache)
    assert np.all(dq == 0) and dk.shape == (2, 0, 4) and dv.shape == (2, 0, 5)
    if op == "tiled":
        assert np.all(cache.lse == -np.inf)


def test_empty_softmax_and_linear():
    y, cache = softmax_forward(np.ones((3, 0)))
    assert y.shape == (3, 0) and softmax_backward(np.ones((3, 0)), cache).shape == (3, 0)
    for e_in, e_out in ((4, 0), (0, 5)):
        _, cache = linear_forward(np.ones((3, e_in)), np.ones((e_in, e_out)), np.ones(e_out))
        dx, dw, db = linear_backward(np.ones((3, e_out)), cache)
        assert dx.shape == (3, e_in) and dw.shape == (e_in, e_out) and np.all(dx == 0)


def test_zero_head_dim_and_zero_heads_are_named():
    with pytest.raises(ValueError, match="needs a head dim D >= 1, got D = 0"):
        attention_forward(np.ones((3, 0)), np.ones((2, 0)), np.ones((2, 2)))
    with pytest.raises(ValueError, match=r"at least one head \(H >= 1, G >= 1\)"):
        attention_forward(np.ones((1, 4, 3, 2)), np.ones((1, 0, 3, 2)), np.ones((1, 0, 3, 2)))


@pytest.mark.parametrize("backward", [softmax_backward, linear_backward, layernorm_backward, attention_backward,
                                      flash_attention_backward])
def test_a_cache_from_another_op_is_named(backward):
    _, wrong = softmax_forward(np.ones((2, 3))) if backward is not softmax_backward else linear_forward(
        np.ones((2, 3)), np.ones((3, 3)))
    for cache in (wrong, None):
        with pytest.raises(TypeError, match=r"cache must be the \w+Cache returned by \w+_forward, got"):
            backward(np.ones((2, 3)), cache)


def test_no_silent_casts_and_numpy_scalars(rng):
    q = rng.standard_normal((1, 3, 2))
    _, cache = flash_attention_forward(q, q, q)
    with pytest.raises(TypeError, match="dlse must have lse's dtype float64, got float32"):
        flash_attention_backward(np.ones((1, 3, 2)), cache, dlse=np.ones((1, 3), dtype=np.float32))
    a, _ = attention_forward(q, q, q, dropout_p=np.float32(0.25), rng=1)       # NumPy scalars are numbers
    b, _ = attention_forward(q, q, q, dropout_p=0.25, rng=1)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="rng must be a non-negative int seed"):
        attention_forward(q, q, q, dropout_p=0.1, rng=-1)
    for axis in (None, 1.0, True):
        with pytest.raises(TypeError, match="axis must be an int"):
            softmax(np.ones(3), axis=axis)


def test_bfloat16_is_a_clear_type_error():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = np.ones((2, 3), dtype=ml_dtypes.bfloat16)
    with pytest.raises(TypeError, match="x must be a real floating array, got dtype bfloat16"):
        softmax(x)


def test_on_tile_gets_copies_not_the_loops_state(rng):
    q, k, v = (rng.standard_normal((1, 6, 2)) for _ in range(3))
    o, _ = flash_attention_forward(q, k, v, block_q=3, block_k=2, workers=1)

    def vandal(tile):
        tile.l_i[...] = 1e9
        tile.m_i[...] = -5.0

    o2, _ = flash_attention_forward(q, k, v, block_q=3, block_k=2, workers=1, on_tile=vandal)
    np.testing.assert_array_equal(o, o2)
    with pytest.raises(TypeError, match="on_tile must be callable"):
        flash_attention_forward(q, k, v, on_tile=1)


@pytest.mark.parametrize("kw, err, words", [
    (dict(rtol=-1.0), ValueError, "rtol must be >= 0, got -1.0"),
    (dict(atol=-1e-9), ValueError, "atol must be >= 0"),
    (dict(eps="1e-6"), TypeError, "eps must be a finite real number > 0, got '1e-6'"),
    (dict(seed="a"), TypeError, "seed must be an int, got 'a'"),
    (dict(directions=0, mode="directional"), ValueError, "directions must be >= 1, got 0"),
])
def test_gradcheck_arguments(kw, err, words):
    with pytest.raises(err, match=words):
        gradcheck(softmax_forward, softmax_backward, dict(x=np.ones(3)), **kw)


def test_gradcheck_refuses_empty_inputs_and_a_dropout_generator(rng):
    with pytest.raises(ValueError, match="inputs must hold at least one array"):
        gradcheck(softmax_forward, softmax_backward, {})
    q = rng.standard_normal((3, 2))
    with pytest.raises(ValueError, match="rng is a numpy.random.Generator.*pass an int seed"):
        gradcheck(attention_forward, attention_backward, dict(q=q, k=q, v=q),
                  kwargs=dict(dropout_p=0.2, rng=np.random.default_rng(0)))


# --- bugs that used to pass the suite: each test fails on the bug
def test_gradcheck_defaults_catch_a_five_percent_error(rng):
    q, k, v = rng.standard_normal((2, 3, 4, 3)), rng.standard_normal((2, 3, 5, 3)), rng.standard_normal((2, 3, 5, 2))

    def dk_off_by_5_percent(dout, cache):
        dq, dk, dv = attention_backward(dout, cache)
        return dq, dk * 1.05, dv

    report = gradcheck(attention_forward, dk_off_by_5_percent, dict(q=q, k=k, v=v))
    assert [r.ok for r in report.rows] == [True, False, True]


def test_gradcheck_counts_a_missing_gradient_as_wrong(rng):
    q = rng.standard_normal((2, 4, 3))

    def no_dk(dout, cache):
        dq, _, dv = attention_backward(dout, cache)
        return dq, None, dv

    report = gradcheck(attention_forward, no_dk, dict(q=q, k=q.copy(), v=q.copy()))
    assert [r.name for r in report.rows] == ["q", "k", "v"] and [r.ok for r in report.rows] == [True, False, True]


def test_dropout_masks_differ_across_batch_and_heads(rng):
    one = rng.standard_normal((1, 1, 6, 4))
    q = np.broadcast_to(one, (2, 3, 6, 4)).copy()                      # identical batch elements and heads
    o, cache = attention_forward(q, q, q, dropout_p=0.5, rng=0)
    assert cache.keep.shape == cache.p.shape
    flat = o.reshape(6, 6, 4)
    assert all(not np.array_equal(flat[0], flat[i]) for i in range(1, 6))


@pytest.mark.parametrize("mask_shape", [(2, 1, 9, 1), (2, 1, 1, 11), (9, 1), (1, 11)], ids=str)
def test_tiled_broadcast_masks_over_several_tiles(rng, mask_shape):
    q, k, v = rng.standard_normal((2, 2, 9, 3)), rng.standard_normal((2, 2, 11, 3)), rng.standard_normal((2, 2, 11, 2))
    for mask in (rng.standard_normal(mask_shape), rng.random(mask_shape) > 0.3):
        o, _ = attention_forward(q, k, v, mask=mask)
        o_t, _ = flash_attention_forward(q, k, v, mask=mask, block_q=2, block_k=3)
        np.testing.assert_allclose(o_t, o, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("op", [attention_forward, flash_attention_forward])
def test_float16_scores_are_accumulated_in_float32(op):
    q = np.array([[40.0]], dtype=np.float16)
    k = np.array([[25.0], [25.015625]], dtype=np.float16)
    v = np.array([[0.0], [1.0]], dtype=np.float16)
    o, _ = op(q, k, v, scale=1.0)
    assert o.dtype == np.float16 and float(o[0, 0]) == pytest.approx(0.6514, abs=1e-3)   # not 0.6226


def test_dlse_reaches_2d_inputs(rng):
    q, k, v = rng.standard_normal((4, 3)), rng.standard_normal((6, 3)), rng.standard_normal((6, 2))
    report = gradcheck(flash_with_lse_forward, flash_with_lse_backward, dict(q=q, k=k, v=v),
                       kwargs=dict(causal=True, block_q=3, block_k=4))
    assert report.ok, report

    def dropping_dlse(douts, cache):
        return flash_attention_backward(douts[0], cache)

    assert not gradcheck(flash_with_lse_forward, dropping_dlse, dict(q=q, k=k, v=v), kwargs=dict(block_q=3)).ok


# --- the NaN rule (docstrings and README "Conventions")
@pytest.mark.parametrize("op", ["naive", "tiled"])
def test_a_nan_value_reaches_every_row_that_may_attend_it(rng, op):
    q, k, v = rng.standard_normal((1, 8, 3)), rng.standard_normal((1, 8, 3)), rng.standard_normal((1, 8, 2))
    v[0, 5, 0] = np.nan                                            # key 5's value
    forward = attention_forward if op == "naive" else flash_attention_forward
    o, _ = forward(q, k, v, causal=True, **({} if op == "naive" else dict(block_q=2, block_k=2)))
    assert np.isnan(o[0, 5:, 0]).all()                             # rows 5-7 may attend key 5: never hidden
    assert not np.isnan(o[0, :, 1]).any()                          # the other value column is clean
    if op == "tiled":
        assert not np.isnan(o[0, :4, 0]).any()                     # rows 0-3: their tiles with key 5 are skipped


# --- a wide property test: either a named error or the float64 truth, never another exception or a NaN
ARGUMENTS = ("q", "k", "v", "mask", "scale", "causal", "dropout_p", "window", "softcap", "alibi_slopes", "block_q",
             "block_k", "workers", "D", "G", "H")


@pytest.mark.parametrize("op", ["naive", "tiled"])
def test_wide_inputs_give_a_named_error_or_the_truth(op):
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from tests.reference import attention_reference

    dims = st.integers(0, 4)
    finite_or_not = st.sampled_from(["finite", "nan_q", "inf_k"])

    @settings(max_examples=60, deadline=None, derandomize=True)
    @given(b=st.integers(1, 2), h=st.sampled_from([1, 2, 4]), g=st.sampled_from([1, 2, 3]), n=dims, m=dims,
           d=st.integers(0, 3), dtype=st.sampled_from(["float64", "float32", "int64"]),
           mask=st.sampled_from([None, "bool", "float", "bad_shape", "float32"]),
           scale=st.sampled_from([None, 0.5, -1.0, float("inf"), "x"]),
           causal=st.sampled_from([False, True, "top-left", "no"]),
           window=st.sampled_from([None, (1, 0), (None, 2), (-1, 0)]), values=finite_or_not, seed=st.integers(0, 9))
    def check(b, h, g, n, m, d, dtype, mask, scale, causal, window, values, seed):
        rng = np.random.default_rng(seed)
        q = rng.standard_normal((b, h, n, d)).astype(dtype)
        k = rng.standard_normal((b, g, m, d)).astype(dtype)
        v = rng.standard_normal((b, g, m, 2)).astype(dtype)
        if values == "nan_q" and q.size and dtype != "int64":
            q.flat[0] = np.nan
        if values == "inf_k" and k.size and dtype != "int64":
            k.flat[0] = np.inf
        mask_arr = {None: None, "bool": rng.random((n, m)) > 0.3, "float": rng.standard_normal((n, m)).astype(dtype),
                    "bad_shape": np.ones((n + 1, m + 2), bool), "float32": np.ones((n, m), np.float32)}[mask]
        kwargs = dict(mask=mask_arr, scale=scale, causal=causal, window=window)
        forward = attention_forward if op == "naive" else flash_attention_forward
        try:
            o, _ = forward(q, k, v, **kwargs)
        except (TypeError, ValueError) as err:
            assert any(name in str(err) for name in ARGUMENTS + ("head", "scores", "heads")), str(err)
            return
        o_ref = attention_reference(q, k, v, mask=mask_arr, causal=causal, scale=scale, window=window)[0]
        if values == "finite":
            assert not np.isnan(o).any()
            tol = 1e-10 if dtype == "float64" else 1e-4
            np.testing.assert_allclose(o, o_ref, rtol=tol, atol=tol)
        else:
            # the bad value reaches at least the rows of its head that the reference shows it in
            assert np.all(np.isnan(o)[np.isnan(o_ref)] | ~np.isnan(o_ref)[np.isnan(o_ref)])

    check()


# --- issue 22: the ops' findings from the outside probe and the hidden contract ---------------------

ATTENTION_OPS = [(attention_forward, attention_backward), (flash_attention_forward, flash_attention_backward)]


@pytest.mark.parametrize("forward, backward", ATTENTION_OPS)
def test_a_huge_window_side_means_unbounded(rng, forward, backward):
    q, k, v = rng.standard_normal((2, 5, 3)), rng.standard_normal((2, 7, 3)), rng.standard_normal((2, 7, 2))
    for huge in (2**70, np.int64(2**62)):
        o, _ = forward(q, k, v, window=(huge, 0))
        np.testing.assert_array_equal(o, forward(q, k, v, window=(None, 0))[0])
        o, _ = forward(q, k, v, window=(1, huge), causal=True)
        np.testing.assert_array_equal(o, forward(q, k, v, window=(1, None), causal=True)[0])


@pytest.mark.parametrize("forward, backward", ATTENTION_OPS)
def test_causal_must_be_a_bool_or_a_name_never_an_array(rng, forward, backward):
    q, k, v = rng.standard_normal((2, 5, 3)), rng.standard_normal((2, 7, 3)), rng.standard_normal((2, 7, 2))
    with pytest.raises(TypeError, match="causal must be a bool"):
        forward(q, k, v, causal=np.array([True, False]))
    np.testing.assert_array_equal(forward(q, k, v, causal=np.bool_(True))[0], forward(q, k, v, causal=True)[0])


@pytest.mark.parametrize("forward, backward", ATTENTION_OPS)
def test_alibi_slope_of_inf_keeps_the_diagonal_and_nan_propagates(rng, forward, backward):
    q, k, v = rng.standard_normal((1, 5, 3)), rng.standard_normal((1, 5, 3)), rng.standard_normal((1, 5, 2))
    with np.errstate(all="raise"):                                   # no inf * 0 on the way
        o, _ = forward(q, k, v, alibi_slopes=np.array([np.inf]))
    np.testing.assert_allclose(o, v, rtol=0, atol=0)                   # only distance 0 survives
    o, _ = forward(q, k, v, alibi_slopes=np.array([np.nan]))
    assert np.isnan(o).all()


@pytest.mark.parametrize("forward, backward", ATTENTION_OPS)
def test_mask_grad_with_2d_inputs(rng, forward, backward):
    q, k, v = rng.standard_normal((5, 3)), rng.standard_normal((6, 3)), rng.standard_normal((6, 2))

    def pair_forward(q, k, v, mask):
        return forward(q, k, v, mask=mask)

    report = gradcheck(pair_forward, lambda dout, cache: backward(dout, cache, mask_grad=True),
                       dict(q=q, k=k, v=v, mask=rng.standard_normal((5, 6))))
    assert report.ok and report.rows[-1].shape == (5, 6), str(report)


def test_softmax_axis_takes_any_integer_type(rng):
    x = rng.standard_normal((3, 4))
    np.testing.assert_array_equal(softmax(x, axis=np.int64(0)), softmax(x, axis=0))
    for bad in (0.0, True, "0"):
        with pytest.raises(TypeError, match="axis must be an int"):
            softmax(x, axis=bad)
