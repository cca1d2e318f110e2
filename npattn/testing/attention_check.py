"""Checking someone else's attention: a battery that finds the bugs kernels really have and names them.

- ``cases(...)``: the battery as runnable objects (for ``pytest.mark.parametrize``).
- ``check_attention(fn, ...)``: runs ``fn(q, k, v, *, mask=None, causal=False, scale=None,
  **variant_kwargs)`` (torch tensors in and out, returning ``o`` or ``(o, lse)``) on every case and
  returns a ``CheckReport``: one row per case and output, a one-line ``summary`` and a ``diagnosis``.

One case, step by step:
  1. inputs: float64 draws rounded to the kernel's dtype, so the truth sees what the kernel sees
     (``q k v``, ``dout``, ``dlse``, a float mask, sinks, ALiBi slopes).
  2. the truth: npattn's float64 tiled op, forward and backward (``reference.truth``).
  3. the allowance: the textbook math attention run in torch in the kernel's dtype, and its error
     against the truth; an output passes when its own error is at most ``2 x`` that plus a floor of
     ``FLOOR_ULPS`` units of the dtype's epsilon (FlashAttention's rule).
  4. the kernel: ``fn`` on torch tensors, gradients by autograd of ``sum(o dout) + sum(lse dlse)``;
     what it returns is checked first (type, count, library, shape, dtype, dependence on q, k, v),
     and anything wrong fails the case with a message.
  5. the rows: max abs and relative error, the tolerance, and where the worst entry is.

The diagnosis: for each known wrong convention (``DIAGNOSES``) the truth is recomputed under it; a
code is named only if it explains every failing row (its outputs match the kernel's within 4x the
row's tolerance, or 100x closer than the truth), and every case where it makes a visible difference
fails. Forward-only codes (``lse-base-2``, the masked-row codes, ``lse-without-sink``) explain a case
when its failing forward rows match; the gradients of a wrong forward are its consequences.
``dlse-ignored`` is checked by rerunning the failing cases with ``dlse = 0``: right then, and equal
to the ``dlse``-free gradients.

Conventions (npattn's): bool masks True = attend; causal bottom-right (``j <= i + M - N``);
grouped-query head ``h`` uses kv head ``h // (H // G)``; ``lse`` natural log, ``-inf`` for a row that
sees no key; the window ``i + M - N - left <= j <= i + M - N + right``; ALiBi
``-slope_h |i + M - N - j|``; sinks enter the denominator and ``lse``. Guide: docs/kernel-authors.md.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import os
import sys
import time
import zlib
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional

import numpy as np

from .reference import truth as _truth

__all__ = ["check_attention", "cases", "Case", "CaseResult", "CheckReport", "CheckRow", "AttentionCase",
           "default_cases", "variant_cases", "DIAGNOSES", "VARIANTS", "DTYPES", "load_function"]

DIAGNOSES = {
    "causal-top-left": "causal aligned top-left (j <= i, torch's is_causal) instead of bottom-right (j <= i + M - N); "
                       "with a KV cache the new queries then miss most of the cached keys",
    "gqa-interleaved": "query head h uses kv head h % G (torch .repeat / tile) instead of h // (H // G) "
                       "(repeat_interleave, contiguous groups)",
    "lse-base-2": "the log-sum-exp is in base 2 (log2 sum 2^(s log2 e) = lse / ln 2); multiply by ln 2",
    "scale-1/D": "scores scaled by 1/D instead of 1/sqrt(D)",
    "no-scale": "scores not scaled at all (scale 1 instead of 1/sqrt(D))",
    "scale-ignored": "an explicit scale is not honored: the kernel uses 1/sqrt(D) whatever scale it is given",
    "mask-inverted": "bool mask read as True = masked out; npattn and torch's SDPA use True = may attend",
    "masked-row-nan": "a query row with no allowed key gives NaN (softmax of all -inf); it should give o = 0, "
                      "lse = -inf",
    "masked-row-uniform": "a query row with no allowed key averages all values (a large negative fill such "
                          "as -1e9 or finfo.min instead of -inf); it should give o = 0",
    "dlse-ignored": "the backward ignores the gradient flowing into lse: delta must be rowsum(dout * o) - dlse",
    "causal-ignored": "causal=True is ignored: every query sees every key",
    "window-off-by-one": "the sliding window is one key wider or narrower on one side than "
                         "i + M - N - left <= j <= i + M - N + right",
    "alibi-top-left": "ALiBi distance |i - j| instead of |i + M - N - j| (bottom-right, like causal)",
    "lse-without-sink": "the returned lse leaves the sink out of the denominator (o includes it)",
    "low-precision-accumulation": "every output is off by a few times the tolerance: q.k, the softmax "
                                  "statistics or the accumulators are rounded to fewer mantissa bits than "
                                  "the inputs have (keep them in float32 for half inputs)",
}

VARIANTS = ("window", "softcap", "alibi", "sinks", "varlen")
DTYPES = ("float64", "float32", "float16", "bfloat16")
EPS = {"float64": 2.0 ** -52, "float32": 2.0 ** -23, "float16": 2.0 ** -10, "bfloat16": 2.0 ** -7}
# the tolerance's floor, in epsilons of the dtype times max(1, max|truth|): small, for exact cases; larger
# for float64, where the truth is no more precise than the kernel and the 2x rule alone is noise
FLOOR_ULPS = {"float64": 64, "float32": 4, "float16": 4, "bfloat16": 4}
# an alternative convention explains a failing row when the kernel is within ALT_SLACK x the row's
# tolerance of it, or ALT_RATIO x closer to it than to the truth (a wrong scale's larger scores round
# more: its own error is larger than the tolerance made for the right scores)
ALT_SLACK = 4
ALT_RATIO = 0.01
LOW_PRECISION_FACTOR = 100
OUTPUTS = ("o", "lse", "dq", "dk", "dv", "dsinks")


# ----------------------------------------------------------------------------------------------
# the battery

@dataclass(frozen=True)
class AttentionCase:
    """One case's recipe: shapes ``(B, H, G, N, M, D)`` (``dv``: the value head dim, None = D), the
    conventions it exercises, and for a variant case its keyword. ``seqlens`` (varlen) lists each
    packed sequence's ``(N_b, M_b)``; the shape's N, M are then their sums and B is unused."""

    name: str
    shape: tuple
    causal: bool = False
    mask: Optional[str] = None       # None, "bool" (with fully masked rows), "padding" (B, 1, 1, M), "float"
    dv: Optional[int] = None
    scale: Optional[float] = None
    window: Optional[tuple] = None
    softcap: Optional[float] = None
    alibi: bool = False
    sinks: bool = False
    seqlens: Optional[tuple] = None
    variant: Optional[str] = None


def _packed(name, h, g, d, seqlens, **kw) -> AttentionCase:
    n, m = sum(a for a, _ in seqlens), sum(b for _, b in seqlens)
    return AttentionCase(name, (1, h, g, n, m, d), seqlens=tuple(seqlens), variant="varlen", **kw)


def default_cases() -> list:
    """The default battery. Convention bugs: N != M both ways (causal alignment), 1 < G < H (GQA
    order), fully masked rows (NaN or uniform), bool masks (polarity), a float mask, an explicit
    scale other than 1/sqrt(D), Dv != D. Tile-loop bugs: lengths just below and above 64 and 128
    (63, 65, 127, 129) and 257, head dims 64 and 128, so a wrong online-softmax rescale, a backward
    that keeps only the last query tile, or a wrong delta fails at the kernel's own tile size."""
    return [
        AttentionCase("N < M", (1, 4, 4, 5, 9, 16)),
        AttentionCase("N > M, Dv != D", (1, 4, 4, 9, 5, 16), dv=8),
        AttentionCase("GQA H=6 G=2", (2, 6, 2, 7, 7, 16)),
        AttentionCase("GQA H=4 G=2, causal N < M", (1, 4, 2, 4, 11, 8), causal=True),
        AttentionCase("causal N < M (KV cache)", (1, 2, 2, 5, 8, 8), causal=True),
        AttentionCase("causal N > M (empty rows)", (1, 2, 2, 8, 5, 8), causal=True),
        AttentionCase("causal N = M", (2, 2, 2, 6, 6, 8), causal=True),
        AttentionCase("bool mask, fully masked rows", (2, 2, 2, 6, 7, 8), mask="bool"),
        AttentionCase("key padding (B, 1, 1, M)", (2, 3, 3, 5, 6, 8), mask="padding"),
        AttentionCase("float mask (H, N, M)", (1, 3, 3, 6, 6, 8), mask="float"),
        AttentionCase("explicit scale 0.5", (1, 2, 2, 6, 9, 16), scale=0.5),
        AttentionCase("ragged N=13 M=17 D=24 Dv=20", (1, 2, 2, 13, 17, 24), dv=20),
        AttentionCase("tiles N=M=129 D=64", (1, 2, 2, 129, 129, 64)),
        AttentionCase("tiles causal N=65 M=257 D=128, GQA", (1, 4, 2, 65, 257, 128), causal=True),
        AttentionCase("tiles N=257 M=127 D=64", (1, 2, 2, 257, 127, 64)),
        AttentionCase("tiles causal N=M=127 D=128", (1, 2, 2, 127, 127, 128), causal=True),
        AttentionCase("tiles bool mask N=63 M=65 D=64", (1, 2, 2, 63, 65, 64), mask="bool"),
    ]


