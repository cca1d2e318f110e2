"""derivations/ and the code point at each other: every equation cited by code exists, every
equation is cited by code, every code map names real objects, and every Python block runs (with
its printed output equal to the ```text block that follows it)."""

import contextlib
import importlib
import importlib.util
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DERIVATIONS = sorted((ROOT / "derivations").glob("*.md"))
SOURCES = sorted((ROOT / "npattn").rglob("*.py"))


def tags(path):
    return set(re.findall(r"\\tag\{(\d+\.\d+)\}", path.read_text()))


def chapter_file(chapter: str) -> Path:
    return next(p for p in DERIVATIONS if p.name.startswith(f"{int(chapter):02d}-"))


def expand(first: str, last: str) -> list[str]:
    c1, n1 = map(int, first.split("."))
    c2, n2 = map(int, last.split("."))
    assert c1 == c2, f"a range may not span chapters: ({first})-({last})"
    return [f"{c1}.{n}" for n in range(n1, n2 + 1)]


def citations(text: str) -> set[str]:
    """Every equation number in an 'eq. (x.y)' / 'eqs. (x.y)-(x.z) and (x.w)' citation."""
    found = set()
    for group in re.findall(r"eqs?\.\s*((?:\(\d+\.\d+\)(?:\s*(?:-|,|and)\s*)?)+)", text):
        for first, last in re.findall(r"\((\d+\.\d+)\)(?:\s*-\s*\((\d+\.\d+)\))?", group):
            found.update(expand(first, last) if last else [first])
    return found


def code_citations() -> set[str]:
    return set().union(*(citations(p.read_text()) for p in SOURCES))


def test_every_chapter_exists():
    names = [p.name for p in DERIVATIONS]
    for prefix in ("00-notation", "01-linear", "02-softmax", "03-attention", "04-online-softmax", "05-flash-backward",
                   "06-multihead", "07-layernorm", "08-activations", "09-embeddings-positions", "10-cross-entropy",
                   "11-transformer-block", "12-kv-cache", "13-variants", "14-parallel-tiles",
                   "15-sinks-varlen", "16-paged-kv-cache", "17-split-kv-combine", "18-linear-attention"):
        assert f"{prefix}.md" in names


def test_equations_are_numbered_in_order():
    for path in DERIVATIONS:
        chapter = int(path.name[:2])
        numbers = [tuple(map(int, t.split("."))) for t in re.findall(r"\\tag\{(\d+\.\d+)\}", path.read_text())]
        assert numbers, f"{path.name} has no numbered equation"
        assert all(c == chapter for c, _ in numbers), path.name
        assert [n for _, n in numbers] == list(range(1, len(numbers) + 1)), f"{path.name}: in reading order, {numbers}"


def test_every_citation_in_code_exists():
    for source in SOURCES:
        for eq in citations(source.read_text()):
            assert eq in tags(chapter_file(eq.split(".")[0])), f"{source.name} cites eq. ({eq}), which does not exist"


def test_every_equation_is_cited_by_code():
    cited = code_citations()
    for path in DERIVATIONS:
        missing = tags(path) - cited
        assert not missing, f"{path.name}: equations {sorted(missing)} are cited nowhere in npattn/"


def test_code_cites_files_that_exist():
    for source in SOURCES:
        for name in re.findall(r"derivations/([\w.-]+\.md)", source.read_text()):
            assert (ROOT / "derivations" / name).exists(), f"{source.name} cites derivations/{name}"


@pytest.mark.parametrize("path", DERIVATIONS, ids=lambda p: p.name)
def test_code_map_names_real_objects(path):
    text = path.read_text()
    assert "## Code map" in text, f"{path.name} has no code map"
    table = text.split("## Code map", 1)[1]
    names = re.findall(r"`(npattn(?:\.\w+)+)`", table)
    assert names
    for dotted in names:
        module, obj = None, None
        parts = dotted.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                module = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            obj = module
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
            break
        assert obj is not None, dotted
    # every equation of the chapter appears in its code map
    mapped = set()
    for first, last in re.findall(r"^\| \((\d+\.\d+)\)(?:-\((\d+\.\d+)\))? \|", table, flags=re.M):
        mapped.update(expand(first, last) if last else [first])
    assert tags(path) <= mapped, f"{path.name}: not in the code map: {sorted(tags(path) - mapped)}"


@pytest.mark.parametrize("path", DERIVATIONS, ids=lambda p: p.name)
def test_python_blocks_run_and_print_what_the_text_shows(path):
    blocks = re.findall(r"```python\n(.*?)```\n(?:```text\n(.*?)```)?", path.read_text(), flags=re.S)
    namespace = {}
    for code, expected in blocks:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, str(path), "exec"), namespace)
        if expected:
            assert out.getvalue() == expected, f"{path.name}: printed\n{out.getvalue()}\nbut the text shows\n{expected}"


def test_citation_parser():
    assert citations("eqs. (3.1)-(3.3) and (3.7), eq. (2.4)") == {"3.1", "3.2", "3.3", "3.7", "2.4"}


def _have_gpu() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def test_readme_examples_run():
    """Every Python block of the README runs on its own, as printed (a fresh namespace each)."""
    results, ran_hf = {}, False
    text = (ROOT / "README.md").read_text()
    for found in re.finditer(r"```python\n(.*?)```", text, flags=re.S):
        # padded with the lines above it, so a failure points at its own line of README.md
        code = "\n" * text[:found.start(1)].count("\n") + found.group(1)
        if "import numpy as np, torch, transformers" in code:
            if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("torch") is None:
                continue                          # the Hugging Face example needs the optional oracle
            ran_hf = True
        if "import torch" in code and importlib.util.find_spec("torch") is None:
            continue                              # the kernel-checking example runs a torch kernel
        if "import cupy as cp" in code and not _have_gpu():
            # the GPU example, run on NumPy where no GPU is: the same calls, another library
            code = code.replace("import cupy as cp", "import numpy as cp").replace('.to("cupy")', '.to("numpy")')
        namespace = {}
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compile(code, "README.md", "exec"), namespace)
        results.update(namespace)
    assert results["report"].ok
    assert results["tokens"].shape == (4, 12)
    if ran_hf:
        assert results["worst"] < 1e-10


def test_the_forty_line_example_runs_and_checks_out():
    """examples/attention_in_40_lines.py: the file to read first; its gradients must agree."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile((ROOT / "examples" / "attention_in_40_lines.py").read_text(), "example", "exec"), {})
    errors = [float(line.rsplit("=", 1)[1]) for line in out.getvalue().splitlines()]
    assert len(errors) == 3 and max(errors) < 1e-8
