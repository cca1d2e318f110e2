"""Command line: ``npattn check``, ``npattn bench`` and ``npattn demo``; each command is a small
function over the library."""

from __future__ import annotations

import argparse
import sys
import time

__all__ = ["main"]


def check(args) -> int:
    """Run every gradient check, print a table row per input as it completes; 1 on any failure."""
    from .checks import cases, run_case

    selected = [c for c in cases(args.seed) if args.k is None or args.k.lower() in f"{c.op} {c.name}".lower()]
    if not selected:
        print(f"no case matches -k {args.k!r}", file=sys.stderr)
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
    from .bench import HEADER, BenchConfig, format_row, machine, run_bench, torch_available, write_json

    if args.suite == "layers":
        return bench_layers(args)
    if args.suite == "beyond":
        return bench_beyond(args)

    if "tiled-window" in args.impl and args.window is None:
        print("--impl tiled-window needs --window LEFT RIGHT", file=sys.stderr)
        return 2
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
    if args.json:
        write_json(args.json, cfg, rows)
        print(f"wrote {args.json}")
    return 0


def demo(args) -> int:
    """Train a small GPT by hand on a toy task, decode with the KV cache, optionally draw pictures."""
    from .demo import DemoConfig, run_demo

    if args.plot:
        from .plots import require_matplotlib

        require_matplotlib()                          # fail before training, naming the extra
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
    from .bench import LAYERS_HEADER, LayersConfig, format_layers_row, machine, run_layers_bench, write_json

    cfg = LayersConfig(repeats=args.repeats, memory=not args.no_memory, seed=args.seed)
    print(f"npattn bench --suite layers: float32, median of {cfg.repeats}; ratio = npattn / torch "
          f"(memory rows: flash / naive); {machine()}", flush=True)
    print(LAYERS_HEADER, flush=True)
    rows = run_layers_bench(cfg, progress=lambda row: print(format_layers_row(row), flush=True))
    if args.json:
        write_json(args.json, cfg, rows)
        print(f"wrote {args.json}")
    return 0


def bench_beyond(args) -> int:
    from .bench import LAYERS_HEADER, BeyondConfig, format_layers_row, machine, run_beyond_bench, write_json

    cfg = BeyondConfig(repeats=args.repeats, memory=not args.no_memory, seed=args.seed)
    print(f"npattn bench --suite beyond: float32, fwd+bwd, median of {cfg.repeats}; ratio = row / the bench's "
          f"first row; peak = NumPy allocations above the inputs; {machine()}", flush=True)
    print(LAYERS_HEADER, flush=True)
    rows = run_beyond_bench(cfg, progress=lambda row: print(format_layers_row(row), flush=True))
    if args.json:
        write_json(args.json, cfg, rows)
        print(f"wrote {args.json}")
    return 0


