"""npattn/cli.py: `npattn check` proves every pair and exits 0; a broken pair makes it exit 1;
`npattn bench` prints its table and writes JSON."""

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

import npattn.checks
from npattn.bench import blas_share
from npattn.checks import Case
from npattn.cli import main
from npattn.ops import softmax_forward


def test_check_runs_every_case_and_passes(capsys):
    assert main(["check"]) == 0
    out = capsys.readouterr().out
    for op in ("linear", "softmax", "attention", "flash"):
        assert f"\n{op} " in out
    assert "FAIL" not in out and f"all {len(npattn.checks.cases())} cases passed" in out
    assert "worst relative error per op" in out


def test_check_exits_nonzero_on_a_broken_pair(monkeypatch, capsys, rng):
    broken = Case("softmax", "broken", softmax_forward, lambda dout, cache: cache.y * dout,
                  dict(x=rng.standard_normal((2, 4))), {})
    monkeypatch.setattr(npattn.checks, "cases", lambda seed=0: [broken])
    assert main(["check"]) == 1
    assert "FAILED 1 of 1" in capsys.readouterr().out


def test_check_filter_and_module_entry_point():
    done = subprocess.run([sys.executable, "-m", "npattn", "check", "-k", "flash"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    flash = [c for c in npattn.checks.cases() if "flash" in f"{c.op} {c.name}"]
    assert f"all {len(flash)} cases passed" in done.stdout and "\nlinear" not in done.stdout


def test_bench_prints_rows_and_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["bench", "--n", "48", "--dtype", "float64", "--repeats", "2", "--block", "16",
                 "--impl", "naive", "tiled", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.count("\nnaive ") == 4 and out.count("\ntiled ") == 4            # 2 causal x 2 passes
    data = json.loads(path.read_text())
    rows = data["rows"]
    assert len(rows) == 8 and {r["impl"] for r in rows} == {"naive", "tiled"}
    assert all(r["median_ms"] > 0 and r["gflops"] > 0 and r["peak_mib"] > 0 for r in rows)
    assert all(r["vs_naive"] == 1.0 for r in rows if r["impl"] == "naive")
    assert data["config"]["block"] == 16
    # the tiled loop's matmul work against the gemm rate measured in the same run: 14 N M D per head
    tiled = next(r for r in rows if r["impl"] == "tiled" and not r["causal"] and r["passes"] == "fwd+bwd")
    (row, gflops, share), = blas_share(rows, {"float64": 100.0})
    assert row is tiled and gflops == pytest.approx(14 * 48 * 48 * 64 * 8 / (tiled["median_ms"] * 1e-3) / 1e9)
    assert share == pytest.approx(gflops / 100.0) and "% of gemm" in out


def test_bench_tiled_rows_on_workers_and_on_one(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["bench", "--n", "40", "--dtype", "float32", "--causal", "yes", "--passes", "fwd+bwd",
                 "--repeats", "1", "--block", "8", "--workers", "2", "--impl", "tiled", "tiled-1",
                 "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "tiled on 2 workers" in out and "\ntiled-1 " in out
    rows = json.loads(path.read_text())["rows"]
    assert [(r["impl"], r["workers"]) for r in rows] == [("tiled", 2), ("tiled-1", 1)]


def test_bench_torch_rows_when_available(capsys):
    pytest.importorskip("torch")
    assert main(["bench", "--n", "32", "--dtype", "float32", "--causal", "no", "--passes", "fwd+bwd",
                 "--repeats", "1", "--no-memory"]) == 0
    out = capsys.readouterr().out
    assert "\ntorch " in out and "\ntorch-math " in out


def test_bench_layers_suite_rows(monkeypatch, tmp_path, capsys):
    """The layers suite on tiny shapes: every row appears, ratios are npattn / torch and flash / naive."""
    import functools

    import npattn.bench

    small = functools.partial(npattn.bench.LayersConfig, mha=(1, 8, 8, 2), mha_memory=(1, 16, 8, 2),
                              gpt=(1, 8, 2, 11, 2, 6))
    monkeypatch.setattr(npattn.bench, "LayersConfig", small)
    path = tmp_path / "layers.json"
    assert main(["bench", "--suite", "layers", "--repeats", "1", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "CPU " in out and "BLAS " in out
    rows = json.loads(path.read_text())["rows"]
    memory = [r for r in rows if r["bench"] == "mha memory"]
    assert [r["impl"] for r in memory] == ["npattn naive", "npattn flash"] and memory[0]["vs"] == 1.0
    assert all(r["peak_mib"] > 0 for r in memory)
    timed = [r for r in rows if r["bench"] != "mha memory"]
    assert {r["bench"] for r in timed} == {"mha fwd+bwd", "gpt train step"}
    assert sum(r["setting"].endswith("causal") for r in timed if r["impl"] == "npattn") == 1   # MHA both ways
    for r in timed:
        if r["impl"] == "npattn" and r["vs"] is not None:
            partner = next(t for t in timed if (t["bench"], t["setting"]) == (r["bench"], r["setting"])
                           and t["impl"] != "npattn")
            assert r["vs"] == pytest.approx(r["median_ms"] / partner["median_ms"])


def test_bench_machine_suite_rows(monkeypatch, tmp_path, capsys):
    """The machine suite on tiny shapes: every target is a pair of rows whose ratio is the first's
    median over the second's; the gemm share and the memory ratio come out in (0, 1)."""
    import functools

    import npattn.bench

    small = functools.partial(npattn.bench.MachineConfig, op=(1, 2, 64, 8), math=(1, 2, 32, 8), mha=(1, 8, 8, 2),
                              gpt=(1, 8, 2, 11, 2, 6), peak=(1, 2, 512, 8))
    monkeypatch.setattr(npattn.bench, "MachineConfig", small)
    path = tmp_path / "machine.json"
    assert main(["bench", "--suite", "machine", "--repeats", "1", "--json", str(path)]) == 0
    assert "CPU " in capsys.readouterr().out
    rows = json.loads(path.read_text())["rows"]
    benches = [r["bench"] for r in rows]
    want = {"tiled/naive", "causal/non", "tiled/sgemm", "memory t/n"}
    if npattn.bench.torch_available():
        want |= {"tiled/torch", "naive/math", "mha/torch"} | ({"gpt/HF"} if npattn.bench.transformers_available() else set())
    assert set(benches) == want and all(benches.count(b) == 2 for b in want)
    for first, second in zip(rows[::2], rows[1::2]):
        assert first["bench"] == second["bench"] and second["vs"] == 1.0
        if first["bench"] == "tiled/sgemm":
            assert 0 < first["vs"] < 1
        elif first["bench"] == "memory t/n":
            assert first["vs"] == pytest.approx(first["peak_mib"] / second["peak_mib"]) and 0 < first["vs"] < 1
        else:
            assert first["vs"] == pytest.approx(first["median_ms"] / second["median_ms"])
    assert main(["bench", "--suite", "model", "--repeats", "1", "--json", str(path)]) == 0
    assert {r["bench"] for r in json.loads(path.read_text())["rows"]} <= {"gpt/HF"}


def test_bench_window_rows_count_only_the_band(tmp_path, capsys):
    path = tmp_path / "window.json"
    assert main(["bench", "--n", "64", "--dtype", "float32", "--causal", "yes", "--passes", "fwd", "--repeats", "1",
                 "--impl", "tiled", "tiled-window", "--window", "7", "0", "--block", "16", "--no-memory",
                 "--json", str(path)]) == 0
    rows = {r["impl"]: r for r in json.loads(path.read_text())["rows"]}
    # useful FLOPs per head and pass: 2 (D + Dv) per visible pair; a window of 8 keys sees 8 * 64 - 28 pairs
    assert rows["tiled-window"]["gflops"] * rows["tiled-window"]["median_ms"] * 1e6 == pytest.approx(
        2 * 128 * (8 * 64 - 28) * 8)
    assert rows["tiled"]["gflops"] * rows["tiled"]["median_ms"] * 1e6 == pytest.approx(2 * 128 * (64 * 65 // 2) * 8)
    with pytest.raises(SystemExit) as stop:                                # needs --window
        main(["bench", "--impl", "tiled-window"])
    assert stop.value.code == 2


BAD_FLAGS = [
    "bench --n 0", "bench --n x", "bench --heads 0", "bench --dim 0", "bench --batch 0", "bench --block 0",
    "bench --workers 0", "bench --repeats 0", "bench --seed -1", "bench --json /nonexistent/dir/x.json",
    "bench --json /", "bench --causal maybe", "bench --dtype float16", "bench --impl tiled-window",
    "bench --window -1 0 --impl tiled-window", "bench --suite nope",
    "bench --backend array_api_strict --device nodev",
    "check --seed -1", "check --mode fast", "check -k zzzzzz",
    "demo --steps 0", "demo --steps -1", "demo --length 0", "demo --seed -3", "demo --task nope",
    "demo --json /nonexistent/x.json", "demo --plot /proc/npattn",
    "golden", "golden --out /proc/npattn", "golden --seed -1 --out OUT", "golden --variants nope --out OUT",
    "verify", "verify --fn nomodule:fn", "verify --fn npattn:nothing", "verify --fn x --golden /nonexistent",
    "grade", "grade /nonexistent.py", "grade README.md", "grade exercises/01_softmax.py --seed -1",
    "nocommand",
]


@pytest.mark.parametrize("line", BAD_FLAGS)
def test_a_bad_flag_is_one_line_and_exit_2_before_any_work(line, tmp_path, capsys, monkeypatch):
    """SPEC, "Command line": one line naming the flag, `npattn <command>: error: ...`, exit 2, never a
    traceback, and before any long work (every case here would run for minutes if it started)."""
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    t0 = time.perf_counter()
    try:
        status = main(line.replace("OUT", str(tmp_path / "out")).split())
    except SystemExit as stop:
        status = stop.code
    err = capsys.readouterr().err
    assert status == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"npattn {line.split()[0]}: error: " if line != "nocommand" else "npattn: error: "), err
    assert time.perf_counter() - t0 < 10                  # refused at once, not after a benchmark or training


@pytest.mark.parametrize("line", ["bench --backend cupy", "check --backend torch --device cuda:7"])
def test_a_missing_backend_or_device_is_one_line(line, capsys):
    backend = line.split("--backend ")[1].split()[0]
    if backend == "cupy" and importlib.util.find_spec("cupy") is not None:
        pytest.skip("CuPy is installed here")
    if backend == "torch":
        torch = pytest.importorskip("torch")
        if torch.cuda.device_count() > 7:
            pytest.skip("this machine has a cuda:7")
    with pytest.raises(SystemExit) as stop:
        main(line.split())
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.strip().splitlines()) == 1 and "error: argument --" in err, err


def test_help_lists_every_command_in_plain_text(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("check", "bench", "demo", "golden", "verify", "grade"):
        assert f"\n    {command} " in out
    assert "``" not in out
