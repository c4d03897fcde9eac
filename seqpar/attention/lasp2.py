"""LASP-2: sequence-parallel linear attention with ONE all-gather of memory states (Sun et al. 2025,
"LASP-2: Rethinking Sequence Parallelism for Linear Attention and Its Hybrid").

Causal linear attention with per-head decay λ (no softmax, no normalisation: feature maps and norms belong
to the model), o_t = q_t · Σ_{s<=t} λ^(t-s) k_s^T v_s, on N ranks holding contiguous chunks of n tokens.
Rank i:

    M_i = Σ_{s in chunk i} λ^(n-1-s) k_s^T v_s                      memory state, d_k x d_v per head
    all-gather M_0 .. M_{N-1}
    O_i = LightningAttn2(Q_i, K_i, V_i) + (Q_i ⊙ λ^(t+1)) P_i,     P_i = Σ_{j<i} λ^(n(i-1-j)) M_j

Backward: dP_i = (Q_i ⊙ λ^(t+1))^T dO_i, ONE all-gather of the dP_j, then the suffix sum
dM_i = Σ_{j>i} λ^(n(j-1-i)) dP_j feeds dK_i, dV_i through M_i. The prefix term and dM's term are folded
into the hand-written chunked kernel of Lightning Attention-2 (Qin et al. 2024, ``seqpar.kernels.linear``):
its state scan starts at P, its state-gradient scan at dM, so neither costs a matmul of its own. The
paper overlaps the all-gather with the intra-chunk term; here the gather waits for the cheap first pass
(M, or dP) and the one fused pass follows it: the message is d_k x d_v per head (0.5 ms for B=1, H=8 at
N=2 over gloo on the 2-core dev machine), while splitting the pass to overlap it would read and write every
[L/N, H, D] tensor once more and add the prefix's matmul back (estimated ~20 ms of one core at L/N = 16k).
Non-causal mode (no decay): every rank uses P = Σ_j M_j (its own included) and dM = Σ_j dP_j.

Packed documents (``cu_seqlens``, global boundaries; causal only): the state resets at every document start,
o_t = q_t · Σ_{s<=t, s in t's document} λ^(t-s) k_s^T v_s. Rank j's exit state is a_j S_in(j) + M_j with
a_j = λ^n when its shard is one piece of a document begun on an earlier rank, else a_j = 0 (a document starts
on it: it passes a zero transition) and M_j the state of its last piece from zero; every rank knows every a_j
from ``cu_seqlens``, so the gather and its bytes are unchanged and the folds become P = a_j P + M_j,
dM = a_j dM + dP_j. Each piece of the shard runs the kernel on its own: a first piece that continues an
earlier rank's document from P, every other from zero; dP is the first piece's (zero if it starts a
document), and the state gradient dM enters the last piece. The decay gradient keeps its formula (the
exponent t - s of a pair is the same from any origin, and pairs across documents no longer exist).

Shapes: ``q [B, L/N, H, Dk]``, ``k [B, L/N, Hkv, Dk]``, ``v [B, L/N, Hkv, Dv]`` (contiguous layout only;
Hkv divides H and k, v are repeated to H heads), ``decay`` None, a float or ``[H]`` in (0, 1] (may require
grad: d log λ = Σ_t t (q_t·dq_t - k_t·dk_t), this rank's share, to be summed over the group);
output ``[B, L/N, H, Dv]`` in q's dtype. States travel in float32 (float64 for float64 inputs).

Saved for backward (units of one [B, L/N, H, D] tensor of the local shard): q, k, v themselves (the caller's,
not copied) and P (one state, independent of L); the backward allocates dq, dk, dv (3 units) and the run
state gradients G (one state per run of 256 tokens on CPU: D/256 of a unit); nothing per block is kept (the
kernel's backward recomputes it). ``seqpar bench hybrid`` at L = 32k, N = 2, H = 8, D = 64: 309 MiB per
rank against 602 MiB for one process on the whole sequence (0.51x).

Bytes per call, per rank (itemsize of the state dtype: 4, or 8 for float64):
forward (N-1)·B·H·Dk·Dv·itemsize sent and received (one all-gather), backward the same; independent of L.

Raises ValueError naming the argument on bad shapes, dtypes, decay or block_size, on every rank
(lengths that differ across ranks are detected collectively before any other communication).
"""

from __future__ import annotations

import torch

from seqpar.attention.checks import check_linear_args
from seqpar.comm import Group, all_gather_tensor, check_same_shape, group_rank, group_size
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
    run_state_grads,
)
from seqpar.sharding import local_documents


def prefix_from_states(states: torch.Tensor, log_decay: torch.Tensor, n: int, rank: int,
                       flows: tuple[bool, ...] | None = None) -> torch.Tensor:
    """P_rank = Σ_{j<rank} λ^(n(rank-1-j)) M_j from ``states [N, B, H, Dk, Dv]`` (Horner: P = λ^n P + M_j);
    ``flows[j]`` False (packed documents: a document starts on rank j) cuts it there (P = M_j)."""
    lam_n = powers(log_decay, n)
    P = torch.zeros_like(states[0])
    for j in range(rank):
        P = P * lam_n + states[j] if flows is None or flows[j] else states[j]
    return P


