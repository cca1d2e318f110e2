"""Array namespace from the inputs, and the validation every op shares.

npattn has no global backend switch: the array library is read from the arrays an op is given
(``xp = namespace(q=q, k=k, v=v)``), so NumPy in gives NumPy out, CuPy in gives CuPy out, and
``array_api_strict`` in proves that only the array API standard was used on the way.

Numerics policy and dtype rules: derivations/00-notation.md, section "Numerics".
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
import numbers
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from array_api_compat import (
    array_namespace,
    device,
    is_array_api_obj,
    is_array_api_strict_namespace,
    is_cupy_array,
    is_torch_array,
)

__all__ = [
    "namespace",
    "check_float",
    "check_int",
    "check_cache",
    "float_namespace",
    "check_last_dim",
    "check_same_dtype",
    "check_dout",
    "compute_dtype",
    "to_compute",
    "check_mask",
    "pad_dims",
    "check_scale",
    "check_block",
    "check_workers",
    "on_host",
    "can_limit_blas",
    "one_blas_thread",
    "run_grid",
    "default_workers",
    "host_rng",
    "keep_mask",
    "from_numpy",
    "device",
    "to_numpy",
    "host_index",
    "read_back",
    "exp_",
    "where_",
    "LIBRARIES",
    "library",
    "move",
]


def _library(x) -> str:
    """Short name of the library an array belongs to, for error messages."""
    return type(x).__module__.split(".")[0]


def namespace(**arrays):
    """The array namespace shared by the named arrays (None values are skipped).

    Raises ``TypeError`` naming the arguments when they come from different array libraries,
    or when an argument is not an array at all.
    """
    given = {name: x for name, x in arrays.items() if x is not None}
    for name, x in given.items():
        if not is_array_api_obj(x):
            raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    libraries = {name: _library(x) for name, x in given.items()}
    if len(set(libraries.values())) > 1:
        listed = ", ".join(f"{name} is {lib}" for name, lib in libraries.items())
        raise TypeError(f"all arrays must come from one array library: {listed}")
    return array_namespace(*given.values())


def check_float(xp, name: str, x) -> None:
    """Reject integer, bool and complex data, and dtypes the array library does not know (e.g.
    ml_dtypes' bfloat16 in a NumPy array): ops are defined on real floating arrays."""
    try:
        ok = xp.isdtype(x.dtype, "real floating")
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise TypeError(f"{name} must be a real floating array, got dtype {x.dtype}")


def check_cache(cache, cls, forward: str) -> None:
    """A backward must get its own forward's cache; anything else is named, not unpacked."""
    if not isinstance(cache, cls):
        raise TypeError(f"cache must be the {cls.__name__} returned by {forward}, got {type(cache).__name__}")


def float_namespace(**arrays):
    """The namespace of the named arrays (None skipped), after checking that each is real floating
    and that they share one dtype: the first lines of every op with weights."""
    xp = namespace(**arrays)
    for name, a in arrays.items():
        if a is not None:
            check_float(xp, name, a)
    check_same_dtype(**arrays)
    return xp


def check_int(xp, name: str, x) -> None:
    """Ids and class targets are integer arrays (bool is not an integer here)."""
    if not xp.isdtype(x.dtype, "integral"):
        raise TypeError(f"{name} must be an integer array, got dtype {x.dtype}")


def check_last_dim(name: str, a, size: int, what: str) -> None:
    """A per-feature parameter (``gamma``, ``beta``) must be ``(E,)`` for the input's last axis E."""
    if a is not None and tuple(a.shape) != (size,):
        raise ValueError(f"{name} must have shape ({size},) to match {what}, got {tuple(a.shape)}")


def check_same_dtype(**arrays) -> None:
    """All named arrays (None skipped) must share one dtype; npattn never casts silently."""
    given = {name: x for name, x in arrays.items() if x is not None}
    dtypes = {name: x.dtype for name, x in given.items()}
    if len(set(dtypes.values())) > 1:
        listed = ", ".join(f"{name} is {dt}" for name, dt in dtypes.items())
        raise TypeError(f"arrays must share one dtype: {listed}")


def check_dout(xp, dout, shape: tuple, dtype, name: str = "dout", output: str = "the output") -> None:
    """An upstream gradient must have its output's shape and dtype (never cast silently)."""
    check_float(xp, name, dout)
    if tuple(dout.shape) != tuple(shape):
        raise ValueError(f"{name} must have {output}'s shape {tuple(shape)}, got {tuple(dout.shape)}")
    if dout.dtype != dtype:
        raise TypeError(f"{name} must have {output}'s dtype {dtype}, got {dout.dtype} (npattn never casts silently)")


def compute_dtype(xp, dtype):
    """The dtype arithmetic runs in: float16 is accumulated in float32, others as they are."""
    float16 = getattr(xp, "float16", None)
    if float16 is not None and dtype == float16:
        return xp.float32
    return dtype


def to_compute(xp, x):
    """``x`` in its compute dtype (a copy only for float16)."""
    ct = compute_dtype(xp, x.dtype)
    return x if x.dtype == ct else xp.astype(x, ct)


def check_scale(scale, d: int) -> float:
    """``scale`` or its default ``1/sqrt(D)``, which keeps Var(scores) at 1 whatever D is
    (derivations/03-attention.md, eq. (3.12)); must be a finite real number."""
    if scale is None:
        if d < 1:
            raise ValueError(f"the default scale 1/sqrt(D) needs a head dim D >= 1, got D = {d}")
        return 1.0 / math.sqrt(d)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite real number or None, got {scale!r}")
    return float(scale)


def check_block(name: str, value) -> int:
    """Tile sizes are integers >= 1 (they need not divide the sequence length)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def on_host(x) -> bool:
    """True for an array in host memory (NumPy, torch on the CPU, array_api_strict on its CPU
    device), False for one on a device (CuPy, torch CUDA, array_api_strict's other devices). Given a
    namespace instead of an array: True for NumPy and array_api_strict."""
    if not is_array_api_obj(x):
        return getattr(x, "__name__", "").split(".")[-1] in ("numpy", "array_api_strict")
    if is_cupy_array(x):
        return False
    if is_torch_array(x):
        return x.device.type == "cpu"
    where = str(device(x))
    return where == "cpu" or "CPU_DEVICE" in where


def check_workers(like, workers) -> int:
    """Threads for the tiled op's outer tile loop: an int >= 1. More than 1 is for arrays in host
    memory (a GPU already runs every tile in parallel) and needs threadpoolctl, see ``one_blas_thread``.
    ``like`` is an input array (or a namespace), to tell host from device."""
    if isinstance(workers, bool) or not isinstance(workers, numbers.Integral):
        raise TypeError(f"workers must be an int, got {workers!r}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if workers > 1 and not on_host(like):
        where = device(like) if is_array_api_obj(like) else like
        raise ValueError(f"workers > 1 runs tiles on CPU threads; arrays on a device ({where}) need workers=1, "
                         f"got {workers}")
    if workers > 1 and not can_limit_blas():
        raise ModuleNotFoundError(
            f"workers={workers} needs threadpoolctl, to keep BLAS on one thread inside each worker "
            "(otherwise the threads oversubscribe the cores and run slower than workers=1): "
            "pip install 'npattn[threads]'")
    return int(workers)


@functools.lru_cache(maxsize=1)
def _blas_controller():
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    return ThreadpoolController()


def can_limit_blas() -> bool:
    """True when threadpoolctl is installed, so ``workers > 1`` can hold BLAS to one thread."""
    return _blas_controller() is not None


_blas_limit_lock = threading.Lock()


@contextlib.contextmanager
def one_blas_thread():
    """BLAS on one thread while the block runs, so that ``workers`` threads each running their own
    matmuls use one core each instead of ``workers`` x (BLAS threads). The limit is process-wide, so
    parallel sections of concurrent calls take turns (a lock) and the old setting always comes back."""
    with _blas_limit_lock, _blas_controller().limit(limits=1, user_api="blas"):
        yield


def run_grid(run_share, shares):
    """FlashAttention-2's parallel grid on CPU threads: ``run_share(w, shares[w])`` for each share,
    on its own thread when there are several (BLAS kept to one thread meanwhile, so each worker uses
    one core), else inline. Used by the tiled op's tile loops and by the naive op's head slices.
    Derivation: derivations/14-parallel-tiles.md, eqs. (14.1)-(14.2)."""
    if len(shares) == 1:
        run_share(0, shares[0])
        return
    with one_blas_thread():
        pool = _thread_pool(len(shares))
        for done in [pool.submit(run_share, w, share) for w, share in enumerate(shares)]:
            done.result()                             # re-raises a worker's exception here


@functools.lru_cache(maxsize=None)
def _thread_pool(workers: int) -> ThreadPoolExecutor:
    """One pool per worker count, kept for the process: starting threads on every call cost
    ~25% at N=512 (measured: 28 vs 22 ms fwd+bwd, H=8, block 256)."""
    return ThreadPoolExecutor(workers, thread_name_prefix="npattn-worker")


def usable_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_workers(like) -> int:
    """``workers=None``: every usable core for NumPy (or array_api_strict) arrays in host memory when
    threadpoolctl can hold BLAS to one thread per worker; else 1 (a GPU runs every tile at once;
    torch and others thread internally). ``like``: an input array or a namespace.
    Measured in benchmarks/RESULTS.md, "Defaults"."""
    library = array_namespace(like) if is_array_api_obj(like) else like
    if can_limit_blas() and on_host(like) and on_host(library):         # host NumPy or array_api_strict
        return usable_cores()
    return 1


def exp_(xp, x):
    """``exp(x)`` written over ``x`` where the library has in-place ufuncs (NumPy, CuPy, torch), else a
    new array (the array API standard has no ``out=``). For a tile loop's own temporaries: the score
    tile becomes ``p`` without allocating a second tile per step (measured in benchmarks/RESULTS.md,
    "Close to the machine"). ``x`` must be the caller's own array, not a view of an input."""
    if isinstance(x, np.ndarray):
        return np.exp(x, out=x)
    if is_cupy_array(x):
        return importlib.import_module("cupy").exp(x, out=x)
    if is_torch_array(x):
        return x.exp_()
    return xp.exp(x)


def where_(xp, allowed, x, fill):
    """``where(allowed, x, fill)`` written over ``x`` where the library can (NumPy, CuPy, torch), else
    a new array; ``allowed`` broadcasts to ``x``. Masking a score block in place is 4x faster than
    building a new one (13.1 vs 3.4 ms for a causal (4, 8, 512, 512) block; benchmarks/RESULTS.md,
    "Close to the machine"). ``x`` must be the caller's own array, not a view of an input."""
    if isinstance(x, np.ndarray):
        np.copyto(x, fill, where=np.logical_not(allowed))
        return x
    if is_cupy_array(x):
        cp = importlib.import_module("cupy")
        cp.copyto(x, fill, where=cp.logical_not(allowed))
        return x
    if is_torch_array(x):
        return x.masked_fill_(xp.logical_not(allowed), fill)
    return xp.where(allowed, x, fill)


def pad_dims(x, ndim: int, xp):
    """Prepend size-1 axes so that ``x.ndim == ndim`` (a view, never a copy)."""
    if x.ndim == ndim:
        return x
    return xp.reshape(x, (1,) * (ndim - x.ndim) + tuple(x.shape))


def check_mask(xp, mask, scores_shape: tuple, dtype):
    """Validate an attention mask against the scores' shape ``(..., N, M)``.

    A bool mask (True = may attend) or a float mask of the inputs' dtype (added to the scores).
    It must broadcast *to* ``scores_shape``: no more axes, and each axis 1 or equal.
    Returns the mask with axes prepended to the scores' ndim.
    """
    if mask is None:
        return None
    if not (xp.isdtype(mask.dtype, "bool") or xp.isdtype(mask.dtype, "real floating")):
        raise TypeError(f"mask must be a bool or floating array, got dtype {mask.dtype}")
    if xp.isdtype(mask.dtype, "real floating") and mask.dtype != dtype:
        raise TypeError(
            f"a float mask must have the inputs' dtype {dtype}, got {mask.dtype} "
            "(a bool mask may be used with any dtype)"
        )
    shape = tuple(mask.shape)
    fits = len(shape) <= len(scores_shape) and all(
        m in (1, s) for m, s in zip(reversed(shape), reversed(scores_shape))
    )
    if not fits:
        raise ValueError(f"mask of shape {shape} does not broadcast to the scores' shape {tuple(scores_shape)}")
    return pad_dims(mask, len(scores_shape), xp)


def host_rng(rng) -> np.random.Generator:
    """A NumPy Generator from ``rng`` (a Generator, an int seed, or None for fresh entropy)."""
    if rng is None or (isinstance(rng, numbers.Integral) and not isinstance(rng, bool)):
        if rng is not None and rng < 0:
            raise ValueError(f"rng must be a non-negative int seed, a numpy.random.Generator or None, got {rng}")
        return np.random.default_rng(rng)
    if isinstance(rng, np.random.Generator):
        return rng
    raise TypeError(f"rng must be a numpy.random.Generator, an int seed or None, got {type(rng).__name__}")


def keep_mask(xp, shape: tuple, dropout_p: float, rng, like):
    """Dropout's mask ``z`` (bool ``shape``, True = keep, each with probability ``1 - dropout_p``) on
    the device of ``like``; a uniform draw ``u`` per entry, kept where ``u >= dropout_p``.

    - Host arrays (NumPy, torch on the CPU, array_api_strict) and any ``numpy.random.Generator``:
      NumPy's generator, so one seed gives the same mask on every host library (and, with a
      Generator, the same mask on a device too, drawn on the host and copied over once).
    - CuPy and torch CUDA with an int seed or None: the device's own generator (``cupy.random``'s
      default, torch's CUDA Philox), drawn on the device. The seed fixes the mask on that library,
      but it is a different random stream from NumPy's: the same seed gives another mask than on
      the host (with the same keep rate).
    - Other device libraries (the standard has no random numbers): drawn on the host, copied once.
    """
    on_gpu = is_cupy_array(like) or (is_torch_array(like) and not on_host(like))
    if isinstance(rng, np.random.Generator) or not on_gpu:
        return from_numpy(xp, host_rng(rng).random(shape) >= dropout_p, like=like)
    host_rng(rng)                                                             # validates the seed
    if is_cupy_array(like):
        import cupy

        with like.device:
            return cupy.random.default_rng(rng).random(shape) >= dropout_p
    import torch

    gen = torch.Generator(device=like.device)
    if rng is None:
        gen.seed()
    else:
        gen.manual_seed(int(rng))
    return torch.rand(shape, generator=gen, device=like.device, dtype=torch.float64) >= dropout_p


def from_numpy(xp, a: np.ndarray, like):
    """Move a host NumPy array into ``xp`` on the device of the array ``like``."""
    return xp.asarray(a, device=device(like))


def to_numpy(x) -> np.ndarray:
    """Any supported array as a NumPy array on the host: CuPy via ``.get()``, torch via
    ``.detach().cpu()``, anything else through ``numpy.asarray`` (a view when it already is NumPy)."""
    if is_cupy_array(x):
        return x.get()
    if is_torch_array(x):
        return x.detach().cpu().numpy()
    if is_array_api_strict_namespace(array_namespace(x)):   # any of its devices: an explicit copy to the CPU
        return np.asarray(x.to_device(x.__array_namespace__().Device("CPU_DEVICE")))
    return np.asarray(x)


def read_back(xp, *scalars) -> list:
    """Python ints of a few 0-d integer results, read in one explicit transfer: the only trip to the
    host an op makes, and only to validate integer inputs (the range of ids and class targets, and
    how many targets count). Never inside the math, never in a loop; float data never comes back."""
    stacked = xp.stack([xp.astype(s, xp.int64) for s in scalars])          # (len(scalars),) on the device
    return [int(v) for v in to_numpy(stacked)]


def host_index(name: str, a, ndim: int) -> np.ndarray:
    """An index array that steers the loops (``cu_seqlens_*``, a paged cache's ``block_table`` and
    ``seqlens``) as NumPy int64 on the host, in one explicit copy: which tiles or pages to visit is
    decided on the host, as FlashAttention takes ``max_seqlen`` and vLLM its block tables. Accepts an
    integer array of any supported library (or a list of ints) with ``ndim`` axes; anything else is
    a ``TypeError``/``ValueError`` naming ``name``. The float data never comes back."""
    if isinstance(a, (list, tuple)):
        if not all(isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in np.ravel(np.asarray(a, dtype=object))):
            raise TypeError(f"{name} must hold integers, got {a!r}")
        host = np.asarray(a, dtype=np.int64)
    elif is_array_api_obj(a):
        if not array_namespace(a).isdtype(a.dtype, "integral"):
            raise TypeError(f"{name} must be an integer array, got dtype {a.dtype}")
        host = to_numpy(a)
        if host.dtype.kind == "u" and host.size and int(host.max()) > np.iinfo(np.int64).max:
            raise ValueError(f"{name} holds a value above 2**63 - 1 (dtype {host.dtype}): no length is that large")
        host = host.astype(np.int64, copy=True)
    else:
        raise TypeError(f"{name} must be an integer array, got {type(a).__name__}")
    if host.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} axis{'es' if ndim != 1 else ''}, got shape {host.shape}")
    return host


LIBRARIES = ("numpy", "array_api_strict", "torch", "cupy")


def library(which):
    """The array-API namespace of ``which``: one of ``LIBRARIES`` by name, or the module itself
    (``numpy``, ``cupy``, ``torch``, ``array_api_strict``, or array_api_compat's wrapper of one).
    A library that is not installed is a ``ModuleNotFoundError`` naming it."""
    name = which if isinstance(which, str) else getattr(which, "__name__", "")
    name = name.split(".")[-1]
    if name not in LIBRARIES:
        raise ValueError(f"the array library must be one of {LIBRARIES} (a name or the module), got {which!r}")
    importlib.import_module(name)
    return importlib.import_module(name if name == "array_api_strict" else f"array_api_compat.{name}")


def move(a, xp, device=None):
    """``a`` (any supported array) as an array of namespace ``xp`` on ``device`` (None: the library's
    default): one explicit copy through the host, for setting a model up, never inside an op."""
    host = to_numpy(a)
    if isinstance(device, str) and hasattr(xp, "Device"):                 # array_api_strict names its devices
        device = xp.Device(device)
    return xp.asarray(host) if device is None else xp.asarray(host, device=device)


INT64_MAX = 2**63 - 1                         # the largest size or index every array library can hold


def check_int_arg(name: str, value, *, minimum=None, maximum=INT64_MAX, allow_none: bool = False):
    """An integer argument (a size, a head count, a seed, an axis, a window side) as a Python int.

    Any integer type works, NumPy's included; a float, a string or a bool is a ``TypeError`` naming
    ``name``; a value below ``minimum`` or above ``maximum`` a ``ValueError`` (by default above
    int64's largest, so that ``2**70`` is named here instead of failing inside an array library;
    ``maximum=None`` for values any Python int may take, such as a seed). ``None`` passes through
    when ``allow_none``."""
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int{' or None' if allow_none else ''}, got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        limit = "2**63 - 1" if maximum == INT64_MAX else str(maximum)
        raise ValueError(f"{name} must be at most {limit}, got {value}")
    return value
