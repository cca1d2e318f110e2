"""Golden files: float64 cases as ``.npz`` with an index, for a kernel's own CI without npattn."""

from __future__ import annotations

import json
import os

import numpy as np

from .attention_check import _case_arrays, default_cases
from .reference import reference

__all__ = ["write_golden", "load_golden"]


def write_golden(out_dir: str, *, dtype: str = "float64", seed: int = 0, cases=None) -> list:
    """One ``.npz`` per case (inputs, the keyword arguments as JSON, ``o``, ``lse``, ``dout``,
    ``dlse`` and ``dq, dk, dv`` with both ``dout`` and ``dlse`` flowing) and ``index.json``.
    ``dtype`` is the dtype the inputs are rounded to (the answers are always float64)."""
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    index = []
    for i, case in enumerate(default_cases() if cases is None else cases):
        arrays = _case_arrays(case, rng)
        for name in ("q", "k", "v"):
            arrays[name] = arrays[name].astype(dtype).astype(np.float64)
        kwargs = dict(causal=case.causal)
        ref = reference(arrays["q"], arrays["k"], arrays["v"], mask=arrays.get("mask"), dout=arrays["dout"],
                        dlse=arrays["dlse"], **kwargs)
        fname = f"case{i:02d}.npz"
        payload = dict(q=arrays["q"], k=arrays["k"], v=arrays["v"], dout=arrays["dout"], dlse=arrays["dlse"],
                       o=ref.o, lse=ref.lse, dq=ref.dq, dk=ref.dk, dv=ref.dv, kwargs=np.array(json.dumps(kwargs)))
        if "mask" in arrays:
            payload["mask"] = arrays["mask"]
        np.savez(os.path.join(out_dir, fname), **payload)
        index.append(dict(file=fname, case=case.name, shape=dict(zip("BHGNMD", case.shape)), causal=case.causal,
                          mask=case.mask, input_dtype=dtype))
    with open(os.path.join(out_dir, "index.json"), "w") as f:
        json.dump(dict(conventions=dict(mask="bool True = may attend; float mask added",
                                        causal="bottom-right: j <= i + M - N",
                                        gqa="query head h uses kv head h // (H // G)",
                                        lse="natural log; -inf for a row that sees no key",
                                        gradients="of sum(o * dout) + sum(lse * dlse)"),
                       cases=index), f, indent=1)
    return index


def load_golden(path: str) -> dict:
    """One golden case as a dict of arrays, with ``kwargs`` decoded (the five-line loader of
    docs/kernel-authors.md does the same without npattn)."""
    with np.load(path) as data:
        case = {name: data[name] for name in data.files}
    case["kwargs"] = json.loads(str(case["kwargs"]))
    return case
