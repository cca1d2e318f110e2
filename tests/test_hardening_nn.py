"""Issue 22, the model side: what an outside probe and a mutation test found in the layers, the GPT,
the optimizers, the training step and the loaders (SPEC.md, "Errors" and "Layers").

Each finding has a test that failed on the code before the fix; each mutation survivor has a test
that fails with that bug planted (the planted form is named in the test's docstring)."""

import numpy as np
import pytest

from npattn import (
    GPT,
    SGD,
    AdamW,
    GPTConfig,
    KVCache,
    MultiHeadAttention,
    TransformerBlock,
    clip_grad_norm,
)
from npattn.nn.hf import _gpt2_map
from npattn.nn.mha import combine_masks
from npattn.nn.params import Params
from npattn.train import train_step

SMALL = dict(vocab_size=13, max_len=6, embed_dim=8, num_heads=2, num_layers=2, ffn_dim=12)


def small_gpt(seed=0, **overrides):
    return GPT(GPTConfig(**{**SMALL, **overrides}), seed=seed)


# --- generate: ids that fit, a new array -------------------------------------------------------

def model_preferring_261():
    """A vocabulary of 300 whose greedy choice is always token 261 (> 255, uint8's largest)."""
    model = GPT(GPTConfig(vocab_size=300, max_len=8, embed_dim=8, num_heads=2, num_layers=1, tie_embeddings=False))
    beta = np.ones(8)
    model.params["norm_f.beta"] = beta                      # h . 1 = E after the final LayerNorm
    head = np.array(model.params["lm_head"])
    head[:, 261] = 10.0                                     # so logit 261 = 80 beats every other by far
    model.params["lm_head"] = head
    return model


def test_generate_widens_ids_too_narrow_for_the_vocabulary():
    """uint8 ids with a vocabulary of 300: token 261 must come back as 261 (it wrapped to 5)."""
    model = model_preferring_261()
    prompt = np.array([[1, 2], [3, 4]], dtype=np.uint8)
    for use_cache in (True, False):
        out = model.generate(prompt, 3, use_cache=use_cache)
        assert np.iinfo(out.dtype).max >= 299, out.dtype                  # widened, never wrapped
        np.testing.assert_array_equal(out, [[1, 2, 261, 261, 261], [3, 4, 261, 261, 261]])
    assert prompt.dtype == np.uint8 and prompt.tolist() == [[1, 2], [3, 4]]
    wide = model.generate(prompt.astype(np.int32), 1)
    assert wide.dtype == np.int32                                         # wide enough: kept


def test_generate_widens_on_every_backend(backend):
    model = model_preferring_261().to(backend.xp, backend.device_name)
    out = model.generate(backend.asarray(np.array([[1, 2]], dtype=np.uint8)), 2)
    assert out.dtype == backend.xp.int64
    np.testing.assert_array_equal(backend.numpy(out), [[1, 2, 261, 261]])


def test_generate_zero_new_tokens_returns_a_new_array():
    model = small_gpt()
    ids = np.array([[1, 2, 3]])
    out = model.generate(ids, 0)
    assert out is not ids and not np.shares_memory(out, ids)
    np.testing.assert_array_equal(out, ids)
    out[0, 0] = 7
    assert ids[0, 0] == 1


# --- clip_grad_norm: float64 accumulation, each dtype kept --------------------------------------

# torch.nn.utils.clip_grad_norm_ on these float16 gradients (torch 2.x): total 505.5 (float16), and
# the clipped entries below. 300^2 = 90000 > 65504 = float16's max, so squaring in float16 overflows.
F16_PROBE = {"a": [300.0, 300.0], "b": [275.0]}
F16_TORCH_TOTAL = 505.5


