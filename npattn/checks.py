"""The gradient checks behind ``npattn check``: every functional pair over a spread of cases.

Each case is float64 with a random ``dout`` (drawn by ``gradcheck``) and shapes whose heads,
query and key lengths all differ, so that a transposed or mis-summed gradient cannot pass.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from .gradcheck import GradcheckReport, gradcheck
from .ops import (
    attention_backward,
    attention_forward,
    flash_attention_backward,
    flash_attention_forward,
    linear_backward,
    linear_forward,
    softmax_backward,
    softmax_forward,
)

__all__ = ["Case", "cases", "run_case", "flash_with_lse_forward", "flash_with_lse_backward"]


class Case(NamedTuple):
    op: str
    name: str
    forward: Callable
    backward: Callable
    inputs: dict
    kwargs: dict


def flash_with_lse_forward(q, k, v, **kwargs):
    """The tiled forward seen as a two-output op ``(o, lse)``, so ``dlse`` can be gradchecked."""
    o, cache = flash_attention_forward(q, k, v, **kwargs)
    return (o, cache.lse), cache


def flash_with_lse_backward(douts, cache):
    dout, dlse = douts
    return flash_attention_backward(dout, cache, dlse=dlse)


def cases(seed: int = 0) -> list[Case]:
    """All cases, with inputs drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    normal = rng.standard_normal

    def qkv(lead, h, g, n, m, d, dv):
        return dict(q=normal(lead + (h, n, d)), k=normal(lead + (g, m, d)), v=normal(lead + (g, m, dv)))

    masked = normal((3, 6))
    masked[1, :] = -np.inf                                 # a fully masked row
    masked[0, 2] = -np.inf
    sparse = rng.random((2, 1, 5, 7)) > 0.5                # bool (B, 1, N, M), broadcast over heads
    sparse[0, 0, 3, :] = False                             # a query that may attend nothing
    att, fl = (attention_forward, attention_backward), (flash_attention_forward, flash_attention_backward)
    lse_pair = (flash_with_lse_forward, flash_with_lse_backward)
    return [
        Case("linear", "bias, (B, N, E_in)", linear_forward, linear_backward,
             dict(x=normal((2, 3, 4)), w=normal((4, 5)), b=normal(5)), {}),
        Case("linear", "no bias, 1-D x", linear_forward, linear_backward,
             dict(x=normal(4), w=normal((4, 3)), b=None), {}),
        Case("softmax", "last axis", softmax_forward, softmax_backward, dict(x=normal((2, 3, 5))), {}),
        Case("softmax", "axis=1", softmax_forward, softmax_backward, dict(x=normal((2, 4, 3))), dict(axis=1)),
        Case("softmax", "-inf entries, fully masked row", softmax_forward, softmax_backward, dict(x=masked), {}),
        Case("attention", "MHA, N != M, D != Dv", *att, qkv((2,), 3, 3, 4, 5, 3, 2), {}),
        Case("attention", "single head, 2-D", *att,
             dict(q=normal((5, 4)), k=normal((3, 4)), v=normal((3, 2))), dict(scale=0.7)),
        Case("attention", "bool mask, fully masked row", *att, qkv((2,), 2, 2, 5, 7, 3, 2), dict(mask=sparse)),
        Case("attention", "float mask (H, 1, M)", *att, qkv((2,), 3, 3, 4, 5, 3, 3), dict(mask=normal((3, 1, 5)))),
        Case("attention", "causal N < M", *att, qkv((1,), 2, 2, 3, 6, 3, 2), dict(causal=True)),
        Case("attention", "causal N > M (empty rows)", *att, qkv((1,), 2, 2, 6, 4, 3, 2), dict(causal=True)),
        Case("attention", "GQA H=4 G=2 + causal", *att, qkv((2,), 4, 2, 4, 5, 3, 2), dict(causal=True)),
        Case("attention", "MQA G=1 + bool mask", *att, qkv((1,), 3, 1, 5, 7, 2, 3), dict(mask=sparse[:1])),
        Case("attention", "dropout 0.3, seed 7", *att, qkv((2,), 2, 2, 4, 5, 3, 2), dict(dropout_p=0.3, rng=7)),
        Case("flash", "ragged tiles 3x2", *fl, qkv((2,), 3, 3, 7, 5, 3, 2), dict(block_q=3, block_k=2)),
        Case("flash", "causal N > M, tiles 2x3", *fl, qkv((1,), 2, 2, 7, 4, 3, 2),
             dict(causal=True, block_q=2, block_k=3)),
        Case("flash", "GQA H=4 G=2, bool mask", *fl, qkv((2,), 4, 2, 5, 7, 3, 2),
             dict(mask=sparse, block_q=2, block_k=4)),
        Case("flash", "float mask, 2-D", *fl, dict(q=normal((5, 3)), k=normal((6, 3)), v=normal((6, 2))),
             dict(mask=normal((5, 6)), block_q=4, block_k=4)),
        Case("flash", "dlse, causal N < M", *lse_pair, qkv((2,), 2, 1, 4, 6, 3, 2),
             dict(causal=True, block_q=3, block_k=4)),
    ]


def run_case(case: Case, *, mode: str = "full", seed: int = 0) -> GradcheckReport:
    return gradcheck(case.forward, case.backward, case.inputs, kwargs=case.kwargs, mode=mode, seed=seed)
