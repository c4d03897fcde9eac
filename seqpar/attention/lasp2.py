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

Zigzag layout (``layout="zigzag"``, causal; rank r holds chunks r and 2N-1-r of 2N chunks of h = n/2 tokens,
``seqpar.sharding``): the same with two pieces per rank. Each piece c has its state M_c (of its last document
part), the 2 states of every rank are all-gathered once ([N, 2] -> global chunk order), and each piece's prefix
is the fold over the chunks before it, P_c = Σ_{j<c} λ^(h(c-1-j)) M_j (cut by a_j = 0 at document starts,
as above); piece 2N-1-r's fold passes through this rank's own chunk r. Backward: one all-gather of both pieces'
dP, then dM_c = Σ_{j>c} λ^(h(j-1-c)) dP_j per piece; the decay gradient sums each piece's share at its global
positions. Non-causal attention is one sum over all tokens, the same in any layout (one state per rank).

Shapes: ``q [B, L/N, H, Dk]``, ``k [B, L/N, Hkv, Dk]``, ``v [B, L/N, Hkv, Dv]`` (L/N even in zigzag;
Hkv divides H and k, v are repeated to H heads), ``decay`` None, a float or ``[H]`` in (0, 1] (may require
grad: d log λ = Σ_t t (q_t·dq_t - k_t·dk_t), this rank's share, to be summed over the group);
output ``[B, L/N, H, Dv]`` in q's dtype. States travel in float32 (float64 for float64 inputs).

Saved for backward (units of one [B, L/N, H, D] tensor of the local shard): q, k, v themselves (the caller's,
not copied) and P (one state, independent of L); the backward allocates dq, dk, dv (3 units) and the run
state gradients G (one state per run of 256 tokens on CPU: D/256 of a unit); nothing per block is kept (the
kernel's backward recomputes it). ``seqpar bench hybrid`` at L = 32k, N = 2, H = 8, D = 64: 309 MiB per
rank against 602 MiB for one process on the whole sequence (0.51x).

Bytes per call, per rank (itemsize of the state dtype: 4, or 8 for float64):
forward P·(N-1)·B·H·Dk·Dv·itemsize sent and received (one all-gather; P = 2 states per rank for causal
zigzag, else 1), backward the same; independent of L.

Raises ValueError naming the argument on bad shapes, dtypes, decay or block_size, on every rank
(lengths that differ across ranks are detected collectively before any other communication).
"""

from __future__ import annotations

import torch

from seqpar.attention.affine_maps import check_layout, global_order, pieces_per_rank, shard_pieces
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
from seqpar.sharding import local_documents, reorder_to_global


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


def document_flows(cu_seqlens: torch.Tensor | None, n: int, world: int) -> tuple[bool, ...]:
    """Per chunk of ``n`` tokens among ``world`` (a contiguous shard of rank j; a zigzag chunk of n = L/2N among
    2N): whether its exit state depends on its entry state (it is one piece of a document begun in an earlier
    chunk), from the global boundaries alone (no communication)."""
    flows = []
    for j in range(world):
        pieces = local_documents(cu_seqlens, n, world, j)
        flows.append(len(pieces) == 1 and pieces[0][2] < j * n)
    return tuple(flows)


class _PiecewiseLASP2(torch.autograd.Function):
    """Causal LASP-2 over the pieces of a shard (``affine_maps.shard_pieces``: one contiguous piece, or the two
    zigzag chunks r and 2N-1-r) and packed documents: the module docstring's fold with a_c, in global chunk
    order, over all P·N pieces; one kernel call per document part."""

    @staticmethod
    def forward(ctx, q, k, v, log_decay, group, block_size, cu_seqlens, layout):
        acc, N, rank, n = acc_dtype(q.dtype), group_size(group), group_rank(group), q.shape[1]
        qh, kh, vh = (heads_first(t, acc) for t in (q, k, v))
        pieces = shard_pieces(n, N, rank, layout, cu_seqlens)
        size, order = pieces[0].end - pieces[0].start, global_order(N, layout)
        flows = document_flows(cu_seqlens, size, len(order))
        parts = [[slice(a, b) for a, b, _ in pc.docs] for pc in pieces]
        # each piece's state from zero of its last document part (= the piece's M_c where flows[c])
        M = torch.stack([chunk_state(kh[:, :, ps[-1]], vh[:, :, ps[-1]], log_decay) for ps in parts])
        states = reorder_to_global(all_gather_tensor(M, group).view(len(order), *M.shape[1:]), N, layout, dim=0)
        P = [prefix_from_states(states, log_decay, size, pc.chunk, flows) for pc in pieces]
        out = q.new_empty(*q.shape[:3], v.shape[3])
        for pc, ps, prefix in zip(pieces, parts, P):
            for i, sl in enumerate(ps):
                o = linear_attention_fwd(qh[:, :, sl], kh[:, :, sl], vh[:, :, sl], log_decay, block_size,
                                         prefix=prefix if i == 0 and pc.cont else None)
                out[:, sl] = o.transpose(1, 2)
        ctx.save_for_backward(q, k, v, log_decay, torch.stack(P))
        ctx.group, ctx.block_size, ctx.pieces, ctx.parts, ctx.flows, ctx.layout = (group, block_size, pieces, parts,
                                                                                  flows, layout)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, log_decay, P = ctx.saved_tensors
        group, acc, pieces, parts = ctx.group, P.dtype, ctx.pieces, ctx.parts
        qh, kh, vh, doh = (heads_first(t, acc) for t in (q, k, v, dout))
        size, order = pieces[0].end - pieces[0].start, global_order(group_size(group), ctx.layout)
        G0, dP = [], []
        for pc, ps in zip(pieces, parts):  # dP: what the first part's outputs give the piece's entry state
            G, d = run_state_grads(qh[:, :, ps[0]], doh[:, :, ps[0]], log_decay, ctx.block_size)
            G0.append(G)
            dP.append(d if pc.cont else torch.zeros_like(d))  # a document starts here: its outputs skip P
        dP = torch.stack(dP)
        grads = reorder_to_global(all_gather_tensor(dP, group).view(len(order), *dP.shape[1:]), group_size(group),
                                  ctx.layout, dim=0)  # global chunk order, by views
        dq, dk, dv = (torch.empty(*t.shape[:3], t.shape[3], dtype=acc, device=t.device).transpose(1, 2)
                      for t in (q, k, v))
        d_log_decay = None
        for j, (pc, ps) in enumerate(zip(pieces, parts)):
            dM = suffix_from_grads(grads, log_decay, size, pc.chunk, ctx.flows)
            for i, sl in enumerate(ps):
                G = G0[j] if i == 0 else run_state_grads(qh[:, :, sl], doh[:, :, sl], log_decay, ctx.block_size)[0]
                got = linear_attention_bwd(doh[:, :, sl], qh[:, :, sl], kh[:, :, sl], vh[:, :, sl], log_decay,
                                           ctx.block_size, prefix=P[j] if i == 0 and pc.cont else None,
                                           final_grad=dM if i == len(ps) - 1 else None, run_grads=G)
                for buf, part in zip((dq, dk, dv), got):
                    buf[:, :, sl] = part
            if ctx.needs_input_grad[3]:  # this piece's share at its global positions
                sl = slice(pc.start, pc.end)
                share = decay_grad(qh[:, :, sl], dq[:, :, sl], kh[:, :, sl], dk[:, :, sl], pc.origin)
                d_log_decay = share if d_log_decay is None else d_log_decay + share
        grads_out = (g.transpose(1, 2).to(t.dtype) for g, t in ((dq, q), (dk, k), (dv, v)))
        return (*grads_out, d_log_decay, None, None, None, None)


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


def prepare_linear_inputs(q, k, v, *, group: Group, decay, causal: bool, block_size: int, validate: bool = True):
    """Validate (locally, then lengths collectively unless ``validate=False``) and repeat GQA k, v heads;
    returns (k, v, log_decay).

    Shared with LASP-1 (``seqpar.attention.lasp1``)."""
    # Lengths may differ per rank: compare them collectively FIRST, so a rank that would raise below never
    # leaves the others waiting in a collective (the remaining checks give the same verdict on every rank).
    if validate:
        lengths = torch.empty((*q.shape[:2], *k.shape[:2], *v.shape[:2]), device="meta")
        check_same_shape(lengths, group=group, name="[batch, seq] of q, k, v")
    log_decay = check_linear_args(q, k, v, decay=decay, causal=causal, block_size=block_size)
    groups = q.shape[2] // k.shape[2]
    if groups > 1:  # autograd sums the repeated heads' gradients back
        k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    return k, v, log_decay


def lasp2_bytes(q, k, v, *, group: Group = None, causal: bool = True, layout: str = "contiguous",
                **_) -> tuple[int, int]:
    """(forward, backward) bytes this rank sends in one call: the module docstring's formula."""
    B, _, H, Dk = q.shape
    N = group_size(group)
    pieces = pieces_per_rank(layout, N) if causal else 1
    state = pieces * B * H * Dk * v.shape[3] * acc_dtype(q.dtype).itemsize
    return (N - 1) * state, (N - 1) * state


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
    layout: str = "contiguous",
    validate: bool = True,
) -> torch.Tensor:
    """Exact linear attention over the whole sequence from this rank's shard (LASP-2).

    Args:
        q, k, v: this rank's shard ``[B, L/N, H(kv), D]`` of a sequence laid out as ``layout``
            (``seqpar.sharding.shard(x, layout=layout)``).
        group: the SP process group (None = one device).
        decay: per-head λ in (0, 1] (None = 1, no decay); only with ``causal=True``. A tensor that requires
            grad gets this rank's share of its gradient (sum it over the group, like the projections').
        causal: False gives O = Q · Σ_s k_s^T v_s over the whole sequence.
        block_size: tokens per intra-chunk block (memory O(L/N · block_size) per head).
        cu_seqlens: global document boundaries of a packed sequence (``seqpar.models.shard_batch``; causal
            only): the state resets at every document start. None: one document.
        layout: ``"contiguous"`` or ``"zigzag"`` (causal: two pieces per rank, 2N states gathered; non-causal
            attention is the same sum in any layout).
        validate: compare the lengths across ranks (one small collective, a host read); False skips it when
            the caller already did in this forward (a model's layers after the first).

    Returns:
        ``[B, L/N, H, Dv]``, this rank's shard of the output, in q's dtype.
    """
    check_layout(layout)
    k, v, log_decay = prepare_linear_inputs(
        q, k, v, group=group, decay=decay, causal=causal, block_size=block_size, validate=validate
    )
    if cu_seqlens is not None and not causal:
        raise ValueError("cu_seqlens with causal=False: packed documents need causal linear attention")
    if causal and (cu_seqlens is not None or pieces_per_rank(layout, group_size(group)) > 1):
        return _PiecewiseLASP2.apply(q, k, v, log_decay, group, block_size, cu_seqlens, layout)
    return _LASP2.apply(q, k, v, log_decay, group, causal, block_size)
