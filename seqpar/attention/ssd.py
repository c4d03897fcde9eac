"""Sequence-parallel Mamba2 scan (SSD: Dao & Gu 2024, "Transformers are SSMs: Generalized Models and
Efficient Algorithms Through Structured State Space Duality") by LASP-2's one all-gather of affine state maps
(``seqpar.attention.affine_maps``), exact on contiguous shards.

Per head h (B and C shared by the H/G heads of a group), with Δ_t already softplus'd, biased and clamped:

    h_t = exp(Δ_t A_h) h_{t-1} + Δ_t x_t B_tᵀ            state h_t [P, N] (head_dim x d_state)
    y_t = h_t C_t + D_h x_t

The transition is a scalar per head and token (a data-dependent Lightning Attention), so a rank's shard is one
affine map h_out = m_r h_in + U_r with m_r = exp(A_h Σ_{t in shard} Δ_t) (a scalar per batch row and head) and
U_r the shard's exit state from zero. Rank r:

    1. local pass (SSD's chunked form, chunk Q: the intra-chunk quadratic term C_l·B_s exp(cs_l - cs_s) x_s Δ_s,
       chunk states, and a scan over the chunks' entry states) from a zero state: local outputs y⁰, U_r, and
       cum_t = A_h Σ_{s<=t} Δ_s from the shard's start;
    2. one all-gather of (m, U) from every rank (``affine_maps.entry_state`` with the state flattened to
       [1, P·N] and m as a [1, 1] matrix: its Horner fold S ← m_j S + U_j is then exactly the scalar fold, and
       its mirrored backward the scalar one: dU_j = G_{j+1}, dm_j = <G_{j+1}, S_in(j)>); folded in float32
       (float64 for float64 inputs);
    3. correction y_t = y⁰_t + exp(cum_t) C_t·h_in, for the tokens before the shard's first document start.

Backward: autograd through the three steps; the fold's backward is ``affine_maps``' one all-gather of the
dS_in (the size of U). Every rank's outputs depend on its h_in in the graph (multiplied by 0 where no token
reads it: rank 0, a shard that starts with a document), so every rank runs that collective.

Packed documents (``cu_seqlens``, global boundaries): the state resets at each document start, on every rank;
each piece of a document on the shard runs the local pass from zero, only a first piece that continues an
earlier rank's document gets the correction, and a shard that holds a document start passes m = 0 and its
last piece's exit state as U.

Shapes: ``x [B, n, H, P]``, ``dt [B, n, H]``, ``A [H]`` (< 0), ``B, C [B, n, G, N]`` (G divides H), ``D [H]``
or None (contiguous layout, n = L/N); output ``[B, n, H, P]`` in the accumulation dtype (float32, float64
for float64 inputs), as transformers' own scan returns float32 whatever the model dtype.

Bytes per call, per rank (``ssd_bytes``; ``affine_maps.entry_state_bytes`` with Dk = 1, Dv = P·N):
forward (N-1)·B·H·(1 + P·N)·itemsize, backward (N-1)·B·H·P·N·itemsize; independent of L.
"""

from __future__ import annotations

import torch

from seqpar.attention.affine_maps import entry_state, entry_state_bytes
from seqpar.comm import Group, group_rank, group_size
from seqpar.kernels import acc_dtype
from seqpar.sharding import local_documents

DEFAULT_SSD_CHUNK = 64


