"""Chunked causal linear attention with per-head decay on one device (Lightning Attention-2, Qin et al. 2024).

    o_t = q_t · Σ_{s<=t} λ^(t-s) k_s^T v_s          (per head; λ in (0, 1], λ = 1 is no decay)

Lightning Attention-2 splits the sequence into blocks of C tokens. Block b (local index t = 0..c-1) gets

    intra:  O_b  = ((Q_b K_b^T) ⊙ D) V_b,   D_ts = λ^(t-s) for s <= t, else 0
    inter:  O_b += (Q_b ⊙ λ^(t+1)) S_b                    S_b = state of every earlier token
    state:  S_{b+1} = λ^c S_b + (K_b ⊙ λ^(c-1-t))^T V_b

so memory is O(L·C + d_k·d_v) per head, never O(L^2). Exponents are kept non-negative (λ^(t+1), λ^(c-1-t)),
so no factor can overflow however small λ is.

The same algebra gives the sequence-parallel pieces (LASP, LASP-2): a chunk's memory state
``chunk_state`` (= S after the chunk, starting from 0), the term a prefix state adds (``apply_prefix``), and
their backward passes. The backward of the chunked kernel is written by hand (not autograd), in two passes
that keep only one d_k x d_v state alive: a forward pass for dQ's inter-block term, then a reverse pass with
the running state gradient G for dK, dV (G_b = λ^c G_{b+1} + (Q_b ⊙ λ^(t+1))^T dO_b).

Shapes: every function here works heads-first in the accumulation dtype: ``q, k [B, H, L, Dk]``,
``v, out [B, H, L, Dv]``, states ``[B, H, Dk, Dv]``, ``log_decay [H]`` (log λ; zeros = no decay).
The public ``[B, L, H, D]`` inputs are checked by ``seqpar.attention.checks.check_linear_args``.
"""

from __future__ import annotations

import torch

DEFAULT_LINEAR_BLOCK = 64


