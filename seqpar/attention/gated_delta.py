"""Sequence-parallel gated delta rule (Gated DeltaNet: Qwen3-Next, Qwen3.5, OLMo-hybrid) by LASP-2's one
all-gather, generalised to affine state maps (``seqpar.attention.affine_maps``).

The rule S_t = α_t (I - β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ, o_t = S_tᵀ q_t is affine in the state: from entry
state S_in a piece's exit state is M S_in + U. A rank holds P pieces of the sequence (``affine_maps.shard_pieces``:
P = 1, chunk r of N, in the contiguous layout; P = 2, chunks r and 2N-1-r of 2N, in the zigzag layout). Rank r,
as LASP-2 does for linear attention:

    1. one widened pass per piece: from [0 | I], with the values widened to [V | 0] (``seqpar.kernels.delta``:
       the rule acts on each value column alone), its outputs are [O⁰ | O^M] (O⁰_t = U_tᵀ q_t, the output from
       a zero state; O^M_t = M_tᵀ q_t, Dk columns) and its exit state is the map [U | M]
    2. all-gather the P maps (M, U) of every rank; each piece's entry state S_in is the fold of every chunk
       before its own, in global chunk order (Horner: S ← M_c S + U_c; ``affine_maps.entry_states``)
    3. O = O⁰ + O^M S_in (one [n, Dk] x [Dk, Dv] matmul per head)

No rank waits for another's pass: the critical path is one widened pass, where a map pass (states only)
followed by an output pass from S_in made it two passes at N = 2 (chunk 0's output pass, then chunk 1's). The
widened pass shares every value-independent term of a chunk (the decays, the UT solve's matrix, QKᵀ) between
the Dv and the Dk columns. Chunk 0 runs the plain pass from zero (its map is its exit state, M = 0).

Backward mirrors it: dS_in = O^Mᵀ dO (then O^M is dropped); one all-gather of the pieces' dS_in gives this
rank's dU, dM (``affine_maps``); one widened backward, seeded with [dO | dO S_inᵀ] and the exit-state gradient
[dU | dM], gives the input gradients. It recomputes each segment (``delta_backward``) into one set of
gradient buffers; nothing else grows with N.

Packed documents (``cu_seqlens``, global boundaries): the state resets at each document start, so every part of
a document in a piece runs from zero except a first part that continues a document begun in an earlier chunk; a
piece that holds a document start passes a zero transition M = 0 and its last part's exit state as U (only its
first part is widened). Chunk 0 and one device (N = 1, where zigzag is the sequence in order) run every part from zero.

Shapes: ``q, k [B, n, Hk, Dk]``, ``v [B, n, Hv, Dv]``, ``g, beta [B, n, Hv]`` (n = L/N, even in zigzag;
Hk divides Hv as in transformers' grouped value heads), output ``[B, n, Hv, Dv]`` in q's dtype. Computed in
float32 (float64 for float64 inputs; transformers' own function is float32 always).

Saved for backward (units of one [B, n, Hv, Dv] float32 tensor, D = Dk = Dv, chunk C = 64): the inputs
themselves (the caller's; nothing normalised, repeated or widened is kept), O^M (1 unit, dropped before the
gradient buffers are allocated), the widened pass's segment entry states (1/2 unit), S_in and the gathered
maps (P·N·B·Hv·Dk·(Dk+Dv), independent of n). The backward allocates one set of input gradients (q, k,
v-sized, in the accumulation dtype) and one segment's autograd graph at a time (``seqpar.kernels.delta``).
Measured (``seqpar bench hybrid``, L = 32k, N = 2, H = 8, D = 64, float32; 1 unit = 32 MiB): 355 MiB per rank
(11 units: inputs, output, its gradient, input gradients, states, one segment's graph and the process's
allocator slack) against 639 MiB for one process on the whole sequence (0.55x), and 2.65 s against 3.02 s
(0.88x; the map pass followed by an output pass took 1.25x); autograd through the widened pass, before the
recomputing backward, kept 1584 MiB (49 units: every chunk's intermediates and two sets of gradients).

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
        # per piece: the parts run from zero [(slice, segment entry states)], the widened first part
        # (slice, segment entry states, O^M) or None, and the piece's map (M, U)
        runs, wide, maps = [], [], []
        for pc in pieces:
            cont = N > 1 and pc.cont  # its first document part continues from the piece's entry state
            docs = [slice(a, b) for a, b, _ in pc.docs]
            mine, U, first = [], zero, None  # U: the last document part's exit state from zero
            if cont:  # [O⁰ | O^M] and [U | M] from [0 | I] with the values widened to [V | 0]: one pass
                eye = torch.eye(Dk, dtype=opt.acc, device=v.device).expand(B, H, Dk, Dk)
                s = docs[0].stop - docs[0].start
                o_map = v.new_empty(B, s, H, Dk, dtype=opt.acc)
                # O⁰ in the accumulation dtype until O^M S_in is added (one rounding to a bf16 output, not two)
                o0 = out[:, docs[0]] if out.dtype == opt.acc else v.new_empty(B, s, H, Dv, dtype=opt.acc)
                S, entries = delta_forward(*(x[:, docs[0]] for x in inputs), torch.cat([zero, eye], dim=-1), opt,
                                           o0, o_map)
                first = (docs[0], entries, o_map, o0)
                U, M = S[..., :Dv], S[..., Dv:]
            for sl in docs[1:] if cont else docs:
                U, entries = delta_forward(*(x[:, sl] for x in inputs), zero, opt, out[:, sl])
                mine.append((sl, entries))
            if not cont or len(docs) > 1:  # a document starts in this piece: its exit state ignores its entry
                M = zero.new_zeros(B, H, Dk, Dk)
            runs.append(mine)
            wide.append(first)
            maps.append((M, U))
        ctx.fold = None
        if N > 1:
            with torch.enable_grad():  # the fold's graph, run in backward for dM, dU (its one all-gather)
                M = torch.stack([m for m, _ in maps]).requires_grad_()
                U = torch.stack([u for _, u in maps]).requires_grad_()
                S_in = entry_states(M, U, group, layout)
            ctx.fold = (M, U, S_in)
            for i, first in enumerate(wide):
                if first is not None:  # O = O⁰ + O^M S_in on the first document part
                    sl, entries, o_map, o0 = first
                    o0 += (o_map.transpose(1, 2) @ S_in[i].detach()).transpose(1, 2)
                    if o0.data_ptr() != out[:, sl].data_ptr():
                        out[:, sl] = o0
                    wide[i] = (sl, entries, o_map)
        ctx.save_for_backward(*inputs)
        ctx.runs, ctx.wide, ctx.opt = runs, wide, opt
        return out

    @staticmethod
    def backward(ctx, dout):
        inputs = ctx.saved_tensors
        opt = ctx.opt
        dM = dU = None
        if ctx.fold is not None:
            M, U, S_in = ctx.fold
            # dS_in = O^Mᵀ dO on the first document part (then O^M is dropped, before the gradient buffers)
            dS_in = torch.stack([torch.zeros_like(S_in[i]) if f is None else
                                 f[2].transpose(1, 2).transpose(-1, -2) @ dout[:, f[0]].transpose(1, 2).to(opt.acc)
                                 for i, f in enumerate(ctx.wide)])
            ctx.wide = [None if f is None else f[:2] for f in ctx.wide]
            if S_in.requires_grad:  # on every rank of the group: the backward all-gather of the dS_in
                dM, dU = torch.autograd.grad(S_in, (M, U), dS_in)
            dM = torch.zeros_like(M) if dM is None else dM
            dU = torch.zeros_like(U) if dU is None else dU
        grads = [torch.zeros_like(x, dtype=opt.acc) for x in inputs]  # the one set of gradient buffers

        def part(sl, entries, dS, S_map=None):
            return delta_backward(*(x[:, sl] for x in inputs), entries, opt, [d[:, sl] for d in grads],
                                  dout[:, sl], dS, S_map)

        for i, mine in enumerate(ctx.runs):  # parts from zero; the last one's exit state is the piece's U
            for j, run in enumerate(mine):
                part(*run, dU[i] if dU is not None and j == len(mine) - 1 else None)
            if ctx.wide[i] is not None:  # the widened part: exit state [U | M] when it is the whole piece
                sl, entries = ctx.wide[i]
                part(sl, entries, None if mine else torch.cat([dU[i], dM[i]], dim=-1), S_in[i].detach())
        ctx.runs = ctx.fold = ctx.wide = None
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
            log decay, <= 0; q is scaled by Dk^-1/2 here, after the optional L2 normalisation). A ``g`` of shape
            ``[B, n, Hv, Dk]`` decays each key channel on its own: Kimi Delta Attention
            (``chunk_kimi_delta_attention``'s arguments).
        group: the SP process group (None = one device).
        cu_seqlens: global document boundaries of a packed sequence (``seqpar.models.shard_batch``), or None.
        use_qk_l2norm: transformers' ``use_qk_l2norm_in_kernel`` (eps 1e-6, as flash-linear-attention).
        chunk_size: tokens per chunk of the local pass.
        layout: ``"contiguous"`` or ``"zigzag"`` (``seqpar.sharding``; zigzag: n even, two pieces of n/2).
    """
    check_layout(layout)
    if (beta.shape != v.shape[:3] or g.shape not in (v.shape[:3], (*v.shape[:3], k.shape[-1]))
            or v.shape[2] % k.shape[2] or q.shape != k.shape):
        raise ValueError(f"gated_delta_rule: q {tuple(q.shape)}, k {tuple(k.shape)} [B, n, Hk, Dk], v {tuple(v.shape)} "
                         f"[B, n, Hv, Dv], g {tuple(g.shape)} [B, n, Hv] or [B, n, Hv, Dk] and beta "
                         f"{tuple(beta.shape)} [B, n, Hv] do not match")
    opt = DeltaOptions(acc=acc_dtype(q.dtype), rep=v.shape[2] // k.shape[2], l2norm=use_qk_l2norm,
                       scale=q.shape[-1] ** -0.5, chunk_size=chunk_size)
    return _GatedDelta.apply(q, k, v, g, beta, group, cu_seqlens, opt, layout)


