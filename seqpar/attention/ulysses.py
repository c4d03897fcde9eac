"""DeepSpeed-Ulysses sequence parallelism (Jacobs et al. 2023, arXiv:2309.14509).

Each of the N ranks holds a sequence shard of every head. One all-to-all turns that into the whole
sequence for H/N heads, attention runs locally and exactly over the whole sequence, and a second all-to-all
returns the output to sequence shards:

    [B, L/N, H, D] --all-to-all--> [B, L, H/N, D] --attention--> [B, L, H/N, D] --all-to-all--> [B, L/N, H, D]

Layouts: gathered contiguous shards are already in global order. Gathered zigzag shards are permuted into
global order (and back) under a causal mask, so the local attention stays one plain causal kernel call
(fused flash kernels apply); without a mask the order does not matter and nothing is permuted. A sliding
``window`` is therefore one more argument of the local kernel (its plan cuts the band into fused pieces).

GQA: rank r needs the kv heads of its q heads [r H/N, (r+1) H/N). When N does not divide the kv heads
Hkv, every kv head is repeated ``rep = N / gcd(N, Hkv)`` times (the least that makes Hkv * rep a multiple
of N; it always divides H because N and Hkv both do). Autograd sums the repeats' gradients back.

Bytes per call, per rank (``b_q`` = bytes of the local q, ``b_kv`` = bytes of the local k; k, v and out
have q's dtype; q, k, v travel in ONE all-to-all):

    forward:  (N-1)/N * (b_q + 2 rep b_kv)   +   (N-1)/N * b_q          (q, k, v in; out back)
    backward: (N-1)/N * b_q   +   (N-1)/N * (b_q + 2 rep b_kv)          (dout in; dq, dk, dv back)

sent and received alike, so a call moves 2 (N-1)/N (2 b_q + 2 rep b_kv) bytes each way in total.

Memory per rank, in units u of the local q (``[B, L/N, H, D]``; MHA, so q, k, v, out are 1 u each, and a
head shard ``[B, L, H/N, D]`` is 1 u too). Forward: the send buffer (3 u, q/k/v copied in per destination)
and the receive buffer (3 u) are live during the all-to-all; the head shards are then written into the send
buffer's memory, so 6 u at most; 4 u stay saved (head-shard q, k, v and the kernel's output). Backward: the
kernel's step holds the saved 4 u, the head-shard output gradient (1 u), dq, dk, dv (3 u) and its own
temporaries (~1 u); the return all-to-all holds dq, dk, dv (3 u), the send and receive buffers (6 u), and the
gradients land in the send buffer's memory. Measured (fwd + bwd, ``[1, 16384, 8, 64]`` float32, one thread,
peak RSS above the inputs): 10.0 u at N = 2 and 4, where a packed concatenation, a stacked
send copy and a concatenation of the receive buffer held 13.0 u.
"""

from __future__ import annotations

import math

import torch

from seqpar.attention.checks import check_head_split, check_options, check_qkv, check_sinks, effective_window
from seqpar.attention.local import local_attention
from seqpar.comm import Group, all_to_all, all_to_all_buffer, group_rank, group_size
from seqpar.sharding import Layout, layout_order


def kv_replication(heads: int, kv_heads: int, world: int, *, what: str = "the group size N") -> int:
    """How many times each kv head is repeated so that ``world`` ranks can each take whole kv heads."""
    check_head_split(heads, world, what=what)
    if kv_heads < 1 or heads % kv_heads:
        raise ValueError(
            f"kv heads={kv_heads} must divide query heads={heads} (GQA); kv heads cannot be replicated "
            f"evenly over {what}={world} ranks otherwise"
        )
    return world // math.gcd(world, kv_heads)


def seq_to_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group: Group,
                 what: str = "the group size N"):
    """``[B, L/N, H, D]`` sequence shards -> ``[B, L, H/N, D]`` head shards of q, k, v (one all-to-all).

    The gathered sequence is rank-major (rank 0's shard first), i.e. the layout's order, not global order.
    """
    n = group_size(group)
    rep = kv_replication(q.shape[2], k.shape[2], n, what=what)  # raises (on every rank alike) before any comm
    if rep > 1:  # GQA with fewer kv heads than ranks: the least replication that splits evenly
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    if n == 1:
        return q, k, v
    return _SeqToHeads.apply(q, k, v, group)


