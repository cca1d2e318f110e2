"""npattn.testing.check_attention on a tiled torch kernel with a hand-written FlashAttention-2
backward (tests/tiled_kernel.py), as kernel authors write them: every planted bug must fail, each
convention bug must get exactly its code, a correct kernel must pass in float32, float16 and
bfloat16; a broken fn is that case's failure with a message, never a crash of the toolkit."""

import math
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from npattn.testing import DIAGNOSES, AttentionCase, cases, check_attention  # noqa: E402
from npattn.testing.attention_check import CheckRow, load_function  # noqa: E402
from tests.tiled_kernel import make_tiled  # noqa: E402

ALL_VARIANTS = ("window", "softcap", "alibi", "sinks", "varlen")


def tile_cases(dtype="float32"):
    return [c for c in cases(dtype=dtype) if c.id.startswith("tiles")]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_a_correct_tiled_kernel_passes_with_every_variant(dtype):
    report = check_attention(make_tiled(), dtype=dtype, variants=ALL_VARIANTS)
    assert report.ok, report
    assert report.diagnosis == [] and report.summary.startswith("all ")
    assert {r.output for r in report.rows} == {"o", "lse", "dq", "dk", "dv", "dsinks"}
    assert all(0 < r.tol and r.max_abs_err <= r.tol for r in report.rows)


def test_the_default_battery_has_tiles_head_dims_and_every_convention():
    battery = cases()
    lengths = {n for c in battery for n in c.spec.shape[3:5]}
    assert {63, 65, 127, 129, 257} <= lengths
    assert {64, 128} <= {c.spec.shape[5] for c in battery}
    assert any(c.spec.scale is not None for c in battery) and any(c.spec.dv for c in battery)
    assert len({c.id for c in battery}) == len(battery)


@pytest.mark.parametrize("block", [16, 32, 64])
@pytest.mark.parametrize("bug", ["rescale-l-only", "dv-last-q-tile", "delta-unrescaled-o"])
def test_tile_loop_bugs_fail_at_their_own_tile_size(bug, block):
    # the small cases fit in one tile of 16: such a bug passes them, and only the multi-tile cases catch it
    report = check_attention(make_tiled(bug, block=block), cases=tile_cases())
    assert not report.ok
    assert report.diagnosis == [], report
    worst = max((r for r in report.rows if not r.ok), key=lambda r: r.max_abs_err / r.tol)
    assert worst.max_abs_err > 10 * worst.tol


CONVENTION_BUGS = [  # planted bug, variants the battery needs, the code it must get
    ("scale-ignored", (), "scale-ignored"),
    ("causal-ignored", (), "causal-ignored"),
    ("causal-top-left", (), "causal-top-left"),
    ("dlse-ignored", (), "dlse-ignored"),
    ("window-off-by-one", ("window",), "window-off-by-one"),
    ("alibi-top-left", ("alibi",), "alibi-top-left"),
    ("lse-without-sink", ("sinks",), "lse-without-sink"),
    ("low-precision", (), "low-precision-accumulation"),
]


@pytest.mark.parametrize("bug, variants, code", CONVENTION_BUGS, ids=[b for b, _, _ in CONVENTION_BUGS])
def test_each_convention_bug_fails_and_gets_exactly_its_code(bug, variants, code):
    report = check_attention(make_tiled(bug), variants=variants)
    assert not report.ok
    assert report.diagnosis == [code], report
    assert code in str(report) and "BAD" in str(report)


def test_a_wrong_delta_is_not_called_dlse_ignored():
    """Both break dq and dk only; rerun with dlse = 0, a wrong sign on dlse is right and an
    unrescaled O is not, and neither matches the dlse-free gradients: no code for either."""
    sign = check_attention(make_tiled("delta-plus-dlse"))
    assert not sign.ok and sign.diagnosis == []
    assert {r.output for r in sign.rows if not r.ok} == {"dq", "dk"}
    assert "with dlse = 0 the gradients are right" in sign.summary
    unrescaled = check_attention(make_tiled("delta-unrescaled-o"))
    assert not unrescaled.ok and unrescaled.diagnosis == []
    assert "dlse = 0" not in unrescaled.summary and "multi-tile" in unrescaled.summary
    ignored = check_attention(make_tiled("dlse-ignored"), cases=cases()[:3])
    assert ignored.diagnosis == ["dlse-ignored"]


def test_float16_scores_fail_by_far_and_get_no_convention_code():
    report = check_attention(make_tiled("fp16-scores"))
    assert not report.ok
    assert set(report.diagnosis) <= {"low-precision-accumulation"}
    assert max(r.max_abs_err / r.tol for r in report.rows) > 100


