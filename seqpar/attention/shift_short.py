"""LongLoRA shifted sparse attention (S2-Attn), on one device or sequence-parallel with a G/2-token halo.

Chen et al. 2024, "LongLoRA: Efficient Fine-tuning of Long-Context Large Language Models" (ICLR), §3.2.

Semantics on the global sequence of L tokens, shift-group size G (LongLoRA's "group size", even), causal,
every output at its own token (shift groups: ``shift_groups.py``):

* heads ``[0, H/2)``: causal attention inside the shift groups ``[0, G), [G, 2G), ...``;
* heads ``[H/2, H)``: causal attention inside the shift groups moved by G/2: ``[0, G/2), [G/2, 3G/2), ...,
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

Errors (ValueError, raised on every rank before any payload moves: ``shift_groups.make_plan``): shapes or
arguments that differ across ranks, odd head counts, ``group_size`` odd or not dividing the local length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from seqpar.attention.shift_groups import ShiftPlan, halo_bytes, make_plan
from seqpar.comm import Group
from seqpar.kernels import acc_dtype, block_attention, block_attention_backward

# ---------------------------------------------------------------------------------------------- tiles


@dataclass(frozen=True)
class _Tile:
    """Local tokens ``[start, stop)`` cut into ``count`` equal shift groups; ``halo``: the keys of the (single)
    shift group are prefixed by the G/2 halo tokens (queries see them all: bottom-right causal)."""

    start: int
    stop: int
    count: int
    halo: bool = False


TILE_PARTS = 4  # a run of whole groups is computed in about this many calls: a call's temporaries (its output,
# its dQ/dK/dV) are then ~1/8 of the local q per tensor instead of 1/2, for 4x the calls of G-row groups


def _split(start: int, count: int, G: int) -> list[_Tile]:
    """``count`` whole groups from ``start`` as about ``TILE_PARTS`` tiles of consecutive groups."""
    per = -(-count // TILE_PARTS)
    return [_Tile(start + i * G, start + min(i + per, count) * G, min(per, count - i)) for i in range(0, count, per)]


def tiles(plan: ShiftPlan, *, shifted: bool) -> list[_Tile]:
    """The local shift groups of one head half, in order; the halo tile (if any) first."""
    n, G, h = plan.local_len, plan.shift_size, plan.half
    if not shifted:
        return _split(0, n // G, G)
    out = [_Tile(0, h, 1, halo=plan.wrap or plan.rank > 0), _Tile(n - h, n, 1)]  # the half groups at the ends
    if n > G:
        out[1:1] = _split(h, n // G - 1, G)
    return out


def _fold(x: torch.Tensor, m: int, dim: int = 1) -> torch.Tensor:
    """Shift groups become batch entries: [B, m*g, h, D] -> [B*m, g, h, D] (lse, dim=2: [B, h, m*g] -> [B*m, h, g])."""
    x = x.movedim(dim, 1)
    return x.reshape(x.shape[0] * m, x.shape[1] // m, *x.shape[2:]).movedim(1, dim)


def _unfold(x: torch.Tensor, m: int, dim: int = 1) -> torch.Tensor:
    x = x.movedim(dim, 1)
    return x.reshape(x.shape[0] // m, x.shape[1] * m, *x.shape[2:]).movedim(1, dim)


def _tile_inputs(t: _Tile, q, k, v, halo):
    s = slice(t.start, t.stop)
    qt, kt, vt = q[:, s], k[:, s], v[:, s]
    if t.halo:
        kt, vt = torch.cat([halo[0], kt], dim=1), torch.cat([halo[1], vt], dim=1)
    return qt, kt, vt, ("bottom_right" if t.halo else True)


def _tile_forward(t: _Tile, q, k, v, halo, scale):
    qt, kt, vt, causal = _tile_inputs(t, q, k, v, halo)
    m = t.count
    out, lse = block_attention(_fold(qt, m), _fold(kt, m), _fold(vt, m), causal=causal, softmax_scale=scale)
    return _unfold(out, m), _unfold(lse, m, dim=2)


def _tile_backward(t: _Tile, dout, q, k, v, out, lse, halo, scale):
    qt, kt, vt, causal = _tile_inputs(t, q, k, v, halo)
    s, m = slice(t.start, t.stop), t.count
    grads = block_attention_backward(_fold(dout[:, s], m), _fold(qt, m), _fold(kt, m), _fold(vt, m),
                                     _fold(out[:, s], m), _fold(lse[:, :, s], m, dim=2), causal=causal,
                                     softmax_scale=scale)
    return [_unfold(g, m) for g in grads]


# ---------------------------------------------------------------------------------------------- steps


def _halves(x: torch.Tensor, dim: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """The (unshifted, shifted) head halves of ``x``: views, never copies (a tile folds them into the batch
    dimension without a copy, and the kernels read strided blocks)."""
    c = x.shape[dim] // 2
    return x.narrow(dim, 0, c), x.narrow(dim, c, c)


def shift_short_forward(q, k, v, plan: ShiftPlan):
    """Local S2-Attn: ``(out [B, n, H, D], lse [B, H, n])`` in the accumulation dtype, and the halo
    ``[2, B, G/2, Hkv/2, D]`` (K, V) this rank received (None if none), kept for the backward. Each tile's
    result is written into its rows and head half of ``out``/``lse`` (no per-half results concatenated)."""
    (qa, qb), (ka, kb), (va, vb) = _halves(q), _halves(k), _halves(v)
    h, scale = plan.half, plan.softmax_scale
    B, n, H, D = q.shape
    acc = acc_dtype(q.dtype)
    out = torch.empty((B, n, H, D), dtype=acc, device=q.device)
    lse = torch.empty((B, H, n), dtype=acc, device=q.device)
    halves = (_halves(out), _halves(lse, 1))
    ring = plan.halo_ring(backward=False)
    halo = ring.send_recv(torch.stack([kb[:, -h:], vb[:, -h:]]))

    def run(t: _Tile, which: int, qh, kh, vh, halo_kv) -> None:
        o, l = _tile_forward(t, qh, kh, vh, halo_kv, scale)
        halves[0][which][:, t.start:t.stop] = o
        halves[1][which][:, :, t.start:t.stop] = l

    for t in tiles(plan, shifted=False):
        run(t, 0, qa, ka, va, None)
    head, *rest = tiles(plan, shifted=True)
    for t in rest:  # while the halo travels
        run(t, 1, qb, kb, vb, None)
    ring.wait()
    run(head, 1, qb, kb, vb, halo)
    return out, lse, halo


def _half_backward(t_list, dout, q, k, v, out, lse, halo, scale, dq, dk, dv):
    """Gradients of one head half written into its views ``dq, dk, dv``; returns d_halo [2, B, G/2, h_kv, D]
    or None."""
    d_halo = None
    for t in t_list:
        gq, gk, gv = _tile_backward(t, dout, q, k, v, out, lse, halo, scale)
        if t.halo:  # the first G/2 keys of this tile are the halo: their gradient belongs to rank r-1
            h = halo.shape[2]
            d_halo, gk, gv = torch.stack([gk[:, :h], gv[:, :h]]), gk[:, h:], gv[:, h:]
        s = slice(t.start, t.stop)
        dq[:, s], dk[:, s], dv[:, s] = gq, gk, gv
        del gq, gk, gv
    return d_halo


def shift_short_backward(dout, q, k, v, out, lse, halo, plan: ShiftPlan):
    """``(dq, dk, dv)`` in the accumulation dtype from the *final* ``out``/``lse`` of the rows (SF-Attn passes
    its sink-merged ones: the group part is then an exact partial gradient). Tiles write into the head-half
    views of the three gradients (every row of both halves is covered by exactly one tile)."""
    acc = acc_dtype(q.dtype)
    dq, dk, dv = (torch.empty(x.shape, dtype=acc, device=x.device) for x in (q, k, v))
    (qa, qb), (ka, kb), (va, vb) = _halves(q), _halves(k), _halves(v)
    (do_a, do_b), (o_a, o_b), (l_a, l_b) = _halves(dout), _halves(out), _halves(lse, 1)
    (dq_a, dq_b), (dk_a, dk_b), (dv_a, dv_b) = _halves(dq), _halves(dk), _halves(dv)
    scale = plan.softmax_scale
    d_halo = _half_backward(tiles(plan, shifted=True), do_b, qb, kb, vb, o_b, l_b, halo, scale, dq_b, dk_b, dv_b)
    if d_halo is None:  # nothing to send, but the buffer gives the shape of what we may receive
        d_halo = torch.zeros((2, *kb[:, -plan.half:].shape), dtype=acc, device=dk.device)
    ring = plan.halo_ring(backward=True)
    back = ring.send_recv(d_halo)
    _half_backward(tiles(plan, shifted=False), do_a, qa, ka, va, o_a, l_a, None, scale, dq_a, dk_a, dv_a)
    ring.wait()  # back: the gradient of our tail tokens as rank r+1's halo
    if back is not None:
        dk_b[:, -plan.half:] += back[0]
        dv_b[:, -plan.half:] += back[1]
    return dq, dk, dv


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


def shift_short_bytes(q, k, v, *, group: Group = None, group_size: int, wrap: bool = False, **_) -> tuple[int, int]:
    """(forward, backward) bytes this rank sends in one call: the module docstring's formula."""
    return halo_bytes(k, group=group, group_size=group_size, wrap=wrap)


def shift_short_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group_size: int,
    group: Group = None,
    wrap: bool = False,
    softmax_scale: float | None = None,
    validate: bool = True,
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
        validate: compare the arguments across ranks (one small all-gather); False skips it when the caller
            already did in this forward (``patch_model`` validates at the first layer only).

    Returns:
        ``[B, n, H, D]`` in q's dtype; differentiable in q, k, v (hand-written backward).
    """
    plan = make_plan(q, k, v, group=group, group_size=group_size, wrap=wrap, num_sink_tokens=0,
                     softmax_scale=softmax_scale, caller="shift_short_attention", validate=validate)
    return ShiftShortAttention.apply(q, k, v, plan)
