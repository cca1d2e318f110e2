"""Golden files: float64 cases as ``.npz`` with an index, for a kernel's own CI (``npattn golden``),
and the runner that checks a kernel against them (``golden_cases`` for ``npattn verify``)."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from .attention_check import AttentionCase, Case
from .attention_check import cases as _battery

__all__ = ["write_golden", "load_golden", "golden_cases"]

_ARRAYS = ("mask", "alibi_slopes", "sinks", "cu_seqlens_q", "cu_seqlens_k")


def write_golden(out_dir: str, *, dtype: str = "float64", seed: int = 0, variants=(), cases=None) -> list:
    """One ``.npz`` per case of the battery (with ``variants``' cases): the inputs, the keyword
    arguments (scalars as JSON in ``kwargs``; ``mask``, ``alibi_slopes``, ``sinks``,
    ``cu_seqlens_q/k`` as arrays), ``dout``, ``dlse``, and the float64 answers ``o``, ``lse``,
    ``dq, dk, dv`` (``dsinks``) with both ``dout`` and ``dlse`` flowing; and ``index.json``.
    ``dtype`` is the dtype the inputs are rounded to (the answers are always float64); ``cases``
    (``Case`` objects) replaces the battery."""
    battery = _battery(dtype=dtype, variants=variants, seed=seed) if cases is None else cases
    os.makedirs(out_dir, exist_ok=True)
    index = []
    for i, case in enumerate(battery):
        a, spec = case.arrays, case.spec
        want = case.truth(True)
        kwargs = dict(causal=spec.causal)
        for name in ("scale", "window", "softcap"):
            if getattr(spec, name) is not None:
                kwargs[name] = getattr(spec, name)
        payload = dict(q=a["q"], k=a["k"], v=a["v"], dout=a["dout"], dlse=a["dlse"],
                       kwargs=np.array(json.dumps(kwargs)), spec=np.array(json.dumps(dataclasses.asdict(spec))), **want)
        payload.update({name: a[name] for name in _ARRAYS if name in a})
        fname = f"case{i:02d}.npz"
        np.savez(os.path.join(out_dir, fname), **payload)
        index.append(dict(file=fname, case=spec.name, variant=spec.variant, shape=dict(zip("BHGNMD", spec.shape)),
                          dv=spec.dv or spec.shape[-1], kwargs=kwargs, arrays=[n for n in _ARRAYS if n in a],
                          mask=spec.mask, input_dtype=case.dtype))
    with open(os.path.join(out_dir, "index.json"), "w") as f:
        json.dump(dict(conventions=dict(mask="bool True = may attend; float mask added",
                                        causal="bottom-right: j <= i + M - N",
                                        gqa="query head h uses kv head h // (H // G)",
                                        lse="natural log; -inf for a row that sees no key (sinks included)",
                                        window="i + M - N - left <= j <= i + M - N + right",
                                        alibi="adds -slope_h * |i + M - N - j|",
                                        varlen="packed (H, total, D) inputs, cu_seqlens boundaries",
                                        gradients="of sum(o * dout) + sum(lse * dlse)"),
                       input_dtype=dtype, variants=list(variants), cases=index), f, indent=1)
    return index


def load_golden(path: str) -> dict:
    """One golden case as a dict of arrays, with ``kwargs`` (and ``spec``) decoded (the loader of
    docs/kernel-authors.md does the same without npattn)."""
    with np.load(path) as data:
        case = {name: data[name] for name in data.files}
    case["kwargs"] = json.loads(str(case["kwargs"]))
    if "spec" in case:
        case["spec"] = json.loads(str(case["spec"]))
    return case


def golden_cases(golden_dir: str) -> list:
    """The cases of a golden directory as ``Case`` objects whose truth is the files' (for
    ``check_attention(fn, cases=...)`` and ``npattn verify --golden``)."""
    with open(os.path.join(golden_dir, "index.json")) as f:
        index = json.load(f)
    found = []
    for entry in index["cases"]:
        data = load_golden(os.path.join(golden_dir, entry["file"]))
        spec = dict(data["spec"])
        spec["shape"] = tuple(spec["shape"])
        for name in ("window", "seqlens"):
            if spec.get(name) is not None:
                spec[name] = tuple(tuple(x) if isinstance(x, list) else x for x in spec[name])
        arrays = {name: data[name] for name in ("q", "k", "v", "dout", "dlse") + _ARRAYS if name in data}
        truth = {name: data[name] for name in ("o", "lse", "dq", "dk", "dv", "dsinks") if name in data}
        found.append(Case(AttentionCase(**spec), entry["input_dtype"], arrays, truths={True: truth}))
    return found
