"""Hugging Face interop: build a ``GPT`` from a ``GPT2LMHeadModel`` or ``LlamaForCausalLM`` state dict,
and hand its gradients back under Hugging Face's parameter names.

``transformers`` is never imported here: a state dict is a mapping name -> array (torch tensors, NumPy
arrays, anything ``numpy.asarray`` takes), so weights a user downloaded themselves load the same way.

Layouts (each row of ``_gpt2_map``/``_llama_map`` says how one Hugging Face weight maps to ours):
- GPT-2 uses ``Conv1D``, whose weight is ``(in, out)`` and computes ``x @ W + b``: our layout as is.
  ``attn.c_attn`` fuses q|k|v into ``(E, 3E)`` columns; we split it (its columns are head-major
  within each third, as ours).
- Llama uses ``nn.Linear``, whose weight is ``(out, in)`` and computes ``x @ W^T``: we transpose.
  Its RoPE is ``rotate_half`` (our ``interleaved=False``), its MLP ``down(silu(gate(x)) * up(x))``
  (our ``w_2``, ``w_1``, ``w_3``), its norms RMSNorm without bias, its attention GQA without biases.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from ..backend import check_int_arg
from .gpt import GPTConfig, gpt_param_shapes
from .mha import check_attention_name
from .params import check_dtype_name, check_real_arg

__all__ = ["load_gpt2", "load_llama", "hf_grads", "to_numpy_weight"]

# non-parameter buffers that older checkpoints carry: GPT-2's causal-mask buffers, Llama's RoPE table
_GPT2_BUFFERS = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")
_LLAMA_BUFFERS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def to_numpy_weight(name, value, dtype):
    """A state-dict value as a NumPy array of ``dtype`` (torch tensors on any device included)."""
    if hasattr(value, "detach"):                   # a torch tensor: off the graph, to the host
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":   # NumPy has no bfloat16
            value = value.float()
    try:
        a = np.asarray(value)
    except Exception as err:                       # noqa: BLE001 - say which weight could not be read
        raise TypeError(f"state dict entry {name!r} is not an array: {type(value).__name__}") from err
    if not np.issubdtype(a.dtype, np.floating):
        raise TypeError(f"state dict entry {name!r} must be floating, got dtype {a.dtype}")
    return a.astype(dtype)


def _strip(state_dict, prefix: str, keep=()) -> dict:
    """Names without the model's prefix (``transformer.``, ``model.``); names in ``keep`` as they are.
    The same weight under both forms (``transformer.wte.weight`` and ``wte.weight``) is a
    ``ValueError`` naming both: which one to load would be a guess."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping name -> array, got {type(state_dict).__name__}")
    out, duplicated = {}, []
    for name, value in state_dict.items():
        short = name[len(prefix):] if name.startswith(prefix) and name not in keep else name
        if short in out:
            duplicated.append(f"{prefix + short!r} and {short!r}")
        out[short] = value
    if duplicated:
        raise ValueError(f"state dict has duplicated weights (the same weight under two names): "
                         f"{', '.join(duplicated)}")
    return out


def _layers(names, pattern: str) -> int:
    found = {int(m.group(1)) for n in names for m in [re.match(pattern, n)] if m}
    return max(found) + 1 if found else 0


# A map row: (hf_name, our_names, how), how in {"same", "T", "split3"}.
def _gpt2_map(num_layers: int) -> list:
    rows = [("wte.weight", ["wte"], "same"), ("wpe.weight", ["wpe"], "same")]
    for i in range(num_layers):
        h, b = f"h.{i}.", f"blocks.{i}."
        rows += [(h + "ln_1.weight", [b + "norm1.gamma"], "same"), (h + "ln_1.bias", [b + "norm1.beta"], "same"),
                 (h + "attn.c_attn.weight", [b + "attn.w_q", b + "attn.w_k", b + "attn.w_v"], "split3"),
                 (h + "attn.c_attn.bias", [b + "attn.b_q", b + "attn.b_k", b + "attn.b_v"], "split3"),
                 (h + "attn.c_proj.weight", [b + "attn.w_o"], "same"), (h + "attn.c_proj.bias", [b + "attn.b_o"], "same"),
                 (h + "ln_2.weight", [b + "norm2.gamma"], "same"), (h + "ln_2.bias", [b + "norm2.beta"], "same"),
                 (h + "mlp.c_fc.weight", [b + "ffn.w_1"], "same"), (h + "mlp.c_fc.bias", [b + "ffn.b_1"], "same"),
                 (h + "mlp.c_proj.weight", [b + "ffn.w_2"], "same"), (h + "mlp.c_proj.bias", [b + "ffn.b_2"], "same")]
    return rows + [("ln_f.weight", ["norm_f.gamma"], "same"), ("ln_f.bias", ["norm_f.beta"], "same")]


