"""Sequence-parallel short causal convolution (the depthwise conv1d before Gated DeltaNet's q, k, v, and
Mamba's), exact across shard edges by a halo of the K-1 inputs before each piece.

    y_t = act(b + Σ_{j<K} w_j x_{t-K+1+j})        (depthwise; x_s = 0 before the document of t)

Contiguous layout: the first K-1 outputs read K-1 inputs of the previous rank: each rank sends its last
K-1 inputs one hop along an open ring (``seqpar.comm.RingComm(wrap=False)``, S2-Attn's halo chain; rank 0
receives nothing and uses zeros).

Zigzag layout (rank r holds chunks r and 2N-1-r, ``seqpar.sharding``): each piece needs the last K-1 inputs
of the chunk before it. Piece r's is the tail of chunk r-1, rank r-1's first piece (zeros for r = 0); piece
2N-1-r's is the tail of chunk 2N-2-r, rank r+1's second piece, or for r = N-1 this rank's own first piece
(chunk N-1, no message). So each rank sends its first piece's tail to r+1 and its second piece's tail to r-1,
in one batch of point-to-point operations.

Tokens of an earlier document are zeroed, so document boundaries cut the halo. Backward sends each halo's
gradient back to its owner (the reverse hops), which adds it to its tail inputs' gradient: the boundary
gradient that flash-linear-attention's conv drops under context parallelism (DeepSpeed PR 8114 works around it).

Shapes: ``x [B, C, n]`` (transformers' channels-first layout), ``weight [C, K]``, ``bias [C]`` or None;
output ``[B, C, n]`` in x's dtype. Needs n >= K-1 (contiguous) or n/2 >= K-1 (zigzag) on an SP group.

Bytes per call, per rank (op ``"halo"``), with h = B·C·(K-1)·itemsize (itemsize of the conv weight's dtype):
contiguous, forward h sent to r+1 (not by the last rank), backward h sent to r-1 (not by rank 0); zigzag,
forward and backward h to each neighbour, r+1 (not by the last rank) and r-1 (not by rank 0).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from seqpar.attention.affine_maps import check_layout, shard_pieces
from seqpar.comm import Group, RingComm, global_rank, group_rank, group_size, nbytes, record_bytes


class _Halo(torch.autograd.Function):
    """The previous rank's last K-1 inputs (``[B, C, K-1]``; zeros on rank 0); backward sends their gradient
    back to the owner."""

    @staticmethod
    def forward(ctx, tail, group):
        ctx.group = group
        ring = RingComm(group, wrap=False, op="halo")
        halo = ring.send_recv(tail)
        ring.wait()
        return torch.zeros_like(tail) if halo is None else halo

    @staticmethod
    def backward(ctx, d_halo):
        ring = RingComm(ctx.group, reverse=True, wrap=False, op="halo")
        back = ring.send_recv(d_halo)
        ring.wait()
        return (torch.zeros_like(d_halo) if back is None else back), None


def _swap(group: Group, up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Send ``up`` to rank r+1 and ``down`` to rank r-1 (where they exist) in one batch; returns what r-1 sent
    up and what r+1 sent down (None where that neighbour does not exist)."""
    N, r = group_size(group), group_rank(group)
    ops, sent, got = [], 0, [None, None]
    if r + 1 < N:
        got[1] = torch.empty_like(up, memory_format=torch.contiguous_format)  # gloo: dense receive buffers
        ops += [dist.P2POp(dist.isend, up.contiguous(), global_rank(group, r + 1), group),
                dist.P2POp(dist.irecv, got[1], global_rank(group, r + 1), group)]
        sent += nbytes(up)
    if r > 0:
        got[0] = torch.empty_like(down, memory_format=torch.contiguous_format)
        ops += [dist.P2POp(dist.isend, down.contiguous(), global_rank(group, r - 1), group),
                dist.P2POp(dist.irecv, got[0], global_rank(group, r - 1), group)]
        sent += nbytes(down)
    if ops:
        record_bytes("halo", sent, sent)
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    return got[0], got[1]


