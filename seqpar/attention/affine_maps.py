"""LASP-2 generalised: the entry state of each shard piece from ONE all-gather of per-piece affine maps.

Every recurrent layer seqpar shards updates a state affinely, S_t = A_t S_{t-1} + B_t (Lightning Attention
A_t = λ I; Gated DeltaNet A_t = α_t (I - β_t k_t k_tᵀ), B_t = β_t k_t v_tᵀ), so a piece of the sequence is one
map S_out = M S_in + U (``M [B, H, Dk, Dk]``, ``U [B, H, Dk, Dv]``), whatever its length. The sequence is cut
into C equal chunks in global order, each held by one rank as one of its P pieces (``shard_pieces``):

* ``contiguous``: P = 1, C = N; rank r holds chunk r.
* ``zigzag``: P = 2, C = 2N; rank r holds chunks r and 2N-1-r (``seqpar.sharding``), in that local order.

Each rank computes the maps of its pieces locally, ``[P, ...]``; the maps are all-gathered once (rank-major,
then put in global chunk order) and every piece's entry state is the fold of all chunks before its own
(Horner, in the maps' dtype: float32, or float64 for float64 models):

    S_in(0) = 0,    S_in(c+1) = M_c S_in(c) + U_c

In the zigzag layout the second piece's fold runs through the rank's own first piece (chunk r < 2N-1-r), taken
from the gathered maps like any other. Backward mirrors it: the pieces' entry-state gradients dS_c are
all-gathered once (the size of U, not of the maps), and with G_c = dS_c + M_cᵀ G_{c+1} (the total gradient of
S_in(c), G_C = 0), the map of chunk c gets dU_c = G_{c+1}, dM_c = G_{c+1} S_in(c)ᵀ; no other collective.

Bytes per call, per rank: forward P·(N-1)·B·H·Dk·(Dk+Dv)·itemsize sent and received, backward
P·(N-1)·B·H·Dk·Dv·itemsize (P = 1 contiguous, 2 zigzag); independent of the sequence length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from seqpar.attention.checks import check_options
from seqpar.comm import Group, all_gather_tensor, group_rank, group_size
from seqpar.sharding import local_documents, reorder_to_global


def check_layout(layout: str) -> None:
    """Refuse a layout that is not one (the attentions' option check; the same on every rank)."""
    check_options(layout=layout, causal=True, softmax_scale=None)


def pieces_per_rank(layout: str, world: int) -> int:
    """P: 2 in the zigzag layout over several ranks, else 1 (zigzag on one rank is the whole sequence in order)."""
    return 2 if layout == "zigzag" and world > 1 else 1


def chunks_of(rank: int, world: int, layout: str) -> tuple[int, ...]:
    """Global chunk index of each of ``rank``'s pieces, in local order (of C = P·N chunks)."""
    return (rank, 2 * world - 1 - rank) if pieces_per_rank(layout, world) == 2 else (rank,)


def global_order(world: int, layout: str) -> list[int]:
    """For each global chunk c, its index in the rank-major gathered list of all ranks' pieces."""
    P = pieces_per_rank(layout, world)
    where = {c: j * P + p for j in range(world) for p, c in enumerate(chunks_of(j, world, layout))}
    return [where[c] for c in range(P * world)]


@dataclass(frozen=True)
class Piece:
    """One of a rank's pieces: local tokens ``[start, end)`` of the shard, global chunk ``chunk`` whose first
    token is at global position ``origin``, and its document pieces ``docs``: ``(start, end, doc_start)``,
    local to the shard, with the global position where each one's document begins."""

    start: int
    end: int
    chunk: int
    origin: int
    docs: tuple[tuple[int, int, int], ...]

    @property
    def cont(self) -> bool:
        """Its first document began before the piece: that part runs from the piece's entry state."""
        return self.docs[0][2] < self.origin


def shard_pieces(n: int, world: int, rank: int, layout: str, cu_seqlens: torch.Tensor | None = None) -> list[Piece]:
    """The P pieces of a shard of ``n`` tokens (P = 2: zigzag over several ranks, halves of n/2 tokens), each with
    its document pieces under ``cu_seqlens`` (global boundaries; None: one document). A chunk of ``size``
    tokens among C is cut as a contiguous shard of rank ``chunk`` of C (``seqpar.sharding.local_documents``)."""
    P = pieces_per_rank(layout, world)
    if n % P:
        raise ValueError(f"a zigzag shard of {n} tokens does not split into two equal chunks: the sequence length "
                         f"must be a multiple of {2 * world} (2 x {world} ranks)")
    size = n // P
    out = []
    for p, c in enumerate(chunks_of(rank, world, layout)):
        docs = tuple((p * size + a, p * size + b, d) for a, b, d in local_documents(cu_seqlens, size, P * world, c))
        out.append(Piece(p * size, (p + 1) * size, c, c * size, docs))
    return out


def _fold(M_all: torch.Tensor, U_all: torch.Tensor, chunks: tuple[int, ...]) -> torch.Tensor:
    """The entry states ``[P, ...]`` of ``chunks``, by Horner over the maps in global chunk order."""
    S, entries = torch.zeros_like(U_all[0]), {}
    for c in range(max(chunks) + 1):
        entries[c] = S
        if c < max(chunks):
            S = M_all[c] @ S + U_all[c]
    return torch.stack([entries[c] for c in chunks])


class _EntryStates(torch.autograd.Function):
    @staticmethod
    def forward(ctx, M, U, group, layout):
        N, rank, dk = group_size(group), group_rank(group), M.shape[-1]
        maps = all_gather_tensor(torch.cat([M, U], dim=-1), group)  # [N·P, ...], rank-major
        chunks_total = N * pieces_per_rank(layout, N)
        maps = reorder_to_global(maps.view(chunks_total, *U.shape[1:-1], -1), N, layout, dim=0)  # global order
        M_all, U_all = maps[..., :dk], maps[..., dk:]
        chunks = chunks_of(rank, N, layout)
        S = _fold(M_all, U_all, chunks)
        ctx.save_for_backward(M_all, S)
        ctx.group, ctx.layout, ctx.chunks = group, layout, chunks
        return S

    @staticmethod
    def backward(ctx, dS):
        M_all, S = ctx.saved_tensors
        N = group_size(ctx.group)
        chunks_total = N * pieces_per_rank(ctx.layout, N)
        dS_all = reorder_to_global(all_gather_tensor(dS.contiguous(), ctx.group).view(chunks_total, *dS.shape[1:]),
                                   N, ctx.layout, dim=0)
        G, dM, dU = torch.zeros_like(dS[0]), {}, {}
        for c in range(chunks_total - 1, min(ctx.chunks) - 1, -1):  # G = G_{c+1}, the total gradient of S_in(c+1)
            if c in ctx.chunks:
                i = ctx.chunks.index(c)
                dU[c], dM[c] = G, G @ S[i].transpose(-1, -2)
            G = dS_all[c] + M_all[c].transpose(-1, -2) @ G
        return torch.stack([dM[c] for c in ctx.chunks]), torch.stack([dU[c] for c in ctx.chunks]), None, None


def entry_states(M: torch.Tensor, U: torch.Tensor, group: Group, layout: str = "contiguous") -> torch.Tensor:
    """The entry state S_in ``[P, ..., Dk, Dv]`` of each of this rank's pieces from every piece's map (``M [P, ...,
    Dk, Dk]``, ``U [P, ..., Dk, Dv]``, local piece order; differentiable).

    Chunk 0 gets zeros. On one device (``group_size(group) == 1``) no map is gathered and the result is 0. The
    backward all-gather runs on every rank whose S_in is differentiated (``seqpar.attention.gated_delta``
    differentiates it on every rank, also where no output reads it, so no rank waits alone in it).
    """
    if group_size(group) == 1:
        return torch.zeros_like(U)
    return _EntryStates.apply(M, U, group, layout)


def entry_state(M: torch.Tensor, U: torch.Tensor, group: Group) -> torch.Tensor:
    """``entry_states`` of a contiguous shard (one piece): ``M [..., Dk, Dk]``, ``U [..., Dk, Dv]`` -> S_in."""
    return entry_states(M[None], U[None], group)[0]


def entry_state_bytes(shape: tuple[int, ...], dk: int, itemsize: int, group: Group,
                      layout: str = "contiguous") -> tuple[int, int]:
    """(forward, backward) bytes this rank sends for maps with U of ``shape`` ``[B, H, Dk, Dv]`` per piece."""
    n = (group_size(group) - 1) * pieces_per_rank(layout, group_size(group))
    B, H, _, dv = shape
    return n * B * H * dk * (dk + dv) * itemsize, n * B * H * dk * dv * itemsize
