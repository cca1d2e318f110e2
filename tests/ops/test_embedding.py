"""npattn/ops/embedding.py: lookup and scatter-add vs loops and torch, the sinusoidal table."""

import numpy as np
import pytest

from npattn import embedding_backward, embedding_forward, gradcheck, sinusoidal_positions


def test_forward_and_scatter_add_match_loops(rng):
    ids = np.array([[3, 1, 3], [0, 3, 4]])                 # id 3 repeats: its gradient rows add up
    w, dout = rng.standard_normal((6, 5)), rng.standard_normal((2, 3, 5))
    out, cache = embedding_forward(ids, w)
    np.testing.assert_array_equal(out, w[ids])
    _, dw = embedding_backward(dout, cache)
    expected = np.zeros_like(w)
    for idx in np.ndindex(*ids.shape):
        expected[ids[idx]] += dout[idx]
    np.testing.assert_allclose(dw, expected, rtol=1e-14)
    assert np.all(dw[[2, 5]] == 0)                         # rows never read get nothing


def test_gradcheck_ids_get_no_row(rng):
    ids = rng.integers(0, 7, (3, 4))
    report = gradcheck(embedding_forward, embedding_backward, dict(ids=ids, weight=rng.standard_normal((7, 3))))
    assert report.ok, report
    assert [r.name for r in report.rows] == ["weight"]


def test_chunked_one_hot_matches_single_block(rng, monkeypatch):
    import npattn.ops.embedding as emb

    ids, w = rng.integers(0, 9, (5, 7)), rng.standard_normal((9, 4))
    dout = rng.standard_normal((5, 7, 4))
    whole = embedding_backward(dout, embedding_forward(ids, w)[1])[1]
    monkeypatch.setattr(emb, "_ONEHOT_ELEMENTS", 9 * 4)     # chunks of 4 ids, the last one ragged
    np.testing.assert_allclose(embedding_backward(dout, embedding_forward(ids, w)[1])[1], whole, rtol=1e-14)


def test_matches_torch(rng):
    torch = pytest.importorskip("torch")
    ids, w, dout = rng.integers(0, 10, (4, 6)), rng.standard_normal((10, 3)), rng.standard_normal((4, 6, 3))
    tw = torch.tensor(w, requires_grad=True)
    torch.nn.functional.embedding(torch.tensor(ids), tw).backward(torch.tensor(dout))
    np.testing.assert_allclose(embedding_backward(dout, embedding_forward(ids, w)[1])[1], tw.grad.numpy(), rtol=1e-13)


def test_backends(backend, rng):
    ids, w, dout = rng.integers(0, 5, (2, 3)), rng.standard_normal((5, 4)), rng.standard_normal((2, 3, 4))
    out, cache = embedding_forward(backend.asarray(ids), backend.asarray(w))
    _, dw = embedding_backward(backend.asarray(dout), cache)
    np.testing.assert_allclose(backend.numpy(out), w[ids])
    np.testing.assert_allclose(backend.numpy(dw), embedding_backward(dout, embedding_forward(ids, w)[1])[1], rtol=1e-14)


def test_bad_input(rng):
    w = rng.standard_normal((5, 3))
    with pytest.raises(ValueError, match=r"ids must be in \[0, 5\), got values from 0 to 5"):
        embedding_forward(np.array([0, 5]), w)
    with pytest.raises(ValueError, match=r"ids must be in \[0, 5\), got values from -1"):
        embedding_forward(np.array([-1, 2]), w)
    with pytest.raises(TypeError, match="ids must be an integer array"):
        embedding_forward(np.array([0.0, 1.0]), w)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        embedding_forward(np.array([0]), np.ones(3))


def test_sinusoidal_table():
    table = sinusoidal_positions(7, 6, base=100.0)
    assert table.shape == (7, 6)
    for t in range(7):
        for col in range(6):
            c = col // 2
            angle = t / 100.0 ** (2 * c / 6)
            assert table[t, col] == pytest.approx(np.sin(angle) if col % 2 == 0 else np.cos(angle), abs=1e-15)
    with pytest.raises(ValueError, match="dim must be an int >= 0"):
        sinusoidal_positions(3, -1)