def _parser() -> argparse.ArgumentParser:
    from .bench import BenchConfig

    from .backend import LIBRARIES

    d = BenchConfig()  # the defaults live in one place

    def where(command):
        command.add_argument("--backend", choices=LIBRARIES, default="numpy",
                             help="the array library npattn runs on: cupy for a GPU, torch (CUDA when present)")
        command.add_argument("--device", default=None,
                             help="its device, e.g. cuda:1 for torch (default: the library's; torch: cuda if present)")
    parser = argparse.ArgumentParser(prog="npattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check", help="gradient-check every forward/backward pair and print a table")
    p.add_argument("-k", help="only cases whose 'op case' text contains this")
    p.add_argument("--mode", choices=["full", "directional"], default="full")
    p.add_argument("--seed", type=int, default=0)
    where(p)
    p.set_defaults(func=check)

    def truth(text: str) -> bool:
        return {"yes": True, "true": True, "1": True, "no": False, "false": False, "0": False}[text.lower()]

    b = sub.add_parser("bench", help="time and peak memory of naive vs tiled attention (or of the layers)")
    b.add_argument("--suite", choices=["attention", "layers", "beyond"], default="attention",
                   help="attention: the ops (default); layers: MHA, flash-layer memory, a GPT training step vs "
                        "torch; beyond: packed, sinks, paged decoding, linear attention")
    b.add_argument("--n", type=int, nargs="+", default=d.lengths, help="sequence lengths N = M")
    b.add_argument("--dtype", nargs="+", default=d.dtypes, choices=["float32", "float64"])
    b.add_argument("--causal", type=truth, nargs="+", default=d.causal, help="yes and/or no")
    b.add_argument("--passes", nargs="+", default=d.passes, choices=["fwd", "fwd+bwd"])
    b.add_argument("--impl", nargs="+", default=d.impls,
                   choices=["naive", "tiled", "tiled-1", "tiled-window", "torch", "torch-math"])
    b.add_argument("--window", type=int, nargs=2, metavar=("LEFT", "RIGHT"), default=None,
                   help="the window of the 'tiled-window' rows (e.g. 255 0 with --causal yes: Mistral's)")
    b.add_argument("--batch", type=int, default=d.batch)
    b.add_argument("--heads", type=int, default=d.heads)
    b.add_argument("--dim", type=int, default=d.dim)
    b.add_argument("--block", type=int, default=d.block,
                   help="tile size of the tiled rows (default: the op's own, 256)")
    b.add_argument("--workers", type=int, default=d.workers,
                   help="threads of the 'tiled' rows (default: the op's own rule; 'tiled-1' uses 1)")
    b.add_argument("--repeats", type=int, default=d.repeats)
    b.add_argument("--no-memory", action="store_true", help="skip the tracemalloc peak-memory runs")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--json", help="also write the rows to this JSON file")
    where(b)
    b.set_defaults(func=bench)
    from .demo import TASKS, DemoConfig

    dm = DemoConfig()
    m = sub.add_parser("demo", help="train a small GPT with the hand-derived backward on a toy task, then decode")
    m.add_argument("--task", choices=TASKS, default=dm.task)
    m.add_argument("--steps", type=int, default=dm.steps)
    m.add_argument("--length", type=int, default=dm.length, help="digits per input")
    m.add_argument("--seed", type=int, default=dm.seed)
    m.add_argument("--dtype", choices=["float32", "float64"], default=dm.dtype)
    m.add_argument("--json", help="write the loss curve and final metrics to this file")
    m.add_argument("--plot", metavar="DIR", help="write PNG pictures to DIR (needs matplotlib)")
    m.set_defaults(func=demo)

    from .testing.attention_check import VARIANTS

    gl = sub.add_parser("golden", help="write float64 reference cases (.npz + index.json) for a kernel's CI")
    gl.add_argument("--out", required=True, help="directory to write to")
    gl.add_argument("--dtype", choices=["float64", "float32", "float16"], default="float32",
                    help="the dtype the inputs are rounded to (the answers are float64)")
    gl.add_argument("--seed", type=int, default=0)
    gl.add_argument("--variants", nargs="+", choices=VARIANTS, default=[],
                    help="add the cases of these variants (keyword arguments as npattn's ops take them)")
    gl.set_defaults(func=golden)

    def nonnegative(text: str) -> int:
        value = int(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
        return value
    nonnegative.__name__ = "int"                      # argparse's message: "invalid int value: 'x'"
    vf = sub.add_parser("verify", help="check your attention kernel against the float64 truth (exit 1 on failure)")
    vf.add_argument("--fn", required=True, metavar="MODULE:FUNCTION",
                    help="the kernel: fn(q, k, v, *, mask=None, causal=False, scale=None) -> o or (o, lse), torch")
    vf.add_argument("--golden", metavar="DIR", help="check against the golden files in DIR (npattn golden)")
    vf.add_argument("--dtype", choices=["float64", "float32", "float16", "bfloat16"], default=None,
                    help="the dtype of the inputs (default float32, or the golden files')")
    vf.add_argument("--variants", nargs="+", choices=VARIANTS, default=[],
                    help="add the cases of these variants; fn then receives their keyword arguments")
    vf.add_argument("--seed", type=nonnegative, default=0)
    vf.set_defaults(func=verify)

    def seed_arg(text: str) -> int:
        value = int(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
        return value
    seed_arg.__name__ = "int"                         # argparse's message: "invalid int value: 'x'"
    gr = sub.add_parser("grade", help="grade an exercise file (exercises/): each <op>_backward it defines, "
                                      "with the classic wrong form it follows named")
    gr.add_argument("file", help="the Python file to grade, e.g. exercises/01_softmax.py")
    gr.add_argument("--dtype", choices=["float64", "float32", "float16"], default="float64",
                    help="the dtype of the inputs your functions get (the truth is float64)")
    gr.add_argument("--seed", type=seed_arg, default=0)
    gr.set_defaults(func=grade)
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except ModuleNotFoundError as err:                # an optional extra is missing: say which
        print(f"npattn {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
