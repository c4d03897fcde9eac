"""Ring Self-Attention (RSA): the sequence-parallel baseline of Li et al. 2021, "Sequence Parallelism: Long
Sequence Training from System Perspective" (arXiv:2105.13120), kept faithful to the paper.

Rank r of N holds the contiguous shard ``q [B, L/N, H, D]``, ``k, v [B, L/N, Hkv, D]`` (Hkv divides H) and
builds its FULL score rows before the softmax, so memory is O(L^2 / N) per rank (the paper's point of
comparison; ``ring_attention`` never forms them):

    forward   ring 1 (K):  S_r[:, src] = scale · Q_r K_src^T   (every src; causal mask on global positions)
              P_r = softmax(S_r)                                 [B, H, L/N, L]
              ring 2 (V):  O_r = Σ_src P_r[:, src] V_src
    backward  ring 1 (V, dV partials travel with V):  dP_r[:, src] = dO_r V_src^T,
                                                     dV_src += P_r[:, src]^T dO_r
              dS_r = P_r ∘ (dP_r - rowsum(dP_r ∘ P_r))            (softmax backward on the full rows)
              ring 2 (K, dK partials travel with K):  dQ_r += scale · dS_r[:, src] K_src,
                                                     dK_src += scale · dS_r[:, src]^T Q_r

A partial gradient travels around the ring with its block and reaches the block's owner after N hops. Each
hop overlaps with the block computation (``comm.RingComm``). Under a causal mask blocks of later ranks are all
masked: their products are skipped, but the ring still makes every hop (the paper's fixed schedule).

Sliding window (``window=w``, transformers' rule: the query at global position p sees the keys at
``p - w < k <= p``): one more term of the score masks, on global positions (rank r holds [r L/N, (r+1) L/N)).
Blocks wholly before every row's window are skipped like the causal ones; the rings, and so the bytes, stay
the paper's fixed schedule (``ring_attention`` sends only the window's halo instead).

Communication per call, with b = B·(L/N)·Hkv·D (one of K or V, kv heads only):
  * forward:  2·(N-1) · b · itemsize             bytes sent (and received) per rank (2(N-1) P2P steps);
  * backward: 2·(N-1) · b · itemsize + 2·N · b · acc   when N > 1 (0 when N = 1), acc = 4 (float32
    partial gradients; 8 for float64 inputs).

Contiguous layout only (the paper's); zigzag raises. Errors are raised on every rank before any exchange.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from seqpar.attention.checks import check_options, check_qkv, effective_window
from seqpar.comm import Group, group_rank, group_size, ring_visit
from seqpar.kernels import acc_dtype

__all__ = ["ring_self_attention"]


@dataclass
class _RSAPlan:
    group: Group
    rank: int
    world: int
    causal: bool
    scale: float
    n: int  # tokens per rank: rank r holds global positions [r n, (r+1) n)
    window: int | None = None  # sliding window (causal only): p - window < k <= p

    def visible(self, src: int) -> bool:
        """Whether any row of this rank sees any key of rank ``src`` (else the block's products are skipped)."""
        if not self.causal:
            return True
        # the last key of src against the first row's window: (src + 1) n - 1 > r n - window
        return src <= self.rank and (self.window is None or (src + 1) * self.n - 1 > self.rank * self.n - self.window)

    def mask(self, src: int, device) -> torch.Tensor | None:
        """Mask of a visible block on global positions (True = visible); None when every cell is visible."""
        n, w = self.n, self.window
        diagonal = self.causal and src == self.rank
        cut = w is not None and src * n <= (self.rank + 1) * n - 1 - w  # the block's first key is outside a window
        if not (diagonal or cut):
            return None
        q_pos = self.rank * n + torch.arange(n, device=device)[:, None]
        k_pos = src * n + torch.arange(n, device=device)[None, :]
        visible = k_pos <= q_pos
        return visible if w is None else visible & (k_pos > q_pos - w)


def _heads(q: torch.Tensor, hkv: int, acc) -> torch.Tensor:
    """[B, n, H, D] -> [B, n, Hkv, g, D] in the accumulation dtype (GQA by grouping, never repeating K/V)."""
    B, n, H, D = q.shape
    return q.to(acc).reshape(B, n, hkv, H // hkv, D)


def _rsa_forward(q, k, v, plan: _RSAPlan) -> tuple[torch.Tensor, torch.Tensor]:
    acc, (B, n, H, D), hkv = acc_dtype(q.dtype), q.shape, k.shape[2]
    qh = _heads(q, hkv, acc)
    s = qh.new_full((B, hkv, H // hkv, n, n * plan.world), float("-inf"))  # full score rows: O(L^2/N)

    def scores(src: int, k_src: torch.Tensor) -> None:  # ring 1: K
        if plan.visible(src):
            blk = torch.einsum("bqhgd,bkhd->bhgqk", qh, k_src.to(acc)) * plan.scale
            mask = plan.mask(src, q.device)
            s[..., src * n : (src + 1) * n] = blk if mask is None else blk.masked_fill(~mask, float("-inf"))

    ring_visit(k, plan.group, scores)
    p = torch.softmax(s, dim=-1)  # every row sees at least its own token
    out = torch.zeros_like(qh)

    def weigh(src: int, v_src: torch.Tensor) -> None:  # ring 2: V
        if plan.visible(src):
            out.add_(torch.einsum("bhgqk,bkhd->bqhgd", p[..., src * n : (src + 1) * n], v_src.to(acc)))

    ring_visit(v, plan.group, weigh)
    return out.view(B, n, H, D), p


def _rsa_backward(dout, q, k, v, p, plan: _RSAPlan):
    acc, (B, n, H, D), hkv = acc_dtype(q.dtype), q.shape, k.shape[2]
    qh, doh = _heads(q, hkv, acc), _heads(dout, hkv, acc)
    dp = torch.zeros_like(p)

    def through_v(src: int, v_src: torch.Tensor) -> torch.Tensor:  # ring 1: V with dV partials
        dv = v_src.new_zeros(v_src.shape, dtype=acc)
        if plan.visible(src):
            cols = slice(src * n, (src + 1) * n)
            dp[..., cols] = torch.einsum("bqhgd,bkhd->bhgqk", doh, v_src.to(acc))
            dv += torch.einsum("bhgqk,bqhgd->bkhd", p[..., cols], doh)
        return dv

    dv = ring_visit(v, plan.group, through_v, grad=True)
    # Softmax backward over the full rows, in place of dP (masked entries have P = 0).
    ds = dp.sub_((dp * p).sum(-1, keepdim=True)).mul_(p)
    dq = torch.zeros_like(qh)

    def through_k(src: int, k_src: torch.Tensor) -> torch.Tensor:  # ring 2: K with dK partials
        dk = k_src.new_zeros(k_src.shape, dtype=acc)
        if plan.visible(src):
            ds_blk = ds[..., src * n : (src + 1) * n]
            dq.add_(torch.einsum("bhgqk,bkhd->bqhgd", ds_blk, k_src.to(acc)) * plan.scale)
            dk += torch.einsum("bhgqk,bqhgd->bkhd", ds_blk, qh) * plan.scale
        return dk

    dk = ring_visit(k, plan.group, through_k, grad=True)
    return dq.view(B, n, H, D).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class RingSelfAttentionFunc(torch.autograd.Function):
    """q [B, L/N, H, D], k/v [B, L/N, Hkv, D] -> out [B, L/N, H, D]; saves q, k, v and P [B, H, L/N, L]."""

    @staticmethod
    def forward(ctx, q, k, v, plan: _RSAPlan):
        out, p = _rsa_forward(q, k, v, plan)
        ctx.save_for_backward(q, k, v, p)
        ctx.plan = plan
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, p = ctx.saved_tensors
        return (*_rsa_backward(dout, q, k, v, p, ctx.plan), None)


def rsa_bytes(q, k, v, *, group: Group = None, **_) -> tuple[int, int]:
    """(forward, backward) bytes this rank sends in one call: the module docstring's formula."""
    world, b = group_size(group), k.numel()
    fwd = 2 * (world - 1) * b * k.element_size()
    return fwd, fwd + (2 * world * b * acc_dtype(k.dtype).itemsize if world > 1 else 0)


def ring_self_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: Group = None,
    causal: bool = True,
    softmax_scale: float | None = None,
    layout: str = "contiguous",
    validate: bool = True,
    window: int | None = None,
) -> torch.Tensor:
    """Ring Self-Attention (Li et al. 2021): full score rows from a K ring, softmax, output from a V ring.

    Args:
        q: ``[B, L/N, H, D]`` this rank's contiguous shard of the queries.
        k, v: ``[B, L/N, Hkv, D]`` with Hkv dividing H (GQA).
        group: the SP process group of N ranks; None is a single device.
        causal: causal mask over global positions.
        softmax_scale: defaults to ``D ** -0.5``.
        layout: must be ``"contiguous"`` (the paper's layout).
        validate: compare shapes across ranks (one small collective); False skips it when the caller already
            did in this forward (``patch_model`` validates at the first layer only).
        window: optional sliding window (causal only; transformers' ``sliding_window``): the query at global
            position p sees the keys at ``p - window < k <= p``; applied in the score masks, blocks wholly
            outside every row's window skip their products, the rings (and bytes) are unchanged.

    Returns:
        ``[B, L/N, H, D]`` in q's dtype. Memory O(B·H·L²/N) for the score rows (the paper's baseline).

    Bytes sent per rank: forward ``2·(N-1)·B·(L/N)·Hkv·D·itemsize``; backward that plus
    ``2·N·B·(L/N)·Hkv·D·4`` (float32 dK and dV partials; 8 bytes for float64) when N > 1.
    """
    check_options(layout=layout, causal=causal, softmax_scale=softmax_scale)
    if layout != "contiguous":
        raise ValueError(f"layout={layout!r}: ring_self_attention (Li et al. 2021) supports only "
                         "layout='contiguous': shard with it, or use ring_attention for the zigzag layout")
    check_qkv(q, k, v, group=group, layout=layout, validate=validate)
    world = group_size(group)
    window = effective_window(window, q.shape[1] * world, causal)  # raises on every rank before any exchange
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    plan = _RSAPlan(group, group_rank(group), world, causal, scale, q.shape[1], window)
    return RingSelfAttentionFunc.apply(q, k, v, plan)
