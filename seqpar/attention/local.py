"""Exact attention of a whole sequence on one device through the seqpar kernel (no communication).

Used by Ulysses (after its all-to-all every rank holds whole heads of the whole sequence) and by the
patched model on one device (``"full"``, decoding with a KV cache). ``q [B, L, H, D]``, ``k, v [B, Lk, Hkv, D]``
-> ``[B, L, H, D]`` in q's dtype; the backward recomputes the probabilities from the saved log-sum-exp.
"""

from __future__ import annotations

import torch

from seqpar.kernels import block_attention, block_attention_backward
from seqpar.sharding import document_bounds


class _LocalAttention(torch.autograd.Function):
    """Forward (out, lse) through ``block_attention``; backward through ``block_attention_backward``."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale, docs):
        # docs: host-int document boundaries (packed sequences): fused pieces per document, none across
        out, lse = block_attention(q, k, v, causal=causal, softmax_scale=scale, cu_seqlens=docs)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale, ctx.docs = causal, scale, docs
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = block_attention_backward(dout.contiguous(), q, k, v, out, lse, causal=ctx.causal,
                                              softmax_scale=ctx.scale, cu_seqlens=ctx.docs)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float | None = None, *,
                    causal: bool | str = True, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Exact (causal, or ``"bottom_right"`` for a KV cache) attention; ``cu_seqlens`` keeps it inside documents."""
    docs = None if cu_seqlens is None else document_bounds(cu_seqlens, q.shape[1])
    return _LocalAttention.apply(q, k, v, causal, softmax_scale, docs)