def test_bfloat16_dv_over_the_last_query_tile_fails_far_outside_its_tolerance():
    report = check_attention(make_tiled("dv-last-q-tile"), dtype="bfloat16", cases=tile_cases("bfloat16"))
    bad = [r for r in report.rows if not r.ok]
    assert bad and {r.output for r in bad} == {"dv"} and report.diagnosis == []
    assert all(r.max_abs_err > 5 * r.tol for r in bad)
    assert all(r.max_rel_err > 0.05 for r in bad)                 # the gradient is grossly wrong, and caught


def test_two_unrelated_bugs_get_no_code():
    report = check_attention(make_tiled(("causal-top-left", "scale-ignored")))
    assert not report.ok and report.diagnosis == []
    assert "no single known mismatch" in str(report)


def test_the_report_reads_itself():
    report = check_attention(make_tiled("causal-top-left"))
    bad = [r for r in report.rows if not r.ok]
    assert report.summary.startswith(f"{len(bad)} of {len(report.rows)} rows fail (o, lse, dq, dk, dv) in 4 of 17")
    assert report.summary.endswith("fails only causal and N != M cases")
    assert isinstance(bad[0], CheckRow) and CheckRow._fields == (
        "case", "output", "max_abs_err", "max_rel_err", "tol", "where", "ok")
    by_output = {r.output: r.where for r in bad if r.case == "tiles causal N=65 M=257 D=128, GQA"}
    assert by_output["o"].startswith("batch 0, head ") and ", row " in by_output["o"]
    assert by_output["dk"].startswith("batch 0, kv head ") and ", key " in by_output["dk"]
    assert "tol" in str(report).splitlines()[0]


def test_nan_is_reported_as_nan_with_the_gradient_rows_kept():
    def nan_rows(q, k, v, *, mask=None, causal=False, scale=None):
        o, lse = make_tiled()(q, k, v, mask=mask, causal=causal, scale=scale)
        empty = torch.isinf(lse)[..., None]
        return torch.where(empty, math.nan, o), lse
    report = check_attention(nan_rows, cases=[c for c in cases() if "empty rows" in c.id])
    rows = {r.output: r for r in report.rows}
    assert math.isnan(rows["o"].max_abs_err) and not rows["o"].ok
    assert {"dq", "dk", "dv"} <= set(rows)
    assert report.diagnosis == ["masked-row-nan"]
    assert " nan " in str(report)


def test_masked_rows_with_a_finite_fill_and_a_finite_lse_are_uniform():
    """-1e30 instead of -inf, as such kernels are written: a row with no key averages the values and
    its lse is finite."""
    def finite_fill(q, k, v, *, mask=None, causal=False, scale=None):
        h, g, n, m, d = q.shape[1], k.shape[1], q.shape[-2], k.shape[-2], q.shape[-1]
        k, v = k.repeat_interleave(h // g, 1), v.repeat_interleave(h // g, 1)
        s = (1 / math.sqrt(d) if scale is None else scale) * q @ k.mT
        keep = torch.ones(s.shape, dtype=torch.bool)
        if mask is not None and mask.dtype == torch.bool:
            keep = keep & mask
        elif mask is not None:
            s = s + mask
        if causal:
            keep = keep & (torch.arange(m)[None, :] <= torch.arange(n)[:, None] + m - n)
        s = s.masked_fill(~keep, -1e30)
        return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)
    report = check_attention(finite_fill, cases=cases()[:9])
    assert report.diagnosis == ["masked-row-uniform"], report


BROKEN = {
    "returns None": (lambda q, k, v, **kw: None, "returned None"),
    "returns NumPy": (lambda q, k, v, **kw: q.detach().numpy(), "numpy.ndarray, not a torch tensor"),
    "returns 3 values": (lambda q, k, v, **kw: (q, q, q), "tuple of 3 values"),
    "detached": (lambda q, k, v, **kw: make_tiled()(q, k, v, **kw)[0].detach(), "does not require grad"),
    "ignores q": (lambda q, k, v, **kw: make_tiled()(torch.ones_like(q), k, v, **kw), "do not depend on q"),
    "float64 out": (lambda q, k, v, **kw: make_tiled()(q.double(), k.double(), v.double(), **kw)[0],
                    "dtype torch.float64, but the inputs are torch.float32"),
    "wrong shape": (lambda q, k, v, **kw: make_tiled()(q, k, v, **kw)[0].mT, "has shape"),
    "raises": (lambda q, k, v, **kw: 1 / 0, "fn raised ZeroDivisionError"),
    "backward raises": (lambda q, k, v, **kw: _BadBackward.apply(q), "fn's backward raised RuntimeError"),
}


