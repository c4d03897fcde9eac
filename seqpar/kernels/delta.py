"""The chunked gated delta rule on one device (Yang, Kautz, Hatamizadeh 2025, "Gated Delta Networks:
Improving Mamba2 with Delta Rule"; WY/UT form of Yang et al. 2024, "Parallelizing Linear Transformers with
the Delta Rule over Sequence Length"), in the accumulation dtype (float32, or float64 for float64 inputs),
with a recomputing backward.

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
1.4x slower forward + backward at L = 8192 on CPU). A partial last chunk is a chunk of its own length (nothing
is padded). Every exponent used is <= 0 (γ_t - γ_s for s <= t, γ_t, γ_C - γ_t): nothing overflows.

Kimi Delta Attention (Kimi Team 2025, "Kimi Linear") gates each key channel: α_t = exp(g_t) with g_t [Dk], and
S_t = diag(α_t) (I - β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ. The same solve holds with every e^{γ} taken per
channel: A_ts = β_t Σ_c e^{γ_tc-γ_sc} k_tc k_sc, (QKᵀ ⊙ E)_ts = Σ_c e^{γ_tc-γ_sc} q_tc k_sc (pairwise on
16-token diagonal blocks, matmuls through a block's last token below them: ``_decayed_products``; transformers'
``chunk_kimi_delta_attention`` takes the whole chunk pairwise, [C, C, Dk], 4x the memory), Y = T (β K ⊙ e^γ),
the inter-chunk term (Q ⊙ e^γ) S_0 and S_C = diag(e^{γ_C}) S_0 + (K ⊙ e^{γ_C-γ})ᵀ u. ``g`` shaped like ``k``
(``[B, L, H, Dk]``) selects it.

A state wider than the values (``S [Dk, Dv + Dk]`` against ``v [.., Dv]``) runs the rule with the values
widened by zero columns, ``[V | 0]``, without materialising them: from ``[0 | I]`` its exit state is the
affine map ``[U | M]`` of the sequence (``seqpar.attention.gated_delta``).

Forward and recomputing backward (``delta_forward`` / ``delta_backward``): the forward runs without autograd,
writes each segment's output into the caller's output tensor and keeps only the state at the start of each
segment of ``SEGMENT_CHUNKS`` chunks; the backward walks the segments from the last, recomputes one segment
from its saved entry state with autograd (the input preparation included: heads-first view, dtype, GQA head
repeat, L2 normalisation, query scale, all per token), and backpropagates the output gradient and the
state gradient through it into the caller's gradient buffers, handing the entry state's gradient to the
segment before. Exactly the gradients of autograd through the whole pass (same operations, same order
within a chunk), at one forward of extra work.

Memory, per head, in units of one [L, D] tensor (L the local length, D = Dk = Dv): held between forward and
backward, the entry states of the segments, Dk·Dv·L/(SEGMENT_CHUNKS·C) values = D/(SEGMENT_CHUNKS·C) units
(1/4 for D = C = 64; twice that for the widened state); the inputs are the caller's (not copied). Transient,
in forward or backward: one segment's autograd graph, O(SEGMENT_CHUNKS·C·(C + D)) values, independent of L.
Autograd through the whole pass (before 0.3) kept every chunk's intermediates: the forward + backward of
``seqpar bench hybrid``'s one-process GDN call (L = 8192, H = 8, D = 64, float32; 1 unit = 16 MiB) peaked at
646 MiB (40 units, inputs and gradients included) against 183 MiB (11 units) now, and was slower (0.88 s
against 0.59 s, best of three alternated runs on a shared 2-core machine).

Shapes: the public functions take transformers' layout, ``q, k [B, L, Hk, Dk]``, ``v [B, L, Hv, Dv]``,
``g, beta [B, L, Hv]`` (Hk divides Hv: grouped value heads), states ``[B, Hv, Dk, Dv(+Dk)]`` in the
accumulation dtype; outputs ``[B, L, Hv, Dv]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_DELTA_CHUNK = 64  # transformers' and flash-linear-attention's chunk size
SEGMENT_CHUNKS = 4  # chunks recomputed together in backward: fewer autograd calls vs a larger graph alive
SUB_BLOCK = 16  # per-channel decays: tokens per diagonal block taken pairwise (``_decayed_products``)


@dataclass(frozen=True)
class DeltaOptions:
    """How the raw inputs become the rule's: accumulation dtype, value heads per key head, transformers'
    ``use_qk_l2norm_in_kernel``, the query scale (Dk^-1/2) and the chunk size."""

    acc: torch.dtype
    rep: int = 1
    l2norm: bool = True
    scale: float = 1.0
    chunk_size: int = DEFAULT_DELTA_CHUNK


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(|x|² + eps), transformers' and flash-linear-attention's ``use_qk_l2norm_in_kernel``."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def _prepare(q, k, v, g, beta, opt: DeltaOptions):
    """[B, s, H, D] slices -> heads-first [B, H, s, D] in the accumulation dtype, k, q normalised and q scaled."""
    if opt.rep > 1:
        q, k = q.repeat_interleave(opt.rep, dim=2), k.repeat_interleave(opt.rep, dim=2)
    q, k, v, g, beta = (x.transpose(1, 2).to(opt.acc) for x in (q, k, v, g, beta))
    if opt.l2norm:
        q, k = l2_normalize(q), l2_normalize(k)
    return q * opt.scale, k, v, g, beta


def _chunk(q, k, v, g, beta, S, want_out: bool):
    """One chunk from state S: (output or None, exit state). S may be wider than v (zero value columns)."""
    C, dv = k.shape[2], v.shape[-1]
    lower = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    kb = k * beta[..., None]
    if g.dim() == k.dim():  # a decay per key channel (Kimi Delta Attention): γ [B, H, C, Dk]
        gamma = g.cumsum(-2)
        A = _decayed_products(kb, k, gamma, lower)  # β_t Σ_c e^{γ_tc-γ_sc} k_tc k_sc
        QK = _decayed_products(q, k, gamma, lower) if want_out else None
        eg, last = gamma.exp(), gamma[..., -1, :, None]  # e^{γ_t} per channel; the chunk's log decay per row of S
        tail = (gamma[..., -1:, :] - gamma).exp()
    else:
        gamma = g.cumsum(-1)  # [B, H, C]
        diff = gamma[..., :, None] - gamma[..., None, :]  # γ_t - γ_s
        E = torch.where(lower, diff, float("-inf")).exp()  # e^{γ_t-γ_s} for s <= t, else 0
        A = (kb @ k.transpose(-1, -2)) * E  # β_t e^{γ_t-γ_s} k_t·k_s; the diagonal is ignored (unit triangular)
        QK = (q @ k.transpose(-1, -2)) * E if want_out else None
        eg, last = gamma.exp()[..., None], gamma[..., -1, None, None]
        tail = (gamma[..., -1:] - gamma).exp()[..., None]  # e^{γ_C - γ_t}
    rhs = torch.cat([v * beta[..., None], kb * eg], dim=-1)
    WY = torch.linalg.solve_triangular(A.tril(-1) + torch.eye(C, dtype=A.dtype, device=A.device), rhs,
                                       upper=False, unitriangular=True)
    W, Y = WY.split([dv, k.shape[-1]], dim=-1)
    if S.shape[-1] > dv:  # widened values [V | 0]: W's zero columns
        W = torch.cat([W, W.new_zeros(*W.shape[:-1], S.shape[-1] - dv)], dim=-1)
    u = W - Y @ S
    out = (q * eg) @ S + QK @ u if want_out else None
    S = last.exp() * S + (k * tail).transpose(-1, -2) @ u
    return out, S


def _decayed_products(a, b, gamma, lower, block: int = SUB_BLOCK):
    """M_ts = Σ_c a_tc b_sc e^{γ_tc - γ_sc} for s <= t, 0 above the diagonal ([.., C, Dk] -> [.., C, C]).

    On the diagonal blocks of ``block`` tokens the decays are taken pairwise ([block, block, Dk], every exponent
    <= 0 under the mask); below them, for the columns of block j and every later row, through block j's last
    token b: (a_t ⊙ e^{γ_t-γ_b}) · (b_s ⊙ e^{γ_b-γ_s}), a matmul of two factors <= 1 (nothing overflows; a
    product that underflows is below 1e-38 of the terms it sums with)."""
    C = a.shape[-2]
    out = a.new_zeros(*a.shape[:-2], C, C)
    for j0 in range(0, C, block):
        j1 = min(j0 + block, C)
        diff = gamma[..., j0:j1, None, :] - gamma[..., None, j0:j1, :]
        E = torch.where(lower[j0:j1, j0:j1, None], diff, float("-inf")).exp()
        out[..., j0:j1, j0:j1] = (a[..., j0:j1, None, :] * b[..., None, j0:j1, :] * E).sum(-1)
        if j1 < C:
            ref = gamma[..., j1 - 1:j1, :]
            rows = a[..., j1:, :] * (gamma[..., j1:, :] - ref).exp()
            out[..., j1:, j0:j1] = rows @ (b[..., j0:j1, :] * (ref - gamma[..., j0:j1, :]).exp()).transpose(-1, -2)
    return out


def _segments(L: int, opt: DeltaOptions) -> list[slice]:
    span = opt.chunk_size * SEGMENT_CHUNKS
    return [slice(s, min(s + span, L)) for s in range(0, L, span)]


def _run(q, k, v, g, beta, S, opt: DeltaOptions, want_out: bool):
    """Prepared heads-first tensors of one segment from state S: (output [B, H, s, Dv] or None, exit state)."""
    outs, L = [], k.shape[2]
    for start in range(0, L, opt.chunk_size):
        sl = slice(start, min(start + opt.chunk_size, L))
        o, S = _chunk(q[:, :, sl], k[:, :, sl], v[:, :, sl], g[:, :, sl], beta[:, :, sl], S, want_out)
        outs.append(o)
    return (torch.cat(outs, dim=2) if want_out else None), S


def delta_forward(q, k, v, g, beta, S0: torch.Tensor, opt: DeltaOptions,
                  out: torch.Tensor | None = None,
                  out_map: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The rule over ``[B, L, ...]`` inputs from ``S0``, without autograd: writes the output into ``out``
    (``[B, L, Hv, Dv]``, any dtype; None: states only) and returns (exit state, the entry state of each
    segment, which ``delta_backward`` needs). With a widened state ``S0 [.., Dk, Dv + Dk]`` and ``out_map``
    (``[B, L, Hv, Dk]``), the output's first Dv columns go to ``out`` and the last Dk to ``out_map``."""
    entries = []
    with torch.no_grad():
        S = S0
        for sl in _segments(k.shape[1], opt):
            entries.append(S)
            o, S = _run(*_prepare(q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl], opt), S, opt, out is not None)
            if out_map is not None:
                o, o_map = o.split([v.shape[-1], o.shape[-1] - v.shape[-1]], dim=-1)
                out_map[:, sl] = o_map.transpose(1, 2)
            if out is not None:
                out[:, sl] = o.transpose(1, 2)
    return S, entries


