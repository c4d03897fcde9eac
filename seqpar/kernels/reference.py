"""Independent single-process float64 references, written from the definitions: dense masked softmax
attention, the causal linear-attention recurrence with per-head decay, the S2/SF (LongLoRA, SinkLoRA) masks, and
the hybrid models' token-by-token recurrences (the gated delta rule, the short causal conv, Mamba2's SSD scan,
Mamba's selective scan).
O(L^2) memory or a Python loop over tokens: for checking, never for training.

Nothing here uses seqpar's kernels: the tests and ``seqpar demo`` compare seqpar against these.
"""

from __future__ import annotations

import torch


def dense_attention(q, k, v, mask=None, scale=None, dtype=torch.float64, sinks=None):
    """softmax(scale * Q K^T + mask) V with q [B, Lq, H, D], k/v [B, Lk, Hkv, D] (kv heads repeated).

    ``mask``: bool [Lq, Lk] or [H, Lq, Lk] (True = visible). Rows with no visible key give 0.
    ``sinks [H]``: a learned logit per head appended to every row's scores, with no value (gpt-oss ``s_aux``).
    Returns (out [B, Lq, H, D], lse [B, H, Lq]) in ``dtype``; differentiable.
    """
    H, Hkv = q.shape[2], k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qd, kd, vd = (t.to(dtype) for t in (q, k, v))
    kd, vd = kd.repeat_interleave(H // Hkv, dim=2), vd.repeat_interleave(H // Hkv, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", qd, kd) * scale
    if mask is not None:
        s = s.masked_fill(~mask.to(s.device), float("-inf"))
    if sinks is not None:  # one more column of scores; its probability multiplies a zero value
        s = torch.cat([s, sinks.to(dtype).view(1, -1, 1, 1).expand(*s.shape[:-1], 1)], dim=-1)
        vd = torch.cat([vd, vd.new_zeros(vd.shape[0], 1, *vd.shape[2:])], dim=1)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse).unsqueeze(-1))
    out = torch.einsum("bhqk,bkhd->bqhd", p, vd)
    return out, lse


def causal_mask(Lq, Lk, *, bottom_right=False):
    shift = Lk - Lq if bottom_right else 0
    return torch.arange(Lk)[None, :] <= torch.arange(Lq)[:, None] + shift


def segment_mask(q_seg, k_seg):
    return q_seg[:, None] == k_seg[None, :]


def rel_err(got, ref):
    """Max abs error relative to the reference's scale (max |ref|, floored at 1)."""
    got, ref = got.double(), ref.double()
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1.0)).item()


