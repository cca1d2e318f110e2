"""npattn/ops/combine.py: the split-KV combine equals attention over all keys (any number of
chunks, uneven, empty, causal, grouped-query); its backward by finite differences (with dlse) and
against torch's autograd through logsumexp; ring attention's backward (each chunk's
flash_attention_backward fed (do_s, dlse_s)) equals the all-keys backward; dtypes, backends, bad
input, and examples/ring_attention.py runs and checks out."""

import contextlib
import io
import math
from pathlib import Path

import numpy as np
import pytest

from npattn import attention_backward, attention_forward, gradcheck
from npattn.ops.combine import (
    CombineCache,
    combine_attention,
    combine_attention_backward,
    ring_attention_backward,
    ring_attention_forward,
)
from npattn.ops.flash import flash_attention_backward, flash_attention_forward
from tests.reference import attention_reference

ROOT = Path(__file__).resolve().parents[2]


def combine_reference(o_parts, lse_parts):
    """Row by row with math.exp/log: lse = log sum_s e^{lse_s}, o = sum_s e^{lse_s - lse} o_s."""
    o_parts, lse_parts = np.asarray(o_parts, np.float64), np.asarray(lse_parts, np.float64)
    S = o_parts.shape[0]
    o = np.zeros(o_parts.shape[1:])
    lse = np.full(lse_parts.shape[1:], -np.inf)
    for idx in np.ndindex(*lse.shape):
        finite = [s for s in range(S) if lse_parts[(s,) + idx] != -np.inf]
        if not finite:
            continue
        top = max(lse_parts[(s,) + idx] for s in finite)
        lse[idx] = top + math.log(sum(math.exp(lse_parts[(s,) + idx] - top) for s in finite))
        for s in finite:
            o[idx] += math.exp(lse_parts[(s,) + idx] - lse[idx]) * o_parts[(s,) + idx]
    return o, lse


def qkv(rng, lead=(2,), h=4, g=2, n=5, m=9, d=3, dv=2):
    return (rng.standard_normal(lead + (h, n, d)), rng.standard_normal(lead + (g, m, d)),
            rng.standard_normal(lead + (g, m, dv)))


def chunked(q, k, v, bounds, causal=False):
    """Each chunk through flash_attention_forward: (o_parts, lse_parts, caches), as lists."""
    M, outs, lses, caches = k.shape[-2], [], [], []
    for j0, j1 in zip(bounds[:-1], bounds[1:]):
        o_s, c = flash_attention_forward(q, k[..., j0:j1, :], v[..., j0:j1, :], block_q=2, block_k=2,
                                         window=(None, M - j1) if causal else None)
        outs.append(o_s)
        lses.append(c.lse)
        caches.append(c)
    return outs, lses, caches


BOUNDS = {"S=1": [0, 9], "S=2": [0, 4, 9], "S=3 uneven": [0, 1, 7, 9], "S=5 with an empty chunk": [0, 2, 2, 5, 8, 9]}


