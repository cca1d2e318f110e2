"""Checking your own derivation: ``check_backward`` runs someone's hand-written backward (a
student's, a researcher's) against npattn's on a small battery per op and names the classic wrong
form it follows.

- ``check_backward(op, backward, *, forward=None, dtype="float64", seed=0)`` -> ``BackwardReport``
  with ``.ok``, ``.rows``, ``.summary`` and ``.diagnosis`` (codes of ``WRONG_FORMS``).
- ``WRONG_FORMS``: the catalogue. Each wrong form is the backward a derivation shows wrong, written
  out in float64 from npattn's own cache, with the derivation file and section that shows its
  numbers. A code is named only when the user's gradients equal that wrong form's (to the same
  tolerance a right answer must meet) on every failing case, and where the wrong form is right the
  user must be right too: never a guess, and a correct backward gets none.

The truth is npattn's own pair run in float64 on the inputs as the user gets them (rounded to
``dtype``), with a random ``dout`` (never ones: derivations/00-notation.md, eq. (0.1)). This module
is test tooling: it uses NumPy directly, as ``attention_check`` does.
"""

from __future__ import annotations

import math
import numbers
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional

import numpy as np

from .. import ops

__all__ = ["check_backward", "BackwardReport", "BackwardRow", "WrongForm", "WRONG_FORMS", "OPS", "OpSpec",
           "BatteryCase", "run_battery"]

# a row passes when max|got - want| <= TOLERANCE[dtype] * max(1, max|want|); the same bound decides
# whether a backward matches a wrong form (float64: agreement to rounding, whatever the formula's order)
TOLERANCE = {"float64": 1e-9, "float32": 2e-4, "float16": 2e-2}


# ----------------------------------------------------------------------------------------------
# the battery

@dataclass(frozen=True)
class BatteryCase:
    """One case: the forward's array arguments by name and in order (float64, or integer ids and
    targets), its keyword arguments, and the upstream gradient ``dout`` (float64)."""

    name: str
    inputs: dict
    kwargs: dict
    dout: object


class Ref(NamedTuple):
    """npattn's float64 answer on one case: what the wrong forms are built from."""

    inputs: dict      # float64 (rounded to the user's dtype first), ints unchanged
    kwargs: dict
    dout: object      # float64
    out: object
    cache: object     # npattn's float64 cache
    grads: tuple      # npattn's gradients, one per input (None for integer inputs)


@dataclass(frozen=True)
class OpSpec:
    """An op ``check_backward`` knows: its npattn pair (the truth), its battery and its chapter.

    ``forward(*inputs, **kwargs) -> (out, cache)`` and ``backward(dout, cache) -> grads`` are
    npattn's; ``cases(rng)`` builds the battery. ``forward_only``: the user's function is itself a
    forward (the grader's tile-loop exercises) whose tuple of outputs, named by ``outputs``, is
    compared with ``forward``'s; ``backward`` is then unused."""

    name: str
    forward: Callable
    backward: Optional[Callable]
    cases: Callable
    derivation: str
    outputs: tuple = ()
    forward_only: bool = False


def _r(rng, *shape):
    return rng.standard_normal(shape)


def _linear_cases(rng):
    x, w, b = _r(rng, 2, 3, 4), _r(rng, 4, 5), _r(rng, 5)
    xs, ws, bs = _r(rng, 5, 4), _r(rng, 4, 4), _r(rng, 4)
    return [BatteryCase("x (2, 3, 4), w (4, 5): leading axes", dict(x=x, w=w, b=b), {}, _r(rng, 2, 3, 5)),
            BatteryCase("x (5, 4), w (4, 4): square w", dict(x=xs, w=ws, b=bs), {}, _r(rng, 5, 4))]


def _rows_cases(rng, name="x"):
    masked = _r(rng, 4, 6)
    masked[0, [1, 4]] = -np.inf                                        # masked entries: y = 0, dx = 0 there
    masked[2, 1:] = -np.inf                                            # a row with one key left: y = (1, 0, ...)
    return [BatteryCase("rows of 5 (3, 5)", {name: _r(rng, 3, 5)}, {}, _r(rng, 3, 5)),
            BatteryCase("axis=0 (4, 3)", {name: _r(rng, 4, 3)}, dict(axis=0), _r(rng, 4, 3)),
            BatteryCase("-inf entries (masked scores)", {name: masked}, {}, _r(rng, 4, 6))]


def _log_softmax_cases(rng):
    return [BatteryCase("rows of 5 (3, 5)", dict(x=_r(rng, 3, 5) * 2), {}, _r(rng, 3, 5)),
            BatteryCase("axis=0 (4, 3)", dict(x=_r(rng, 4, 3)), dict(axis=0), _r(rng, 4, 3))]