def suffix_from_grads(grads: torch.Tensor, log_decay: torch.Tensor, n: int, rank: int,
                      flows: tuple[bool, ...] | None = None) -> torch.Tensor:
    """dM_rank = Σ_{j>rank} λ^(n(j-1-rank)) dP_j from ``grads [N, B, H, Dk, Dv]`` (Horner from the end);
    ``flows`` as for ``prefix_from_states`` (dM = dP_j where rank j does not pass its entry state on)."""
    lam_n = powers(log_decay, n)
    G = torch.zeros_like(grads[0])
    for j in range(grads.shape[0] - 1, rank, -1):
        G = G * lam_n + grads[j] if flows is None or flows[j] else grads[j]
    return G


def document_flows(cu_seqlens: torch.Tensor, n: int, world: int) -> tuple[bool, ...]:
    """Per rank: whether its exit state depends on its entry state (its shard is one piece of a document
    begun on an earlier rank), from the global boundaries alone (no communication)."""
    flows = []
    for j in range(world):
        pieces = local_documents(cu_seqlens, n, world, j)
        flows.append(len(pieces) == 1 and pieces[0][2] < j * n)
    return tuple(flows)


class _PackedLASP2(torch.autograd.Function):
    """Causal LASP-2 over packed documents (the module docstring's fold with a_j; one kernel call per piece)."""

    @staticmethod
    def forward(ctx, q, k, v, log_decay, group, block_size, cu_seqlens):
        acc, N, rank, n = acc_dtype(q.dtype), group_size(group), group_rank(group), q.shape[1]
        qh, kh, vh = (heads_first(t, acc) for t in (q, k, v))
        docs = local_documents(cu_seqlens, n, N, rank)
        pieces, flows = [slice(a, b) for a, b, _ in docs], document_flows(cu_seqlens, n, N)
        cont = docs[0][2] < rank * n  # the first piece continues an earlier rank's document: it runs from P
        M = chunk_state(kh[:, :, pieces[-1]], vh[:, :, pieces[-1]], log_decay)  # = the shard's if flows[rank]
        states = all_gather_tensor(M, group).view(N, *M.shape)
        P = prefix_from_states(states, log_decay, n, rank, flows)
        out = q.new_empty(*q.shape[:3], v.shape[3])
        for i, sl in enumerate(pieces):
            o = linear_attention_fwd(qh[:, :, sl], kh[:, :, sl], vh[:, :, sl], log_decay, block_size,
                                     prefix=P if i == 0 and cont else None)
            out[:, sl] = o.transpose(1, 2)
        ctx.save_for_backward(q, k, v, log_decay, P)
        ctx.group, ctx.block_size, ctx.pieces, ctx.flows, ctx.cont = group, block_size, pieces, flows, cont
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, log_decay, P = ctx.saved_tensors
        group, acc, pieces, cont = ctx.group, P.dtype, ctx.pieces, ctx.cont
        N, rank, n = group_size(group), group_rank(group), q.shape[1]
        qh, kh, vh, doh = (heads_first(t, acc) for t in (q, k, v, dout))
        first = pieces[0]
        G0, dP = run_state_grads(qh[:, :, first], doh[:, :, first], log_decay, ctx.block_size)
        if not cont:  # a document starts on this shard: its outputs do not read P (the gather still runs)
            dP = torch.zeros_like(dP)
        grads = all_gather_tensor(dP, group).view(N, *dP.shape)
        dM = suffix_from_grads(grads, log_decay, n, rank, ctx.flows)
        dq, dk, dv = (torch.empty(*t.shape[:3], t.shape[3], dtype=acc, device=t.device).transpose(1, 2)
                      for t in (q, k, v))
        for i, sl in enumerate(pieces):
            G = G0 if i == 0 else run_state_grads(qh[:, :, sl], doh[:, :, sl], log_decay, ctx.block_size)[0]
            parts = linear_attention_bwd(doh[:, :, sl], qh[:, :, sl], kh[:, :, sl], vh[:, :, sl], log_decay,
                                         ctx.block_size, prefix=P if i == 0 and cont else None,
                                         final_grad=dM if i == len(pieces) - 1 else None, run_grads=G)
            for buf, part in zip((dq, dk, dv), parts):
                buf[:, :, sl] = part
        d_log_decay = decay_grad(qh, dq, kh, dk, rank * n) if ctx.needs_input_grad[3] else None
        grads_out = (g.transpose(1, 2).to(t.dtype) for g, t in ((dq, q), (dk, k), (dv, v)))
        return (*grads_out, d_log_decay, None, None, None)


