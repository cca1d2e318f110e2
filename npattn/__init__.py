"""npattn: Transformer attention in plain array code, with hand-derived, finite-difference-checked
backward passes. The public names are those of docs in README.md and derivations/."""

from . import testing  # noqa: F401  (npattn.testing: the kernel-author toolkit)
from .backend import to_numpy
from .gradcheck import GradcheckReport, GradcheckRow, gradcheck
from .nn import GPT, SGD, AdamW, GPTConfig, KVCache, MultiHeadAttention, TransformerBlock, clip_grad_norm
from .ops import (
    ActivationCache,
    AttentionCache,
    CrossEntropyCache,
    EmbeddingCache,
    FlashCache,
    FlashTile,
    LayerNormCache,
    LinearCache,
    LogSoftmaxCache,
    RMSNormCache,
    RopeCache,
    SoftmaxCache,
    attention_backward,
    attention_forward,
    cross_entropy_backward,
    cross_entropy_forward,
    embedding_backward,
    embedding_forward,
    flash_attention_backward,
    flash_attention_forward,
    gelu_backward,
    gelu_forward,
    layernorm_backward,
    layernorm_forward,
    linear_backward,
    linear_forward,
    log_softmax_backward,
    log_softmax_forward,
    relu_backward,
    relu_forward,
    rmsnorm_backward,
    rmsnorm_forward,
    rope_backward,
    rope_forward,
    silu_backward,
    silu_forward,
    sinusoidal_positions,
    softmax,
    softmax_backward,
    softmax_forward,
    softmax_jacobian,
)

__version__ = "0.2.0"

__all__ = [
    "ActivationCache", "AttentionCache", "CrossEntropyCache", "EmbeddingCache", "FlashCache", "FlashTile",
    "LayerNormCache", "LinearCache", "LogSoftmaxCache", "RMSNormCache", "RopeCache", "SoftmaxCache",
    "attention_backward", "attention_forward", "cross_entropy_backward", "cross_entropy_forward",
    "embedding_backward", "embedding_forward", "flash_attention_backward", "flash_attention_forward",
    "gelu_backward", "gelu_forward", "layernorm_backward", "layernorm_forward", "linear_backward", "linear_forward",
    "log_softmax_backward", "log_softmax_forward", "relu_backward", "relu_forward", "rmsnorm_backward",
    "rmsnorm_forward", "rope_backward", "rope_forward", "silu_backward", "silu_forward", "sinusoidal_positions",
    "softmax", "softmax_backward", "softmax_forward", "softmax_jacobian",
    "MultiHeadAttention", "TransformerBlock", "GPT", "GPTConfig", "KVCache", "SGD", "AdamW", "clip_grad_norm",
    "gradcheck", "GradcheckReport", "GradcheckRow", "to_numpy",
]
