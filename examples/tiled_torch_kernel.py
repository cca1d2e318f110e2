"""A FlashAttention-2 style attention in plain torch: the forward's tile loop with the online softmax,
a hand-written backward over key tiles and query tiles, and lse returned for the caller. The worked
example of docs/kernel-authors.md, checked there with npattn.testing.check_attention.

Conventions (npattn's): bool mask True = attend, a float mask is added; causal bottom-right
(j <= i + M - N); query head h uses kv head h // (H // G); lse natural log, -inf for a row with no key.
"""
import math

import torch


def _scores(q_i, k_j, i0, j0, mask, causal, scale, N, M):
    """One tile of scores (B, H, bq, bk), -inf where a key is not allowed."""
    s = scale * q_i @ k_j.mT
    i = torch.arange(i0, i0 + q_i.shape[2])[:, None]
    j = torch.arange(j0, j0 + k_j.shape[2])[None, :]
    keep = (j <= i + M - N) if causal else torch.ones(s.shape[-2:], dtype=torch.bool)
    if mask is not None:
        tile = mask[:, :, i0:i0 + q_i.shape[2], j0:j0 + k_j.shape[2]]
        keep = keep & tile if tile.dtype == torch.bool else keep
        s = s if tile.dtype == torch.bool else s + tile.to(s.dtype)
    return s.masked_fill(~keep, -math.inf)


class TiledAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, causal, scale, block):
        (B, H, N, D), G, M, dtype = q.shape, k.shape[1], k.shape[2], q.dtype
        ct = torch.float64 if q.dtype == torch.float64 else torch.float32      # half inputs: float32 inside
        q, k, v = q.to(ct), k.repeat_interleave(H // G, 1).to(ct), v.repeat_interleave(H // G, 1).to(ct)
        mask = None if mask is None else mask.expand(B, H, N, M)
        o = torch.zeros(B, H, N, v.shape[-1], dtype=ct)
        lse = torch.zeros(B, H, N, dtype=ct)
        for i0 in range(0, N, block):                                 # one query tile at a time
            m = torch.full((B, H, min(block, N - i0)), -math.inf, dtype=ct)
            l, acc = torch.zeros_like(m), torch.zeros(m.shape + (v.shape[-1],), dtype=ct)
            for j0 in range(0, M, block):                             # the online softmax over key tiles
                s = _scores(q[:, :, i0:i0 + block], k[:, :, j0:j0 + block], i0, j0, mask, causal, scale, N, M)
                m_new = torch.maximum(m, s.amax(-1))
                m_safe = torch.where(torch.isinf(m_new), 0.0, m_new)     # rows that have seen no key yet
                alpha = torch.exp(m - m_safe)                             # rescale what came before
                p = torch.exp(s - m_safe[..., None])
                l = alpha * l + p.sum(-1)
                acc = alpha[..., None] * acc + p @ v[:, :, j0:j0 + block]
                m = m_new
            o[:, :, i0:i0 + block] = acc / torch.where(l > 0, l, 1.0)[..., None]    # a row with no key: 0
            lse[:, :, i0:i0 + block] = torch.where(l > 0, m + torch.log(l), -math.inf)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.args = (mask, causal, scale, block, G, dtype)
        return o.to(dtype), lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse = ctx.saved_tensors
        mask, causal, scale, block, G, dtype = ctx.args
        (B, H, N, _), M, ct = q.shape, k.shape[2], q.dtype
        do = do.to(ct)
        delta = (do * o).sum(-1) - (0 if dlse is None else dlse.to(ct))  # rowsum(dO * O) - dlse
        lse = torch.where(torch.isinf(lse), 0.0, lse)                    # rows with no key: p = 0
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for j0 in range(0, M, block):                                   # one key tile at a time ...
            k_j, v_j = k[:, :, j0:j0 + block], v[:, :, j0:j0 + block]
            for i0 in range(0, N, block):                               # ... summed over every query tile
                q_i, do_i = q[:, :, i0:i0 + block], do[:, :, i0:i0 + block]
                p = torch.exp(_scores(q_i, k_j, i0, j0, mask, causal, scale, N, M) - lse[:, :, i0:i0 + block, None])
                dv[:, :, j0:j0 + block] += p.mT @ do_i
                ds = p * (do_i @ v_j.mT - delta[:, :, i0:i0 + block, None])
                dq[:, :, i0:i0 + block] += scale * ds @ k_j
                dk[:, :, j0:j0 + block] += scale * ds.mT @ q_i
        dk, dv = (x.view(B, G, H // G, M, x.shape[-1]).sum(2) for x in (dk, dv))   # fold the query heads
        return dq.to(dtype), dk.to(dtype), dv.to(dtype), None, None, None, None


def tiled_attention(q, k, v, *, mask=None, causal=False, scale=None, block=32):
    """q (B, H, N, D), k (B, G, M, D), v (B, G, M, Dv) -> (o in q's dtype, lse in float32 or float64)."""
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    return TiledAttention.apply(q, k, v, mask, causal, scale, block)