def test_clip_grad_norm_float16_near_300_does_not_overflow():
    grads = {k: np.array(v, dtype=np.float16) for k, v in F16_PROBE.items()}
    total = clip_grad_norm(grads, 1.0)
    assert np.isfinite(float(total))
    # the float64 norm is 505.59...; in float16 (the gradients' dtype, as torch returns it) 505.5
    assert float(total) == F16_TORCH_TOTAL
    assert all(g.dtype == np.float16 for g in grads.values())
    exact = {k: np.array(v) / np.sqrt(300.0**2 * 2 + 275.0**2) for k, v in F16_PROBE.items()}
    for k in grads:                                  # one rounding to float16 (2^-11) plus coef's: 2^-10
        np.testing.assert_allclose(grads[k].astype(np.float64), exact[k], rtol=2.0**-10)


def test_clip_grad_norm_float16_matches_torch():
    torch = pytest.importorskip("torch")
    tensors = []
    for v in F16_PROBE.values():
        t = torch.zeros(len(v), dtype=torch.float16, requires_grad=True)
        t.grad = torch.tensor(v, dtype=torch.float16)
        tensors.append(t)
    want = torch.nn.utils.clip_grad_norm_(tensors, 1.0)
    assert want.item() == F16_TORCH_TOTAL
    grads = {k: np.array(v, dtype=np.float16) for k, v in F16_PROBE.items()}
    assert float(clip_grad_norm(grads, 1.0)) == want.item()
    for t, g in zip(tensors, grads.values()):        # torch rounds its coefficient to float16: 1 ulp apart
        np.testing.assert_allclose(g.astype(np.float64), t.grad.double().numpy(), rtol=2.0**-10)


def test_clip_grad_norm_keeps_each_gradient_dtype():
    params = Params(a=np.zeros(2, np.float32), b=np.zeros(2))
    grads = {"a": np.array([3.0, 4.0], np.float32), "b": np.array([12.0, 0.0])}
    total = clip_grad_norm(grads, 1.0)
    assert float(total) == 13.0                       # sqrt(169) in float64: exact
    assert grads["a"].dtype == np.float32 and grads["b"].dtype == np.float64
    coef = 1.0 / (13.0 + 1e-6)                        # torch's max_norm / (total + 1e-6)
    np.testing.assert_allclose(grads["a"], [3 * coef, 4 * coef], rtol=2.0**-22)   # float32: two roundings of 2^-24
    np.testing.assert_allclose(grads["b"], [12 * coef, 0.0], rtol=2.0**-50)       # float64: a few of 2^-53
    AdamW(params).step(grads)                        # failed before: a float64 gradient for float32 weights
    assert params["a"].dtype == np.float32


def test_clip_grad_norm_and_adamw_on_every_backend(backend):
    """float64 accumulation and per-gradient dtypes through the array API only (no host trips)."""
    xp = backend.xp
    params = Params(a=backend.asarray(np.zeros(2, np.float32)), b=backend.asarray(np.zeros(2)))
    grads = {"a": backend.asarray(np.array([3.0, 4.0], np.float32)), "b": backend.asarray(np.array([12.0, 0.0]))}
    total = clip_grad_norm(grads, 1.0)
    assert total.dtype == xp.float64 and grads["a"].dtype == xp.float32 and grads["b"].dtype == xp.float64
    AdamW(params, lr=0.1).step(grads)
    assert params["a"].dtype == xp.float32
    assert float(backend.numpy(total)) == 13.0                                 # sqrt(169) in float64: exact
    coef = 1.0 / (13.0 + 1e-6)                                                 # torch's max_norm / (total + 1e-6)
    np.testing.assert_allclose(backend.numpy(grads["a"]), [3 * coef, 4 * coef], rtol=2.0**-22)   # float32: two roundings


def test_clip_grad_norm_and_optimizers_refuse_a_list():
    grads = [np.ones(2)]
    with pytest.raises(TypeError, match="grads must be a dict name -> array, got list"):
        clip_grad_norm(grads, 1.0)
    with pytest.raises(TypeError, match="params must be a dict name -> array .*got list"):
        SGD([np.ones(2)], lr=0.1)
    with pytest.raises(TypeError, match="params must be a dict name -> array .*got list"):
        AdamW([np.ones(2)])
    with pytest.raises(TypeError, match="grads must be a dict name -> array, got list"):
        AdamW(Params(w=np.ones(2))).step(grads)


