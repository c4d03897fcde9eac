"""SinkLoRA SF-Attn: LongLoRA's shifted groups put back in place, plus global attention to sink tokens.

Zhang 2024, "SinkLoRA: Enhanced Efficiency and Chat Capabilities for Long-Context Large Language Models".

Semantics on the global sequence of L tokens, group size G, S sink tokens (default 4), causal: S2-Attn
without wrap-around (``shift_short.py``: heads ``[0, H/2)`` in groups ``[jG, (j+1)G)``, heads ``[H/2, H)`` in
groups shifted by G/2 with a half group at each end, every output at its own position), and in every head
each query t also sees the sink keys ``s < S`` with ``s <= t``. A key that is both in t's group and a sink is
counted once: the sink block of query t only holds the sinks before t's group (``s < start(t)``), computed as
one fused block per run of rows that see the same sinks (``kernels.plan.prefix_plan``), and merged with the
group result by log-sum-exp.

Sequence parallel (contiguous layout, ``n % G == 0``, ``S <= n`` so that the sinks live on rank 0): the group
part exchanges the S2-Attn halo; the sinks' K/V (all kv heads) are broadcast from rank 0; in the backward their
dK/dV are summed onto rank 0 (a reduce). Nothing else is communicated.

Bytes per call and rank, halo ``h = B · (G/2) · (Hkv/2) · D · 2``, sinks ``s = B · S · Hkv · D · 2`` elements,
e = itemsize of k/v, a = itemsize of the accumulation dtype (4; 8 for float64), ``ByteCounter`` op names:

* forward:  ``"halo"``: send ``h · e`` to r+1 (r < N-1), receive ``h · e`` from r-1 (r > 0);
  ``"broadcast"``: rank 0 sends ``(N-1) · s · e``, every other rank receives ``s · e``;
* backward: ``"halo"``: send ``h · a`` to r-1 (r > 0), receive ``h · a`` from r+1 (r < N-1);
  ``"reduce"``: every rank but 0 sends ``s · a``, rank 0 receives ``(N-1) · s · a``.

An all-gather of K and V would send ``(N-1) · B · n · Hkv · D · 2 · e`` per rank.
"""

from __future__ import annotations

import torch

from seqpar.attention.shift_groups import ShiftPlan, halo_bytes, make_plan
from seqpar.attention.shift_short import shift_short_backward, shift_short_forward
from seqpar.comm import Group, broadcast_tensor, group_rank, reduce_tensor
from seqpar.comm import group_size as sp_size  # ``group_size`` is G in LongLoRA's API
from seqpar.kernels import (
    BlockPlan,
    acc_dtype,
    block_attention,
    block_attention_backward,
    merge_into,
    prefix_plan,
)


def _sink_kv(k: torch.Tensor, v: torch.Tensor, plan: ShiftPlan) -> torch.Tensor:
    """``[2, B, S, Hkv, D]``: K, V of the first S tokens of the sequence, from rank 0."""
    S = plan.num_sink_tokens
    sinks = torch.stack([k[:, :S], v[:, :S]]) if plan.rank == 0 else k.new_empty((2, k.shape[0], S, *k.shape[2:]))
    return broadcast_tensor(sinks, plan.group, src=0)


SINK_ROWS = 512  # query rows per sink-block kernel call: its output and gradient transients hold this many