def delta_backward(q, k, v, g, beta, entries: list[torch.Tensor], opt: DeltaOptions, grads: list[torch.Tensor],
                   dout: torch.Tensor | None, dS: torch.Tensor | None,
                   out_map_to: torch.Tensor | None = None) -> torch.Tensor:
    """Backward of ``delta_forward`` (same inputs, its ``entries``), segment by segment from the last, each
    recomputed with autograd: adds the input gradients into ``grads`` (dq, dk, dv, dg, dbeta buffers shaped like
    the inputs) and returns the gradient of ``S0``. ``dout``: the output's gradient (None: the forward wrote
    no output); ``dS``: the exit state's (None: zero). ``out_map_to`` (``[B, Hv, Dk, Dv]``): the forward wrote
    ``out_map`` too, and the caller used it as ``out_map @ out_map_to``; its gradient ``dout @ out_map_toᵀ``
    is formed here one segment at a time."""
    segments = _segments(k.shape[1], opt)
    for sl, S_in in zip(reversed(segments), reversed(entries)):
        with torch.enable_grad():
            leaves = [x[:, sl].detach().requires_grad_() for x in (q, k, v, g, beta)]
            S = S_in.detach().requires_grad_()
            o, S_out = _run(*_prepare(*leaves, opt), S, opt, dout is not None)
            roots, seeds = [S_out], [torch.zeros_like(S_out) if dS is None else dS]
            if dout is not None:
                roots.append(o)
                d = dout[:, sl].transpose(1, 2).to(o.dtype)
                seeds.append(d if out_map_to is None else torch.cat([d, d @ out_map_to.transpose(-1, -2)], dim=-1))
            *dx, dS = torch.autograd.grad(roots, [*leaves, S], seeds, allow_unused=True)  # q: not in a map pass
        for buf, d in zip(grads, dx):
            if d is not None:
                buf[:, sl] += d
    return dS


def gated_delta_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                        initial_state: torch.Tensor | None = None,
                        chunk_size: int = DEFAULT_DELTA_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """The rule on prepared heads-first tensors (``q, k [B, H, L, Dk]``, normalised and scaled; ``v [B, H, L,
    Dv]``; ``g, beta [B, H, L]``), differentiable by autograd through every chunk (it keeps every chunk's
    intermediates: for tests and small inputs). Returns ``(out [B, H, L, Dv], final_state)``."""
    B, H, L, Dk = k.shape
    S = q.new_zeros(B, H, Dk, v.shape[-1]) if initial_state is None else initial_state
    if L == 0:
        return v.new_zeros(B, H, 0, v.shape[-1]), S
    return _run(q, k, v, g, beta, S, DeltaOptions(acc=q.dtype, chunk_size=chunk_size), True)
