"""Independent single-process references: dense masks, explicit softmax, float64 by default.

Nothing here uses seqpar's kernels: tests compare seqpar against these.
"""

from __future__ import annotations

import torch


def dense_attention(q, k, v, mask=None, scale=None, dtype=torch.float64):
    """softmax(scale * Q K^T + mask) V with q [B, Lq, H, D], k/v [B, Lk, Hkv, D] (kv heads repeated).

    ``mask``: bool [Lq, Lk] or [H, Lq, Lk] (True = visible). Rows with no visible key give 0.
    Returns (out [B, Lq, H, D], lse [B, H, Lq]) in ``dtype``; differentiable.
    """
    H, Hkv = q.shape[2], k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qd, kd, vd = (t.to(dtype) for t in (q, k, v))
    kd, vd = kd.repeat_interleave(H // Hkv, dim=2), vd.repeat_interleave(H // Hkv, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", qd, kd) * scale
    if mask is not None:
        s = s.masked_fill(~mask.to(s.device), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse).unsqueeze(-1))
    out = torch.einsum("bhqk,bkhd->bqhd", p, vd)
    return out, lse


def causal_mask(Lq, Lk, *, bottom_right=False):
    shift = Lk - Lq if bottom_right else 0
    return torch.arange(Lk)[None, :] <= torch.arange(Lq)[:, None] + shift


def segment_mask(q_seg, k_seg):
    return q_seg[:, None] == k_seg[None, :]


def rel_err(got, ref):
    """Max abs error relative to the reference's scale (max |ref|, floored at 1)."""
    got, ref = got.double(), ref.double()
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1.0)).item()
