"""The command line: each command is a small function over the library; the parser checks every flag
(sizes, seeds, choices, output paths, the backend and its device) before any work starts, and a bad
one is a single line, ``npattn <command>: error: ...``, with exit status 2."""

from __future__ import annotations

import argparse
import os
import sys
import time

DESCRIPTION = """npattn: Transformer attention in plain array code, every backward derived by hand.

'npattn COMMAND --help' lists a command's flags."""

__all__ = ["main"]


def check(args) -> int:
    """Run every gradient check, print a table row per input as it completes; 1 on any failure."""
    from .checks import cases, run_case

    selected = [c for c in cases(args.seed) if args.k is None or args.k.lower() in f"{c.op} {c.name}".lower()]
    if not selected:
        print(f"npattn check: error: argument -k: no case matches {args.k!r}", file=sys.stderr)
        return 2
    where = "" if args.backend == "numpy" else f", on {args.backend}" + (f" ({args.device})" if args.device else "")
    print(f"npattn check: {len(selected)} cases, float64 central differences, random dout (seed {args.seed}), "
          f"mode={args.mode} (layers: directional){where}", flush=True)
    header = f"{'op':<18}{'case':<40}{'input':<22}{'shape':<13}{'max abs err':>12}{'max rel err':>12}  ok"
    print(header)
    print("-" * len(header), flush=True)
    t0, failed, worst, zeros = time.perf_counter(), [], {}, 0
    for case in selected:
        report = run_case(case, mode=args.mode, seed=args.seed, library=args.backend, device=args.device)
        for r in report.rows:
            # a gradient that is 0 by the math (attention's key bias) has only rounding noise to
            # compare: its relative error means nothing, so it is marked and left out of the summary
            zero = r.max_rel_err > 0 and r.max_abs_err / r.max_rel_err <= case.atol
            rel = "   (grad = 0)" if zero and r.ok else f"{r.max_rel_err:>12.2e}"
            print(f"{case.op:<18}{case.name:<40}{r.name:<22}{str(r.shape):<13}{r.max_abs_err:>12.2e}"
                  f"{rel}  {'ok' if r.ok else 'FAIL'}", flush=True)
            zeros += zero
            if not zero:
                worst[case.op] = max(worst.get(case.op, 0.0), r.max_rel_err)
        if not report.ok:
            failed.append(f"{case.op}: {case.name}")
    print("-" * len(header))
    print("worst relative error per op: " + ", ".join(f"{op} {err:.1e}" for op, err in worst.items()))
    if zeros:
        print(f"{zeros} rows have a zero true gradient (max abs err <= the case's atol)")
    elapsed = time.perf_counter() - t0
    if failed:
        print(f"FAILED {len(failed)} of {len(selected)} cases in {elapsed:.1f} s: " + "; ".join(failed))
        return 1
    print(f"all {len(selected)} cases passed in {elapsed:.1f} s")
    return 0


def bench(args) -> int:
    """Naive vs tiled (vs torch when installed) timing and memory, as one table; ``--suite layers``
    compares the layers with their PyTorch counterparts instead."""
    from .bench import (HEADER, BenchConfig, blas_share, format_row, gemm_rate, machine, run_bench, torch_available,
                        write_json)

    if args.suite == "layers":
        return bench_layers(args)
    if args.suite == "beyond":
        return bench_beyond(args)
    if args.suite in ("machine", "model"):
        return bench_machine(args)

    cfg = BenchConfig(lengths=args.n, dtypes=args.dtype, causal=args.causal, passes=args.passes,
                      impls=args.impl, batch=args.batch, heads=args.heads, dim=args.dim,
                      block=args.block, workers=args.workers, window=tuple(args.window) if args.window else None,
                      repeats=args.repeats, memory=not args.no_memory, seed=args.seed,
                      backend=args.backend, device=args.device)
    on = "" if cfg.backend == "numpy" else f"npattn on {cfg.backend}" + (f" ({cfg.device})" if cfg.device else "") + "; "
    print(f"npattn bench: {on}B={cfg.batch} H={cfg.heads} D=Dv={cfg.dim} N=M in {cfg.lengths}, "
          f"tiles {cfg.block or 'default'}, tiled on {cfg.workers or 'default'} workers; {machine()}; "
          f"median of {cfg.repeats}" + ("" if torch_available() else " (torch not installed: no torch rows)"),
          flush=True)
    print(HEADER, flush=True)
    rows = run_bench(cfg, progress=lambda row: print(format_row(row), flush=True))
    if cfg.backend == "numpy":                        # the tiled loop's matmul work against the machine's gemm
        rate = {dt: gemm_rate(dt) for dt in sorted({r["dtype"] for r in rows})}
        print("gemm (2048 x 2048, NumPy's BLAS, this run): " + ", ".join(f"{dt} {g:.0f} GFLOP/s" for dt, g in rate.items()))
        for r, gflops, share in blas_share(rows, rate):
            print(f"gemm share of {r['impl']} {r['dtype']} N={r['n']} fwd+bwd: {gflops:.0f} GFLOP/s counting 14 N M D per head "
                  f"(the backward's recomputed q k^T included) = {100 * share:.0f}% of gemm")
    if args.json:
        write_json(args.json, cfg, rows)
        print(f"wrote {args.json}")
    return 0


