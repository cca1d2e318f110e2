"""A FlashAttention-2 style attention in torch, written as a kernel author writes one (a forward tile
loop with the online softmax, a hand-written backward over key tiles and query tiles), with the
bugs kernels really have planted behind ``bug=``. tests/test_attention_check.py checks that
``npattn.testing.check_attention`` fails every planted bug and names the convention ones.

Bugs: tile loops: "rescale-l-only" (the online rescale applied to l, not to acc), "dv-last-q-tile"
(dv assigned, not accumulated, over query tiles), "delta-unrescaled-o" (delta = rowsum(dO * O) with
an O accumulated without the rescale); conventions: "scale-ignored", "window-off-by-one",
"alibi-top-left", "lse-without-sink", "dlse-ignored", "causal-ignored", "causal-top-left";
a wrong delta: "delta-plus-dlse"; precision: "fp16-scores" (q.k in float16 for float32 inputs),
"low-precision" (scores and accumulators rounded to 17 mantissa bits).
"""

import math

import torch

BUGS = ("rescale-l-only", "dv-last-q-tile", "delta-unrescaled-o", "scale-ignored", "window-off-by-one",
        "alibi-top-left", "lse-without-sink", "dlse-ignored", "causal-ignored", "causal-top-left", "delta-plus-dlse",
        "fp16-scores", "low-precision")


def _round_bits(x, drop):
    """float32 ``x`` rounded to ``23 - drop`` mantissa bits."""
    bits = x.contiguous().view(torch.int32)
    return ((bits + (1 << (drop - 1))) & ~((1 << drop) - 1)).view(torch.float32)


