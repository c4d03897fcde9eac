"""Input validation shared by the softmax primitives (ring, RSA, Ulysses, USP, all-gather).

Every check runs before any K/V is exchanged and raises the same error on every rank: the shapes and dtypes
are first compared across the group in one collective (``comm.check_same_shapes``), so everything checked
after that is identical on every rank and a bad call can never leave one rank waiting in a collective.
"""

from __future__ import annotations

import math

import torch

from seqpar.comm import Group, check_same_shapes, group_size
from seqpar.sharding import check_divisible, chunks_per_rank


def check_options(*, layout: str, causal: object, softmax_scale: float | None) -> None:
    """Arguments that are the same on every rank."""
    chunks_per_rank(layout)  # raises ShardingError naming the valid layouts
    if not isinstance(causal, bool):
        raise ValueError(f"causal={causal!r} must be True or False (sequence-parallel masks are global)")
    ok = isinstance(softmax_scale, (int, float)) and math.isfinite(softmax_scale) and softmax_scale > 0
    if softmax_scale is not None and not ok:
        raise ValueError(f"softmax_scale={softmax_scale!r} must be a positive finite float (None: head_dim ** -0.5)")


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group: Group, layout: str,
              validate: bool = True) -> None:
    """``q [B, L/N, H, D]``, ``k, v [B, L/N, Hkv, D]`` alike on every rank, Hkv dividing H, and a sequence
    length (local length x N) that ``layout`` can split. ``validate=False`` skips the cross-rank collective
    (a caller that already checked these shapes in this forward, e.g. every layer after the first)."""
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor [B, L/N, heads, D], got {type(t).__name__}")
    if validate:
        check_same_shapes(group=group, q=q, k=k, v=v)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must all be 4-D "
                         "[B, L/N, heads, D]: reshape [B, L, H*D] activations to [B, L, H, D]")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: batch, local length "
                         "and head_dim must match and k, v must have one shape (shard q, k and v alike)")
    heads, kv_heads = q.shape[2], k.shape[2]
    if heads % kv_heads:
        raise ValueError(f"kv heads={kv_heads}: k.shape[2]={kv_heads} must divide the query heads={heads} "
                         "(q.shape[2]) for GQA; use a kv head count that divides the head count")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(f"q, k, v dtypes {q.dtype}, {k.dtype}, {v.dtype} must be one floating dtype: "
                         "cast them to one")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v live on {q.device}, {k.device}, {v.device}: move them to one device")
    world = group_size(group)
    name = f"sequence length (q.shape[1]={q.shape[1]} x {world} ranks)"
    check_divisible(q.shape[1] * world, world, layout, name=name)
