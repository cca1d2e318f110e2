"""The training loop, in one screen: batch -> forward -> loss -> backward -> clip -> step.

Every gradient here is npattn's hand-derived backward; nothing is differentiated automatically.
``npattn demo`` runs this loop on a toy sequence task (npattn/demo.py).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .backend import check_int_arg
from .nn import AdamW, clip_grad_norm
from .nn.params import check_real_arg
from .ops import cross_entropy_backward, cross_entropy_forward

__all__ = ["train_step", "evaluate", "StepResult"]


class StepResult(NamedTuple):
    loss: float
    grad_norm: float


def train_step(model, opt: AdamW, x, y, *, max_norm: float = 1.0, ignore_index: int = -100) -> StepResult:
    """One step of teacher-forced next-token training on ``x (B, N)`` with targets ``y (B, N)``
    (``ignore_index`` where no loss is wanted). The order is the point: the gradients are clipped
    before the optimizer reads them. The arguments are checked before anything runs, so a bad one
    leaves the model's ``grads`` as they were."""
    max_norm = check_real_arg("max_norm", max_norm)
    ignore_index = check_int_arg("ignore_index", ignore_index, minimum=None)
    if not callable(getattr(opt, "step", None)):
        raise TypeError(f"opt must be an optimizer with a step(grads) method (SGD, AdamW), got {type(opt).__name__}")
    logits = model.forward(x)                                            # (B, N, V)  derivations/11, eq. (11.6)
    loss, cache = cross_entropy_forward(logits, y, ignore_index=ignore_index)   # derivations/10, eq. (10.4)
    dlogits, _ = cross_entropy_backward(1.0, cache)                      # softmax - onehot: eq. (10.5)
    model.backward(dlogits)                                              # every weight: eqs. (11.4), (11.7)
    norm = clip_grad_norm(model.grads, max_norm)                         # as torch.nn.utils.clip_grad_norm_
    opt.step(model.grads)                                                # AdamW, as torch.optim.AdamW
    return StepResult(loss=float(loss), grad_norm=float(norm))


def evaluate(model, x, y, *, ignore_index: int = -100) -> tuple:
    """``(loss, token accuracy)`` of teacher-forced predictions on the positions whose target counts."""
    logits = model.forward(x)
    loss, _ = cross_entropy_forward(logits, y, ignore_index=ignore_index)
    counted = np.asarray(y) != ignore_index
    correct = (np.asarray(logits).argmax(-1) == np.asarray(y)) & counted
    return float(loss), float(correct.sum() / max(1, counted.sum()))
