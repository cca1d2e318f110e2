"""npattn/testing/: the reference in one call, the battery on a correct dense torch kernel and on one
kernel per planted convention bug (each must fail and be named), torch's SDPA, and golden files.
The tiled kernel's bugs (tile loops, variants, precision) are in tests/test_attention_check.py."""

import math

import numpy as np
import pytest

from npattn import attention_forward, flash_attention_forward
from npattn.testing import check_attention, default_cases, load_golden, reference, write_golden

torch = pytest.importorskip("torch")


def make_kernel(bug=None):
    """A 20-line float32 attention returning (o, lse), correct unless a bug is planted."""
    def kernel(q, k, v, *, mask=None, causal=False, scale=None):
        h, g, n, m, d = q.shape[1], k.shape[1], q.shape[-2], k.shape[-2], q.shape[-1]
        if bug == "gqa-interleaved":
            k, v = k.repeat(1, h // g, 1, 1), v.repeat(1, h // g, 1, 1)
        else:
            k, v = k.repeat_interleave(h // g, 1), v.repeat_interleave(h // g, 1)
        scale = {"scale-1/D": 1 / d, "no-scale": 1.0}.get(bug, 1 / math.sqrt(d)) if scale is None else scale
        s = scale * q @ k.transpose(-1, -2)
        allowed = torch.ones(s.shape, dtype=torch.bool)
        if mask is not None and mask.dtype == torch.bool:
            allowed = allowed & (~mask if bug == "mask-inverted" else mask)
        elif mask is not None:
            s = s + mask
        if causal:
            i, j = torch.arange(n)[:, None], torch.arange(m)[None, :]
            allowed = allowed & (j <= i if bug == "causal-top-left" else j <= i + m - n)
        if bug == "masked-row-nan":
            p = torch.softmax(s.masked_fill(~allowed, -math.inf), -1)
            return p @ v, torch.logsumexp(s.masked_fill(~allowed, -math.inf), -1)
        if bug == "masked-row-uniform":
            s = s.masked_fill(~allowed, torch.finfo(s.dtype).min)
            return torch.softmax(s, -1) @ v, torch.logsumexp(s.masked_fill(~allowed, -math.inf), -1)
        empty = ~allowed.any(-1, keepdim=True)
        s = s.masked_fill(~allowed, -math.inf).masked_fill(empty, 0.0)
        lse = torch.logsumexp(s, -1, keepdim=True)
        p = torch.exp(s - lse) * ~empty
        lse = lse.masked_fill(empty, -math.inf).squeeze(-1)
        return p @ v, (lse / math.log(2) if bug == "lse-base-2" else lse)
    return kernel


def test_reference_matches_the_ops_and_takes_torch_tensors(rng):
    q, k, v = rng.standard_normal((2, 4, 5, 8)), rng.standard_normal((2, 2, 7, 8)), rng.standard_normal((2, 2, 7, 8))
    dout, dlse = rng.standard_normal((2, 4, 5, 8)), rng.standard_normal((2, 4, 5))
    ref = reference(torch.tensor(q, dtype=torch.float32), k.tolist(), v, dout=dout, dlse=dlse, causal=True)
    o, cache = attention_forward(q.astype(np.float32).astype(np.float64), k, v, causal=True)
    np.testing.assert_allclose(ref.o, o, rtol=1e-12)
    np.testing.assert_allclose(ref.p, cache.p, rtol=1e-12)
    assert ref.o.dtype == np.float64 and ref.dq.shape == q.shape and ref.dk.shape == k.shape
    _, fc = flash_attention_forward(q.astype(np.float32).astype(np.float64), k, v, causal=True)
    np.testing.assert_allclose(ref.lse, fc.lse, rtol=1e-12)
    assert reference(q, k, v).dq is None
    with pytest.raises(ValueError, match="no dropout"):
        reference(q, k, v, dropout_p=0.1)


def test_reference_passes_sinks_and_packed_sequences_through(rng):
    q, k, v = rng.standard_normal((4, 9, 8)), rng.standard_normal((2, 11, 8)), rng.standard_normal((2, 11, 8))
    sinks, dout, dlse = rng.standard_normal(4), rng.standard_normal((4, 9, 8)), rng.standard_normal((4, 9))
    cu_q, cu_k = torch.tensor([0, 4, 9], dtype=torch.int32), np.array([0, 6, 11])
    ref = reference(q, k, v, sinks=sinks, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=True, dout=dout, dlse=dlse)
    o, cache = flash_attention_forward(q, k, v, sinks=sinks, cu_seqlens_q=np.array([0, 4, 9]), cu_seqlens_k=cu_k,
                                       causal=True)
    np.testing.assert_allclose(ref.o, o, rtol=1e-12)
    assert ref.dsinks.shape == (4,) and isinstance(ref.p, tuple) and len(ref.p) == 2
    assert reference(q, k, v, dout=dout).dsinks is None


def test_a_correct_kernel_passes_every_case():
    report = check_attention(make_kernel())
    assert report.ok, report
    assert report.diagnosis == []
    assert {r.case for r in report.rows} == {c.name for c in default_cases()}
    assert {r.output for r in report.rows} == {"o", "lse", "dq", "dk", "dv"}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_torch_sdpa_is_top_left_and_nothing_else(dtype):
    """torch's own SDPA (o only): exactly causal-top-left, in float32 and in bfloat16 (the float mask
    is built in torch, in the dtype)."""
    def sdpa(q, k, v, *, mask=None, causal=False, scale=None):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                                scale=scale, enable_gqa=True)
    report = check_attention(sdpa, dtype=dtype)
    assert report.diagnosis == ["causal-top-left"], report
    assert report.summary.endswith("fails only causal and N != M cases")


DENSE_BUGS = ["causal-top-left", "gqa-interleaved", "lse-base-2", "scale-1/D", "no-scale", "mask-inverted",
              "masked-row-nan", "masked-row-uniform"]


@pytest.mark.parametrize("bug", DENSE_BUGS)
def test_each_planted_bug_fails_and_is_named(bug):
    report = check_attention(make_kernel(bug))
    assert not report.ok
    assert report.diagnosis == [bug], report
    assert bug in str(report) and "BAD" in str(report)


def test_float64_kernel_and_the_default_battery_is_fast():
    report = check_attention(make_kernel(), dtype="float64")
    assert report.ok, report
    assert max(r.max_rel_err for r in report.rows) < 1e-12
    assert report.seconds < 20


def test_a_kernel_that_raises_is_reported():
    def broken(q, k, v, **kw):
        raise RuntimeError("shape mismatch in my kernel")
    report = check_attention(broken, cases=default_cases()[:1])
    assert not report.ok and "shape mismatch in my kernel" in str(report)
    assert report.errors == {"N < M": "fn raised RuntimeError: shape mismatch in my kernel"}


def test_golden_files_round_trip(tmp_path):
    index = write_golden(str(tmp_path), dtype="float32")
    assert len(index) == len(default_cases()) and (tmp_path / "index.json").exists()
    for entry in index:
        case = load_golden(str(tmp_path / entry["file"]))
        ref = reference(case["q"], case["k"], case["v"], mask=case.get("mask"), dout=case["dout"], dlse=case["dlse"],
                        **case["kwargs"])
        for name in ("o", "lse", "dq", "dk", "dv"):
            np.testing.assert_array_equal(getattr(ref, name), case[name])
    # the five-line loader of docs/kernel-authors.md, without npattn
    import json
    data = np.load(tmp_path / "case03.npz")
    kwargs = json.loads(str(data["kwargs"]))
    assert kwargs == {"causal": True} and data["q"].shape == (1, 4, 4, 8)


def test_cli_golden(tmp_path, capsys):
    from npattn.cli import main

    assert main(["golden", "--out", str(tmp_path / "g"), "--dtype", "float16"]) == 0
    assert f"wrote {len(default_cases())} cases" in capsys.readouterr().out
    case = load_golden(str(tmp_path / "g" / "case00.npz"))
    assert np.array_equal(case["q"], case["q"].astype(np.float16).astype(np.float64))   # inputs rounded


def test_reference_takes_torch_bfloat16_and_refuses_an_integer_mask():
    """issue 22: bfloat16 tensors crashed in the conversion; an int 0/1 mask was silently added to the
    scores as a float mask (the ops refuse it)."""
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 8, generator=gen).to(torch.bfloat16) for n in (4, 5, 5))
    ref = reference(q, k, v, causal=True)
    want = reference(q.double(), k.double(), v.double(), causal=True)
    assert ref.o.dtype == np.float64 and np.array_equal(ref.o, want.o)   # bfloat16 values are exact in float64
    for mask in (np.ones((4, 5), dtype=np.int64), torch.ones((4, 5), dtype=torch.int32)):
        with pytest.raises(TypeError, match="mask must be bool"):
            reference(q, k, v, mask=mask)
