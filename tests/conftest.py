"""Shared fixtures: the ``xp`` fixture runs a test on every array library available, and the
hypothesis profile that CI uses (deterministic, small)."""

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("ci", derandomize=True, max_examples=40, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.register_profile("dev", max_examples=200, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


class Backend:
    """An array library under test: ``asarray`` moves NumPy data in, ``numpy`` brings it back."""

    def __init__(self, name, xp):
        self.name, self.xp = name, xp

    def asarray(self, a):
        return None if a is None else self.xp.asarray(a)

    def numpy(self, x):
        if x is None:
            return None
        if self.name == "cupy":
            return x.get()
        return np.asarray(x)

    def __repr__(self):
        return self.name


def _backends():
    import array_api_strict

    params = [pytest.param(Backend("numpy", np), id="numpy"),
              pytest.param(Backend("array_api_strict", array_api_strict), id="array_api_strict")]
    try:
        import cupy

        cupy.cuda.runtime.getDeviceCount()
        params.append(pytest.param(Backend("cupy", cupy), id="cupy"))
    except Exception:  # no cupy, or no GPU: the GPU case is skipped, not failed
        params.append(pytest.param(None, id="cupy", marks=pytest.mark.skip(reason="CuPy or a GPU is not available")))
    return params


@pytest.fixture(params=_backends())
def backend(request):
    return request.param


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
