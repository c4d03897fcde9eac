"""Sliding-window attention over a sharded sequence by a halo exchange: each rank fetches only the keys its
window reaches, never whole shards.

Transformers' sliding window (Mistral, Qwen2/3, Gemma 3, gpt-oss, ...): the query at global position p sees
the keys at ``p - w < k <= p`` (``masking_utils.sliding_window_overlay``), within its document. A rank whose
shard is the runs ``[a, b)`` (one run contiguous, two zigzag) therefore needs, besides its own K/V, the keys
of ``[max(a - w + 1, doc_start(a)), a)`` before each run that it does not hold: its *halo* (at most w - 1
tokens per run, whatever L and N). The same exchange as torchtitan's selective gather and Megatron's halo PR:

    halo_r = {k : a - w < k < a, k in doc(a), k not held by r}     for each run [a, b) of rank r
    forward:  K_h, V_h = all_to_all(K, V rows of halo_r from their owners)            (one collective)
              O_r = merge(attn_window(Q_r, K_r, V_r), attn_window(Q_r, K_h, V_h))     (lse merge)
    backward: dK_r, dV_r += all_to_all^T(dK_h, dV_h)   (the halo's gradients go home, summed by index_add)

Both attention calls are host-planned fused pieces (``kernels.plan``: full rectangles, causal and anti-diagonal
squares). The halo all-to-all runs while the own block is computed (forward), and while the own block's
backward runs (backward). Which rank sends which rows is a host-int plan of (L, N, layout, documents, w),
cached: no host sync, no size exchange (gloo and NCCL take the uneven split sizes).

Bytes per call, per rank r, with ``S_out`` the halo rows r sends (summed over destinations), ``S_in`` the halo
rows it receives, ``t = 2·B·Hkv·D`` (K and V of one token):

    forward:  S_out · t · itemsize         backward: S_in · t · acc     (acc = 4, or 8 for float64 inputs)

Both are at most ``runs·(w - 1)·t`` bytes: independent of L once the window is shorter than a shard.
Learned sinks are merged once per row after both blocks (``kernels.merge_sink``).
"""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist

from seqpar.comm import Group, group_rank, group_size, record_bytes
from seqpar.kernels import acc_dtype, block_attention, block_attention_backward, merge_into, merge_sink, sink_grad
from seqpar.kernels.plan import Span
from seqpar.sharding import local_chunks

__all__ = ["HaloPlan", "halo_plan", "window_attention", "window_bytes"]


@dataclass(frozen=True)
class HaloPlan:
    """Host-int exchange plan of one rank: what it receives (``recv_spans``: global runs, grouped by source
    rank in rank order, as they land in the receive buffer) and sends (``send_index``: local rows, grouped by
    destination rank)."""

    runs: tuple[Span, ...]  # this rank's own runs (local order)
    recv_spans: tuple[Span, ...]
    recv_splits: tuple[int, ...]  # rows received from each rank
    send_index: tuple[int, ...]
    send_splits: tuple[int, ...]  # rows sent to each rank
    active: bool  # some rank of the group has a halo: every rank joins the all-to-all


def _owner(p: int, seq_len: int, world: int, layout: str) -> tuple[int, int]:
    """(rank, local row) of global position ``p``."""
    if layout == "contiguous":
        n = seq_len // world
        return p // n, p % n
    c = seq_len // (2 * world)
    chunk = p // c
    return (chunk, p % c) if chunk < world else (2 * world - 1 - chunk, c + p % c)


