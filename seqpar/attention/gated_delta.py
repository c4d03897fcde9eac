"""Sequence-parallel gated delta rule (Gated DeltaNet: Qwen3-Next, Qwen3.5, OLMo-hybrid) by LASP-2's one
all-gather, generalised to affine state maps (``seqpar.attention.affine_maps``).

The rule S_t = α_t (I - β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ, o_t = S_tᵀ q_t is affine in the state: from entry
state S_in a piece's exit state is M S_in + U. A rank holds P pieces of the sequence (``affine_maps.shard_pieces``:
P = 1, chunk r of N, in the contiguous layout; P = 2, chunks r and 2N-1-r of 2N, in the zigzag layout). Rank r,
as LASP-2 does for linear attention:

    1. map pass:   [U | M] = each piece's exit state from [0 | I] with the values widened to [V | 0]
                   (``seqpar.kernels.delta``: the rule acts on each value column alone; states only, no output)
    2. all-gather the P maps (M, U) of every rank; each piece's entry state S_in is the fold of every chunk
       before its own, in global chunk order (Horner: S ← M_c S + U_c; ``affine_maps.entry_states``)
    3. output pass: the rule on each piece from its S_in (the one-device pass, outputs written in place)

Backward mirrors it: the output pass's backward gives the input gradients and dS_in; one all-gather of the
pieces' dS_in gives this rank's dU, dM (``affine_maps``); the map pass's backward from the exit-state gradient
[dU | dM] adds its share of the input gradients. Both passes recompute their chunks in backward
(``delta_backward``) and write into one set of gradient buffers. The map pass costs about half an output
pass per value column, at Dk + Dv columns; nothing else grows with N.

Packed documents (``cu_seqlens``, global boundaries): the state resets at each document start, so every part of
a document in a piece runs from zero except a first part that continues a document begun in an earlier chunk; a
piece that holds a document start passes a zero transition M = 0 and its last part's exit state as U (no
map pass). Chunk 0 and one device (N = 1, where zigzag is the sequence in order) run every part from zero.

Shapes: ``q, k [B, n, Hk, Dk]``, ``v [B, n, Hv, Dv]``, ``g, beta [B, n, Hv]`` (n = L/N, even in zigzag;
Hk divides Hv as in transformers' grouped value heads), output ``[B, n, Hv, Dv]`` in q's dtype. Computed in
float32 (float64 for float64 inputs; transformers' own function is float32 always).

Saved for backward (units of one [B, n, Hv, Dv] float32 tensor, D = Dk = Dv, chunk C = 64): the inputs
themselves (the caller's; nothing normalised, repeated or widened is kept), the output pass's segment entry
states (1/4 unit) and the map pass's (1/2), S_in and the gathered maps (P·N·B·Hv·Dk·(Dk+Dv), independent of n).
The backward allocates one set of input gradients (q, k, v-sized, in the accumulation dtype) and one
segment's autograd graph at a time (``seqpar.kernels.delta``). Measured (``seqpar bench hybrid``, L = 32k,
N = 2, H = 8, D = 64, float32; 1 unit = 32 MiB): 358 MiB per rank (11 units: inputs, output, its gradient,
input gradients 8, states, one segment's graph and the process's allocator slack), against 1584 MiB (49 units)
with autograd through the widened pass before this recomputing backward (it kept every chunk's intermediates,
O^M, the widened values and two sets of gradients), and 636 MiB for one process on the whole sequence (0.56x).

Bytes per call, per rank: ``gated_delta_bytes`` (``affine_maps.entry_state_bytes``): forward
P·(N-1)·B·Hv·Dk·(Dk+Dv)·itemsize, backward P·(N-1)·B·Hv·Dk·Dv·itemsize (P = 1 contiguous, 2 zigzag: the
maps double, the work does not); independent of L.
"""

from __future__ import annotations

import torch