@pytest.mark.parametrize("bounds", BOUNDS.values(), ids=BOUNDS.keys())
@pytest.mark.parametrize("causal", [False, True])
def test_forward_equals_attention_over_all_keys(rng, bounds, causal):
    q, k, v = qkv(rng)
    outs, lses, _ = chunked(q, k, v, bounds, causal)
    (o, lse), _ = combine_attention(outs, lses)
    o_ref, _, lse_ref = attention_reference(q, k, v, causal=causal)
    np.testing.assert_allclose(o, o_ref, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(lse, lse_ref, rtol=1e-12)
    np.testing.assert_allclose(o, attention_forward(q, k, v, causal=causal)[0], rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(lse, flash_attention_forward(q, k, v, causal=causal)[1].lse, rtol=1e-12)
    o2, lse2 = combine_reference(np.stack(outs), np.stack(lses))      # the slow combine, row by row
    np.testing.assert_allclose(o, o2, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(lse, lse2, rtol=1e-12)


def test_stacked_and_listed_parts_agree(rng):
    o_parts, lse_parts = rng.standard_normal((3, 2, 4, 5)), rng.standard_normal((3, 2, 4))
    (o1, l1), _ = combine_attention(o_parts, lse_parts)
    (o2, l2), _ = combine_attention(list(o_parts), tuple(lse_parts))
    np.testing.assert_array_equal(o1, o2)
    np.testing.assert_array_equal(l1, l2)


def test_empty_chunk_and_future_chunks_weigh_zero(rng):
    q, k, v = qkv(rng, n=4, m=8)
    outs, lses, _ = chunked(q, k, v, [0, 3, 3, 5, 8], causal=True)    # query i sees keys j <= i + 4
    assert np.all(np.isneginf(lses[1])) and np.all(outs[1] == 0)        # M_s = 0: lse = -inf, o = 0
    assert np.isneginf(lses[3][..., 0]).all() and np.isfinite(lses[3][..., 1:]).all()   # row 0's future
    (o, lse), cache = combine_attention(outs, lses)
    assert np.all(cache.w[1] == 0) and np.all(cache.w[3][..., 0] == 0)
    np.testing.assert_allclose(o, attention_forward(q, k, v, causal=True)[0], rtol=1e-12, atol=1e-13)


def test_all_parts_empty_gives_zero_and_minus_inf_never_nan(rng):
    o_parts = rng.standard_normal((3, 2, 4, 5))
    lse_parts = rng.standard_normal((3, 2, 4))
    lse_parts[:, 1, 2] = -np.inf                                        # one row: every part empty
    (o, lse), cache = combine_attention(o_parts, lse_parts)
    assert np.all(o[1, 2] == 0) and np.isneginf(lse[1, 2])
    assert np.isfinite(o).all() and np.isfinite(np.delete(lse.ravel(), 6)).all()
    do_parts, dlse_parts = combine_attention_backward((rng.standard_normal(o.shape), rng.standard_normal(lse.shape)),
                                                      cache)
    assert np.all(do_parts[:, 1, 2] == 0) and np.all(dlse_parts[:, 1, 2] == 0)
    assert np.isfinite(do_parts).all() and np.isfinite(dlse_parts).all()
    (o, lse), _ = combine_attention(o_parts, np.full((3, 2, 4), -np.inf))   # everything empty
    assert np.all(o == 0) and np.all(np.isneginf(lse))


def test_nan_propagates(rng):
    o_parts, lse_parts = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 3))
    o_nan = o_parts.copy()
    o_nan[1, 1, 2] = np.nan
    (o, lse), _ = combine_attention(o_nan, lse_parts)
    assert np.isnan(o[1, 2]) and not np.isnan(np.delete(o, 6)).any() and not np.isnan(lse).any()
    lse_nan = lse_parts.copy()
    lse_nan[0, 2] = np.nan
    (o, lse), cache = combine_attention(o_parts, lse_nan)
    assert np.isnan(lse[2]) and np.isnan(o[2]).all() and not np.isnan(o[:2]).any()
    dout = rng.standard_normal(o.shape)
    dout[0, 0] = np.nan
    do_parts, dlse_parts = combine_attention_backward((dout, None), combine_attention(o_parts, lse_parts)[1])
    assert np.isnan(do_parts[:, 0, 0]).all() and np.isnan(dlse_parts[:, 0]).all()
    assert not np.isnan(dlse_parts[:, 1]).any()


@pytest.mark.parametrize("with_dlse", [True, False])
def test_gradcheck(rng, with_dlse):
    o_parts = rng.standard_normal((3, 2, 3, 4, 2))
    lse_parts = 3 * rng.standard_normal((3, 2, 3, 4))
    lse_parts[0, 1, 2, 3] = -np.inf                                    # an empty part in one row
    if with_dlse:
        pair = (combine_attention, combine_attention_backward)
    else:
        pair = (lambda o, l: (combine_attention(o, l)[0][0], combine_attention(o, l)[1]),
                lambda dout, cache: combine_attention_backward((dout, None), cache))
    report = gradcheck(*pair, dict(o_parts=o_parts, lse_parts=lse_parts))
    assert report.ok and len(report.rows) == 2, report


def test_dlse_parts_sum_to_dlse(rng):
    """Shifting every lse_s by c shifts lse by c and leaves o: sum_s dlse_s = dlse (eq. (17.7))."""
    (o, lse), cache = combine_attention(rng.standard_normal((4, 3, 5, 2)), rng.standard_normal((4, 3, 5)))
    dlse = rng.standard_normal(lse.shape)
    _, dlse_parts = combine_attention_backward((rng.standard_normal(o.shape), dlse), cache)
    np.testing.assert_allclose(dlse_parts.sum(0), dlse, rtol=1e-12, atol=1e-14)
    assert np.abs(dlse_parts).max() > 0.1                               # and not each zero


RING = {"non-causal MHA": dict(h=3, g=3, causal=False), "causal MHA": dict(h=3, g=3, causal=True),
        "causal GQA N < M": dict(h=4, g=2, causal=True), "non-causal MQA": dict(h=4, g=1, causal=False)}


@pytest.mark.parametrize("spec", RING.values(), ids=RING.keys())
def test_ring_attention_backward_equals_all_keys(rng, spec):
    """Each chunk's flash_attention_backward(do_s, cache_s, dlse=dlse_s) is its share of the
    gradients of attention over all keys: dq summed, dk, dv concatenated (eq. (17.8))."""
    q, k, v = qkv(rng, h=spec["h"], g=spec["g"], n=6, m=10)
    dout, dlse = rng.standard_normal(q.shape[:-1] + (2,)), rng.standard_normal(q.shape[:-1])
    bounds = [0, 3, 3, 7, 10]
    outs, lses, caches = chunked(q, k, v, bounds, spec["causal"])
    (o, lse), cache = combine_attention(outs, lses)
    do_parts, dlse_parts = combine_attention_backward((dout, dlse), cache)
    grads = [flash_attention_backward(do_parts[s], c, dlse=dlse_parts[s]) for s, c in enumerate(caches)]
    dq = sum(g[0] for g in grads)
    dk, dv = (np.concatenate([g[i] for g in grads], axis=-2) for i in (1, 2))
    _, full = flash_attention_forward(q, k, v, causal=spec["causal"])
    want = flash_attention_backward(dout, full, dlse=dlse)
    for name, got, ref in zip(("dq", "dk", "dv"), (dq, dk, dv), want):
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-13, err_msg=name)
    # the packaged pair does the same
    o_r, c_r = ring_attention_forward(q, k, v, bounds=bounds, causal=spec["causal"], block_q=2, block_k=2)
    np.testing.assert_allclose(o_r, o, rtol=1e-14, atol=1e-15)
    for got, ref in zip(ring_attention_backward(dout, c_r, dlse=dlse), want):
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-13)