def _sink_plans(plan: ShiftPlan) -> list[list[tuple[int, int, BlockPlan]]]:
    """Per head half, the kernel plans of ``s < start(t)`` (the sinks outside t's group), from host ints: rows
    of a group that starts at g see the first min(S, g) sinks; from the first group with g >= S on, all S.
    Cut into runs of ``SINK_ROWS`` query rows ``(a, b, plan of rows [a, b))``: one call over all n rows held a
    [n, H/2, D] output (and, in backward, its dq) next to the merged result, 1/2 unit of the local q each."""
    n, G, S, base = plan.local_len, plan.shift_size, plan.num_sink_tokens, plan.rank * plan.local_len
    plans = []
    for off in (0, G // 2):  # unshifted, shifted groups
        rows, t = [], base
        while t < base + n:
            first = (t + off) // G * G - off  # global start of t's group (before clamping at 0)
            start, end = max(0, first), min(first + G, base + n)
            if start >= S:
                rows.append((t - base, n, S))
                break
            rows.append((t - base, end - base, start))
            t = end
        runs = []
        for a in range(0, n, SINK_ROWS):
            b = min(a + SINK_ROWS, n)
            cut = [(max(q0, a) - a, min(q1, b) - a, m) for q0, q1, m in rows if min(q1, b) > max(q0, a)]
            if cut:
                runs.append((a, b, prefix_plan(b - a, S, cut)))
        plans.append(runs)
    return plans


def _head_halves(x: torch.Tensor, dim: int) -> list[torch.Tensor]:
    c = x.shape[dim] // 2
    return [x.narrow(dim, 0, c), x.narrow(dim, c, c)]


def sink_shift_forward(q, k, v, plan: ShiftPlan):
    """``(out [B, n, H, D], lse [B, H, n])`` (accumulation dtype), the halo and the sinks ``[2, B, S, Hkv, D]``."""
    sinks = _sink_kv(k, v, plan) if plan.num_sink_tokens else None
    out, lse, halo = shift_short_forward(q, k, v, plan)
    if sinks is None:
        return out, lse, halo, None
    for qh, sk, sv, runs, oh, lh in zip(_head_halves(q, 2), _head_halves(sinks[0], 2), _head_halves(sinks[1], 2),
                                        _sink_plans(plan), _head_halves(out, 2), _head_halves(lse, 1)):
        for a, b, p in runs:
            o, l = block_attention(qh[:, a:b], sk, sv, plan=p, softmax_scale=plan.softmax_scale)
            merge_into(oh[:, a:b], lh[..., a:b], o, l)  # into the head half's rows of out/lse: no merged copy
    return out, lse, halo, sinks


def sink_shift_backward(dout, q, k, v, out, lse, halo, sinks, plan: ShiftPlan):
    """``(dq, dk, dv)`` in the accumulation dtype; the sinks' dK/dV are summed onto rank 0."""
    dq, dk, dv = shift_short_backward(dout, q, k, v, out, lse, halo, plan)
    if sinks is None:
        return dq, dk, dv
    d_sinks = torch.zeros(sinks.shape, dtype=acc_dtype(q.dtype), device=q.device)
    halves = zip(_head_halves(dout, 2), _head_halves(q, 2), _head_halves(out, 2), _head_halves(lse, 1),
                 _head_halves(sinks, 3), _head_halves(dq, 2), _head_halves(d_sinks, 3), _sink_plans(plan))
    for do, qh, o, s, kv, dqh, dkv, runs in halves:
        for a, b, p in runs:
            gq, gk, gv = block_attention_backward(do[:, a:b], qh[:, a:b], kv[0], kv[1], o[:, a:b], s[..., a:b],
                                                  plan=p, softmax_scale=plan.softmax_scale)
            dqh[:, a:b] += gq  # views into dq / d_sinks
            dkv[0] += gk
            dkv[1] += gv
    d_sinks = reduce_tensor(d_sinks, plan.group, dst=0)  # onto the sinks' owner
    if plan.rank == 0:
        S = plan.num_sink_tokens
        dk[:, :S] += d_sinks[0]
        dv[:, :S] += d_sinks[1]
    return dq, dk, dv


class SinkShiftAttention(torch.autograd.Function):
    """Shapes: q [B, n, H, D], k/v [B, n, Hkv, D] -> out [B, n, H, D]; saved: merged out/lse (accumulation
    dtype), the halo [2, B, G/2, Hkv/2, D] and the sinks [2, B, S, Hkv, D]."""

    @staticmethod
    def forward(ctx, q, k, v, plan: ShiftPlan):
        out, lse, halo, sinks = sink_shift_forward(q, k, v, plan)
        ctx.plan, ctx.has = plan, (halo is not None, sinks is not None)
        ctx.save_for_backward(q, k, v, out, lse, *[t for t in (halo, sinks) if t is not None])
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, *extra = ctx.saved_tensors
        halo = extra.pop(0) if ctx.has[0] else None
        sinks = extra.pop(0) if ctx.has[1] else None
        dq, dk, dv = sink_shift_backward(dout, q, k, v, out, lse, halo, sinks, ctx.plan)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


def sink_shift_bytes(q, k, v, *, group: Group = None, group_size: int, num_sink_tokens: int = 4,
                     **_) -> tuple[int, int]:
    """(forward, backward) bytes this rank sends in one call: the module docstring's formula."""
    fwd, bwd = halo_bytes(k, group=group, group_size=group_size)
    world, rank = sp_size(group), group_rank(group)
    if world == 1 or not num_sink_tokens:
        return fwd, bwd
    s = k.shape[0] * num_sink_tokens * k.shape[2] * k.shape[3] * 2
    if rank == 0:
        return fwd + (world - 1) * s * k.element_size(), bwd
    return fwd, bwd + s * acc_dtype(k.dtype).itemsize


def sink_shift_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group_size: int,
    num_sink_tokens: int = 4,
    group: Group = None,
    softmax_scale: float | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """SinkLoRA SF-Attn (causal) of this rank's contiguous shard.

    Args:
        q: ``[B, n, H, D]``, this rank's tokens ``[r n, (r+1) n)`` (contiguous layout); H even.
        k, v: ``[B, n, Hkv, D]``, Hkv even and dividing H (GQA).
        group_size: G, even, dividing n.
        num_sink_tokens: S in ``[0, n]``: the first S tokens of the sequence, seen by every query (0: S2-Attn).
        group: the SP process group; None = one device.
        softmax_scale: defaults to ``D ** -0.5``.
        validate: compare the arguments across ranks (one small all-gather); False skips it when the caller
            already did in this forward (``patch_model`` validates at the first layer only).

    Returns:
        ``[B, n, H, D]`` in q's dtype; differentiable in q, k, v (hand-written backward).
    """
    plan = make_plan(q, k, v, group=group, group_size=group_size, wrap=False, num_sink_tokens=num_sink_tokens,
                     softmax_scale=softmax_scale, caller="sink_shift_attention", validate=validate)
    return SinkShiftAttention.apply(q, k, v, plan)