from seqpar.attention.affine_maps import check_layout, entry_state_bytes, entry_states, shard_pieces
from seqpar.comm import Group, group_rank, group_size
from seqpar.kernels import acc_dtype
from seqpar.kernels.delta import DEFAULT_DELTA_CHUNK, DeltaOptions, delta_backward, delta_forward


class _GatedDelta(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, group, cu_seqlens, opt: DeltaOptions, layout):
        N, rank, n = group_size(group), group_rank(group), q.shape[1]
        B, _, H, Dv = v.shape
        Dk = k.shape[-1]
        pieces = shard_pieces(n, N, rank, layout, cu_seqlens)
        inputs = (q, k, v, g, beta)
        out = v.new_empty(B, n, H, Dv, dtype=q.dtype)
        zero = v.new_zeros(B, H, Dk, Dv, dtype=opt.acc)
        # per piece: the output passes run from zero [(slice, segment entry states)], its map (M, U), and the
        # map pass's segment entry states (None: a document starts in the piece, M = 0, no map pass)
        runs, maps, map_entries = [], [], []
        for pc in pieces:
            cont = N > 1 and pc.cont  # its first document part runs from the piece's entry state (below)
            docs = [slice(a, b) for a, b, _ in pc.docs]
            mine, U = [], zero  # U: the last document part's exit state from zero
            for sl in docs[1:] if cont else docs:
                U, entries = delta_forward(*(x[:, sl] for x in inputs), zero, opt, out[:, sl])
                mine.append((sl, entries))
            runs.append(mine)
            entries = None
            if cont and len(docs) == 1:  # the map pass: [U | M] from [0 | I], values widened by zeros
                eye = torch.eye(Dk, dtype=opt.acc, device=v.device).expand(B, H, Dk, Dk)
                S, entries = delta_forward(*(x[:, docs[0]] for x in inputs), torch.cat([zero, eye], dim=-1), opt)
                U, M = S[..., :Dv], S[..., Dv:]
            else:  # a document starts in this piece: its exit state does not depend on its entry state
                M = zero.new_zeros(B, H, Dk, Dk)
            maps.append((M, U))
            map_entries.append(entries)
        ctx.fold, ctx.first = None, [None] * len(pieces)
        if N > 1:
            with torch.enable_grad():  # the fold's graph, run in backward for dM, dU (its one all-gather)
                M = torch.stack([m for m, _ in maps]).requires_grad_()
                U = torch.stack([u for _, u in maps]).requires_grad_()
                S_in = entry_states(M, U, group, layout)
            ctx.fold = (M, U, S_in)
            for i, pc in enumerate(pieces):
                if pc.cont:  # the first document part's output pass from the piece's entry state
                    sl = slice(*pc.docs[0][:2])
                    _, entries = delta_forward(*(x[:, sl] for x in inputs), S_in[i].detach(), opt, out[:, sl])
                    ctx.first[i] = (sl, entries)
        ctx.save_for_backward(*inputs)
        ctx.runs, ctx.map_entries, ctx.pieces, ctx.opt = runs, map_entries, pieces, opt
        return out

    @staticmethod
    def backward(ctx, dout):
        inputs = ctx.saved_tensors
        opt = ctx.opt
        grads = [torch.zeros_like(x, dtype=opt.acc) for x in inputs]  # the one set of gradient buffers

        def part(sl, entries, dS, with_out=True):
            return delta_backward(*(x[:, sl] for x in inputs), entries, opt, [d[:, sl] for d in grads],
                                  dout[:, sl] if with_out else None, dS)

        dM = dU = None
        if ctx.fold is not None:
            M, U, S_in = ctx.fold
            dS_in = torch.stack([torch.zeros_like(S_in[i]) if f is None else part(*f, None)
                                 for i, f in enumerate(ctx.first)])
            if S_in.requires_grad:  # on every rank of the group: the backward all-gather of the dS_in
                dM, dU = torch.autograd.grad(S_in, (M, U), dS_in)
            dM = torch.zeros_like(M) if dM is None else dM
            dU = torch.zeros_like(U) if dU is None else dU
        for i, mine in enumerate(ctx.runs):  # parts from zero; the last one's exit state is the piece's U
            for j, run in enumerate(mine):
                part(*run, dU[i] if dU is not None and j == len(mine) - 1 else None)
            if ctx.map_entries[i] is not None:
                sl = slice(*ctx.pieces[i].docs[0][:2])
                part(sl, ctx.map_entries[i], torch.cat([dU[i], dM[i]], dim=-1), with_out=False)
        ctx.runs = ctx.fold = ctx.map_entries = ctx.first = None
        return (*(d.to(x.dtype) if need else None for d, x, need in zip(grads, inputs, ctx.needs_input_grad)),
                None, None, None, None)


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    group: Group = None,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm: bool = True,
    chunk_size: int = DEFAULT_DELTA_CHUNK,
    layout: str = "contiguous",
) -> torch.Tensor:
    """The gated delta rule over the whole sequence from this rank's shard (exact, one all-gather).

    Args:
        q, k, v, g, beta: this rank's shard, transformers' ``torch_chunk_gated_delta_rule`` arguments (g is the
            log decay, <= 0; q is scaled by Dk^-1/2 here, after the optional L2 normalisation).
        group: the SP process group (None = one device).
        cu_seqlens: global document boundaries of a packed sequence (``seqpar.models.shard_batch``), or None.
        use_qk_l2norm: transformers' ``use_qk_l2norm_in_kernel`` (eps 1e-6, as flash-linear-attention).
        chunk_size: tokens per chunk of the local pass.
        layout: ``"contiguous"`` or ``"zigzag"`` (``seqpar.sharding``; zigzag: n even, two pieces of n/2).
    """
    check_layout(layout)
    if g.shape != beta.shape or g.shape != v.shape[:3] or v.shape[2] % k.shape[2] or q.shape != k.shape:
        raise ValueError(f"gated_delta_rule: q {tuple(q.shape)}, k {tuple(k.shape)} [B, n, Hk, Dk], v {tuple(v.shape)} "
                         f"[B, n, Hv, Dv], g {tuple(g.shape)} and beta {tuple(beta.shape)} [B, n, Hv] do not match")
    opt = DeltaOptions(acc=acc_dtype(q.dtype), rep=v.shape[2] // k.shape[2], l2norm=use_qk_l2norm,
                       scale=q.shape[-1] ** -0.5, chunk_size=chunk_size)
    return _GatedDelta.apply(q, k, v, g, beta, group, cu_seqlens, opt, layout)


