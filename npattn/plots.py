"""Pictures for ``npattn demo --plot DIR`` (needs matplotlib: ``pip install 'npattn[plot]'``).

- ``curves.png``: training and held-out loss, and held-out token accuracy, against the step.
- ``attention.png``: the attention weights of every head of every layer on one held-out example,
  rows (queries) and columns (keys) labelled with the tokens (every k-th token when there are more
  than 16, so the labels stay readable), one shared colour bar for the weight (0 to 1).
- ``sqrt_d.png``: why scores are scaled by 1/sqrt(D), computed on the spot for unit-variance q, k at
  initialization: how saturated the softmax is (its largest weight, averaged over rows) and how large
  its Jacobian is (Frobenius norm of diag(p) - p p^T, averaged over rows), with and without the scale,
  as D grows (derivations/03-attention.md, "Why scale by 1/sqrt(D)").
"""

from __future__ import annotations

import os

import numpy as np

__all__ = ["demo_pictures", "require_matplotlib", "sqrt_d_stats"]


def require_matplotlib():
    """matplotlib.pyplot on the Agg backend, or a clear error naming the extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ModuleNotFoundError("--plot needs matplotlib: pip install 'npattn[plot]'") from err
    return plt


def _tokens(seq) -> list:
    return ["|" if t == 10 else str(int(t)) for t in seq]


def _token_ticks(ax, labels, max_labels: int = 16):
    """Label rows and columns with the tokens, every k-th one when there are more than
    ``max_labels``, each with its position (``3:7`` is position 3, token 7)."""
    step = max(1, -(-len(labels) // max_labels))                   # ceil(n / max_labels)
    where = list(range(0, len(labels), step))
    text = [f"{i}:{labels[i]}" if step > 1 else labels[i] for i in where]
    ax.set_xticks(where, text, fontsize=8, rotation=90 if step > 1 else 0)
    ax.set_yticks(where, text, fontsize=8)


def sqrt_d_stats(dims=(4, 16, 64, 256, 1024), keys: int = 64, rows: int = 256, seed: int = 0) -> dict:
    """Mean largest softmax weight and mean ||J||_F of the softmax Jacobian per row, for scores
    ``q . k`` (unscaled) and ``q . k / sqrt(D)`` (scaled), q and k with unit-variance entries."""
    from .ops import softmax

    rng = np.random.default_rng(seed)
    out = {"dims": list(dims), "max_p": {"scaled": [], "unscaled": []}, "jac": {"scaled": [], "unscaled": []}}
    for d in dims:
        q, k = rng.standard_normal((rows, d)), rng.standard_normal((keys, d))
        for name, s in (("unscaled", q @ k.T), ("scaled", q @ k.T / np.sqrt(d))):
            p = softmax(s)                                                       # (rows, keys)
            # ||diag(p) - p p^T||_F^2 = sum p^2 - 2 sum p^3 + (sum p^2)^2, row by row
            s2, s3 = (p ** 2).sum(-1), (p ** 3).sum(-1)
            out["max_p"][name].append(float(p.max(-1).mean()))
            out["jac"][name].append(float(np.sqrt(np.maximum(s2 - 2 * s3 + s2 ** 2, 0)).mean()))
    return out


def demo_pictures(plot_dir, cfg, model, example) -> list:
    """Write the three pictures; returns their paths."""
    plt = require_matplotlib()
    os.makedirs(plot_dir, exist_ok=True)
    paths = []

    # 1. curves
    steps = [c["step"] for c in cfg.curve]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax1.semilogy(steps, [c["train_loss"] for c in cfg.curve], label="training batch")
    ax1.semilogy(steps, [c["held_out_loss"] for c in cfg.curve], label="held-out")
    ax1.set(xlabel="step", ylabel="cross-entropy (nats)", title="loss")
    ax1.legend()
    ax2.plot(steps, [100 * c["held_out_acc"] for c in cfg.curve], color="C2")
    ax2.set(xlabel="step", ylabel="%", title="held-out token accuracy", ylim=(0, 101))
    fig.suptitle(f"npattn demo: {cfg.task}, {cfg.length} digits, every gradient by hand")
    fig.tight_layout()
    paths.append(os.path.join(plot_dir, "curves.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    # 2. attention maps of every head of every layer, on one held-out example
    x = np.asarray(example[:-1])[None, :]
    from .nn.gpt import gpt_forward

    _, cache = gpt_forward(model.params, model.config, x)
    layers, heads = model.config.num_layers, model.config.num_heads
    fig, axes = plt.subplots(layers, heads, figsize=(3.4 * heads + 1.2, 3.4 * layers + 0.6), squeeze=False,
                             constrained_layout=True)
    labels = _tokens(x[0])
    for li in range(layers):
        p = np.asarray(cache.blocks[li].attn.attn.p)[0]                  # (H, N, N)
        for h in range(heads):
            ax = axes[li][h]
            image = ax.imshow(p[h], cmap="viridis", vmin=0, vmax=1)
            _token_ticks(ax, labels)
            ax.set_title(f"layer {li}, head {h}", fontsize=10)
            if li == layers - 1:
                ax.set_xlabel("key (token)", fontsize=9)
            if h == 0:
                ax.set_ylabel("query (token)", fontsize=9)
    fig.colorbar(image, ax=axes, shrink=0.8, label="attention weight p (each row sums to 1)")
    fig.suptitle("attention weights on a held-out example (rows: queries, columns: keys; '|' is the separator)")
    paths.append(os.path.join(plot_dir, "attention.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    # 3. the 1/sqrt(D) picture
    stats = sqrt_d_stats()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    for name, style in (("unscaled", "o-"), ("scaled", "s-")):
        label = "q·k" if name == "unscaled" else "q·k / √D"
        ax1.semilogx(stats["dims"], stats["max_p"][name], style, base=2, label=label)
        ax2.loglog(stats["dims"], stats["jac"][name], style, base=2, label=label)
    ax1.set(xlabel="head dim D", ylabel="mean of max_j p_ij", title="saturation: the largest weight of a row")
    ax2.set(xlabel="head dim D", ylabel="mean ||diag(p) - p pᵀ||_F", title="size of the softmax Jacobian")
    ax1.legend()
    ax2.legend()
    fig.suptitle("64 keys, unit-variance q and k at init: unscaled scores saturate and the gradient vanishes as D grows")
    fig.tight_layout()
    paths.append(os.path.join(plot_dir, "sqrt_d.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