def gated_delta_bytes(q, k, v, *_, group: Group = None, layout: str = "contiguous", **__) -> tuple[int, int]:
    """(forward, backward) bytes this rank sends in one call: the module docstring's formula."""
    B, _, Hv, Dv = v.shape
    Dk = k.shape[-1]
    return entry_state_bytes((B, Hv, Dk, Dv), Dk, acc_dtype(q.dtype).itemsize, group, layout)


def example_inputs(L: int, dtype: torch.dtype, gen: torch.Generator,
                   per_channel: bool = False) -> tuple[list[torch.Tensor], list, dict, int]:
    """A small call for the registry's conformance tests (``registry.MixerSpec``): GQA (2 q/k heads serve 4 value
    heads), log decays g <= 0 and β in (0, 1) as Gated DeltaNet makes them (``per_channel``: g per key channel,
    as Kimi Delta Attention); float64 draws rounded to ``dtype``."""
    B, Hk, Hv, D = 2, 2, 4, 8
    draw = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k, v = draw(B, L, Hk, D), draw(B, L, Hk, D), draw(B, L, Hv, D)
    g = -torch.rand(B, L, Hv, *((D,) if per_channel else ()), generator=gen, dtype=torch.float64)
    beta = torch.rand(B, L, Hv, generator=gen, dtype=torch.float64)
    return [t.to(dtype) for t in (q, k, v, g, beta)], [1, 1, 1, 1, 1], {}, 1


def kimi_example_inputs(L: int, dtype: torch.dtype, gen: torch.Generator) -> tuple[list[torch.Tensor], list, dict, int]:
    """``example_inputs`` with a decay per key channel (Kimi Delta Attention)."""
    return example_inputs(L, dtype, gen, per_channel=True)
