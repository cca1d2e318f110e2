"""npattn.testing.check_backward proves itself honest: npattn's own backward passes every op's
battery with no diagnosis; for every op and every code, a wrong backward planted by hand (plain
NumPy, written here the way a learner would, not taken from the catalogue) fails and gets exactly
that code; broken protocols fail with a message naming the gradient; bad arguments are named."""

import math
import re
from pathlib import Path

import numpy as np
import pytest

from npattn.ops import erf
from npattn.testing.backward_check import OPS, WRONG_FORMS, check_backward

ROOT = Path(__file__).resolve().parents[1]


def npattn_pair(op):
    """npattn's backward in the inputs protocol: ``backward(dout, *inputs, **kwargs)``."""
    spec = OPS[op]

    def backward(dout, *inputs, **kwargs):
        return spec.backward(dout, spec.forward(*inputs, **kwargs)[1])
    return backward


# ----------------------------------------------------------------------------------------------
# hand-written backwards, each right unless a bug is planted


def softmax_bw(bug=None):
    def backward(dout, x, axis=-1):
        m = np.max(x, axis=axis, keepdims=True)
        e = np.exp(x - np.where(np.isfinite(m), m, 0.0))
        l = np.sum(e, axis=axis, keepdims=True)
        y = e / np.where(l > 0, l, 1.0)
        if bug == "softmax-diagonal-only":
            return y * (1 - y) * dout
        if bug == "softmax-missing-sum":
            return y * dout
        return y * (dout - np.sum(dout * y, axis=axis, keepdims=True))
    return backward


def attention_bw(bug=None):
    def backward(dout, q, k, v, mask=None, causal=False, scale=None):
        n, m, d = q.shape[-2], k.shape[-2], q.shape[-1]
        scale = 1 / math.sqrt(d) if scale is None else scale
        s = scale * q @ np.swapaxes(k, -1, -2)
        allowed = np.ones(s.shape, dtype=bool)
        if mask is not None:
            allowed &= mask
        if causal:
            allowed &= np.arange(m)[None, :] <= np.arange(n)[:, None] + m - n
        s = np.where(allowed, s, -np.inf)
        mx = np.max(s, -1, keepdims=True)
        e = np.exp(s - np.where(np.isfinite(mx), mx, 0.0))
        p = e / np.maximum(e.sum(-1, keepdims=True), np.finfo(e.dtype).tiny)
        dv = np.swapaxes(p, -1, -2) @ dout
        dp = dout @ np.swapaxes(v, -1, -2)
        if bug == "attention-softmax-diagonal-only":
            ds = p * (1 - p) * dp
        else:
            ds = p * (dp - np.sum(p * dp, -1, keepdims=True))
        if bug == "attention-missing-scale":
            scale = 1.0
        dq = scale * ds @ k
        dk = scale * (ds @ q if bug == "attention-dk-transposed" else np.swapaxes(ds, -1, -2) @ q)
        return dq, dk, dv
    return backward


def layernorm_bw(bug=None):
    def backward(dout, x, gamma, beta, eps=1e-5):
        mu = x.mean(-1, keepdims=True)
        r = 1 / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps)
        xhat = (x - mu) * r
        dxhat = dout * gamma
        lead = tuple(range(x.ndim - 1))
        dgamma, dbeta = (dout * xhat).sum(lead), dout.sum(lead)
        if bug == "layernorm-stats-constant":
            return r * dxhat, dgamma, dbeta
        dx = r * (dxhat - dxhat.mean(-1, keepdims=True) - xhat * (dxhat * xhat).mean(-1, keepdims=True))
        return dx, dgamma, dbeta
    return backward


def rmsnorm_bw(bug=None):
    def backward(dout, x, gamma, eps=1e-6):
        r = 1 / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
        xhat = x * r
        dxhat = dout * gamma
        dgamma = (dout * xhat).sum(tuple(range(x.ndim - 1)))
        if bug == "rmsnorm-rms-constant":
            return r * dxhat, dgamma
        return r * (dxhat - xhat * (dxhat * xhat).mean(-1, keepdims=True)), dgamma
    return backward


