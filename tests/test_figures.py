"""docs/figures.py: the derivations' pictures are drawn by code, the tile states come from the loop's
own functions (checked here against the full causal mask), and every picture is shown somewhere."""

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest

from npattn.ops.attention import causal_allowed

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("npattn_figures", ROOT / "docs" / "figures.py")
figures = importlib.util.module_from_spec(spec)
spec.loader.exec_module(figures)


@pytest.mark.parametrize("N, M, block", [(16, 16, 4), (8, 16, 4), (16, 8, 4), (13, 29, 5), (10, 10, 3)])
def test_tile_states_agree_with_the_full_causal_mask(N, M, block):
    allowed = causal_allowed(np, (0, N), (0, M), N, M, like=np.zeros(1))        # (N, M)
    states = figures.tile_states(N, M, block)
    for a, i0 in enumerate(range(0, N, block)):
        for b, j0 in enumerate(range(0, M, block)):
            tile = allowed[i0:i0 + block, j0:j0 + block]
            want = 0 if not tile.any() else 2 if tile.all() else 1
            assert states[a, b] == want, (a, b)
    assert (states == 0).any() or N > M          # the cases above do skip tiles


def test_the_script_draws_every_picture(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.image

    paths = figures.main(tmp_path)
    assert [p.name for p in paths] == ["graph.png", "causal_tiles.png", "gqa_reshape.png"]
    for path in paths:
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 200 and image.shape[1] > 600
        assert image[..., :3].std() > 0.05, f"{path.name} is blank"


def test_every_committed_picture_is_shown_and_exists():
    shown = set()
    for md in list((ROOT / "derivations").glob("*.md")) + [ROOT / "README.md"]:
        for target in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md.read_text()):
            path = (md.parent / target).resolve()
            assert path.exists(), f"{md.name} shows {target}, which does not exist"
            shown.add(path.name)
    committed = {p.name for p in (ROOT / "docs" / "figures").glob("*.png")}
    assert committed == {"graph.png", "causal_tiles.png", "gqa_reshape.png"}
    assert committed <= shown, f"never shown: {committed - shown}"
