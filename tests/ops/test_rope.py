"""npattn/ops/rope.py: both pairings vs an explicit per-pair rotation and Hugging Face's rotate_half,
the backward as the rotation by -theta, gradients, planted bugs, bad input."""

import numpy as np
import pytest

from npattn import gradcheck, rope_backward, rope_forward


def rope_loop(x, positions, base, interleaved):
    d = x.shape[-1]
    out = np.empty_like(x)
    pos = np.broadcast_to(positions, x.shape[:-1])
    for idx in np.ndindex(*x.shape[:-1]):
        t = pos[idx]
        for c in range(d // 2):
            i, j = (2 * c, 2 * c + 1) if interleaved else (c, c + d // 2)
            a = t * base ** (-2 * c / d)
            out[idx + (i,)] = x[idx + (i,)] * np.cos(a) - x[idx + (j,)] * np.sin(a)
            out[idx + (j,)] = x[idx + (j,)] * np.cos(a) + x[idx + (i,)] * np.sin(a)
    return out


@pytest.mark.parametrize("interleaved", [False, True])
def test_forward_matches_per_pair_rotation(rng, interleaved):
    x = rng.standard_normal((2, 3, 5, 8))
    positions = rng.integers(0, 100, (2, 1, 5))
    y, _ = rope_forward(x, positions=positions, base=500.0, interleaved=interleaved)
    np.testing.assert_allclose(y, rope_loop(x, positions, 500.0, interleaved), rtol=1e-12, atol=1e-14)
    y0, _ = rope_forward(x, interleaved=interleaved)
    np.testing.assert_allclose(y0, rope_loop(x, np.arange(5), 10000.0, interleaved), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("interleaved", [False, True])
def test_gradcheck_and_norm_preserved(rng, interleaved):
    x = rng.standard_normal((2, 4, 6))
    kwargs = dict(positions=np.array([0, 3, 7, 20]), interleaved=interleaved)
    report = gradcheck(rope_forward, rope_backward, dict(x=x), kwargs=kwargs)
    assert report.ok, report
    y, cache = rope_forward(x, **kwargs)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-13)
    np.testing.assert_allclose(rope_backward(y, cache), x, rtol=1e-12, atol=1e-14)   # R^T R = I


def rope_backward_same_angle(dout, cache):
    """The planted bug: rotating the gradient by +theta instead of -theta."""
    return rope_forward(dout, positions=np.arange(dout.shape[-2]))[0]


def test_planted_bug_fails(rng):
    assert not gradcheck(rope_forward, rope_backward_same_angle, dict(x=rng.standard_normal((5, 4)))).ok


def test_matches_hugging_face_rotate_half(rng):
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((1, 2, 6, 8))
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, 8, 2) / 8))
    freqs = np.arange(6)[:, None] * inv_freq
    emb = np.concatenate([freqs, freqs], -1)
    tx = torch.tensor(x)
    rotate_half = torch.cat((-tx[..., 4:], tx[..., :4]), dim=-1)       # Llama's rotate_half
    want = tx * torch.tensor(np.cos(emb)) + rotate_half * torch.tensor(np.sin(emb))
    np.testing.assert_allclose(rope_forward(x)[0], want.numpy(), rtol=1e-13, atol=1e-15)


def test_backends(backend, rng):
    x, dout = rng.standard_normal((2, 5, 4)), rng.standard_normal((2, 5, 4))
    y, cache = rope_forward(backend.asarray(x), interleaved=True)
    np.testing.assert_allclose(backend.numpy(y), rope_forward(x, interleaved=True)[0], rtol=1e-14)
    np.testing.assert_allclose(backend.numpy(rope_backward(backend.asarray(dout), cache)),
                               rope_backward(dout, rope_forward(x, interleaved=True)[1]), rtol=1e-14)


def test_float32_angles_are_accurate():
    x = np.ones((1, 4000, 2), dtype=np.float32)
    y, _ = rope_forward(x)
    want = rope_loop(np.ones((1, 4000, 2)), np.arange(4000), 10000.0, False)
    assert y.dtype == np.float32 and np.max(np.abs(y - want)) < 1e-6


def test_bad_input(rng):
    with pytest.raises(ValueError, match="D must be even"):
        rope_forward(np.ones((3, 5)))
    with pytest.raises(TypeError, match="positions must be an integer array"):
        rope_forward(np.ones((3, 4)), positions=np.arange(3.0))
    with pytest.raises(ValueError, match="positions of shape"):
        rope_forward(np.ones((3, 4)), positions=np.arange(4))
    with pytest.raises(ValueError, match="base must be"):
        rope_forward(np.ones((3, 4)), base=0)
