"""A decoder-only GPT as a functional pair over a flat params dict, the KV cache, greedy decoding,
and the ``GPT`` class that holds it all.

Shape legend: ``ids (B, N)`` integer, ``x, h (B, N, E)``, ``logits (B, N, V)``.
Keys: ``wte (V, E)``, ``wpe (max_len, E)`` (learned positions), ``blocks.<i>.<block keys>``,
``norm_f.gamma norm_f.beta`` (no beta with RMSNorm), ``lm_head (E, V)`` (untied head only).

Forward, in steps (derivations/11-transformer-block.md and 09-embeddings-positions.md):
    1. x = wte[ids]                                        eq. (9.1)
    2. x = x + wpe[t0 : t0+N]  (learned) or + the sinusoidal table (eq. (9.3)); RoPE acts in attention
       (t0 = the number of cached tokens; 0 without a KV cache)
    3. x = block_i(x), i = 0 .. n_L - 1, causal            eq. (11.1)
    4. h = norm_f(x)
    5. logits = h wte^T (tied) or h lm_head                eq. (11.6)
Backward, the same steps in reverse:
    5. dh = dlogits wte (or lm_head^T); dwte (head) = dlogits^T h, summed over rows   eq. (11.6)
    4. dx = norm_f backward
    3. the blocks' backwards, last block first
    2. dwpe[t] = sum over the batch of dx[:, t]: each position's row is used once per sequence
    1. dwte += onehot(ids)^T dx (eq. (9.2)); tied, dwte is the sum of both uses  eq. (11.7)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple, Optional

from array_api_compat import is_array_api_obj

from ..backend import check_cache, check_int, check_int_arg, device, namespace
from ..ops import embedding_backward, embedding_forward, linear_backward, linear_forward, sinusoidal_positions
from .block import ACTIVATIONS, NORMS, block_backward, block_forward, block_params, make_block_spec, norm_backward, norm_forward
from .params import Initializer, Layer, check_choice, check_dtype_name, check_flag, prefixed, sub

__all__ = ["GPTConfig", "GPT", "KVCache", "gpt_forward", "gpt_backward", "gpt_params", "gpt_param_shapes"]

POSITIONS = ("learned", "sinusoidal", "rope")


@dataclass(frozen=True)
class GPTConfig:
    """The shape of a GPT. ``ffn_dim`` defaults to ``4 * embed_dim``; ``num_kv_heads`` to
    ``num_heads``; ``positions`` is ``"learned"`` (GPT-2's ``wpe``), ``"sinusoidal"`` (Vaswani et
    al.'s fixed table, added unscaled) or ``"rope"`` (Llama: rotary, inside attention)."""

    vocab_size: int
    max_len: int
    embed_dim: int
    num_heads: int
    num_layers: int
    num_kv_heads: Optional[int] = None
    ffn_dim: Optional[int] = None
    norm: str = "layernorm"
    activation: str = "gelu_tanh"
    positions: str = "learned"
    bias: bool = True
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    rope_base: float = 10000.0

    def __post_init__(self):
        """Check every field and store it as a plain Python value (NumPy integers become ints)."""
        fixed = {}
        for name in ("vocab_size", "max_len", "embed_dim", "num_heads", "num_layers"):
            fixed[name] = check_int_arg(name, getattr(self, name), minimum=1)
        for name in ("num_kv_heads", "ffn_dim"):
            fixed[name] = check_int_arg(name, getattr(self, name), minimum=1, allow_none=True)
        fixed["positions"] = check_choice("positions", self.positions, POSITIONS)
        fixed["norm"] = check_choice("norm", self.norm, NORMS)
        fixed["activation"] = check_choice("activation", self.activation, ACTIVATIONS)
        fixed["bias"] = check_flag("bias", self.bias)
        fixed["tie_embeddings"] = check_flag("tie_embeddings", self.tie_embeddings)
        spec, _, _ = make_block_spec(fixed["embed_dim"], fixed["num_heads"], fixed["num_kv_heads"], fixed["norm"],
                                     fixed["activation"], fixed["positions"] == "rope", self.rope_base,
                                     self.norm_eps, "naive")
        fixed["norm_eps"], fixed["rope_base"] = spec.norm_eps, spec.attn.rope_base
        for name, value in fixed.items():
            object.__setattr__(self, name, value)

    @property
    def ffn(self) -> int:
        return 4 * self.embed_dim if self.ffn_dim is None else self.ffn_dim


class KVCache:
    """The keys and values of every layer for the tokens seen so far, ``(B, G, M, D)`` each, after
    RoPE. ``len(cache)`` is the number of cached tokens; the next token sits at that position.
    Derivation: derivations/12-kv-cache.md, eq. (12.1)."""

    def __init__(self):
        self.layers: list = []            # per layer: (k, v)

    def __len__(self) -> int:
        return 0 if not self.layers else int(self.layers[0][0].shape[-2])

    @property
    def batch(self):
        return None if not self.layers else int(self.layers[0][0].shape[0])


class GPTCache(NamedTuple):
    tok: object                      # EmbeddingCache
    blocks: list                     # BlockCache per layer
    norm_f: object
    head: object                     # LinearCache
    n: int
    inference: bool                  # a KV-cache forward: no backward


def _check_kv_cache(kv_cache: KVCache, config: GPTConfig, wte) -> None:
    """A cache this model filled: one ``(k, v)`` per layer, ``(B, G, M, D)`` each with this model's
    ``G`` and ``D``, the weights' library and dtype. A cache from another model is named here, not
    met later as an IndexError, a concatenation error or a silent promotion."""
    if not kv_cache.layers:
        return
    if len(kv_cache.layers) != config.num_layers:
        raise ValueError(f"kv_cache holds {len(kv_cache.layers)} layers; this model has {config.num_layers} "
                         "(a cache from another model?)")
    b, m = kv_cache.batch, len(kv_cache)
    g, d = config.num_kv_heads or config.num_heads, config.embed_dim // config.num_heads
    for i, (k, v) in enumerate(kv_cache.layers):
        namespace(wte=wte, **{f"kv_cache layer {i} keys": k, f"kv_cache layer {i} values": v})
        for what, a in (("keys", k), ("values", v)):
            if tuple(a.shape) != (b, g, m, d):
                raise ValueError(f"kv_cache holds {what} of shape {tuple(a.shape)} in layer {i}; this model needs "
                                 f"(B, G, M, D) = ({b}, {g}, M, {d}) (a cache from another model?)")
            if a.dtype != wte.dtype:
                raise TypeError(f"kv_cache holds {a.dtype} {what}; this model's weights are {wte.dtype} "
                                "(a cache from another model?)")


def _block_specs(config: GPTConfig, attention: str):
    spec, _, _ = make_block_spec(config.embed_dim, config.num_heads, config.num_kv_heads, config.norm,
                                 config.activation, config.positions == "rope", config.rope_base,
                                 config.norm_eps, attention)
    return spec


def gpt_forward(params, config: GPTConfig, ids, *, key_mask=None, kv_cache: Optional[KVCache] = None,
                attention: str = "naive", table=None):
    """Logits ``(B, N, V)`` and a ``GPTCache``. ``table`` is the sinusoidal position table (``(max_len,
    E)``, the weights' dtype) for ``positions="sinusoidal"``. With ``kv_cache`` the new tokens come
    after the cached ones and the cache is extended in place.
    Derivation: derivations/11-transformer-block.md, eqs. (11.1) and (11.6)."""
    wte = params["wte"]
    xp = namespace(ids=ids, wte=wte, key_mask=key_mask)
    check_int(xp, "ids", ids)
    if ids.ndim != 2:
        raise ValueError(f"ids must be 2-D (B, N), got shape {tuple(ids.shape)}")
    b, n = ids.shape
    t0 = 0
    if kv_cache is not None:
        if not isinstance(kv_cache, KVCache):
            raise TypeError(f"kv_cache must be a KVCache, got {type(kv_cache).__name__}")
        if key_mask is not None:
            raise ValueError("key_mask with a kv_cache is not supported: the cache holds every earlier token")
        t0 = len(kv_cache)
        if kv_cache.batch is not None and kv_cache.batch != b:
            raise ValueError(f"ids has batch {b} but the kv_cache holds batch {kv_cache.batch}")
        _check_kv_cache(kv_cache, config, wte)
    if config.positions != "rope" and t0 + n > config.max_len:
        raise ValueError(f"positions {t0}..{t0 + n - 1} exceed max_len={config.max_len} "
                         f"(ids of shape {tuple(ids.shape)} after {t0} cached tokens)")
    spec = _block_specs(config, attention)
    x, tok = embedding_forward(ids, wte)                                     # (B, N, E)   1.
    if config.positions == "learned":
        x = x + params["wpe"][t0:t0 + n, :]                                  # 2.
    elif config.positions == "sinusoidal":
        if table is None:                     # the class keeps one; a bare functional call builds it
            table = sinusoidal_positions(config.max_len, config.embed_dim, like=wte)
        x = x + xp.astype(table[t0:t0 + n, :], x.dtype)
    blocks = []
    for i in range(config.num_layers):                                       # 3.
        past = None if kv_cache is None or not kv_cache.layers else kv_cache.layers[i]
        x, c = block_forward(sub(params, f"blocks.{i}."), spec, x, key_mask=key_mask, causal=True,
                             past=past, offset=t0, kv_cache=kv_cache is not None)
        blocks.append(c)
    if kv_cache is not None:
        kv_cache.layers = [(c.attn.k, c.attn.v) for c in blocks]
    h, norm_f = norm_forward(sub(params, "norm_f."), config.norm, x, config.norm_eps)   # 4.
    head_w = wte.mT if config.tie_embeddings else params["lm_head"]          # (E, V)
    logits, head = linear_forward(h, head_w)                                 # (B, N, V)   5. eq. (11.6)
    return logits, GPTCache(tok=tok, blocks=blocks, norm_f=norm_f, head=head, n=n, inference=kv_cache is not None)


def gpt_backward(dlogits, cache: GPTCache, config: GPTConfig) -> dict:
    """Every parameter's gradient, keyed as ``params``. Derivation:
    derivations/11-transformer-block.md, eqs. (11.6)-(11.7)."""
    check_cache(cache, GPTCache, "gpt_forward")
    if len(cache.blocks) != config.num_layers:
        raise ValueError(f"cache holds {len(cache.blocks)} layers; the config has {config.num_layers} "
                         "(a cache from another model?)")
    if cache.inference:
        raise RuntimeError("the last forward used a kv_cache, which is inference only: run a forward "
                           "without kv_cache before backward")
    grads = {}
    dh, dhead_w, _ = linear_backward(dlogits, cache.head)                    # 5. eq. (11.6)
    dx, g = norm_backward(dh, cache.norm_f, config.norm)                     # 4.
    grads.update(prefixed(g, "norm_f."))
    for i in reversed(range(config.num_layers)):                             # 3. last block first
        dx, g = block_backward(dx, cache.blocks[i])
        grads.update(prefixed(g, f"blocks.{i}."))
    xp = namespace(dx=dx)
    if config.positions == "learned":                                        # 2. one use per sequence
        dwpe = xp.zeros((config.max_len, config.embed_dim), dtype=dx.dtype, device=device(dx))
        dwpe[:cache.n, :] = xp.sum(dx, axis=0)                               # (N, E)
        grads["wpe"] = dwpe
    _, dwte = embedding_backward(dx, cache.tok)                              # 1. eq. (9.2)
    if config.tie_embeddings:
        grads["wte"] = dwte + dhead_w.mT                                     # both uses add: eq. (11.7)
    else:
        grads["wte"], grads["lm_head"] = dwte, dhead_w
    return grads


def gpt_param_shapes(config: GPTConfig) -> dict:
    """Every parameter's shape, name -> shape, in the documented key order (what ``gpt_params``
    draws, without drawing it)."""
    e, f, v = config.embed_dim, config.ffn, config.vocab_size
    h, g = config.num_heads, config.num_kv_heads or config.num_heads
    d = e // h
    norm = ("gamma", "beta") if config.norm == "layernorm" else ("gamma",)
    shapes = {"wte": (v, e)}
    if config.positions == "learned":
        shapes["wpe"] = (config.max_len, e)
    for i in range(config.num_layers):
        b = f"blocks.{i}."
        shapes.update({f"{b}norm1.{n}": (e,) for n in norm})
        for x, (w, width) in zip("qkvo", ((e, h * d), (e, g * d), (e, g * d), (h * d, e))):
            shapes[f"{b}attn.w_{x}"] = (w, width)
            if config.bias:
                shapes[f"{b}attn.b_{x}"] = (width,)
        shapes.update({f"{b}norm2.{n}": (e,) for n in norm})
        ffn = [("1", (e, f)), ("2", (f, e))] + ([("3", (e, f))] if config.activation == "swiglu" else [])
        for j, shape in ffn:
            shapes[f"{b}ffn.w_{j}"] = shape
            if config.bias:
                shapes[f"{b}ffn.b_{j}"] = shape[-1:]
    shapes.update({f"norm_f.{n}": (e,) for n in norm})
    if not config.tie_embeddings:
        shapes["lm_head"] = (e, v)
    return shapes


def gpt_params(config: GPTConfig, init: Initializer) -> dict:
    """Freshly initialized weights in the documented key order (scheme: npattn/nn/params.py)."""
    e = config.embed_dim
    h, g = config.num_heads, config.num_kv_heads or config.num_heads
    params = {"wte": init.normal((config.vocab_size, e))}
    if config.positions == "learned":
        params["wpe"] = init.normal((config.max_len, e))
    for i in range(config.num_layers):
        params.update(prefixed(block_params(init, e, h, g, config.ffn, config.norm, config.activation,
                                            config.bias, config.num_layers), f"blocks.{i}."))
    params["norm_f.gamma"] = init.ones((e,))
    if config.norm == "layernorm":
        params["norm_f.beta"] = init.zeros((e,))
    if not config.tie_embeddings:
        params["lm_head"] = init.normal((e, config.vocab_size))
    return params


def check_gpt_params(params, config: GPTConfig, dtype: str) -> dict:
    """Given weights (a loader's, a user's) checked against ``config`` by name: missing, unexpected,
    misshapen or of another dtype is a named error. Returned in the documented key order."""
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a dict name -> array, got {type(params).__name__}")
    shapes = gpt_param_shapes(config)
    missing = sorted(set(shapes) - set(params))
    if missing:
        raise ValueError(f"params is missing weights: {missing}")
    unexpected = sorted(set(params) - set(shapes), key=str)
    if unexpected:
        raise ValueError(f"params has unexpected weights: {unexpected}")
    for name, shape in shapes.items():
        a = params[name]
        if not is_array_api_obj(a):
            raise TypeError(f"params[{name!r}] must be an array, got {type(a).__name__}")
        if tuple(a.shape) != shape:
            raise ValueError(f"params[{name!r}] must have shape {shape}, got {tuple(a.shape)}")
        if str(a.dtype).rsplit(".", 1)[-1] != dtype:
            raise TypeError(f"params[{name!r}] must have dtype {dtype}, got {a.dtype}")
    namespace(**{f"params[{name!r}]": params[name] for name in shapes})     # one library
    return {name: params[name] for name in shapes}


class GPT(Layer):
    """A decoder-only Transformer with hand-derived gradients for every parameter.

    ``forward(ids)`` returns logits; ``backward(dlogits)`` fills ``grads``. Training composes the
    pairs: ``loss, c = cross_entropy_forward(logits, targets)``, then
    ``model.backward(cross_entropy_backward(1.0, c)[0])``.
    """

    def __init__(self, config: GPTConfig, *, attention="naive", dtype="float64", seed=None, params=None):
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")
        self.config = config
        self.attention = _block_specs(config, attention).attn.attention
        self.dtype = check_dtype_name(dtype)
        init = Initializer(seed, self.dtype)                     # checks the seed, given params or not
        params = gpt_params(config, init) if params is None else check_gpt_params(params, config, self.dtype)
        super().__init__(params)
        self._table = None             # the sinusoidal table, built where the weights are (on first use)
        self._hf = None                # "gpt2" or "llama" when loaded from Hugging Face

    def _table_like(self, ids):
        """The sinusoidal table in the weights' array library, device and dtype (None for other
        positions); built on the device, once per place the weights live."""
        if self.config.positions != "sinusoidal":
            return None
        wte = self.params["wte"]
        place = (type(wte), str(device(wte)), str(wte.dtype))
        if self._table is None or self._table[0] != place:
            self._table = (place, sinusoidal_positions(self.config.max_len, self.config.embed_dim, like=wte))
        return self._table[1]

    def forward(self, ids, *, key_mask=None, kv_cache=None):
        """Logits ``(B, N, V)`` for ``ids (B, N)``. ``key_mask (B, N)`` bool marks real tokens;
        ``kv_cache`` (a ``KVCache``) continues after the cached tokens, inference only."""
        logits, self._cache = gpt_forward(self.params, self.config, ids, key_mask=key_mask, kv_cache=kv_cache,
                                          attention=self.attention, table=self._table_like(ids))
        return logits

    def backward(self, dlogits):
        """Fills ``grads`` (every key of ``params``) and returns None."""
        self.grads = self._in_params_order(gpt_backward(dlogits, self._last_cache(), self.config))

    def generate(self, ids, max_new_tokens: int, *, use_cache: bool = True):
        """Greedy decoding: a new ``(B, N + max_new_tokens)`` array of ids of ``ids``' dtype (int64 when
        that dtype cannot hold ``vocab_size - 1``: widened, never wrapped). With the cache each step
        feeds only the new token; without it each step runs the whole sequence. Same tokens either
        way. Does not touch the cache ``backward`` uses. Per layer and head, T tokens after a prompt of
        M0 compute M0^2 + sum_{s=1}^{T-1} (M0 + s) scores with the cache, sum_{s<T} (M0 + s)^2 without:
        derivations/12-kv-cache.md, eq. (12.2)."""
        max_new_tokens = check_int_arg("max_new_tokens", max_new_tokens, minimum=0)
        use_cache = check_flag("use_cache", use_cache)
        xp = namespace(ids=ids, wte=self.params["wte"])
        check_int(xp, "ids", ids)
        if ids.ndim != 2 or ids.shape[1] < 1:
            raise ValueError(f"ids must be 2-D (B, N) with N >= 1, got shape {tuple(ids.shape)}")
        # the tokens come back in the ids' dtype, widened when it cannot hold every token id (uint8
        # ids with 300 tokens would wrap 261 to 5 and feed 5 back)
        dtype = ids.dtype if xp.iinfo(ids.dtype).max >= self.config.vocab_size - 1 else xp.int64
        if self.config.positions != "rope" and ids.shape[1] + max_new_tokens > self.config.max_len:
            raise ValueError(f"{ids.shape[1]} prompt tokens + max_new_tokens={max_new_tokens} exceed "
                             f"max_len={self.config.max_len}")
        table = self._table_like(ids)

        def logits_of(tokens, cache=None):
            return gpt_forward(self.params, self.config, tokens, kv_cache=cache, attention=self.attention,
                               table=table)[0]

        out = xp.astype(ids, dtype, copy=True)                   # a new array, even for 0 new tokens
        cache = KVCache() if use_cache else None
        step_in = out
        for _ in range(max_new_tokens):
            logits = logits_of(step_in, cache) if use_cache else logits_of(out)
            nxt = xp.astype(xp.argmax(logits[:, -1, :], axis=-1), dtype)[:, None]   # (B, 1)
            out = xp.concat((out, nxt), axis=1)
            step_in = nxt
        return out

    # Hugging Face interop lives in npattn/nn/hf.py
    @classmethod
    def from_hf_gpt2(cls, state_dict, *, num_heads, dtype="float64", attention="naive"):
        """A GPT from a Hugging Face ``GPT2LMHeadModel`` state dict (see npattn/nn/hf.py)."""
        from .hf import load_gpt2

        return load_gpt2(cls, state_dict, num_heads=num_heads, dtype=dtype, attention=attention)

    @classmethod
    def from_hf_llama(cls, state_dict, *, num_heads, num_kv_heads, rope_base=10000.0, norm_eps=1e-6,
                      max_len=4096, dtype="float64", attention="naive"):
        """A GPT from a Hugging Face ``LlamaForCausalLM`` state dict (see npattn/nn/hf.py)."""
        from .hf import load_llama

        return load_llama(cls, state_dict, num_heads=num_heads, num_kv_heads=num_kv_heads, rope_base=rope_base,
                          norm_eps=norm_eps, max_len=max_len, dtype=dtype, attention=attention)

    def hf_grads(self) -> dict:
        """``grads`` under the names Hugging Face's ``named_parameters()`` uses, in its layouts
        (GPT-2's fused ``c_attn``, Llama's transposed ``nn.Linear`` weights), as NumPy arrays."""
        from .hf import hf_grads

        return hf_grads(self)
