"""Exact attention of a whole sequence on one device through the seqpar kernel (no communication).

Used by Ulysses (after its all-to-all every rank holds whole heads of the whole sequence) and by the
patched model on one device (``"full"``, decoding with a KV cache). ``q [B, L, H, D]``, ``k, v [B, Lk, Hkv, D]``
-> ``[B, L, H, D]`` in q's dtype; the backward recomputes the probabilities from the saved log-sum-exp.
``sinks [H]`` (learned sink logits, gpt-oss) are merged into each row's log-sum-exp (``kernels.merge_sink``);
a sliding ``window`` is cut into fused pieces by the kernel's plan (``kernels.plan``).
"""

from __future__ import annotations

import torch

from seqpar.attention.checks import check_sinks, effective_window
from seqpar.kernels import block_attention, block_attention_backward, merge_sink, sink_grad
from seqpar.sharding import document_bounds


class _LocalAttention(torch.autograd.Function):
    """Forward (out, lse) through ``block_attention``; backward through ``block_attention_backward``."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale, docs, sinks, window):
        # docs: host-int document boundaries (packed sequences): fused pieces per document, none across
        out, lse = block_attention(q, k, v, causal=causal, softmax_scale=scale, cu_seqlens=docs, window=window)
        if sinks is not None:
            out, lse = merge_sink(out, lse, sinks)
        ctx.save_for_backward(q, k, v, out, lse, sinks)
        ctx.causal, ctx.scale, ctx.docs, ctx.window = causal, scale, docs, window
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, sinks = ctx.saved_tensors
        dout = dout.contiguous()
        dq, dk, dv = block_attention_backward(dout, q, k, v, out, lse, causal=ctx.causal,
                                              softmax_scale=ctx.scale, cu_seqlens=ctx.docs, window=ctx.window)
        ds = None if sinks is None or not ctx.needs_input_grad[6] else sink_grad(dout, out, lse, sinks)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, ds, None


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float | None = None, *,
                    causal: bool | str = True, cu_seqlens: torch.Tensor | None = None,
                    sinks: torch.Tensor | None = None, window: int | None = None) -> torch.Tensor:
    """Exact (causal, or ``"bottom_right"`` for a KV cache) attention; ``cu_seqlens`` keeps it inside documents;
    ``sinks [H]`` adds one learned logit per head to every row's softmax denominator; ``window`` (causal only)
    limits each query at position p to the keys at ``p - window < k <= p`` (transformers' sliding window; None,
    or a window covering every key, is no window)."""
    docs = None if cu_seqlens is None else document_bounds(cu_seqlens, q.shape[1])
    check_sinks(sinks, q.shape[2])
    window = effective_window(window, k.shape[1], causal)
    return _LocalAttention.apply(q, k, v, causal, softmax_scale, docs, sinks, window)