class _ZigzagHalo(torch.autograd.Function):
    """The K-1 inputs before each of this rank's two zigzag pieces, from the tails ``[B, C, K-1]`` of its
    pieces: (tail of chunk r-1 from rank r-1, zeros on rank 0; tail of chunk 2N-2-r from rank r+1, or this
    rank's own first tail on the last rank). Backward returns each halo's gradient to its owner."""

    @staticmethod
    def forward(ctx, tail0, tail1, group):
        ctx.group = group
        last = group_rank(group) == group_size(group) - 1
        from_below, from_above = _swap(group, tail0, tail1)  # first tail goes up, second tail goes down
        halo0 = torch.zeros_like(tail0) if from_below is None else from_below
        halo1 = tail0.clone() if last else from_above
        return halo0, halo1

    @staticmethod
    def backward(ctx, d0, d1):
        last = group_rank(ctx.group) == group_size(ctx.group) - 1
        from_below, from_above = _swap(ctx.group, d1, d0)  # the reverse hops: d1 to r+1, d0 to r-1
        d_tail0 = d1 if last else from_above
        d_tail1 = torch.zeros_like(d1) if from_below is None else from_below
        return d_tail0, d_tail1, None


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    *,
    group: Group = None,
    cu_seqlens: torch.Tensor | None = None,
    layout: str = "contiguous",
) -> torch.Tensor:
    """Depthwise causal conv over the whole (packed) sequence from this rank's shard.

    ``activation``: None or ``"silu"``/``"swish"`` (transformers' ``causal_conv1d_fn`` argument); ``layout``:
    ``"contiguous"`` or ``"zigzag"`` (``seqpar.sharding``)."""
    check_layout(layout)
    N, rank, n = group_size(group), group_rank(group), x.shape[-1]
    K = weight.shape[-1]
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"causal_conv1d: activation={activation!r} is not supported (None, 'silu' or 'swish')")
    pieces = shard_pieces(n, N, rank, layout, cu_seqlens)
    size = pieces[0].end - pieces[0].start
    if N > 1 and size < K - 1:
        per = "rank" if len(pieces) == 1 else "zigzag chunk (2 per rank)"
        raise ValueError(f"causal_conv1d: a shard piece of {size} tokens is shorter than the conv's {K - 1}-token "
                         f"history: use at least {K - 1} tokens per {per} (sequence length >= "
                         f"{(K - 1) * N * len(pieces)})")
    dtype, xw = x.dtype, x.to(weight.dtype)
    if N == 1 or K == 1:
        halos = [xw.new_zeros(*x.shape[:2], K - 1)] * len(pieces)
    elif len(pieces) == 1:
        halos = [_Halo.apply(xw[..., n - (K - 1):], group)]
    else:
        halos = list(_ZigzagHalo.apply(*(xw[..., p.end - (K - 1):p.end] for p in pieces), group))
    w = weight.unsqueeze(1)
    outs = []
    for pc, halo in zip(pieces, halos):
        for start, end, doc_start in pc.docs:
            left = xw.new_zeros(*x.shape[:2], K - 1)
            if start == pc.start:  # the halo's tokens of this part's document (none if it starts here): always
                # in the graph, so every rank runs the halo's backward exchange
                left = halo * (torch.arange(pc.origin - (K - 1), pc.origin, device=x.device) >= doc_start)
            outs.append(F.conv1d(torch.cat([left, xw[..., start:end]], dim=-1), w, bias, groups=x.shape[1]))
    y = torch.cat(outs, dim=-1)
    return (F.silu(y) if activation is not None else y).to(dtype)


def causal_conv1d_bytes(x: torch.Tensor, weight: torch.Tensor, *_, group: Group = None, layout: str = "contiguous",
                        **__) -> tuple[int, int]:
    """(forward, backward) bytes this rank sends in one call: the module docstring's formula."""
    N, rank = group_size(group), group_rank(group)
    h = x.shape[0] * x.shape[1] * (weight.shape[-1] - 1) * weight.element_size()
    up, down = (h if rank < N - 1 else 0), (h if rank > 0 else 0)
    if layout == "zigzag":
        return up + down, up + down
    return up, down


def example_inputs(L: int, dtype: torch.dtype, gen: torch.Generator) -> tuple[list[torch.Tensor], list, dict, int]:
    """A small call for the registry's conformance tests (``registry.MixerSpec``): ``x [2, 12, L]`` (sequence
    last, as transformers' ``causal_conv1d_fn``), a kernel of 4 and a bias (replicated parameters), SiLU."""
    draw = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    return [draw(2, 12, L), draw(12, 4), draw(12)], [2, None, None], {"activation": "silu"}, 2
