"""Sequence layouts: which tokens of a length-L sequence each of the N ranks of an SP group holds.

The layouts are a public contract (checkpoints, data loaders and every primitive rely on them):

* ``contiguous``: rank r holds tokens [r*L/N, (r+1)*L/N).
* ``zigzag``: the sequence is cut into 2N equal chunks; rank r holds chunk r followed by chunk 2N-1-r.
  Under a causal mask every rank then has the same amount of work (the load balancing of
  ring-flash-attn's zigzag and Megatron-CP).
"""

from __future__ import annotations

import itertools
from typing import Literal

import torch

from seqpar.comm import Group, all_gather, group_rank, group_size
from seqpar.kernels.host import host_read

Layout = Literal["zigzag", "contiguous"]
LAYOUTS = ("zigzag", "contiguous")


class ShardingError(ValueError):
    """A sequence that cannot be split in the requested layout."""


def chunks_per_rank(layout: str) -> int:
    if layout not in LAYOUTS:
        raise ShardingError(f"layout={layout!r} is not a layout: use one of {LAYOUTS}")
    return 2 if layout == "zigzag" else 1


def check_divisible(seq_len: int, world_size: int, layout: str, *, name: str = "seq_len") -> None:
    """Raise with the nearest valid lengths when ``seq_len`` cannot be split evenly."""
    unit = world_size * chunks_per_rank(layout)
    if seq_len % unit == 0 and seq_len > 0:
        return
    below, above = (seq_len // unit) * unit, (seq_len // unit + 1) * unit
    nearest = [n for n in (below, above) if n > 0]
    raise ShardingError(
        f"{name}={seq_len} cannot be split over {world_size} ranks in the {layout} layout: it must be a "
        f"multiple of {unit} ({'2 x ' if layout == 'zigzag' else ''}{world_size} ranks); nearest valid "
        f"lengths: {nearest} (pad the sequence or change the length)"
    )


def local_chunks(seq_len: int, world_size: int, rank: int, layout: str) -> list[tuple[int, int]]:
    """``(start, end)`` of the global token ranges rank ``rank`` holds, in local order."""
    check_divisible(seq_len, world_size, layout)
    if layout == "contiguous":
        n = seq_len // world_size
        return [(rank * n, (rank + 1) * n)]
    c = seq_len // (2 * world_size)
    return [(rank * c, (rank + 1) * c), ((2 * world_size - 1 - rank) * c, (2 * world_size - rank) * c)]


def global_index(seq_len: int, world_size: int, rank: int, layout: str, device=None) -> torch.Tensor:
    """Global positions of the local tokens, ``[seq_len / N]`` int64."""
    return torch.cat([torch.arange(s, e, device=device) for s, e in local_chunks(seq_len, world_size, rank, layout)])


def shard(
    x: torch.Tensor,
    *,
    group: Group = None,
    dim: int = 1,
    layout: Layout = "zigzag",
    rank: int | None = None,
    world_size: int | None = None,
) -> torch.Tensor:
    """This rank's piece of the full sequence ``x`` (its length along ``dim``).

    ``rank``/``world_size`` override the group's (to lay out a sequence for another rank, e.g. in tests).
    """
    n = group_size(group) if world_size is None else world_size
    r = group_rank(group) if rank is None else rank
    pieces = [x.narrow(dim, s, e - s) for s, e in local_chunks(x.shape[dim], n, r, layout)]
    return (pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)).contiguous()


def unshard(x_local: torch.Tensor, *, group: Group = None, dim: int = 1, layout: Layout = "zigzag") -> torch.Tensor:
    """Gather the whole sequence from every rank's shard (autograd-aware: gradients flow back to shards)."""
    n = group_size(group)
    if n == 1:
        return x_local
    gathered = all_gather(x_local, group=group, dim=dim)
    return reorder_to_global(gathered, n, layout, dim=dim)


def layout_order(seq_len: int, world_size: int, layout: str, device=None) -> torch.Tensor:
    """Global position of each token of the rank-major concatenation of all shards, ``[seq_len]``."""
    return torch.cat([global_index(seq_len, world_size, r, layout, device=device) for r in range(world_size)])


