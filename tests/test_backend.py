"""npattn/backend.py: the namespace comes from the inputs; mixing libraries is a TypeError."""

import array_api_strict
import numpy as np
import pytest

from npattn import attention_forward, linear_forward
from npattn.backend import check_mask, compute_dtype, host_rng, namespace


def test_namespace_is_read_from_inputs():
    assert namespace(x=array_api_strict.asarray([1.0])).__name__.startswith("array_api_strict")
    assert "numpy" in namespace(x=np.ones(2)).__name__


def test_mixed_libraries_name_both(rng):
    q = rng.standard_normal((2, 3))
    with pytest.raises(TypeError, match="q is numpy, k is array_api_strict"):
        attention_forward(q, array_api_strict.asarray(q), q)
    with pytest.raises(TypeError, match="x is numpy, w is array_api_strict"):
        linear_forward(q, array_api_strict.asarray(rng.standard_normal((3, 2))))


def test_float16_accumulates_in_float32():
    assert compute_dtype(np, np.dtype(np.float16)) == np.float32
    assert compute_dtype(np, np.dtype(np.float64)) == np.float64


def test_mask_must_broadcast_to_scores():
    with pytest.raises(ValueError, match=r"mask of shape \(1, 2, 3, 4\) does not broadcast"):
        check_mask(np, np.ones((1, 2, 3, 4), dtype=bool), (2, 3, 4), np.float64)
    with pytest.raises(ValueError, match=r"mask of shape \(3, 5\)"):
        check_mask(np, np.ones((3, 5), dtype=bool), (2, 3, 4), np.float64)
    assert check_mask(np, np.ones((3, 1), dtype=bool), (2, 3, 4), np.float64).shape == (1, 3, 1)


def test_rng_forms():
    assert host_rng(3).random() == np.random.default_rng(3).random()
    g = np.random.default_rng(0)
    assert host_rng(g) is g
    with pytest.raises(TypeError, match="rng must be a numpy.random.Generator"):
        host_rng("seed")