def variant_cases(variant: str) -> list:
    """The cases ``variants=(variant,)`` adds: small ones for the convention, one across tiles."""
    v = dict(variant=variant)
    return {
        "window": [
            AttentionCase("window (3, 2) N < M", (1, 2, 2, 7, 12, 16), window=(3, 2), **v),
            AttentionCase("window (2, 0) causal N > M", (1, 2, 2, 9, 6, 8), causal=True, window=(2, 0), **v),
            AttentionCase("tiles window (40, 8) N=M=129 D=64", (1, 2, 2, 129, 129, 64), window=(40, 8), **v),
        ],
        "softcap": [
            AttentionCase("softcap 1.5 GQA N < M", (1, 4, 2, 6, 11, 16), softcap=1.5, **v),
            AttentionCase("tiles softcap 2 causal N=M=65 D=64", (1, 2, 2, 65, 65, 64), causal=True, softcap=2.0, **v),
        ],
        "alibi": [
            AttentionCase("alibi causal N < M", (1, 4, 4, 6, 11, 16), causal=True, alibi=True, **v),
            AttentionCase("alibi N > M", (1, 2, 2, 9, 5, 8), alibi=True, **v),
            AttentionCase("tiles alibi causal N=65 M=129 D=64", (1, 2, 2, 65, 129, 64), causal=True, alibi=True, **v),
        ],
        "sinks": [
            AttentionCase("sinks GQA N < M", (1, 4, 2, 7, 9, 16), sinks=True, **v),
            AttentionCase("sinks causal N > M (empty rows)", (1, 2, 2, 8, 5, 8), causal=True, sinks=True, **v),
            AttentionCase("tiles sinks N=M=129 D=64", (1, 2, 2, 129, 129, 64), sinks=True, **v),
        ],
        "varlen": [
            _packed("varlen causal, 3 sequences", 4, 2, 16, ((5, 7), (1, 4), (9, 9)), causal=True),
            _packed("varlen N > M and N < M", 2, 2, 8, ((6, 3), (2, 5))),
            _packed("tiles varlen causal (65, 129), (63, 63)", 2, 2, 64, ((65, 129), (63, 63)), causal=True),
        ],
    }[variant]


