"""Checking someone else's attention: a battery that finds convention bugs and names them.

- ``check_attention(fn, ...)``: runs ``fn(q, k, v, *, mask=None, causal=False, scale=None)`` (torch
  tensors in and out, returning ``o`` or ``(o, lse)``) on cases chosen to expose convention bugs,
  takes its gradients with torch autograd, compares with the reference, and for the failures tries
  the known wrong conventions (``DIAGNOSES``) to name the one the kernel follows.

Guide: docs/kernel-authors.md. Conventions: bool masks True = attend; causal bottom-right
(``j <= i + M - N``); grouped-query head ``h`` uses kv head ``h // (H // G)``; ``lse`` natural log.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional

import numpy as np

from .reference import reference

__all__ = ["check_attention", "CheckReport", "CheckRow", "AttentionCase", "default_cases", "DIAGNOSES"]

DIAGNOSES = {
    "causal-top-left": "causal aligned top-left (j <= i, torch's is_causal) instead of bottom-right (j <= i + M - N); "
                       "with a KV cache the new queries then miss most of the cached keys",
    "gqa-interleaved": "query head h uses kv head h % G (torch .repeat / tile) instead of h // (H // G) "
                       "(repeat_interleave, contiguous groups)",
    "lse-base-2": "the log-sum-exp is in base 2 (log2 sum 2^(s log2 e) = lse / ln 2); multiply by ln 2",
    "scale-1/D": "scores scaled by 1/D instead of 1/sqrt(D)",
    "no-scale": "scores not scaled at all (scale 1 instead of 1/sqrt(D))",
    "mask-inverted": "bool mask read as True = masked out; npattn and torch's SDPA use True = may attend",
    "masked-row-nan": "a query row with no allowed key gives NaN (softmax of all -inf); it should give 0",
    "masked-row-uniform": "a query row with no allowed key averages all values (a large negative fill such "
                          "as -1e9 or finfo.min instead of -inf); it should give 0",
}


# ----------------------------------------------------------------------------------------------
# the battery

@dataclass(frozen=True)
class AttentionCase:
    """One adversarial case: shapes ``(B, H, G, N, M, D)``, whether causal, and the mask kind."""

    name: str
    shape: tuple
    causal: bool = False
    mask: Optional[str] = None       # None, "bool" (with fully masked rows), "padding" (B, 1, 1, M), "float"


def default_cases() -> list:
    """Chosen so each convention bug shows: N != M both ways (causal alignment), 1 < G < H (GQA
    order), fully masked rows (NaN or uniform), bool masks (polarity), D != 1 and != scores' size."""
    return [
        AttentionCase("N < M", (1, 4, 4, 5, 9, 16)),
        AttentionCase("N > M", (1, 4, 4, 9, 5, 16)),
        AttentionCase("GQA H=6 G=2", (2, 6, 2, 7, 7, 16)),
        AttentionCase("GQA H=4 G=2, causal N < M", (1, 4, 2, 4, 11, 8), causal=True),
        AttentionCase("causal N < M (KV cache)", (1, 2, 2, 5, 8, 8), causal=True),
        AttentionCase("causal N > M (empty rows)", (1, 2, 2, 8, 5, 8), causal=True),
        AttentionCase("causal N = M", (2, 2, 2, 6, 6, 8), causal=True),
        AttentionCase("bool mask, fully masked rows", (2, 2, 2, 6, 7, 8), mask="bool"),
        AttentionCase("key padding (B, 1, 1, M)", (2, 3, 3, 5, 6, 8), mask="padding"),
        AttentionCase("float mask (H, N, M)", (1, 3, 3, 6, 6, 8), mask="float"),
        AttentionCase("ragged N=13 M=17 D=24", (1, 2, 2, 13, 17, 24)),
    ]


def _case_arrays(case: AttentionCase, rng) -> dict:
    b, h, g, n, m, d = case.shape
    arrays = dict(q=rng.standard_normal((b, h, n, d)), k=rng.standard_normal((b, g, m, d)),
                  v=rng.standard_normal((b, g, m, d)), dout=rng.standard_normal((b, h, n, d)),
                  dlse=rng.standard_normal((b, h, n)))
    if case.mask == "bool":
        mask = rng.random((b, h, n, m)) > 0.35
        mask[:, :, 1, :] = False                                       # a row that may attend nothing
        arrays["mask"] = mask
    elif case.mask == "padding":
        mask = np.ones((b, 1, 1, m), dtype=bool)
        mask[1, ..., m - 2:] = False                                   # the second sequence is padded
        arrays["mask"] = mask
    elif case.mask == "float":
        arrays["mask"] = rng.standard_normal((h, n, m))
    return arrays


class CheckRow(NamedTuple):
    case: str
    output: str
    max_abs_err: float
    max_rel_err: float
    ok: bool
    where: str                       # the worst (batch, head, row) for a failing row, else ""


