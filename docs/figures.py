"""Draw the derivations' pictures into docs/figures/ (needs matplotlib: pip install 'npattn[plot]').

    python docs/figures.py [OUT_DIR]

- ``graph.png``: attention's computation graph, forward arrows and the backward arrows labelled by
  the equation of derivations/03-attention.md that each one computes.
- ``causal_tiles.png``: which tiles of the score matrix the tiled op skips, masks or runs whole under
  causal attention, for N = M and for N < M (bottom-right aligned), and the order its two loops
  visit them. The tile states are asked from npattn's own score pipeline (``Scores.visible`` and
  ``Scores.covered``, the functions the loop itself calls), so the picture cannot drift from the code.
- ``gqa_reshape.png``: grouped-query attention's reshape ``(H, N, D) -> (G, R*N, D)``: a group's R
  query heads stacked as rows, one matmul against the group's single K.
- ``online_softmax.gif``: the online softmax of derivations/04-online-softmax.md sweeping the key
  tiles of one query tile, frame by frame: the running max ``m``, the sum ``l``, the rescale factor
  ``alpha`` and the accumulator ``acc``, then ``o = acc / l``. Row 0 is the chapter's hand example.
  ``m``, ``l`` and ``alpha`` are the loop's own ``on_tile`` stream (``FlashTile``); ``acc`` is not in
  the stream, so it follows eq. (4.9) from the stream's ``alpha`` and ``m``, and the script checks
  that ``acc / l`` equals the op's output.

The suite runs this script (tests/test_figures.py); the committed PNGs are its output.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from npattn.ops.scores import make_scores
from npattn.plots import require_matplotlib

OUT = Path(__file__).resolve().parent / "figures"
FWD, BWD, SKIP, PART, FULL = "#1f4e79", "#b22222", "#f2f2f2", "#f6c667", "#4f9a57"


def tile_states(N: int, M: int, block: int, causal=True) -> np.ndarray:
    """``(n_tiles_q, n_tiles_k)`` of 0 (skipped), 1 (straddles the band: computed, then masked) and
    2 (wholly visible: no mask), from the score pipeline the tiled loop uses."""
    q, k = np.zeros((1, N, 1)), np.zeros((1, M, 1))
    sc = make_scores(np, q, k, mask=None, causal=causal, scale=None, softcap=None, alibi_slopes=None,
                     window=None, G=1, R=1)
    rows = [(i, min(i + block, N)) for i in range(0, N, block)]
    cols = [(j, min(j + block, M)) for j in range(0, M, block)]
    return np.array([[0 if not sc.visible(r, c) else 2 if sc.covered(r, c) else 1 for c in cols] for r in rows])


# derivations/04's hand example (row 0) and a row whose maximum does not move (row 1), one value column
HAND_SCORES = np.array([[1.0, 3.0, 2.0, 4.0, 0.0, 2.0],
                        [0.0, 1.0, 3.0, 1.0, 2.0, 0.0]])
HAND_V = np.arange(1.0, 7.0)


def online_softmax_states(scores=HAND_SCORES, v=HAND_V, block_k: int = 3) -> list:
    """Run ``flash_attention_forward`` on one query tile whose scores are ``scores (N, M)`` (``q = I``,
    ``k = scoresᵀ``, scale 1) and one value column ``v (M,)``, and return the state after each key
    tile: ``m``, ``l``, ``alpha`` from the loop's ``on_tile`` stream, ``acc`` by eq. (4.9) from them,
    and the tile's ``p = exp(s - m)``. The last entry's ``acc / l`` is checked against the op's ``o``."""
    from npattn.ops import flash_attention_forward

    N, M = scores.shape
    stream = []
    o, _ = flash_attention_forward(np.eye(N), np.ascontiguousarray(scores.T), v[:, None], scale=1.0,
                                   block_q=N, block_k=block_k, on_tile=stream.append)
    states, acc = [], np.zeros(N)
    for t in stream:
        m, l, alpha = (np.asarray(a).reshape(N) for a in (t.m_i, t.l_i, t.alpha))       # (N,) each
        cols = slice(t.j * block_k, min((t.j + 1) * block_k, M))
        p = np.exp(scores[:, cols] - m[:, None])                                         # (N, bk), eq. (4.7)
        acc_rescaled = alpha * acc
        acc = acc_rescaled + p @ v[cols]                                                 # eq. (4.9)
        states.append(dict(j=t.j, cols=cols, m=m, l=l, alpha=alpha, p=p, acc_rescaled=acc_rescaled, acc=acc))
    if not np.allclose(acc / states[-1]["l"], o[:, 0], rtol=1e-12):
        raise AssertionError("acc / l from the on_tile stream differs from the op's output")
    return states


