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

Memory per rank above its inputs (units u of the local q, float32, MHA; with GQA the K/V terms shrink by H/Hkv):
the gathered K, V, ``2N u`` (the LASP-2H cost), kept for the backward instead of gathered again, in the
all-gather's rank-major layout (each rank's K/V block is attended separately and merged in place into the
output, 1 u: no reordered copy); in the backward the dK/dV of the whole sequence, ``2N u``, written block by
block into the reduce-scatter's input (no stacked or concatenated copies), + one block's dQ/dK/dV: 4N + 5 u.
Measured (``[1, 16384, 8, 64]``, one thread per rank, gloo): N = 2: 24.0 -> 17.0 u, N = 4: 44.1 -> 29.1 u
(before: a reordered copy of the gathered K/V and stacked and concatenated copies of dK/dV, 2N u each); the
2N u above the count are gloo's (the forward alone holds 2N u more than the tensors seqpar allocates).
"""

from __future__ import annotations

import torch

from seqpar.attention.checks import check_options, check_qkv, check_sinks, effective_window
from seqpar.attention.window import window_attention, window_bytes
from seqpar.comm import Group, all_gather_tensor, group_rank, group_size, reduce_scatter_tensor
from seqpar.kernels import (
    acc_dtype,
    block_attention,
    block_attention_backward,
    merge_into,
    merge_partials,
    merge_sink,
    sink_grad,
    spans_plan,
)
from seqpar.sharding import Layout, document_bounds, local_chunks


def _mask_args(seq_len: int, n: int, rank: int, layout: str, cu_seqlens, causal: bool, src: int) -> dict | None:
    """Kernel mask arguments for this rank's queries against rank ``src``'s gathered keys: the global runs of
    both as host ints (the kernel cuts the block into full rectangles and causal diagonals, per document), or
    None when no query sees any of those keys (the block is skipped)."""
    if cu_seqlens is None and (n == 1 or not causal):
        return {}  # plain (square) causal or no mask: one fused kernel call
    args = {"q_spans": local_chunks(seq_len, n, rank, layout), "k_spans": local_chunks(seq_len, n, src, layout)}
    if cu_seqlens is not None:
        args["cu_seqlens"] = cu_seqlens
    plan = spans_plan(args["q_spans"], args["k_spans"], causal=causal, cu_seqlens=cu_seqlens)
    return {"plan": plan} if plan.pieces else None


class _AllGatherAttention(torch.autograd.Function):
    """Saves q, the gathered K/V ``[N, 2, B, L/N, Hkv, D]`` (rank-major, as the all-gather lays them), out, lse."""

    @staticmethod
    def forward(ctx, q, k, v, group, causal, scale, layout, cu_seqlens, sinks):
        n, rank = group_size(group), group_rank(group)
        # Step 1: one all-gather of K and V together -> [N, 2, B, L/N, Hkv, D], rank-major (no reordering copy).
        kv = all_gather_tensor(torch.stack([k, v]), group).view(n, 2, *k.shape)
        masks = [_mask_args(q.shape[1] * n, n, rank, layout, cu_seqlens, causal, src) for src in range(n)]
        # Step 2: local queries against each rank's keys, masked by global positions / documents, merged in place.
        out = lse = None
        for src, mask in enumerate(masks):
            if mask is None:
                continue
            o, l = block_attention(q, kv[src, 0], kv[src, 1], causal=causal, softmax_scale=scale, **mask)
            if out is None:
                out, lse = merge_partials(None, None, o, l)
            else:
                merge_into(out, lse, o, l)
        if sinks is not None:  # learned sinks: one more logit per row (kernels.merge_sink)
            out, lse = merge_sink(out, lse, sinks)
        ctx.save_for_backward(q, kv, out, lse, sinks)
        ctx.group, ctx.causal, ctx.scale, ctx.masks = group, causal, scale, masks
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, kv, out, lse, sinks = ctx.saved_tensors
        dout = dout.contiguous()
        n = kv.shape[0]
        # dK, dV of every rank's keys, laid out as the reduce-scatter takes them (rank-major): each block's
        # gradients are written into their rank's slot, never concatenated
        dkv = torch.empty(kv.shape, dtype=acc_dtype(q.dtype), device=q.device)
        dq = None
        for src, mask in enumerate(ctx.masks):
            if mask is None:
                dkv[src].zero_()
                continue
            gq, dkv[src, 0], dkv[src, 1] = block_attention_backward(
                dout, q, kv[src, 0], kv[src, 1], out, lse, causal=ctx.causal, softmax_scale=ctx.scale, **mask)
            if dq is None:
                dq = gq.to(dkv.dtype)
            else:
                dq += gq
        ds = None if sinks is None or not ctx.needs_input_grad[8] else sink_grad(dout, out, lse, sinks)
        # Step 3: every rank's queries contributed to every key: sum dK, dV and keep this rank's slice.
        mine = reduce_scatter_tensor(dkv.view(n * 2, *kv.shape[2:]), ctx.group)
        return dq.to(q.dtype), mine[0].to(kv.dtype), mine[1].to(kv.dtype), None, None, None, None, None, ds


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