def test_dropping_dlse_is_wrong(rng):
    """The classic wrong ring backward: do_s only. dv is still right, dq and dk are not."""
    q, k, v = qkv(rng, n=6, m=10)
    dout = rng.standard_normal(q.shape[:-1] + (2,))
    outs, lses, caches = chunked(q, k, v, [0, 4, 10])
    do_parts, _ = combine_attention_backward((dout, None), combine_attention(outs, lses)[1])
    grads = [flash_attention_backward(do_parts[s], c) for s, c in enumerate(caches)]
    dq = sum(g[0] for g in grads)
    dv = np.concatenate([g[2] for g in grads], axis=-2)
    want = attention_backward(dout, attention_forward(q, k, v)[1])
    assert np.abs(dq - want[0]).max() > 1e-2
    np.testing.assert_allclose(dv, want[2], rtol=1e-12, atol=1e-13)


def test_ring_gradcheck_with_dlse(rng):
    q, k, v = qkv(rng, n=4, m=7)

    def fwd(q, k, v):
        o, cache = ring_attention_forward(q, k, v, bounds=[0, 2, 7], causal=True)
        return (o, cache.lse), cache

    report = gradcheck(fwd, lambda d, c: ring_attention_backward(d[0], c, dlse=d[1]), dict(q=q, k=k, v=v))
    assert report.ok, report


@pytest.mark.parametrize("dtype, lse_dtype, rtol", [(np.float32, np.float32, 1e-5), (np.float16, np.float32, 3e-3),
                                                    (np.float16, np.float16, 3e-3)])
def test_dtype_contract(rng, dtype, lse_dtype, rtol):
    q, k, v = (a.astype(dtype) for a in qkv(rng, n=6, m=8, d=8, dv=8))
    outs, lses, caches = chunked(q, k, v, [0, 3, 8])
    assert lses[0].dtype == (np.float32 if dtype == np.float16 else dtype)   # the attention ops' lse
    (o, lse), cache = combine_attention(outs, [x.astype(lse_dtype) for x in lses])
    assert o.dtype == dtype and lse.dtype == lse_dtype and cache.w.dtype == np.float32
    o64, lse64 = combine_reference(np.stack(outs), np.stack(lses))
    np.testing.assert_allclose(o, o64, rtol=rtol, atol=rtol)
    dout = rng.standard_normal(o.shape).astype(dtype)
    dlse = rng.standard_normal(lse.shape).astype(lse_dtype)
    do_parts, dlse_parts = combine_attention_backward((dout, dlse), cache)
    assert do_parts.dtype == dtype and dlse_parts.dtype == lse_dtype
    _, c64 = combine_attention(np.stack(outs).astype(np.float64), np.stack(lses).astype(np.float64))
    want = combine_attention_backward((dout.astype(np.float64), dlse.astype(np.float64)), c64)
    for got, ref in zip((do_parts, dlse_parts), want):
        np.testing.assert_allclose(got, ref, rtol=rtol, atol=rtol * max(1.0, np.abs(ref).max()))