def _check_variants(variants) -> tuple:
    if isinstance(variants, str):
        variants = (variants,)
    try:
        variants = tuple(variants)
    except TypeError:
        raise TypeError(f"variants must be a sequence of names from {VARIANTS}, got {variants!r}") from None
    for name in variants:
        if name not in VARIANTS:
            raise ValueError(f"variants: unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    return tuple(dict.fromkeys(variants))


def _check_dtype(dtype) -> str:
    name = dtype if isinstance(dtype, str) else str(dtype).replace("torch.", "")
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return name


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int >= 0, got {seed!r}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return int(seed)


# ----------------------------------------------------------------------------------------------
# one case's arrays (float64 NumPy, rounded to the kernel's dtype) and its rules as dense arrays

def _round(a: np.ndarray, dtype: str) -> np.ndarray:
    """``a`` rounded to ``dtype`` and back to float64 (bfloat16 through torch, which has it)."""
    if dtype != "bfloat16":
        return np.asarray(a, dtype=dtype).astype(np.float64)
    import torch

    return torch.from_numpy(np.ascontiguousarray(a)).to(torch.bfloat16).double().numpy()


def _case_arrays(spec: AttentionCase, rng, dtype: str = "float64") -> dict:
    """The float64 arrays of one case, the floating ones rounded to ``dtype``: ``q k v dout dlse``
    and, as the case needs them, ``mask``, ``alibi_slopes``, ``sinks``, ``cu_seqlens_q/k``."""
    if spec.mask not in (None, "bool", "padding", "float"):
        raise ValueError(f"AttentionCase.mask must be None, 'bool', 'padding' or 'float', got {spec.mask!r}")
    b, h, g, n, m, d = spec.shape
    dv = spec.dv or d
    lead = () if spec.seqlens else (b,)
    a = dict(q=rng.standard_normal(lead + (h, n, d)), k=rng.standard_normal(lead + (g, m, d)),
             v=rng.standard_normal(lead + (g, m, dv)), dout=rng.standard_normal(lead + (h, n, dv)),
             dlse=rng.standard_normal(lead + (h, n)))
    if spec.mask == "bool":
        mask = rng.random((b, h, n, m)) > 0.35
        mask[:, :, 1, :] = False                                       # a row that may attend nothing
        a["mask"] = mask
    elif spec.mask == "padding":
        mask = np.ones((b, 1, 1, m), dtype=bool)
        mask[1, ..., m - 2:] = False                                   # the second sequence is padded
        a["mask"] = mask
    elif spec.mask == "float":
        a["mask"] = rng.standard_normal((h, n, m))
    if spec.alibi:                                                     # the usual geometric slopes, as float32
        a["alibi_slopes"] = 2.0 ** (-8.0 * np.arange(1, h + 1) / h)
    if spec.sinks:                                                     # large enough to matter
        a["sinks"] = rng.standard_normal(h) + 1.0
    if spec.seqlens:
        a["cu_seqlens_q"] = np.cumsum([0] + [x for x, _ in spec.seqlens]).astype(np.int64)
        a["cu_seqlens_k"] = np.cumsum([0] + [y for _, y in spec.seqlens]).astype(np.int64)
    for name in ("q", "k", "v", "dout", "dlse", "sinks"):
        if name in a:
            a[name] = _round(a[name], dtype)
    if spec.mask == "float":
        a["mask"] = _round(a["mask"], dtype)
    if "alibi_slopes" in a:
        a["alibi_slopes"] = _round(a["alibi_slopes"], "float64" if dtype == "float64" else "float32")
    return a


def _npattn_kwargs(spec: AttentionCase, arrays: dict, **changes) -> dict:
    """The case's keyword arguments as npattn's ops take them (NumPy), with ``changes`` applied."""
    kw = dict(mask=arrays.get("mask"), causal=spec.causal, scale=spec.scale)
    for name in ("window", "softcap"):
        if getattr(spec, name) is not None:
            kw[name] = getattr(spec, name)
    for name in ("alibi_slopes", "sinks", "cu_seqlens_q", "cu_seqlens_k"):
        if name in arrays:
            kw[name] = arrays[name]
    kw.update(changes)
    return kw


def _sequences(spec: AttentionCase, arrays: dict) -> list:
    """``(rows, keys)`` slices per packed sequence (one whole slice without varlen)."""
    if not spec.seqlens:
        return [(slice(None), slice(None))]
    cq, ck = arrays["cu_seqlens_q"], arrays["cu_seqlens_k"]
    return [(slice(cq[i], cq[i + 1]), slice(ck[i], ck[i + 1])) for i in range(len(cq) - 1)]


def _dense_rules(spec: AttentionCase, arrays: dict, *, alibi_top_left: bool = False):
    """The case's rules as dense arrays over the scores ``(..., H, N, M)``: ``allowed`` (bool) and an
    additive ``bias`` (float mask + ALiBi, or None). Packed sequences: block-diagonal."""
    b, h, g, n, m, d = spec.shape
    lead = () if spec.seqlens else (b,)
    allowed = np.zeros(lead + (h, n, m), dtype=bool)
    bias = np.zeros(lead + (h, n, m)) if (spec.alibi or spec.mask == "float") else None
    for rows, keys in _sequences(spec, arrays):
        nb = (rows.stop - rows.start) if spec.seqlens else n
        mb = (keys.stop - keys.start) if spec.seqlens else m
        i, j = np.arange(nb)[:, None], np.arange(mb)[None, :]
        off = mb - nb
        ok = np.ones((nb, mb), dtype=bool)
        if spec.causal:
            ok &= j <= i + off
        if spec.window is not None:
            left, right = spec.window
            if left is not None:
                ok &= j >= i + off - left
            if right is not None:
                ok &= j <= i + off + right
        allowed[..., rows, keys] = ok
        if spec.alibi:
            dist = np.abs(i - j) if alibi_top_left else np.abs(i + off - j)
            bias[..., rows, keys] += -arrays["alibi_slopes"][:, None, None] * dist
    mask = arrays.get("mask")
    if mask is not None and mask.dtype == bool:
        allowed = allowed & mask
    elif mask is not None:
        bias = bias + mask
    return allowed, bias


# ----------------------------------------------------------------------------------------------
# the report

class CheckRow(NamedTuple):
    """One case and output: errors against the float64 truth, the tolerance they are held to (on
    ``max_abs_err``), the worst entry (``batch b, head h, row i``; ``kv head``, ``key`` for dk/dv)."""

    case: str
    output: str
    max_abs_err: float
    max_rel_err: float
    tol: float
    where: str
    ok: bool


class CaseResult(list):
    """The rows of one case (a list of ``CheckRow``), with ``.ok`` and ``.errors`` (messages for what
    ``fn`` got wrong before any number could be compared)."""

    def __init__(self, rows=(), errors=()):
        super().__init__(rows)
        self.errors = list(errors)

    @property
    def ok(self) -> bool:
        return bool(self) and all(r.ok for r in self) and not self.errors

    def __str__(self) -> str:
        return "\n".join([_format_row(r) for r in self] + [f"error: {e}" for e in self.errors])


def _format_row(r: CheckRow) -> str:
    return (f"{r.case:<40}{r.output:<7}{r.max_abs_err:>12.2e}{r.max_rel_err:>12.2e}{r.tol:>10.1e}  "
            f"{'ok ' if r.ok else 'BAD'}  {r.where}")


@dataclass
class CheckReport:
    """``rows`` (``CheckRow``), ``diagnosis`` (codes of ``DIAGNOSES``), ``summary`` (one line),
    ``errors`` (case -> what ``fn`` got wrong), ``nondeterministic`` ("case: output" that differed
    bitwise between repeats), ``dtype``, ``seconds``."""

    rows: list
    diagnosis: list
    dtype: str
    seconds: float
    errors: dict = field(default_factory=dict)
    summary: str = ""
    nondeterministic: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.rows or self.errors) and all(r.ok for r in self.rows) and not self.errors

    def __str__(self) -> str:
        lines = [f"{'case':<40}{'output':<7}{'max abs err':>12}{'max rel err':>12}{'tol':>10}  ok   worst at"]
        lines += [_format_row(r) for r in self.rows]
        for case, err in self.errors.items():
            lines.append(f"{case:<40}ERROR  {err}")
        lines.append(f"{self.summary} ({self.dtype}, {self.seconds:.1f} s)")
        for code in self.diagnosis:
            lines.append(f"diagnosis {code}: {DIAGNOSES[code]}")
        if not self.ok and not self.diagnosis:
            lines.append("diagnosis: none (no single known mismatch explains every failing row)")
        if self.nondeterministic:
            lines.append("nondeterministic (differ bitwise between repeats): " + ", ".join(self.nondeterministic))
        return "\n".join(lines)


