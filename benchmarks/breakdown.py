"""Where the time goes: BLAS calls vs elementwise passes vs copies, per benchmark case.

Runs each case of ``npattn bench --suite machine`` (npattn's side only, default arguments) under
py-spy with native frames and sorts every sample by the function it was in (the innermost frame):

- BLAS kernel: the gemm micro-kernel (``sgemm_kernel_*``), and gemv;
- BLAS packing: OpenBLAS copying operands into its panel layout (``*_incopy``, ``*_oncopy``, ...);
- BLAS C zeroing: the ``beta = 0`` pass that clears the output before the kernel adds into it;
- BLAS threads' hand-off: the calling thread's part of a matmul split over BLAS's own threads;
- exp / log / tanh, row reductions (max, sum, vecdot), other elementwise (add, subtract, multiply,
  where, copyto), copies (casts, strided copies, memcpy), allocation and page faults (fresh
  memory: libc, and the first touch of new pages), waiting for the GIL (a NumPy call taking it
  back after its loop, with two workers), Python and the rest.

Threads waiting for work (the worker pool's queue, the main thread waiting for its workers) are
left out; shares are of the samples of working threads. py-spy sees Python threads only: where BLAS
runs on its own threads (one npattn worker: the MHA layer's and the GPT's matmuls), their half of
each matmul is not sampled, and the calling thread's hand-off to them shows as "BLAS threads'
hand-off"; where npattn runs two workers (the tiled op, the naive op at N=2048), BLAS runs inside
them and everything is sampled. py-spy pauses the process to sample, so absolute times are not
meaningful; the shares are. Usage (py-spy is not a dependency: ``pip install py-spy``)::

    python benchmarks/breakdown.py                 # every case
    python benchmarks/breakdown.py tiled naive     # some of them
    python benchmarks/breakdown.py --lines tiled   # also the 15 source lines that cost most

Cases: ``tiled`` (fwd+bwd, B=1, H=8, N=M=4096, D=64, float32), ``tiled-causal`` (the same, causal),
``naive`` (fwd+bwd at N=2048), ``mha`` (MultiHeadAttention fwd+bwd, B=4, N=512, E=512, H=8,
causal), ``gpt`` (one GPT training step, L=4, E=256, H=4, V=512, B=8, N=128, with AdamW).
"""

from __future__ import annotations

import collections
import linecache
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

CASES = {
    "tiled": "attention('tiled', 4096, False)",
    "tiled-causal": "attention('tiled', 4096, True)",
    "naive": "attention('naive', 2048, False)",
    "mha": "mha()",
    "gpt": "gpt()",
}

RUNNER = """
import sys
import numpy as np
from npattn.bench import _attention_runner, _gpt_runners, _mha_runners

def attention(impl, n, causal):
    rng = np.random.default_rng(0)
    args = [rng.standard_normal((1, 8, n, 64)).astype(np.float32) for _ in range(4)]
    return _attention_runner(impl, *args, causal=causal)

def mha():
    ours, _ = _mha_runners(4, 512, 512, 8, 0, causal=True)
    return ours("naive")

def gpt():
    ours, _ = _gpt_runners(4, 256, 4, 512, 8, 128, 0)
    return ours()

run = {case}
run()                                          # warm-up, and the one-time setup, before sampling starts
sys.stdout.write("ready\\n"); sys.stdout.flush(); sys.stdin.readline()
for _ in range({repeats}):
    run()
sys.stdout.write("done\\n"); sys.stdout.flush(); sys.stdin.readline()    # sampling stops before the exit's teardown
"""

ORDER = ["BLAS kernel", "BLAS packing", "BLAS C zeroing", "BLAS threads' hand-off", "exp / log / tanh", "row reductions",
         "other elementwise", "copies", "allocation, page faults", "waiting for the GIL", "Python and the rest"]


