"""Chunked causal linear attention with per-head decay on one device (Lightning Attention-2, Qin et al. 2024).

    o_t = q_t · Σ_{s<=t} λ^(t-s) k_s^T v_s          (per head; λ in (0, 1], λ = 1 is no decay)

Lightning Attention-2 splits the sequence into blocks of C tokens (``block_size``, default 64; the last block
is zero-padded). Block b (local index t = 0..C-1) gets

    intra:  O_b  = ((Q_b K_b^T) ⊙ D) V_b,   D_ts = λ^(t-s) for s <= t, else 0
    inter:  O_b += (Q_b ⊙ λ^(t+1)) S_b                    S_b = state of every earlier token
    state:  S_{b+1} = λ^c S_b + (K_b ⊙ λ^(c-1-t))^T V_b

All blocks are computed together: the intra-block terms and the blocks' own states in batched matmuls, the
states S_b by one scan over blocks (the only sequential step, nb elementwise updates of d_k x d_v), the decay
powers built once per call. Memory O(L·C + (L/C)·d_k·d_v) per head, never O(L^2). Exponents are kept
non-negative (λ^(t+1), λ^(C-1-t)), so no factor can overflow however small λ is.

The same algebra gives the sequence-parallel pieces (LASP, LASP-2): a chunk's memory state
``chunk_state`` (= S after the chunk, starting from 0), the term a prefix state adds (``apply_prefix``), and
their backward passes. The backward of the chunked kernel is written by hand (not autograd): the states S_b
for dQ's inter-block term, and the state gradients G_b = λ^C G_{b+1} + (Q_{b+1} ⊙ λ^(t+1))^T dO_{b+1} by one
reverse scan for dK, dV.

Shapes: every function here works heads-first in the accumulation dtype: ``q, k [B, H, L, Dk]``,
``v, out [B, H, L, Dv]``, states ``[B, H, Dk, Dv]``, ``log_decay [H]`` (log λ; zeros = no decay).
The public ``[B, L, H, D]`` inputs are checked by ``seqpar.attention.checks.check_linear_args``.
"""

from __future__ import annotations

import torch

DEFAULT_LINEAR_BLOCK = 64
RUN_SCORES = 1 << 20  # at most this many score elements (4 MB in float32) computed together (``_runs``)


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


