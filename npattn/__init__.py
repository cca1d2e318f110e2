"""npattn: Transformer attention in plain array code, with hand-derived, finite-difference-checked
backward passes. The public names are those of SPEC.md."""

from .gradcheck import GradcheckReport, GradcheckRow, gradcheck
from .ops import (
    AttentionCache,
    FlashCache,
    FlashTile,
    LinearCache,
    SoftmaxCache,
    attention_backward,
    attention_forward,
    flash_attention_backward,
    flash_attention_forward,
    linear_backward,
    linear_forward,
    softmax,
    softmax_backward,
    softmax_forward,
    softmax_jacobian,
)

__version__ = "0.1.0"

__all__ = [
    "AttentionCache", "FlashCache", "FlashTile", "LinearCache", "SoftmaxCache",
    "attention_backward", "attention_forward",
    "flash_attention_backward", "flash_attention_forward",
    "linear_backward", "linear_forward",
    "softmax", "softmax_backward", "softmax_forward", "softmax_jacobian",
    "gradcheck", "GradcheckReport", "GradcheckRow",
]
