"""Shared fixtures: the ``xp`` fixture runs a test on every array library available, and the
hypothesis profile that CI uses (deterministic, small)."""

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from npattn.backend import to_numpy

settings.register_profile("ci", derandomize=True, max_examples=40, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.register_profile("dev", max_examples=200, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


class Backend:
    """An array library under test: ``asarray`` moves NumPy data onto its device, ``numpy`` brings
    it back (an explicit transfer, allowed in tests and nowhere inside an op)."""

    def __init__(self, name, xp, device=None, no_host=False, device_name=None):
        self.name, self.xp, self.device, self.no_host = name, xp, device, no_host
        self.device_name = device_name if device_name is not None else device   # as the CLI's --device

    def asarray(self, a):
        if a is None:
            return None
        return self.xp.asarray(a, device=self.device) if self.device is not None else self.xp.asarray(a)

    def numpy(self, x):
        return None if x is None else to_numpy(x)

    def __repr__(self):
        return self.name


def _skip(name, reason):
    return pytest.param(None, id=name, marks=pytest.mark.skip(reason=reason))


def _backends():
    """NumPy; array_api_strict on its CPU device, and on its second device with every host
    conversion forbidden (a stand-in for a GPU that the suite can always run: see ``no_host``);
    torch on the CPU and on CUDA; CuPy. Absent libraries and devices skip, with the reason."""
    import array_api_strict

    params = [pytest.param(Backend("numpy", np), id="numpy"),
              pytest.param(Backend("array_api_strict", array_api_strict), id="array_api_strict"),
              pytest.param(Backend("no-host", array_api_strict, array_api_strict.Device("device1"), no_host=True,
                                   device_name="device1"),
                           id="no-host")]
    try:
        import torch
        from array_api_compat import torch as xtorch
    except ImportError:
        params += [_skip("torch", "torch is not installed"), _skip("torch-cuda", "torch is not installed")]
    else:
        params.append(pytest.param(Backend("torch", xtorch, "cpu"), id="torch"))
        params.append(pytest.param(Backend("torch-cuda", xtorch, "cuda"), id="torch-cuda") if torch.cuda.is_available()
                      else _skip("torch-cuda", "torch has no CUDA device here"))
    try:
        import cupy
        from array_api_compat import cupy as xcupy

        cupy.cuda.runtime.getDeviceCount()
        params.append(pytest.param(Backend("cupy", xcupy), id="cupy"))
    except Exception:  # no cupy, or no GPU: the GPU case is skipped, not failed
        params.append(_skip("cupy", "CuPy or a GPU is not available"))
    return params


def _forbid_host_conversions(monkeypatch):
    """Make arrays off the CPU device raise on every implicit trip to the host: ``__array__``
    (array_api_strict already refuses it there), ``__float__``, ``__int__``, ``__index__``,
    ``__bool__``, ``__complex__``. Mixing devices is already an error in array_api_strict, so an
    op that creates an array without the inputs' device fails too."""
    from array_api_strict._array_object import CPU_DEVICE, Array

    def guard(name):
        original = getattr(Array, name)

        def conversion(self, *args, **kwargs):
            if self.device != CPU_DEVICE:
                raise RuntimeError(f"{name} of a device array: an implicit transfer to the host")
            return original(self, *args, **kwargs)

        monkeypatch.setattr(Array, name, conversion)

    for name in ("__float__", "__int__", "__index__", "__bool__", "__complex__"):
        guard(name)


@pytest.fixture(params=_backends())
def backend(request, monkeypatch):
    if request.param.no_host:
        _forbid_host_conversions(monkeypatch)
    return request.param


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
