"""Ring attention: exact softmax attention over a sequence sharded on N ranks, K/V blocks passed on a ring.

Papers: Liu, Zaharia & Abbeel 2023, "Ring Attention with Blockwise Transformers for Near-Infinite Context"
(blockwise attention + online softmax while K/V blocks travel around a ring); Brandon et al. 2023,
"Striped Attention" and the zigzag layout of ring-flash-attn / Megatron-CP (every rank does the same causal
work); Dao 2023, FlashAttention-2 (backward recomputed per block from the saved log-sum-exp).

Each rank holds ``q [B, L/N, H, D]`` and ``k, v [B, L/N, Hkv, D]`` (Hkv divides H) in ``layout``. At ring step
s it attends its queries to the K/V block of rank ``src = (rank - s) mod N`` and merges the partial
``(out, lse)`` into a float32 accumulator (kernels/merge.py), while the next block is already in flight:

    out_r = merge_{s=0..N-1} block_attention(Q_r, K_src, V_src)        (never an L x L tensor)

Causal work per step (zigzag: rank r holds chunks r and 2N-1-r of 2N chunks):
  * step 0: the diagonal block, causal within the shard (local order is increasing in global position);
  * zigzag, src < r: all local queries against the first half (chunk src) of the visiting K/V;
  * zigzag, src > r: the second half of the local queries (chunk 2N-1-r) against all visiting K/V;
  * contiguous: src < r the whole block, src > r nothing (the last rank does N block products, rank 0 one).

Backward: dQ accumulates locally; the float32 dK/dV of the visiting block travel around the ring with it, so
after N hops every rank holds the gradient of its own K/V. Both rings overlap with the block computation.

Communication per call, with b = 2·B·(L/N)·Hkv·D (K and V of the kv heads only, sent as two tensors):
  * forward:  (N-1) · b · itemsize                  bytes sent (and received) per rank;
  * backward: (N-1) · b · itemsize  +  N · b · acc   bytes sent per rank when N > 1 (0 when N = 1),
    with acc = 4 (float32 accumulators; 8 for float64 inputs).

Memory held per rank above its inputs, in units u of the local q (float32, MHA: K and V are 1 u each; with
GQA they shrink by H/Hkv), zigzag, N > 2 (N = 2 holds one K/V buffer less: its second hop receives nothing):
  * forward:  the float32 output accumulator 1 u (step 0's result, merged into in place: ``merge_into``) +
    the visiting K/V 2 u + the next K/V arriving 2 u + one block's output 1 u: 6 u;
  * backward: dQ 1 u + the saved output 1 u + the visiting and the next K/V 4 u + the dK/dV sum of the
    visiting block 2 u (received from the previous rank before the block is computed, this rank's share added
    into it in place, then sent on: no zeroed share buffer, and the sum sent last step has left) + one
    block's dQ/dK/dV from the kernel (2.5 u for a zigzag half block, 3 u for a contiguous one): 10.5 u.
  Own K/V travel as they are (never packed into a copy), and a block computed by one fused piece returns the
  kernel's result (no zeroed accumulator, ``kernels.softmax``). Measured (``[1, 16384, 8, 64]`` float32, one
  thread per rank, peak RSS above the inputs after a warm-up that imports what a first custom-Function
  backward imports, ~35 MiB of modules): zigzag N = 2: 8.6 u (14.6 before issue 28), N = 4: 10.7 u (14.8);
  contiguous N = 4: 11.2 u; one process (local kernel): 4.1 u.

Learned sinks (``sinks [H]``, gpt-oss's ``s_aux``): one logit per head in every row's softmax denominator,
merged into the final ``(out, lse)`` once per row after the last ring step (``kernels.merge_sink``), not once
per step; the backward runs unchanged on the merged ``(out, lse)`` and d sinks is a local row sum (no bytes).

Sliding windows (``window`` < L, transformers' ``sliding_window``) do not ring: ``seqpar.attention.window``
fetches only the ``window - 1`` keys before each local run from their owners (one all-to-all), with its own
bytes formula (``window_bytes``).

Varlen: ``cu_seqlens`` (GLOBAL document boundaries of the packed sequence, same on every rank) gives every
token a document id; tokens attend only within their document (causally when ``causal``). Each block is cut
on the host into per-document fused pieces (kernels/plan.py); pieces of documents a block does not share are
never computed. When no document crosses a layout chunk (e.g. 8 documents of L/8 at N = 2), no rank needs
another's K/V: the call computes its diagonal block and sends nothing (0 bytes, forward and backward).

Errors (raised on every rank, before any K/V is exchanged): bad ``layout``/``causal``/``softmax_scale``,
shapes or ``cu_seqlens`` differing across ranks (``checks.check_qkv``), q/k/v batch, length, head_dim or dtype mismatch,
kv heads not dividing heads, a length that the layout cannot split, malformed ``cu_seqlens``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from seqpar.attention.checks import check_options, check_qkv, check_sinks, effective_window
from seqpar.attention.window import window_attention, window_bytes
from seqpar.comm import Group, group_rank, group_size, ring_visit
from seqpar.kernels import (
    acc_dtype,
    block_attention,
    block_attention_backward,
    cut_spans,
    merge_into,
    merge_partials,
    merge_sink,
    sink_grad,
)
from seqpar.sharding import Layout, document_bounds, local_chunks

__all__ = ["ring_attention"]

_ALL = slice(None)


@dataclass
class _RingPlan:
    """What every ring step computes on this rank; kept on the autograd ctx for the backward."""

    group: Group
    rank: int
    world: int
    causal: bool
    scale: float
    layout: str
    cu: tuple[int, ...] | None  # global document boundaries (varlen), host ints
    local_only: bool = False  # one rank, or no document spans two shards: no K/V needs to leave its rank

    def block(self, src: int, n: int) -> tuple[slice, slice, bool] | None:
        """``(query slice, key slice, causal diagonal?)`` of the product with rank ``src``'s K/V, or None."""
        if not self.causal:
            return _ALL, _ALL, False
        if src == self.rank:
            return _ALL, _ALL, True
        if self.layout == "contiguous":
            return (_ALL, _ALL, False) if src < self.rank else None
        half = n // 2
        if src < self.rank:  # chunk src precedes both local chunks; chunk 2N-1-src follows both
            return _ALL, slice(0, half), False
        return slice(half, None), _ALL, False  # only chunk 2N-1-r sees rank src's two chunks

    def masks(self, qs: slice, src: int, ks: slice, diag: bool, n: int) -> dict:
        """Kernel mask arguments of one step: plain (causal diagonal or full), or with documents the global
        runs of the block's rows and keys (host ints: the kernel cuts them into fused pieces per document)."""
        if self.cu is None:
            return {"causal": diag}
        L = n * self.world
        runs = lambda r, s: cut_spans(local_chunks(L, self.world, r, self.layout), s.start or 0, s.stop)  # noqa: E731
        return {"causal": self.causal, "q_spans": runs(self.rank, qs), "k_spans": runs(src, ks),
                "cu_seqlens": self.cu}