class _LASP2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_decay, group, causal, block_size):
        acc, N, rank = acc_dtype(q.dtype), group_size(group), group_rank(group)
        qh, kh, vh = (heads_first(t, acc) for t in (q, k, v))
        M = chunk_state(kh, vh, log_decay)  # [B, H, Dk, Dv]
        states = all_gather_tensor(M, group).view(N, *M.shape)
        n = q.shape[1]
        if causal:  # one pass: intra-block terms, and inter-block ones from states that start at P
            P = prefix_from_states(states, log_decay, n, rank)
            out = linear_attention_fwd(qh, kh, vh, log_decay, block_size, prefix=P)
        else:
            P = states.sum(0)
            out = apply_prefix(qh, P, log_decay)
        ctx.save_for_backward(q, k, v, log_decay, P)
        ctx.group, ctx.causal, ctx.block_size = group, causal, block_size
        return out.transpose(1, 2).to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, log_decay, P = ctx.saved_tensors
        group, causal, acc = ctx.group, ctx.causal, P.dtype
        N, rank, n = group_size(group), group_rank(group), q.shape[1]
        qh, kh, vh, doh = (heads_first(t, acc) for t in (q, k, v, dout))
        if causal:  # dP with the later blocks' state gradients (the kernel's first backward pass)
            G, dP = run_state_grads(qh, doh, log_decay, ctx.block_size)
        else:
            dq, dP = apply_prefix_bwd(qh, doh, P, log_decay)
        grads = all_gather_tensor(dP, group).view(N, *dP.shape)
        if causal:  # one pass: intra-block terms, inter-block ones from P, and dM's share in dk, dv
            dM = suffix_from_grads(grads, log_decay, n, rank)
            dq, dk, dv = linear_attention_bwd(doh, qh, kh, vh, log_decay, ctx.block_size, prefix=P, final_grad=dM,
                                              run_grads=G)
        else:
            dk, dv = chunk_state_bwd(kh, vh, grads.sum(0), log_decay)
        d_log_decay = decay_grad(qh, dq, kh, dk, rank * n) if ctx.needs_input_grad[3] else None
        grads_out = (g.transpose(1, 2).to(t.dtype) for g, t in ((dq, q), (dk, k), (dv, v)))
        return (*grads_out, d_log_decay, None, None, None)


def prepare_linear_inputs(q, k, v, *, group: Group, decay, causal: bool, block_size: int):
    """Validate (locally, then lengths collectively) and repeat GQA k, v heads; returns (k, v, log_decay).

    Shared with LASP-1 (``seqpar.attention.lasp1``)."""
    # Lengths may differ per rank: compare them collectively FIRST, so a rank that would raise below never
    # leaves the others waiting in a collective (the remaining checks give the same verdict on every rank).
    lengths = torch.empty((*q.shape[:2], *k.shape[:2], *v.shape[:2]), device="meta")
    check_same_shape(lengths, group=group, name="[batch, seq] of q, k, v")
    log_decay = check_linear_args(q, k, v, decay=decay, causal=causal, block_size=block_size)
    groups = q.shape[2] // k.shape[2]
    if groups > 1:  # autograd sums the repeated heads' gradients back
        k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    return k, v, log_decay


def lasp2_bytes(q, k, v, *, group: Group = None, **_) -> tuple[int, int]:
    """(forward, backward) bytes this rank sends in one call: the module docstring's formula."""
    B, _, H, Dk = q.shape
    state = B * H * Dk * v.shape[3] * acc_dtype(q.dtype).itemsize
    return (group_size(group) - 1) * state, (group_size(group) - 1) * state


def lasp2_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: Group = None,
    decay: torch.Tensor | float | None = None,
    causal: bool = True,
    block_size: int = DEFAULT_LINEAR_BLOCK,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact linear attention over the whole sequence from this rank's contiguous shard (LASP-2).

    Args:
        q, k, v: this rank's shard ``[B, L/N, H(kv), D]`` of a sequence laid out contiguously
            (``seqpar.sharding.shard(x, layout="contiguous")``).
        group: the SP process group (None = one device).
        decay: per-head λ in (0, 1] (None = 1, no decay); only with ``causal=True``. A tensor that requires
            grad gets this rank's share of its gradient (sum it over the group, like the projections').
        causal: False gives O = Q · Σ_s k_s^T v_s over the whole sequence.
        block_size: tokens per intra-chunk block (memory O(L/N · block_size) per head).
        cu_seqlens: global document boundaries of a packed sequence (``seqpar.models.shard_batch``; causal
            only): the state resets at every document start. None: one document.

    Returns:
        ``[B, L/N, H, Dv]``, this rank's shard of the output, in q's dtype.
    """
    k, v, log_decay = prepare_linear_inputs(
        q, k, v, group=group, decay=decay, causal=causal, block_size=block_size
    )
    if cu_seqlens is not None:
        if not causal:
            raise ValueError("cu_seqlens with causal=False: packed documents need causal linear attention")
        return _PackedLASP2.apply(q, k, v, log_decay, group, block_size, cu_seqlens)
    return _LASP2.apply(q, k, v, log_decay, group, causal, block_size)