# --- nothing half done: optimizers and params.update check every gradient first ---------------

@pytest.mark.parametrize("make", [lambda p: SGD(p, lr=0.1, momentum=0.9), lambda p: AdamW(p, lr=0.1)])
@pytest.mark.parametrize("bad", ["dtype", "not an array", "shape"])
def test_optimizer_checks_every_gradient_before_updating_any(make, bad):
    params = Params(a=np.ones(3), b=np.ones(2))
    opt = make(params)
    opt.step({"a": np.full(3, 0.5), "b": np.full(2, 0.5)})          # some state to keep
    before = {k: v.copy() for k, v in params.items()}
    state = {k: [np.copy(x) if hasattr(x, "shape") else x for x in (v if isinstance(v, tuple) else (v,))]
             for k, v in opt.state.items()}
    wrong = {"dtype": np.ones(2, np.float32), "not an array": [1.0, 1.0], "shape": np.ones(3)}[bad]
    with pytest.raises((TypeError, ValueError), match=r"grads\['b'\]"):
        opt.step({"a": np.full(3, 0.5), "b": wrong})
    for k in params:                                                   # a updated before b failed
        np.testing.assert_array_equal(params[k], before[k])
    for k, v in opt.state.items():
        saved = state[k]
        got = v if isinstance(v, tuple) else (v,)
        assert all(np.array_equal(x, y) for x, y in zip(got, saved))


def test_params_update_is_all_or_nothing():
    params = Params(a=np.ones(3), b=np.ones(2))
    a0 = params["a"]
    with pytest.raises(TypeError, match=r"params\['b'\] must keep its dtype float64, got float32"):
        params.update({"a": np.zeros(3), "b": np.zeros(2, np.float32)})
    assert params["a"] is a0
    with pytest.raises(KeyError, match="unknown parameter 'c'"):
        params.update(a=np.zeros(3), c=np.zeros(1))
    assert params["a"] is a0
    params.update(a=np.zeros(3), b=np.zeros(2))
    assert not params["a"].any() and not params["b"].any()


# --- constructors check every argument when called ---------------------------------------------