def _ring_forward(q, k, v, plan: _RingPlan) -> tuple[torch.Tensor, torch.Tensor]:
    n = q.shape[1]
    if plan.local_only:  # one rank, or packed documents that all stay inside one shard: the local block is all
        o, l = block_attention(q, k, v, softmax_scale=plan.scale, **plan.masks(_ALL, plan.rank, _ALL, plan.causal, n))
        return merge_partials(None, None, o, l)
    acc = {}

    def attend(src: int, kv: tuple[torch.Tensor, torch.Tensor]) -> None:
        blk = plan.block(src, n)
        if blk is None:
            return
        qs, ks, diag = blk
        o, l = block_attention(q[:, qs], kv[0][:, ks], kv[1][:, ks], softmax_scale=plan.scale,
                               **plan.masks(qs, src, ks, diag, n))
        if not acc:  # step 0 always covers every local query
            acc["out"], acc["lse"] = merge_partials(None, None, o, l)
        else:  # in place: no merged copy of the rows
            merge_into(acc["out"][:, qs], acc["lse"][:, :, qs], o, l)

    # K and V of the kv heads travel as they are (never repeated, never packed into a copy).
    ring_visit((k, v), plan.group, attend)
    return acc["out"], acc["lse"]


def _ring_backward(dout, q, k, v, out, lse, plan: _RingPlan):
    if plan.local_only:
        dq, dk, dv = block_attention_backward(dout, q, k, v, out, lse, softmax_scale=plan.scale,
                                              **plan.masks(_ALL, plan.rank, _ALL, plan.causal, q.shape[1]))
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
    acc, n = acc_dtype(q.dtype), q.shape[1]
    dq = None

    def attend_back(src: int, kv: tuple[torch.Tensor, torch.Tensor]):
        nonlocal dq
        blk = plan.block(src, n)
        if blk is None:
            return None
        qs, ks, diag = blk
        # The merged out/lse make each block's gradients exact partial sums (FlashAttention-2).
        dq_b, dk_b, dv_b = block_attention_backward(
            dout[:, qs], q[:, qs], kv[0][:, ks], kv[1][:, ks], out[:, qs], lse[:, :, qs],
            softmax_scale=plan.scale, **plan.masks(qs, src, ks, diag, n))
        if dq is None:  # step 0 covers every local query
            dq = dq_b.to(acc)
        else:
            dq[:, qs] += dq_b
        del dq_b

        def add(total: tuple[torch.Tensor, torch.Tensor]) -> None:  # into the travelling dK/dV sum, in place
            total[0][:, ks] += dk_b
            total[1][:, ks] += dv_b

        return add

    dk, dv = ring_visit((k, v), plan.group, attend_back, grad=True, grad_dtype=acc)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class RingAttentionFunc(torch.autograd.Function):
    """Shapes: q [B, L/N, H, D], k/v [B, L/N, Hkv, D] -> out [B, L/N, H, D]; saves q, k, v, out, lse."""

    @staticmethod
    def forward(ctx, q, k, v, plan: _RingPlan, sinks=None):
        out, lse = _ring_forward(q, k, v, plan)
        if sinks is not None:  # once per row, after every block is merged
            out, lse = merge_sink(out, lse, sinks)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, sinks)
        ctx.plan = plan
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, sinks = ctx.saved_tensors
        dout = dout.contiguous()
        dq, dk, dv = _ring_backward(dout, q, k, v, out, lse, ctx.plan)
        ds = None if sinks is None or not ctx.needs_input_grad[4] else sink_grad(dout, out, lse, sinks)
        return dq, dk, dv, None, ds