def _llama_map(num_layers: int, tied: bool) -> list:
    rows = [("embed_tokens.weight", ["wte"], "same")]
    for i in range(num_layers):
        h, b = f"layers.{i}.", f"blocks.{i}."
        rows += [(h + f"self_attn.{x}_proj.weight", [b + f"attn.w_{x}"], "T") for x in "qkvo"]
        rows += [(h + "mlp.gate_proj.weight", [b + "ffn.w_1"], "T"),          # named_parameters() order
                 (h + "mlp.up_proj.weight", [b + "ffn.w_3"], "T"),
                 (h + "mlp.down_proj.weight", [b + "ffn.w_2"], "T"),
                 (h + "input_layernorm.weight", [b + "norm1.gamma"], "same"),
                 (h + "post_attention_layernorm.weight", [b + "norm2.gamma"], "same")]
    rows += [("norm.weight", ["norm_f.gamma"], "same")]
    return rows if tied else rows + [("lm_head.weight", ["lm_head"], "T")]


def _hf_shape(ours: list, how: str, shapes: dict) -> tuple:
    if how == "split3":
        parts = [shapes[n] for n in ours]
        return parts[0][:-1] + (sum(p[-1] for p in parts),)
    shape = shapes[ours[0]]
    return shape[::-1] if how == "T" else shape


def _convert(state: dict, rows: list, config: GPTConfig, dtype: str) -> dict:
    """Check names and shapes against ``rows`` and return our params dict (errors name the weight)."""
    expected = {hf for hf, _, _ in rows}
    missing = sorted(expected - set(state))
    if missing:
        raise ValueError(f"state dict is missing weights: {missing}")
    unexpected = sorted(set(state) - expected)
    if unexpected:
        raise ValueError(f"state dict has unexpected weights: {unexpected}")
    shapes = gpt_param_shapes(config)
    params = {}
    for hf, ours, how in rows:
        a = to_numpy_weight(hf, state[hf], dtype)
        want = _hf_shape(ours, how, shapes)
        if tuple(a.shape) != want:
            raise ValueError(f"state dict weight {hf!r} must have shape {want}, got {tuple(a.shape)}")
        if how == "T":
            params[ours[0]] = np.ascontiguousarray(a.T)
        elif how == "split3":
            cuts = np.cumsum([shapes[n][-1] for n in ours])[:-1]
            for name, part in zip(ours, np.split(a, cuts, axis=-1)):
                params[name] = np.ascontiguousarray(part)
        else:
            params[ours[0]] = a
    return params