@pytest.mark.parametrize("make,exc,match", [
    (lambda: TransformerBlock(8, 2, norm_eps=-1), ValueError, "norm_eps must be a finite real number >= 0, got -1"),
    (lambda: TransformerBlock(8, 2, rope=True, rope_base=0), ValueError, "rope_base must be a finite real number > 0, got 0"),
    (lambda: MultiHeadAttention(8, 2, rope_base=0), ValueError, "rope_base must be a finite real number > 0, got 0"),
    (lambda: TransformerBlock(8, 2, ffn_dim=0), ValueError, "ffn_dim must be >= 1, got 0"),
    (lambda: MultiHeadAttention(8, 2, kdim=0), ValueError, "kdim must be >= 1, got 0"),
    (lambda: MultiHeadAttention(8, 2, vdim=0), ValueError, "vdim must be >= 1, got 0"),
    (lambda: MultiHeadAttention(8, 2, seed=-1), ValueError, "seed must be >= 0, got -1"),
    (lambda: MultiHeadAttention(8, 2, kdim=-3), ValueError, "kdim must be >= 1, got -3"),
    (lambda: TransformerBlock(8, 2, ffn_dim=2.5), TypeError, "ffn_dim must be an int or None, got 2.5"),
    (lambda: MultiHeadAttention(8, 2, rope_base="10000"), TypeError, "rope_base must be a real number, got '10000'"),
    (lambda: MultiHeadAttention(8.0, 2), TypeError, "embed_dim must be an int, got 8.0"),
    (lambda: MultiHeadAttention("8", 2), TypeError, "embed_dim must be an int, got '8'"),
    (lambda: MultiHeadAttention(8, True), TypeError, "num_heads must be an int, got True"),
    (lambda: MultiHeadAttention(8, 2, num_kv_heads=1.0), TypeError, "num_kv_heads must be an int or None, got 1.0"),
    (lambda: MultiHeadAttention(8, 2, bias="no"), TypeError, "bias must be a bool, got 'no'"),
    (lambda: MultiHeadAttention(2**70, 2), ValueError, r"embed_dim must be at most 2\*\*63 - 1, got 1180591620717411303424"),
    (lambda: MultiHeadAttention(8, 2**70), ValueError, r"num_heads must be at most 2\*\*63 - 1"),
    (lambda: TransformerBlock(8, 2, ffn_dim=2**70), ValueError, r"ffn_dim must be at most 2\*\*63 - 1"),
    (lambda: TransformerBlock(8, 2, norm_eps=float("nan")), ValueError, "norm_eps must be a finite real number >= 0"),
    (lambda: TransformerBlock(8, 2, norm=["layernorm"]), ValueError, "norm must be one of"),
    (lambda: GPTConfig(**{**SMALL, "vocab_size": 13.0}), TypeError, "vocab_size must be an int, got 13.0"),
    (lambda: GPTConfig(**{**SMALL, "max_len": 0}), ValueError, "max_len must be >= 1, got 0"),
    (lambda: GPTConfig(**{**SMALL, "ffn_dim": 0}), ValueError, "ffn_dim must be >= 1, got 0"),
    (lambda: GPTConfig(**{**SMALL, "norm_eps": -1}), ValueError, "norm_eps must be a finite real number >= 0"),
    (lambda: GPTConfig(**{**SMALL, "rope_base": 0, "positions": "rope"}), ValueError, "rope_base must be"),
    (lambda: GPTConfig(**{**SMALL, "tie_embeddings": "yes"}), TypeError, "tie_embeddings must be a bool"),
    (lambda: GPT(GPTConfig(**SMALL), seed=-1), ValueError, "seed must be >= 0, got -1"),
    (lambda: GPT(GPTConfig(**SMALL), seed=1.5), TypeError, "seed must be an int or None, got 1.5"),
    (lambda: SGD(Params(w=np.ones(2)), lr="0.1"), TypeError, "lr must be a real number, got '0.1'"),
])
def test_constructors_check_every_argument_at_call_time(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_numpy_integers_work_where_python_ints_do(rng):
    layer = MultiHeadAttention(np.int64(8), np.int32(2), num_kv_heads=np.int16(1), kdim=np.uint8(6),
                               vdim=np.int64(5), seed=np.int64(3))
    ref = MultiHeadAttention(8, 2, num_kv_heads=1, kdim=6, vdim=5, seed=3)
    for k in ref.params:
        np.testing.assert_array_equal(layer.params[k], ref.params[k])
    x = rng.standard_normal((2, 3, 8))
    out = layer.forward(x, rng.standard_normal((2, 4, 6)), rng.standard_normal((2, 4, 5)))
    assert out.shape == (2, 3, 8)
    block = TransformerBlock(np.int64(8), np.int64(2), ffn_dim=np.int64(12), seed=np.uint16(1))
    assert block.params["ffn.w_1"].shape == (8, 12)
    config = GPTConfig(**{k: np.int64(v) for k, v in SMALL.items()})
    assert config == GPTConfig(**SMALL) and type(config.vocab_size) is int
    model = GPT(config, seed=np.int64(0))
    assert model.generate(np.array([[1, 2]]), np.int64(2)).shape == (1, 4)


def test_a_huge_seed_means_what_it_says():
    a, b = MultiHeadAttention(8, 2, seed=2**70), MultiHeadAttention(8, 2, seed=2**70 + 1)
    assert not np.array_equal(a.params["w_q"], b.params["w_q"])
    np.testing.assert_array_equal(a.params["w_q"], MultiHeadAttention(8, 2, seed=2**70).params["w_q"])


def test_gpt_params_are_checked_by_name():
    config = GPTConfig(**SMALL)
    with pytest.raises(ValueError, match=r"params is missing weights: \['blocks.0.attn.b_k'"):
        GPT(config, params={})
    good = dict(GPT(config).params)
    with pytest.raises(ValueError, match=r"params has unexpected weights: \['extra'\]"):
        GPT(config, params={**good, "extra": np.ones(2)})
    with pytest.raises(ValueError, match=r"params\['wte'\] must have shape \(13, 8\), got \(12, 8\)"):
        GPT(config, params={**good, "wte": np.ones((12, 8))})
    with pytest.raises(TypeError, match=r"params\['wte'\] must have dtype float64, got float32"):
        GPT(config, params={**good, "wte": np.ones((13, 8), np.float32)})
    with pytest.raises(TypeError, match="params must be a dict name -> array, got list"):
        GPT(config, params=list(good.values()))
    shuffled = dict(reversed(list(good.items())))
    assert list(GPT(config, params=shuffled).params) == list(good)     # the documented order


# --- foreign KV caches and caches ----------------------------------------------------------------

def test_a_kv_cache_from_another_model_is_a_named_error(rng):
    ids = rng.integers(0, 13, (2, 2))
    deep, shallow = small_gpt(num_layers=3), small_gpt(num_layers=2)
    cache = KVCache()
    deep.forward(ids, kv_cache=cache)
    with pytest.raises(ValueError, match="kv_cache holds 3 layers; this model has 2"):
        shallow.forward(ids, kv_cache=cache)                            # was IndexError / silent
    wide = small_gpt(embed_dim=12, num_heads=2)
    with pytest.raises(ValueError, match=r"kv_cache holds keys of shape \(2, 2, 2, 6\).*\(B, G, M, D\) = \(2, 2, M, 4\)"):
        small_gpt().forward(ids, kv_cache=_filled(wide, ids))           # was concatenate's message
    single = small_gpt()
    f32 = GPT(GPTConfig(**SMALL), dtype="float32")
    f64_cache = _filled(small_gpt(), ids)
    layers = list(f64_cache.layers)
    with pytest.raises(TypeError, match="kv_cache holds float64 keys; this model's weights are float32"):
        f32.forward(ids, kv_cache=f64_cache)                            # was a silent float64 promotion
    assert f64_cache.layers == layers and len(f64_cache) == 2           # left as it was
    with pytest.raises(TypeError, match="kv_cache must be a KVCache, got dict"):
        single.forward(ids, kv_cache={})


def _filled(model, ids):
    cache = KVCache()
    model.forward(ids, kv_cache=cache)
    return cache


def test_a_cache_from_another_layer_is_a_named_error(rng):
    from npattn.nn.block import block_backward
    from npattn.nn.gpt import gpt_backward
    from npattn.nn.mha import mha_backward

    x = rng.standard_normal((2, 3, 8))
    mha = MultiHeadAttention(8, 2)
    mha.forward(x)
    block = TransformerBlock(8, 2)
    block.forward(x)
    with pytest.raises(TypeError, match="cache must be the MHACache returned by mha_forward, got BlockCache"):
        mha_backward(x, block._cache)
    with pytest.raises(TypeError, match="cache must be the BlockCache returned by block_forward, got MHACache"):
        block_backward(x, mha._cache)
    deep, shallow = small_gpt(num_layers=3), small_gpt(num_layers=2)
    deep.forward(np.array([[1, 2]]))
    with pytest.raises(ValueError, match="cache holds 3 layers; the config has 2"):
        gpt_backward(np.zeros((1, 2, 13)), deep._cache, shallow.config)


# --- mutation survivors -----------------------------------------------------------------------------

def test_float_mask_with_key_mask_keeps_the_mask_where_keys_are_real(rng):
    """Planted: ``xp.where(km, neg_inf, mask)`` (arguments swapped) in combine_masks."""
    mask = rng.standard_normal((3, 4))
    key_mask = np.array([[True, True, False, True], [True, False, True, True]])
    combined = combine_masks(np, mask, key_mask, like=mask)
    want = np.where(key_mask[:, None, None, :], mask, -np.inf)
    np.testing.assert_array_equal(combined, want)
    layer = MultiHeadAttention(8, 2, seed=1)
    x, k = rng.standard_normal((2, 3, 8)), rng.standard_normal((2, 4, 8))
    out = layer.forward(x, k, k, mask=mask, key_mask=key_mask)
    np.testing.assert_array_equal(out, layer.forward(x, k, k, mask=want))   # the same mask: the same numbers
    assert np.all(layer.last_weights[0, :, :, 2] == 0) and np.all(layer.last_weights[1, :, :, 1] == 0)


@pytest.mark.parametrize("kind", ["mha", "block", "gpt"])
def test_grads_hold_only_the_last_backward(rng, kind):
    """Planted: grads added to the previous backward's (``self.grads[k] = self.grads.get(k, 0) + g``)."""
    if kind == "gpt":
        a, b = small_gpt(seed=2), small_gpt(seed=2)
        x1, x2 = rng.integers(0, 13, (2, 4)), rng.integers(0, 13, (2, 4))
        d1, d2 = rng.standard_normal((2, 4, 13)), rng.standard_normal((2, 4, 13))
    else:
        make = (lambda: MultiHeadAttention(8, 2, seed=2)) if kind == "mha" else (lambda: TransformerBlock(8, 2, seed=2))
        a, b = make(), make()
        x1, x2 = rng.standard_normal((2, 3, 8)), rng.standard_normal((2, 3, 8))
        d1, d2 = rng.standard_normal((2, 3, 8)), rng.standard_normal((2, 3, 8))
    a.forward(x1)
    a.backward(d1)
    a.forward(x2)
    a.backward(d2)
    b.forward(x2)
    b.backward(d2)
    assert list(a.grads) == list(b.grads) == list(a.params)
    for k in a.grads:
        np.testing.assert_array_equal(a.grads[k], b.grads[k])


def test_train_step_checks_its_arguments_before_running(rng):
    model = small_gpt()
    x, y = rng.integers(0, 13, (2, 5)), rng.integers(0, 13, (2, 5))
    opt = SGD(model.params, lr=0.1)
    with pytest.raises(ValueError, match="max_norm must be a finite real number >= 0, got -1.0"):
        train_step(model, opt, x, y, max_norm=-1.0)
    with pytest.raises(TypeError, match="ignore_index must be an int, got 0.5"):
        train_step(model, opt, x, y, ignore_index=0.5)
    with pytest.raises(TypeError, match="opt must be an optimizer with a step"):
        train_step(model, model.params, x, y)
    assert model.grads == {} and model._cache is None                   # nothing ran


def test_train_step_clips_before_the_optimizer_step(rng):
    """Planted: ``opt.step(model.grads)`` before ``clip_grad_norm(model.grads, max_norm)``. With SGD
    at lr 1 the update is exactly the clipped gradient, whose global norm is max_norm."""
    model = small_gpt(seed=4)
    before = {k: v.copy() for k, v in model.params.items()}
    x, y = rng.integers(0, 13, (2, 5)), rng.integers(0, 13, (2, 5))
    result = train_step(model, SGD(model.params, lr=1.0), x, y, max_norm=1e-3)
    assert result.grad_norm > 1e-2                                      # so clipping did something
    step = {k: before[k] - model.params[k] for k in before}
    norm = np.sqrt(sum(np.sum(s * s) for s in step.values()))
    assert norm == pytest.approx(1e-3, rel=1e-6)
    for k in step:                                    # p - (p - g) is g up to p's rounding: |p| <= 1, 2^-52
        np.testing.assert_allclose(step[k], model.grads[k], rtol=0, atol=2.0**-52)


@pytest.mark.parametrize("positions", ["learned", "sinusoidal"])
def test_max_len_is_exact(rng, positions):
    """Planted: ``t0 + n >= max_len`` (refuses a full-length sequence) or ``> max_len + 1``."""
    model = small_gpt(positions=positions)                              # max_len = 6
    full = rng.integers(0, 13, (2, 6))
    logits = model.forward(full)                                        # exactly max_len: fine
    assert logits.shape == (2, 6, 13)
    with pytest.raises(ValueError, match="positions 0..6 exceed max_len=6"):
        model.forward(rng.integers(0, 13, (2, 7)))
    cache = KVCache()
    chunks = [model.forward(full[:, :5], kv_cache=cache), model.forward(full[:, 5:], kv_cache=cache)]
    # the same sums of O(1) terms in another grouping (matmul shapes differ): a few ulps each, and
    # 1e-12 is ~4500 ulp; atol for logits near 0
    np.testing.assert_allclose(np.concatenate(chunks, 1), logits, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="positions 6..6 exceed max_len=6"):
        model.forward(full[:, :1], kv_cache=cache)
    assert len(cache) == 6
    assert model.generate(full[:, :2], 4).shape == (2, 6)
    with pytest.raises(ValueError, match="exceed max_len=6"):
        model.generate(full[:, :2], 5)


# --- a state dict with the same weight under two names ---------------------------------------------

def gpt2_state_dict(model, prefix="transformer."):
    """Our GPT-2-shaped params under Hugging Face's names (the inverse of the loader's map)."""
    state = {}
    for hf, ours, how in _gpt2_map(model.config.num_layers):
        parts = [model.params[n] for n in ours]
        state[prefix + hf] = np.concatenate(parts, -1) if how == "split3" else parts[0]
    return state


def test_a_state_dict_with_a_weight_under_two_names_is_refused():
    model = small_gpt()
    state = gpt2_state_dict(model)
    loaded = GPT.from_hf_gpt2(state, num_heads=2)
    np.testing.assert_array_equal(loaded.params["wte"], model.params["wte"])
    other = np.zeros_like(model.params["wte"])
    with pytest.raises(ValueError, match=r"duplicated.*'transformer.wte.weight' and 'wte.weight'"):
        GPT.from_hf_gpt2({**state, "wte.weight": other}, num_heads=2)
    with pytest.raises(ValueError, match=r"duplicated.*'transformer.wte.weight' and 'wte.weight'"):
        GPT.from_hf_gpt2({**state, "wte.weight": state["transformer.wte.weight"]}, num_heads=2)
    llama = GPT(GPTConfig(vocab_size=13, max_len=8, embed_dim=8, num_heads=2, num_layers=1, norm="rmsnorm",
                          activation="swiglu", positions="rope", bias=False, ffn_dim=12))
    sd = {"model.embed_tokens.weight": llama.params["wte"], "model.norm.weight": llama.params["norm_f.gamma"]}
    b = "blocks.0."
    sd.update({f"model.layers.0.self_attn.{x}_proj.weight": llama.params[b + f"attn.w_{x}"].T for x in "qkvo"})
    sd.update({"model.layers.0.mlp.gate_proj.weight": llama.params[b + "ffn.w_1"].T,
               "model.layers.0.mlp.up_proj.weight": llama.params[b + "ffn.w_3"].T,
               "model.layers.0.mlp.down_proj.weight": llama.params[b + "ffn.w_2"].T,
               "model.layers.0.input_layernorm.weight": llama.params[b + "norm1.gamma"],
               "model.layers.0.post_attention_layernorm.weight": llama.params[b + "norm2.gamma"]})
    GPT.from_hf_llama(sd, num_heads=2, num_kv_heads=2, max_len=8)
    with pytest.raises(ValueError, match=r"duplicated.*'model.norm.weight' and 'norm.weight'"):
        GPT.from_hf_llama({**sd, "norm.weight": sd["model.norm.weight"]}, num_heads=2, num_kv_heads=2)


def test_loaders_check_their_arguments():
    state = gpt2_state_dict(small_gpt())
    with pytest.raises(TypeError, match="num_heads must be an int, got 2.0"):
        GPT.from_hf_gpt2(state, num_heads=2.0)
    assert GPT.from_hf_gpt2(state, num_heads=np.int64(2)).config.num_heads == 2
    with pytest.raises(TypeError, match="state_dict must be a mapping name -> array, got list"):
        GPT.from_hf_gpt2(list(state.values()), num_heads=2)
    with pytest.raises(ValueError, match="dtype must be 'float64' or 'float32'"):
        GPT.from_hf_gpt2(state, num_heads=2, dtype="float16")
    with pytest.raises(ValueError, match="norm_eps must be a finite real number >= 0"):
        GPT.from_hf_llama({}, num_heads=2, num_kv_heads=2, norm_eps=-1.0)
