"""npattn/nn/hf.py: GPT-2 and Llama loaded from Hugging Face state dicts, logits and every gradient
against the Hugging Face model in float64; names, layouts, prefixes and bad state dicts."""

import numpy as np
import pytest

from npattn import GPT, cross_entropy_backward, cross_entropy_forward

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def perturbed(model, seed=0):
    """Move every weight off its init (LayerNorm's 1 and 0, zero biases) so nothing is trivially right."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model.eval()


def gpt2_model(**overrides):
    cfg = transformers.GPT2Config(vocab_size=37, n_positions=16, n_embd=24, n_layer=2, n_head=3, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, **overrides)
    torch.manual_seed(0)
    return perturbed(transformers.GPT2LMHeadModel(cfg).double())


def llama_model(tied=False):
    cfg = transformers.LlamaConfig(vocab_size=41, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   rms_norm_eps=1e-6, tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0,
                                   pad_token_id=0)
    torch.manual_seed(1)
    return perturbed(transformers.LlamaForCausalLM(cfg).double(), seed=1)


def both_losses(hf, model, ids):
    """Next-token loss in float64 on both sides (Hugging Face's own loss upcasts to float32)."""
    out = hf(torch.tensor(ids))
    vocab = out.logits.shape[-1]
    loss_t = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, vocab), torch.tensor(ids[:, 1:]).reshape(-1))
    loss_t.backward()
    logits = model.forward(ids)
    loss, cache = cross_entropy_forward(logits[:, :-1], ids[:, 1:])
    dlogits = np.zeros_like(logits)
    dlogits[:, :-1] = cross_entropy_backward(1.0, cache)[0]
    model.backward(dlogits)
    return out.logits.detach().numpy(), logits, loss_t.item(), float(loss)


def worst_relative(ours: dict, hf_model) -> float:
    theirs = {n: p.grad.numpy() for n, p in hf_model.named_parameters()}
    assert list(ours) == list(theirs)                       # same names, same order
    return max(np.abs(ours[n] - g).max() / np.abs(g).max() for n, g in theirs.items())


def test_gpt2_logits_and_every_gradient_equal_hugging_face():
    hf = gpt2_model()
    model = GPT.from_hf_gpt2(hf.state_dict(), num_heads=3)
    ids = np.random.default_rng(0).integers(0, 37, (2, 11))
    hf_logits, logits, hf_loss, loss = both_losses(hf, model, ids)
    assert np.abs(logits - hf_logits).max() / np.abs(hf_logits).max() < 1e-14     # measured 6e-16
    assert loss == pytest.approx(hf_loss, rel=1e-13)
    assert worst_relative(model.hf_grads(), hf) < 1e-13                            # measured 2e-15