class _SeqToHeads(torch.autograd.Function):
    """q, k and v in ONE all-to-all, with one copy of each on either side of it.

    Piece j of the send buffer ``[N, B, L/N, (H + 2 Hk)/N, D]`` holds rank j's heads of q, k and v, copied
    straight from the inputs; what arrives is copied once into contiguous ``[B, L, H/N, D]`` q, k, v (the
    kernel's inputs). Peak: 3 units of the local q in flight (send, then receive) plus the 3 results, where
    a packed concatenation, a stacked send copy and a concatenation of the receive buffer held 3 more each.
    The backward is the same exchange of dq, dk, dv in reverse.
    """

    @staticmethod
    def forward(ctx, q, k, v, group):
        n, heads = group_size(group), (q.shape[2], k.shape[2], v.shape[2])
        ctx.group, ctx.heads = group, heads
        B, Lq, _, D = q.shape
        parts = [h // n for h in heads]
        send = q.new_empty(n, B, Lq, sum(parts), D)
        for dst, t in zip(send.split(parts, dim=3), (q, k, v)):
            dst.copy_(t.unflatten(2, (n, -1)).movedim(2, 0))
        recv = all_to_all_buffer(send, group)
        # The send buffer has done its work and holds exactly as many elements as q, k, v together: the
        # results are written into it (contiguous [B, L, h, D] each), so no third buffer is allocated.
        return tuple(_unpack(recv, send.view(-1), parts, [(B, n * Lq, h, D) for h in parts], dim=1))

    @staticmethod
    def backward(ctx, dq, dk, dv):
        n, group = group_size(ctx.group), ctx.group
        B, L, _, D = dq.shape
        parts = [h // n for h in ctx.heads]
        send = dq.new_empty(n, B, L // n, sum(parts), D)
        for dst, g in zip(send.split(parts, dim=3), (dq, dk, dv)):
            dst.copy_(g.unflatten(1, (n, -1)).movedim(1, 0))
        recv = all_to_all_buffer(send, group)
        grads = _unpack(recv, send.view(-1), parts, [(B, L // n, h, D) for h in ctx.heads], dim=2)
        return (*grads, None)


def _unpack(recv: torch.Tensor, flat: torch.Tensor, parts: list[int], shapes: list[tuple[int, ...]],
            dim: int) -> list[torch.Tensor]:
    """Copy each received part (``recv.split(parts, dim=3)``, ``[N, ...]``) into consecutive contiguous views of
    ``flat`` of the given shapes, whose dimension ``dim`` is the N source ranks' blocks concatenated."""
    out, at = [], 0
    for src, shape in zip(recv.split(parts, dim=3), shapes):
        dst = flat[at:at + math.prod(shape)].view(shape)
        dst.unflatten(dim, (recv.shape[0], -1)).movedim(dim, 0).copy_(src)  # a strided copy, no temporary
        out.append(dst)
        at += dst.numel()
    return out


def head_share(per_head: torch.Tensor | None, group: Group) -> torch.Tensor | None:
    """This rank's H/N entries of a per-head ``[H]`` tensor after ``seq_to_heads`` (rank r holds heads
    r·H/N .. (r+1)·H/N - 1); differentiable, so its gradient lands in this rank's slice only."""
    if per_head is None:
        return None
    return per_head.reshape(group_size(group), -1)[group_rank(group)]


def heads_to_seq(out: torch.Tensor, *, group: Group) -> torch.Tensor:
    """``[B, L, H/N, D]`` head shard -> ``[B, L/N, H, D]`` sequence shard (the inverse all-to-all)."""
    return all_to_all(out, group=group, scatter_dim=1, gather_dim=2)


def ulysses_bytes(q, k, v, *, group: Group = None, **_) -> tuple[int, int]:
    """(forward, backward) bytes this rank sends in one call: the module docstring's formula."""
    n = group_size(group)
    rep = n // math.gcd(n, k.shape[2])
    moved = (n - 1) * (2 * q.numel() + 2 * rep * k.numel()) * q.element_size() // n
    return moved, moved


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: Group = None,
    causal: bool = True,
    softmax_scale: float | None = None,
    layout: Layout = "contiguous",
    validate: bool = True,
    sinks: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Exact attention of a sequence sharded over ``group``, by two all-to-alls (DeepSpeed-Ulysses).

    Args:
        q: ``[B, L/N, H, D]`` this rank's shard in ``layout``; H must be divisible by N.
        k, v: ``[B, L/N, Hkv, D]``, Hkv dividing H (GQA; Hkv < N is fine, see the module docstring).
        group: the SP process group (None = one device).
        causal: causal mask over GLOBAL positions.
        softmax_scale: defaults to ``D ** -0.5``.
        layout: ``"contiguous"`` or ``"zigzag"`` (seqpar.sharding); the output uses the same layout.
        validate: compare shapes across ranks (one small collective); False skips it when the caller already
            did in this forward (``patch_model`` validates at the first layer only).
        sinks: optional ``[H]`` learned sink logit per query head (gpt-oss); each rank's local attention takes
            the sinks of its H/N heads, so the gradient is this rank's heads' share (sum it over the SP group).
        window: optional sliding window (causal only; transformers' ``sliding_window``): the query at global
            position p sees the keys at ``p - window < k <= p``. After the all-to-all every rank holds whole
            sequences in global order, so the window is applied by the local kernel's plan; bytes are unchanged.

    Returns:
        ``[B, L/N, H, D]`` this rank's shard of the output, in q's dtype; differentiable in q, k, v.

    Raises:
        ValueError on every rank: heads not divisible by N, kv heads not dividing heads, shapes differing
        across ranks, a sequence that the layout cannot split, a window that is not a positive int or comes
        with ``causal=False``.
    """
    n = group_size(group)
    check_options(layout=layout, causal=causal, softmax_scale=softmax_scale)
    check_qkv(q, k, v, group=group, layout=layout, validate=validate)
    check_sinks(sinks, q.shape[2])
    seq_len = q.shape[1] * n
    window = effective_window(window, seq_len, causal)  # raises on every rank before the all-to-all
    qh, kh, vh = seq_to_heads(q, k, v, group=group)
    sinks = head_share(sinks, group)
    if layout == "zigzag" and n > 1 and causal:
        # Put the gathered sequence into global order: the mask becomes plain causal (fused kernels apply),
        # and a permutation of [B, L, H/N, D] is cheap next to O(L^2) attention.
        order = layout_order(seq_len, n, layout, device=q.device)
        to_global = torch.argsort(order)
        qh, kh, vh = (t.index_select(1, to_global) for t in (qh, kh, vh))
        out = local_attention(qh.contiguous(), kh.contiguous(), vh.contiguous(), softmax_scale, causal=True,
                              sinks=sinks, window=window)
        out = out.index_select(1, order)
    else:  # contiguous is already in global order; without a mask (and so no window) the order does not matter
        out = local_attention(qh.contiguous(), kh.contiguous(), vh.contiguous(), softmax_scale, causal=causal,
                              sinks=sinks, window=window)
    return heads_to_seq(out, group=group)
