"""``npattn demo``: train a small GPT with the hand-derived backward on a toy task that needs
attention, then decode held-out examples with the KV cache.

Tasks (digits 0-9; a sequence is the input, a separator, then the answer):
- ``reverse``: ``3 1 4 1 5 | 5 1 4 1 3`` — each answer token must look back at one input position.
- ``sort``:    ``3 1 4 1 5 | 1 1 3 4 5`` — each answer token needs the whole input (counting).
- ``copy``:    ``3 1 4 1 5 | 3 1 4 1 5`` — the easiest: attend ``L + 1`` positions back.
Training is teacher-forced next-token prediction; the loss counts only the answer positions.
Held-out examples are drawn once from their own seed and never appear in training.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .nn import GPT, AdamW, GPTConfig
from .train import evaluate, train_step

__all__ = ["DemoConfig", "run_demo", "make_batch", "TASKS"]

TASKS = ("reverse", "sort", "copy")
SEP, IGNORE = 10, -100


@dataclass
class DemoConfig:
    task: str = "reverse"
    length: int = 8                 # digits per input
    steps: int = 800
    batch: int = 64
    embed_dim: int = 64
    num_heads: int = 4
    num_layers: int = 2
    lr: float = 3e-3
    warmup: int = 100
    seed: int = 0
    dtype: str = "float32"
    held_out: int = 512
    eval_every: int = 50
    examples: int = 4
    curve: list = field(default_factory=list)


def answer(task: str, digits: np.ndarray) -> np.ndarray:
    if task == "reverse":
        return digits[:, ::-1]
    if task == "sort":
        return np.sort(digits, axis=1)
    return digits


def make_batch(task: str, digits: np.ndarray):
    """``(x, y)`` for teacher forcing: the sequence ``digits | answer`` shifted by one, with the
    targets of the input positions ignored. Also returns the full sequence."""
    b, length = digits.shape
    seq = np.concatenate([digits, np.full((b, 1), SEP), answer(task, digits)], axis=1)   # (B, 2L+1)
    x, y = seq[:, :-1], seq[:, 1:].copy()
    y[:, :length] = IGNORE                                                # only the answer is learned
    return x, y, seq


def _draw(rng, n, length, exclude=None):
    digits = rng.integers(0, 10, (n, length))
    if exclude:
        keep = np.array([row.tobytes() not in exclude for row in digits])
        digits = digits[keep]
    return digits


def _progress(step, steps, loss, acc, t0, stream):
    elapsed = time.perf_counter() - t0
    eta = elapsed / max(step, 1) * (steps - step)
    width = 24
    done = int(width * step / steps)
    line = (f"[{'#' * done}{'.' * (width - done)}] step {step:>5}/{steps}  loss {loss:.4f}  "
            f"held-out acc {acc:6.2%}  {elapsed:5.1f}s elapsed, ~{eta:4.0f}s left")
    if stream.isatty():
        print("\r" + line, end="", file=stream, flush=True)
    else:
        print(line, file=stream, flush=True)


def run_demo(cfg: DemoConfig, *, out=None, plot_dir=None, json_path=None) -> dict:
    """Train, report held-out accuracy, decode examples with the KV cache; returns the metrics."""
    out = sys.stdout if out is None else out
    if cfg.task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {cfg.task!r}")
    rng = np.random.default_rng(cfg.seed)
    held = _draw(np.random.default_rng(cfg.seed + 10_000), cfg.held_out, cfg.length)
    held_set = {row.tobytes() for row in held}
    hx, hy, hseq = make_batch(cfg.task, held)
    config = GPTConfig(vocab_size=11, max_len=2 * cfg.length + 1, embed_dim=cfg.embed_dim, num_heads=cfg.num_heads,
                       num_layers=cfg.num_layers, ffn_dim=4 * cfg.embed_dim)
    model = GPT(config, dtype=cfg.dtype, seed=cfg.seed)
    opt = AdamW(model.params, lr=cfg.lr, weight_decay=0.01)
    print(f"npattn demo: task {cfg.task!r}, {cfg.length} digits, GPT with {cfg.num_layers} layers, E={cfg.embed_dim}, "
          f"H={cfg.num_heads}, {model.num_params():,} parameters, {cfg.dtype}; {cfg.steps} steps of batch "
          f"{cfg.batch}, AdamW lr {cfg.lr}, clip 1.0; every gradient by hand", file=out, flush=True)
    t0 = time.perf_counter()
    held_loss, acc = evaluate(model, hx, hy)                              # the untrained model: ~log 10
    cfg.curve.append(dict(step=0, train_loss=held_loss, held_out_loss=held_loss, held_out_acc=acc, seconds=0.0))
    for step in range(1, cfg.steps + 1):
        opt.lr = cfg.lr * min(1.0, step / cfg.warmup) * (0.45 * (1 + math.cos(math.pi * step / cfg.steps)) + 0.1)
        x, y, _ = make_batch(cfg.task, _draw(rng, cfg.batch, cfg.length, exclude=held_set))
        result = train_step(model, opt, x.astype(np.int64), y.astype(np.int64))
        if step % cfg.eval_every == 0 or step == cfg.steps:
            held_loss, acc = evaluate(model, hx, hy)
            cfg.curve.append(dict(step=step, train_loss=result.loss, held_out_loss=held_loss, held_out_acc=acc,
                                  seconds=time.perf_counter() - t0))
            _progress(step, cfg.steps, result.loss, acc, t0, out)
    if out.isatty():
        print(file=out)
    train_time = time.perf_counter() - t0
    # greedy decoding with the KV cache: the model sees only the input and the separator
    prompts = hseq[:cfg.examples, :cfg.length + 1]
    decoded = np.asarray(model.generate(prompts, cfg.length))[:, cfg.length + 1:]
    full = np.asarray(model.generate(hseq[:, :cfg.length + 1], cfg.length))[:, cfg.length + 1:]
    exact = float(np.mean(np.all(full == hseq[:, cfg.length + 1:], axis=1)))
    token_acc_decoded = float(np.mean(full == hseq[:, cfg.length + 1:]))
    print(f"trained in {train_time:.1f} s; held-out token accuracy {acc:.2%} (teacher forced), "
          f"{token_acc_decoded:.2%} decoded greedily with the KV cache, {exact:.2%} of sequences exact", file=out)
    for prompt, target, got in zip(prompts, hseq[:cfg.examples, cfg.length + 1:], decoded):
        fmt = "".join
        print(f"  input {fmt(map(str, prompt[:-1]))}  target {fmt(map(str, target))}  output {fmt(map(str, got))}"
              f"  {'ok' if np.array_equal(target, got) else 'WRONG'}", file=out)
    metrics = dict(task=cfg.task, steps=cfg.steps, seconds=train_time, held_out_token_acc=acc,
                   decoded_token_acc=token_acc_decoded, decoded_exact=exact)
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(dict(config=asdict(cfg), metrics=metrics), f, indent=1)
        print(f"wrote {json_path}", file=out)
    if plot_dir:
        from .plots import demo_pictures

        for path in demo_pictures(plot_dir, cfg, model, hseq[0]):
            print(f"wrote {path}", file=out)
    return metrics
