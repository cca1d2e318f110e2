"""npattn/train.py, npattn/demo.py, npattn/plots.py: the loop learns on a tiny budget, the batches are
what the task says, the pictures are valid PNG files, and the command line wires it together."""

import json

import numpy as np
import pytest

from npattn.cli import main
from npattn.demo import IGNORE, SEP, DemoConfig, make_batch, run_demo
from npattn.plots import sqrt_d_stats

TINY = dict(length=4, steps=80, batch=32, embed_dim=32, num_heads=2, num_layers=1, eval_every=20, held_out=64,
            warmup=10, examples=2)


def test_batches_follow_the_task():
    digits = np.array([[3, 1, 4, 1], [5, 9, 2, 6]])
    for task, answer in (("reverse", digits[:, ::-1]), ("sort", np.sort(digits, 1)), ("copy", digits)):
        x, y, seq = make_batch(task, digits)
        np.testing.assert_array_equal(seq, np.concatenate([digits, [[SEP], [SEP]], answer], 1))
        np.testing.assert_array_equal(x, seq[:, :-1])                    # teacher forcing: shift by one
        assert np.all(y[:, :4] == IGNORE)                                # the input is not learned
        np.testing.assert_array_equal(y[:, 4:], answer)


def test_the_loop_learns_on_a_tiny_budget(capsys):
    cfg = DemoConfig(task="copy", **TINY)
    metrics = run_demo(cfg)
    first, last = cfg.curve[0], cfg.curve[-1]
    assert first["step"] == 0 and first["held_out_loss"] == pytest.approx(np.log(10), rel=0.1)   # untrained: uniform
    assert last["held_out_loss"] < first["held_out_loss"] / 2.5, cfg.curve         # the stated factor: 2.5x in 80 steps
    assert metrics["held_out_token_acc"] > 0.9
    out = capsys.readouterr().out
    assert "input " in out and "target " in out and "output " in out


def test_plots_are_png_files(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.image

    cfg = DemoConfig(task="reverse", **dict(TINY, steps=20))
    run_demo(cfg, plot_dir=str(tmp_path))
    for name in ("curves.png", "attention.png", "sqrt_d.png"):
        path = tmp_path / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400


def test_sqrt_d_stats_show_the_effect():
    stats = sqrt_d_stats(dims=(4, 1024), rows=64)
    assert stats["max_p"]["unscaled"][1] > 0.9 > 0.2 > stats["max_p"]["scaled"][1]     # saturated vs spread
    assert stats["jac"]["unscaled"][1] < stats["jac"]["scaled"][1] / 2                 # the gradient shrinks
    assert stats["jac"]["unscaled"][0] > stats["jac"]["scaled"][0]                      # ...but not at D = 4


def test_cli_demo_json(tmp_path, capsys, monkeypatch):
    import npattn.demo

    monkeypatch.setattr(npattn.demo, "DemoConfig", lambda **kw: DemoConfig(**{**TINY, **kw}))
    path = tmp_path / "demo.json"
    assert main(["demo", "--task", "sort", "--steps", "40", "--length", "4", "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    assert data["metrics"]["task"] == "sort" and data["metrics"]["steps"] == 40
    assert [c["step"] for c in data["config"]["curve"]] == [0, 20, 40]


def test_cli_demo_without_matplotlib_names_the_extra(monkeypatch, capsys, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(SystemExit) as stop:                               # before any training
        main(["demo", "--steps", "1", "--plot", str(tmp_path / "pictures")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "pip install 'npattn[plot]'" in err and len(err.strip().splitlines()) == 1