def _frame(plt, scores, v, states, step, phase):
    """One frame: the scores with the tiles seen so far, and the state table. ``step`` is how many
    key tiles are done (-1: nothing yet); ``phase`` is "scores", "rescale", "add" or "end"."""
    from matplotlib.patches import Rectangle

    N, M = scores.shape
    fig, (ax, tx) = plt.subplots(1, 2, figsize=(11.0, 4.0), gridspec_kw=dict(width_ratios=[1.0, 1.05]))
    cur = states[step] if step >= 0 else None
    seen = 0 if cur is None else cur["cols"].stop
    for i in range(N):
        for j in range(M):
            now = cur is not None and cur["cols"].start <= j < cur["cols"].stop
            fc = "#f6c667" if now else "#cfe3f3" if j < seen else "white"
            ax.add_patch(Rectangle((j, i), 1, 1, fc=fc, ec="#555555", lw=1))
            ax.text(j + 0.5, i + 0.38, f"{scores[i, j]:.0f}", ha="center", va="center", fontsize=12)
            if now:
                ax.text(j + 0.5, i + 0.75, f"p={cur['p'][i, j - cur['cols'].start]:.3f}", ha="center",
                        va="center", fontsize=7.5, color="#7a4b00")
    for j in range(M):
        ax.text(j + 0.5, N + 0.35, f"v={v[j]:.0f}", ha="center", va="center", fontsize=9, color="#444444")
    for j0 in range(0, M + 1, 3):
        ax.plot([j0, j0], [0, N], color="black", lw=2.5)
    ax.set_xlim(0, M)
    ax.set_ylim(N + 0.7, 0)
    ax.set_aspect("equal")
    ax.set_xticks(np.arange(M) + 0.5, [f"key {j}" for j in range(M)], fontsize=8)
    ax.xaxis.tick_top()
    ax.set_yticks(np.arange(N) + 0.5, [f"row {i}" for i in range(N)], fontsize=9)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    ax.set_title("scores s of one query tile, key tiles of 3\n(blue: seen, yellow: this tile, p = exp(s − m_new))",
                 fontsize=9)

    tx.axis("off")
    head = ["", "m", "l", "alpha", "acc", ""]
    rows = []
    for i in range(N):
        if cur is None:
            rows.append([f"row {i}", "−∞", "0", "", "0", ""])
            continue
        alpha = f"{cur['alpha'][i]:.4f}"
        if phase == "rescale":           # the old state times alpha, before the new tile is added
            prev = states[step - 1]
            rows.append([f"row {i}", f"{cur['m'][i]:.0f}", f"{cur['alpha'][i] * prev['l'][i]:.4f}", alpha,
                         f"{cur['acc_rescaled'][i]:.4f}", "old l, acc times alpha"])
        else:
            last = f"o = acc / l = {cur['acc'][i] / cur['l'][i]:.4f}" if phase == "end" else ""
            rows.append([f"row {i}", f"{cur['m'][i]:.0f}", f"{cur['l'][i]:.4f}", alpha, f"{cur['acc'][i]:.4f}", last])
    table = tx.table(cellText=rows, colLabels=head, loc="upper center", cellLoc="center",
                     colWidths=[0.13, 0.08, 0.15, 0.15, 0.15, 0.36])
    table.auto_set_font_size(False)
    table.set_fontsize(9.5)
    table.scale(1, 1.9)
    notes = {
        ("start", -1): "start: m = −∞, l = 0, acc = 0 for every row",
        ("scores", 0): "key tile 0: m = its row max (4.6); alpha = e^(−∞ − m) = 0 rescales the empty state;\n"
                       "l = Σ p (4.8), acc = Σ p v (4.9)",
        ("rescale", 1): "key tile 1: row 0's max grows 3 → 4, so its old l and acc are multiplied by\n"
                        "alpha = e^(3 − 4) = 0.3679 (4.7); row 1's max stays 3: alpha = 1",
        ("add", 1): "key tile 1, added: l = alpha·l + Σ p (4.8), acc = alpha·acc + Σ p v (4.9)",
        ("end", 1): "after the last tile: o = acc / l, lse = m + log l (4.10);\nthe same o as softmax over the whole row",
    }
    tx.text(0.5, 0.12, notes[(phase, step)], ha="center", va="center", fontsize=9.5, transform=tx.transAxes)
    tx.set_title("the loop's state per row (m, l, alpha: the on_tile stream)", fontsize=9)
    fig.suptitle("Online softmax (derivations/04, eqs. (4.5)-(4.10)): one query tile sweeps its key tiles",
                 fontsize=11)
    fig.tight_layout()
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()                         # (H, W, 3)
    plt.close(fig)
    return image


