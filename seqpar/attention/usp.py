"""USP: unified (2-D) sequence parallelism, Ulysses over one sub-group and ring attention over the other
(Fang & Zhao 2024, "USP: A Unified Sequence Parallelism Approach for Long Context Generative AI",
arXiv:2405.07719; the yunchang library).

The N = u x r ranks of ``group`` form a grid. Group rank ``g = i*u + j``: ring index i, Ulysses index j.

* Ulysses sub-groups are CONSECUTIVE ranks {i*u, ..., i*u + u-1} (put them inside a node: all-to-all is
  the bandwidth-hungry part); ring sub-groups are STRIDED {j, j+u, ..., j+(r-1)u}.
* The input is sharded over the whole ``group`` in ``layout`` (``seqpar.sharding.shard`` with N ranks),
  exactly as for every other primitive, and the output comes back the same way.

Why that composes exactly: the all-to-all over Ulysses group i gathers the shards of ranks i*u..i*u+u-1.
In the contiguous layout those are tokens [i L/r, (i+1) L/r): ring rank i's contiguous shard over r ranks.
In the zigzag layout (2N chunks, rank g holds chunks g and 2N-1-g) they are chunks [iu, (i+1)u) and
[2N-(i+1)u, 2N-iu): precisely ring rank i's two zigzag chunks over r ranks, only interleaved by rank. One
local permutation puts them in ring-zigzag order; its inverse is applied before the all-to-all back.

    [B, L/N, H, D] --a2a(u)--> [B, L/r, H/u, D] --permute--> ring_attention(r) --unpermute--> --a2a(u)-->

GQA: kv heads are replicated ``rep = u / gcd(u, Hkv)`` times for the Ulysses split (see ulysses.py).

Bytes per call, per rank (``b_q``, ``b_kv`` = bytes of the local q and k; itemsize s; acc = 4, 8 for float64):

    forward:  (u-1)/u (2 b_q + 2 rep b_kv)                     all-to-all, Ulysses sub-group
              + (r-1) 2 rep b_kv                               ring_attention's K/V ring
    backward: (u-1)/u (2 b_q + 2 rep b_kv)
              + (r-1) 2 rep b_kv + [r > 1] r 2 rep b_kv acc / s    ring_attention's K/V and dK/dV rings

The ring terms are ``ring_bytes`` of the ring's shard ``[B, L/r, H/u, D]`` (``rep Hkv/u`` kv heads) over r ranks.

Sliding window (``window=w``, transformers' ``p - w < k <= p``): the permuted ring shard keeps the global
positions of the ring's layout (the composition argument above), so the window is passed to ``ring_attention``
as is; its ring terms become ``ring_bytes(..., window=w)`` (the halo of w - 1 keys, see ``window.py``); the
all-to-all terms are unchanged.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist

from seqpar.attention.checks import check_options, check_qkv, check_sinks, effective_window
from seqpar.attention.ring import ring_attention, ring_bytes
from seqpar.attention.ulysses import head_share, heads_to_seq, seq_to_heads
from seqpar.comm import Group, check_same_shape, global_rank, group_rank, group_size
from seqpar.kernels.host import count, fake_backend
from seqpar.sharding import Layout, local_chunks


def make_usp_groups(group: Group, ulysses_degree: int) -> tuple[Group, Group]:
    """Create the Ulysses and ring sub-groups of ``group`` (collective over the WORLD: call it on every rank,
    once, and keep the result). Returns ``(ulysses_group, ring_group)`` of this rank.

    Rank layout (group ranks): Ulysses groups {i*u + j : j < u} (consecutive), ring groups {i*u + j : i < r}
    (strided), with u = ``ulysses_degree`` and r = N / u. When ``group`` is one of several SP groups (DP x SP),
    every world rank passes its own SP group and the sub-groups of all of them are created.
    """
    n = group_size(group)
    if not isinstance(ulysses_degree, int) or ulysses_degree < 1 or n % ulysses_degree:
        raise ValueError(
            f"ulysses_degree={ulysses_degree!r} must divide the SP group size N={n}: use one of "
            f"{[d for d in range(1, n + 1) if n % d == 0]} (the ring degree is N / ulysses_degree)"
        )
    if group is None:
        return None, None
    mine = (tuple(global_rank(group, i) for i in range(n)), ulysses_degree)
    everyone: list[tuple | None] = [None] * dist.get_world_size()
    count("subgroups")  # a host read, once per (group, degree): setup, not a forward
    if fake_backend(group):  # a simulated world (seqpar.fake_cuda.fake_group): every rank has this SP group
        everyone = [mine] * len(everyone)
    else:
        dist.all_gather_object(everyone, mine)  # every world rank must create every sub-group, in one order
    ulysses, ring = None, None
    for members, u in sorted(set(everyone)):  # each SP group with its own degree (sizes may differ)
        for i in range(len(members) // u):
            sub = dist.new_group(list(members[i * u : (i + 1) * u]))
            ulysses = sub if mine[0] == members and group_rank(group) // u == i else ulysses
        for j in range(u):
            sub = dist.new_group(list(members[j::u]))
            ring = sub if mine[0] == members and group_rank(group) % u == j else ring
    return ulysses, ring


_SUBGROUPS: dict[tuple[Group, int], tuple[Group, Group]] = {}  # (SP group, ulysses_degree) -> sub-groups


def usp_groups(group: Group, ulysses_degree: int) -> tuple[Group, Group]:
    """``make_usp_groups`` made once per (group, degree) in this process and reused (creating groups is a
    collective over the world and every group stays alive until the process group is destroyed)."""
    key = (group, ulysses_degree)
    if key not in _SUBGROUPS:
        _SUBGROUPS[key] = make_usp_groups(group, ulysses_degree)
    return _SUBGROUPS[key]


def default_ulysses_degree(sp_size: int, kv_heads: int) -> int:
    """patch_model's default Ulysses degree: the largest that needs no kv-head replication."""
    return math.gcd(sp_size, kv_heads)