def _chunked(x: torch.Tensor, C: int) -> torch.Tensor:
    """[B, H, L, D] -> [nb, B, H, C, D] (chunk-major: a run of chunks is one contiguous slab), zero-padding the
    last chunk (zero keys/values add nothing to any state, zero queries/output gradients give zero rows that
    are cut off again)."""
    B, H, L, D = x.shape
    nb = -(-L // C)
    if nb * C != L:
        x = torch.nn.functional.pad(x, (0, 0, 0, nb * C - L))
    return x.reshape(B, H, nb, C, D).permute(2, 0, 1, 3, 4).contiguous()


def _unchunked(x: torch.Tensor, L: int) -> torch.Tensor:
    nb, B, H, C, D = x.shape
    return x.permute(1, 2, 0, 3, 4).reshape(B, H, nb * C, D)[:, :, :L]


def _chunk_decay(log_decay: torch.Tensor, C: int):
    """Once per call: D [H, C, C], λ^(t+1) and λ^(C-1-t) as [H, C, 1], λ^C as [H, 1, 1]."""
    t = torch.arange(C, device=log_decay.device)
    return (decay_mask(log_decay, C), powers(log_decay, t + 1), powers(log_decay, C - 1 - t),
            powers(log_decay, float(C)))


def _runs(nb: int, B: int, H: int, C: int, reverse: bool = False) -> list[slice]:
    """Runs of chunks computed together: all of them, unless their C x C scores would pass ``RUN_SCORES``
    elements (memory stays O(L·C) per head but bounded per call; measured on a loaded 2-core CPU, smaller
    cache-sized runs were not reliably faster)."""
    g = max(1, RUN_SCORES // (B * H * C * C))
    runs = [slice(a, min(a + g, nb)) for a in range(0, nb, g)]
    return runs[::-1] if reverse else runs


def _scan(M: torch.Tensor, carry: torch.Tensor, lam_C: torch.Tensor, *, reverse: bool):
    """Exclusive decayed scan over a run of chunks ``M [g, B, H, Dk, Dv]`` from ``carry``: S_b = λ^C S_{b-1} +
    M_{b-1} (forward) or G_b = λ^C G_{b+1} + M_{b+1} (reverse); returns (states [g, ...], carry out)."""
    out = torch.empty_like(M)
    order = range(M.shape[0] - 1, -1, -1) if reverse else range(M.shape[0])
    for b in order:
        out[b] = carry
        carry = torch.addcmul(M[b], carry, lam_C)
    return out, carry


def linear_attention_fwd(q, k, v, log_decay, block_size: int = DEFAULT_LINEAR_BLOCK) -> torch.Tensor:
    """Causal decayed linear attention of one chunk from a zero initial state: ``out [B, H, L, Dv]``.

    Blocks are computed a run at a time: intra-block scores of every block of the run in one batched matmul,
    the states by a scan, the inter-block term in one more batched matmul.
    """
    B, H, L, _ = q.shape
    C = min(block_size, L)
    D, q_pow, k_pow, lam_C = _chunk_decay(log_decay, C)
    qc, kc, vc = _chunked(q, C), _chunked(k, C), _chunked(v, C)
    out = torch.empty(*qc.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
    S = q.new_zeros(B, H, k.shape[-1], v.shape[-1])
    for r in _runs(qc.shape[0], B, H, C):
        Sr, S = _scan((kc[r] * k_pow).mT @ vc[r], S, lam_C, reverse=False)
        torch.matmul((qc[r] @ kc[r].mT).mul_(D), vc[r], out=out[r])  # intra
        out[r] += (qc[r] * q_pow) @ Sr  # inter
    return _unchunked(out, L)


def linear_attention_bwd(dout, q, k, v, log_decay, block_size: int = DEFAULT_LINEAR_BLOCK):
    """Gradients ``(dq, dk, dv)`` of ``linear_attention_fwd`` for ``dout [B, H, L, Dv]``, run by run like it:
    the states S_b by a forward scan, G_b = dLoss/d(state after block b) from the later blocks by a reverse one."""
    B, H, L, _ = q.shape
    C = min(block_size, L)
    D, q_pow, k_pow, lam_C = _chunk_decay(log_decay, C)
    qc, kc, vc, doc = _chunked(q, C), _chunked(k, C), _chunked(v, C), _chunked(dout, C)
    dq, dk, dv = torch.empty_like(qc), torch.empty_like(kc), torch.empty_like(vc)
    S = q.new_zeros(B, H, k.shape[-1], v.shape[-1])
    for r in _runs(qc.shape[0], B, H, C):  # dQ's inter-block term needs the states before each block
        Sr, S = _scan((kc[r] * k_pow).mT @ vc[r], S, lam_C, reverse=False)
        torch.mul(doc[r] @ Sr.mT, q_pow, out=dq[r])
    G = torch.zeros_like(S)
    for r in _runs(qc.shape[0], B, H, C, reverse=True):
        qb, kb, vb, dob = qc[r], kc[r], vc[r], doc[r]
        Gr, G = _scan((qb * q_pow).mT @ dob, G, lam_C, reverse=True)
        dA = (dob @ vb.mT).mul_(D)  # dLoss/d(Q K^T) through the masked product
        dq[r] += dA @ kb
        dk[r] = (vb @ Gr.mT).mul_(k_pow).add_(dA.mT @ qb)
        dv[r] = ((kb * k_pow) @ Gr).add_((qb @ kb.mT).mul_(D).mT @ dob)
    return _unchunked(dq, L), _unchunked(dk, L), _unchunked(dv, L)


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