def linear_attention(q, k, v, decay=None, causal=True):
    """o_t = Σ_s (q_t · k_s) D_ts v_s with D_ts = λ^(t-s) for s <= t (causal), all ones otherwise; float64."""
    q, k, v = q.double(), k.double(), v.double()
    H, L = q.shape[2], q.shape[1]
    k, v = k.repeat_interleave(H // k.shape[2], dim=2), v.repeat_interleave(H // v.shape[2], dim=2)
    lam = torch.ones(H, dtype=torch.float64) if decay is None else decay.double()
    t = torch.arange(L, dtype=torch.float64)
    diff = t[:, None] - t[None, :]
    D = lam[:, None, None] ** diff.clamp_min(0) * (diff >= 0) if causal else torch.ones(H, L, L).double()
    scores = torch.einsum("bthd,bshd->bhts", q, k) * D
    return torch.einsum("bhts,bshd->bthd", scores, v)


def s2_mask(L: int, H: int, G: int, *, wrap: bool = False, num_sink_tokens: int = 0) -> torch.Tensor:
    """Bool [H, L, L], True = query t (row) sees key s (column), written from the definitions."""
    t = torch.arange(L)
    causal = t[None, :] <= t[:, None]
    same = lambda gid: gid[:, None] == gid[None, :]  # noqa: E731
    plain = same(t // G) & causal  # shift groups [0, G), [G, 2G), ...
    if wrap:  # roll by -G/2: token t sits at rolled position (t - G/2) mod L; causal in rolled order
        r = (t - G // 2) % L
        shifted = same(r // G) & (r[None, :] <= r[:, None])
    else:  # groups [0, G/2), [G/2, 3G/2), ..., [L - G/2, L)
        shifted = same((t + G // 2) // G) & causal
    sinks = (t[None, :] < num_sink_tokens) & causal
    return torch.stack([plain | sinks] * (H // 2) + [shifted | sinks] * (H // 2))


# One entry point per kind of attention, called with a primitive's own keyword arguments (the registry's
# ``reference`` field): global float64 inputs -> global float64 output, differentiable.


def softmax_reference(q, k, v, *, causal: bool = True, softmax_scale=None, cu_seqlens=None, sinks=None,
                      window=None, **_) -> torch.Tensor:
    """Dense softmax attention, causal and/or within the documents of ``cu_seqlens`` (global boundaries), with
    optional learned ``sinks`` (one extra logit per head) and sliding ``window`` (query i sees keys j with
    ``i - window < j <= i``, transformers' ``sliding_window_overlay``)."""
    L = q.shape[1]
    mask = causal_mask(L, L) if causal else torch.ones(L, L, dtype=torch.bool)
    if window is not None:
        pos = torch.arange(L)
        mask = mask & (pos[None, :] > pos[:, None] - window)
    if cu_seqlens is not None:
        doc = torch.zeros(L, dtype=torch.long)
        for start in torch.as_tensor(cu_seqlens)[1:-1].tolist():  # document id: boundaries at or before
            doc[start:] += 1
        mask = mask & segment_mask(doc, doc)
    return dense_attention(q, k, v, mask, scale=softmax_scale, sinks=sinks)[0]


def shifted_reference(q, k, v, *, group_size: int, wrap: bool = False, num_sink_tokens: int = 0,
                      softmax_scale=None, **_) -> torch.Tensor:
    """LongLoRA S2-Attn / SinkLoRA SF-Attn: dense attention under ``s2_mask``."""
    mask = s2_mask(q.shape[1], q.shape[2], group_size, wrap=wrap, num_sink_tokens=num_sink_tokens)
    return dense_attention(q, k, v, mask, scale=softmax_scale)[0]


def linear_reference(q, k, v, *, decay=None, causal: bool = True, **_) -> torch.Tensor:
    """Linear attention with per-head decay (``linear_attention``)."""
    if decay is not None and not isinstance(decay, torch.Tensor):
        decay = torch.full((q.shape[2],), float(decay), dtype=torch.float64)
    return linear_attention(q, k, v, decay, causal)


def gated_delta_reference(q, k, v, g, beta, *, cu_seqlens=None, use_qk_l2norm: bool = True, **_) -> torch.Tensor:
    """The gated delta rule token by token in float64 (Gated DeltaNet; transformers' decay-first convention):
    S_t = exp(g_t) (I - β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ, o_t = S_tᵀ q_t / sqrt(Dk), S reset to 0 at every
    document start of ``cu_seqlens``. ``q, k [B, L, Hk, Dk]``, ``v [B, L, Hv, Dv]``, ``g, beta [B, L, Hv]``
    (Hk divides Hv: each q/k head serves Hv/Hk consecutive value heads). A ``g [B, L, Hv, Dk]`` decays each key
    channel (row of S) on its own: Kimi Delta Attention, S_t = diag(exp g_t) (I - β_t k_t k_tᵀ) S_{t-1} + ...
    Returns ``[B, L, Hv, Dv]``."""
    q, k, v, g, beta = (t.double() for t in (q, k, v, g, beta))
    B, L, Hv, Dv = v.shape
    rep = Hv // k.shape[2]
    q, k = q.repeat_interleave(rep, dim=2), k.repeat_interleave(rep, dim=2)
    if use_qk_l2norm:
        q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6)
        k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    q = q / q.shape[-1] ** 0.5
    starts = set() if cu_seqlens is None else set(torch.as_tensor(cu_seqlens).tolist())
    S = q.new_zeros(B, Hv, k.shape[-1], Dv)
    out = []
    for t in range(L):
        if t in starts:
            S = torch.zeros_like(S)
        kt, bt = k[:, t], beta[:, t, :, None]  # [B, H, Dk], [B, H, 1]
        decay = g[:, t].exp()  # [B, H] or, per key channel, [B, H, Dk]
        S = (decay[..., None] if g.dim() == 4 else decay[..., None, None]) * S  # decay first
        u = bt * (v[:, t] - torch.einsum("bhkv,bhk->bhv", S, kt))  # the delta: what S does not yet predict
        S = S + kt[..., :, None] * u[..., None, :]
        out.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t]))
    return torch.stack(out, dim=1)


def causal_conv_reference(x, weight, bias=None, *, cu_seqlens=None, activation: str | None = "silu") -> torch.Tensor:
    """Depthwise causal convolution in float64, y_t = act(b + Σ_j w_j x_{t-K+1+j}) over tokens of t's document
    only: ``x [B, C, L]``, ``weight [C, K]``. Returns ``[B, C, L]``."""
    x, w = x.double(), weight.double()
    B, C, L = x.shape
    K = w.shape[-1]
    doc = torch.zeros(L, dtype=torch.long)
    for start in ([] if cu_seqlens is None else torch.as_tensor(cu_seqlens)[1:-1].tolist()):
        doc[start:] += 1
    y = torch.zeros(B, C, L, dtype=torch.float64) + (0 if bias is None else bias.double()[None, :, None])
    for t in range(L):
        for j in range(K):
            s = t - K + 1 + j
            if s >= 0 and doc[s] == doc[t]:
                y[:, :, t] += w[:, j] * x[:, :, s]
    return torch.nn.functional.silu(y) if activation in ("silu", "swish") else y


def ssd_reference(x, dt, A, B, C, D=None, *, cu_seqlens=None) -> torch.Tensor:
    """The SSD recurrence token by token in float64, per head h (group g(h) = h // (H / G) for B and C):

        h_t = exp(Δ_t A_h) h_{t-1} + Δ_t x_t B_tᵀ        (state [P, N], reset to 0 at every document start)
        y_t = h_t C_t + D_h x_t

    ``x [B, L, H, P]``, ``dt [B, L, H]`` (Δ, already softplus'd and clamped), ``A [H]`` (< 0), ``B, C [B, L, G, N]``,
    ``D [H]`` or None. Returns ``[B, L, H, P]`` in float64; differentiable."""
    x, dt, A, B, C = (t.double() for t in (x, dt, A, B, C))
    batch, L, H, P = x.shape
    rep = H // B.shape[2]
    B, C = B.repeat_interleave(rep, dim=2), C.repeat_interleave(rep, dim=2)
    starts = set() if cu_seqlens is None else set(torch.as_tensor(cu_seqlens).tolist())
    h = x.new_zeros(batch, H, P, B.shape[-1])
    out = []
    for t in range(L):
        if t in starts:
            h = torch.zeros_like(h)
        decay = torch.exp(dt[:, t] * A)[..., None, None]  # [B, H, 1, 1]
        h = decay * h + (dt[:, t, :, None] * x[:, t])[..., :, None] * B[:, t, :, None, :]
        y = torch.einsum("bhpn,bhn->bhp", h, C[:, t])
        out.append(y if D is None else y + D.double()[:, None] * x[:, t])
    return torch.stack(out, dim=1)


def selective_scan_reference(x, dt, A, B, C, D=None, *, cu_seqlens=None) -> torch.Tensor:
    """The Mamba (v1) selective scan token by token in float64, per channel d and state n:

        h_t[d, n] = exp(Δ_t[d] A[d, n]) h_{t-1}[d, n] + Δ_t[d] B_t[n] x_t[d]     (h reset to 0 at every
        y_t[d]    = Σ_n C_t[n] h_t[d, n] + D[d] x_t[d]                             document start)

    ``x, dt [B, L, D]`` (Δ, already biased and softplus'd), ``A [D, N]`` (< 0), ``B, C [B, L, N]``, ``D [D]`` or
    None. Returns ``[B, L, D]`` in float64; differentiable."""
    x, dt, A, B, C = (t.double() for t in (x, dt, A, B, C))
    starts = set() if cu_seqlens is None else set(torch.as_tensor(cu_seqlens).tolist())
    h = x.new_zeros(x.shape[0], *A.shape)
    out = []
    for t in range(x.shape[1]):
        if t in starts:
            h = torch.zeros_like(h)
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * x[:, t])[..., None] * B[:, t, None, :]
        y = torch.einsum("bdn,bn->bd", h, C[:, t])
        out.append(y if D is None else y + D.double() * x[:, t])
    return torch.stack(out, dim=1)
