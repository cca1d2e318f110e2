"""npattn/nn/gpt.py: the GPT's gradients (every weight), tied vs untied heads, the KV cache
(chunked forward == full forward, positions continue), greedy generation, bad input."""

import numpy as np
import pytest

from npattn import GPT, GPTConfig, KVCache, cross_entropy_backward, cross_entropy_forward, gradcheck
from npattn.checks import gpt_case_inputs

CONFIGS = {
    "gpt2": GPTConfig(vocab_size=13, max_len=12, embed_dim=8, num_heads=2, num_layers=2, ffn_dim=12),
    "llama": GPTConfig(vocab_size=13, max_len=12, embed_dim=8, num_heads=4, num_kv_heads=2, num_layers=2,
                       ffn_dim=12, norm="rmsnorm", activation="swiglu", positions="rope", bias=False,
                       tie_embeddings=False, norm_eps=1e-6),
    "sinusoidal": GPTConfig(vocab_size=13, max_len=12, embed_dim=6, num_heads=3, num_kv_heads=1, num_layers=2,
                            activation="gelu", positions="sinusoidal"),
}


def random_gpt(rng, name, attention="naive"):
    model = GPT(CONFIGS[name], seed=3, attention=attention)
    for key, a in list(model.params.items()):
        model.params[key] = a + 0.3 * rng.standard_normal(a.shape)
    return model


@pytest.mark.parametrize("name", CONFIGS)
def test_gradcheck_every_weight(rng, name):
    forward, backward, inputs, kw, atol = gpt_case_inputs(rng, CONFIGS[name], 2, 5)
    report = gradcheck(forward, backward, inputs, kwargs=kw, mode="directional", atol=atol)
    assert report.ok, report
    assert len(report.rows) == len(inputs) - 1                          # every weight, not the ids


def test_tied_gradient_is_the_sum_of_both_uses(rng):
    tied = random_gpt(rng, "gpt2")
    untied = GPT(GPTConfig(**{**CONFIGS["gpt2"].__dict__, "tie_embeddings": False}), seed=0)
    for key in tied.params:
        untied.params[key] = tied.params[key]
    untied.params["lm_head"] = np.ascontiguousarray(tied.params["wte"].T)
    ids, dlogits = rng.integers(0, 13, (2, 6)), rng.standard_normal((2, 6, 13))
    np.testing.assert_allclose(tied.forward(ids), untied.forward(ids), rtol=1e-14)
    tied.backward(dlogits)
    untied.backward(dlogits)
    np.testing.assert_allclose(tied.grads["wte"], untied.grads["wte"] + untied.grads["lm_head"].T, rtol=1e-12)
    assert list(tied.grads) == list(tied.params)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("attention", ["naive", "flash"])
def test_chunked_kv_cache_forward_equals_full_forward(rng, name, attention):
    model = random_gpt(rng, name, attention)
    ids = rng.integers(0, 13, (2, 9))
    full = model.forward(ids)
    cache = KVCache()
    chunks = [model.forward(ids[:, a:b], kv_cache=cache) for a, b in ((0, 4), (4, 5), (5, 9))]
    assert len(cache) == 9 and cache.batch == 2
    np.testing.assert_allclose(np.concatenate(chunks, axis=1), full, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("name", CONFIGS)
def test_generate_same_tokens_with_and_without_cache(rng, name):
    model = random_gpt(rng, name)
    ids = rng.integers(0, 13, (3, 4)).astype(np.int32)
    with_cache = model.generate(ids, 6)
    assert with_cache.shape == (3, 10) and with_cache.dtype == np.int32
    np.testing.assert_array_equal(with_cache, model.generate(ids, 6, use_cache=False))
    np.testing.assert_array_equal(with_cache[:, :4], ids)
    # greedy by definition: each new token is the argmax of the full forward's last logits
    for t in range(4, 10):
        assert np.all(with_cache[:, t] == model.forward(with_cache[:, :t])[:, -1].argmax(-1))


def test_generate_does_not_touch_the_training_cache(rng):
    model = random_gpt(rng, "gpt2")
    ids = rng.integers(0, 13, (2, 5))
    logits = model.forward(ids)
    model.generate(ids[:, :2], 3)
    model.backward(np.ones_like(logits))                      # still the forward above: no error
    assert model.grads["wte"].shape == (13, 8)


def test_training_step_lowers_the_loss(rng):
    from npattn import AdamW

    model = GPT(CONFIGS["llama"], seed=0)
    ids = rng.integers(0, 13, (4, 8))
    opt = AdamW(model.params, lr=3e-2, weight_decay=0.0)
    losses = []
    for _ in range(12):
        loss, cache = cross_entropy_forward(model.forward(ids[:, :-1]), ids[:, 1:])
        model.backward(cross_entropy_backward(1.0, cache)[0])
        opt.step(model.grads)
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0], losses


def test_bad_input(rng):
    model = random_gpt(rng, "gpt2")
    ids = rng.integers(0, 13, (2, 5))
    cache = KVCache()
    model.forward(ids, kv_cache=cache)
    with pytest.raises(RuntimeError, match="inference only"):
        model.backward(np.ones((2, 5, 13)))
    with pytest.raises(ValueError, match="key_mask with a kv_cache"):
        model.forward(ids, key_mask=np.ones((2, 5), bool), kv_cache=KVCache())
    with pytest.raises(ValueError, match="exceed max_len=12"):
        model.forward(rng.integers(0, 13, (2, 8)), kv_cache=cache)
    with pytest.raises(ValueError, match="batch 3 but the kv_cache holds batch 2"):
        model.forward(rng.integers(0, 13, (3, 1)), kv_cache=cache)
    with pytest.raises(ValueError, match=r"ids must be in \[0, 13\)"):
        model.forward(np.array([[0, 13]]))
    with pytest.raises(TypeError, match="ids must be an integer array"):
        model.forward(np.zeros((1, 2)))
    with pytest.raises(ValueError, match="ids must be 2-D"):
        model.forward(np.zeros(3, dtype=int))
    with pytest.raises(ValueError, match="exceed max_len=12"):
        model.generate(ids, 8)
    with pytest.raises(ValueError, match="positions must be one of"):
        GPTConfig(vocab_size=5, max_len=4, embed_dim=4, num_heads=2, num_layers=1, positions="alibi")
    with pytest.raises(ValueError, match="embed_dim must be divisible by num_heads"):
        GPTConfig(vocab_size=5, max_len=4, embed_dim=6, num_heads=4, num_layers=1)
    with pytest.raises(TypeError, match="config must be a GPTConfig"):
        GPT(dict(vocab_size=5))