def _layernorm_cases(rng):
    return [BatteryCase("x (3, 6), shifted and scaled rows", dict(x=_r(rng, 3, 6) * 2 + 1, gamma=_r(rng, 6),
                                                                  beta=_r(rng, 6)), {}, _r(rng, 3, 6)),
            BatteryCase("x (2, 3, 8), eps=0.1", dict(x=_r(rng, 2, 3, 8), gamma=_r(rng, 8), beta=_r(rng, 8)),
                        dict(eps=0.1), _r(rng, 2, 3, 8))]


def _rmsnorm_cases(rng):
    return [BatteryCase("x (3, 6)", dict(x=_r(rng, 3, 6) * 2 + 1, gamma=_r(rng, 6)), {}, _r(rng, 3, 6)),
            BatteryCase("x (2, 3, 8), eps=0.1", dict(x=_r(rng, 2, 3, 8), gamma=_r(rng, 8)), dict(eps=0.1),
                        _r(rng, 2, 3, 8))]


def _elementwise_cases(rng, kwargs=None):
    kwargs = kwargs or {}
    wide = np.linspace(-4.5, 4.5, 12).reshape(3, 4) + 0.01             # both tails, no exact 0
    return [BatteryCase("x (2, 3, 4)", dict(x=_r(rng, 2, 3, 4)), dict(kwargs), _r(rng, 2, 3, 4)),
            BatteryCase("x in [-4.5, 4.5] (3, 4)", dict(x=wide), dict(kwargs), _r(rng, 3, 4))]


def _embedding_cases(rng):
    repeated = np.array([[0, 2, 2, 3, 0], [3, 3, 1, 0, 2]])            # ids repeated within and across rows
    distinct = np.array([4, 1, 0, 5])
    return [BatteryCase("repeated ids (2, 5), V=4", dict(ids=repeated, weight=_r(rng, 4, 3)), {}, _r(rng, 2, 5, 3)),
            BatteryCase("distinct ids (4,), V=6, rows never read", dict(ids=distinct, weight=_r(rng, 6, 3)), {},
                        _r(rng, 4, 3))]


def _rope_cases(rng):
    return [BatteryCase("x (2, 5, 8), rotate_half pairs", dict(x=_r(rng, 2, 5, 8)), {}, _r(rng, 2, 5, 8)),
            BatteryCase("x (5, 6), interleaved pairs", dict(x=_r(rng, 5, 6)), dict(interleaved=True), _r(rng, 5, 6)),
            BatteryCase("x (4, 4), positions 7..10, base 100", dict(x=_r(rng, 4, 4)),
                        dict(positions=np.arange(7, 11), base=100.0), _r(rng, 4, 4))]


def _cross_entropy_cases(rng):
    t1 = np.array([[0, 4, -100], [2, -100, 1]])                        # two ignored targets of six
    t2 = np.array([3, 0, -100, 1])
    return [BatteryCase("logits (2, 3, 5), 2 of 6 targets ignored", dict(logits=_r(rng, 2, 3, 5), target=t1), {},
                        np.asarray(rng.standard_normal())),
            BatteryCase("no target ignored (3, 4)", dict(logits=_r(rng, 3, 4), target=np.array([1, 3, 0])), {},
                        np.asarray(rng.standard_normal())),
            BatteryCase("label_smoothing=0.1, 1 of 4 ignored", dict(logits=_r(rng, 4, 6), target=t2),
                        dict(label_smoothing=0.1), np.asarray(rng.standard_normal()))]


def _attention_cases(rng):
    def qkv(h, n, m, d, dv):
        return dict(q=_r(rng, h, n, d), k=_r(rng, h, m, d), v=_r(rng, h, m, dv))

    mask = rng.random((2, 4, 5)) > 0.3
    mask[:, 0] = True
    mask[1, 2, :] = False                                              # a row that may attend nothing
    return [BatteryCase("N < M (2 heads, N=3, M=5, Dv != D)", qkv(2, 3, 5, 4, 3), {}, _r(rng, 2, 3, 3)),
            BatteryCase("N > M (N=5, M=3)", qkv(2, 5, 3, 4, 4), {}, _r(rng, 2, 5, 4)),
            BatteryCase("N = M (N=M=4)", qkv(2, 4, 4, 3, 3), {}, _r(rng, 2, 4, 3)),
            BatteryCase("causal, N < M (KV cache)", qkv(2, 3, 5, 4, 4), dict(causal=True), _r(rng, 2, 3, 4)),
            BatteryCase("causal, N > M (rows with no key)", qkv(2, 5, 3, 4, 4), dict(causal=True), _r(rng, 2, 5, 4)),
            BatteryCase("bool mask, a fully masked row", qkv(2, 4, 5, 4, 4), dict(mask=mask), _r(rng, 2, 4, 4))]


