"""``npattn bench``: naive vs tiled attention (and PyTorch, when installed), side by side in one run.

Every row is one implementation at one setting: median wall time of ``repeats`` runs with its
spread (min-max), the ratio to naive npattn at the same setting, achieved GFLOP/s, and peak memory.
``tiled`` runs the tiled pair with its defaults (tiles and workers chosen by ``default_tiling``) or
the ``block``/``workers`` given, ``tiled-1`` the same on one worker, so the effect of the threads
shows side by side. ``naive`` runs with its own default workers.

- FLOPs are the algorithm's useful work, the same for every implementation so rates compare:
  forward ``2 V (D + Dv)`` and forward+backward ``6 V (D + Dv)`` per head, where ``V`` is the number
  of (query, key) pairs the causal rule lets through (``N M`` without causal). The tiled backward's
  recomputation of ``q k^T`` is overhead, not counted.
- Peak memory is the peak of NumPy allocations during one call above what was allocated before
  it (``tracemalloc``), measured in a run of its own so tracing does not slow the timed runs.
  PyTorch allocations on the CPU are not traced; those torch rows show no memory.
- ``backend`` runs npattn on another array library (``"cupy"``, ``"torch"``, ``"array_api_strict"``)
  on ``device``. Every timed run then ends with a device synchronization, so a GPU's asynchronous
  launches are counted whole; the torch rows run on the same device (CUDA when npattn runs on a GPU).
  GPU peak memory is the device allocator's high-water mark during one call: CuPy's memory pool
  (emptied first, so the blocks it holds after the call are the call's peak) and
  ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
import tracemalloc
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np

from .ops import attention_backward, attention_forward, flash_attention_backward, flash_attention_forward
from .ops.flash import default_tiling

__all__ = ["BenchConfig", "run_bench", "format_table", "gemm_rate", "blas_share", "LayersConfig", "run_layers_bench", "BeyondConfig",
           "run_beyond_bench", "MachineConfig", "run_machine_bench", "machine"]

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
    block: Optional[int] = None      # None: the tiled op's default tiles (default_tiling)
    window: Optional[tuple] = None   # (left, right) of the "tiled-window" rows
    workers: Optional[int] = None    # None: the tiled op's default workers
    repeats: int = 3
    memory: bool = True
    seed: int = 0
    backend: str = "numpy"           # the array library npattn runs on (backend.LIBRARIES)
    device: Optional[str] = None     # its device (None: the library's default; torch: CUDA if present)


def _flops(n: int, m: int, d: int, dv: int, bh: int, causal: bool, passes: str, window=None) -> float:
    """Useful FLOPs: 2 (D + Dv) per visible (query, key) pair and pass (x3 for fwd+bwd)."""
    left, right = window if window is not None else (None, None)
    visible = 0
    for i in range(n):
        hi = m - 1 if right is None else min(m - 1, i + m - n + right)
        hi = min(hi, i + m - n) if causal else hi
        lo = 0 if left is None else max(0, i + m - n - left)
        visible += max(0, hi - lo + 1)
    per_pass = 2.0 * visible * (d + dv) * bh
    return per_pass * (3.0 if passes == "fwd+bwd" else 1.0)


def _numpy_runner(impl, q, k, v, dout, causal, passes, block, workers, window=None):
    workers = 1 if impl == "tiled-1" else workers
    window = window if impl == "tiled-window" else None

    def run():
        if impl == "naive":
            o, cache = attention_forward(q, k, v, causal=causal)
            if passes == "fwd+bwd":
                attention_backward(dout, cache)
        else:
            o, cache = flash_attention_forward(q, k, v, causal=causal, block_q=block, block_k=block,
                                               workers=workers, window=window)
            if passes == "fwd+bwd":
                flash_attention_backward(dout, cache)

    return run


def _torch_runner(impl, q, k, v, dout, causal, passes, device="cpu"):
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    tq, tk, tv, tdout = (torch.from_numpy(a).to(device) for a in (q, k, v, dout))
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


class _Place:
    """Where npattn's rows run: the library, its device, how to wait for it, how to read its peak."""

    def __init__(self, cfg: "BenchConfig"):
        from .backend import library, move

        self.name = cfg.backend
        self.xp = library(cfg.backend)
        self.device = cfg.device
        if self.name == "torch" and self.device is None:
            import torch

            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.move = lambda a: a if self.name == "numpy" else move(a, self.xp, self.device)
        self.gpu = self.name == "cupy" or (self.name == "torch" and str(self.device).startswith("cuda"))
        self.torch_device = "cuda" if self.gpu else "cpu"

    def sync(self):
        if self.name == "cupy":
            import cupy

            cupy.cuda.get_current_stream().synchronize()
        elif self.gpu:
            import torch

            torch.cuda.synchronize()

    def peak_bytes(self, run, torch_row: bool):
        """The call's peak allocation, or None where it cannot be read (torch on the CPU)."""
        if not self.gpu:                              # tracemalloc sees NumPy's allocations only
            return _peak_bytes(run) if not torch_row and self.name in ("numpy", "array_api_strict") else None
        if self.name == "cupy" and not torch_row:
            import cupy

            pool = cupy.get_default_memory_pool()
            pool.free_all_blocks()
            base = pool.used_bytes()
            run()
            self.sync()
            return pool.total_bytes() - base
        import torch

        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    def label(self) -> str:
        return self.name if self.device is None else f"{self.name} on {self.device}"