def draw_online_softmax(plt, path: Path):
    from PIL import Image

    states = online_softmax_states()
    frames = [("start", -1), ("scores", 0), ("rescale", 1), ("add", 1), ("end", 1)]
    images = [Image.fromarray(_frame(plt, HAND_SCORES, HAND_V, states, step, phase)) for phase, step in frames]
    images = [im.convert("P", palette=Image.ADAPTIVE, colors=64) for im in images]
    images[0].save(path, save_all=True, append_images=images[1:], duration=[1800, 2600, 3000, 2600, 3400], loop=0,
                   optimize=True)


def _box(ax, xy, text, color="black", w=1.1, h=0.62, fs=13):
    from matplotlib.patches import FancyBboxPatch

    x, y = xy
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.05", fc="white", ec=color, lw=1.6))
    ax.text(x, y, text, ha="center", va="center", fontsize=fs)


def _arrow(ax, a, b, color, label=None, rad=0.0, dashed=False, label_at=None, fs=10):
    """An arrow from point ``a`` to point ``b`` (box edges, in data units), its label at ``label_at``."""
    ax.annotate("", xy=b, xytext=a, arrowprops=dict(arrowstyle="-|>", color=color, lw=1.5,
                                                    linestyle="--" if dashed else "-",
                                                    connectionstyle=f"arc3,rad={rad}", shrinkA=0, shrinkB=0))
    if label:
        ax.text(*label_at, label, ha="center", va="center", fontsize=fs, color=color)