OPS = {
    "linear": OpSpec("linear", ops.linear_forward, ops.linear_backward, _linear_cases, "derivations/01-linear.md"),
    "softmax": OpSpec("softmax", ops.softmax_forward, ops.softmax_backward, _rows_cases, "derivations/02-softmax.md"),
    "log_softmax": OpSpec("log_softmax", ops.log_softmax_forward, ops.log_softmax_backward, _log_softmax_cases,
                          "derivations/10-cross-entropy.md"),
    "layernorm": OpSpec("layernorm", ops.layernorm_forward, ops.layernorm_backward, _layernorm_cases,
                        "derivations/07-layernorm.md"),
    "rmsnorm": OpSpec("rmsnorm", ops.rmsnorm_forward, ops.rmsnorm_backward, _rmsnorm_cases,
                      "derivations/07-layernorm.md"),
    "gelu": OpSpec("gelu", ops.gelu_forward, ops.gelu_backward, _elementwise_cases, "derivations/08-activations.md"),
    "gelu_tanh": OpSpec("gelu_tanh", ops.gelu_forward, ops.gelu_backward,
                        lambda rng: _elementwise_cases(rng, dict(approximate="tanh")), "derivations/08-activations.md"),
    "relu": OpSpec("relu", ops.relu_forward, ops.relu_backward, _elementwise_cases, "derivations/08-activations.md"),
    "silu": OpSpec("silu", ops.silu_forward, ops.silu_backward, _elementwise_cases, "derivations/08-activations.md"),
    "embedding": OpSpec("embedding", ops.embedding_forward, ops.embedding_backward, _embedding_cases,
                        "derivations/09-embeddings-positions.md"),
    "rope": OpSpec("rope", ops.rope_forward, ops.rope_backward, _rope_cases, "derivations/09-embeddings-positions.md"),
    "cross_entropy": OpSpec("cross_entropy", ops.cross_entropy_forward, ops.cross_entropy_backward,
                            _cross_entropy_cases, "derivations/10-cross-entropy.md"),
    "attention": OpSpec("attention", ops.attention_forward, ops.attention_backward, _attention_cases,
                        "derivations/03-attention.md"),
}


# ----------------------------------------------------------------------------------------------
# the catalogue of wrong forms: each is the backward a derivation shows wrong, built in float64
# from npattn's cache of the case; it may raise where its shapes do not permit (a transposed dk
# with N != M), and then it predicts that the user's backward raised or returned a wrong shape

@dataclass(frozen=True)
class WrongForm:
    code: str
    ops: tuple
    text: str
    derivation: str
    section: str
    grads: Callable = field(repr=False)

    @property
    def read(self) -> str:
        return f'{self.derivation}, section "{self.section}"'


def _attention_parts(ref: Ref):
    """``(p, dp, scale)`` of the case, from npattn's cache (3-D: heads, rows, keys)."""
    c = ref.cache
    p = np.asarray(c.p)                                                # (H, N, M)
    dp = ref.dout @ np.swapaxes(ref.inputs["v"], -1, -2)              # (H, N, M)   eq. (3.7)
    return p, dp, c.scale


def _attention_grads(ref: Ref, ds, dk_transposed=False, scale=None):
    q, k = ref.inputs["q"], ref.inputs["k"]
    scale = ref.cache.scale if scale is None else scale
    dq = scale * ds @ k                                                # (H, N, D)
    dk = scale * (ds @ q if dk_transposed else np.swapaxes(ds, -1, -2) @ q)   # (H, M, D) / wrong: (H, N, D)
    return dq, dk, ref.grads[2]


def _right_ds(p, dp):
    return p * (dp - np.sum(p * dp, axis=-1, keepdims=True))          # eq. (3.9)


def _norm_stats_constant(ref: Ref, rstd_field: str):
    c = ref.cache
    dx = np.asarray(getattr(c, rstd_field)) * ref.dout * ref.inputs["gamma"]   # r dxhat: no mean or variance path
    return (dx,) + tuple(ref.grads[1:])


def _phi(x):
    return 0.5 * (1.0 + np.asarray(ops.erf(x / math.sqrt(2.0))))


