"""All-gather attention: the softmax-attention half of LASP-2H (Sun et al. 2025, "LASP-2: Rethinking
Sequence Parallelism for Linear Attention and Its Hybrid", arXiv:2502.07563).

Every rank all-gathers K and V once, then its local queries attend to the whole sequence with their GLOBAL
positions (so any layout works: the causal mask is ``k_pos <= q_pos``, documents of a packed sequence are
kept apart with segment ids). One collective forward, one backward, independent of the causal structure:

    K, V = all_gather(K_i, V_i)                    # [B, L, Hkv, D], rank-major
    O_i  = softmax(scale Q_i K^T + M_i) V          # M_i: global causal / document mask of Q_i's rows
    dQ_i = local;   dK_i, dV_i = reduce_scatter(dK, dV)   # every rank's queries touched every key

Shapes: ``q [B, L/N, H, D]``, ``k, v [B, L/N, Hkv, D]`` (Hkv divides H), output ``[B, L/N, H, D]``.

Bytes per call, per rank (``b_kv`` = bytes of the local k; ``a`` = 1 for float32/float64 inputs, 2 for
16-bit inputs because dK, dV are summed in float32 so bf16 rounding does not grow with N):

    forward:  all-gather of K and V packed in one buffer: (N-1) * 2 b_kv sent and received
    backward: reduce-scatter of dK and dV in one buffer:  (N-1) * 2 a b_kv sent and received

Sliding windows shorter than L gather only the keys each window reaches (``seqpar.attention.window``, a halo
all-to-all with its own bytes formula ``window_bytes``).

Memory: the gathered K, V (``2 b_kv N``) are kept for the backward instead of gathered again.
"""

from __future__ import annotations

import torch

from seqpar.attention.checks import check_options, check_qkv, check_sinks, effective_window
from seqpar.attention.window import window_attention, window_bytes
from seqpar.comm import Group, all_gather_tensor, group_rank, group_size, reduce_scatter_tensor
from seqpar.kernels import block_attention, block_attention_backward, merge_sink, sink_grad
from seqpar.sharding import Layout, document_bounds, local_chunks


def _mask_args(seq_len: int, n: int, rank: int, layout: str, cu_seqlens) -> dict:
    """Kernel mask arguments for this rank's queries against the rank-major gathered keys: the global runs
    of both as host ints (the kernel cuts the block into a full rectangle of the keys before each local
    chunk plus that chunk's causal diagonal, per document), and the documents' boundaries."""
    if n == 1 and cu_seqlens is None:
        return {}  # plain (square) causal or no mask: one fused kernel call
    args = {"q_spans": local_chunks(seq_len, n, rank, layout),
            "k_spans": [c for r in range(n) for c in local_chunks(seq_len, n, r, layout)]}
    if cu_seqlens is not None:
        args["cu_seqlens"] = cu_seqlens
    return args


class _AllGatherAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, causal, scale, layout, cu_seqlens, sinks):
        n, rank = group_size(group), group_rank(group)
        # Step 1: one all-gather of K and V together -> [2, B, L, Hkv, D] in rank-major order.
        kv = all_gather_tensor(torch.stack([k, v]), group, dim=2)
        mask = _mask_args(q.shape[1] * n, n, rank, layout, cu_seqlens)
        # Step 2: local queries over the whole sequence, masked by global positions / documents.
        out, lse = block_attention(q, kv[0], kv[1], causal=causal, softmax_scale=scale, **mask)
        if sinks is not None:  # learned sinks: one more logit per row (kernels.merge_sink)
            out, lse = merge_sink(out, lse, sinks)
        ctx.save_for_backward(q, kv, out, lse, sinks)
        ctx.group, ctx.causal, ctx.scale, ctx.mask = group, causal, scale, mask
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, kv, out, lse, sinks = ctx.saved_tensors
        dout = dout.contiguous()
        dq, dk, dv = block_attention_backward(
            dout, q, kv[0], kv[1], out, lse, causal=ctx.causal, softmax_scale=ctx.scale, **ctx.mask
        )
        ds = None if sinks is None or not ctx.needs_input_grad[8] else sink_grad(dout, out, lse, sinks)
        # Step 3: every rank's queries contributed to every key: sum dK, dV and keep this rank's slice.
        dkv = reduce_scatter_tensor(torch.stack([dk, dv]), ctx.group, dim=2)
        return dq.to(q.dtype), dkv[0].to(kv.dtype), dkv[1].to(kv.dtype), None, None, None, None, None, ds


