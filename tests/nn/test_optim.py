"""npattn/nn/optim.py: SGD, AdamW and clip_grad_norm step for step against torch; bad input."""

import numpy as np
import pytest

from npattn import SGD, AdamW, clip_grad_norm
from npattn.nn.params import Params


def make(rng):
    return Params(w=rng.standard_normal((3, 4)), b=rng.standard_normal(4))


def run_both(rng, ours_cls, torch_cls, steps=4, **kwargs):
    torch = pytest.importorskip("torch")
    params = make(rng)
    tparams = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    ours = ours_cls(params, **kwargs)
    theirs = torch_cls(list(tparams.values()), **kwargs)
    for _ in range(steps):
        grads = {k: rng.standard_normal(v.shape) for k, v in params.items()}
        for k, t in tparams.items():
            t.grad = torch.tensor(grads[k])
        ours.step(grads)
        theirs.step()
    for k, t in tparams.items():
        np.testing.assert_allclose(params[k], t.detach().numpy(), rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("kwargs", [dict(lr=0.1), dict(lr=0.05, momentum=0.9), dict(lr=0.05, momentum=0.5, weight_decay=0.1)])
def test_sgd_matches_torch(rng, kwargs):
    torch = pytest.importorskip("torch")
    run_both(rng, SGD, torch.optim.SGD, **kwargs)


@pytest.mark.parametrize("kwargs", [dict(), dict(lr=0.01, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1)])
def test_adamw_matches_torch(rng, kwargs):
    torch = pytest.importorskip("torch")
    run_both(rng, AdamW, torch.optim.AdamW, steps=6, **kwargs)


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clip_grad_norm_matches_torch(rng, max_norm):
    torch = pytest.importorskip("torch")
    grads = {"a": rng.standard_normal((3, 4)), "b": rng.standard_normal(5)}
    tensors = [torch.zeros(3, 4, dtype=torch.float64, requires_grad=True), torch.zeros(5, dtype=torch.float64, requires_grad=True)]
    for t, g in zip(tensors, grads.values()):
        t.grad = torch.tensor(g)
    want = torch.nn.utils.clip_grad_norm_(tensors, max_norm)
    before = {k: v.copy() for k, v in grads.items()}
    total = clip_grad_norm(grads, max_norm)
    assert float(total) == pytest.approx(want.item(), rel=1e-14)
    for t, (k, g) in zip(tensors, grads.items()):
        np.testing.assert_allclose(g, t.grad.numpy(), rtol=1e-14)
    assert all(np.array_equal(before[k], before[k]) for k in before)
    if max_norm > 50:
        np.testing.assert_allclose(grads["a"], before["a"], rtol=1e-6)   # under the limit: ~unchanged


def test_step_skips_missing_and_keeps_shapes(rng):
    params = make(rng)
    w0 = params["w"].copy()
    SGD(params, lr=0.1).step({"b": np.ones(4)})
    assert np.array_equal(params["w"], w0)


def test_bad_input(rng):
    params = make(rng)
    with pytest.raises(ValueError, match="lr must be a finite real number >= 0"):
        SGD(params, lr=-1)
    with pytest.raises(ValueError, match="betas must be two real numbers"):
        AdamW(params, betas=(0.9, 1.0))
    with pytest.raises(KeyError, match=r"grads has names that are not parameters: \['x'\]"):
        AdamW(params).step({"x": np.ones(2)})
    with pytest.raises(ValueError, match=r"grads\['w'\] has shape \(4, 3\)"):
        AdamW(params).step({"w": np.ones((4, 3))})
    with pytest.raises(ValueError, match="max_norm must be"):
        clip_grad_norm({"w": np.ones(2)}, -1.0)
