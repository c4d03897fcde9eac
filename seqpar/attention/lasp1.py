"""LASP(-1): sequence-parallel linear attention with the prefix state passed rank to rank (Sun et al. 2024,
"Linear Attention Sequence Parallelism"); kept as the baseline that LASP-2 (``seqpar.attention.lasp2``)
replaces with one all-gather.

Same math as LASP-2 (causal, per-head decay λ, o_t = q_t · Σ_{s<=t} λ^(t-s) k_s^T v_s), but the prefix state
P_i = Σ_{j<i} λ^(n(i-1-j)) M_j reaches rank i through a serial chain of N-1 point-to-point hops:
rank i receives P_i from rank i-1 and sends P_{i+1} = λ^n P_i + M_i to rank i+1. The local terms are
Lightning Attention-2's chunked kernel (Qin et al. 2024, ``seqpar.kernels.linear``). Backward runs the reverse
chain of state gradients: rank i receives dM_i from rank i+1 and sends dM_{i-1} = λ^n dM_i + dP_i, with
dP_i = (Q_i ⊙ λ^(t+1))^T dO_i. Non-causal mode (no decay) needs every state on every rank: the states go
N-1 steps around the ring (``RingComm``) and each rank sums them; backward the same for dP.

Shapes: as ``lasp2_linear_attention``: ``q [B, L/N, H, Dk]``, ``k [B, L/N, Hkv, Dk]``,
``v [B, L/N, Hkv, Dv]``, contiguous layout; output ``[B, L/N, H, Dv]``. States travel in float32
(float64 for float64 inputs).

Bytes per call, per rank (s = B·H·Dk·Dv·itemsize, one state): causal forward: at most one state sent and one
received (rank 0 receives none, rank N-1 sends none); backward the same in reverse. Non-causal: (N-1)·s sent
and received, forward and backward. The latency is N-1 serial hops, which is what LASP-2 removes.
"""

from __future__ import annotations

import torch

from seqpar.attention.lasp2 import prepare_linear_inputs
from seqpar.comm import Group, RingComm, chain_scan, group_rank, group_size
from seqpar.kernels import acc_dtype
from seqpar.kernels.linear import (
    DEFAULT_LINEAR_BLOCK,
    apply_prefix,
    apply_prefix_bwd,
    chunk_state,
    chunk_state_bwd,
    decay_grad,
    heads_first,
    linear_attention_bwd,
    linear_attention_fwd,
    powers,
)


def ring_sum(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Σ over ranks of ``x`` by N-1 ring steps (each rank forwards what it last received)."""
    total, cur, ring = x.clone(), x, RingComm(group)
    for _ in range(group_size(group) - 1):
        cur = ring.send_recv(cur)
        ring.wait()
        total += cur
    return total


class _LASP1(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_decay, group, causal, block_size):
        acc, n = acc_dtype(q.dtype), q.shape[1]
        qh, kh, vh = (heads_first(t, acc) for t in (q, k, v))
        M = chunk_state(kh, vh, log_decay)
        if causal:  # P_i arrives from rank i-1; rank i sends on λ^n P_i + M_i
            lam_n = powers(log_decay, n)
            P = chain_scan(M, lambda carry: carry * lam_n + M, group)
            out = linear_attention_fwd(qh, kh, vh, log_decay, block_size) + apply_prefix(qh, P, log_decay)
        else:
            P = ring_sum(M, group)
            out = apply_prefix(qh, P, log_decay)
        ctx.save_for_backward(q, k, v, log_decay, P)
        ctx.group, ctx.causal, ctx.block_size = group, causal, block_size
        return out.transpose(1, 2).to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, log_decay, P = ctx.saved_tensors
        group, acc, n = ctx.group, P.dtype, q.shape[1]
        qh, kh, vh, doh = (heads_first(t, acc) for t in (q, k, v, dout))
        dq, dP = apply_prefix_bwd(qh, doh, P, log_decay)
        if ctx.causal:  # dM_i arrives from rank i+1; rank i sends on λ^n dM_i + dP_i
            lam_n = powers(log_decay, n)
            dM = chain_scan(dP, lambda carry: carry * lam_n + dP, group, reverse=True)
            dq_l, dk, dv = linear_attention_bwd(doh, qh, kh, vh, log_decay, ctx.block_size)
            dk_m, dv_m = chunk_state_bwd(kh, vh, dM, log_decay)
            dq, dk, dv = dq + dq_l, dk + dk_m, dv + dv_m
        else:
            dk, dv = chunk_state_bwd(kh, vh, ring_sum(dP, group), log_decay)
        d_log_decay = decay_grad(qh, dq, kh, dk, group_rank(group) * n) if ctx.needs_input_grad[3] else None
        grads = (g.transpose(1, 2).to(t.dtype) for g, t in ((dq, q), (dk, k), (dv, v)))
        return (*grads, d_log_decay, None, None, None)


def lasp1_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: Group = None,
    decay: torch.Tensor | float | None = None,
    causal: bool = True,
    block_size: int = DEFAULT_LINEAR_BLOCK,
) -> torch.Tensor:
    """Exact linear attention from this rank's contiguous shard by LASP-1's serial state chain.

    Arguments, result and errors as ``seqpar.attention.lasp2_linear_attention``; only the communication
    differs (N-1 serial point-to-point hops instead of one all-gather).
    """
    k, v, log_decay = prepare_linear_inputs(
        q, k, v, group=group, decay=decay, causal=causal, block_size=block_size
    )
    return _LASP1.apply(q, k, v, log_decay, group, causal, block_size)
