"""docs/figures.py: the derivations' pictures are drawn by code, the tile states come from the loop's
own functions (checked here against the full causal mask), the online-softmax animation shows the
loop's own on_tile stream (checked against chapter 4's hand example), and every picture is shown
somewhere."""

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


def test_the_animation_shows_the_loops_own_state():
    """derivations/04's hand example: m 3 then 4, l 1.5032 then 1.7067, alpha e^(3-4), acc 6.0951,
    o = acc / l = 3.5714; row 1's maximum never moves (alpha = 1)."""
    states = figures.online_softmax_states()
    assert [s["j"] for s in states] == [0, 1]
    row0 = [(s["m"][0], round(float(s["l"][0]), 4), round(float(s["acc"][0]), 4)) for s in states]
    assert row0 == [(3.0, 1.5032, 3.239), (4.0, 1.7067, 6.0951)]
    assert np.isclose(states[1]["alpha"][0], np.exp(-1.0)) and states[1]["alpha"][1] == 1.0
    s, v = figures.HAND_SCORES, figures.HAND_V
    p = np.exp(s - s.max(1, keepdims=True))
    assert np.allclose(states[-1]["acc"] / states[-1]["l"], (p / p.sum(1, keepdims=True)) @ v, rtol=1e-14)
    # a wrong rescale (forgetting alpha) would not reproduce the whole-row output
    assert not np.allclose(states[0]["acc"] + states[1]["p"] @ v[3:], states[1]["acc"])


def test_the_script_draws_every_picture(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.image
    from PIL import Image

    paths = figures.main(tmp_path)
    assert [p.name for p in paths] == ["graph.png", "causal_tiles.png", "gqa_reshape.png", "online_softmax.gif"]
    for path in paths[:3]:
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 200 and image.shape[1] > 600
        assert image[..., :3].std() > 0.05, f"{path.name} is blank"
    with Image.open(paths[3]) as gif:
        assert gif.n_frames == 5 and gif.size[0] > 600 and gif.size[1] > 200
        frames = []
        for i in range(gif.n_frames):
            gif.seek(i)
            frames.append(np.asarray(gif.convert("RGB"), dtype=float) / 255)
    assert all(f.std() > 0.05 for f in frames), "a blank frame"
    assert all(not np.array_equal(a, b) for a, b in zip(frames, frames[1:])), "two frames are the same"


def test_every_committed_picture_is_shown_and_exists():
    shown = set()
    for md in list((ROOT / "derivations").glob("*.md")) + [ROOT / "README.md"]:
        for target in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md.read_text()):
            path = (md.parent / target).resolve()
            assert path.exists(), f"{md.name} shows {target}, which does not exist"
            shown.add(path.name)
    committed = {p.name for p in (ROOT / "docs" / "figures").iterdir() if p.suffix in (".png", ".gif")}
    assert committed == {"graph.png", "causal_tiles.png", "gqa_reshape.png", "online_softmax.gif"}
    assert committed <= shown, f"never shown: {committed - shown}"
