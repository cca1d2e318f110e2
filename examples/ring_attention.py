"""Ring attention's forward AND backward, with S "devices" simulated by a loop. Run it:
python examples/ring_attention.py

Each device holds one chunk of the keys and values. It attends every query to its own chunk with
the tiled op, giving (o_s, lse_s); combine_attention merges the parts into attention over all keys.
On a real ring the K/V chunks travel device to device and each device keeps a running (o, lse) for
its own block of queries, combining as each chunk passes; the arithmetic is this combine.
Backward: the combine hands chunk s its (do_s, dlse_s), and flash_attention_backward(..., dlse=)
on that chunk gives its keys' dk, dv and its share of dq (summed over chunks: an all-reduce).
npattn.ops.combine.ring_attention_forward/backward package this loop as a pair.
Derivation: derivations/17-split-kv-combine.md.
"""
import numpy as np

from npattn import attention_backward, attention_forward, flash_attention_backward, flash_attention_forward
from npattn.ops.combine import combine_attention, combine_attention_backward

rng = np.random.default_rng(0)
B, H, G, N, M, D, Dv = 2, 4, 2, 6, 11, 8, 5          # grouped-query: 4 query heads share 2 K/V heads
q = rng.standard_normal((B, H, N, D))
k, v = rng.standard_normal((B, G, M, D)), rng.standard_normal((B, G, M, Dv))
dout = rng.standard_normal((B, H, N, Dv))            # a random dout: the loss is sum(o * dout)
bounds = [0, 3, 4, 9, 11]                            # S = 4 devices, uneven chunks [j0, j1) of the keys


def ring_attention(causal, pass_dlse=True):
    # forward: device s sees only k[..., j0:j1, :], v[..., j0:j1, :]
    parts, caches = [], []
    for j0, j1 in zip(bounds[:-1], bounds[1:]):
        # causal over all keys, seen from this chunk: key j0 + j' is visible iff
        # j' <= i + (j1 - j0) - N + (M - j1), the chunk's own window (None, M - j1)   eq. (17.9)
        window = (None, M - j1) if causal else None
        o_s, cache_s = flash_attention_forward(q, k[..., j0:j1, :], v[..., j0:j1, :], window=window)
        parts.append(o_s)
        caches.append(cache_s)
    lse_parts = [c.lse for c in caches]              # -inf where a chunk lies in a row's future
    (o, lse), cache = combine_attention(parts, lse_parts)
    # backward: the combine's gradients go back to the devices, one (do_s, dlse_s) pair each
    do_parts, dlse_parts = combine_attention_backward((dout, None), cache)
    dq, dk, dv = np.zeros_like(q), [], []
    for s, cache_s in enumerate(caches):
        dlse_s = dlse_parts[s] if pass_dlse else None
        dq_s, dk_s, dv_s = flash_attention_backward(do_parts[s], cache_s, dlse=dlse_s)
        dq += dq_s                                   # every chunk saw every query: all-reduce dq
        dk.append(dk_s)                              # dk, dv stay on the device that owns the chunk
        dv.append(dv_s)
    empty = int(np.isneginf(np.stack(lse_parts)).sum())
    return (o, lse, dq, np.concatenate(dk, axis=-2), np.concatenate(dv, axis=-2)), empty


def all_keys(causal):                                # one device, all keys: the reference
    o, cache = attention_forward(q, k, v, causal=causal)
    return (o, flash_attention_forward(q, k, v, causal=causal)[1].lse) + attention_backward(dout, cache)


names = ["o", "lse", "dq", "dk", "dv"]
for causal in (False, True):
    ring, empty = ring_attention(causal)
    errors = {name: np.abs(a - b).max() for name, a, b in zip(names, ring, all_keys(causal))}
    assert max(errors.values()) < 1e-12, errors
    print(f"causal={causal!s:<5} rows x chunks with lse_s = -inf: {empty:2d}   max |ring - all keys|: "
          + "  ".join(f"{name} {err:.0e}" for name, err in errors.items()))

# the dlse_s are not optional: without them each chunk's backward treats its own softmax as the
# whole row (the classic mistake). dv survives (it needs only p and dout); dq and dk do not.
wrong, _ = ring_attention(False, pass_dlse=False)
wrong_errors = {name: np.abs(a - b).max() for name, a, b in zip(names, wrong, all_keys(False))}
print("without dlse_s, max |ring - all keys| > 1e-3:", {name: bool(e > 1e-3) for name, e in wrong_errors.items()})