def gelu_bw(bug=None):
    def backward(dout, x, approximate="none"):
        if approximate == "tanh":
            c = math.sqrt(2 / math.pi)
            t = np.tanh(c * (x + 0.044715 * x ** 3))
            if bug == "gelu-missing-pdf-term":
                return dout * 0.5 * (1 + t)
            return dout * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x))
        cdf = 0.5 * (1 + np.asarray(erf(x / math.sqrt(2))))
        if bug == "gelu-missing-pdf-term":
            return dout * cdf
        return dout * (cdf + x * np.exp(-x * x / 2) / math.sqrt(2 * math.pi))
    return backward


def silu_bw(bug=None):
    def backward(dout, x):
        sig = 1 / (1 + np.exp(-x))
        if bug == "silu-missing-sigmoid-derivative":
            return dout * sig
        return dout * sig * (1 + x * (1 - sig))
    return backward


def relu_bw(bug=None):
    return lambda dout, x: dout * (x > 0)


def embedding_bw(bug=None):
    def backward(dout, ids, weight):
        dw = np.zeros_like(weight)
        for p, i in enumerate(ids.reshape(-1)):
            if bug == "embedding-repeated-ids-overwrite":
                dw[i] = dout.reshape(-1, weight.shape[1])[p]
            else:
                dw[i] += dout.reshape(-1, weight.shape[1])[p]
        return None, dw
    return backward