def usp_subgroups(group: Group, kv_heads: int) -> dict[str, Group]:
    """The sub-group arguments of ``usp_attention`` at the default degree (cached: see ``usp_groups``)."""
    ulysses, ring = usp_groups(group, default_ulysses_degree(group_size(group), kv_heads))
    return {"ulysses_group": ulysses, "ring_group": ring}


def usp_bytes(q, k, v, *, group: Group = None, ulysses_group: Group = None, ring_group: Group = None,
              layout: Layout = "zigzag", causal: bool = True, window: int | None = None, **_) -> tuple[int, int]:
    """(forward, backward) bytes this rank sends in one call: the module docstring's formula (the ring's
    terms from ``ring_bytes`` of the ring shard's shapes)."""
    u, e = group_size(ulysses_group), k.element_size()
    rep = u // math.gcd(u, k.shape[2])
    a2a = (u - 1) * (2 * q.numel() + 2 * rep * k.numel()) * e // u
    B, n, H, D = q.shape
    qh = torch.empty(B, n * u, H // u, D, dtype=q.dtype, device="meta")  # the ring's shard after the all-to-all
    kh = torch.empty(B, n * u, k.shape[2] * rep // u, D, dtype=k.dtype, device="meta")
    ring_fwd, ring_bwd = ring_bytes(qh, kh, kh, group=ring_group, layout=layout, causal=causal, window=window)
    return a2a + ring_fwd, a2a + ring_bwd


def ring_order(seq_len: int, u: int, r: int, ring_rank: int, layout: str,
               device=None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(index, its inverse) that reorder the rank-major tokens gathered by Ulysses group ``ring_rank`` into the
    ring rank's ``layout`` shard over ``r`` ranks and back; None when that is already the order (contiguous,
    u = 1). Worked out on the host once per shape (``_ring_order``) and copied to the device once per shape and
    device: every layer of every step reuses it (under fake tensors it is made per call: a fake tensor must
    not outlive its mode)."""
    perm = _ring_order(seq_len, u, r, ring_rank, layout)
    if perm is None:
        return None
    key = (seq_len, u, r, ring_rank, layout, str(device))
    if key in _ORDERS:
        return _ORDERS[key]
    index = torch.tensor(perm).to(device)  # made on the host, copied once (fake CUDA has no factory from data)
    pair = (index, torch.argsort(index))
    if torch._guards.detect_fake_mode() is None:
        _ORDERS[key] = pair
    return pair


_ORDERS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # a few shapes per run


@functools.lru_cache(maxsize=64)
def _ring_order(seq_len: int, u: int, r: int, ring_rank: int, layout: str) -> tuple[int, ...] | None:
    n = u * r
    gathered = [p for j in range(u) for a, b in local_chunks(seq_len, n, ring_rank * u + j, layout)
                for p in range(a, b)]
    target = [p for a, b in local_chunks(seq_len, r, ring_rank, layout) for p in range(a, b)]
    where = {p: i for i, p in enumerate(gathered)}
    if sorted(where) != sorted(target):  # the composition argument of the module docstring
        raise AssertionError(f"{layout} shards of a Ulysses group are not a ring shard (u={u}, r={r})")
    perm = tuple(where[p] for p in target)
    return None if perm == tuple(range(len(perm))) else perm


def _check_groups(group: Group, ulysses_group: Group, ring_group: Group, validate: bool = True) -> tuple[int, int]:
    """Sizes (u, r); raises on every rank when the sub-groups do not match make_usp_groups' layout (the
    comparison across ranks is skipped with ``validate=False``, like the shape check)."""
    n, u, r = group_size(group), group_size(ulysses_group), group_size(ring_group)
    if n > 1 and ulysses_group is None and ring_group is None:
        raise ValueError(
            f"usp_attention over N={n} ranks needs ulysses_group and ring_group: create them once with "
            "seqpar.attention.usp.usp_groups(group, ulysses_degree) (make_usp_groups made once, then reused)"
        )
    ok = u * r == n and group_rank(group) == group_rank(ring_group) * u + group_rank(ulysses_group)
    try:  # a collective comparison, so that a mismatch on some ranks raises on all of them
        if validate:
            check_same_shape(torch.empty(u, r, int(ok), device="meta"), group=group, name="(u, r, ok)")
        agreed = True
    except ValueError:
        agreed = False
    if not (agreed and ok):
        raise ValueError(
            f"ulysses_group (size u={u}) and ring_group (size r={r}) do not split group (N={n}) as "
            "make_usp_groups does (u * r = N, group rank = ring rank * u + ulysses rank) on every rank: "
            "create them with usp_groups(group, ulysses_degree)"
        )
    return u, r


def usp_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: Group = None,
    ulysses_group: Group = None,
    ring_group: Group = None,
    causal: bool = True,
    softmax_scale: float | None = None,
    layout: Layout = "zigzag",
    validate: bool = True,
    sinks: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Exact attention of a sequence sharded over ``group``: all-to-all over ``ulysses_group``, ring
    attention over ``ring_group``, all-to-all back.

    Args:
        q: ``[B, L/N, H, D]`` this rank's shard over ``group`` in ``layout``; H divisible by u.
        k, v: ``[B, L/N, Hkv, D]``, Hkv dividing H (GQA).
        group: the whole SP group of N = u * r ranks (None = one device).
        ulysses_group, ring_group: this rank's sub-groups from ``usp_groups(group, u)`` (``make_usp_groups``
            made once per group and degree).
        causal: causal mask over global positions.
        softmax_scale: defaults to ``D ** -0.5``.
        layout: ``"zigzag"`` or ``"contiguous"``; the output uses the same layout over ``group``.
        validate: compare shapes across ranks (one small collective); False skips it when the caller already
            did in this forward (``patch_model`` validates at the first layer only).
        sinks: optional ``[H]`` learned sink logit per query head (gpt-oss): the ring over ``ring_group``
            takes this rank's H/u heads' sinks (gradient: this rank's heads and rows; sum it over the group).
        window: optional sliding window (causal only; transformers' ``sliding_window``): the query at global
            position p sees the keys at ``p - window < k <= p``; passed to the ring, whose shard keeps global
            positions (its K/V ring then carries only the window's halo, see ``usp_bytes``).

    Returns:
        ``[B, L/N, H, D]`` this rank's shard of the output, in q's dtype; differentiable in q, k, v.

    Raises:
        ValueError on every rank: missing or mismatched sub-groups, heads not divisible by u, kv heads not
        dividing heads, shapes differing across ranks, a sequence the layout cannot split, a window that is not
        a positive int or comes with ``causal=False``.
    """
    check_options(layout=layout, causal=causal, softmax_scale=softmax_scale)
    u, r = _check_groups(group, ulysses_group, ring_group, validate)
    check_qkv(q, k, v, group=group, layout=layout, validate=validate)
    check_sinks(sinks, q.shape[2])
    seq_len = q.shape[1] * u * r
    window = effective_window(window, seq_len, causal)  # raises on every rank before the all-to-all
    # Step 1: sequence shards -> whole ring shard of H/u heads, in the ring's layout order.
    qh, kh, vh = seq_to_heads(q, k, v, group=ulysses_group, what="the Ulysses degree u")
    orders = ring_order(seq_len, u, r, group_rank(ring_group), layout, device=q.device)
    if orders is not None:
        qh, kh, vh = (t.index_select(1, orders[0]) for t in (qh, kh, vh))
    # Step 2: exact attention of the ring shard against the whole sequence (its shapes follow from the ones
    # compared over the whole group above: no second cross-rank check).
    out = ring_attention(qh.contiguous(), kh.contiguous(), vh.contiguous(), group=ring_group, causal=causal,
                         softmax_scale=softmax_scale, layout=layout, validate=False,
                         sinks=head_share(sinks, ulysses_group), window=window)
    # Step 3: undo the permutation, back to sequence shards of all heads.
    if orders is not None:
        out = out.index_select(1, orders[1])
    return heads_to_seq(out, group=ulysses_group)
