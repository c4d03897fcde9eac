"""LongLoRA shifted sparse attention (S2-Attn), on one device or sequence-parallel with a G/2-token halo.

Chen et al. 2024, "LongLoRA: Efficient Fine-tuning of Long-Context Large Language Models" (ICLR), §3.2.

Semantics on the global sequence of L tokens, group size G (even), causal, every output at its own token:

* heads ``[0, H/2)``: causal attention inside the groups ``[0, G), [G, 2G), ...``;
* heads ``[H/2, H)``: causal attention inside the groups shifted by G/2: ``[0, G/2), [G/2, 3G/2), ...,
  [L - G/2, L)``, a half group at each end, so no token sees the end of the sequence (what LongLoRA's
  flash-attention path computes);
* ``wrap=True``: the paper's pseudocode instead: the second half is rolled by -G/2 (token G/2 moves to
  position 0), attends causally in rolled order inside groups of G and is rolled back, so the first G/2
  tokens also see the last G/2 tokens of the sequence. Kept for fidelity experiments.

GQA: the kv heads split the same way (kv heads ``[0, Hkv/2)`` serve query heads ``[0, H/2)``), so H and Hkv
must be even. Computed group by group (groups folded into the batch dimension of ``block_attention``):
memory O(L x G), never O(L x L).

Sequence parallel (contiguous layout: rank r of N holds tokens ``[r n, (r+1) n)``, n = L/N; requires
``n % G == 0``): the unshifted groups never cross a rank boundary; the shifted group ``[r n - G/2, r n + G/2)``
does, so rank r receives the K/V of the last G/2 tokens of the shifted kv heads of rank r-1 (the *halo*) and
nothing else; rank 0 receives nothing (with ``wrap=True`` it receives rank N-1's tail: a ring).
The halo travels while the unshifted half is computed.

Bytes per call and rank, with the halo ``h = B · (G/2) · (Hkv/2) · D · 2`` elements (K and V), e = itemsize
of k/v, a = itemsize of the accumulation dtype (4; 8 for float64), op name ``"halo"`` in ``ByteCounter``:

* forward:  send ``h · e`` to rank r+1 (if r < N-1), receive ``h · e`` from rank r-1 (if r > 0);
  ``wrap=True``: every rank sends and receives ``h · e`` (rank N-1 -> rank 0 closes the ring);
* backward: the halo's dK/dV go back to their owner: send ``h · a`` to r-1 (if r > 0), receive ``h · a``
  from r+1 (if r < N-1); ``wrap=True``: every rank both.

An all-gather of K and V would send ``(N-1) · B · n · Hkv · D · 2 · e`` per rank: the halo is
``G / (4 (N-1) n)`` of that, and does not grow with N.

Errors (ValueError, raised on every rank before any payload moves: one small all-gather of the arguments'
shapes/dtypes/values per call, not counted as payload): shapes or arguments that differ across ranks, odd head
counts, ``group_size`` odd or not dividing the local length (the message lists the valid values).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from seqpar.comm import Group, global_rank, group_rank, nbytes, record_bytes
from seqpar.comm import group_size as sp_size  # ``group_size`` is G here, as in LongLoRA
from seqpar.kernels import acc_dtype, block_attention, block_attention_backward

_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class ShiftPlan:
    """Validated arguments of one call, shared by S2-Attn and SF-Attn (kept on ``ctx``)."""

    group: Group
    world: int
    rank: int
    local_len: int
    group_size: int
    wrap: bool
    num_sink_tokens: int
    softmax_scale: float | None

    @property
    def half(self) -> int:
        return self.group_size // 2

    @property
    def receives_halo(self) -> bool:  # in the forward pass
        return self.wrap or self.rank > 0

    @property
    def sends_halo(self) -> bool:
        return self.wrap or self.rank < self.world - 1


# ---------------------------------------------------------------------------------------------- validation


def _signature(q, k, v, group_size, num_sink_tokens, wrap) -> list[int]:
    """Everything the local checks depend on, as ints, so that ranks can compare them in one collective."""
    sig = []
    for t in (q, k, v):
        dims = list(t.shape[:4]) + [0] * (4 - min(t.dim(), 4))
        sig += [t.dim(), *dims, _DTYPES.index(t.dtype) if t.dtype in _DTYPES else -1]
    return [*sig, int(group_size), int(num_sink_tokens), int(bool(wrap))]


_SIG_NAMES = [f"{t}.{f}" for t in "qkv" for f in ("dim", "B", "L", "H", "D", "dtype")] + [
    "group_size", "num_sink_tokens", "wrap"]


def _check_ranks_agree(sig: list[int], group: Group, caller: str, device: torch.device) -> None:
    """One all-gather of the signature; raise the same error on every rank if any field differs."""
    n = sp_size(group)
    if n == 1:
        return
    dev = device if dist.get_backend(group) == "nccl" else torch.device("cpu")
    mine = torch.tensor(sig, dtype=torch.int64, device=dev)
    rows = [torch.empty_like(mine) for _ in range(n)]
    dist.all_gather(rows, mine, group=group)  # not counted: validation, not payload
    table = torch.stack(rows).cpu()
    differ = [i for i in range(len(sig)) if len(set(table[:, i].tolist())) > 1]
    if differ:
        what = ", ".join(f"{_SIG_NAMES[i]} per rank = {table[:, i].tolist()}" for i in differ)
        raise ValueError(
            f"{caller}: the {n} ranks of the SP group disagree: {what}; every rank must pass its equal-length "
            "shard (seqpar.sharding.shard(..., layout='contiguous')) and the same group_size/num_sink_tokens/wrap"
        )


def max_sink_tokens(local_len: int) -> int:
    """Most sink tokens SF-Attn takes: they all live on rank 0, so at most its ``local_len`` tokens (the recipe
    validator uses this too)."""
    return local_len


def _check_local(q, k, v, G: int, S: int, world: int, caller: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{caller}: {name} must be [B, L_local, heads, head_dim], got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES or t.dtype != q.dtype:
            raise ValueError(f"{caller}: {name}.dtype={t.dtype}; q, k, v must share one of {_DTYPES}")
    B, n, H, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[1] != n or k.shape[3] != D:
        raise ValueError(f"{caller}: k {tuple(k.shape)} and v {tuple(v.shape)} must be "
                         f"[B={B}, L_local={n}, Hkv, D={D}] like q {tuple(q.shape)}")
    Hkv = k.shape[2]
    if H % 2 or Hkv % 2 or H % Hkv:
        raise ValueError(f"{caller}: H={H} query heads and Hkv={Hkv} kv heads: half the heads are shifted, so "
                         "both must be even and Hkv must divide H (use an even number of kv heads)")
    if G < 2 or G % 2 or n % G:
        valid = [g for g in range(2, n + 1, 2) if n % g == 0]
        raise ValueError(
            f"{caller}: group_size={G} must be even and divide the local sequence length {n} (L = {n * world} "
            f"over N = {world} ranks), so that unshifted groups stay on one rank; valid group_size values: "
            f"{valid} (or change L or N)"
        )
    if not 0 <= S <= max_sink_tokens(n):
        raise ValueError(f"{caller}: num_sink_tokens={S} must be in [0, {n}] (the local length: sink tokens "
                         "live on rank 0); use fewer sink tokens or longer shards")


def make_plan(q, k, v, *, group: Group, group_size: int, wrap: bool, num_sink_tokens: int,
              softmax_scale: float | None, caller: str) -> ShiftPlan:
    """Validate collectively (one small all-gather), then locally: every rank raises the same error."""
    _check_ranks_agree(_signature(q, k, v, group_size, num_sink_tokens, wrap), group, caller, q.device)
    world = sp_size(group)
    _check_local(q, k, v, int(group_size), int(num_sink_tokens), world, caller)
    return ShiftPlan(group, world, group_rank(group), q.shape[1], int(group_size), bool(wrap),
                     int(num_sink_tokens), softmax_scale)


# ---------------------------------------------------------------------------------------------- halo


def exchange_halo(x: torch.Tensor, plan: ShiftPlan, *, backward: bool) -> Callable[[], torch.Tensor | None]:
    """Post the halo exchange and return ``finish()`` -> what arrived (None if nothing is due here).

    Forward: send ``x`` (this rank's tail) to rank r+1, receive rank r-1's tail. Backward: the mirror image,
    send ``x`` (the halo's gradient) to r-1, receive ours from r+1. ``x`` also gives the receive shape.
    """
    send, recv = (plan.receives_halo, plan.sends_halo) if backward else (plan.sends_halo, plan.receives_halo)
    if plan.world == 1:  # wrap on one device: the halo is our own tail
        return lambda: x if (send and recv) else None
    step = -1 if backward else 1
    peer_to = global_rank(plan.group, (plan.rank + step) % plan.world)
    peer_from = global_rank(plan.group, (plan.rank - step) % plan.world)
    x = x.contiguous()  # gloo refuses views
    buf = torch.empty_like(x) if recv else None
    ops = ([dist.P2POp(dist.isend, x, peer_to, plan.group)] if send else []) + (
        [dist.P2POp(dist.irecv, buf, peer_from, plan.group)] if recv else [])
    works = dist.batch_isend_irecv(ops) if ops else []
    record_bytes("halo", nbytes(x) if send else 0, nbytes(x) if recv else 0)

    def finish() -> torch.Tensor | None:
        for w in works:
            w.wait()
        return buf

    return finish


# ---------------------------------------------------------------------------------------------- tiles


@dataclass(frozen=True)
class _Tile:
    """Local tokens ``[start, stop)`` cut into ``groups`` equal groups; ``halo``: the keys of the (single)
    group are prefixed by the G/2 halo tokens (queries see them all: bottom-right causal)."""

    start: int
    stop: int
    groups: int
    halo: bool = False


def tiles(plan: ShiftPlan, *, shifted: bool) -> list[_Tile]:
    """The local groups of one head half, in order; the halo tile (if any) first."""
    n, G, h = plan.local_len, plan.group_size, plan.half
    if not shifted:
        return [_Tile(0, n, n // G)]
    out = [_Tile(0, h, 1, halo=plan.receives_halo), _Tile(n - h, n, 1)]  # the two half groups at the ends
    if n > G:
        out.insert(1, _Tile(h, n - h, n // G - 1))
    return out


def group_start(pos: torch.Tensor, G: int, *, shifted: bool) -> torch.Tensor:
    """Global position of the first token of each token's group (no wrap)."""
    if not shifted:
        return pos // G * G
    return ((pos + G // 2) // G * G - G // 2).clamp_min(0)


def _fold(x: torch.Tensor, m: int) -> torch.Tensor:
    """[B, m*g, h, D] -> [B*m, g, h, D]: groups become batch entries."""
    B, L = x.shape[:2]
    return x.reshape(B * m, L // m, *x.shape[2:])


def _unfold(x: torch.Tensor, m: int) -> torch.Tensor:
    Bm, g = x.shape[:2]
    return x.reshape(Bm // m, m * g, *x.shape[2:])


def _fold_lse(lse: torch.Tensor, m: int) -> torch.Tensor:
    """[B, h, m*g] -> [B*m, h, g]."""
    B, h, L = lse.shape
    return lse.reshape(B, h, m, L // m).transpose(1, 2).reshape(B * m, h, L // m)


def _unfold_lse(lse: torch.Tensor, m: int) -> torch.Tensor:
    Bm, h, g = lse.shape
    return lse.reshape(Bm // m, m, h, g).transpose(1, 2).reshape(Bm // m, h, m * g)


def _tile_inputs(t: _Tile, q, k, v, halo):
    s = slice(t.start, t.stop)
    qt, kt, vt = q[:, s], k[:, s], v[:, s]
    if t.halo:
        kt, vt = torch.cat([halo[0], kt], dim=1), torch.cat([halo[1], vt], dim=1)
    return qt, kt, vt, ("bottom_right" if t.halo else True)


def _tile_forward(t: _Tile, q, k, v, halo, scale):
    qt, kt, vt, causal = _tile_inputs(t, q, k, v, halo)
    m = t.groups
    out, lse = block_attention(_fold(qt, m), _fold(kt, m), _fold(vt, m), causal=causal, softmax_scale=scale)
    return _unfold(out, m), _unfold_lse(lse, m)


def _tile_backward(t: _Tile, dout, q, k, v, out, lse, halo, scale):
    qt, kt, vt, causal = _tile_inputs(t, q, k, v, halo)
    s, m = slice(t.start, t.stop), t.groups
    grads = block_attention_backward(_fold(dout[:, s], m), _fold(qt, m), _fold(kt, m), _fold(vt, m),
                                     _fold(out[:, s], m), _fold_lse(lse[:, :, s], m), causal=causal,
                                     softmax_scale=scale)
    return [_unfold(g, m) for g in grads]


# ---------------------------------------------------------------------------------------------- steps


def _halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the head dim into (unshifted, shifted) halves."""
    c = x.shape[2] // 2
    return x[:, :, :c].contiguous(), x[:, :, c:].contiguous()


def shift_short_forward(q, k, v, plan: ShiftPlan):
    """Local S2-Attn: ``(out [B, n, H, D], lse [B, H, n])`` in the accumulation dtype, and the halo
    ``[2, B, G/2, Hkv/2, D]`` (K, V) this rank received (None if none), kept for the backward."""
    (qa, qb), (ka, kb), (va, vb) = _halves(q), _halves(k), _halves(v)
    h, scale = plan.half, plan.softmax_scale
    finish = exchange_halo(torch.stack([kb[:, -h:], vb[:, -h:]]), plan, backward=False)
    parts_a = [_tile_forward(t, qa, ka, va, None, scale) for t in tiles(plan, shifted=False)]
    head, *rest = tiles(plan, shifted=True)
    parts_b = [_tile_forward(t, qb, kb, vb, None, scale) for t in rest]  # while the halo travels
    halo = finish()
    parts_b.insert(0, _tile_forward(head, qb, kb, vb, halo, scale))
    out = torch.cat([torch.cat([o for o, _ in p], dim=1) for p in (parts_a, parts_b)], dim=2)
    lse = torch.cat([torch.cat([s for _, s in p], dim=2) for p in (parts_a, parts_b)], dim=1)
    return out, lse, halo


def _half_backward(t_list, dout, q, k, v, out, lse, halo, scale):
    """Gradients of one head half; returns (dq, dk, dv, d_halo) with d_halo [2, B, G/2, h_kv, D] or None."""
    acc = acc_dtype(q.dtype)
    dq, dk, dv = (torch.zeros(x.shape, dtype=acc, device=x.device) for x in (q, k, v))
    d_halo = None
    for t in t_list:
        gq, gk, gv = _tile_backward(t, dout, q, k, v, out, lse, halo, scale)
        if t.halo:  # the first G/2 keys of this tile are the halo: their gradient belongs to rank r-1
            h = halo.shape[2]
            d_halo, gk, gv = torch.stack([gk[:, :h], gv[:, :h]]), gk[:, h:], gv[:, h:]
        s = slice(t.start, t.stop)
        dq[:, s], dk[:, s], dv[:, s] = gq, gk, gv
    return dq, dk, dv, d_halo


def shift_short_backward(dout, q, k, v, out, lse, halo, plan: ShiftPlan):
    """``(dq, dk, dv)`` in the accumulation dtype from the *final* ``out``/``lse`` of the rows (SF-Attn passes
    its sink-merged ones: the group part is then an exact partial gradient)."""
    (qa, qb), (ka, kb), (va, vb) = _halves(q), _halves(k), _halves(v)
    Hq, scale = q.shape[2] // 2, plan.softmax_scale
    split = lambda x, dim: (x.narrow(dim, 0, Hq), x.narrow(dim, Hq, Hq))  # noqa: E731
    (do_a, do_b), (o_a, o_b), (l_a, l_b) = split(dout, 2), split(out, 2), split(lse, 1)
    dq_b, dk_b, dv_b, d_halo = _half_backward(tiles(plan, shifted=True), do_b, qb, kb, vb, o_b, l_b, halo, scale)
    if d_halo is None:  # nothing to send, but the buffer gives the shape of what we may receive
        d_halo = torch.zeros((2, *kb[:, -plan.half:].shape), dtype=dk_b.dtype, device=dk_b.device)
    finish = exchange_halo(d_halo, plan, backward=True)
    dq_a, dk_a, dv_a, _ = _half_backward(tiles(plan, shifted=False), do_a, qa, ka, va, o_a, l_a, None, scale)
    back = finish()  # gradient of our tail tokens as rank r+1's halo
    if back is not None:
        dk_b[:, -plan.half:] += back[0]
        dv_b[:, -plan.half:] += back[1]
    return tuple(torch.cat(pair, dim=2) for pair in ((dq_a, dq_b), (dk_a, dk_b), (dv_a, dv_b)))


# ---------------------------------------------------------------------------------------------- autograd


class ShiftShortAttention(torch.autograd.Function):
    """Shapes: q [B, n, H, D], k/v [B, n, Hkv, D] -> out [B, n, H, D]; saved: out/lse (accumulation dtype)
    and the received halo [2, B, G/2, Hkv/2, D]."""

    @staticmethod
    def forward(ctx, q, k, v, plan: ShiftPlan):
        out, lse, halo = shift_short_forward(q, k, v, plan)
        ctx.plan, ctx.has_halo = plan, halo is not None
        ctx.save_for_backward(q, k, v, out, lse, *([halo] if halo is not None else []))
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, *halo = ctx.saved_tensors
        dq, dk, dv = shift_short_backward(dout, q, k, v, out, lse, halo[0] if halo else None, ctx.plan)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


def shift_short_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group_size: int,
    group: Group = None,
    wrap: bool = False,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """LongLoRA S2-Attn (causal) of this rank's contiguous shard.

    Args:
        q: ``[B, n, H, D]``, this rank's tokens ``[r n, (r+1) n)`` (contiguous layout); H even.
        k, v: ``[B, n, Hkv, D]``, Hkv even and dividing H (GQA).
        group_size: G, even, dividing n (and so the global length L = N n).
        group: the SP process group; None = one device.
        wrap: roll the shifted half with wrap-around (the paper's pseudocode) instead of half groups at the
            ends (LongLoRA's flash path, the default).
        softmax_scale: defaults to ``D ** -0.5``.

    Returns:
        ``[B, n, H, D]`` in q's dtype; differentiable in q, k, v (hand-written backward).
    """
    plan = make_plan(q, k, v, group=group, group_size=group_size, wrap=wrap, num_sink_tokens=0,
                     softmax_scale=softmax_scale, caller="shift_short_attention")
    return ShiftShortAttention.apply(q, k, v, plan)
