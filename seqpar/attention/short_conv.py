"""Sequence-parallel short causal convolution (the depthwise conv1d before Gated DeltaNet's q, k, v, and
Mamba's), exact across shard edges by a halo of the previous rank's last K-1 inputs.

    y_t = act(b + Σ_{j<K} w_j x_{t-K+1+j})        (depthwise; x_s = 0 before the document of t)

On a contiguous shard the first K-1 outputs read K-1 inputs of the previous rank: one all-gather of every
rank's last K-1 inputs gives each rank its halo (tokens of an earlier document are zeroed, so document
boundaries cut it; rank 0 gets zeros). Backward returns the halo's gradient to its owner, one all-gather of
the same size, which rank r adds to its last K-1 inputs' gradient: the boundary gradient that
flash-linear-attention's conv drops under context parallelism (DeepSpeed PR 8114 works around it). A
gather rather than a send to the neighbour: the message is K-1 tokens, and a collective cannot leave a send
pending on gloo when a rank fails.

Shapes: ``x [B, C, n]`` (transformers' channels-first layout), ``weight [C, K]``, ``bias [C]`` or None;
output ``[B, C, n]`` in x's dtype. Needs n >= K-1 on an SP group.

Bytes per call, per rank: forward (N-1)·B·C·(K-1)·itemsize sent and received, backward the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from seqpar.comm import Group, all_gather_tensor, group_rank, group_size
from seqpar.sharding import local_documents


class _Halo(torch.autograd.Function):
    """The previous rank's tail (``[B, C, K-1]``; zeros on rank 0); backward sends its gradient back."""

    @staticmethod
    def forward(ctx, tail, group):
        N, rank = group_size(group), group_rank(group)
        tails = all_gather_tensor(tail.contiguous(), group).view(N, *tail.shape)
        ctx.group = group
        return tails[rank - 1].clone() if rank > 0 else torch.zeros_like(tail)

    @staticmethod
    def backward(ctx, d_halo):
        N, rank = group_size(ctx.group), group_rank(ctx.group)
        grads = all_gather_tensor(d_halo.contiguous(), ctx.group).view(N, *d_halo.shape)
        return (grads[rank + 1].clone() if rank < N - 1 else torch.zeros_like(d_halo)), None


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    *,
    group: Group = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Depthwise causal conv over the whole (packed) sequence from this rank's contiguous shard.

    ``activation``: None or ``"silu"``/``"swish"`` (transformers' ``causal_conv1d_fn`` argument)."""
    N, rank, n = group_size(group), group_rank(group), x.shape[-1]
    K = weight.shape[-1]
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"causal_conv1d: activation={activation!r} is not supported (None, 'silu' or 'swish')")
    if N > 1 and n < K - 1:
        raise ValueError(f"causal_conv1d: a shard of {n} tokens is shorter than the conv's {K - 1}-token history: use "
                         f"at least {K - 1} tokens per rank (sequence length >= {(K - 1) * N})")
    dtype, xw = x.dtype, x.to(weight.dtype)
    halo = _Halo.apply(xw[..., n - (K - 1):], group) if N > 1 and K > 1 else xw.new_zeros(*x.shape[:2], K - 1)
    w = weight.unsqueeze(1)
    outs = []
    for start, end, doc_start in local_documents(cu_seqlens, n, N, rank):
        left = xw.new_zeros(*x.shape[:2], K - 1)
        if start == 0:  # the halo's tokens of this piece's document (none if it starts here): always in the
            # graph, so every rank runs the halo's backward collective
            left = halo * (torch.arange(rank * n - (K - 1), rank * n, device=x.device) >= doc_start)
        y = F.conv1d(torch.cat([left, xw[..., start:end]], dim=-1), w, bias, groups=x.shape[1])
        outs.append(y)
    y = torch.cat(outs, dim=-1)
    return (F.silu(y) if activation is not None else y).to(dtype)


def causal_conv1d_bytes(x: torch.Tensor, weight: torch.Tensor, *, group: Group = None, **_) -> tuple[int, int]:
    """(forward, backward) bytes this rank sends in one call."""
    B, C, _ = x.shape
    b = (group_size(group) - 1) * B * C * (weight.shape[-1] - 1) * weight.element_size()
    return b, b