def reorder_to_global(gathered: torch.Tensor, world_size: int, layout: str, *, dim: int = 1) -> torch.Tensor:
    """Rank-major concatenation of shards -> sequence in global order. Zigzag by views (rank j holds chunks j
    and 2N-1-j: the first pieces in rank order, then the second ones reversed): no index tensor is built or
    copied to the device."""
    if chunks_per_rank(layout) == 1 or world_size == 1:
        return gathered
    x = gathered.movedim(dim, 0)
    m = x.reshape(world_size, 2, x.shape[0] // (2 * world_size), *x.shape[1:])
    return torch.cat([m[:, 0], m[:, 1].flip(0)]).reshape(x.shape).movedim(0, dim)


def position_ids(seq_len: int, *, group: Group = None, layout: Layout = "zigzag", device=None) -> torch.Tensor:
    """Global position ids ``[seq_len / N]`` of this rank's tokens, for RoPE on the local shard."""
    return global_index(seq_len, group_size(group), group_rank(group), layout, device=device)


def host_bounds(cu_seqlens: torch.Tensor) -> tuple[int, ...]:
    """``cu_seqlens`` as host ints, read from the device once per tensor (a host sync on CUDA).

    Every layer of a model forward passes the same ``cu_seqlens`` tensor object, so the ints are memoised on
    it, keyed by its version counter (an in-place change is read again): the plans of every layer after the
    first are cut with no device read. ``shard_batch`` primes the memo, so a patched forward reads nothing.
    """
    memo = getattr(cu_seqlens, "_seqpar_bounds", None)
    version = _version(cu_seqlens)
    if memo is not None and version is not None and memo[0] == version:
        return memo[1]
    bounds = tuple(int(c) for c in host_read(cu_seqlens.reshape(-1), "cu_seqlens"))
    remember_bounds(cu_seqlens, bounds)
    return bounds


def remember_bounds(cu_seqlens: torch.Tensor, bounds: tuple[int, ...]) -> torch.Tensor:
    """Attach known host ints to ``cu_seqlens`` (what ``host_bounds`` would read); returns the tensor."""
    version = _version(cu_seqlens)
    if version is not None:
        cu_seqlens._seqpar_bounds = (version, tuple(bounds))
    return cu_seqlens


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference-mode tensors have no version counter: never memoised
        return None


def document_bounds(cu_seqlens: torch.Tensor, seq_len: int) -> tuple[int, ...]:
    """Validated global document boundaries as host ints (the fused kernels' plans are cut on the host from
    them; read from the device once per tensor, ``host_bounds``).

    The one rule for packed documents everywhere (``shard_batch``, the primitives, the patched model):
    ``cu_seqlens`` is a 1-D integer tensor ``[0, l1, l1 + l2, ..., seq_len]`` of global boundaries, the same
    on every rank; it is non-decreasing, so empty documents (a repeated boundary) are allowed and hold no token.
    """
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point():
        raise ValueError(f"cu_seqlens={cu_seqlens!r} must be a 1-D integer tensor [num_docs + 1] of global document "
                         "boundaries, e.g. torch.tensor([0, 100, 250, L]) (seq_lens [100, 150, ...] -> cumsum)")
    cu = host_bounds(cu_seqlens)
    if len(cu) < 2 or cu[0] != 0 or cu[-1] != seq_len or any(b < a for a, b in itertools.pairwise(cu)):
        raise ValueError(f"cu_seqlens={list(cu)} must start at 0 and end at the global sequence length {seq_len}, "
                         f"non-decreasing from 0 to {seq_len} (an empty document repeats a boundary): pass the "
                         "cumulative document lengths of the whole packed sequence")
    return cu


def document_ids(cu_seqlens: torch.Tensor, seq_len: int, positions: torch.Tensor | None = None,
                 device=None) -> torch.Tensor:
    """Document id of each global position (default: every position ``0..seq_len-1``), ``[len(positions)]``,
    under ``document_bounds``' rule."""
    document_bounds(cu_seqlens, seq_len)  # validates (host ints, read once per tensor)
    device = cu_seqlens.device if device is None else device
    positions = torch.arange(seq_len, device=device) if positions is None else positions.to(device)
    # the validated tensor itself (no tensor made from the host ints: a blocking copy to a GPU)
    bounds = cu_seqlens.to(device=device, dtype=torch.int64)
    return torch.searchsorted(bounds, positions, right=True) - 1


def local_documents(cu_seqlens: torch.Tensor | None, n: int, world_size: int, rank: int) -> list[tuple[int, int, int]]:
    """The pieces of documents on a contiguous shard of ``n`` tokens: ``(start, end, doc_start)`` with local
    ``[start, end)`` and the global position where that piece's document begins (<= the shard's first global
    position ``rank * n`` for a piece that continues a document of earlier ranks). Without ``cu_seqlens`` the
    whole sequence is one document. Used by the recurrent layers (``seqpar.attention.gated_delta``,
    ``seqpar.attention.short_conv``): their state and history reset at every document start."""
    offset, total = rank * n, n * world_size
    bounds = (0, total) if cu_seqlens is None else document_bounds(cu_seqlens, total)
    pieces = []
    for a, b in itertools.pairwise(bounds):
        lo, hi = max(a, offset), min(b, offset + n)
        if lo < hi:
            pieces.append((lo - offset, hi - offset, a))
    return pieces