def allgather_bytes(q, k, v, *, group: Group = None, layout: Layout = "zigzag", cu_seqlens=None, window=None,
                    causal: bool = True, **_) -> tuple[int, int]:
    """(forward, backward) bytes this rank sends in one call: the module docstring's formula."""
    n, b_kv = group_size(group), k.numel() * k.element_size()
    if effective_window(window, q.shape[1] * n, causal) is not None:
        cu = None if cu_seqlens is None else document_bounds(cu_seqlens, q.shape[1] * n)
        return window_bytes(q, k, v, group=group, layout=layout, cu_seqlens=cu, window=window)
    a = 2 if k.element_size() == 2 else 1  # 16-bit dK, dV are reduced in float32
    return (n - 1) * 2 * b_kv, (n - 1) * 2 * a * b_kv


def allgather_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: Group = None,
    causal: bool = True,
    softmax_scale: float | None = None,
    layout: Layout = "zigzag",
    cu_seqlens: torch.Tensor | None = None,
    validate: bool = True,
    sinks: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Exact attention of a sequence sharded over ``group``: all-gather K, V; attend with global positions.

    Args:
        q: ``[B, L/N, H, D]`` this rank's shard in ``layout``.
        k, v: ``[B, L/N, Hkv, D]``, Hkv dividing H (GQA).
        group: the SP process group (None = one device).
        causal: causal mask over global positions.
        softmax_scale: defaults to ``D ** -0.5``.
        layout: ``"zigzag"`` or ``"contiguous"`` (seqpar.sharding); the output uses the same layout.
        cu_seqlens: optional int ``[num_docs + 1]`` global document boundaries of the packed sequence
            (same on every rank, 0 first, L last); no token attends across documents.
        validate: compare shapes across ranks (one small collective); False skips it when the caller already
            did in this forward (``patch_model`` validates at the first layer only).
        sinks: optional ``[H]`` learned sink logit per query head (gpt-oss), merged once per row; its gradient
            covers this rank's rows.
        window: sliding window (causal only; the query at global position p sees keys ``p - window < k <= p``).
            Shorter than L, only the keys the window reaches are gathered (``seqpar.attention.window``'s halo).

    Returns:
        ``[B, L/N, H, D]`` this rank's shard of the output, in q's dtype; differentiable in q, k, v.

    Raises:
        ValueError on every rank: shapes differing across ranks, kv heads not dividing heads, a sequence
        the layout cannot split, malformed ``cu_seqlens``.
    """
    n = group_size(group)
    check_options(layout=layout, causal=causal, softmax_scale=softmax_scale)
    check_qkv(q, k, v, group=group, layout=layout, cu_seqlens=cu_seqlens, validate=validate)
    check_sinks(sinks, q.shape[2])
    seq_len = q.shape[1] * n
    if cu_seqlens is not None:
        cu_seqlens = document_bounds(cu_seqlens, seq_len)  # host ints from here on (same error on every rank)
    window = effective_window(window, seq_len, causal)
    if window is not None:  # gather only the keys the window reaches: the halo before each local run
        return window_attention(q, k, v, group=group, layout=layout, cu_seqlens=cu_seqlens, window=window,
                                softmax_scale=softmax_scale, sinks=sinks)
    return _AllGatherAttention.apply(
        q.contiguous(), k.contiguous(), v.contiguous(), group, causal, softmax_scale, layout, cu_seqlens, sinks
    )