def rope_bw(bug=None):
    def backward(dout, x, positions=None, base=10000.0, interleaved=False):
        n, d = x.shape[-2], x.shape[-1]
        t = np.arange(n) if positions is None else positions
        theta = t[..., None] * base ** (-2 * np.arange(d // 2) / d)
        sign = 1.0 if bug == "rope-forward-angle" else -1.0       # the backward rotates by -theta
        cos, sin = np.cos(theta), sign * np.sin(theta)
        if interleaved:
            g1, g2 = dout[..., 0::2], dout[..., 1::2]
        else:
            g1, g2 = dout[..., : d // 2], dout[..., d // 2:]
        r1, r2 = g1 * cos - g2 * sin, g2 * cos + g1 * sin
        out = np.empty_like(dout)
        if interleaved:
            out[..., 0::2], out[..., 1::2] = r1, r2
        else:
            out[..., : d // 2], out[..., d // 2:] = r1, r2
        return out.astype(dout.dtype)
    return backward


def cross_entropy_bw(bug=None):
    def backward(dloss, logits, target, ignore_index=-100, label_smoothing=0.0):
        c = logits.shape[-1]
        z = logits - logits.max(-1, keepdims=True)
        p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
        keep = target != ignore_index
        q = (1 - label_smoothing) * np.eye(c)[np.where(keep, target, 0)] + label_smoothing / c
        n = target.size if bug == "cross-entropy-counts-ignored" else keep.sum()
        return np.where(keep[..., None], dloss * (p - q) / n, 0.0).astype(logits.dtype), None
    return backward


def linear_bw(bug=None):
    def backward(dout, x, w, b):
        x2, d2 = x.reshape(-1, x.shape[-1]), dout.reshape(-1, dout.shape[-1])
        dw = d2.T @ x2 if bug == "linear-dw-transposed" else x2.T @ d2
        return dout @ w.T, dw, d2.sum(0)
    return backward


def log_softmax_bw(bug=None):
    def backward(dout, x, axis=-1):
        z = x - x.max(axis, keepdims=True)
        p = np.exp(z) / np.exp(z).sum(axis, keepdims=True)
        return dout - p * dout.sum(axis, keepdims=True)
    return backward


HANDWRITTEN = {"softmax": softmax_bw, "attention": attention_bw, "layernorm": layernorm_bw, "rmsnorm": rmsnorm_bw,
               "gelu": gelu_bw, "gelu_tanh": gelu_bw, "silu": silu_bw, "relu": relu_bw, "embedding": embedding_bw,
               "rope": rope_bw, "cross_entropy": cross_entropy_bw, "linear": linear_bw, "log_softmax": log_softmax_bw}
PLANTED = [(op, code) for code, w in WRONG_FORMS.items() for op in w.ops]


# ----------------------------------------------------------------------------------------------
# honesty

def test_every_op_of_the_spec_is_checked():
    spec = (ROOT / "README.md").parent.joinpath("npattn", "testing", "backward_check.py").read_text()
    assert set(OPS) == {"linear", "softmax", "log_softmax", "layernorm", "rmsnorm", "gelu", "gelu_tanh", "relu",
                        "silu", "embedding", "rope", "cross_entropy", "attention"}
    assert set(HANDWRITTEN) == set(OPS) and "check_backward" in spec


def test_every_code_of_the_spec_is_in_the_catalogue():
    assert set(WRONG_FORMS) == {
        "softmax-diagonal-only", "softmax-missing-sum", "layernorm-stats-constant", "rmsnorm-rms-constant",
        "gelu-missing-pdf-term", "silu-missing-sigmoid-derivative", "embedding-repeated-ids-overwrite",
        "cross-entropy-counts-ignored", "rope-forward-angle", "attention-missing-scale", "attention-dk-transposed",
        "attention-softmax-diagonal-only", "linear-dw-transposed"}


@pytest.mark.parametrize("code", sorted(WRONG_FORMS))
def test_each_code_cites_a_derivation_section_that_shows_it(code):
    w = WRONG_FORMS[code]
    text = (ROOT / w.derivation).read_text()
    headings = re.findall(r"^#+ (.+)$", text, flags=re.M)
    assert w.section in headings, f"{w.derivation} has no section {w.section!r}"
    body = text.split(w.section, 1)[1].split("\n## ", 1)[0]
    assert "```python" in body and "```text" in body, "the section shows its numbers"


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_npattn_backward_passes_with_no_diagnosis(op, dtype):
    report = check_backward(op, npattn_pair(op), dtype=dtype)
    assert report.ok, str(report)
    assert report.diagnosis == []
    paired = check_backward(op, OPS[op].backward, forward=OPS[op].forward, dtype=dtype, seed=3)
    assert paired.ok and paired.diagnosis == [], str(paired)
    assert any(r.output == "out" for r in paired.rows)          # the forward was checked too


@pytest.mark.parametrize("op", sorted(OPS))
def test_a_handwritten_right_backward_passes(op):
    report = check_backward(op, HANDWRITTEN[op]())
    assert report.ok and report.diagnosis == [], str(report)


def test_float16_inputs_npattn_passes():
    for op in ("softmax", "layernorm", "attention", "cross_entropy"):
        report = check_backward(op, npattn_pair(op), dtype="float16")
        assert report.ok, str(report)


@pytest.mark.parametrize("op,code", PLANTED, ids=[f"{op}:{code}" for op, code in PLANTED])
def test_a_planted_wrong_form_gets_exactly_its_code(op, code):
    report = check_backward(op, HANDWRITTEN[op](code))
    assert not report.ok
    assert report.diagnosis == [code], str(report)
    text = str(report)
    assert f"diagnosis {code}" in text and WRONG_FORMS[code].derivation in text
    assert WRONG_FORMS[code].section in text
    # in float32 too, the wrong form is named (matched to float32's tolerance)
    assert check_backward(op, HANDWRITTEN[op](code), dtype="float32").diagnosis == [code]


def test_the_transposed_dk_fails_where_shapes_differ_and_is_named_from_n_equal_m():
    report = check_backward("attention", attention_bw("attention-dk-transposed"))
    raised = [r for r in report.rows if r.output == "backward"]
    assert raised and all("matmul" in r.message for r in raised)     # N != M: ds q does not even run
    assert [r.case for r in report.rows if r.output == "dk" and not r.ok] == ["N = M (N=M=4)"]
    assert report.diagnosis == ["attention-dk-transposed"]


def test_two_bugs_get_no_code():
    def two(dout, x, gamma, beta, eps=1e-5):
        dx, dgamma, dbeta = layernorm_bw("layernorm-stats-constant")(dout, x, gamma, beta, eps)
        return dx, 2 * dgamma, dbeta
    report = check_backward("layernorm", two)
    assert not report.ok and report.diagnosis == []
    assert "no known wrong form explains the mismatch" in str(report)


def test_a_wrong_backward_with_no_catalogued_form_gets_no_code():
    report = check_backward("softmax", lambda dout, x, axis=-1: 1.01 * softmax_bw()(dout, x, axis))
    assert not report.ok and report.diagnosis == []
    assert "2 of 3 cases fail" not in report.summary and "3 of 3 cases fail (dx)" in report.summary


def test_relative_error_of_each_planted_form_is_large():
    for op, code in PLANTED:
        worst = max(r.max_rel_err for r in check_backward(op, HANDWRITTEN[op](code)).rows)
        assert worst > 0.05, (op, code, worst)


# ----------------------------------------------------------------------------------------------
# protocol failures: a message naming which gradient and what came back; never a crash

@pytest.mark.parametrize("result,needle", [
    (None, "returned None"),
    ((1, 2), "returned 2 gradients, expected 3 (dx, dw, db)"),
    ("text", "returned str"),
])
def test_wrong_return_values_are_named(result, needle):
    report = check_backward("linear", lambda *a, **k: result)
    assert not report.ok and report.diagnosis == []
    assert all(needle in r.message for r in report.rows), str(report)


def test_wrong_shape_and_dtype_name_the_gradient():
    def shape(dout, x, w, b):
        dx, dw, db = linear_bw()(dout, x, w, b)
        return dx, dw, db[:-1]
    report = check_backward("linear", shape)
    assert any(r.output == "db" and "shape (4,), expected (5,)" in r.message for r in report.rows), str(report)

    def dtype(dout, x, w, b):
        return tuple(g.astype(np.float32) for g in linear_bw()(dout, x, w, b))
    report = check_backward("linear", dtype)
    assert not report.ok and any("dx: dtype float32, expected float64" in r.message for r in report.rows)

    report = check_backward("embedding", lambda dout, ids, weight: (np.zeros(3), embedding_bw()(dout, ids, weight)[1]))
    assert any(r.output == "dids" and "expected None" in r.message for r in report.rows), str(report)


def test_a_backward_that_raises_or_modifies_fails_that_case():
    report = check_backward("softmax", lambda dout, x, axis=-1: 1 / 0)
    assert not report.ok and all("raised ZeroDivisionError" in r.message for r in report.rows)
    assert not report.not_implemented

    def stub(dout, x, axis=-1):
        raise NotImplementedError("write dx")
    report = check_backward("softmax", stub)
    assert report.not_implemented and "not implemented yet" in report.summary and report.diagnosis == []

    def modifies(dout, x, axis=-1):
        dx = softmax_bw()(dout, x, axis)
        dout *= 2
        return dx
    report = check_backward("softmax", modifies)
    assert not report.ok and any("modified dout" in r.message for r in report.rows)


def test_nan_gradients_fail():
    report = check_backward("relu", lambda dout, x: dout * np.nan)
    assert not report.ok and all(r.max_abs_err == math.inf for r in report.rows if r.output == "dx")


def test_a_wrong_forward_is_caught():
    spec = OPS["softmax"]
    report = check_backward("softmax", spec.backward, forward=lambda x, axis=-1: (np.exp(x), spec.forward(x, axis=axis)[1]))
    assert not report.ok and any(r.output == "out" and not r.ok for r in report.rows)
    report = check_backward("softmax", spec.backward, forward=lambda x, axis=-1: np.exp(x))
    assert not report.ok and "expected (out, cache)" in report.rows[0].message


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="op must be one of 'linear', 'softmax'.*'attention'; got 'sofmax'"):
        check_backward("sofmax", lambda *a: None)
    with pytest.raises(TypeError, match="backward must be callable"):
        check_backward("softmax", 3)
    with pytest.raises(TypeError, match="forward must be callable"):
        check_backward("softmax", lambda *a: None, forward="no")
    with pytest.raises(ValueError, match="dtype must be"):
        check_backward("softmax", lambda *a: None, dtype="bfloat16")
    with pytest.raises(TypeError, match="seed must be an int"):
        check_backward("softmax", lambda *a: None, seed=1.5)
    with pytest.raises(ValueError, match="seed must be >= 0"):
        check_backward("softmax", lambda *a: None, seed=-1)


def test_the_report_reads():
    report = check_backward("softmax", softmax_bw("softmax-missing-sum"))
    text = str(report)
    assert "diagnosis softmax-missing-sum" in text and 'read: derivations/02-softmax.md, section' in text
    assert report.summary.startswith("softmax: 3 of 3 cases fail (dx)") or "cases fail" in report.summary
    good = check_backward("softmax", softmax_bw())
    assert good.summary.startswith("softmax: all 3 cases agree")