def make_tiled(bug=None, block=32):
    """The kernel ``fn(q, k, v, *, mask, causal, scale, window, softcap, alibi_slopes, sinks,
    cu_seqlens_q, cu_seqlens_k) -> (o, lse)`` with tiles of ``block``; ``bug`` one name of ``BUGS`` or several."""
    bugs = set() if bug is None else {bug} if isinstance(bug, str) else set(bug)
    assert bugs <= set(BUGS), bugs

    def lowp(x):
        return _round_bits(x, 6) if "low-precision" in bugs and x.dtype == torch.float32 else x

    class Tiled(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, sinks, mask, causal, scale, window, softcap, alibi):
            ct = torch.float64 if q.dtype == torch.float64 else torch.float32
            B, H, N, D = q.shape
            G, M = k.shape[1], k.shape[2]
            if scale is None or "scale-ignored" in bugs:
                scale = 1 / math.sqrt(D)
            qc, kc, vc = q.to(ct), k.repeat_interleave(H // G, 1).to(ct), v.repeat_interleave(H // G, 1).to(ct)
            if mask is not None:
                mask = mask.expand(B, H, N, M)
            rules = (mask, causal, scale, window, softcap, alibi, N, M)
            o = torch.zeros(B, H, N, vc.shape[-1], dtype=ct)
            o_delta = torch.zeros_like(o)
            lse = torch.zeros(B, H, N, dtype=ct)
            for i0 in range(0, N, block):
                qi = qc[:, :, i0:i0 + block]
                m = torch.full(qi.shape[:-1], -math.inf, dtype=ct)
                l = torch.zeros_like(m)
                acc = torch.zeros(qi.shape[:-1] + (vc.shape[-1],), dtype=ct)
                acc_unrescaled = torch.zeros_like(acc)
                for j0 in range(0, M, block):
                    s, _ = _scores(qi, kc[:, :, j0:j0 + block], i0, j0, rules)
                    m_new = torch.maximum(m, s.amax(-1))
                    m_safe = torch.where(torch.isinf(m_new), 0.0, m_new)
                    alpha = torch.exp(m - m_safe)
                    p = torch.exp(s - m_safe[..., None])
                    l = alpha * l + p.sum(-1)
                    pv = lowp(p @ vc[:, :, j0:j0 + block])
                    acc = (acc if "rescale-l-only" in bugs else alpha[..., None] * acc) + pv
                    acc = lowp(acc)
                    acc_unrescaled = acc_unrescaled + pv
                    m = m_new
                lse_keys = torch.where(l > 0, m + torch.log(l), -math.inf)
                if sinks is not None:                                        # the sink: one more term in l
                    sink = sinks.to(ct)[None, :, None].expand_as(m)
                    m_fin = torch.maximum(m, sink)
                    alpha = torch.exp(m - m_fin)
                    l = alpha * l + torch.exp(sink - m_fin)
                    acc = alpha[..., None] * acc
                    acc_unrescaled = alpha[..., None] * acc_unrescaled
                    m = m_fin
                safe_l = torch.where(l > 0, l, 1.0)[..., None]
                o[:, :, i0:i0 + block] = acc / safe_l
                o_delta[:, :, i0:i0 + block] = acc_unrescaled / safe_l
                lse[:, :, i0:i0 + block] = lse_keys if "lse-without-sink" in bugs else \
                    torch.where(l > 0, m + torch.log(l), -math.inf)
            ctx.save_for_backward(qc, kc, vc, o, o_delta, lse, sinks)
            ctx.rules, ctx.dtypes, ctx.G = rules, (q.dtype, k.dtype, v.dtype), G
            lse_out = lse if ct == q.dtype else lse.float()
            return o.to(q.dtype), lse_out

        @staticmethod
        def backward(ctx, do, dlse):
            qc, kc, vc, o, o_delta, lse, sinks = ctx.saved_tensors
            ct = qc.dtype
            mask, causal, scale, window, softcap, alibi, N, M = ctx.rules
            B, H = qc.shape[:2]
            do = do.to(ct)
            dlse = torch.zeros_like(lse) if dlse is None else dlse.to(ct)
            o_for_delta = o_delta if "delta-unrescaled-o" in bugs else o
            delta = (do * o_for_delta).sum(-1)
            if "delta-plus-dlse" in bugs:
                delta = delta + dlse
            elif "dlse-ignored" not in bugs:
                delta = delta - dlse                                          # eq. (5.6): the lse path
            lse_safe = torch.where(torch.isinf(lse), 0.0, lse)
            dq, dk, dv = torch.zeros_like(qc), torch.zeros_like(kc), torch.zeros_like(vc)
            for j0 in range(0, M, block):
                kj, vj = kc[:, :, j0:j0 + block], vc[:, :, j0:j0 + block]
                dk_j, dv_j = torch.zeros_like(kj), torch.zeros_like(vj)
                for i0 in range(0, N, block):
                    qi, doi = qc[:, :, i0:i0 + block], do[:, :, i0:i0 + block]
                    s, dcap = _scores(qi, kj, i0, j0, (mask, causal, scale, window, softcap, alibi, N, M))
                    p = torch.exp(s - lse_safe[:, :, i0:i0 + block, None])
                    dv_part = p.mT @ doi
                    dv_j = dv_part if "dv-last-q-tile" in bugs else dv_j + dv_part
                    dp = doi @ vj.mT
                    ds = p * (dp - delta[:, :, i0:i0 + block, None]) * dcap
                    dq[:, :, i0:i0 + block] += scale * ds @ kj
                    dk_j += scale * ds.mT @ qi
                dk[:, :, j0:j0 + block], dv[:, :, j0:j0 + block] = dk_j, dv_j
            G = ctx.G
            dk = dk.view(B, G, H // G, *dk.shape[2:]).sum(2)
            dv = dv.view(B, G, H // G, *dv.shape[2:]).sum(2)
            dsinks = None
            if sinks is not None:
                p_sink = torch.exp(sinks.to(ct)[None, :, None] - lse_safe)
                dsinks = (-(p_sink * delta)).sum((0, 2)).to(sinks.dtype)
            dtq, dtk, dtv = ctx.dtypes
            return dq.to(dtq), dk.to(dtk), dv.to(dtv), dsinks, None, None, None, None, None, None

    def _scores(qi, kj, i0, j0, rules):
        """The tile's scores with every rule applied (-inf where not allowed) and d(capped)/d(raw)."""
        mask, causal, scale, window, softcap, alibi, N, M = rules
        if "fp16-scores" in bugs:
            s = (qi.half() @ kj.half().mT).to(qi.dtype) * scale
        else:
            s = lowp(qi @ kj.mT) * scale
        dcap = 1.0
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
            dcap = 1 - (s / softcap) ** 2
        i = torch.arange(i0, i0 + qi.shape[2])[:, None]
        j = torch.arange(j0, j0 + kj.shape[2])[None, :]
        off = 0 if "causal-top-left" in bugs else M - N
        if alibi is not None:
            dist = (i - j).abs() if "alibi-top-left" in bugs else (i + M - N - j).abs()
            s = s - alibi.to(s.dtype)[:, None, None] * dist
        keep = torch.ones(s.shape[-2:], dtype=torch.bool)
        if causal and "causal-ignored" not in bugs:
            keep = keep & (j <= i + off)
        if window is not None:
            left, right = window
            if left is not None:
                keep = keep & (j >= i + M - N - left + (1 if "window-off-by-one" in bugs else 0))
            if right is not None:
                keep = keep & (j <= i + M - N + right)
        if mask is not None:
            tile = mask[:, :, i0:i0 + qi.shape[2], j0:j0 + kj.shape[2]]
            if tile.dtype == torch.bool:
                keep = keep & tile
            else:
                s = s + tile.to(s.dtype)
        return s.masked_fill(~keep, -math.inf), dcap

    def kernel(q, k, v, *, mask=None, causal=False, scale=None, window=None, softcap=None, alibi_slopes=None,
               sinks=None, cu_seqlens_q=None, cu_seqlens_k=None):
        if cu_seqlens_q is None:
            return Tiled.apply(q, k, v, sinks, mask, causal, scale, window, softcap, alibi_slopes)
        outs = [Tiled.apply(q[None, :, a:b], k[None, :, c:e], v[None, :, c:e], sinks, mask, causal, scale, window,
                            softcap, alibi_slopes)
                for a, b, c, e in zip(cu_seqlens_q[:-1].tolist(), cu_seqlens_q[1:].tolist(),
                                      cu_seqlens_k[:-1].tolist(), cu_seqlens_k[1:].tolist())]
        return torch.cat([o[0] for o, _ in outs], dim=1), torch.cat([lse[0] for _, lse in outs], dim=1)

    return kernel