def gated_delta_bytes(q, k, v, *_, group: Group = None, layout: str = "contiguous", **__) -> tuple[int, int]:
    """(forward, backward) bytes this rank sends in one call: the module docstring's formula."""
    B, _, Hv, Dv = v.shape
    Dk = k.shape[-1]
    return entry_state_bytes((B, Hv, Dk, Dv), Dk, acc_dtype(q.dtype).itemsize, group, layout)


def example_inputs(L: int, dtype: torch.dtype, gen: torch.Generator) -> tuple[list[torch.Tensor], list, dict, int]:
    """A small call for the registry's conformance tests (``registry.MixerSpec``): GQA (2 q/k heads serve 4 value
    heads), log decays g <= 0 and β in (0, 1) as Gated DeltaNet makes them; float64 draws rounded to ``dtype``."""
    B, Hk, Hv, D = 2, 2, 4, 8
    draw = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k, v = draw(B, L, Hk, D), draw(B, L, Hk, D), draw(B, L, Hv, D)
    g = -torch.rand(B, L, Hv, generator=gen, dtype=torch.float64)
    beta = torch.rand(B, L, Hv, generator=gen, dtype=torch.float64)
    return [t.to(dtype) for t in (q, k, v, g, beta)], [1, 1, 1, 1, 1], {}, 1