@dataclass
class CheckReport:
    rows: list
    diagnosis: list
    dtype: str
    seconds: float
    errors: dict = field(default_factory=dict)   # case -> the exception fn raised

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows) and not self.errors

    def __str__(self) -> str:
        lines = [f"{'case':<30}{'output':<7}{'max abs err':>12}{'max rel err':>12}  ok   worst at"]
        for r in self.rows:
            lines.append(f"{r.case:<30}{r.output:<7}{r.max_abs_err:>12.2e}{r.max_rel_err:>12.2e}  "
                         f"{'ok ' if r.ok else 'BAD'}  {r.where}")
        for case, err in self.errors.items():
            lines.append(f"{case:<30}raised {err}")
        verdict = "all cases agree with the float64 reference" if self.ok else "MISMATCH"
        lines.append(f"{verdict} ({self.dtype}, {self.seconds:.1f} s)")
        for code in self.diagnosis:
            lines.append(f"diagnosis {code}: {DIAGNOSES[code]}")
        if not self.ok and not self.diagnosis:
            lines.append("diagnosis: no known convention explains the mismatch")
        return "\n".join(lines)


def _tolerance(dtype: str, scores_max: float, output: str) -> float:
    """Allowed error relative to ``max|ref|``: measured float32 errors are about
    ``max|s| * eps / 2``; allow 16x that (and more for the gradients, which sum over a length)."""
    eps = {"float64": 2.2e-16, "float32": 1.2e-7, "float16": 9.8e-4, "bfloat16": 7.8e-3}[dtype]
    base = 16 * eps * (1.0 + scores_max)
    return base * (4 if output.startswith("d") else 1)


def _where(err: np.ndarray) -> str:
    idx = np.unravel_index(int(np.nanargmax(np.where(np.isnan(err), np.inf, err))), err.shape)
    names = ["batch", "head", "row"]
    return ", ".join(f"{n} {i}" for n, i in zip(names, idx))


def _run_fn(fn, arrays, case, dtype, torch):
    """``fn``'s outputs and autograd gradients, as float64 NumPy: ``dict(o, lse?, dq, dk, dv)``."""
    tdtype = getattr(torch, dtype)
    q, k, v = (torch.tensor(arrays[n], dtype=tdtype, requires_grad=True) for n in ("q", "k", "v"))
    mask = arrays.get("mask")
    tmask = None if mask is None else torch.tensor(mask if mask.dtype == bool else mask.astype(dtype))
    out = fn(q, k, v, mask=tmask, causal=case.causal, scale=None)
    o, lse = (out if isinstance(out, (tuple, list)) else (out, None))
    loss = (o.double() * torch.tensor(arrays["dout"])).sum()
    if lse is not None:
        loss = loss + (lse.double() * torch.tensor(arrays["dlse"])).sum()
    got = dict(o=o.detach().double().cpu().numpy())
    if lse is not None:
        got["lse"] = lse.detach().double().cpu().numpy()
    if o.isfinite().all():
        loss.backward()
        got.update(dq=q.grad.double().numpy(), dk=k.grad.double().numpy(), dv=v.grad.double().numpy())
    return got


def _alternatives(arrays, case) -> dict:
    """The forward outputs (o, lse) each known wrong convention would give, float64."""
    b, h, g, n, m, d = case.shape
    q, k, v, mask = arrays["q"], arrays["k"], arrays["v"], arrays.get("mask")
    kw = dict(mask=mask, causal=case.causal)
    alts = {}
    if case.causal and n != m:
        r = reference(q, k, v, mask=mask, causal="top-left")
        alts["causal-top-left"] = dict(o=r.o, lse=r.lse)
    if 1 < g < h:
        idx = np.arange(h) % g                                          # tile: head h -> kv head h % G
        r = reference(q, k[:, idx], v[:, idx], **kw)
        alts["gqa-interleaved"] = dict(o=r.o, lse=r.lse)
    ref = reference(q, k, v, **kw)
    alts["lse-base-2"] = dict(o=ref.o, lse=ref.lse / math.log(2))
    for code, scale in (("scale-1/D", 1.0 / d), ("no-scale", 1.0)):
        r = reference(q, k, v, scale=scale, **kw)
        alts[code] = dict(o=r.o, lse=r.lse)
    if mask is not None and mask.dtype == bool:
        r = reference(q, k, v, mask=~mask, causal=case.causal)
        alts["mask-inverted"] = dict(o=r.o, lse=r.lse)
    empty = ~np.any(ref.p > 0, axis=-1)                                 # (B, H, N) rows that see nothing
    if empty.any():
        nan_o = np.where(empty[..., None], np.nan, ref.o)
        alts["masked-row-nan"] = dict(o=nan_o, lse=ref.lse)
        rep = h // g
        mean_v = np.repeat(v.mean(axis=-2, keepdims=True), rep, axis=1)  # (B, H, 1, Dv)
        alts["masked-row-uniform"] = dict(o=np.where(empty[..., None], mean_v, ref.o), lse=ref.lse)
    return alts