def gpu_name() -> str:
    """The GPU torch or CuPy sees, or '' without one."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name()
    except ImportError:
        pass
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    except Exception:
        return ""


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def run_bench(cfg: BenchConfig, progress=None) -> list[dict]:
    """Run every setting of ``cfg``; returns one dict per row (see module docstring)."""
    have_torch = torch_available()
    place = _Place(cfg)
    rows = []
    for n in cfg.lengths:
        for dtype in cfg.dtypes:
            rng = np.random.default_rng(cfg.seed)
            shape = (cfg.batch, cfg.heads, n, cfg.dim)
            q, k, v, dout = (rng.standard_normal(shape).astype(dtype) for _ in range(4))
            q_dev, k_dev, v_dev, dout_dev = (place.move(a) for a in (q, k, v, dout))   # on npattn's device
            for causal in cfg.causal:
                for passes in cfg.passes:
                    base_ms = None
                    for impl in cfg.impls:
                        if impl.startswith("torch"):
                            if not have_torch:
                                continue
                            run = _torch_runner(impl, q, k, v, dout, causal, passes, place.torch_device)
                        else:
                            run = _numpy_runner(impl, q_dev, k_dev, v_dev, dout_dev, causal, passes, cfg.block, cfg.workers,
                                                cfg.window)
                        run()                                                  # warm-up
                        place.sync()
                        times = []
                        for _ in range(cfg.repeats):
                            t0 = time.perf_counter()
                            run()
                            place.sync()
                            times.append((time.perf_counter() - t0) * 1e3)
                        med = statistics.median(times)
                        tiling = default_tiling(q_dev, n, cfg.block, cfg.block, cfg.workers)   # as resolved
                        if impl == "naive":
                            base_ms = med
                        peak = place.peak_bytes(run, impl.startswith("torch")) if cfg.memory else None
                        flops = _flops(n, n, cfg.dim, cfg.dim, cfg.batch * cfg.heads, causal, passes,
                                       cfg.window if impl == "tiled-window" else None)
                        row = dict(impl=impl, dtype=dtype, causal=causal, n=n, passes=passes,
                                   median_ms=med, min_ms=min(times), max_ms=max(times),
                                   vs_naive=(med / base_ms) if base_ms else None,
                                   gflops=flops / (med * 1e-3) / 1e9,
                                   peak_mib=None if peak is None else peak / 2**20,
                                   block=tiling[0] if impl.startswith("tiled") else None,
                                   workers=(1 if impl == "tiled-1" else tiling[2]) if impl.startswith("tiled") else None,
                                   backend=place.label(), dim=cfg.dim, bh=cfg.batch * cfg.heads)
                        rows.append(row)
                        if progress:
                            progress(row)
    return rows


def gemm_rate(dtype: str = "float32", n: int = 2048, repeats: int = 3) -> float:
    """The machine's matmul rate, GFLOP/s: the median of ``repeats`` square ``n x n`` products in
    ``dtype`` (NumPy's BLAS, every core), measured in the same run as the rows it is compared with."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n)).astype(dtype) for _ in range(2))
    a @ b                                                                    # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2.0 * n**3 / statistics.median(times) / 1e9


def blas_share(rows: list, rate: dict) -> list:
    """For each tiled fwd+bwd row without causal or a window, the rate of its matmul work, counted
    as the tile loop does it: ``4 N M D`` forward and ``10 N M D`` backward (the recomputed
    ``q k^T`` included) per head, as a share of the gemm rate of its dtype: ``(row, GFLOP/s, share)``."""
    found = []
    for r in rows:
        if r["impl"] in ("tiled", "tiled-1") and r["passes"] == "fwd+bwd" and not r["causal"] and r["dtype"] in rate:
            flops = 14.0 * r["n"] * r["n"] * r["dim"] * r["bh"]
            gflops = flops / (r["median_ms"] * 1e-3) / 1e9
            found.append((r, gflops, gflops / rate[r["dtype"]]))
    return found


HEADER = (f"{'impl':<13}{'dtype':<9}{'causal':<7}{'N':>6} {'pass':<8}{'median ms':>10} {'[min - max]':>19}"
          f"{'x naive':>8}{'GFLOP/s':>9}{'peak MiB':>10}")


def format_row(r: dict) -> str:
    spread = f"[{r['min_ms']:.1f} - {r['max_ms']:.1f}]"
    ratio = f"{r['vs_naive']:.2f}" if r["vs_naive"] is not None else "-"
    peak = f"{r['peak_mib']:.1f}" if r["peak_mib"] is not None else "-"
    return (f"{r['impl']:<13}{r['dtype']:<9}{'yes' if r['causal'] else 'no':<7}{r['n']:>6} {r['passes']:<8}"
            f"{r['median_ms']:>10.1f} {spread:>19}{ratio:>8}{r['gflops']:>9.1f}{peak:>10}")


def format_table(rows: list[dict]) -> str:
    return "\n".join([HEADER] + [format_row(r) for r in rows])


def cpu_name() -> str:
    """The CPU's model name and vector width (the AMD AVX2 and Intel AVX-512 machines differ)."""
    name, flags = platform.processor() or platform.machine(), ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name in (platform.processor(), platform.machine()):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = line
    except OSError:
        pass
    width = "AVX-512" if " avx512f" in flags else "AVX2" if " avx2" in flags else "?"
    return f"{name} ({width}, {os.cpu_count()} cores)"


def blas_name() -> str:
    """NumPy's BLAS and its kernels, as threadpoolctl reports them ('unknown' without it)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "unknown (no threadpoolctl)"
    found = [info for info in threadpool_info() if info.get("user_api") == "blas"]
    # SciPy (loaded by transformers, say) brings a BLAS of its own: NumPy's is the one in its wheel
    found.sort(key=lambda info: "numpy" not in str(info.get("filepath", "")))
    for info in found:
        return f"{info.get('internal_api')} {info.get('version')} {info.get('architecture') or ''}".strip()
    return "unknown"


def machine() -> str:
    gpu = gpu_name()
    return f"CPU {cpu_name()}; BLAS {blas_name()}" + (f"; GPU {gpu}" if gpu else "")


def environment() -> dict:
    env = dict(python=platform.python_version(), numpy=np.__version__, machine=platform.machine(),
               processor=platform.processor() or "unknown", cpu=cpu_name(), blas=blas_name())
    if torch_available():
        import torch

        env.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    return env


def write_json(path: str, cfg: BenchConfig, rows: list[dict]) -> None:
    with open(path, "w") as f:
        json.dump(dict(config=asdict(cfg), environment=environment(), rows=rows), f, indent=1)


# ----------------------------------------------------------------------------------------------
# ``npattn bench --suite layers``: the layers against their PyTorch counterparts, side by side.

@dataclass
class LayersConfig:
    """The settings of issue 7's targets (float32, every core)."""

    mha: tuple = (4, 512, 512, 8)            # B, N, E, H: MultiHeadAttention vs torch.nn.MultiheadAttention
    mha_memory: tuple = (1, 4096, 512, 8)    # B, N, E, H: flash layer vs naive layer, causal, peak memory
    gpt: tuple = (4, 256, 4, 512, 8, 128)    # L, E, H, V, B, N: one training step vs Hugging Face GPT-2
    repeats: int = 5
    memory: bool = True
    seed: int = 0


def _timed(run, repeats: int) -> dict:
    run()                                                                    # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) * 1e3)
    return dict(median_ms=statistics.median(times), min_ms=min(times), max_ms=max(times))


def _interleaved(*runs, repeats: int) -> list:
    """Several runs timed in turn, ``repeats`` rounds after one warm-up each: a slow spell of a shared
    machine hits them all."""
    for run in runs:
        run()
    times = [[] for _ in runs]
    for _ in range(repeats):
        for run, out in zip(runs, times):
            t0 = time.perf_counter()
            run()
            out.append((time.perf_counter() - t0) * 1e3)
    return [dict(median_ms=statistics.median(t), min_ms=min(t), max_ms=max(t)) for t in times]


def _mha_runners(b, n, e, h, seed, causal=False):
    from .nn import MultiHeadAttention

    rng = np.random.default_rng(seed)
    x, dout = (rng.standard_normal((b, n, e)).astype(np.float32) for _ in range(2))
    layers = {att: MultiHeadAttention(e, h, attention=att, dtype="float32", seed=seed) for att in ("naive", "flash")}

    def ours(att):
        def run():
            layers[att].forward(x, causal=causal)
            layers[att].backward(dout)
        return run

    def theirs():
        import torch

        ref = torch.nn.MultiheadAttention(e, h, batch_first=True)
        tx, tdout = torch.tensor(x, requires_grad=True), torch.tensor(dout)
        mask = torch.nn.Transformer.generate_square_subsequent_mask(n) if causal else None

        def run():
            out, _ = ref(tx, tx, tx, need_weights=False, attn_mask=mask, is_causal=causal)
            out.backward(tdout)
        return run

    return ours, theirs


def _gpt_runners(L, e, h, v, b, n, seed):
    from .nn import GPT, AdamW
    from .ops import cross_entropy_backward, cross_entropy_forward

    rng = np.random.default_rng(seed)
    ids = rng.integers(0, v, (b, n + 1))
    x, y = ids[:, :-1], ids[:, 1:]

    def theirs_model():
        import transformers

        cfg = transformers.GPT2Config(vocab_size=v, n_positions=n, n_embd=e, n_layer=L, n_head=h, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager")
        return transformers.GPT2LMHeadModel(cfg)

    def ours():
        try:                                                   # the same weights as the torch model
            model = GPT.from_hf_gpt2(theirs_model().state_dict(), num_heads=h, dtype="float32")
        except ImportError:
            from .nn import GPTConfig

            model = GPT(GPTConfig(vocab_size=v, max_len=n, embed_dim=e, num_heads=h, num_layers=L), dtype="float32")
        opt = AdamW(model.params, lr=1e-4)

        def run():
            loss, cache = cross_entropy_forward(model.forward(x), y)
            model.backward(cross_entropy_backward(1.0, cache)[0])
            opt.step(model.grads)
        return run

    def theirs():
        import torch

        model = theirs_model().train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        tx, ty = torch.tensor(x), torch.tensor(y)

        def run():
            opt.zero_grad(set_to_none=True)
            logits = model(tx).logits
            torch.nn.functional.cross_entropy(logits.reshape(-1, v), ty.reshape(-1)).backward()
            opt.step()
        return run

    return ours, theirs


def transformers_available() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def run_layers_bench(cfg: LayersConfig, progress=None) -> list[dict]:
    """Three comparisons, each measured side by side: the MHA layer vs torch's (without and with causal),
    the flash layer's peak memory vs the naive layer's, and a GPT training step vs Hugging Face GPT-2 in
    torch eager."""
    rows = []

    def emit(row):
        rows.append(row)
        if progress:
            progress(row)

    def side_by_side(bench, setting, ours, theirs, their_name, have_them):
        """npattn and its torch counterpart, interleaved run by run (so a slow spell of this shared
        machine hits both); ratio = npattn median / torch median."""
        if have_them:
            mine, other = _interleaved(ours, theirs(), repeats=cfg.repeats)
        else:
            mine, other = _timed(ours, cfg.repeats), None
        ratio = mine["median_ms"] / other["median_ms"] if other else None
        emit(dict(bench=bench, setting=setting, impl="npattn", vs=ratio, peak_mib=None, **mine))
        if other:
            emit(dict(bench=bench, setting=setting, impl=their_name, vs=1.0, peak_mib=None, **other))

    b, n, e, h = cfg.mha
    for causal in (False, True):
        ours, theirs = _mha_runners(b, n, e, h, cfg.seed, causal=causal)
        side_by_side("mha fwd+bwd", f"B={b} N={n} E={e} H={h}" + (" causal" if causal else ""), ours("naive"),
                     theirs, "torch MHA", torch_available())
    if cfg.memory:
        b, n, e, h = cfg.mha_memory
        ours, _ = _mha_runners(b, n, e, h, cfg.seed, causal=True)
        peaks = {att: _peak_bytes(ours(att)) / 2**20 for att in ("naive", "flash")}
        for att in ("naive", "flash"):
            emit(dict(bench="mha memory", setting=f"B={b} N={n} E={e} H={h} causal", impl=f"npattn {att}",
                      vs=peaks[att] / peaks["naive"], peak_mib=peaks[att], median_ms=None, min_ms=None, max_ms=None))
    L, e, h, v, b, n = cfg.gpt
    ours, theirs = _gpt_runners(L, e, h, v, b, n, cfg.seed)
    side_by_side("gpt train step", f"L={L} E={e} H={h} V={v} B={b} N={n}", ours(), theirs, "HF GPT-2",
                 torch_available() and transformers_available())
    return rows


LAYERS_HEADER = f"{'bench':<16}{'setting':<30}{'impl':<15}{'median ms':>10} {'[min - max]':>19}{'ratio':>8}{'peak MiB':>10}"


def format_layers_row(r: dict) -> str:
    """``ratio`` is npattn / torch for the timed rows and flash / naive for the memory rows; in the
    ``beyond`` suite, this row / the first row of its bench."""
    t = f"{r['median_ms']:>10.1f}" if r["median_ms"] is not None else f"{'-':>10}"
    spread = f"[{r['min_ms']:.1f} - {r['max_ms']:.1f}]" if r["min_ms"] is not None else "-"
    ratio = f"{r['vs']:.3f}" if r["vs"] is not None else "-"
    peak = f"{r['peak_mib']:.1f}" if r["peak_mib"] is not None else "-"
    return f"{r['bench']:<16}{r['setting']:<30}{r['impl']:<15}{t} {spread:>19}{ratio:>8}{peak:>10}"


# ``npattn bench --suite beyond``: attention beyond the dense op (derivations 15-18), each against the
# computation it replaces, side by side in one run.

@dataclass
class BeyondConfig:
    """The settings of the targets in benchmarks/RESULTS.md, "Beyond the dense op" (float32)."""

    packed: tuple = (64, 128, 256, 384, 512, 1024, 1536, 2048)   # sequence lengths N_b = M_b, packed
    packed_heads: int = 8
    overhead: tuple = (1, 8, 4096, 64)       # B, H, N, D: the tiled op with and without sinks / cu_seqlens
    paged: tuple = (8, 8, 4096, 64, 256)     # B, H, keys per sequence, D, page size; one query (decode)
    linear: tuple = (8, 64, (4096, 16384))   # H, D, lengths: causal linear attention
    dense: bool = True                       # also time the dense ops with the block-diagonal mask (slow)
    repeats: int = 3
    memory: bool = True
    seed: int = 0


def run_beyond_bench(cfg: BeyondConfig, progress=None) -> list[dict]:
    """Packed vs per-sequence calls vs the dense ops with the block-diagonal mask; the tiled op with
    and without sinks and cu_seqlens; paged decoding vs the tiled op on gathered keys (time and the
    peak memory above the inputs); causal linear attention at two lengths (time and peak)."""
    from .ops.linear_attention import linear_attention_backward, linear_attention_forward
    from .ops.paged import paged_attention_backward, paged_attention_forward

    rows = []
    rng = np.random.default_rng(cfg.seed)
    f32 = np.float32

    def emit(bench, setting, impl, timing, vs, peak=None):
        row = dict(bench=bench, setting=setting, impl=impl, vs=vs, peak_mib=peak, **timing)
        rows.append(row)
        if progress:
            progress(row)

    def normal(shape):
        return rng.standard_normal(shape).astype(f32)

    def pair(forward, backward, *args, **kwargs):
        """fwd+bwd of one call, with a fixed dout."""
        o, _ = forward(*args, **kwargs)
        dout = normal(o.shape)

        def run():
            _, cache = forward(*args, **kwargs)
            backward(dout, cache)
        return run

    # 1. packed sequences: eq. (15.6) against the per-sequence calls and the block-diagonal dense ops
    lens, h = list(cfg.packed), cfg.packed_heads
    cu = np.concatenate([[0], np.cumsum(lens)])
    total = int(cu[-1])
    q, k, v = normal((h, total, 64)), normal((h, total, 64)), normal((h, total, 64))
    setting = f"H={h} D=64 S={len(lens)} total={total}"
    packed = pair(flash_attention_forward, flash_attention_backward, q, k, v, causal=True, cu_seqlens_q=cu,
                  cu_seqlens_k=cu)
    singles = [pair(flash_attention_forward, flash_attention_backward, q[:, a:b], k[:, a:b], v[:, a:b], causal=True)
               for a, b in zip(cu[:-1], cu[1:])]

    def per_sequence():
        for run in singles:
            run()

    mine, theirs = _interleaved(packed, per_sequence, repeats=cfg.repeats)
    emit("packed causal", setting, "tiled packed", mine, 1.0)
    emit("packed causal", setting, "tiled per seq.", theirs, theirs["median_ms"] / mine["median_ms"])
    if cfg.dense:
        block = np.zeros((total, total), dtype=bool)
        for a, b in zip(cu[:-1], cu[1:]):
            block[a:b, a:b] = np.tril(np.ones((b - a, b - a), dtype=bool))
        for name, fwd, bwd in (("tiled dense", flash_attention_forward, flash_attention_backward),
                               ("naive dense", attention_forward, attention_backward)):
            t = _timed(pair(fwd, bwd, q, k, v, mask=block), max(1, cfg.repeats - 2))
            emit("packed causal", setting, name, t, t["median_ms"] / mine["median_ms"])
        del block

    # 2. sinks and cu_seqlens on the same shapes: what each adds to the tiled op
    b, h, n, d = cfg.overhead
    q, k, v = normal((b * h, n, d)), normal((b * h, n, d)), normal((b * h, n, d))
    setting = f"B*H={b * h} N={n} D={d}"
    plain = pair(flash_attention_forward, flash_attention_backward, q, k, v)
    sinks = pair(flash_attention_forward, flash_attention_backward, q, k, v, sinks=normal(b * h))
    one = np.array([0, n])
    varlen = pair(flash_attention_forward, flash_attention_backward, q, k, v, cu_seqlens_q=one, cu_seqlens_k=one)
    base, with_sinks = _interleaved(plain, sinks, repeats=cfg.repeats)
    _, with_varlen = _interleaved(plain, varlen, repeats=cfg.repeats)
    emit("tiled overhead", setting, "plain", base, 1.0)
    emit("tiled overhead", setting, "sinks", with_sinks, with_sinks["median_ms"] / base["median_ms"])
    emit("tiled overhead", setting, "cu_seqlens", with_varlen, with_varlen["median_ms"] / base["median_ms"])

    # 3. paged decoding: pages as key tiles vs the tiled op on the gathered keys
    b, h, m, d, page = cfg.paged
    per_seq = -(-m // page)
    k_pages, v_pages = normal((b * per_seq, h, page, d)), normal((b * per_seq, h, page, d))
    table = rng.permutation(b * per_seq).reshape(b, per_seq)                 # pages scattered over the pool
    seqlens = np.full(b, m)
    q = normal((b, h, 1, d))
    k_full = np.ascontiguousarray(np.stack([k_pages[table[i]].transpose(1, 0, 2, 3).reshape(h, -1, d)[:, :m]
                                            for i in range(b)]))       # (B, H, M, D), for the tiled op
    v_full = np.ascontiguousarray(np.stack([v_pages[table[i]].transpose(1, 0, 2, 3).reshape(h, -1, d)[:, :m]
                                            for i in range(b)]))
    setting = f"B={b} H={h} M={m} page={page}"
    paged = pair(paged_attention_forward, paged_attention_backward, q, k_pages, v_pages, table, seqlens)
    gathered = pair(flash_attention_forward, flash_attention_backward, q, k_full, v_full)
    mine, theirs = _interleaved(paged, gathered, repeats=cfg.repeats)
    emit("paged decode", setting, "paged", mine, 1.0)
    emit("paged decode", setting, "tiled gathered", theirs, theirs["median_ms"] / mine["median_ms"])
    if cfg.memory:                            # the forward's extra memory: one page per sequence at a time
        def gather_then_tiled():              # what a cache without pages costs: the keys made contiguous
            ks = np.stack([k_pages[table[i]].transpose(1, 0, 2, 3).reshape(h, -1, d)[:, :m] for i in range(b)])
            vs = np.stack([v_pages[table[i]].transpose(1, 0, 2, 3).reshape(h, -1, d)[:, :m] for i in range(b)])
            flash_attention_forward(q, ks, vs)

        no_time = dict(median_ms=None, min_ms=None, max_ms=None)
        paged_peak = _peak_bytes(lambda: paged_attention_forward(q, k_pages, v_pages, table, seqlens)) / 2**20
        gathered_peak = _peak_bytes(gather_then_tiled) / 2**20
        emit("paged fwd mem", setting, "paged", no_time, 1.0, paged_peak)
        emit("paged fwd mem", setting, "gather + tiled", no_time,
             gathered_peak / paged_peak, gathered_peak)
    del k_full, v_full

    # 4. causal linear attention: time and peak memory at two lengths
    h, d, lengths = cfg.linear
    first = None
    for n in lengths:
        q, k, v = normal((h, n, d)), normal((h, n, d)), normal((h, n, d))
        run = pair(linear_attention_forward, linear_attention_backward, q, k, v, causal=True)
        t = _timed(run, cfg.repeats)
        first = first or t["median_ms"]
        peak = _peak_bytes(run) / 2**20 if cfg.memory else None
        emit("linear causal", f"H={h} D={d} N={n}", "linear", t, t["median_ms"] / first, peak)
    return rows


# ``npattn bench --suite machine``: how close npattn gets to the machine and to torch, at every level
# (op, layer, model); each target's rows timed interleaved in one run. ``--suite model``: its GPT row.

@dataclass
class MachineConfig:
    """The settings of the targets in benchmarks/RESULTS.md, "Close to the machine" (float32, every
    function called with its defaults)."""

    op: tuple = (1, 8, 4096, 64)              # B, H, N, D: tiled vs torch fused, vs naive; causal vs not
    math: tuple = (1, 8, 2048, 64)            # B, H, N, D: naive vs torch's MATH backend
    mha: tuple = (4, 512, 512, 8)             # B, N, E, H: MultiHeadAttention vs torch's, causal
    gpt: tuple = (4, 256, 4, 512, 8, 128)     # L, E, H, V, B, N: one training step vs Hugging Face GPT-2
    peak: tuple = (1, 4, 8192, 64)            # B, H, N, D: peak memory, tiled vs naive fwd+bwd
    parts: tuple = ("op", "math", "mha", "gpt", "gemm", "memory")
    repeats: int = 5
    memory: bool = True
    seed: int = 0


def _attention_runner(impl, q, k, v, dout, causal=False):
    """fwd+bwd of one implementation with its default arguments: ``naive``, ``tiled`` (npattn) or
    ``torch`` (fused SDPA), ``torch-math`` (SDPA's MATH backend)."""
    if impl.startswith("torch"):
        return _torch_runner(impl, q, k, v, dout, causal, "fwd+bwd")
    return _numpy_runner(impl, q, k, v, dout, causal, "fwd+bwd", None, None)


def run_machine_bench(cfg: MachineConfig, progress=None) -> list[dict]:
    """Each target as a pair of rows, npattn's first with ``vs`` = its median over the second's; the
    torch rows are left out when torch is not installed (and the GPT row when transformers is not)."""
    rows = []
    have_torch = torch_available()

    def emit(bench, setting, impl, timing, vs, peak=None):
        row = dict(bench=bench, setting=setting, impl=impl, vs=vs, peak_mib=peak, **timing)
        rows.append(row)
        if progress:
            progress(row)

    def pair(bench, setting, mine, theirs):
        (name, t), (their_name, u) = mine, theirs
        emit(bench, setting, name, t, t["median_ms"] / u["median_ms"])
        emit(bench, setting, their_name, u, 1.0)

    def inputs(b, h, n, d):
        rng = np.random.default_rng(cfg.seed)
        return [rng.standard_normal((b, h, n, d)).astype(np.float32) for _ in range(4)]

    if "op" in cfg.parts:
        b, h, n, d = cfg.op
        args, setting = inputs(b, h, n, d), f"B={b} H={h} N={n} D={d}"
        names = ["tiled", "naive", "tiled causal"] + (["torch"] if have_torch else [])
        runs = [_attention_runner(x.split()[0], *args, causal=x.endswith("causal")) for x in names]
        timing = dict(zip(names, _interleaved(*runs, repeats=cfg.repeats)))
        if have_torch:
            pair("tiled/torch", setting, ("tiled", timing["tiled"]), ("torch fused", timing["torch"]))
        pair("tiled/naive", setting, ("tiled", timing["tiled"]), ("naive", timing["naive"]))
        pair("causal/non", setting, ("tiled causal", timing["tiled causal"]), ("tiled", timing["tiled"]))
        if "gemm" in cfg.parts:                       # the tiled loop's matmul work against the machine's gemm
            rate = gemm_rate("float32", repeats=cfg.repeats)
            flops = 14.0 * n * n * d * b * h          # 4 N M D forward + 10 N M D backward (recomputed q k^T)
            share = flops / (timing["tiled"]["median_ms"] * 1e-3) / 1e9 / rate
            gemm_ms = 2.0 * 2048**3 / rate / 1e6
            emit("tiled/sgemm", setting, "tiled", timing["tiled"], share)
            emit("tiled/sgemm", "2048 x 2048, every core", "sgemm", dict(median_ms=gemm_ms, min_ms=gemm_ms,
                                                                          max_ms=gemm_ms), 1.0)
    if "math" in cfg.parts and have_torch:
        b, h, n, d = cfg.math
        args = inputs(b, h, n, d)
        mine, theirs = _interleaved(_attention_runner("naive", *args), _attention_runner("torch-math", *args),
                                    repeats=cfg.repeats)
        pair("naive/math", f"B={b} H={h} N={n} D={d}", ("naive", mine), ("torch MATH", theirs))
    if "mha" in cfg.parts and have_torch:
        b, n, e, h = cfg.mha
        ours, theirs = _mha_runners(b, n, e, h, cfg.seed, causal=True)
        mine, other = _interleaved(ours("naive"), theirs(), repeats=cfg.repeats)
        pair("mha/torch", f"B={b} N={n} E={e} H={h} causal", ("npattn MHA", mine), ("torch MHA", other))
    if "gpt" in cfg.parts and have_torch and transformers_available():
        L, e, h, v, b, n = cfg.gpt
        ours, theirs = _gpt_runners(L, e, h, v, b, n, cfg.seed)
        mine, other = _interleaved(ours(), theirs(), repeats=cfg.repeats)
        pair("gpt/HF", f"L={L} E={e} H={h} V={v} B={b} N={n}", ("npattn GPT", mine), ("HF GPT-2", other))
    if "memory" in cfg.parts and cfg.memory:
        b, h, n, d = cfg.peak
        args = inputs(b, h, n, d)
        peaks = {impl: _peak_bytes(_attention_runner(impl, *args)) / 2**20 for impl in ("tiled", "naive")}
        none = dict(median_ms=None, min_ms=None, max_ms=None)
        emit("memory t/n", f"B={b} H={h} N={n} D={d}", "tiled", none, peaks["tiled"] / peaks["naive"], peaks["tiled"])
        emit("memory t/n", f"B={b} H={h} N={n} D={d}", "naive", none, 1.0, peaks["naive"])
    return rows
