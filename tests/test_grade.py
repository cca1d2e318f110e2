"""npattn grade: every shipped stub says "not implemented yet" (exit 1, no traceback), every reference
solution (tests/exercise_solutions/) grades clean, a solution with a classic wrong form is named with
its derivation section, and a missing or empty file is one line and exit 2."""

import re
from pathlib import Path

import pytest

from npattn.cli import main
from npattn.testing.grade import grade_file

ROOT = Path(__file__).resolve().parents[1]
STUBS = sorted((ROOT / "exercises").glob("[0-9][0-9]_*.py"))
SOLUTIONS = ROOT / "tests" / "exercise_solutions"
READING_ORDER = ["softmax", "attention", "layernorm", "cross_entropy", "rope", "multihead", "online_softmax",
                 "tiled_backward"]


def test_the_exercises_are_in_reading_order():
    assert [p.stem.split("_", 1)[1] for p in STUBS] == READING_ORDER
    assert [int(p.stem[:2]) for p in STUBS] == list(range(1, len(STUBS) + 1))
    for stub in STUBS:
        text = stub.read_text()
        cited = re.findall(r"derivations/([\w.-]+\.md)", text)
        assert cited and all((ROOT / "derivations" / c).exists() for c in cited), stub.name
        assert "raise NotImplementedError" in text, stub.name
        assert (SOLUTIONS / f"sol_{stub.name}").exists(), f"no reference solution of {stub.name}"


@pytest.mark.parametrize("stub", STUBS, ids=lambda p: p.name)
def test_a_shipped_stub_is_not_implemented_yet(stub, capsys):
    assert main(["grade", str(stub)]) == 1
    out, err = capsys.readouterr()
    assert "not implemented yet" in out and "Traceback" not in out + err and err == ""
    assert "pass" in out.splitlines()[-1]


@pytest.mark.parametrize("stub", STUBS, ids=lambda p: p.name)
def test_a_reference_solution_grades_clean(stub, capsys):
    assert main(["grade", str(SOLUTIONS / f"sol_{stub.name}")]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert "BAD" not in out and "fail" not in out.splitlines()[-1]
    assert main(["grade", str(SOLUTIONS / f"sol_{stub.name}"), "--dtype", "float32", "--seed", "5"]) == 0


def _planted(tmp_path, stub_name, old, new):
    text = (SOLUTIONS / f"sol_{stub_name}").read_text()
    assert old in text
    path = tmp_path / stub_name
    path.write_text(text.replace(old, new))
    return path


@pytest.mark.parametrize("stub_name,old,new,code", [
    ("01_softmax.py", "y * (dout - np.sum(dout * y, axis=axis, keepdims=True))", "y * (1 - y) * dout",
     "softmax-diagonal-only"),
    ("02_attention.py", "ds = p * (dp - np.sum(p * dp, axis=-1, keepdims=True))", "ds = p * (1 - p) * dp",
     "attention-softmax-diagonal-only"),
    ("03_layernorm.py", "dx = rstd * (dxhat - np.mean(", "dx = 2 * rstd * (dxhat - np.mean(", None),
    ("04_cross_entropy.py", "(dloss / count)", "(dloss / counted.size)", "cross-entropy-counts-ignored"),
    ("05_rope.py", "g1 * cos + g2 * sin, g2 * cos - g1 * sin", "g1 * cos - g2 * sin, g2 * cos + g1 * sin",
     "rope-forward-angle"),
])
def test_a_wrong_solution_is_named_with_its_section(tmp_path, capsys, stub_name, old, new, code):
    path = _planted(tmp_path, stub_name, old, new)
    assert grade_file(path) == 1
    out = capsys.readouterr().out
    if code is None:                                  # dx missing both paths but one: no code, the chapter
        assert "no known wrong form explains the mismatch; read derivations/07-layernorm.md" in out
    else:
        assert f"diagnosis {code}" in out and "read: derivations/" in out and 'section "' in out


def test_the_layernorm_stats_constant_form_is_named(tmp_path, capsys):
    path = _planted(tmp_path, "03_layernorm.py", """    dx = rstd * (dxhat - np.mean(dxhat, axis=-1, keepdims=True)
                 - xhat * np.mean(dxhat * xhat, axis=-1, keepdims=True))""", "    dx = rstd * dxhat")
    assert grade_file(path) == 1
    out = capsys.readouterr().out
    assert "diagnosis layernorm-stats-constant" in out and "rmsnorm_backward" in out
    assert out.splitlines()[-1].startswith("npattn grade 03_layernorm.py: 2 functions: 1 pass, 1 fail (layernorm_backward)")


def test_a_tile_loop_without_rescaling_fails(tmp_path, capsys):
    path = _planted(tmp_path, "07_online_softmax.py", "alpha = np.exp(m_i - shift)", "alpha = 1.0")
    assert grade_file(path) == 1
    assert "BAD" in capsys.readouterr().out


def test_a_tiled_backward_without_delta_fails(tmp_path, capsys):
    path = _planted(tmp_path, "08_tiled_backward.py", "vj, -1, -2) - dl)", "vj, -1, -2))")
    assert grade_file(path) == 1
    assert "BAD" in capsys.readouterr().out


def test_a_multihead_backward_without_the_fan_out_sum_fails(tmp_path, capsys):
    path = _planted(tmp_path, "06_multihead.py", "dx = dQ @ w_q.T + dK @ w_k.T + dV @ w_v.T", "dx = dQ @ w_q.T")
    assert grade_file(path) == 1
    out = capsys.readouterr().out
    assert "dx" in out and "BAD" in out


def test_a_broken_backward_never_crashes_the_grader(tmp_path, capsys):
    path = tmp_path / "broken.py"
    path.write_text("def softmax_backward(dout, x, axis=-1):\n    return None\n\n"
                    "def layernorm_backward(dout, x, gamma, beta, eps=1e-5):\n    return dout\n\n"
                    "def relu_backward(dout, x):\n    return [[1]]\n\n"
                    "def attention_backward(dout, q, k, v, **kw):\n    raise KeyError('oops')\n")
    assert grade_file(path) == 1
    out = capsys.readouterr().out
    assert "dx: got None, expected an array of shape (3, 5)" in out
    assert "returned ndarray of shape (3, 6) and dtype float64, expected a tuple of 3 gradients" in out
    assert "dx: got a list of 1, expected an array" in out and "raised KeyError" in out
    assert "4 functions: 0 pass, 4 fail" in out


@pytest.mark.parametrize("content,needle", [
    (None, "no such file"),
    ("x = 1\n", "defines none of the functions npattn grades"),
    ("def softmax_backward(:\n", "does not import: SyntaxError"),
    ("raise RuntimeError('at import')\n", "does not import: RuntimeError: at import"),
])
def test_missing_empty_or_broken_files_are_one_line_and_exit_2(tmp_path, capsys, content, needle):
    path = tmp_path / "exercise.py"
    if content is not None:
        path.write_text(content)
    assert main(["grade", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and needle in err, err


def test_bad_flags_are_argparse_errors(capsys):
    for argv in (["grade"], ["grade", "x.py", "--seed", "-1"], ["grade", "x.py", "--dtype", "bfloat16"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
    assert "npattn grade: error:" in capsys.readouterr().err