# ---------------------------------------------------------------------------------------------- validation


def _docs_stay_in_shards(cu: tuple[int, ...] | None, seq_len: int, world: int, layout: str) -> bool:
    """Every document lies inside one layout chunk (host ints only), so no rank needs another's K/V."""
    if cu is None or world == 1:
        return False
    chunk = seq_len // (world * (2 if layout == "zigzag" else 1))
    return all(a // chunk == (b - 1) // chunk for a, b in itertools.pairwise(cu) if b > a)


def ring_bytes(q, k, v, *, group: Group = None, layout: Layout = "zigzag", cu_seqlens=None, window=None,
               causal: bool = True, **_) -> tuple[int, int]:
    """(forward, backward) bytes this rank sends in one call: the module docstring's formula."""
    world, b = group_size(group), 2 * k.numel()  # K and V of the kv heads
    cu = None if cu_seqlens is None else document_bounds(cu_seqlens, q.shape[1] * world)
    if effective_window(window, q.shape[1] * world, causal) is not None:
        return window_bytes(q, k, v, group=group, layout=layout, cu_seqlens=cu, window=window)
    if world == 1 or _docs_stay_in_shards(cu, q.shape[1] * world, world, layout):
        return 0, 0
    fwd = (world - 1) * b * k.element_size()
    return fwd, fwd + world * b * acc_dtype(k.dtype).itemsize


# ---------------------------------------------------------------------------------------------- public API


def ring_attention(
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
    """Exact attention of this rank's queries over the whole sharded sequence, K/V travelling on a ring.

    Args:
        q: ``[B, L/N, H, D]`` this rank's queries, sharded in ``layout`` (seqpar.sharding.shard).
        k, v: ``[B, L/N, Hkv, D]`` with Hkv dividing H (GQA: only the kv heads travel).
        group: the SP process group of N ranks; None is a single device.
        causal: causal mask over GLOBAL positions.
        softmax_scale: defaults to ``D ** -0.5``.
        layout: ``"zigzag"`` (balanced causal work; L divisible by 2N) or ``"contiguous"`` (L divisible by N).
        cu_seqlens: optional int ``[num_docs + 1]`` global document boundaries (0, ..., L) of a packed
            sequence; attention stays inside documents.
        validate: compare shapes across ranks (one small collective); False skips it when the caller already
            did in this forward (``patch_model`` validates at the first layer only).
        sinks: optional ``[H]`` learned sink logit per query head (gpt-oss ``s_aux``), differentiable; its
            gradient covers this rank's rows (sum it over the SP group like any parameter's).
        window: sliding window (causal only, transformers' ``sliding_window``: the query at global position p
            sees keys ``p - window < k <= p``). Shorter than L, the call is a halo exchange instead of a ring
            (``seqpar.attention.window``: only the ``window - 1`` keys before each local run travel).

    Returns:
        ``[B, L/N, H, D]`` in q's dtype, sharded like q (partials accumulated in float32).

    Bytes sent per rank: forward ``(N-1)·2·B·(L/N)·Hkv·D·itemsize``; backward that plus
    ``N·2·B·(L/N)·Hkv·D·4`` (float32 dK/dV; 8 bytes for float64) when N > 1.
    """
    check_options(layout=layout, causal=causal, softmax_scale=softmax_scale)
    check_qkv(q, k, v, group=group, layout=layout, cu_seqlens=cu_seqlens, validate=validate)
    check_sinks(sinks, q.shape[2])
    world = group_size(group)
    cu = None if cu_seqlens is None else document_bounds(cu_seqlens, q.shape[1] * world)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    window = effective_window(window, q.shape[1] * world, causal)
    if window is not None:  # only the keys the window reaches travel, never whole shards
        return window_attention(q, k, v, group=group, layout=layout, cu_seqlens=cu, window=window,
                                softmax_scale=scale, sinks=sinks)
    # One device, or packed documents that never cross a shard: the local block is the whole product (no ring
    # buffers, no float32 dQ/dK/dV accumulators: issue 14 measured them at the peak of a one-process step).
    local = world == 1 or _docs_stay_in_shards(cu, q.shape[1] * world, world, layout)
    plan = _RingPlan(group, group_rank(group), world, causal, scale, layout, cu, local)
    return RingAttentionFunc.apply(q, k, v, plan, sinks)