def test_inputs_and_cache_not_modified(rng):
    o_parts, lse_parts = rng.standard_normal((3, 2, 4, 5)), rng.standard_normal((3, 2, 4))
    lse_parts[1, 0, 0] = -np.inf
    saved = [a.copy() for a in (o_parts, lse_parts)]
    (o, lse), cache = combine_attention(o_parts, lse_parts)
    dout, dlse = rng.standard_normal(o.shape), rng.standard_normal(lse.shape)
    kept = [dout.copy(), dlse.copy()] + [a.copy() for a in (cache.o_parts, cache.w, cache.o)]
    combine_attention_backward((dout, dlse), cache)
    assert all(np.array_equal(a, b) for a, b in zip((o_parts, lse_parts), saved))
    assert all(np.array_equal(a, b) for a, b in zip((dout, dlse, cache.o_parts, cache.w, cache.o), kept))


def test_bad_input(rng):
    o_parts, lse_parts = rng.standard_normal((3, 2, 4, 5)), rng.standard_normal((3, 2, 4))
    with pytest.raises(ValueError, match=r"lse_parts must have o_parts' shape.*"
                                         r"o_parts \(3, 2, 4, 5\), lse_parts \(2, 2, 4\)"):
        combine_attention(o_parts, lse_parts[:2])
    with pytest.raises(ValueError, match=r"lse_parts must have o_parts' shape"):
        combine_attention(o_parts, lse_parts[..., :3])
    with pytest.raises(ValueError, match=r"o_parts must hold at least one part \(S >= 1\)"):
        combine_attention(o_parts[:0], lse_parts[:0])
    with pytest.raises(ValueError, match="o_parts must hold at least one part .* empty list"):
        combine_attention([], [])
    with pytest.raises(ValueError, match="o_parts must be .* at least 3 axes"):
        combine_attention(o_parts[:, 0, 0], lse_parts[:, 0, 0])
    with pytest.raises(ValueError, match=r"the parts of o_parts must share one shape"):
        combine_attention([o_parts[0], o_parts[1, :1]], list(lse_parts[:2]))
    with pytest.raises(TypeError, match="o_parts must be a real floating array, got dtype int64"):
        combine_attention(np.ones((3, 2, 4, 5), dtype=np.int64), lse_parts)
    with pytest.raises(TypeError, match=r"lse_parts\[1\] must be a real floating array, got dtype bool"):
        combine_attention(list(o_parts), [lse_parts[0], lse_parts[1] > 0, lse_parts[2]])
    with pytest.raises(TypeError, match="lse_parts must have o_parts' dtype float32 or its compute dtype float32, "
                                        "got float64"):
        combine_attention(o_parts.astype(np.float32), lse_parts)
    with pytest.raises(TypeError, match=r"one dtype: o_parts\[0\] is float64, o_parts\[1\] is float32"):
        combine_attention([o_parts[0], o_parts[1].astype(np.float32)], list(lse_parts[:2]))
    (o, lse), cache = combine_attention(o_parts, lse_parts)
    with pytest.raises(TypeError, match=r"douts must be the pair \(dout, dlse\)"):
        combine_attention_backward(np.ones_like(o), cache)
    with pytest.raises(ValueError, match="dout must have the output's shape"):
        combine_attention_backward((o[..., :2], None), cache)
    with pytest.raises(ValueError, match=r"dlse must have the output's shape \(2, 4\)"):
        combine_attention_backward((o, lse[:1]), cache)
    with pytest.raises(TypeError, match="dlse must have the output's dtype float64, got float32"):
        combine_attention_backward((o, lse.astype(np.float32)), cache)
    with pytest.raises(TypeError, match="cache must be the CombineCache returned by combine_attention"):
        combine_attention_backward((o, None), cache._asdict())
    q, k, v = qkv(rng)
    with pytest.raises(ValueError, match=r"bounds must be non-decreasing ints from 0 to the key length M=9"):
        ring_attention_forward(q, k, v, bounds=[0, 5, 3, 9])
    with pytest.raises(TypeError, match="bounds must hold integers"):
        ring_attention_forward(q, k, v, bounds=[0, 4.5, 9])
    with pytest.raises(ValueError, match="causal must be False, True or 'bottom-right'"):
        ring_attention_forward(q, k, v, bounds=[0, 9], causal="top-left")


