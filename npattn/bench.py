"""``npattn bench``: naive vs tiled attention (and PyTorch, when installed), side by side in one run.

Every row is one implementation at one setting: median wall time of ``repeats`` runs with its
spread (min-max), the ratio to naive npattn at the same setting, achieved GFLOP/s, and peak memory.
``tiled`` runs the tiled pair on ``workers`` threads (default: every core, when threadpoolctl is
installed), ``tiled-1`` on one, so the effect of the threads shows side by side.

- FLOPs are the algorithm's useful work, the same for every implementation so rates compare:
  forward ``2 V (D + Dv)`` and forward+backward ``6 V (D + Dv)`` per head, where ``V`` is the number
  of (query, key) pairs the causal rule lets through (``N M`` without causal). The tiled backward's
  recomputation of ``q k^T`` is overhead, not counted.
- Peak memory is the peak of NumPy allocations during one call above what was allocated before
  it (``tracemalloc``), measured in a run of its own so tracing does not slow the timed runs.
  PyTorch allocations are not traced; torch rows show no memory.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
import tracemalloc
from dataclasses import asdict, dataclass, field

import numpy as np

from .backend import can_limit_blas
from .ops import attention_backward, attention_forward, flash_attention_backward, flash_attention_forward

__all__ = ["BenchConfig", "run_bench", "format_table", "DEFAULT_BLOCK", "default_workers"]

# Tile size for the tiled rows, chosen by measurement on the 2-core CI machine: fwd+bwd at
# B=1, H=8, N=M=4096, D=64, float32 took 1.79 s with 64, 1.06 s with 128, 0.87 s with 256,
# 0.93 s with 512 and 1.22 s with 1024 (benchmarks/RESULTS.md, "Block size").
DEFAULT_BLOCK = 256


def default_workers() -> int:
    """Threads for the ``tiled`` rows: every core this process may use, when threadpoolctl is
    installed (``workers > 1`` needs it); else 1."""
    if not can_limit_blas():
        return 1
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass
class BenchConfig:
    lengths: list = field(default_factory=lambda: [256, 512, 1024])  # N = M
    dtypes: list = field(default_factory=lambda: ["float32", "float64"])
    causal: list = field(default_factory=lambda: [False, True])
    passes: list = field(default_factory=lambda: ["fwd", "fwd+bwd"])
    # "tiled" runs on ``workers`` threads, "tiled-1" on one (the teaching default), side by side
    impls: list = field(default_factory=lambda: ["naive", "tiled", "tiled-1", "torch", "torch-math"])
    batch: int = 1
    heads: int = 8
    dim: int = 64
    block: int = DEFAULT_BLOCK
    workers: int = field(default_factory=default_workers)
    repeats: int = 3
    memory: bool = True
    seed: int = 0


def _flops(n: int, m: int, d: int, dv: int, bh: int, causal: bool, passes: str) -> float:
    visible = sum(max(0, min(m, i + m - n + 1)) for i in range(n)) if causal else n * m
    per_pass = 2.0 * visible * (d + dv) * bh
    return per_pass * (3.0 if passes == "fwd+bwd" else 1.0)


def _numpy_runner(impl, q, k, v, dout, causal, passes, block, workers):
    workers = 1 if impl == "tiled-1" else workers

    def run():
        if impl == "naive":
            o, cache = attention_forward(q, k, v, causal=causal)
            if passes == "fwd+bwd":
                attention_backward(dout, cache)
        else:
            o, cache = flash_attention_forward(q, k, v, causal=causal, block_q=block, block_k=block,
                                               workers=workers)
            if passes == "fwd+bwd":
                flash_attention_backward(dout, cache)

    return run


def _torch_runner(impl, q, k, v, dout, causal, passes):
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    tq, tk, tv, tdout = (torch.from_numpy(a) for a in (q, k, v, dout))
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def run():
        if passes == "fwd":
            with torch.no_grad():
                if impl == "torch-math":
                    with sdpa_kernel(SDPBackend.MATH):
                        sdpa(tq, tk, tv, is_causal=causal)
                else:
                    sdpa(tq, tk, tv, is_causal=causal)
            return
        a, b, c = (t.detach().requires_grad_(True) for t in (tq, tk, tv))
        if impl == "torch-math":
            with sdpa_kernel(SDPBackend.MATH):
                sdpa(a, b, c, is_causal=causal).backward(tdout)
        else:
            sdpa(a, b, c, is_causal=causal).backward(tdout)

    return run


def _peak_bytes(run) -> int:
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        run()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def run_bench(cfg: BenchConfig, progress=None) -> list[dict]:
    """Run every setting of ``cfg``; returns one dict per row (see module docstring)."""
    have_torch = torch_available()
    rows = []
    for n in cfg.lengths:
        for dtype in cfg.dtypes:
            rng = np.random.default_rng(cfg.seed)
            shape = (cfg.batch, cfg.heads, n, cfg.dim)
            q, k, v, dout = (rng.standard_normal(shape).astype(dtype) for _ in range(4))
            for causal in cfg.causal:
                for passes in cfg.passes:
                    base_ms = None
                    for impl in cfg.impls:
                        if impl.startswith("torch"):
                            if not have_torch:
                                continue
                            run = _torch_runner(impl, q, k, v, dout, causal, passes)
                        else:
                            run = _numpy_runner(impl, q, k, v, dout, causal, passes, cfg.block, cfg.workers)
                        run()                                                  # warm-up
                        times = []
                        for _ in range(cfg.repeats):
                            t0 = time.perf_counter()
                            run()
                            times.append((time.perf_counter() - t0) * 1e3)
                        med = statistics.median(times)
                        if impl == "naive":
                            base_ms = med
                        peak = _peak_bytes(run) / 2**20 if cfg.memory and not impl.startswith("torch") else None
                        flops = _flops(n, n, cfg.dim, cfg.dim, cfg.batch * cfg.heads, causal, passes)
                        row = dict(impl=impl, dtype=dtype, causal=causal, n=n, passes=passes,
                                   median_ms=med, min_ms=min(times), max_ms=max(times),
                                   vs_naive=(med / base_ms) if base_ms else None,
                                   gflops=flops / (med * 1e-3) / 1e9, peak_mib=peak,
                                   block=cfg.block if impl.startswith("tiled") else None,
                                   workers=(1 if impl == "tiled-1" else cfg.workers) if impl.startswith("tiled") else None)
                        rows.append(row)
                        if progress:
                            progress(row)
    return rows


HEADER = (f"{'impl':<11}{'dtype':<9}{'causal':<7}{'N':>6} {'pass':<8}{'median ms':>10} {'[min - max]':>19}"
          f"{'x naive':>8}{'GFLOP/s':>9}{'peak MiB':>10}")


def format_row(r: dict) -> str:
    spread = f"[{r['min_ms']:.1f} - {r['max_ms']:.1f}]"
    ratio = f"{r['vs_naive']:.2f}" if r["vs_naive"] is not None else "-"
    peak = f"{r['peak_mib']:.1f}" if r["peak_mib"] is not None else "-"
    return (f"{r['impl']:<11}{r['dtype']:<9}{'yes' if r['causal'] else 'no':<7}{r['n']:>6} {r['passes']:<8}"
            f"{r['median_ms']:>10.1f} {spread:>19}{ratio:>8}{r['gflops']:>9.1f}{peak:>10}")


def format_table(rows: list[dict]) -> str:
    return "\n".join([HEADER] + [format_row(r) for r in rows])


def environment() -> dict:
    env = dict(python=platform.python_version(), numpy=np.__version__, machine=platform.machine(),
               processor=platform.processor() or "unknown")
    if torch_available():
        import torch

        env.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    return env


def write_json(path: str, cfg: BenchConfig, rows: list[dict]) -> None:
    with open(path, "w") as f:
        json.dump(dict(config=asdict(cfg), environment=environment(), rows=rows), f, indent=1)
