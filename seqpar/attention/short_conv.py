"""Sequence-parallel short causal convolution (the depthwise conv1d before Gated DeltaNet's q, k, v, and
Mamba's), exact across shard edges by a halo of the previous rank's last K-1 inputs.

    y_t = act(b + Σ_{j<K} w_j x_{t-K+1+j})        (depthwise; x_s = 0 before the document of t)

On a contiguous shard the first K-1 outputs read K-1 inputs of the previous rank: each rank sends its last
K-1 inputs one hop along an open ring (``seqpar.comm.RingComm(wrap=False)``, S2-Attn's halo chain; rank 0
receives nothing and uses zeros); tokens of an earlier document are zeroed, so document boundaries cut it.
Backward sends the halo's gradient one hop back to its owner, which adds it to its last K-1 inputs'
gradient: the boundary gradient that flash-linear-attention's conv drops under context parallelism
(DeepSpeed PR 8114 works around it).

Shapes: ``x [B, C, n]`` (transformers' channels-first layout), ``weight [C, K]``, ``bias [C]`` or None;
output ``[B, C, n]`` in x's dtype. Needs n >= K-1 on an SP group.

Bytes per call, per rank (op ``"halo"``): forward B·C·(K-1)·itemsize sent to r+1 (not by the last rank),
backward the same sent to r-1 (not by rank 0); itemsize of the conv weight's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from seqpar.comm import Group, RingComm, group_rank, group_size
from seqpar.sharding import local_documents


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


def causal_conv1d_bytes(x: torch.Tensor, weight: torch.Tensor, *_, group: Group = None, **__) -> tuple[int, int]:
    """(forward, backward) bytes this rank sends in one call: the module docstring's formula."""
    N, rank = group_size(group), group_rank(group)
    h = x.shape[0] * x.shape[1] * (weight.shape[-1] - 1) * weight.element_size()
    return (h if rank < N - 1 else 0), (h if rank > 0 else 0)


def example_inputs(L: int, dtype: torch.dtype, gen: torch.Generator) -> tuple[list[torch.Tensor], list, dict, int]:
    """A small call for the registry's conformance tests (``registry.MixerSpec``): ``x [2, 12, L]`` (sequence
    last, as transformers' ``causal_conv1d_fn``), a kernel of 4 and a bias (replicated parameters), SiLU."""
    draw = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    return [draw(2, 12, L), draw(12, 4), draw(12)], [2, None, None], {"activation": "silu"}, 2