def _gelu_cdf_only(ref: Ref):
    x = ref.inputs["x"]
    if ref.kwargs.get("approximate", "none") == "tanh":
        u = math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)
        return (ref.dout * 0.5 * (1.0 + np.tanh(u)),)                  # only the 1/2 (1 + tanh u) term of (8.5)
    return (ref.dout * _phi(x),)                                       # only Phi(x) of (8.4)


def _embedding_overwrite(ref: Ref):
    ids, w = ref.inputs["ids"], ref.inputs["weight"]
    dw = np.zeros_like(w)
    dw[ids.reshape(-1)] = ref.dout.reshape(-1, w.shape[1])             # the last write wins: no sum
    return None, dw


def _ce_counts_ignored(ref: Ref):
    target = ref.inputs["target"]
    positions = target.size if np.issubdtype(target.dtype, np.integer) else math.prod(target.shape[:-1])
    return ref.grads[0] * (ref.cache.count / positions), None           # divided by every position


def _rope_forward_angle(ref: Ref):
    return (np.asarray(ops.rope_forward(ref.dout, **ref.kwargs)[0]),)  # R(+theta) dout instead of R(-theta)


def _linear_dw_transposed(ref: Ref):
    x = ref.inputs["x"]
    x2, d2 = x.reshape(-1, x.shape[-1]), ref.dout.reshape(-1, ref.dout.shape[-1])
    return ref.grads[0], d2.T @ x2, ref.grads[2]                        # (E_out, E_in): dout^T x


_SOFTMAX_WRONG = "Wrong forms people learn, with numbers"
_CH2 = "derivations/02-softmax.md"
WRONG_FORMS = {w.code: w for w in [
    WrongForm("softmax-diagonal-only", ("softmax",), "dx = y (1 - y) dout: only the diagonal of the Jacobian "
              "diag(y) - y y^T, every -y_i y_j dropped", _CH2, _SOFTMAX_WRONG,
              lambda r: (r.out * (1.0 - r.out) * r.dout,)),
    WrongForm("softmax-missing-sum", ("softmax",), "dx = y dout: the -y <dout, y> term of y (dout - <dout, y>) "
              "is missing", _CH2, _SOFTMAX_WRONG, lambda r: (r.out * r.dout,)),
    WrongForm("layernorm-stats-constant", ("layernorm",), "dx = rstd * gamma * dout: mu and sigma treated as "
              "constants (the paths through the mean and the variance are missing)",
              "derivations/07-layernorm.md", "Wrong forms, with numbers",
              lambda r: _norm_stats_constant(r, "rstd")),
    WrongForm("rmsnorm-rms-constant", ("rmsnorm",), "dx = rrms * gamma * dout: the rms treated as a constant "
              "(the path through the mean square is missing)", "derivations/07-layernorm.md",
              "Wrong forms, with numbers", lambda r: _norm_stats_constant(r, "rrms")),
    WrongForm("gelu-missing-pdf-term", ("gelu", "gelu_tanh"), "dx = Phi(x) dout (tanh form: 1/2 (1 + tanh u) "
              "dout): the product rule's x phi(x) term is missing", "derivations/08-activations.md",
              "Wrong forms, with numbers", _gelu_cdf_only),
    WrongForm("silu-missing-sigmoid-derivative", ("silu",), "dx = sigma(x) dout: the x sigma(x)(1 - sigma(x)) "
              "term of the product rule is missing", "derivations/08-activations.md", "Wrong forms, with numbers",
              lambda r: (r.dout / (1.0 + np.exp(-r.inputs["x"])),)),
    WrongForm("embedding-repeated-ids-overwrite", ("embedding",), "dW[ids] = dout: a repeated id keeps one "
              "position's gradient instead of the sum over its positions", "derivations/09-embeddings-positions.md",
              "Wrong forms, with numbers", _embedding_overwrite),
    WrongForm("cross-entropy-counts-ignored", ("cross_entropy",), "the mean divides by every position, ignored "
              "targets included, instead of the number of counted targets", "derivations/10-cross-entropy.md",
              "Wrong forms, with numbers", _ce_counts_ignored),
    WrongForm("rope-forward-angle", ("rope",), "the backward rotates by +theta (the forward's rotation) "
              "instead of -theta (R(theta)^T = R(-theta))", "derivations/09-embeddings-positions.md",
              "Wrong forms, with numbers", _rope_forward_angle),
    WrongForm("attention-missing-scale", ("attention",), "dq = ds k and dk = ds^T q without the scale "
              "1/sqrt(D) of s = scale q k^T", _CH2, _SOFTMAX_WRONG,
              lambda r: _attention_grads(r, _right_ds(*_attention_parts(r)[:2]), scale=1.0)),
    WrongForm("attention-dk-transposed", ("attention",), "dk = scale ds q instead of scale ds^T q (its shape "
              "is only right when N = M)", _CH2, _SOFTMAX_WRONG,
              lambda r: _attention_grads(r, _right_ds(*_attention_parts(r)[:2]), dk_transposed=True)),
    WrongForm("attention-softmax-diagonal-only", ("attention",), "ds = p (1 - p) dp: the softmax's Jacobian "
              "read as its diagonal inside attention", "derivations/03-attention.md", "Wrong backwards, with numbers",
              lambda r: _attention_grads(r, (lambda p, dp, s: p * (1.0 - p) * dp)(*_attention_parts(r)))),
    WrongForm("linear-dw-transposed", ("linear",), "dW = dout^T x (E_out, E_in) instead of x^T dout "
              "(E_in, E_out)", "derivations/01-linear.md", "Wrong forms, with numbers", _linear_dw_transposed),
]}


