"""Sequence-parallel gated delta rule (Gated DeltaNet: Qwen3-Next, Qwen3.5, OLMo-hybrid) by LASP-2's one
all-gather, generalised to affine state maps (``seqpar.attention.affine_maps``).

The rule S_t = α_t (I - β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ, o_t = S_tᵀ q_t is affine in the state, and so is
its output: from entry state S_in, a shard's outputs are O = O⁰ + O^M S_in and its exit state is
M S_in + U. All of O⁰, O^M, M, U come from ONE local chunked pass (``seqpar.kernels.delta``) run with the
values widened to ``[V | 0]`` and the entry state ``[0 | I]``: the rule acts on each value column alone, so
the first Dv columns are the zero-state run (O⁰, U) and the last Dk the identity-state run (O^M = the queries
read through the shard's transition, M the transition). Then one all-gather of the maps (M, U), the fold of
the predecessors' maps into S_in, and O = O⁰ + O^M S_in: a [n, Dk] x [Dk, Dv] matmul per head. The widened pass
costs Dk more value columns than one device's (2x the rule's value-side work for Dk = Dv); nothing else
grows with N.

Packed documents (``cu_seqlens``, global boundaries): state resets at each document start, so every piece of
a document on this shard runs from zero except a first piece that continues an earlier rank's document; a
shard that holds a document start passes a zero transition M = 0 (its exit state does not depend on S_in).

Shapes: ``q, k [B, n, Hk, Dk]``, ``v [B, n, Hv, Dv]``, ``g, beta [B, n, Hv]`` (contiguous layout, n = L/N;
Hk divides Hv as in transformers' grouped value heads), output ``[B, n, Hv, Dv]`` in q's dtype. Computed in
float32 (float64 for float64 inputs; transformers' own function is float32 always); backward by autograd
through the kernel and ``affine_maps``' mirrored fold.

Bytes per call, per rank: ``gated_delta_bytes`` (``affine_maps.entry_state_bytes``): forward
(N-1)·B·Hv·Dk·(Dk+Dv)·itemsize, backward (N-1)·B·Hv·Dk·Dv·itemsize; independent of L.
"""

from __future__ import annotations

import torch

from seqpar.attention.affine_maps import entry_state, entry_state_bytes, tie
from seqpar.comm import Group, group_rank, group_size
from seqpar.kernels import acc_dtype
from seqpar.kernels.delta import DEFAULT_DELTA_CHUNK, gated_delta_chunked, l2_normalize
from seqpar.sharding import local_documents


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    group: Group = None,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm: bool = True,
    chunk_size: int = DEFAULT_DELTA_CHUNK,
) -> torch.Tensor:
    """The gated delta rule over the whole sequence from this rank's contiguous shard (exact, one all-gather).

    Args:
        q, k, v, g, beta: this rank's shard, transformers' ``torch_chunk_gated_delta_rule`` arguments (g is the
            log decay, <= 0; q is scaled by Dk^-1/2 here, after the optional L2 normalisation).
        group: the SP process group (None = one device).
        cu_seqlens: global document boundaries of a packed sequence (``seqpar.models.shard_batch``), or None.
        use_qk_l2norm: transformers' ``use_qk_l2norm_in_kernel`` (eps 1e-6, as flash-linear-attention).
        chunk_size: tokens per chunk of the local pass.
    """
    N, rank, n = group_size(group), group_rank(group), q.shape[1]
    if g.shape != beta.shape or g.shape != v.shape[:3] or v.shape[2] % k.shape[2] or q.shape != k.shape:
        raise ValueError(f"gated_delta_rule: q {tuple(q.shape)}, k {tuple(k.shape)} [B, n, Hk, Dk], v {tuple(v.shape)} "
                         f"[B, n, Hv, Dv], g {tuple(g.shape)} and beta {tuple(beta.shape)} [B, n, Hv] do not match")
    dtype, acc = q.dtype, acc_dtype(q.dtype)
    rep = v.shape[2] // k.shape[2]
    q, k = (x.repeat_interleave(rep, dim=2) if rep > 1 else x for x in (q, k))
    q, k, v, g, beta = (x.transpose(1, 2).to(acc) for x in (q, k, v, g, beta))
    if use_qk_l2norm:
        q, k = l2_normalize(q), l2_normalize(k)
    q = q * q.shape[-1] ** -0.5
    B, H, _, Dk = k.shape
    Dv = v.shape[-1]
    outs, M, U = [], None, None
    for start, end, doc_start in local_documents(cu_seqlens, n, N, rank):
        sl = slice(start, end)
        if doc_start < rank * n:  # continues a document of earlier ranks: widen by the identity-state run
            eye = torch.eye(Dk, dtype=acc, device=q.device).expand(B, H, Dk, Dk)
            wide = torch.cat([v[:, :, sl], v.new_zeros(B, H, end - start, Dk)], dim=-1)
            init = torch.cat([v.new_zeros(B, H, Dk, Dv), eye], dim=-1)
            o, S = gated_delta_chunked(q[:, :, sl], k[:, :, sl], wide, g[:, :, sl], beta[:, :, sl], init, chunk_size)
            outs.append(o)
            M, U = S[..., Dv:], S[..., :Dv]
        else:
            o, U = gated_delta_chunked(q[:, :, sl], k[:, :, sl], v[:, :, sl], g[:, :, sl], beta[:, :, sl], None,
                                       chunk_size)
            outs.append(o)
            M = None  # a document starts on this shard: the exit state does not depend on the entry state
    if N > 1:
        M = torch.zeros(B, H, Dk, Dk, dtype=acc, device=q.device) if M is None else M
        S_in = entry_state(M, U, group)
        o = outs[0]
        outs[0] = o[..., :Dv] + o[..., Dv:] @ S_in if o.shape[-1] == Dv + Dk else tie(o, S_in)
    return torch.cat(outs, dim=2).transpose(1, 2).to(dtype)


def gated_delta_bytes(q, k, v, *_, group: Group = None, **__) -> tuple[int, int]:
    """(forward, backward) bytes this rank sends in one call: the module docstring's formula."""
    B, _, Hv, Dv = v.shape
    Dk = k.shape[-1]
    return entry_state_bytes((B, Hv, Dk, Dv), Dk, acc_dtype(q.dtype).itemsize, group)