def load_gpt2(cls, state_dict, *, num_heads, dtype="float64", attention="naive"):
    """``GPT`` from a ``GPT2LMHeadModel`` (or ``GPT2Model``) state dict; names with or without
    ``transformer.``; ``lm_head.weight``, if present, must equal ``wte.weight`` (GPT-2 ties them)."""
    num_heads = check_int_arg("num_heads", num_heads, minimum=1)
    dtype, attention = check_dtype_name(dtype), check_attention_name(attention)
    state = {n: v for n, v in _strip(state_dict, "transformer.").items() if not _GPT2_BUFFERS.match(n)}
    head = state.pop("lm_head.weight", None)
    for need in ("wte.weight", "wpe.weight", "h.0.mlp.c_fc.weight"):
        if need not in state:
            raise ValueError(f"state dict is missing weights: ['{need}'] (is it a GPT-2 state dict?)")
    v, e = np.shape(state["wte.weight"])
    config = GPTConfig(vocab_size=v, max_len=np.shape(state["wpe.weight"])[0], embed_dim=e, num_heads=num_heads,
                       num_layers=_layers(state, r"^h\.(\d+)\."), ffn_dim=np.shape(state["h.0.mlp.c_fc.weight"])[1],
                       norm="layernorm", activation="gelu_tanh", positions="learned", bias=True,
                       tie_embeddings=True, norm_eps=1e-5)
    params = _convert(state, _gpt2_map(config.num_layers), config, dtype)
    if head is not None and not np.array_equal(to_numpy_weight("lm_head.weight", head, dtype), params["wte"]):
        raise ValueError("state dict weight 'lm_head.weight' must equal 'wte.weight': GPT-2 ties its head "
                         "to the token embedding")
    model = cls(config, attention=attention, dtype=dtype, params=params)
    model._hf = "gpt2"
    return model


def load_llama(cls, state_dict, *, num_heads, num_kv_heads, rope_base=10000.0, norm_eps=1e-6, max_len=4096,
               dtype="float64", attention="naive"):
    """``GPT`` from a ``LlamaForCausalLM`` state dict; names with or without ``model.``; the head is
    tied when there is no ``lm_head.weight``."""
    num_heads = check_int_arg("num_heads", num_heads, minimum=1)
    num_kv_heads = check_int_arg("num_kv_heads", num_kv_heads, minimum=1)
    rope_base = check_real_arg("rope_base", rope_base, strict=True)
    norm_eps = check_real_arg("norm_eps", norm_eps)
    max_len = check_int_arg("max_len", max_len, minimum=1)
    dtype, attention = check_dtype_name(dtype), check_attention_name(attention)
    state = {n: v for n, v in _strip(state_dict, "model.", keep=("lm_head.weight",)).items()
             if not _LLAMA_BUFFERS.search(n)}
    for need in ("embed_tokens.weight", "layers.0.mlp.gate_proj.weight"):
        if need not in state:
            raise ValueError(f"state dict is missing weights: ['{need}'] (is it a Llama state dict?)")
    v, e = np.shape(state["embed_tokens.weight"])
    tied = "lm_head.weight" not in state
    config = GPTConfig(vocab_size=v, max_len=max_len, embed_dim=e, num_heads=num_heads,
                       num_layers=_layers(state, r"^layers\.(\d+)\."), num_kv_heads=num_kv_heads,
                       ffn_dim=np.shape(state["layers.0.mlp.gate_proj.weight"])[0], norm="rmsnorm",
                       activation="swiglu", positions="rope", bias=False, tie_embeddings=tied,
                       norm_eps=norm_eps, rope_base=rope_base)
    params = _convert(state, _llama_map(config.num_layers, tied), config, dtype)
    model = cls(config, attention=attention, dtype=dtype, params=params)
    model._hf = "llama"
    return model


def hf_grads(model) -> dict:
    """The model's ``grads`` under Hugging Face's ``named_parameters()`` names and layouts."""
    if model._hf is None:
        raise ValueError("hf_grads() needs a model built by GPT.from_hf_gpt2 or GPT.from_hf_llama")
    if not model.grads:
        raise RuntimeError("no gradients yet: run forward and backward first")
    cfg = model.config
    if model._hf == "gpt2":
        rows, prefix = _gpt2_map(cfg.num_layers), "transformer."
    else:
        rows, prefix = _llama_map(cfg.num_layers, cfg.tie_embeddings), "model."
    out = {}
    for hf, ours, how in rows:
        parts = [np.asarray(_host(model.grads[n])) for n in ours]
        if how == "split3":
            g = np.concatenate(parts, axis=-1)
        else:
            g = parts[0].T if how == "T" else parts[0]
        out[hf if hf == "lm_head.weight" else prefix + hf] = g
    return out


def _host(a):
    """A gradient as a NumPy array, from any supported library."""
    from ..backend import to_numpy

    return to_numpy(a)