def _needed(seq_len: int, world: int, rank: int, layout: str, cu: tuple[int, ...] | None, w: int) -> list[Span]:
    """Global runs of the halo of ``rank``: keys before its runs that its windows reach, in the run's document,
    not held by itself (ascending, disjoint)."""
    runs = local_chunks(seq_len, world, rank, layout)
    want: list[Span] = []
    for a, _ in runs:
        start = max(0, a - w + 1)
        if cu is not None:
            start = max(start, cu[bisect.bisect_right(cu, a) - 1])  # keys of earlier documents are never seen
        want.append((start, a))
    # minus the positions this rank holds: cut each wanted run by the own runs
    for oa, ob in runs:
        want = [piece for a, b in want for piece in ((a, min(b, oa)), (max(a, ob), b)) if piece[0] < piece[1]]
    merged: list[Span] = []
    for a, b in sorted(want):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def _by_owner(seq_len: int, world: int, layout: str, spans: list[Span]) -> list[list[tuple[int, int, int]]]:
    """``spans`` cut at layout chunks and grouped by owner rank: ``(start, stop, first local row)`` each."""
    chunk = seq_len // (world * (2 if layout == "zigzag" else 1))
    out: list[list[tuple[int, int, int]]] = [[] for _ in range(world)]
    for a, b in spans:
        while a < b:
            e = min(b, (a // chunk + 1) * chunk)
            owner, row = _owner(a, seq_len, world, layout)
            out[owner].append((a, e, row))
            a = e
    return out


@functools.lru_cache(maxsize=64)
def halo_plan(seq_len: int, world: int, rank: int, layout: str, cu: tuple[int, ...] | None, window: int) -> HaloPlan:
    """The exchange plan of ``rank`` (host ints, cached: every layer of a forward reuses it). Every rank takes
    part in the all-to-all when any rank has a halo (``active``), so no rank waits alone."""
    needs = [_by_owner(seq_len, world, layout, _needed(seq_len, world, r, layout, cu, window)) for r in range(world)]
    recv_spans: list[Span] = []
    for a, b, _ in (piece for pieces in needs[rank] for piece in pieces):  # buffer order: by source rank
        if recv_spans and recv_spans[-1][1] == a:
            recv_spans[-1] = (recv_spans[-1][0], b)
        else:
            recv_spans.append((a, b))
    send_index: list[int] = []
    for dest in range(world):
        send_index.extend(i for a, b, row in needs[dest][rank] for i in range(row, row + b - a))
    return HaloPlan(
        runs=tuple(local_chunks(seq_len, world, rank, layout)),
        recv_spans=tuple(recv_spans),
        recv_splits=tuple(sum(b - a for a, b, _ in pieces) for pieces in needs[rank]),
        send_index=tuple(send_index),
        send_splits=tuple(sum(b - a for a, b, _ in needs[dest][rank]) for dest in range(world)),
        active=any(pieces for need in needs for pieces in need),
    )


@functools.lru_cache(maxsize=64)
def _send_index(plan: HaloPlan, device: torch.device) -> torch.Tensor:
    """The local rows this rank sends, as a device tensor made once per plan (not one host copy per layer call)."""
    return torch.tensor(plan.send_index, dtype=torch.long, device=device)


class _Exchange:
    """The uneven all-to-all of token-major ``send [S_out, ...]`` in flight; ``wait()`` returns the receive
    buffer. Holds ``send`` until then (an async collective reads it after the caller's frame is gone)."""

    def __init__(self, send: torch.Tensor, recv_rows: int, send_splits, recv_splits, group: Group, op: str):
        self.send, self.recv = send, send.new_empty((recv_rows, *send.shape[1:]))
        record_bytes(op, send.numel() * send.element_size(), self.recv.numel() * self.recv.element_size())
        self.work = dist.all_to_all_single(self.recv, send, list(recv_splits), list(send_splits), group=group,
                                           async_op=True)

    def wait(self) -> torch.Tensor:
        self.work.wait()
        self.send = None
        return self.recv


def _pack(k: torch.Tensor, v: torch.Tensor, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``index`` of K and V as one token-major buffer ``[S, 2, B, Hkv, D]`` (one copy of the sent rows)."""
    B, _, Hkv, D = k.shape
    out = k.new_empty((index.numel(), 2, B, Hkv, D), dtype=dtype)
    out[:, 0] = k.index_select(1, index).transpose(0, 1)
    out[:, 1] = v.index_select(1, index).transpose(0, 1)
    return out


class _WindowAttention(torch.autograd.Function):
    """q [B, n, H, D], k/v [B, n, Hkv, D] -> out [B, n, H, D]; saves q, k, v, the halo K/V, out, lse."""

    @staticmethod
    def forward(ctx, q, k, v, group, plan: HaloPlan, cu, window, scale, sinks):
        index = _send_index(plan, k.device)
        exchange = halo = None
        if plan.active:  # the halo travels while the own block is computed
            exchange = _Exchange(_pack(k, v, index, k.dtype), sum(plan.recv_splits), plan.send_splits,
                                 plan.recv_splits, group, "window")
        own = {"causal": True, "softmax_scale": scale, "cu_seqlens": cu, "window": window, "q_spans": plan.runs}
        out, lse = block_attention(q, k, v, k_spans=plan.runs, **own)
        if exchange is not None:
            halo = exchange.wait()
            if plan.recv_spans:
                hk, hv = halo[:, 0].transpose(0, 1), halo[:, 1].transpose(0, 1)  # [B, S_in, Hkv, D] views
                o, l = block_attention(q, hk, hv, k_spans=plan.recv_spans, **own)
                merge_into(out, lse, o, l)
        if sinks is not None:
            out, lse = merge_sink(out, lse, sinks)
        ctx.save_for_backward(q, k, v, index, halo, out, lse, sinks)
        ctx.group, ctx.plan, ctx.own = group, plan, own
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, index, halo, out, lse, sinks = ctx.saved_tensors
        plan, own, acc = ctx.plan, ctx.own, acc_dtype(q.dtype)
        dout = dout.contiguous()
        exchange = dq_h = None
        if plan.active:  # the halo's gradients first, so they travel home while the own block's backward runs
            dhalo = torch.zeros((sum(plan.recv_splits), *halo.shape[1:]), dtype=acc, device=q.device)
            if plan.recv_spans:
                hk, hv = halo[:, 0].transpose(0, 1), halo[:, 1].transpose(0, 1)
                dq_h, dk_h, dv_h = block_attention_backward(dout, q, hk, hv, out, lse, k_spans=plan.recv_spans,
                                                            **own)
                dhalo[:, 0], dhalo[:, 1] = dk_h.transpose(0, 1), dv_h.transpose(0, 1)
            exchange = _Exchange(dhalo, len(plan.send_index), plan.recv_splits, plan.send_splits, ctx.group,
                                 "window")
        dq, dk, dv = block_attention_backward(dout, q, k, v, out, lse, k_spans=plan.runs, **own)
        if dq_h is not None:
            dq += dq_h
        if exchange is not None:
            back = exchange.wait()
            if back.shape[0]:  # a row sent to several ranks gets each one's share (index_add sums repeats)
                dk.index_add_(1, index, back[:, 0].transpose(0, 1))
                dv.index_add_(1, index, back[:, 1].transpose(0, 1))
        ds = None if sinks is None or not ctx.needs_input_grad[8] else sink_grad(dout, out, lse, sinks)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, ds


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group: Group, layout: str,
                     cu_seqlens: tuple[int, ...] | None, window: int, softmax_scale: float | None = None,
                     sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention with a sliding ``window`` (< L) of this rank's shard ``q [B, n, H, D]``, ``k, v [B, n,
    Hkv, D]`` in ``layout`` over ``group``; ``cu_seqlens``: host-int global document boundaries or None.

    Called by ``ring_attention`` and ``allgather_attention`` (after their input checks) when the window is
    shorter than the sequence; returns ``[B, n, H, D]`` in q's dtype.
    """
    world = group_size(group)
    plan = halo_plan(q.shape[1] * world, world, group_rank(group), layout, cu_seqlens, int(window))
    return _WindowAttention.apply(q, k, v, group, plan, cu_seqlens, int(window), softmax_scale, sinks)


def window_bytes(q, k, v, *, group: Group = None, layout: str = "zigzag", cu_seqlens: tuple[int, ...] | None = None,
                 window: int, **_) -> tuple[int, int]:
    """(forward, backward) bytes this rank sends in one ``window_attention`` call: the docstring's formula."""
    world = group_size(group)
    plan = halo_plan(q.shape[1] * world, world, group_rank(group), layout, cu_seqlens, int(window))
    token = 2 * k.shape[0] * k.shape[2] * k.shape[3]
    return len(plan.send_index) * token * k.element_size(), sum(plan.recv_splits) * token * acc_dtype(k.dtype).itemsize
