"""The grader behind ``npattn grade FILE``: imports a learner's exercise file (``exercises/``) and
checks every function it defines that npattn knows how to grade.

- ``<op>_backward`` for each op of ``check_backward`` (with ``<op>_forward``, when the file defines
  it, passed as ``forward``), and the exercise-specific names: ``mha_backward`` (with
  ``mha_forward``, multi-head self-attention, derivations/06-multihead.md),
  ``online_softmax_attention`` (the tile loop, derivations/04-online-softmax.md) and
  ``tiled_attention_backward`` (derivations/05-flash-backward.md).
- It prints each function's report, the diagnosis and the derivation section to read, or "not
  implemented yet" for a stub, and returns the exit status: 0 if every function passes, 1 if one
  fails or is not written yet, 2 for a missing file, a file that does not import, or a file defining
  none of the functions. It never raises: whatever the learner's code does is reported.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import numpy as np

from .. import ops
from .backward_check import OPS, BatteryCase, OpSpec, run_battery

__all__ = ["grade_file", "EXERCISE_SPECS", "gradable"]


# ----------------------------------------------------------------------------------------------
# the exercise-specific checks: multi-head self-attention, the tile loop, the tiled backward

class _MHACache(NamedTuple):
    x: object
    weights: tuple
    q: object
    k: object
    v: object
    attn: object
    merged: object
    heads: int


def _mha_forward(x, w_q, w_k, w_v, w_o, *, heads, causal=False):
    """npattn's multi-head self-attention without biases, from its ops: eqs. (6.1)-(6.2)."""
    b, n, e = x.shape
    d = e // heads

    def split(a):                                                       # (B, N, E) -> (B, H, N, D)
        return np.transpose(np.reshape(a, (b, n, heads, d)), (0, 2, 1, 3))

    q, k, v = (split(x @ w) for w in (w_q, w_k, w_v))
    o, attn = ops.attention_forward(q, k, v, causal=causal)             # (B, H, N, D)
    merged = np.reshape(np.transpose(o, (0, 2, 1, 3)), (b, n, e))       # (B, N, E)
    return merged @ w_o, _MHACache(x, (w_q, w_k, w_v, w_o), q, k, v, attn, merged, heads)


