"""Single-head attention: forward, backward by hand, and a finite-difference check. Read this first.

No backends, no dtypes, no masks, no heads: the math of derivations/03-attention.md in plain NumPy,
the way llm.c's doc/layernorm/layernorm.py reads. npattn's attention_forward/backward are this, plus
batches, heads, masks and the rest. Run it: python examples/attention_in_40_lines.py
"""
import numpy as np


def attention_forward(q, k, v):                      # q (N, D), k (M, D), v (M, Dv)
    s = q @ k.T / np.sqrt(q.shape[1])                # (N, M) scores                 eq. (3.1)
    e = np.exp(s - s.max(axis=1, keepdims=True))     # subtract the row max: exp <= 1
    p = e / e.sum(axis=1, keepdims=True)             # (N, M) softmax over keys      eq. (3.4)
    o = p @ v                                        # (N, Dv)                       eq. (3.6)
    return o, (q, k, v, p)


def attention_backward(dout, cache):                 # dout = dL/do (N, Dv)
    q, k, v, p = cache
    scale = 1 / np.sqrt(q.shape[1])
    dv = p.T @ dout                                  # o = p v      -> dv = p^T dout  eq. (3.7)
    dp = dout @ v.T                                  #              -> dp = dout v^T
    ds = p * (dp - (p * dp).sum(axis=1, keepdims=True))   # softmax: J^T dp, row by row  eq. (3.9)
    dq = scale * ds @ k                              # s = scale q k^T               eq. (3.10)
    dk = scale * ds.T @ q
    return dq, dk, dv


rng = np.random.default_rng(0)
q, k, v = rng.standard_normal((3, 4)), rng.standard_normal((5, 4)), rng.standard_normal((5, 2))
dout = rng.standard_normal((3, 2))                   # a random dout: the loss is sum(o * dout)
o, cache = attention_forward(q, k, v)
grads = attention_backward(dout, cache)
eps = 1e-6
for name, x, dx in zip("qkv", (q, k, v), grads):     # central differences, one entry at a time
    numeric = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        x[i] += eps
        plus = np.sum(attention_forward(q, k, v)[0] * dout)
        x[i] -= 2 * eps
        minus = np.sum(attention_forward(q, k, v)[0] * dout)
        x[i] += eps
        numeric[i] = (plus - minus) / (2 * eps)
    print(f"d{name}: max |analytic - numeric| = {np.abs(dx - numeric).max():.1e}")