def _where(err: np.ndarray, output: str, spec: AttentionCase, arrays: dict) -> str:
    """The worst entry (NaN first, then the largest) named by batch, head and row (key rows and kv
    heads for dk/dv, the head for dsinks; packed: the sequence and its own row)."""
    if err.size == 0:
        return ""
    flat = np.where(np.isnan(err), np.inf, err)
    if output == "dsinks":
        return f"head {int(np.argmax(flat))}"
    per_row = flat.reshape(flat.shape[:-1] + (-1,)).max(-1) if output != "lse" else flat
    idx = [int(i) for i in np.unravel_index(int(np.argmax(per_row)), per_row.shape)]
    head, row = ("kv head", "key") if output in ("dk", "dv") else ("head", "row")
    if spec.seqlens:
        cu = arrays["cu_seqlens_k" if output in ("dk", "dv") else "cu_seqlens_q"]
        s = int(np.searchsorted(cu, idx[-1], side="right") - 1)
        return f"{head} {idx[0]}, {row} {idx[1]} (sequence {s}, its {row} {idx[1] - int(cu[s])})"
    return f"batch {idx[0]}, {head} {idx[1]}, {row} {idx[2]}"


def _abs_err(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """``|got - want|``, 0 where both are the same infinity, NaN where ``got`` is NaN."""
    with np.errstate(invalid="ignore"):
        err = np.abs(got - want)
    return np.where(np.isinf(want) & (got == want), 0.0, err)


def _scale(want: np.ndarray) -> float:
    finite = want[np.isfinite(want)]
    return max(1.0, float(np.max(np.abs(finite)))) if finite.size else 1.0


def _max(err: np.ndarray) -> float:
    if err.size == 0:
        return 0.0
    return math.nan if np.isnan(err).any() else float(np.max(err))


def _close(got: np.ndarray, want: np.ndarray, tol: float) -> bool:
    """Same shape, NaN where ``want`` has NaN and only there, within ``tol`` elsewhere."""
    if got.shape != want.shape or np.any(np.isnan(got) != np.isnan(want)):
        return False
    err = _abs_err(got, want)
    return bool(np.all(err[~np.isnan(want)] <= tol))


# ----------------------------------------------------------------------------------------------
# the allowance: torch's math attention in the kernel's dtype

def _math_attention(torch, spec, arrays, dtype, with_lse):
    """The textbook attention in torch in ``dtype`` (scores and ``p @ v`` in the dtype, softmax in
    float32 then rounded, as torch's math SDPA and FlashAttention's test reference), with autograd
    gradients of the same loss: dict of float64 NumPy outputs."""
    td = getattr(torch, dtype)
    b, h, g, n, m, d = spec.shape
    q, k, v = (torch.tensor(arrays[x], dtype=td, requires_grad=True) for x in ("q", "k", "v"))
    allowed, bias = _dense_rules(spec, arrays)
    scale = spec.scale if spec.scale is not None else 1.0 / math.sqrt(d)
    kk, vv = k.repeat_interleave(h // g, dim=-3), v.repeat_interleave(h // g, dim=-3)
    s = (q @ kk.mT) * scale                                                  # (..., H, N, M)
    if spec.softcap is not None:
        s = spec.softcap * torch.tanh(s / spec.softcap)
    if bias is not None:
        s = s + torch.tensor(bias, dtype=td)
    wide = torch.float64 if dtype == "float64" else torch.float32
    s32 = s.to(wide).masked_fill(~torch.tensor(allowed), -math.inf)
    sinks = None
    if spec.sinks:
        sinks = torch.tensor(arrays["sinks"], dtype=td, requires_grad=True)
        col = sinks.to(wide)[:, None, None].expand(s32.shape[:-1] + (1,))
        s32 = torch.cat([s32, col], dim=-1)                                  # (..., H, N, M + 1)
    mx = s32.amax(-1, keepdim=True)
    mx = torch.where(torch.isinf(mx), torch.zeros_like(mx), mx).detach()
    e = torch.exp(s32 - mx)
    l = e.sum(-1, keepdim=True)
    p = (e / torch.where(l == 0, torch.ones_like(l), l)).to(td)[..., :m]     # (..., H, N, M)
    o = p @ vv                                                               # (..., H, N, Dv)
    lse = torch.where(l == 0, torch.full_like(l, -math.inf), torch.log(l) + mx).squeeze(-1).to(td)
    loss = (o.double() * torch.tensor(arrays["dout"])).sum()
    if with_lse:
        loss = loss + (lse.double().masked_fill(torch.isinf(lse), 0.0) * torch.tensor(arrays["dlse"])).sum()
    leaves = [q, k, v] + ([sinks] if sinks is not None else [])
    grads = torch.autograd.grad(loss, leaves)
    out = dict(o=o.detach().double().numpy(), lse=lse.detach().double().numpy())
    out.update({name: gr.double().numpy() for name, gr in zip(("dq", "dk", "dv", "dsinks"), grads)})
    return out


# ----------------------------------------------------------------------------------------------
# the cases as objects

class Case:
    """One case of the battery, ready to run: ``id`` (readable, for ``pytest.mark.parametrize``),
    ``spec`` (its ``AttentionCase``), ``dtype``, ``arrays`` (float64 NumPy: inputs rounded to the
    dtype, ``dout``, ``dlse``), ``inputs`` (fresh torch ``q, k, v`` in the dtype), ``kwargs`` (the
    keywords ``fn`` receives), and ``check(fn)`` -> the ``CaseResult`` rows of this case."""

    def __init__(self, spec: AttentionCase, dtype: str, arrays: dict, truths: Optional[dict] = None):
        self.spec, self.dtype, self.arrays = spec, dtype, arrays
        self.id = spec.name
        self._truth = dict(truths or {})         # with_lse -> dict of float64 outputs
        self._math = {}

    def __repr__(self) -> str:
        return f"Case({self.id!r}, {self.dtype})"

    # -- what fn receives
    def torch_inputs(self, torch, requires_grad: bool = True):
        td = getattr(torch, self.dtype)
        q, k, v = (torch.tensor(self.arrays[x], dtype=td, requires_grad=requires_grad) for x in ("q", "k", "v"))
        kwargs = dict(mask=None, causal=self.spec.causal, scale=self.spec.scale)
        mask = self.arrays.get("mask")
        if mask is not None:
            kwargs["mask"] = torch.tensor(mask) if mask.dtype == bool else torch.tensor(mask, dtype=td)
        if self.spec.window is not None:
            kwargs["window"] = tuple(self.spec.window)
        if self.spec.softcap is not None:
            kwargs["softcap"] = self.spec.softcap
        if self.spec.alibi:
            sd = torch.float64 if self.dtype == "float64" else torch.float32
            kwargs["alibi_slopes"] = torch.tensor(self.arrays["alibi_slopes"], dtype=sd)
        if self.spec.sinks:
            kwargs["sinks"] = torch.tensor(self.arrays["sinks"], dtype=td, requires_grad=requires_grad)
        if self.spec.seqlens:
            kwargs["cu_seqlens_q"] = torch.tensor(self.arrays["cu_seqlens_q"], dtype=torch.int32)
            kwargs["cu_seqlens_k"] = torch.tensor(self.arrays["cu_seqlens_k"], dtype=torch.int32)
        return (q, k, v), kwargs

    @property
    def inputs(self) -> dict:
        import torch

        (q, k, v), _ = self.torch_inputs(torch, requires_grad=False)
        return dict(q=q, k=k, v=v)

    @property
    def kwargs(self) -> dict:
        import torch

        return self.torch_inputs(torch, requires_grad=False)[1]

    # -- the truth and the allowance, computed once
    def truth(self, with_lse: bool) -> dict:
        if with_lse not in self._truth:
            a = self.arrays
            self._truth[with_lse] = _truth(a["q"], a["k"], a["v"], dout=a["dout"], dlse=a["dlse"] if with_lse else None,
                                           **_npattn_kwargs(self.spec, a))
        return self._truth[with_lse]

    def math_error(self, torch, with_lse: bool) -> dict:
        """max |math attention in the dtype - truth| per output."""
        if with_lse not in self._math:
            found, want = _math_attention(torch, self.spec, self.arrays, self.dtype, with_lse), self.truth(with_lse)
            self._math[with_lse] = {name: _max(_abs_err(found[name], want[name])) for name in want}
        return self._math[with_lse]

    def check(self, fn: Callable, *, rtol=None, atol=None) -> CaseResult:
        """This case alone: ``fn``'s rows (``result.ok``; ``str(result)`` prints them)."""
        import torch

        _check_fn(fn)
        rtol, atol = _check_tol("rtol", rtol), _check_tol("atol", atol)
        return _run_case(self, fn, torch, rtol, atol).result


def cases(*, dtype: str = "float32", variants=(), seed: int = 0) -> list:
    """The battery as ``Case`` objects: the default cases, then each requested variant's. A case's
    arrays depend only on ``seed`` and its name, so a subset draws the same numbers as the whole."""
    dtype, variants, seed = _check_dtype(dtype), _check_variants(variants), _check_seed(seed)
    specs = default_cases() + [c for name in variants for c in variant_cases(name)]
    return [_make_case(spec, dtype, seed) for spec in specs]


def _make_case(spec: AttentionCase, dtype: str, seed: int) -> Case:
    rng = np.random.default_rng([seed, zlib.crc32(spec.name.encode())])
    arrays = _case_arrays(spec, rng, dtype)
    allowed, _ = _dense_rules(spec, arrays)
    arrays["dlse"] = np.where(allowed.any(-1) | spec.sinks, arrays["dlse"], 0.0)   # no gradient into lse = -inf
    return Case(spec, dtype, arrays)


# ----------------------------------------------------------------------------------------------
# running fn on one case

class _Outcome(NamedTuple):
    case: Case
    result: CaseResult
    got: dict                      # output -> float64 NumPy
    tols: dict                     # output -> absolute tolerance
    with_lse: bool


def _type_name(x) -> str:
    t = type(x)
    return f"{t.__module__}.{t.__qualname__}" if t.__module__ != "builtins" else t.__qualname__


def _unpack(out, torch, case: Case, like):
    """``(o, lse, problem)``: what ``fn`` returned, or a message saying what is wrong with it."""
    if out is None:
        return None, None, "fn returned None; it must return o or (o, lse) as torch tensors"
    if isinstance(out, (tuple, list)):
        if len(out) not in (1, 2):
            return None, None, f"fn returned a {type(out).__name__} of {len(out)} values; it must return o or (o, lse)"
        o, lse = out[0], (out[1] if len(out) == 2 else None)
    else:
        o, lse = out, None
    b, h, g, n, m, d = case.spec.shape
    lead = () if case.spec.seqlens else (b,)
    dv = case.spec.dv or d
    for name, x, shape in (("o", o, lead + (h, n, dv)), ("lse", lse, lead + (h, n))):
        if x is None:
            continue
        if not isinstance(x, torch.Tensor):
            return None, None, (f"{name} is a {_type_name(x)}, not a torch tensor: fn must return torch tensors "
                                f"(the inputs' library)")
        if tuple(x.shape) != shape:
            return None, None, f"{name} has shape {tuple(x.shape)}, expected {shape}"
        allowed = (like.dtype,) if name == "o" else (like.dtype, torch.float32)
        if x.dtype not in allowed:
            return None, None, (f"{name} has dtype {x.dtype}, but the inputs are {like.dtype}"
                                + (" (lse may also be float32)" if name == "lse" else ""))
    return o, lse, None


def _call(fn, case: Case, torch, *, with_dlse: bool = True):
    """``(got, errors, with_lse)``: ``fn``'s outputs and autograd gradients as float64 NumPy."""
    (q, k, v), kwargs = case.torch_inputs(torch)
    try:
        out = fn(q, k, v, **kwargs)
    except Exception as err:                          # noqa: BLE001 - the user's kernel may raise anything
        return {}, [f"fn raised {type(err).__name__}: {err}"], False
    o, lse, problem = _unpack(out, torch, case, q)
    if problem:
        return {}, [problem], False
    got = dict(o=o.detach().double().cpu().numpy())
    with_lse = lse is not None
    if with_lse:
        got["lse"] = lse.detach().double().cpu().numpy()
    if not o.requires_grad:
        return got, ["o does not require grad: fn detached it or computed it outside autograd, so its "
                     "gradients cannot be checked"], with_lse
    loss = (o.double() * torch.tensor(case.arrays["dout"], device=o.device)).sum()
    if with_lse and lse.requires_grad and with_dlse:
        dlse = torch.tensor(case.arrays["dlse"], device=lse.device)
        loss = loss + (lse.double() * dlse).sum()
    leaves = dict(q=q, k=k, v=v)
    if "sinks" in kwargs:
        leaves["sinks"] = kwargs["sinks"]
    try:
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    except Exception as err:                          # noqa: BLE001
        return got, [f"fn's backward raised {type(err).__name__}: {err}"], with_lse
    errors = []
    for (name, leaf), grad in zip(leaves.items(), grads):
        if grad is None:
            errors.append(f"the outputs do not depend on {name} (its gradient is None): fn ignores {name} or "
                          f"detaches it")
            continue
        got["d" + name] = grad.detach().double().cpu().numpy()
    return got, errors, with_lse


def _tolerances(case: Case, torch, with_lse, rtol, atol) -> dict:
    want = case.truth(with_lse)
    if rtol is not None or atol is not None:
        return {name: (atol or 0.0) + (rtol or 0.0) * _scale(w) for name, w in want.items()}
    err = case.math_error(torch, with_lse)
    eps = EPS[case.dtype]
    return {name: 2.0 * err[name] + FLOOR_ULPS[case.dtype] * eps * _scale(w) for name, w in want.items()}


def _run_case(case: Case, fn, torch, rtol, atol) -> _Outcome:
    got, errors, with_lse = _call(fn, case, torch)
    want = case.truth(with_lse)
    tols = _tolerances(case, torch, with_lse, rtol, atol)
    rows = []
    for name in OUTPUTS:
        if name not in got or name not in want:
            continue
        err = _abs_err(got[name], want[name])
        max_abs = _max(err)
        ok = not math.isnan(max_abs) and max_abs <= tols[name]
        rows.append(CheckRow(case.id, name, max_abs, max_abs / _scale(want[name]), tols[name],
                             _where(err, name, case.spec, case.arrays), bool(ok)))
    return _Outcome(case, CaseResult(rows, errors), got, tols, with_lse)


# ----------------------------------------------------------------------------------------------
# check_attention

def _check_fn(fn):
    if not callable(fn):
        raise TypeError(f"fn must be callable (fn(q, k, v, *, mask=None, causal=False, scale=None)), got {fn!r}")


def _check_tol(name, value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number >= 0 or None, got {value!r}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_attention(fn: Callable, *, dtype: str = "float32", cases=None, variants=(), rtol=None, atol=None,
                    seed: int = 0, repeats: int = 1) -> CheckReport:
    """Run ``fn`` over the battery and compare every output and gradient with the float64 truth.

    ``fn(q, k, v, *, mask=None, causal=False, scale=None, **variant_kwargs)`` takes torch tensors
    ``(B, H, N, D)``, ``(B, G, M, D)``, ``(B, G, M, Dv)`` (bool mask True = attend, broadcastable to
    ``(B, H, N, M)``; a float mask is added) and returns ``o`` or ``(o, lse)``. ``variants`` adds the
    cases of ``"window"`` (``window=(left, right)``), ``"softcap"`` (``softcap=``), ``"alibi"``
    (``alibi_slopes=`` float32 ``(H,)``), ``"sinks"`` (``sinks=`` ``(H,)``, a gradient is checked),
    ``"varlen"`` (``cu_seqlens_q=``, ``cu_seqlens_k=`` int32, packed ``(H, total, D)`` inputs); each
    case passes only its own keyword. ``cases`` replaces the battery (a list from ``cases(...)``,
    each run in its own dtype, or ``AttentionCase`` recipes). Tolerances: 2x the error of the math
    attention in the same dtype plus ``FLOOR_ULPS`` epsilons (``rtol``/``atol`` override: a row is ok
    when ``max|err| <= atol + rtol * max(1, max|truth|)``). ``repeats`` >= 2 reruns every case and
    lists in ``.nondeterministic`` the outputs that differ bitwise.
    """
    import torch

    _check_fn(fn)
    dtype, variants, seed = _check_dtype(dtype), _check_variants(variants), _check_seed(seed)
    rtol, atol = _check_tol("rtol", rtol), _check_tol("atol", atol)
    if isinstance(repeats, bool) or not isinstance(repeats, numbers.Integral) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    if cases is None:
        battery = globals()["cases"](dtype=dtype, variants=variants, seed=seed)
    else:
        if variants:
            raise ValueError("variants and cases together: pass the variants to cases(variants=...)")
        battery = [c if isinstance(c, Case) else _make_case(c, dtype, seed) for c in cases]
        if not battery:
            raise ValueError("cases is empty: there is nothing to check")
        for c in battery:
            if not isinstance(c, Case):
                raise TypeError(f"cases must hold cases(...) objects or AttentionCase, got {c!r}")
    t0 = time.perf_counter()
    outcomes, nondet = [], []
    for case in battery:
        outcome = _run_case(case, fn, torch, rtol, atol)
        outcomes.append(outcome)
        for _ in range(repeats - 1):
            again, _, _ = _call(fn, case, torch)
            nondet += [f"{case.id}: {name}" for name in outcome.got
                       if name in again and not np.array_equal(outcome.got[name], again[name], equal_nan=True)]
    rows = [r for oc in outcomes for r in oc.result]
    errors = {oc.case.id: "; ".join(oc.result.errors) for oc in outcomes if oc.result.errors}
    dlse_note = _dlse_zero_rerun(outcomes, fn, torch, rtol, atol)
    diagnosis = _diagnose(outcomes, dlse_note)
    dtypes = sorted({c.dtype for c in battery}, key=DTYPES.index)
    return CheckReport(rows=rows, diagnosis=diagnosis, dtype=", ".join(dtypes), seconds=time.perf_counter() - t0,
                       errors=errors, summary=_summary(outcomes, dlse_note),
                       nondeterministic=list(dict.fromkeys(nondet)))


# ----------------------------------------------------------------------------------------------
# the summary: what the failing cases share

def _features(case: Case) -> list:
    s = case.spec
    b, h, g, n, m, d = s.shape
    f = []
    if s.causal:
        f.append("causal")
    if s.seqlens:
        if any(a != c for a, c in s.seqlens):
            f.append("N != M")
    elif n != m:
        f += ["N != M", "N < M" if n < m else "N > M"]
    if 1 < g < h:
        f.append("GQA")
    if s.mask:
        f.append({"bool": "bool mask", "padding": "bool mask", "float": "float mask"}[s.mask])
    if s.scale is not None:
        f.append("explicit scale")
    if (s.dv or d) != d:
        f.append("Dv != D")
    if max(n, m) > 64:
        f.append("multi-tile (N or M > 64)")
    if d >= 64:
        f.append(f"D = {d}")
    allowed, _ = _dense_rules(s, case.arrays)
    if (~allowed.any(-1)).any():
        f.append("rows with no key")
    if s.variant:
        f.append(s.variant)
    return f


def _summary(outcomes, dlse_note) -> str:
    n_rows = sum(len(oc.result) for oc in outcomes)
    failing = [oc for oc in outcomes if not oc.result.ok]
    if not failing:
        return f"all {n_rows} rows of {len(outcomes)} cases pass"
    bad_rows = [r for oc in failing for r in oc.result if not r.ok]
    outputs = [o for o in OUTPUTS if any(r.output == o for r in bad_rows)]
    head = f"{len(bad_rows)} of {n_rows} rows fail"
    if outputs:
        head += f" ({', '.join(outputs)})"
    head += f" in {len(failing)} of {len(outcomes)} cases"
    n_err = sum(1 for oc in failing if oc.result.errors)
    if n_err:
        head += f", {n_err} with an error from fn"
    if len(failing) == len(outcomes):
        pattern = "fails every case"
    else:
        feats = {id(oc): set(_features(oc.case)) for oc in outcomes}
        fail_ids = {id(oc) for oc in failing}
        common = set.intersection(*(feats[i] for i in fail_ids))
        chosen, having = [], {id(oc) for oc in outcomes}
        order = [f for oc in failing for f in _features(oc.case) if f in common]
        while having != fail_ids:                     # greedily: the shared feature that excludes most passing cases
            best = min(dict.fromkeys(order), key=lambda f: len({i for i in having if f in feats[i]}), default=None)
            if best is None or {i for i in having if best in feats[i]} == having:
                break
            chosen.append(best)
            having = {i for i in having if best in feats[i]}
            order = [f for f in order if f != best]
        if chosen and having == fail_ids:
            pattern = f"fails only {' and '.join(chosen)} cases"
        elif common:
            pattern = f"the failing cases share {', '.join(sorted(common))}, as do some passing ones"
        else:
            pattern = "the failing cases share no feature"
    line = f"{head}: {pattern}"
    if dlse_note is True:
        line += "; with dlse = 0 the gradients are right (the lse path of the backward is wrong)"
    return line


# ----------------------------------------------------------------------------------------------
# the diagnosis

def _dlse_zero_rerun(outcomes, fn, torch, rtol, atol):
    """For kernels returning lse whose failing cases fail only in gradients: rerun those cases with
    ``dlse = 0``. True if every such case is then right, False if not, None if not applicable."""
    failing = [oc for oc in outcomes if not oc.result.ok]
    if not failing or any(oc.result.errors or not oc.with_lse for oc in failing):
        return None
    if any(not r.ok and r.output in ("o", "lse") for oc in failing for r in oc.result):
        return None
    for oc in failing:
        got, errors, _ = _call(fn, oc.case, torch, with_dlse=False)
        want = oc.case.truth(False)
        tols = _tolerances(oc.case, torch, False, rtol, atol)
        if errors or any(not _close(got[n], want[n], tols[n]) for n in want if n.startswith("d") and n in got):
            return False
    return True


def _reference(case: Case, with_lse: bool, **changes) -> dict:
    a = case.arrays
    return _truth(a["q"], a["k"], a["v"], dout=a["dout"], dlse=a["dlse"] if with_lse else None,
                  **_npattn_kwargs(case.spec, a, **changes))


def _empty_rows(case: Case) -> np.ndarray:
    allowed, _ = _dense_rules(case.spec, case.arrays)
    return ~allowed.any(-1)                                              # (..., H, N)


def _alternatives(oc: _Outcome) -> dict:
    """code -> a function giving ``(kind, {output: [candidate]})`` for the conventions that apply to
    this case (computed only when asked); a candidate is an array (close within the slack) or a
    predicate on the kernel's array. kind "full": every output recomputed under the convention;
    "forward": o and lse only."""
    case, with_lse = oc.case, oc.with_lse
    s, a = case.spec, case.arrays
    b, h, g, n, m, d = s.shape
    alts = {}

    def full(code, **changes):
        alts[code] = lambda: ("full", {k: [x] for k, x in _reference(case, with_lse, **changes).items()})

    if s.causal and (n != m if not s.seqlens else any(x != y for x, y in s.seqlens)):
        full("causal-top-left", causal="top-left")
    if s.causal:
        full("causal-ignored", causal=False)
    if 1 < g < h and not s.seqlens:
        alts["gqa-interleaved"] = lambda: ("full", {k: [x] for k, x in _gqa_interleaved(case, with_lse).items()})
    if with_lse:
        alts["lse-base-2"] = lambda: ("forward", dict(lse=[case.truth(with_lse)["lse"] / math.log(2)]))
    if s.scale is None:
        full("scale-1/D", scale=1.0 / d)
        full("no-scale", scale=1.0)
    else:
        full("scale-ignored", scale=None)
    mask = a.get("mask")
    if mask is not None and mask.dtype == bool:
        full("mask-inverted", mask=~mask)
    empty = _empty_rows(case)
    if empty.any() and not s.sinks:
        alts["masked-row-nan"] = lambda: _masked_row_nan(case, with_lse, empty)
        alts["masked-row-uniform"] = lambda: _masked_row_uniform(oc, empty)
    if s.window is not None:
        alts["window-off-by-one"] = lambda: _window_off_by_one(case, with_lse)
    if s.alibi and not s.seqlens and n != m:
        _, bias = _dense_rules(s, a, alibi_top_left=True)
        full("alibi-top-left", alibi_slopes=None, mask=bias)
    if s.sinks and with_lse:
        alts["lse-without-sink"] = lambda: ("forward", dict(lse=[_reference(case, False, sinks=None)["lse"]]))
    if with_lse:
        alts["dlse-ignored"] = lambda: ("full", {k: [x] for k, x in case.truth(False).items() if k.startswith("d")})
    return alts


def _gqa_interleaved(case: Case, with_lse: bool) -> dict:
    """The truth with query head h on kv head h % G (k, v tiled), dk and dv folded back to G heads."""
    a, (_, h, g, *_) = case.arrays, case.spec.shape
    idx = np.arange(h) % g
    found = _truth(a["q"], a["k"][:, idx], a["v"][:, idx], dout=a["dout"], dlse=a["dlse"] if with_lse else None,
                   **_npattn_kwargs(case.spec, a))
    for name in ("dk", "dv"):
        folded = np.zeros(a[name[1]].shape)
        for head in range(h):
            folded[:, head % g] += found[name][:, head]
        found[name] = folded
    return found


def _masked_row_nan(case: Case, with_lse: bool, empty: np.ndarray):
    right = case.truth(with_lse)
    return ("forward", dict(o=[np.where(empty[..., None], np.nan, right["o"])],
                            lse=[np.where(empty, np.nan, right["lse"])]))


def _masked_row_uniform(oc: _Outcome, empty: np.ndarray):
    """Rows with no key average the values of their kv head (over their sequence's keys); their
    lse may be any finite value."""
    case = oc.case
    s, a = case.spec, case.arrays
    right = case.truth(oc.with_lse)
    rep = s.shape[1] // s.shape[2]
    v_mean = np.zeros_like(right["o"])
    for rows, keys in _sequences(s, a):
        mean = a["v"][..., keys, :].mean(axis=-2, keepdims=True)             # (..., G, 1, Dv)
        v_mean[..., rows, :] = np.repeat(mean, rep, axis=-3)
    tol = ALT_SLACK * oc.tols["lse"]

    def lse_any_finite(got):
        return bool(np.all(np.isfinite(got[empty]))) and _close(got[~empty], right["lse"][~empty], tol)
    return ("forward", dict(o=[np.where(empty[..., None], v_mean, right["o"])], lse=[lse_any_finite]))


def _window_off_by_one(case: Case, with_lse: bool):
    """The four windows one key wider or narrower on one side (those that exist)."""
    left, right = case.spec.window
    options = []
    for dl, dr in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        if (dl and left is None) or (dr and right is None):
            continue
        w = (None if left is None else left + dl, None if right is None else right + dr)
        if all(x is None or x >= 0 for x in w):
            options.append(_reference(case, with_lse, window=w))
    return ("full", {name: [opt[name] for opt in options] for name in options[0]})


def _matches(got, candidates, tol) -> bool:
    for cand in candidates:
        if callable(cand):
            if cand(got):
                return True
        elif _close(got, cand, tol):
            return True
    return False


def _differs(candidates, want, tol) -> bool:
    """Whether the convention makes a difference the tolerance can see (predicates always do)."""
    return any(callable(c) or not _close(c, want, tol) for c in candidates)


def _explains(code, oc: _Outcome, alt) -> bool:
    """Whether ``code`` explains this case: its failing rows match the convention's outputs (for a
    forward-only code: its failing o/lse rows, and there is one), or, if it passes, the convention
    makes no difference the tolerance can see."""
    bad = [r for r in oc.result if not r.ok]
    if alt is None:
        return not bad
    kind, cands = alt()
    if not bad:
        want = oc.case.truth(oc.with_lse)
        return not any(_differs(cands[name], want[name], oc.tols[name]) for name in cands if name in oc.got)
    if kind == "forward":
        bad = [r for r in bad if r.output in ("o", "lse")]
        if not bad:
            return False
    return all(r.output in cands and _matches(oc.got[r.output], cands[r.output], _alt_tol(r)) for r in bad)


def _alt_tol(r: CheckRow) -> float:
    far = r.max_abs_err if math.isfinite(r.max_abs_err) else 0.0
    return max(ALT_SLACK * r.tol, ALT_RATIO * far)


def _diagnose(outcomes, dlse_note) -> list:
    failing = [oc for oc in outcomes if not oc.result.ok]
    if not failing or any(oc.result.errors for oc in outcomes):
        return []
    alts = {id(oc): _alternatives(oc) for oc in outcomes}
    # the failing cases first: most codes are ruled out by the first one, before any passing case costs a truth
    order = failing + [oc for oc in outcomes if oc.result.ok]
    named = []
    for code in DIAGNOSES:
        if code == "low-precision-accumulation" or (code == "dlse-ignored" and dlse_note is not True):
            continue
        if all(_explains(code, oc, alts[id(oc)].get(code)) for oc in order):
            named.append(code)
    if not named and _low_precision(outcomes):
        named.append("low-precision-accumulation")
    return named


def _low_precision(outcomes) -> bool:
    """Every output kind fails somewhere, and no row by more than ``LOW_PRECISION_FACTOR`` x its tolerance."""
    rows = [r for oc in outcomes for r in oc.result]
    bad = [r for r in rows if not r.ok]
    kinds = {r.output for r in rows}
    if {r.output for r in bad} != kinds:
        return False
    return all(math.isfinite(r.max_abs_err) and r.max_abs_err <= LOW_PRECISION_FACTOR * r.tol for r in bad)


# ----------------------------------------------------------------------------------------------
# finding a kernel by name (npattn verify)

def load_function(target: str) -> Callable:
    """``"package.module:function"`` or ``"path/to/file.py:function"`` -> the function (the current
    directory is importable, as with ``python -m``). ``ValueError`` naming what is missing."""
    if not isinstance(target, str) or target.count(":") < 1:
        raise ValueError(f"--fn must be MODULE:FUNCTION or FILE.py:FUNCTION, got {target!r}")
    where, _, name = target.rpartition(":")
    if not where or not name:
        raise ValueError(f"--fn must be MODULE:FUNCTION or FILE.py:FUNCTION, got {target!r}")
    if where.endswith(".py"):
        if not os.path.isfile(where):
            raise ValueError(f"--fn: no file {where!r}")
        spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(where))[0], where)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as err:                      # noqa: BLE001 - report, never a traceback
            raise ValueError(f"--fn: importing {where!r} raised {type(err).__name__}: {err}") from None
    else:
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(where)
        except Exception as err:                      # noqa: BLE001
            raise ValueError(f"--fn: cannot import module {where!r} ({type(err).__name__}: {err})") from None
    fn = getattr(module, name, None)
    if fn is None:
        raise ValueError(f"--fn: {where!r} has no {name!r}")
    if not callable(fn):
        raise ValueError(f"--fn: {where}:{name} is a {type(fn).__name__}, not a function")
    return fn