def _mha_backward(dout, cache: _MHACache):
    """``(dx, dw_q, dw_k, dw_v, dw_o)``: eqs. (6.3)-(6.4) around attention's backward."""
    x, (w_q, w_k, w_v, w_o), _, _, _, attn, merged, heads = cache
    b, n, e = x.shape
    x2 = np.reshape(x, (-1, e))
    dw_o = np.reshape(merged, (-1, e)).T @ np.reshape(dout, (-1, e))
    do = np.transpose(np.reshape(dout @ w_o.T, (b, n, heads, e // heads)), (0, 2, 1, 3))
    grads = ops.attention_backward(do, attn)
    dq, dk, dv = (np.reshape(np.transpose(g, (0, 2, 1, 3)), (b, n, e)) for g in grads)
    dx = dq @ w_q.T + dk @ w_k.T + dv @ w_v.T
    dw_q, dw_k, dw_v = (x2.T @ np.reshape(g, (-1, e)) for g in (dq, dk, dv))
    return dx, dw_q, dw_k, dw_v, dw_o


def _mha_cases(rng):
    def case(name, b, n, e, heads, causal):
        inputs = dict(x=rng.standard_normal((b, n, e)))
        for w in ("w_q", "w_k", "w_v", "w_o"):
            inputs[w] = rng.standard_normal((e, e)) / math.sqrt(e)
        kwargs = dict(heads=heads) if not causal else dict(heads=heads, causal=True)
        return BatteryCase(name, inputs, kwargs, rng.standard_normal((b, n, e)))
    return [case("B=2, N=4, E=6, 2 heads", 2, 4, 6, 2, False),
            case("B=1, N=5, E=8, 4 heads, causal", 1, 5, 8, 4, True)]


def _loop_reference(q, k, v, *, causal=False, block_k=None):
    o, cache = ops.flash_attention_forward(q, k, v, causal=causal)
    return (o, cache.lse), cache


def _loop_inputs(rng, h, n, m, d, dv):
    return dict(q=rng.standard_normal((h, n, d)), k=rng.standard_normal((h, m, d)), v=rng.standard_normal((h, m, dv)))


def _loop_cases(rng):
    return [BatteryCase("N=5, M=7, block_k=3 (does not divide M)", _loop_inputs(rng, 2, 5, 7, 4, 3), dict(block_k=3),
                        None),
            BatteryCase("N=M=6, block_k=1", _loop_inputs(rng, 2, 6, 6, 4, 4), dict(block_k=1), None),
            BatteryCase("causal N=4 < M=9, block_k=4", _loop_inputs(rng, 2, 4, 9, 4, 4), dict(causal=True, block_k=4),
                        None),
            BatteryCase("causal N=6 > M=3 (rows with no key), block_k=2", _loop_inputs(rng, 1, 6, 3, 4, 4),
                        dict(causal=True, block_k=2), None),
            BatteryCase("large scores (|s| ~ 300), block_k=2", {k: 30 * a for k, a in
                                                                _loop_inputs(rng, 1, 3, 5, 4, 4).items()},
                        dict(block_k=2), None)]


def _tiled_reference(dout, q, k, v, o, lse, *, causal=False, block_q=None, block_k=None):
    grads = ops.attention_backward(dout, ops.attention_forward(q, k, v, causal=causal)[1])
    return tuple(grads), None


def _tiled_cases(rng):
    def case(name, h, n, m, d, dv, **kwargs):
        arrays = _loop_inputs(rng, h, n, m, d, dv)
        o, cache = ops.flash_attention_forward(arrays["q"], arrays["k"], arrays["v"], causal=kwargs.get("causal", False))
        inputs = dict(dout=rng.standard_normal(o.shape), **arrays, o=o, lse=cache.lse)
        return BatteryCase(name, inputs, kwargs, None)
    return [case("N=5, M=7, blocks 2 x 3", 2, 5, 7, 4, 3, block_q=2, block_k=3),
            case("N=M=4, blocks 4 x 4 (one tile)", 2, 4, 4, 4, 4, block_q=4, block_k=4),
            case("causal N=3 < M=8, blocks 2 x 3", 2, 3, 8, 4, 4, causal=True, block_q=2, block_k=3),
            case("causal N=6 > M=3 (rows with no key), blocks 4 x 2", 1, 6, 3, 4, 4, causal=True, block_q=4,
                 block_k=2)]


EXERCISE_SPECS = {
    "mha": OpSpec("mha", _mha_forward, _mha_backward, _mha_cases, "derivations/06-multihead.md"),
    "online_softmax_attention": OpSpec("online_softmax_attention", _loop_reference, None, _loop_cases,
                                       "derivations/04-online-softmax.md", outputs=("o", "lse"), forward_only=True),
    "tiled_attention_backward": OpSpec("tiled_attention_backward", _tiled_reference, None, _tiled_cases,
                                       "derivations/05-flash-backward.md", outputs=("dq", "dk", "dv"),
                                       forward_only=True),
}


class Gradable(NamedTuple):
    """One function of the learner's file and how to check it."""

    name: str                 # the function's name in the file
    spec: OpSpec
    fn: Callable
    forward: Optional[Callable]


def gradable(module) -> list:
    """The functions of ``module`` that npattn grades, in the order of ``OPS`` then the exercises'."""
    found = []
    for op, spec in list(OPS.items()) + [("mha", EXERCISE_SPECS["mha"])]:
        fn = getattr(module, f"{op}_backward", None)
        if callable(fn):
            forward = getattr(module, f"{op}_forward", None)
            found.append(Gradable(f"{op}_backward", spec, fn, forward if callable(forward) else None))
    for name in ("online_softmax_attention", "tiled_attention_backward"):
        fn = getattr(module, name, None)
        if callable(fn):
            found.append(Gradable(name, EXERCISE_SPECS[name], fn, None))
    return found


def _expected_names() -> str:
    return ", ".join([f"{op}_backward" for op in OPS] + ["mha_backward", "online_softmax_attention",
                                                          "tiled_attention_backward"])


def _load(path: Path):
    name = f"_npattn_exercise_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def grade_file(path, *, dtype: str = "float64", seed: int = 0, out=None, err=None) -> int:
    """Grade the exercise file at ``path``; print to ``out`` (stdout) and return the exit status."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    path = Path(path)
    if not path.is_file():
        print(f"npattn grade: error: {path}: no such file", file=err)
        return 2
    try:
        module = _load(path)
    except BaseException as e:                        # noqa: BLE001 - a syntax error, a failing import ...
        if isinstance(e, KeyboardInterrupt):
            raise
        print(f"npattn grade: error: {path} does not import: {type(e).__name__}: {e}".splitlines()[0], file=err)
        return 2
    targets = gradable(module)
    if not targets:
        print(f"npattn grade: error: {path} defines none of the functions npattn grades ({_expected_names()})",
              file=err)
        return 2
    t0 = time.perf_counter()
    passed, failed, todo = [], [], []
    for target in targets:
        title = target.name + (f" (with {target.name.replace('_backward', '_forward')})" if target.forward else "")
        print(f"== {title}: {target.spec.derivation}", file=out, flush=True)
        try:
            report = run_battery(target.spec, target.fn, forward=target.forward, dtype=dtype, seed=seed)
        except Exception as e:                        # noqa: BLE001 - the grader reports, never crashes
            print(f"{target.name}: could not be graded: {type(e).__name__}: {e}", file=out)
            failed.append(target.name)
            continue
        if report.not_implemented:
            print(f"{target.name}: not implemented yet (it raises NotImplementedError); "
                  f"read {target.spec.derivation}", file=out)
            todo.append(target.name)
        else:
            print(report, file=out)
            (passed if report.ok else failed).append(target.name)
        print(file=out)
    parts = [f"{len(passed)} pass"] + ([f"{len(failed)} fail ({', '.join(failed)})"] if failed else []) + \
        ([f"{len(todo)} not implemented yet ({', '.join(todo)})"] if todo else [])
    print(f"npattn grade {path.name}: {len(targets)} function{'s' if len(targets) != 1 else ''}: {', '.join(parts)} "
          f"({time.perf_counter() - t0:.2f} s)", file=out)
    return 0 if not failed and not todo else 1
