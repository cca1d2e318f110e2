"""Functional forward/backward pairs, one op family per file."""

from .activations import (
    ActivationCache,
    erf,
    gelu_backward,
    gelu_forward,
    relu_backward,
    relu_forward,
    silu_backward,
    silu_forward,
)
from .attention import AttentionCache, attention_backward, attention_forward
from .combine import (
    CombineCache,
    RingCache,
    combine_attention,
    combine_attention_backward,
    ring_attention_backward,
    ring_attention_forward,
)
from .cross_entropy import CrossEntropyCache, cross_entropy_backward, cross_entropy_forward
from .embedding import EmbeddingCache, embedding_backward, embedding_forward, sinusoidal_positions
from .flash import FlashCache, FlashTile, flash_attention_backward, flash_attention_forward
from .layernorm import LayerNormCache, RMSNormCache, layernorm_backward, layernorm_forward, rmsnorm_backward, rmsnorm_forward
from .linear import LinearCache, linear_backward, linear_forward
from .linear_attention import LinearAttentionCache, linear_attention_backward, linear_attention_forward
from .paged import PagedCache, paged_attention_backward, paged_attention_forward
from .rope import RopeCache, rope_backward, rope_forward
from .softmax import (
    LogSoftmaxCache,
    SoftmaxCache,
    log_softmax_backward,
    log_softmax_forward,
    softmax,
    softmax_backward,
    softmax_forward,
    softmax_jacobian,
)

__all__ = [
    "ActivationCache", "erf", "gelu_backward", "gelu_forward", "relu_backward", "relu_forward",
    "silu_backward", "silu_forward",
    "AttentionCache", "attention_backward", "attention_forward",
    "CrossEntropyCache", "cross_entropy_backward", "cross_entropy_forward",
    "EmbeddingCache", "embedding_backward", "embedding_forward", "sinusoidal_positions",
    "FlashCache", "FlashTile", "flash_attention_backward", "flash_attention_forward",
    "LayerNormCache", "RMSNormCache", "layernorm_backward", "layernorm_forward", "rmsnorm_backward", "rmsnorm_forward",
    "LinearCache", "linear_backward", "linear_forward",
    "PagedCache", "paged_attention_backward", "paged_attention_forward",
    "CombineCache", "RingCache", "combine_attention", "combine_attention_backward", "ring_attention_forward",
    "ring_attention_backward",
    "LinearAttentionCache", "linear_attention_backward", "linear_attention_forward",
    "RopeCache", "rope_backward", "rope_forward",
    "LogSoftmaxCache", "SoftmaxCache", "log_softmax_backward", "log_softmax_forward",
    "softmax", "softmax_backward", "softmax_forward", "softmax_jacobian",
]