def _close(got, want, tol) -> bool:
    """Same shape, NaN in the same places, infinities equal, finite entries within ``tol`` of
    ``max(1, max|want|)``."""
    if got.shape != want.shape or np.any(np.isnan(got) != np.isnan(want)):
        return False
    inf = np.isinf(want) | np.isinf(got)
    if np.any(got[inf] != want[inf]):
        return False
    finite = ~np.isnan(want) & ~inf
    scale = max(1.0, float(np.max(np.abs(want[finite]))) if finite.any() else 1.0)
    return bool(np.all(np.abs(got[finite] - want[finite]) <= tol * scale))


def check_attention(fn: Callable, *, dtype: str = "float32", cases=None, rtol=None, atol=None,
                    seed: int = 0) -> CheckReport:
    """Run ``fn`` over the battery and compare every output and gradient with the float64 reference.

    ``fn(q, k, v, *, mask=None, causal=False, scale=None)`` takes torch tensors ``(B, H, N, D)``,
    ``(B, G, M, D)``, ``(B, G, M, D)`` (bool mask True = attend, broadcastable to ``(B, H, N, M)``)
    and returns ``o`` or ``(o, lse)``. Gradients come from torch autograd with a random ``dout``
    (and ``dlse``). Default tolerances scale with the dtype and the scores' size (``rtol``/``atol``
    override: a row is ok when ``max|err| <= atol + rtol * max(1, max|ref|)``).
    """
    import time

    import torch

    if dtype not in ("float64", "float32", "float16", "bfloat16"):
        raise ValueError(f"dtype must be float64, float32, float16 or bfloat16, got {dtype!r}")
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    rows, errors, failing = [], {}, []
    for case in (default_cases() if cases is None else cases):
        arrays = _case_arrays(case, rng)
        # the inputs as the kernel sees them, rounded to its dtype, so rounding of inputs is not blamed
        for name in ("q", "k", "v"):
            arrays[name] = torch.tensor(arrays[name]).to(getattr(torch, dtype)).double().numpy()
        mask = arrays.get("mask")
        ref = reference(arrays["q"], arrays["k"], arrays["v"], mask=mask, causal=case.causal,
                        dout=arrays["dout"], dlse=arrays["dlse"])
        try:
            got = _run_fn(fn, arrays, case, dtype, torch)
        except Exception as err:                          # noqa: BLE001 - the user's kernel may raise anything
            errors[case.name] = f"{type(err).__name__}: {err}"
            continue
        if "lse" not in got:                              # o only: the reference's gradients without dlse
            ref = reference(arrays["q"], arrays["k"], arrays["v"], mask=mask, causal=case.causal, dout=arrays["dout"])
        b, h, g, n, m, d = case.shape
        k_heads = np.repeat(arrays["k"], h // g, axis=1)                          # (B, H, M, D)
        s_max = float(np.max(np.abs(arrays["q"] @ np.swapaxes(k_heads, -1, -2)))) / math.sqrt(d)
        bad = False
        for output in ("o", "lse", "dq", "dk", "dv"):
            if output not in got:
                continue
            want = getattr(ref, output)
            g = got[output]
            rel_tol = _tolerance(dtype, s_max, output) if rtol is None else rtol
            scale = max(1.0, float(np.max(np.abs(want[np.isfinite(want)]))) if np.isfinite(want).any() else 1.0)
            if g.shape != want.shape:
                rows.append(CheckRow(case.name, output, math.inf, math.inf, False, f"shape {g.shape} != {want.shape}"))
                bad = True
                continue
            same_inf = (np.isinf(want) & (g == want))
            with np.errstate(invalid="ignore"):                           # inf - inf where both agree
                err = np.where(same_inf, 0.0, np.abs(g - want))
            err = np.where(np.isnan(err), np.inf, err)
            max_abs = float(np.max(err)) if err.size else 0.0
            ok = max_abs <= (0.0 if atol is None else atol) + rel_tol * scale
            where = "" if ok else _where(err.reshape(err.shape[:3] + (-1,)).max(-1) if err.ndim > 3 else err)
            rows.append(CheckRow(case.name, output, max_abs, max_abs / scale, bool(ok), where))
            bad |= not ok
        if bad:
            failing.append((case, arrays, got, s_max))
    diagnosis = _diagnose(failing, dtype, rtol)
    return CheckReport(rows=rows, diagnosis=diagnosis, dtype=dtype, seconds=time.perf_counter() - t0, errors=errors)


def _diagnose(failing, dtype, rtol) -> list:
    """The known conventions that explain the failing cases: a code is reported when the kernel's
    forward outputs match that convention's on every failing case where the convention differs
    from the right one (and it explains at least one)."""
    verdicts = {}
    for case, arrays, got, s_max in failing:
        right = reference(arrays["q"], arrays["k"], arrays["v"], mask=arrays.get("mask"), causal=case.causal)
        for code, alt in _alternatives(arrays, case).items():
            outputs = [o for o in ("o", "lse") if o in got]
            differs = any(not _close(alt[o], getattr(right, o), 1e-9) for o in outputs)
            if not differs:
                continue
            tol = 4 * (_tolerance(dtype, s_max, "o") if rtol is None else rtol)
            matches = all(_close(got[o], alt[o], tol) for o in outputs)
            verdicts.setdefault(code, []).append(matches)
    return [code for code in DIAGNOSES if code in verdicts and all(verdicts[code])]