def heads_first(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, L, H, D] -> [B, H, L, D] in ``dtype`` (the layout of every function below)."""
    return x.transpose(1, 2).to(dtype)


def powers(log_decay: torch.Tensor, exponents: torch.Tensor | float) -> torch.Tensor:
    """λ_h^e as [H, len(e), 1] (or [H, 1, 1] for a scalar e), ready to scale [B, H, L, D] tensors."""
    e = torch.as_tensor(exponents, dtype=log_decay.dtype, device=log_decay.device).reshape(1, -1)
    return (log_decay[:, None] * e).exp().unsqueeze(-1)


def decay_mask(log_decay: torch.Tensor, c: int) -> torch.Tensor:
    """D [H, c, c] with D_ts = λ^(t-s) for s <= t and 0 above the diagonal."""
    idx = torch.arange(c, device=log_decay.device)
    diff = (idx[:, None] - idx[None, :]).to(log_decay.dtype)
    return (log_decay[:, None, None] * diff).masked_fill(diff < 0, float("-inf")).exp()


def _blocks(L: int, block_size: int):
    for s in range(0, L, block_size):
        c = min(block_size, L - s)
        yield slice(s, s + c), c


def linear_attention_fwd(q, k, v, log_decay, block_size: int = DEFAULT_LINEAR_BLOCK) -> torch.Tensor:
    """Causal decayed linear attention of one chunk from a zero initial state: ``out [B, H, L, Dv]``."""
    B, H, L, _ = q.shape
    S = q.new_zeros(B, H, k.shape[-1], v.shape[-1])
    out = q.new_empty(B, H, L, v.shape[-1])
    for sl, c in _blocks(L, block_size):
        qb, kb, vb = q[:, :, sl], k[:, :, sl], v[:, :, sl]
        t = torch.arange(c, device=log_decay.device)
        intra = ((qb @ kb.mT) * decay_mask(log_decay, c)) @ vb
        out[:, :, sl] = intra + (qb * powers(log_decay, t + 1)) @ S
        S = S * powers(log_decay, c) + (kb * powers(log_decay, c - 1 - t)).mT @ vb
    return out


def linear_attention_bwd(dout, q, k, v, log_decay, block_size: int = DEFAULT_LINEAR_BLOCK):
    """Gradients ``(dq, dk, dv)`` of ``linear_attention_fwd`` for ``dout [B, H, L, Dv]``."""
    B, H, L, _ = q.shape
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    # Pass 1 (forward order): dQ_b's inter-block term needs the state S_b of the blocks before it.
    S = q.new_zeros(B, H, k.shape[-1], v.shape[-1])
    for sl, c in _blocks(L, block_size):
        t = torch.arange(c, device=log_decay.device)
        dq[:, :, sl] = (dout[:, :, sl] @ S.mT) * powers(log_decay, t + 1)
        S = S * powers(log_decay, c) + (k[:, :, sl] * powers(log_decay, c - 1 - t)).mT @ v[:, :, sl]
    # Pass 2 (reverse order): intra-block terms, and dK, dV through G = dLoss/dS_{b+1} of the later blocks.
    G = torch.zeros_like(S)
    for sl, c in reversed(list(_blocks(L, block_size))):
        qb, kb, vb, dob = q[:, :, sl], k[:, :, sl], v[:, :, sl], dout[:, :, sl]
        t = torch.arange(c, device=log_decay.device)
        D, k_pow = decay_mask(log_decay, c), powers(log_decay, c - 1 - t)
        dA = (dob @ vb.mT) * D  # dLoss/d(Q K^T) through the masked product
        dq[:, :, sl] += dA @ kb
        dk[:, :, sl] = dA.mT @ qb + (vb @ G.mT) * k_pow
        dv[:, :, sl] = ((qb @ kb.mT) * D).mT @ dob + (kb * k_pow) @ G
        G = G * powers(log_decay, c) + (qb * powers(log_decay, t + 1)).mT @ dob
    return dq, dk, dv


def decay_grad(q, dq, k, dk, offset: int) -> torch.Tensor:
    """dLoss/d(log λ) [H] from the finished gradients of q and k, for tokens at global positions offset + t.

    With G_t = t log λ, o_t = Σ_{s<=t} e^(G_t - G_s) (q_t · k_s) v_s depends on G only through
    q̃_t = e^(G_t) q_t and k̃_s = e^(-G_s) k_s, so dLoss/dG_t = q_t · dq_t - k_t · dk_t and
    dLoss/d(log λ) = Σ_t t (q_t · dq_t - k_t · dk_t). Each rank returns its tokens' share (sum it over the
    group like any replicated parameter's gradient); a common offset of t cancels since Σ_t dLoss/dG_t = 0.
    """
    t = torch.arange(offset, offset + q.shape[2], device=q.device, dtype=q.dtype)[:, None]
    return ((q * dq - k * dk) * t).sum(dim=(0, 2, 3))


def chunk_state(k, v, log_decay) -> torch.Tensor:
    """Memory state of a chunk of n tokens, M = Σ_s λ^(n-1-s) k_s^T v_s: ``[B, H, Dk, Dv]``."""
    n = k.shape[2]
    return (k * powers(log_decay, torch.arange(n - 1, -1, -1, device=log_decay.device))).mT @ v


def chunk_state_bwd(k, v, dM, log_decay):
    """``(dk, dv)`` of ``chunk_state`` for a state gradient ``dM [B, H, Dk, Dv]``."""
    n = k.shape[2]
    k_pow = powers(log_decay, torch.arange(n - 1, -1, -1, device=log_decay.device))
    return (v @ dM.mT) * k_pow, (k * k_pow) @ dM


def apply_prefix(q, P, log_decay) -> torch.Tensor:
    """What the state P of all earlier tokens adds to a chunk's output: (Q ⊙ λ^(t+1)) P, ``[B, H, L, Dv]``."""
    return (q * powers(log_decay, torch.arange(1, q.shape[2] + 1, device=log_decay.device))) @ P


def apply_prefix_bwd(q, dout, P, log_decay):
    """``(dq, dP)`` of ``apply_prefix`` for ``dout [B, H, L, Dv]``."""
    q_pow = powers(log_decay, torch.arange(1, q.shape[2] + 1, device=log_decay.device))
    return (dout @ P.mT) * q_pow, (q * q_pow).mT @ dout