def demo(args) -> int:
    """Train a small GPT by hand on a toy task, decode with the KV cache, optionally draw pictures."""
    from .demo import DemoConfig, run_demo

    cfg = DemoConfig(task=args.task, steps=args.steps, seed=args.seed, dtype=args.dtype, length=args.length)
    metrics = run_demo(cfg, plot_dir=args.plot, json_path=args.json)
    return 0 if metrics["held_out_token_acc"] >= 0.99 or args.steps < DemoConfig().steps else 1


def golden(args) -> int:
    """Write float64 golden cases (.npz) and their index for a kernel's own CI."""
    from .testing import write_golden

    index = write_golden(args.out, dtype=args.dtype, seed=args.seed, variants=args.variants)
    for entry in index:
        print(f"{entry['file']}  {entry['case']}")
    print(f"wrote {len(index)} cases and index.json to {args.out} (inputs rounded to {args.dtype}; answers float64)")
    return 0


def verify(args) -> int:
    """Import a kernel (``--fn MODULE:FUNCTION`` or ``FILE.py:FUNCTION``) and print ``check_attention``'s
    report, against the golden files with ``--golden``; 1 on any failure, 2 for a bad flag."""
    import os

    from .testing.attention_check import check_attention, load_function
    from .testing.golden import golden_cases

    def bad(message: str) -> int:
        print(f"npattn verify: error: {message}", file=sys.stderr)
        return 2
    battery = None
    if args.golden is not None:
        if not os.path.isfile(os.path.join(args.golden, "index.json")):
            return bad(f"--golden: no index.json in {args.golden!r} (write the files with npattn golden --out DIR)")
        if args.variants:
            return bad("--variants with --golden: the golden files fix the cases (npattn golden --variants ...)")
        battery = golden_cases(args.golden)
        if args.dtype is not None and battery and battery[0].dtype != args.dtype:
            return bad(f"--dtype {args.dtype}: the golden inputs are rounded to {battery[0].dtype} "
                       f"(write them with npattn golden --dtype {args.dtype})")
    try:
        fn = load_function(args.fn)
    except ValueError as err:
        return bad(str(err))
    report = check_attention(fn, dtype=args.dtype or "float32", cases=battery, variants=args.variants, seed=args.seed)
    print(report)
    return 0 if report.ok else 1


def grade(args) -> int:
    """Grade an exercise file: each ``<op>_backward`` it defines against npattn's, with the diagnosis."""
    from .testing.grade import grade_file

    return grade_file(args.file, dtype=args.dtype, seed=args.seed)


def bench_layers(args) -> int:
    from .bench import LayersConfig, run_layers_bench

    cfg = LayersConfig(repeats=args.repeats, memory=not args.no_memory, seed=args.seed)
    return _side_by_side_suite(args, cfg, run_layers_bench, f"npattn bench --suite layers: float32, median of "
                               f"{cfg.repeats}; ratio = npattn / torch (memory rows: flash / naive)")


def bench_beyond(args) -> int:
    from .bench import BeyondConfig, run_beyond_bench

    cfg = BeyondConfig(repeats=args.repeats, memory=not args.no_memory, seed=args.seed)
    return _side_by_side_suite(args, cfg, run_beyond_bench, f"npattn bench --suite beyond: float32, fwd+bwd, median "
                               f"of {cfg.repeats}; ratio = row / the bench's first row; peak = NumPy allocations above "
                               f"the inputs")


def bench_machine(args) -> int:
    from .bench import MachineConfig, run_machine_bench

    only = {} if args.suite == "machine" else dict(parts=("gpt",))
    cfg = MachineConfig(repeats=args.repeats, memory=not args.no_memory, seed=args.seed, **only)
    return _side_by_side_suite(args, cfg, run_machine_bench, f"npattn bench --suite {args.suite}: float32, fwd+bwd, "
                               f"default arguments, median of {cfg.repeats}, each pair interleaved; ratio = row / "
                               f"the pair's second row (tiled/sgemm: the share of the gemm rate, counting 14 N M D "
                               f"per head; memory: peak NumPy allocations)")