# ----------------------------------------------------------------------------------------------
# the report

class BackwardRow(NamedTuple):
    """One output of one case: ``output`` is a gradient's name (``dx``, ``dw`` ...), ``out`` for
    the forward, or ``backward``/``forward`` when the call itself failed (``message`` says how)."""

    case: str
    output: str
    max_abs_err: float
    max_rel_err: float
    tol: float
    ok: bool
    message: str = ""


@dataclass
class BackwardReport:
    op: str
    dtype: str
    rows: list
    diagnosis: list
    seconds: float
    cases: int
    not_implemented: bool = False    # the backward raised NotImplementedError on every case
    derivation: str = ""             # the chapter that derives the right backward

    @property
    def ok(self) -> bool:
        return bool(self.rows) and all(r.ok for r in self.rows)

    @property
    def failed_cases(self) -> list:
        return list(dict.fromkeys(r.case for r in self.rows if not r.ok))

    @property
    def summary(self) -> str:
        """One line: how many cases fail, which outputs, and what the failing cases share."""
        if self.not_implemented:
            return f"{self.op}: not implemented yet (the backward raises NotImplementedError)"
        failed = self.failed_cases
        if not failed:
            return f"{self.op}: all {self.cases} cases agree with npattn's backward ({self.dtype})"
        bad = [r for r in self.rows if not r.ok]
        outputs = list(dict.fromkeys(r.output for r in bad))
        text = f"{self.op}: {len(failed)} of {self.cases} cases fail ({', '.join(outputs)})"
        if len(failed) < self.cases:
            text += ": only " + "; ".join(failed)
        return text

    def __str__(self) -> str:
        lines = [f"{'case':<48}{'output':<10}{'max abs err':>12}{'max rel err':>12}  ok"]
        for r in self.rows:
            if r.message and not math.isfinite(r.max_abs_err):
                lines.append(f"{r.case:<48}{r.output:<10}{'':>24}  {'ok ' if r.ok else 'BAD'}  {r.message}")
            else:
                lines.append(f"{r.case:<48}{r.output:<10}{r.max_abs_err:>12.2e}{r.max_rel_err:>12.2e}  "
                             f"{'ok ' if r.ok else 'BAD'}" + (f"  {r.message}" if r.message else ""))
        lines.append(f"{self.summary} ({self.seconds:.2f} s)")
        for code in self.diagnosis:
            w = WRONG_FORMS[code]
            lines.append(f"diagnosis {code}: {w.text}")
            lines.append(f"  read: {w.read}")
        if not self.ok and not self.diagnosis and not self.not_implemented:
            where = f"; read {self.derivation}" if self.derivation else ""
            lines.append(f"diagnosis: no known wrong form explains the mismatch{where}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# running one user's function over the battery

def _describe(value) -> str:
    if value is None:
        return "None"
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"{type(value).__name__} of shape {tuple(value.shape)} and dtype {value.dtype}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}"
    return f"{type(value).__name__} {value!r}"[:80]


def _raised(err: BaseException) -> str:
    where = traceback.extract_tb(err.__traceback__)
    line = f" (line {where[-1].lineno} of {where[-1].filename.rsplit('/', 1)[-1]})" if where else ""
    return f"raised {type(err).__name__}: {err}"[:160] + line


def _compare(name, got, want, dtype, tol):
    """``(max_abs, max_rel, ok, message)`` of one output against the truth."""
    if want is None:                                  # an integer input: no gradient
        if got is None:
            return None
        return math.inf, math.inf, False, f"{name}: expected None (an integer input has no gradient), got {_describe(got)}"
    if got is None:
        return math.inf, math.inf, False, f"{name}: got None, expected an array of shape {tuple(want.shape)}"
    if not (hasattr(got, "shape") and hasattr(got, "dtype")):
        return math.inf, math.inf, False, f"{name}: got {_describe(got)}, expected an array of shape {tuple(want.shape)}"
    try:
        g = np.asarray(got)
    except Exception as err:                          # noqa: BLE001 - a foreign array that will not convert
        return math.inf, math.inf, False, f"{name}: {_describe(got)} does not convert to NumPy ({err})"
    if tuple(g.shape) != tuple(want.shape):
        return math.inf, math.inf, False, f"{name}: shape {tuple(g.shape)}, expected {tuple(want.shape)}"
    message = ""
    if not np.issubdtype(g.dtype, np.floating):
        return math.inf, math.inf, False, f"{name}: dtype {g.dtype}, expected {dtype}"
    if g.dtype != np.dtype(dtype):
        message = f"{name}: dtype {g.dtype}, expected {dtype} (the inputs')"
    max_abs, scale = _error(g, want)
    rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    ok = max_abs <= tol * max(1.0, scale) and not message
    return max_abs, rel, bool(ok), message


def _error(got, want):
    """``(max|got - want|, max|want|)`` over finite entries; NaN where ``want`` has none, or an
    infinity that differs, counts as infinitely wrong."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    if want.size == 0:
        return 0.0, 0.0
    finite = np.isfinite(want)
    same = (got == want) | (np.isnan(got) & np.isnan(want))
    with np.errstate(invalid="ignore"):
        err = np.where(same, 0.0, np.abs(got - want))
    err = np.where(np.isnan(err), np.inf, err)
    scale = float(np.max(np.abs(want[finite]))) if finite.any() else 0.0
    return float(np.max(err)), scale


def _grads_tuple(grads, n: int):
    """The user's return value as a tuple of ``n``, or a message saying what came back."""
    if n == 1 and not isinstance(grads, (tuple, list)):
        grads = (grads,)
    if grads is None:
        return None, "returned None"
    if not isinstance(grads, (tuple, list)):
        return None, f"returned {_describe(grads)}, expected a tuple of {n} gradients"
    if len(grads) != n:
        return None, f"returned {len(grads)} gradients, expected {n}"
    return tuple(grads), ""


@dataclass
class _Outcome:
    case: BatteryCase
    ref: Ref
    kind: str                       # "ok", "raised", "protocol", "forward", "values"
    grads: Optional[tuple] = None   # the user's gradients (as returned), when they came back
    not_implemented: bool = False


def _copy(value, dtype):
    if isinstance(value, np.ndarray) and np.issubdtype(value.dtype, np.floating):
        return value.astype(dtype)
    return value.copy() if isinstance(value, np.ndarray) else value


def _reference(spec: OpSpec, case: BatteryCase, dtype: str) -> Ref:
    """npattn in float64 on the inputs rounded to ``dtype`` (so rounding of inputs is not blamed)."""
    def rounded(a):
        if isinstance(a, np.ndarray) and np.issubdtype(a.dtype, np.floating):
            return a.astype(dtype).astype(np.float64)
        return a
    inputs = {k: rounded(v) for k, v in case.inputs.items()}
    kwargs = {k: rounded(v) for k, v in case.kwargs.items()}
    dout = None if case.dout is None else rounded(np.asarray(case.dout))
    out, cache = spec.forward(*inputs.values(), **kwargs)
    grads = () if spec.forward_only else spec.backward(dout, cache)
    if not isinstance(grads, tuple):
        grads = (grads,)
    grads = tuple(np.asarray(g) if g is not None else None for g in grads)
    if not spec.forward_only:
        grads = grads[:len(inputs)]
    out = tuple(np.asarray(o) for o in out) if isinstance(out, tuple) else np.asarray(out)
    return Ref(inputs=inputs, kwargs=kwargs, dout=dout, out=out, cache=cache, grads=grads)


def _grad_names(case: BatteryCase) -> list:
    return [f"d{n}" for n in case.inputs]


def _run_case(spec: OpSpec, fn, forward, case: BatteryCase, dtype: str, tol: float):
    """Rows and the outcome of one case."""
    ref = _reference(spec, case, dtype)
    inputs = {k: _copy(v, dtype) for k, v in ref.inputs.items()}
    kwargs = {k: _copy(v, dtype) for k, v in ref.kwargs.items()}
    before = {k: v.copy() for k, v in inputs.items() if isinstance(v, np.ndarray)}
    dout = _copy(ref.dout, dtype)
    rows = []

    def row(output, abs_err=math.inf, rel_err=math.inf, ok=False, message=""):
        rows.append(BackwardRow(case.name, output, abs_err, rel_err, tol, ok, message))

    if spec.forward_only:                             # the user's function is the forward (the tile loop)
        try:
            got = fn(*inputs.values(), **kwargs)
        except NotImplementedError as err:
            row("forward", message=_raised(err))
            return rows, _Outcome(case, ref, "raised", not_implemented=True)
        except Exception as err:                      # noqa: BLE001 - a learner's code may raise anything
            row("forward", message=_raised(err))
            return rows, _Outcome(case, ref, "raised")
        outs, message = _grads_tuple(got, len(spec.outputs))
        if outs is None:
            row("forward", message=f"{message} ({', '.join(spec.outputs)})")
            return rows, _Outcome(case, ref, "protocol")
        bad = False
        for name, g, want in zip(spec.outputs, outs, ref.out):
            r = _compare(name, g, want, dtype, tol)
            row(name, *r)
            bad |= not r[2]
        bad |= _modified(inputs, before, row)
        return rows, _Outcome(case, ref, "values" if bad else "ok", outs)

    names = _grad_names(case)
    if forward is not None:
        try:
            result = forward(*inputs.values(), **kwargs)
        except NotImplementedError as err:
            row("forward", message=_raised(err))
            return rows, _Outcome(case, ref, "forward", not_implemented=True)
        except Exception as err:                      # noqa: BLE001
            row("forward", message=_raised(err))
            return rows, _Outcome(case, ref, "forward")
        if not (isinstance(result, (tuple, list)) and len(result) == 2):
            row("forward", message=f"forward returned {_describe(result)}, expected (out, cache)")
            return rows, _Outcome(case, ref, "forward")
        out, user_cache = result
        r = _compare("out", out, ref.out, dtype, tol)
        row("out", *r)
        if not r[2]:
            return rows, _Outcome(case, ref, "forward")
        call = (dout, user_cache)
        call_kwargs = {}
    else:
        call = (dout,) + tuple(inputs.values())
        call_kwargs = kwargs
    try:
        got = fn(*call, **call_kwargs)
    except NotImplementedError as err:
        row("backward", message=_raised(err))
        return rows, _Outcome(case, ref, "raised", not_implemented=True)
    except Exception as err:                          # noqa: BLE001
        row("backward", message=_raised(err))
        return rows, _Outcome(case, ref, "raised")
    grads, message = _grads_tuple(got, len(names))
    if grads is None:
        row("backward", message=f"{message} ({', '.join(names)})")
        return rows, _Outcome(case, ref, "protocol")
    bad = False
    for name, g, want in zip(names, grads, ref.grads):
        r = _compare(name, g, want, dtype, tol)
        if r is None:
            continue
        row(name, *r)
        bad |= not r[2]
    bad |= _modified(inputs, before, row)
    if isinstance(dout, np.ndarray) and not np.array_equal(dout, ref.dout.astype(dtype), equal_nan=True):
        row("dout", message="the backward modified dout in place")
        bad = True
    return rows, _Outcome(case, ref, "values" if bad else "ok", grads)


def _modified(inputs, before, row) -> bool:
    changed = [k for k, v in before.items() if not np.array_equal(inputs[k], v, equal_nan=True)]
    for k in changed:
        row(k, message=f"input {k} was modified in place")
    return bool(changed)


def _diagnose(spec: OpSpec, outcomes: list, tol: float) -> list:
    """The wrong forms that explain the failures. A code is named when, on every case where its
    gradients differ from the right ones, the user's gradients equal its gradients (to ``tol``),
    on every case where it cannot be computed (its shapes do not permit) the user's backward raised
    or returned a wrong shape, and it explains at least one failing case."""
    if all(o.kind == "ok" for o in outcomes):
        return []
    codes = []
    for code, wrong in WRONG_FORMS.items():
        if spec.name not in wrong.ops:
            continue
        explained, consistent = 0, True
        for o in outcomes:
            try:
                alt = wrong.grads(o.ref)
            except (ValueError, IndexError):          # e.g. ds q with N != M: the wrong form predicts a failure
                alt = None
            if alt is None:
                consistent = o.kind in ("raised",) or (o.kind == "values" and not _shapes_match(o.grads, o.ref.grads))
                explained += consistent and o.kind != "ok"
                if not consistent:
                    break
                continue
            differs = any(_differs(a, g, tol) for a, g in zip(alt, o.ref.grads))
            if not differs:
                continue
            if o.kind != "values" or not all(_matches(u, a, tol) for u, a in zip(o.grads, alt)):
                consistent = False
                break
            explained += 1
        if consistent and explained:
            codes.append(code)
    return codes


def _shapes_match(user, right) -> bool:
    return user is not None and all(
        (u is None) == (r is None) and (r is None or tuple(getattr(u, "shape", ())) == tuple(r.shape))
        for u, r in zip(user, right))


def _differs(a, b, tol) -> bool:
    if (a is None) != (b is None):
        return True
    if a is None:
        return False
    if np.shape(a) != np.shape(b):
        return True
    err, scale = _error(a, b)
    return err > tol * max(1.0, scale)


def _matches(user, alt, tol) -> bool:
    if alt is None or user is None:
        return alt is None and user is None
    if not hasattr(user, "shape") or tuple(user.shape) != np.shape(alt):
        return False
    err, scale = _error(user, alt)
    return err <= tol * max(1.0, scale)


def run_battery(spec: OpSpec, fn, *, forward=None, dtype: str = "float64", seed: int = 0,
                cases: Optional[list] = None) -> BackwardReport:
    """Run ``fn`` over ``spec``'s battery (or ``cases``): the engine of ``check_backward`` and of
    the grader's exercise-specific checks (the tile loop, multi-head attention)."""
    t0 = time.perf_counter()
    tol = TOLERANCE[dtype]
    battery = spec.cases(np.random.default_rng(seed)) if cases is None else cases
    rows, outcomes = [], []
    for case in battery:
        case_rows, outcome = _run_case(spec, fn, forward, case, dtype, tol)
        rows += case_rows
        outcomes.append(outcome)
    not_implemented = all(o.not_implemented for o in outcomes)
    diagnosis = [] if not_implemented else _diagnose(spec, outcomes, tol)
    return BackwardReport(op=spec.name, dtype=dtype, rows=rows, diagnosis=diagnosis,
                          seconds=time.perf_counter() - t0, cases=len(battery), not_implemented=not_implemented,
                          derivation=spec.derivation)


def check_backward(op: str, backward: Callable, *, forward: Optional[Callable] = None, dtype: str = "float64",
                   seed: int = 0) -> BackwardReport:
    """Check a hand-written backward against npattn's for one of the pairs in ``OPS``.

    Parameters
    ----------
    op : str
        One of ``OPS``: "linear", "softmax", "log_softmax", "layernorm", "rmsnorm", "gelu",
        "gelu_tanh", "relu", "silu", "embedding", "rope", "cross_entropy", "attention".
    backward : callable
        Without ``forward``: ``backward(dout, *inputs, **kwargs)`` gets the upstream gradient, the
        forward's inputs (NumPy arrays of ``dtype``; integer ids and targets as they are) and the
        keyword arguments the case sets, and returns the gradients in the forward's argument order
        (None for an integer input; a single array where the forward has one input). With
        ``forward``: ``backward(dout, cache)`` with the cache the user's forward returned.
    forward : callable, optional
        ``forward(*inputs, **kwargs) -> (out, cache)``; its ``out`` is checked too.
    dtype : "float64", "float32" or "float16"
        The inputs' dtype. The truth is always npattn in float64 on the same (rounded) inputs.
    seed : int >= 0
        Seeds the battery's inputs and ``dout``.

    Returns
    -------
    BackwardReport with ``.ok``, ``.rows`` (case, output, max_abs_err, max_rel_err, tol, ok,
    message), ``.summary`` and ``.diagnosis`` (codes of ``WRONG_FORMS``; print the report for each
    one's derivation section). The battery of each op includes the cases that expose its classic
    mistakes: repeated ids, ignored targets, fully masked rows, causal, N != M and N = M.
    Derivation of the right forms: eq. (2.7) (softmax), eqs. (3.7)-(3.10) (attention), eq. (7.4)
    (LayerNorm), eq. (9.2) (embedding), eq. (9.6) (RoPE), eq. (10.5) (cross-entropy).
    """
    if not isinstance(op, str) or op not in OPS:
        raise ValueError(f"op must be one of {', '.join(repr(o) for o in OPS)}; got {op!r}")
    if not callable(backward):
        raise TypeError(f"backward must be callable, got {_describe(backward)}")
    if forward is not None and not callable(forward):
        raise TypeError(f"forward must be callable or None, got {_describe(forward)}")
    if not isinstance(dtype, str) or dtype not in TOLERANCE:
        raise ValueError(f"dtype must be 'float64', 'float32' or 'float16', got {dtype!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return run_battery(OPS[op], backward, forward=forward, dtype=dtype, seed=int(seed))
