"""The chunked gated delta rule on one device (Yang, Kautz, Hatamizadeh 2025, "Gated Delta Networks:
Improving Mamba2 with Delta Rule"; WY/UT form of Yang et al. 2024, "Parallelizing Linear Transformers with
the Delta Rule over Sequence Length"), in the accumulation dtype (float32, or float64 for float64 inputs).

Per head, with state S [Dk, Dv], decay α_t = exp(g_t) and write strength β_t (transformers' convention:
decay first, then the delta update):

    S_t = α_t (I - β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ,        o_t = S_tᵀ q_t

Within a chunk of C tokens entered with state S_0, let γ_t = Σ_{s<=t} g_s (from the chunk's start) and
u_t = β_t (v_t - α_t S_{t-1}ᵀ k_t) the written "new value". Then α_t S_{t-1} = e^{γ_t} S_0 + Σ_{s<t}
e^{γ_t-γ_s} k_s u_sᵀ, so the u solve one unit lower-triangular system (I + A) u = β V - β e^γ K S_0,
A_ts = β_t e^{γ_t-γ_s} k_t·k_s (s < t), and with T = (I + A)^{-1}:

    u   = T (β V) - T (β e^γ K) S_0                                    (W = T β V, Y = T β e^γ K)
    O   = (Q ⊙ e^γ) S_0 + ((Q Kᵀ) ⊙ E) u,   E_ts = e^{γ_t-γ_s} (s <= t)
    S_C = e^{γ_C} S_0 + (K ⊙ e^{γ_C-γ})ᵀ u

Chunk by chunk, carrying S (batching the chunk-local terms over all chunks and scanning only S was tried:
1.4x slower forward + backward at L = 8192 on CPU, as autograd's backward of each per-chunk slice of a
batched tensor writes a full-size gradient). A partial last chunk is a chunk of its own length (nothing is
padded). Every exponent used is <= 0 (γ_t - γ_s for s <= t, γ_t, γ_C - γ_t): nothing overflows. Memory
O(L·C) per head; differentiable by autograd, which keeps the chunks' intermediates for the backward.

Shapes (heads first, already in the accumulation dtype): ``q, k [B, H, L, Dk]`` (normalised and scaled by
the caller), ``v [B, H, L, Dv]``, ``g, beta [B, H, L]``, ``initial_state [B, H, Dk, Dv]`` or None.
Returns ``(out [B, H, L, Dv], final_state [B, H, Dk, Dv])``.
"""

from __future__ import annotations

import torch

DEFAULT_DELTA_CHUNK = 64  # transformers' and flash-linear-attention's chunk size


def gated_delta_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                        initial_state: torch.Tensor | None = None,
                        chunk_size: int = DEFAULT_DELTA_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule over a whole (local) sequence: the module docstring's equations."""
    B, H, L, Dk = k.shape
    S = q.new_zeros(B, H, Dk, v.shape[-1]) if initial_state is None else initial_state
    outs = []
    for start in range(0, L, chunk_size):
        sl = slice(start, min(start + chunk_size, L))
        o, S = _chunk(q[:, :, sl], k[:, :, sl], v[:, :, sl], g[:, :, sl], beta[:, :, sl], S)
        outs.append(o)
    out = torch.cat(outs, dim=2) if outs else v.new_zeros(B, H, 0, v.shape[-1])
    return out, S


def _chunk(q, k, v, g, beta, S):
    C = k.shape[2]
    gamma = g.cumsum(-1)  # [B, H, C]
    diff = gamma[..., :, None] - gamma[..., None, :]  # γ_t - γ_s
    lower = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    E = torch.where(lower, diff, float("-inf")).exp()  # e^{γ_t-γ_s} for s <= t, else 0
    kb = k * beta[..., None]
    A = (kb @ k.transpose(-1, -2)) * E  # β_t e^{γ_t-γ_s} k_t·k_s; the diagonal is ignored (unit triangular)
    eg = gamma.exp()[..., None]
    rhs = torch.cat([v * beta[..., None], kb * eg], dim=-1)
    WY = torch.linalg.solve_triangular(A.tril(-1) + torch.eye(C, dtype=A.dtype, device=A.device), rhs,
                                       upper=False, unitriangular=True)
    W, Y = WY.split([v.shape[-1], k.shape[-1]], dim=-1)
    u = W - Y @ S
    out = (q * eg) @ S + ((q @ k.transpose(-1, -2)) * E) @ u
    tail = (gamma[..., -1:] - gamma).exp()[..., None]  # e^{γ_C - γ_t}
    S = gamma[..., -1, None, None].exp() * S + (k * tail).transpose(-1, -2) @ u
    return out, S


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(|x|² + eps), transformers' and flash-linear-attention's ``use_qk_l2norm_in_kernel``."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)