def category(frames: list) -> str:
    """The category of one sample from its frames (outermost first), or None for a thread waiting for
    work (the worker pool's queue, the main thread waiting for its workers)."""
    names = [f.rsplit(" (", 1)[0] for f in frames]
    if "PyThread_acquire_lock_timed" in names:
        return None
    leaf, caller = names[-1].lower(), (names[-2].lower() if len(names) > 1 else "")
    if "pthread_cond" in caller or "pthread_cond" in leaf:
        return "waiting for the GIL"                  # a NumPy call taking the GIL back after its loop
    if "gemm_beta" in leaf or "gemm_beta" in caller:
        return "BLAS C zeroing"
    if re.search(r"incopy|oncopy|itcopy|otcopy", leaf):
        return "BLAS packing"
    if re.search(r"gemm|gemv", leaf):
        return "BLAS kernel"
    if leaf in ("inner_thread", "exec_blas"):
        return "BLAS threads' hand-off"               # this thread's part of a multi-threaded BLAS call
    if re.search(r"exp|log|tanh", leaf):
        return "exp / log / tanh"
    if re.search(r"reduce|maximum|pairwise_sum|vecdot|_dot", leaf):
        return "row reductions"
    if re.search(r"strided_to|contig|cast|copy|memcpy|memmove|transfer", leaf):
        return "copies"
    if re.search(r"add|subtract|multiply|divide|where|less|greater|equal|minimum|logical|sqrt|square|power", leaf):
        return "other elementwise"
    if leaf.startswith("0x") or re.search(r"calloc|malloc|free|mmap", caller + leaf):
        return "allocation, page faults"
    return "Python and the rest"


def profile(case: str, repeats: int, rate: int = 250) -> str:
    """Run ``case`` under py-spy (attached once the warm-up is done) and return the raw samples."""
    spy = shutil.which("py-spy")
    if spy is None:
        sys.exit("py-spy is not installed: pip install py-spy")
    script = RUNNER.format(case=CASES[case], repeats=repeats)
    out = tempfile.NamedTemporaryFile(suffix=".txt", delete=False).name
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    spy_run = subprocess.Popen([spy, "record", "--native", "--threads", "--format", "raw", "-r", str(rate), "-o", out,
                                "--pid", str(child.pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)                                # let py-spy attach
    child.stdin.write("\n")
    child.stdin.flush()
    assert child.stdout.readline().strip() == "done"
    spy_run.send_signal(signal.SIGINT)             # py-spy writes what it has and stops
    spy_run.wait()
    child.stdin.write("\n")
    child.stdin.flush()
    child.wait()
    with open(out) as f:
        text = f.read()
    os.unlink(out)
    return text


def breakdown(raw: str):
    shares, lines = collections.Counter(), collections.Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        what = category(frames)
        if what is None:
            continue
        shares[what] += int(count)
        ours = [f for f in frames if "npattn/" in f]
        if ours:
            lines[ours[-1].rsplit(" (", 1)[-1].rstrip(")")] += int(count)
    return shares, lines


def main(argv: list) -> int:
    show_lines = "--lines" in argv
    cases = [a for a in argv if not a.startswith("--")] or list(CASES)
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        sys.exit(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    from npattn.bench import machine

    print(f"machine: {machine()}")
    table = {}
    for case in cases:
        shares, lines = breakdown(profile(case, repeats=3 if case.startswith(("tiled", "naive")) else 10))
        total = sum(shares.values())
        table[case] = {k: 100.0 * shares[k] / total for k in ORDER}
        print(f"{case}: {total} samples", flush=True)
        if show_lines:
            root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            for where, n in lines.most_common(15):
                path, _, number = where.rpartition(":")
                code = linecache.getline(os.path.join(root, path), int(number)).strip()[:80] if number.isdigit() else ""
                print(f"  {100.0 * n / total:5.1f}%  {where:34s} {code}")
    print("\n| part | " + " | ".join(table) + " |")
    print("| --- |" + " --- |" * len(table))
    for k in ORDER:
        print(f"| {k} | " + " | ".join(f"{table[c][k]:.1f}%" for c in table) + " |")
    blas = {c: sum(table[c][k] for k in ORDER[:4]) for c in table}
    print("| **all BLAS** | " + " | ".join(f"**{blas[c]:.1f}%**" for c in table) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