def test_mixed_libraries_are_named(rng):
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="o_parts is numpy, lse_parts is torch"):
        combine_attention(rng.standard_normal((2, 3, 4)), torch.zeros((2, 3), dtype=torch.float64))


def test_backends(backend, rng):
    o_parts, lse_parts = rng.standard_normal((3, 2, 4, 5)), 2 * rng.standard_normal((3, 2, 4))
    lse_parts[0, 1, :] = -np.inf
    lse_parts[:, 0, 3] = -np.inf                                        # one row entirely empty
    dout, dlse = rng.standard_normal((2, 4, 5)), rng.standard_normal((2, 4))
    (o, lse), cache = combine_attention(backend.asarray(o_parts), [backend.asarray(x) for x in lse_parts])
    assert type(o) is type(backend.asarray(o_parts)) and isinstance(cache, CombineCache)
    grads = combine_attention_backward((backend.asarray(dout), backend.asarray(dlse)), cache)
    (o_np, lse_np), c_np = combine_attention(o_parts, lse_parts)
    want = combine_attention_backward((dout, dlse), c_np)
    for got, ref in zip((o, lse) + tuple(grads), (o_np, lse_np) + tuple(want)):
        np.testing.assert_allclose(backend.numpy(got), ref, rtol=1e-12, atol=1e-14)
    q, k, v = qkv(rng, n=4, m=6)                                         # ring attention, end to end
    o_r, c_r = ring_attention_forward(*(backend.asarray(a) for a in (q, k, v)), bounds=[0, 2, 6], causal=True)
    dq, dk, dv = ring_attention_backward(backend.asarray(rng.standard_normal((2, 4, 4, 2))), c_r)
    np.testing.assert_allclose(backend.numpy(o_r), attention_forward(q, k, v, causal=True)[0], rtol=1e-12, atol=1e-13)
    assert dk.shape == k.shape and dv.shape == v.shape and dq.shape == q.shape


def test_torch_float64(rng):
    """The combine in a few lines of torch (torch.logsumexp), its gradients by autograd."""
    torch = pytest.importorskip("torch")
    o_parts, lse_parts = rng.standard_normal((4, 2, 3, 5, 3)), 3 * rng.standard_normal((4, 2, 3, 5))
    lse_parts[2, 0, 1, :] = -np.inf
    dout, dlse = rng.standard_normal((2, 3, 5, 3)), rng.standard_normal((2, 3, 5))
    t_o, t_lse = torch.tensor(o_parts, requires_grad=True), torch.tensor(lse_parts, requires_grad=True)
    lse_t = torch.logsumexp(t_lse, dim=0)
    o_t = (torch.exp(t_lse - lse_t)[..., None] * t_o).sum(0)
    (o_t * torch.tensor(dout)).sum().add((lse_t * torch.tensor(dlse)).sum()).backward()
    (o, lse), cache = combine_attention(o_parts, lse_parts)
    do_parts, dlse_parts = combine_attention_backward((dout, dlse), cache)
    for got, ref in zip((o, lse, do_parts, dlse_parts),
                        (o_t.detach(), lse_t.detach(), t_o.grad, t_lse.grad)):
        np.testing.assert_allclose(got, ref.numpy(), rtol=1e-12, atol=1e-14)


def test_ring_attention_example_runs_and_checks_out():
    """examples/ring_attention.py: ring attention's forward and backward equal attention over all
    keys (it asserts so itself), for non-causal and causal attention, and dropping dlse_s is wrong."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile((ROOT / "examples" / "ring_attention.py").read_text(), "ring_attention.py", "exec"),
             {"__name__": "__main__"})
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and lines[0].startswith("causal=False") and lines[1].startswith("causal=True")
    for line in lines[:2]:
        errors = [float(x) for x in line.split("max |ring - all keys|:")[1].split()[1::2]]
        assert len(errors) == 5 and max(errors) < 1e-12, line
    assert int(lines[1].split("-inf:")[1].split()[0]) > 0             # causal: chunks in rows' future
    assert lines[2].endswith("{'o': False, 'lse': False, 'dq': True, 'dk': True, 'dv': False}")