def _float64_llama_internals(monkeypatch):
    """Stock Hugging Face Llama computes RMSNorm, the RoPE table and the eager softmax in float32
    even in a float64 model; patch those three to float64 so the comparison is float64's."""
    mod = transformers.models.llama.modeling_llama

    def rmsnorm(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    def rotary(self, x, position_ids):
        d = self.inv_freq.shape[0] * 2
        inv = 1.0 / (self.config.rope_parameters["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        freqs = position_ids[..., None].double() * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    monkeypatch.setattr(mod.LlamaRMSNorm, "forward", rmsnorm)
    monkeypatch.setattr(mod.LlamaRotaryEmbedding, "forward", rotary)


@pytest.mark.parametrize("tied", [False, True])
def test_llama_logits_and_every_gradient_equal_hugging_face_in_float64(monkeypatch, tied):
    _float64_llama_internals(monkeypatch)
    hf = llama_model(tied)
    hf.config._attn_implementation = "sdpa"                 # softmax in the inputs' dtype
    state = {k: v for k, v in hf.state_dict().items() if not (tied and k == "lm_head.weight")}
    model = GPT.from_hf_llama(state, num_heads=4, num_kv_heads=2)
    assert model.config.tie_embeddings is tied
    ids = np.random.default_rng(1).integers(0, 41, (2, 9))
    hf_logits, logits, hf_loss, loss = both_losses(hf, model, ids)
    assert np.abs(logits - hf_logits).max() / np.abs(hf_logits).max() < 1e-14     # measured 7e-16
    assert loss == pytest.approx(hf_loss, rel=1e-13)
    assert worst_relative(model.hf_grads(), hf) < 1e-13                            # measured 2e-15


def test_stock_llama_agrees_to_float32_precision():
    hf = llama_model()
    model = GPT.from_hf_llama(hf.state_dict(), num_heads=4, num_kv_heads=2)
    ids = np.random.default_rng(2).integers(0, 41, (2, 9))
    hf_logits, logits, _, _ = both_losses(hf, model, ids)
    err = np.abs(logits - hf_logits).max() / np.abs(hf_logits).max()
    assert 1e-12 < err < 1e-5                               # stock HF keeps three steps in float32


def test_loaded_gpt2_generates_what_hugging_face_generates():
    hf = gpt2_model()
    model = GPT.from_hf_gpt2(hf.state_dict(), num_heads=3)
    ids = np.random.default_rng(3).integers(0, 37, (2, 4))
    want = hf.generate(torch.tensor(ids), max_new_tokens=6, do_sample=False, pad_token_id=0,
                       attention_mask=torch.ones(2, 4, dtype=torch.long))
    np.testing.assert_array_equal(model.generate(ids, 6), want.numpy())


def test_state_dict_forms_prefixes_numpy_and_buffers():
    hf = gpt2_model()
    sd = hf.state_dict()
    as_numpy = {k.removeprefix("transformer."): v.numpy() for k, v in sd.items() if k != "lm_head.weight"}
    as_numpy["h.0.attn.bias"] = np.tril(np.ones((1, 1, 16, 16)))       # old checkpoints' mask buffer
    as_numpy["h.0.attn.masked_bias"] = np.array(-1e4)
    a, b = GPT.from_hf_gpt2(sd, num_heads=3), GPT.from_hf_gpt2(as_numpy, num_heads=3, dtype="float32")
    assert b.params["wte"].dtype == np.float32
    np.testing.assert_allclose(b.params["blocks.1.attn.w_v"], a.params["blocks.1.attn.w_v"], rtol=1e-6)
    ll = llama_model().state_dict()
    ll["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    GPT.from_hf_llama({k.removeprefix("model."): v for k, v in ll.items()}, num_heads=4, num_kv_heads=2)


def test_bad_state_dicts():
    sd = dict(gpt2_model().state_dict())
    broken = {k: v for k, v in sd.items() if k != "transformer.h.1.mlp.c_fc.bias"}
    with pytest.raises(ValueError, match=r"missing weights: \['h.1.mlp.c_fc.bias'\]"):
        GPT.from_hf_gpt2(broken, num_heads=3)
    with pytest.raises(ValueError, match=r"unexpected weights: \['h.0.attn.extra'\]"):
        GPT.from_hf_gpt2({**sd, "transformer.h.0.attn.extra": torch.ones(2)}, num_heads=3)
    with pytest.raises(ValueError, match=r"'h.0.attn.c_proj.weight' must have shape \(24, 24\), got \(24, 23\)"):
        GPT.from_hf_gpt2({**sd, "transformer.h.0.attn.c_proj.weight": torch.ones(24, 23)}, num_heads=3)
    with pytest.raises(ValueError, match="'lm_head.weight' must equal 'wte.weight'"):
        GPT.from_hf_gpt2({**sd, "lm_head.weight": torch.zeros(37, 24)}, num_heads=3)
    with pytest.raises(ValueError, match="embed_dim must be divisible by num_heads"):
        GPT.from_hf_gpt2(sd, num_heads=5)
    ll = llama_model().state_dict()
    with pytest.raises(ValueError, match="num_kv_heads must divide"):
        GPT.from_hf_llama(ll, num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match=r"'layers.0.self_attn.k_proj.weight' must have shape \(32, 32\)"):
        GPT.from_hf_llama(ll, num_heads=4, num_kv_heads=4)
    with pytest.raises(ValueError, match="missing weights"):
        GPT.from_hf_llama(sd, num_heads=4, num_kv_heads=2)
    with pytest.raises(ValueError, match="hf_grads\\(\\) needs a model built by"):
        GPT.from_hf_gpt2(sd, num_heads=3).__class__(GPT.from_hf_gpt2(sd, num_heads=3).config).hf_grads()


def test_loaded_params_are_in_a_fresh_models_order():
    from npattn import GPTConfig

    model = GPT.from_hf_llama(llama_model().state_dict(), num_heads=4, num_kv_heads=2)
    fresh = GPT(model.config)
    assert list(model.params) == list(fresh.params)
    gpt2 = GPT.from_hf_gpt2(gpt2_model().state_dict(), num_heads=3)
    assert list(gpt2.params) == list(GPT(gpt2.config).params)
    assert isinstance(gpt2.config, GPTConfig) and gpt2.config.ffn == 96