def draw_graph(plt, path: Path):
    fig, ax = plt.subplots(figsize=(11.5, 4.2))
    W, H, y = 1.5, 0.7, 1.6                               # box size, the main row's height
    xs = {"s": 2.0, "mask": 4.3, "p": 6.6, "pd": 8.9, "o": 11.2}
    names = {"s": "s = α q kᵀ", "mask": "s + mask,\n−∞ if not allowed", "p": "p = softmax(s)",
             "pd": "p̃ = dropout(p)", "o": "o = p̃ v"}
    for key, x in xs.items():
        _box(ax, (x, y), names[key], w=W, h=H, fs=10.5 if key != "mask" else 9)
    inputs = {"q": (0.0, 2.7), "k": (0.0, 0.5), "v": (8.9, 0.0)}
    for key, xy in inputs.items():
        _box(ax, xy, key, w=0.6, h=0.5, fs=12)
    right = lambda key: (xs[key] + W / 2 + 0.05, y)
    left = lambda key: (xs[key] - W / 2 - 0.05, y)
    top = lambda key, dx=0.0: (xs[key] + dx, y + H / 2 + 0.05)
    for a, b in (("s", "mask"), ("mask", "p"), ("p", "pd"), ("pd", "o")):
        _arrow(ax, right(a), left(b), FWD)
    _arrow(ax, (0.35, 2.6), (xs["s"] - W / 2 - 0.05, y + 0.15), FWD)
    _arrow(ax, (0.35, 0.6), (xs["s"] - W / 2 - 0.05, y - 0.15), FWD)
    _arrow(ax, (9.25, 0.1), (xs["o"] - 0.3, y - H / 2 - 0.05), FWD)
    for a, b, label in (("o", "pd", "dp̃  (3.7)"), ("pd", "p", "dp  (3.8)"), ("p", "mask", "ds  (3.9)"),
                        ("mask", "s", "ds passes through")):
        (xa, ya), (xb, yb) = top(a, -0.35), top(b, 0.35)
        _arrow(ax, (xa, ya), (xb, yb), BWD, label, rad=0.45, dashed=True, label_at=((xa + xb) / 2, ya + 0.65))
    _arrow(ax, (xs["o"] + 0.3, y - H / 2 - 0.05), (9.25, -0.1), BWD, "dv  (3.7)", rad=-0.35, dashed=True,
           label_at=(11.0, 0.1))
    _arrow(ax, top("s", -0.45), (0.1, 2.98), BWD, "dq  (3.10)", rad=0.35, dashed=True, label_at=(1.0, 3.35))
    _arrow(ax, (xs["s"] - 0.45, y - H / 2 - 0.05), (0.1, 0.22), BWD, "dk  (3.10)", rad=-0.35, dashed=True,
           label_at=(1.0, -0.15))
    ax.plot([], [], color=FWD, label="forward, eqs. (3.1)-(3.6)")
    ax.plot([], [], color=BWD, ls="--", label="backward: the gradient each arrow carries, and its equation")
    ax.legend(loc="lower right", bbox_to_anchor=(0.78, -0.02), fontsize=9, frameon=False)
    ax.set_xlim(-0.6, 12.2)
    ax.set_ylim(-0.6, 3.7)
    ax.axis("off")
    ax.set_title("Attention's computation graph (derivations/03): forward left to right, backward right to left",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _grid(ax, states, block, N, M, title):
    from matplotlib.patches import Rectangle

    colors = [SKIP, PART, FULL]
    nq, nk = states.shape
    for i in range(nq):
        for j in range(nk):
            ax.add_patch(Rectangle((j, i), 1, 1, fc=colors[states[i, j]], ec="#555555", lw=1.2, zorder=1))
            if states[i, j] == 1:                 # show the band inside a straddling tile
                for a in range(block):
                    for b in range(block):
                        qi, kj = i * block + a, j * block + b
                        if qi < N and kj < M and kj <= qi + M - N:
                            ax.add_patch(Rectangle((j + b / block, i + a / block), 1 / block, 1 / block,
                                                   fc=FULL, ec="none", alpha=0.9))
    for i, j in zip(*np.nonzero(states == 1)):            # straddling tiles outlined over their band
        ax.add_patch(Rectangle((j, i), 1, 1, fc="none", ec="#a0522d", lw=2.4, zorder=3))
    ax.set_xlim(0, nk)
    ax.set_ylim(nq, 0)
    ax.set_aspect("equal")
    ax.set_xticks(np.arange(nk) + 0.5, [f"k{j}" for j in range(nk)], fontsize=9)
    ax.set_yticks(np.arange(nq) + 0.5, [f"q{i}" for i in range(nq)], fontsize=9)
    ax.tick_params(length=0)
    ax.set_title(title, fontsize=10)


def draw_causal_tiles(plt, path: Path):
    from matplotlib.patches import Patch

    block = 4
    cases = [(16, 16, "N = M = 16: the diagonal tiles straddle"), (8, 16, "N = 8 < M = 16 (bottom-right):\n"
                                                                          "query i sees keys j ≤ i + 8")]
    fig, axes = plt.subplots(1, 2, figsize=(10.0, 4.4), gridspec_kw=dict(width_ratios=[1, 1]))
    for ax, (N, M, title) in zip(axes, cases):
        states = tile_states(N, M, block)
        _grid(ax, states, block, N, M, f"{title}\n(tiles of {block} x {block})")
    ax, states = axes[0], tile_states(16, 16, block)
    i, j = 2, 1                                           # one query tile's row, one key tile's column
    fwd = [c for c in range(states.shape[1]) if states[i, c]]     # the key tiles query tile i runs
    bwd = [r for r in range(states.shape[0]) if states[r, j]]     # the query tiles key tile j runs
    ax.annotate("", xy=(fwd[-1] + 0.95, i + 0.5), xytext=(fwd[0] + 0.05, i + 0.5),
                arrowprops=dict(arrowstyle="-|>", color=FWD, lw=2.2))
    ax.annotate("", xy=(j + 0.5, bwd[-1] + 0.95), xytext=(j + 0.5, bwd[0] + 0.05),
                arrowprops=dict(arrowstyle="-|>", color=BWD, lw=2.2))
    ax.set_xlabel(f"→ forward: query tile q{i} (outer loop) runs key tiles {', '.join(f'k{c}' for c in fwd)} (inner)\n"
                  f"↓ backward: key tile k{j} (outer loop) runs query tiles {', '.join(f'q{r}' for r in bwd)} (inner)",
                  fontsize=8.5, loc="left")
    legend = [Patch(fc=SKIP, ec="#555555", label="skipped (never computed)"),
              Patch(fc=PART, ec="#555555", label="straddles: computed, then −∞ above the band"),
              Patch(fc=FULL, ec="#555555", label="wholly visible: no mask")]
    fig.legend(handles=legend, loc="lower center", ncol=3, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0.03, 0.08, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def draw_gqa(plt, path: Path):
    from matplotlib.patches import Rectangle

    H, G, N = 4, 2, 3
    R = H // G
    head_colors = ["#4c72b0", "#6f9bd1", "#dd8452", "#f0b27a"]
    fig, ax = plt.subplots(figsize=(10.0, 3.9))
    # left: q as (H, N, D), heads side by side
    for h in range(H):
        x0 = h * 1.25
        for n in range(N):
            ax.add_patch(Rectangle((x0, 3 - n * 0.5), 1, 0.45, fc=head_colors[h], ec="white"))
        ax.text(x0 + 0.5, 3.6, f"head h={h}\n(g={h // R}, r={h % R})", ha="center", fontsize=8.5)
    ax.text(2.4, 1.35, "q: (H, N, D) = (4, 3, D)\nquery head h = g·R + r uses key/value head g;\n"
                     "its position n becomes row r·N + n of group g", ha="center", fontsize=9.5)
    ax.annotate("", xy=(6.2, 2.2), xytext=(5.2, 2.2), arrowprops=dict(arrowstyle="-|>", lw=1.8))
    ax.text(5.7, 2.45, "reshape", ha="center", fontsize=9)
    # right: (G, R*N, D), a group's R heads stacked as rows, each group beside its one k
    for g in range(G):
        x0 = 6.6 + g * 3.1
        for r in range(R):
            h = g * R + r
            for n in range(N):
                row = r * N + n
                ax.add_patch(Rectangle((x0, 3.3 - row * 0.36), 1, 0.32, fc=head_colors[h], ec="white"))
        ax.text(x0 + 0.5, 3.75, f"group g={g}", ha="center", fontsize=9)
        ax.text(x0 + 1.2, 2.6 - 0.4, "@", fontsize=14, va="center")
        for m in range(3):
            ax.add_patch(Rectangle((x0 + 1.6 + m * 0.36, 2.0), 0.32, 1.0, fc="#8c8c8c", ec="white"))
        ax.text(x0 + 2.1, 3.15, f"k_{g}ᵀ", ha="center", fontsize=9)
    ax.text(9.2, 0.85, "(G, R·N, D) = (2, 6, D): one matmul per group gives the group's R heads' scores;\n"
                       "in the backward  p̃ᵀ dout  and  dsᵀ q  sum over the group inside the matmul (3.11)",
            ha="center", fontsize=9)
    ax.set_xlim(-0.2, 12.6)
    ax.set_ylim(0.4, 4.3)
    ax.axis("off")
    ax.set_title("Grouped-query attention: H = 4 query heads, G = 2 key/value heads, R = H / G = 2", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(out=OUT) -> list:
    plt = require_matplotlib()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "graph.png", out / "causal_tiles.png", out / "gqa_reshape.png", out / "online_softmax.gif"]
    draw_graph(plt, paths[0])
    draw_causal_tiles(plt, paths[1])
    draw_gqa(plt, paths[2])
    draw_online_softmax(plt, paths[3])
    return paths


if __name__ == "__main__":
    for p in main(sys.argv[1] if len(sys.argv) > 1 else OUT):
        print(p)
