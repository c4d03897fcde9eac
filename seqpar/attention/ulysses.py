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
"""

from __future__ import annotations

import math

import torch

from seqpar.attention.checks import check_head_split, check_options, check_qkv, check_sinks, effective_window
from seqpar.attention.local import local_attention
from seqpar.comm import Group, all_to_all, group_rank, group_size
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
    B, Lq, H, D = q.shape
    rep = kv_replication(H, k.shape[2], n, what=what)  # raises (on every rank alike) before any communication
    if rep > 1:  # GQA with fewer kv heads than ranks: the least replication that splits evenly
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    Hk = k.shape[2]
    # Interleave per destination rank so that one all-to-all carries q, k and v: piece j = (q_j, k_j, v_j).
    packed = torch.cat([t.reshape(B, Lq, n, -1, D) for t in (q, k, v)], dim=3).reshape(B, Lq, -1, D)
    heads = all_to_all(packed, group=group, scatter_dim=2, gather_dim=1)
    return heads.split([H // n, Hk // n, Hk // n], dim=2)


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
