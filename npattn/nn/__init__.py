"""The model-level math as functional pairs over params dicts (multi-head attention, the Transformer
block, a GPT), the thin classes that hold their state, optimizers and the Hugging Face loaders."""

from .block import BlockSpec, TransformerBlock, block_backward, block_forward, ffn_backward, ffn_forward
from .gpt import GPT, GPTConfig, KVCache, gpt_backward, gpt_forward
from .mha import MHASpec, MultiHeadAttention, mha_backward, mha_forward
from .optim import SGD, AdamW, clip_grad_norm
from .params import Params

__all__ = [
    "MultiHeadAttention", "TransformerBlock", "GPT", "GPTConfig", "KVCache", "SGD", "AdamW", "clip_grad_norm",
    "Params", "MHASpec", "BlockSpec", "mha_forward", "mha_backward", "block_forward", "block_backward",
    "ffn_forward", "ffn_backward", "gpt_forward", "gpt_backward",
]