def _side_by_side_suite(args, cfg, run, title: str) -> int:
    """A suite whose rows compare two computations side by side: its title and the machine, the
    table as it runs, and the JSON when asked."""
    from .bench import LAYERS_HEADER, format_layers_row, machine, write_json

    print(f"{title}; {machine()}", flush=True)
    print(LAYERS_HEADER, flush=True)
    rows = run(cfg, progress=lambda row: print(format_layers_row(row), flush=True))
    if args.json:
        write_json(args.json, cfg, rows)
        print(f"wrote {args.json}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, with every error as one line, ``npattn <command>: error: ...``, and exit status 2
    (argparse's status; its usage line is left out: ``--help`` shows it)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _at_least(minimum: int):
    """An argparse type: an int >= ``minimum`` (argparse names the flag and the value)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an int, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    parse.__name__ = "int"
    return parse


def _writable_file(text: str) -> str:
    """An argparse type: a file that can be written, tried now (an empty probe made and removed, or
    the existing file opened to append), so a bad path is an error before the work, not after it."""
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a folder, not a file")
    existed = os.path.exists(text)
    try:
        with open(text, "a"):
            pass
    except OSError as err:
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: {err.strerror}") from None
    if not existed:
        os.remove(text)
    return text


def _writable_dir(text: str) -> str:
    """An argparse type: a folder that can be written: made now if it is not there (it will be
    written anyway), and a probe file created in it and removed."""
    try:
        os.makedirs(text, exist_ok=True)
        probe = os.path.join(text, f".npattn-probe-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as err:
        raise argparse.ArgumentTypeError(f"cannot write into {text!r}: {err.strerror}") from None
    return text


def _check_place(parser, args) -> None:
    """``--backend``/``--device`` must name a library that is installed and a device it has: one
    small array is made there now, so a missing GPU is a one-line error before any work."""
    backend, device = getattr(args, "backend", "numpy"), getattr(args, "device", None)
    if backend == "numpy" and device is None:
        return
    import numpy as np

    from .backend import library, move

    sub = f"npattn {args.command}"
    try:
        xp = library(backend)
    except ModuleNotFoundError as err:
        parser.exit(2, f"{sub}: error: argument --backend: {backend} is not installed ({err})\n")
    if device is None and backend == "torch":
        return                                        # torch's own default: CUDA when present
    try:
        move(np.zeros(1), xp, device)
    except Exception as err:                          # noqa: BLE001 - each library words it its own way
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        parser.exit(2, f"{sub}: error: argument --device: {device!r} is not a device of {backend} ({message})\n")


def _parser() -> argparse.ArgumentParser:
    from .bench import BenchConfig

    from .backend import LIBRARIES

    d = BenchConfig()  # the defaults live in one place
    positive, seed = _at_least(1), _at_least(0)

    def where(command):
        command.add_argument("--backend", choices=LIBRARIES, default="numpy",
                             help="the array library npattn runs on: cupy for a GPU, torch (CUDA when present)")
        command.add_argument("--device", default=None,
                             help="its device, e.g. cuda:1 for torch (default: the library's; torch: cuda if present)")
    parser = _Parser(prog="npattn", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("check", help="gradient-check every forward/backward pair and print a table")
    p.add_argument("-k", help="only cases whose 'op case' text contains this")
    p.add_argument("--mode", choices=["full", "directional"], default="full",
                   help="full: every input entry (default); directional: random directions, for large inputs")
    p.add_argument("--seed", type=seed, default=0, help="seed of the inputs and of the random dout (>= 0)")
    where(p)
    p.set_defaults(func=check)

    def truth(text: str) -> bool:
        value = {"yes": True, "true": True, "1": True, "no": False, "false": False, "0": False}.get(text.lower())
        if value is None:
            raise argparse.ArgumentTypeError(f"must be yes or no, got {text!r}")
        return value
    truth.__name__ = "yes/no"

    b = sub.add_parser("bench", help="time and peak memory of naive vs tiled attention (or of the layers)")
    b.add_argument("--suite", choices=["attention", "layers", "beyond", "machine", "model"], default="attention",
                   help="attention: the ops (default); layers: MHA, flash-layer memory, a GPT training step vs "
                        "torch; beyond: packed, sinks, paged decoding, linear attention; machine: the op, layer "
                        "and model against torch and the gemm rate; model: its GPT training step only")
    b.add_argument("--n", type=positive, nargs="+", default=d.lengths, help="sequence lengths N = M")
    b.add_argument("--dtype", nargs="+", default=d.dtypes, choices=["float32", "float64"])
    b.add_argument("--causal", type=truth, nargs="+", default=d.causal, help="yes and/or no")
    b.add_argument("--passes", nargs="+", default=d.passes, choices=["fwd", "fwd+bwd"])
    b.add_argument("--impl", nargs="+", default=d.impls,
                   choices=["naive", "tiled", "tiled-1", "tiled-window", "torch", "torch-math"])
    b.add_argument("--window", type=seed, nargs=2, metavar=("LEFT", "RIGHT"), default=None,
                   help="the window of the 'tiled-window' rows (e.g. 255 0 with --causal yes: Mistral's)")
    b.add_argument("--batch", type=positive, default=d.batch)
    b.add_argument("--heads", type=positive, default=d.heads)
    b.add_argument("--dim", type=positive, default=d.dim)
    b.add_argument("--block", type=positive, default=d.block,
                   help="tile size of the tiled rows (default: the op's own, 256)")
    b.add_argument("--workers", type=positive, default=d.workers,
                   help="threads of the 'tiled' rows (default: the op's own rule; 'tiled-1' uses 1)")
    b.add_argument("--repeats", type=positive, default=d.repeats)
    b.add_argument("--no-memory", action="store_true", help="skip the tracemalloc peak-memory runs")
    b.add_argument("--seed", type=seed, default=0)
    b.add_argument("--json", type=_writable_file, help="also write the rows to this JSON file")
    where(b)
    b.set_defaults(func=bench)
    from .demo import TASKS, DemoConfig

    dm = DemoConfig()
    m = sub.add_parser("demo", help="train a small GPT with the hand-derived backward on a toy task, then decode")
    m.add_argument("--task", choices=TASKS, default=dm.task)
    m.add_argument("--steps", type=positive, default=dm.steps)
    m.add_argument("--length", type=_at_least(2), default=dm.length, help="digits per input (>= 2)")
    m.add_argument("--seed", type=seed, default=dm.seed)
    m.add_argument("--dtype", choices=["float32", "float64"], default=dm.dtype)
    m.add_argument("--json", type=_writable_file, help="write the loss curve and final metrics to this file")
    m.add_argument("--plot", type=_writable_dir, metavar="DIR", help="write PNG pictures to DIR (needs matplotlib)")
    m.set_defaults(func=demo)

    from .testing.attention_check import VARIANTS

    gl = sub.add_parser("golden", help="write float64 reference cases (.npz + index.json) for a kernel's CI")
    gl.add_argument("--out", type=_writable_dir, required=True, help="directory to write to")
    gl.add_argument("--dtype", choices=["float64", "float32", "float16"], default="float32",
                    help="the dtype the inputs are rounded to (the answers are float64)")
    gl.add_argument("--seed", type=seed, default=0)
    gl.add_argument("--variants", nargs="+", choices=VARIANTS, default=[],
                    help="add the cases of these variants (keyword arguments as npattn's ops take them)")
    gl.set_defaults(func=golden)

    vf = sub.add_parser("verify", help="check your attention kernel against the float64 truth (exit 1 on failure)")
    vf.add_argument("--fn", required=True, metavar="MODULE:FUNCTION",
                    help="the kernel: fn(q, k, v, *, mask=None, causal=False, scale=None) -> o or (o, lse), torch")
    vf.add_argument("--golden", metavar="DIR", help="check against the golden files in DIR (npattn golden)")
    vf.add_argument("--dtype", choices=["float64", "float32", "float16", "bfloat16"], default=None,
                    help="the dtype of the inputs (default float32, or the golden files')")
    vf.add_argument("--variants", nargs="+", choices=VARIANTS, default=[],
                    help="add the cases of these variants; fn then receives their keyword arguments")
    vf.add_argument("--seed", type=seed, default=0)
    vf.set_defaults(func=verify)

    gr = sub.add_parser("grade", help="grade an exercise file (exercises/): each <op>_backward it defines, "
                                      "with the classic wrong form it follows named")
    gr.add_argument("file", help="the Python file to grade, e.g. exercises/01_softmax.py")
    gr.add_argument("--dtype", choices=["float64", "float32", "float16"], default="float64",
                    help="the dtype of the inputs your functions get (the truth is float64)")
    gr.add_argument("--seed", type=seed, default=0)
    gr.set_defaults(func=grade)
    return parser


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    sub = f"npattn {args.command}"
    if args.command == "bench" and "tiled-window" in args.impl and args.window is None:
        parser.exit(2, f"{sub}: error: argument --impl: tiled-window needs --window LEFT RIGHT\n")
    if args.command == "demo" and args.plot:
        from .plots import require_matplotlib
        try:
            require_matplotlib()                      # fail before training, naming the extra
        except ModuleNotFoundError as err:
            parser.exit(2, f"{sub}: error: argument --plot: {err}\n")
    _check_place(parser, args)
    try:
        return args.func(args)
    except ModuleNotFoundError as err:                # an optional extra is missing: say which
        print(f"npattn {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