class _BadBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q):
        return q.clone()

    @staticmethod
    def backward(ctx, do):
        raise RuntimeError("my backward is not written yet")


@pytest.mark.parametrize("name", list(BROKEN))
def test_a_broken_kernel_fails_its_case_with_a_message(name):
    fn, message = BROKEN[name]
    battery = [cases()[0], cases()[2]]                         # Dv = D: q itself has o's shape
    report = check_attention(fn, cases=battery)
    assert not report.ok and report.diagnosis == []
    assert set(report.errors) == {c.id for c in battery}
    assert all(message in err for err in report.errors.values()), report.errors
    assert message in str(report) and "error from fn" in report.summary
    result = battery[0].check(fn)
    assert not result.ok and message in str(result)


def test_bad_arguments_are_named_errors():
    fn = make_tiled()
    with pytest.raises(TypeError, match="fn must be callable"):
        check_attention(42)
    with pytest.raises(ValueError, match="cases is empty"):
        check_attention(fn, cases=[])
    for bad in (-1, math.nan, math.inf):
        with pytest.raises(ValueError, match="rtol"):
            check_attention(fn, rtol=bad)
    with pytest.raises(TypeError, match="atol"):
        check_attention(fn, atol="1e-3")
    with pytest.raises(ValueError, match="unknown variant 'dropout'"):
        check_attention(fn, variants=("window", "dropout"))
    with pytest.raises(ValueError, match="dtype"):
        check_attention(fn, dtype="int8")
    with pytest.raises(ValueError, match="repeats"):
        check_attention(fn, repeats=0)
    with pytest.raises(ValueError, match="seed"):
        cases(seed=-1)
    with pytest.raises(ValueError, match="mask must be None, 'bool', 'padding' or 'float', got 'causal'"):
        check_attention(fn, cases=[AttentionCase("x", (1, 2, 2, 3, 3, 4), mask="causal")])
    with pytest.raises(ValueError, match="variants and cases"):
        check_attention(fn, cases=cases()[:1], variants=("sinks",))


def test_explicit_tolerances_override_the_rule():
    report = check_attention(make_tiled(), cases=cases()[:2], rtol=0.5, atol=0.25)
    assert report.ok and all(r.tol >= 0.75 for r in report.rows)
    strict = check_attention(make_tiled(), cases=cases()[:2], rtol=0, atol=0)
    assert not strict.ok


def test_repeats_lists_the_nondeterministic_outputs():
    def noisy(q, k, v, **kw):
        o, lse = make_tiled()(q, k, v, **kw)
        return o + 1e-6 * torch.rand(()), lse
    battery = cases()[:2]
    report = check_attention(noisy, cases=battery, repeats=2)
    assert [x.split(": ")[1] for x in report.nondeterministic] == ["o", "o"]
    assert check_attention(make_tiled(), cases=battery, repeats=2).nondeterministic == []


def test_variants_pass_only_their_keywords_and_varlen_names_the_sequence():
    seen = []

    def recording(q, k, v, **kw):
        seen.append(sorted(kw))
        return make_tiled()(q, k, v, **kw)
    check_attention(recording, variants=("varlen",))
    assert ["causal", "mask", "scale"] in seen and ["causal", "cu_seqlens_k", "cu_seqlens_q", "mask", "scale"] in seen
    assert all("window" not in s and "sinks" not in s for s in seen)
    report = check_attention(make_tiled("causal-top-left"), cases=[c for c in cases(variants=("varlen",))
                                                                    if c.spec.variant == "varlen"])
    bad = [r for r in report.rows if not r.ok]
    assert bad and all("(sequence " in r.where for r in bad)
    assert report.diagnosis == ["causal-top-left"]


# the pytest recipe of docs/kernel-authors.md, as a kernel's own test suite would write it
@pytest.mark.parametrize("case", cases(variants=("sinks",))[:3] + cases(variants=("sinks",))[-2:],
                         ids=lambda c: c.id)
def test_cases_for_pytest_parametrize(case):
    result = case.check(make_tiled())
    assert result.ok, result
    assert set(case.inputs) == {"q", "k", "v"} and case.inputs["q"].dtype == torch.float32
    assert {"mask", "causal", "scale"} <= set(case.kwargs)