def _local_scan(x: torch.Tensor, a: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SSD's chunked form from a zero state on one piece, heads first: ``x [b, h, m, P]`` (already times Δ),
    ``a [b, h, m]`` (Δ A, the log decay), ``B, C [b, h, m, N]``. Returns (y [b, h, m, P], exit state [b, h, P, N])."""
    b, h, m, P = x.shape
    pad = (-m) % chunk  # zero-padded tokens: decay 1, no input, outputs dropped
    if pad:
        x, B, C = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (x, B, C))
        a = torch.nn.functional.pad(a, (0, pad))
    k = (m + pad) // chunk
    x, B, C = (t.reshape(b, h, k, chunk, t.shape[-1]) for t in (x, B, C))
    cs = a.reshape(b, h, k, chunk).cumsum(-1)  # within each chunk
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=x.device).tril()
    seg = (cs[..., :, None] - cs[..., None, :]).masked_fill(~causal, float("-inf"))  # log decay s -> l, l >= s
    scores = torch.einsum("bhkln,bhksn->bhkls", C, B) * seg.exp()
    y = torch.einsum("bhkls,bhksp->bhklp", scores, x)  # intra-chunk (the "attention" half of the duality)
    to_end = (cs[..., -1:] - cs).exp()  # decay from each token to its chunk's end
    states = torch.einsum("bhkc,bhkcp,bhkcn->bhkpn", to_end, x, B)
    total = cs[..., -1].exp()  # [b, h, k]
    S, entries = x.new_zeros(b, h, P, B.shape[-1]), []
    for j in range(k):  # the recurrent half, over chunks
        entries.append(S)
        S = total[:, :, j, None, None] * S + states[:, :, j]
    y = y + torch.einsum("bhkln,bhkpn->bhklp", C, torch.stack(entries, 2)) * cs.exp()[..., None]
    return y.reshape(b, h, k * chunk, P)[:, :, :m], S


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    *,
    group: Group = None,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_SSD_CHUNK,
) -> torch.Tensor:
    """The Mamba2 scan over the whole (packed) sequence from this rank's contiguous shard (exact, one all-gather).

    Args:
        x: ``[B, n, H, P]`` this rank's shard of the scan input.
        dt: ``[B, n, H]`` Δ (softplus and bias applied, clamped: what transformers' scan computes first).
        A: ``[H]``, negative (``-exp(A_log)``).
        B, C: ``[B, n, G, N]``, G groups of H/G heads each.
        D: ``[H]`` skip weight, or None.
        group: the SP process group (None = one device).
        cu_seqlens: global document boundaries of a packed sequence (``seqpar.models.shard_batch``), or None.
        chunk_size: tokens per chunk of the local pass.
    """
    batch, n, H, _ = x.shape
    if dt.shape != (batch, n, H) or A.shape != (H,) or B.shape != C.shape or B.shape[:2] != (batch, n) \
            or H % B.shape[2] or (D is not None and D.shape != (H,)):
        raise ValueError(f"ssd_scan: x {tuple(x.shape)} [B, n, H, P], dt {tuple(dt.shape)} [B, n, H], A "
                         f"{tuple(A.shape)} [H], B {tuple(B.shape)} and C {tuple(C.shape)} [B, n, G, N] (G divides "
                         f"H), D {None if D is None else tuple(D.shape)} [H] do not match")
    acc = acc_dtype(x.dtype)
    N, rank = group_size(group), group_rank(group)
    rep = H // B.shape[2]
    xh, Bh, Ch = (t.to(acc).transpose(1, 2) for t in (x, B.repeat_interleave(rep, 2), C.repeat_interleave(rep, 2)))
    dth = dt.to(acc).transpose(1, 2)  # [b, h, n]
    a = dth * A.to(acc)[:, None]
    xd = xh * dth[..., None]
    docs = local_documents(cu_seqlens, n, N, rank)
    ys, U = [], None
    for start, end, _ in docs:
        y, U = _local_scan(xd[:, :, start:end], a[:, :, start:end], Bh[:, :, start:end], Ch[:, :, start:end],
                           chunk_size)
        ys.append(y)
    y = torch.cat(ys, dim=2)
    if N > 1:
        cont = docs[0][2] < rank * n  # the first piece continues an earlier rank's document
        first = slice(docs[0][0], docs[0][1])
        cum = a[:, :, first].cumsum(-1)  # log decay from the shard's start to each token of the first piece
        m = cum[..., -1].exp() if cont and len(docs) == 1 else cum.new_zeros(cum.shape[:2])
        S_in = entry_state(m[..., None, None], U.reshape(batch, H, 1, -1), group).view_as(U)
        corr = torch.einsum("bhtn,bhpn->bhtp", Ch[:, :, first], S_in) * cum.exp()[..., None]
        # always in the graph (times 0 where no token reads h_in), so every rank runs the backward all-gather
        y = torch.cat([y[:, :, first] + corr * float(cont), y[:, :, first.stop:]], dim=2)
    if D is not None:
        y = y + D.to(acc)[:, None, None] * xh
    return y.transpose(1, 2)


def ssd_bytes(x, dt, A, B, *_, group: Group = None, **__) -> tuple[int, int]:
    """(forward, backward) bytes this rank sends in one call: the module docstring's formula."""
    batch, _, H, P = x.shape
    return entry_state_bytes((batch, H, 1, P * B.shape[-1]), 1, acc_dtype(x.dtype).itemsize, group)
