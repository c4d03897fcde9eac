"""LASP-2 generalised: the entry state of each rank from ONE all-gather of per-rank affine maps.

Every recurrent layer seqpar shards updates a state affinely, S_t = A_t S_{t-1} + B_t (Lightning Attention
A_t = λ I; Gated DeltaNet A_t = α_t (I - β_t k_t k_tᵀ), B_t = β_t k_t v_tᵀ), so a rank's whole shard is one map
S_out = M_r S_in + U_r (``M_r [B, H, Dk, Dk]``, ``U_r [B, H, Dk, Dv]``), whatever its length. Each rank
computes its map locally, the maps are all-gathered once, and rank r folds its predecessors' in order
(Horner, in the maps' dtype: float32, or float64 for float64 models):

    S_in(0) = 0,    S_in(j+1) = M_j S_in(j) + U_j

Backward mirrors it: the entry states' gradients dS_r are all-gathered once (the size of U, not of the
maps), and with G_r = dS_r + M_rᵀ G_{r+1} (the total gradient of S_in(r), G_{N-1} = dS_{N-1}), rank j's own
map gets dU_j = G_{j+1}, dM_j = G_{j+1} S_in(j)ᵀ; no other collective.

Bytes per call, per rank: forward (N-1)·B·H·Dk·(Dk+Dv)·itemsize sent and received, backward
(N-1)·B·H·Dk·Dv·itemsize; independent of the sequence length.
"""

from __future__ import annotations

import torch

from seqpar.comm import Group, all_gather_tensor, group_rank, group_size


def _fold(M_all: torch.Tensor, U_all: torch.Tensor, rank: int) -> torch.Tensor:
    S = torch.zeros_like(U_all[0])
    for j in range(rank):
        S = M_all[j] @ S + U_all[j]
    return S


class _EntryState(torch.autograd.Function):
    @staticmethod
    def forward(ctx, M, U, group):
        N, rank, dk = group_size(group), group_rank(group), M.shape[-1]
        maps = all_gather_tensor(torch.cat([M, U], dim=-1), group).view(N, *U.shape[:-1], -1)
        M_all, U_all = maps[..., :dk], maps[..., dk:]
        S = _fold(M_all, U_all, rank)
        ctx.save_for_backward(M_all, S)
        ctx.group = group
        return S

    @staticmethod
    def backward(ctx, dS):
        M_all, S = ctx.saved_tensors
        group = ctx.group
        N, rank = group_size(group), group_rank(group)
        dS_all = all_gather_tensor(dS.contiguous(), group).view(N, *dS.shape)
        G = torch.zeros_like(dS)
        for j in range(N - 1, rank, -1):  # G_{rank+1} = dS_{rank+1} + M_{rank+1}ᵀ (dS_{rank+2} + ...)
            G = dS_all[j] + M_all[j].transpose(-1, -2) @ G
        return G @ S.transpose(-1, -2), G, None


def entry_state(M: torch.Tensor, U: torch.Tensor, group: Group) -> torch.Tensor:
    """This rank's entry state S_in from every rank's map ``(M [..., Dk, Dk], U [..., Dk, Dv])`` (differentiable).

    Rank 0 gets zeros. On one device (``group_size(group) == 1``) no map is gathered and the result is 0. The
    backward all-gather runs on every rank whose S_in is differentiated (``seqpar.attention.gated_delta``
    differentiates it on every rank, also where no output reads it, so no rank waits alone in it).
    """
    if group_size(group) == 1:
        return torch.zeros_like(U)
    return _EntryState.apply(M, U, group)


def entry_state_bytes(shape: tuple[int, ...], dk: int, itemsize: int, group: Group) -> tuple[int, int]:
    """(forward, backward) bytes this rank sends for maps with U of ``shape`` ``[B, H, Dk, Dv]``."""
    n = group_size(group) - 1
    B, H, _, dv = shape
    return n * B * H * dk * (dk + dv) * itemsize, n * B * H * dk * dv * itemsize