def test_a_subset_draws_the_same_numbers_as_the_whole_battery():
    whole, alone = cases(seed=3), cases(seed=3)[5]
    np.testing.assert_array_equal(whole[5].arrays["q"], alone.arrays["q"])
    assert not np.array_equal(cases(seed=4)[5].arrays["q"], alone.arrays["q"])


def test_the_default_battery_is_fast_for_a_torch_kernel():
    def sdpa(q, k, v, *, mask=None, causal=False, scale=None):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                                                enable_gqa=True)
    t0 = time.perf_counter()
    report = check_attention(sdpa)
    assert time.perf_counter() - t0 < 15                     # ~2 s on 2 cores; generous for shared machines
    assert report.diagnosis == ["causal-top-left"], report


def test_verify_and_golden_on_the_command_line(tmp_path, capsys):
    from npattn.cli import main

    kernel = tmp_path / "my_kernel.py"
    kernel.write_text("import sys\nsys.path.insert(0, %r)\nfrom tests.tiled_kernel import make_tiled\n"
                      "good = make_tiled()\nbad = make_tiled('scale-ignored')\nnot_a_function = 3\n"
                      % str(__import__("pathlib").Path(__file__).parents[1]))
    assert main(["verify", "--fn", f"{kernel}:good", "--variants", "sinks"]) == 0
    assert "all 103 rows of 20 cases pass" in capsys.readouterr().out
    assert main(["verify", "--fn", f"{kernel}:bad"]) == 1
    assert "diagnosis scale-ignored" in capsys.readouterr().out
    assert main(["golden", "--out", str(tmp_path / "g"), "--variants", "sinks", "window"]) == 0
    assert "wrote 23 cases" in capsys.readouterr().out
    assert main(["verify", "--fn", f"{kernel}:good", "--golden", str(tmp_path / "g")]) == 0
    assert main(["verify", "--fn", f"{kernel}:bad", "--golden", str(tmp_path / "g")]) == 1
    capsys.readouterr()
    for argv, words in [(["--fn", "no_such_module:f"], "cannot import module 'no_such_module'"),
                        (["--fn", "nocolon"], "--fn must be MODULE:FUNCTION"),
                        (["--fn", f"{kernel}:missing"], "has no 'missing'"),
                        (["--fn", f"{kernel}:not_a_function"], "not a function"),
                        (["--fn", f"{kernel}:good", "--golden", str(tmp_path / "none")], "no index.json"),
                        (["--fn", f"{kernel}:good", "--golden", str(tmp_path / "g"), "--dtype", "float16"],
                         "rounded to float32")]:
        assert main(["verify"] + argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("npattn verify: error: ") and words in err and err.count("\n") == 1, err
    with pytest.raises(SystemExit) as exit_:
        main(["verify", "--fn", f"{kernel}:good", "--seed", "-1"])
    assert exit_.value.code == 2


def test_load_function_takes_a_module_path():
    assert load_function("tests.tiled_kernel:make_tiled") is make_tiled
    assert set(DIAGNOSES) >= {"low-precision-accumulation", "dlse-ignored", "window-off-by-one"}


def test_the_guide_runs_as_printed(tmp_path, monkeypatch):
    """docs/kernel-authors.md: every Python block runs and prints exactly the text block after it;
    its kernel block is examples/tiled_torch_kernel.py, verbatim."""
    import contextlib
    import io
    import re
    from pathlib import Path

    root = Path(__file__).parents[1]
    text = (root / "docs" / "kernel-authors.md").read_text()
    kernel = (root / "examples" / "tiled_torch_kernel.py").read_text()
    assert "```python\n" + kernel + "```" in text
    monkeypatch.chdir(tmp_path)                     # the golden block writes golden/ here
    namespace = {}
    for found in re.finditer(r"```python\n(.*?)```\n(?:```text\n(.*?)```)?", text, flags=re.S):
        code, expected = found.group(1), found.group(2)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile("\n" * text[:found.start(1)].count("\n") + code, "docs/kernel-authors.md", "exec"), namespace)
        if expected is not None:
            assert out.getvalue() == expected, f"printed\n{out.getvalue()}\nbut the guide shows\n{expected}"


def test_the_example_kernel_passes_with_float64_and_its_own_tile_size():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
    try:
        from tiled_torch_kernel import tiled_attention
    finally:
        sys.path.pop(0)
    report = check_attention(lambda q, k, v, **kw: tiled_attention(q, k, v, block=64, **kw), dtype="float64")
    assert report.ok and report.diagnosis == [], report
