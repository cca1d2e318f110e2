"""Functional forward/backward pairs, one op family per file."""

from .attention import AttentionCache, attention_backward, attention_forward
from .flash import FlashCache, FlashTile, flash_attention_backward, flash_attention_forward
from .linear import LinearCache, linear_backward, linear_forward
from .softmax import SoftmaxCache, softmax, softmax_backward, softmax_forward, softmax_jacobian

__all__ = [
    "AttentionCache", "attention_backward", "attention_forward",
    "FlashCache", "FlashTile", "flash_attention_backward", "flash_attention_forward",
    "LinearCache", "linear_backward", "linear_forward",
    "SoftmaxCache", "softmax", "softmax_backward", "softmax_forward", "softmax_jacobian",
]