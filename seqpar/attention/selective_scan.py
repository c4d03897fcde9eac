"""Sequence-parallel Mamba (v1) selective scan (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with
Selective State Spaces", Algorithm 2 / S6) by LASP-2's one all-gather of affine state maps
(``seqpar.attention.affine_maps``), exact on contiguous shards.

Per channel d (of D) and state n (of N), with Δ_t already biased and softplus'd:

    h_t[d, n] = exp(Δ_t[d] A[d, n]) h_{t-1}[d, n] + Δ_t[d] B_t[n] x_t[d]        state h_t [D, N]
    y_t[d]    = Σ_n C_t[n] h_t[d, n] + D[d] x_t[d]

The transition is diagonal (elementwise in (d, n)), so a rank's shard is one elementwise affine map
h_out = M_r ⊙ h_in + U_r with M_r = exp(A Σ_{t in shard} Δ_t) ([B, D, N], every exponent <= 0) and U_r the
shard's exit state from zero. Rank r:

    1. local pass from a zero state, in chunks of Q tokens: the Q steps h ← exp(Δ_t A) ⊙ h + Δ_t x_t B_t run
       for all chunks of the piece at once, then a scan over the chunks carries their entry states
       E_{j+1} = exp(cs_j) ⊙ E_j + hloc_j (cs_j: the chunk's summed log decay); U_r is the last exit state;
    2. one all-gather of (M, U) from every rank (``affine_maps.entry_state`` with each of the B·D·N state
       entries a 1 x 1 "matrix": its Horner fold S ← M_j S + U_j is then exactly the elementwise fold, and its
       mirrored backward the elementwise one: dU_j = G_{j+1}, dM_j = G_{j+1} ⊙ S_in(j)); folded in float32
       (float64 for float64 inputs);
    3. correction: each chunk entry state of the shard's first piece gets exp(A Σ_{s before the chunk} Δ_s) ⊙
       h_in, and every token h_t = hloc_t + exp(cs_t) ⊙ E_j, y_t = C_t·h_t (+ D x_t), for the tokens before
       the shard's first document start.

Every exponent is a sum of Δ A <= 0 (Δ >= 0, A < 0), so no partial product exceeds 1: a large negative Δ A
underflows to a decay of 0, never to inf or nan (no exp(-cumsum) division trick).

Backward: autograd through the three steps (as ``seqpar.attention.ssd``); the fold's backward is
``affine_maps``' one all-gather of the dS_in (the size of U). Every rank's outputs depend on its h_in in the
graph (multiplied by 0 where no token reads it: rank 0, a shard that starts with a document), so every rank
runs that collective.

Packed documents (``cu_seqlens``, global boundaries): the state resets at each document start, on every rank;
each piece of a document on the shard runs the local pass from zero, only a first piece that continues an
earlier rank's document gets the correction, and a shard that holds a document start passes M = 0 and its
last piece's exit state as U.

Shapes: ``x [B, n, D]`` (the conv's output, channels last), ``dt [B, n, D]`` (Δ), ``A [D, N]`` (< 0,
``-exp(A_log)``), ``B, C [B, n, N]`` (shared by every channel), ``D [D]`` or None (contiguous layout, n = L/W
on W ranks); output ``[B, n, D]`` in the accumulation dtype (float32, float64 for float64 inputs), as
transformers' own scan returns float32 whatever the model dtype.

Bytes per call, per rank (``selective_scan_bytes``; ``affine_maps.entry_state_bytes`` with Dk = Dv = 1 over
B·D·N entries): forward (W-1)·B·D·N·2·itemsize, backward (W-1)·B·D·N·itemsize; independent of L.

Memory: the local pass holds a few ``[B, n, D, N]`` tensors for the backward (the decays exp(Δ A), the
inputs Δ x B, the chunk-local states, exp(cs)), as transformers' own scan (which materialises discrete A and
ΔB·x for the whole sequence) does; the fold adds W·B·D·N·2 gathered values. Python steps per piece: Q + n/Q.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from seqpar.attention.affine_maps import entry_state, entry_state_bytes
from seqpar.comm import Group, group_rank, group_size
from seqpar.kernels import acc_dtype
from seqpar.sharding import local_documents

DEFAULT_SCAN_CHUNK = 64


def _local_scan(a: torch.Tensor, u: torch.Tensor,
                chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The scan from a zero state on one piece of m tokens: ``a [b, m, D, N]`` (Δ A, the log decay, <= 0),
    ``u [b, m, D, N]`` (Δ x B). Returns, with the piece cut into k chunks of Q tokens (zero-padded: decay 1,
    no input): chunk-local states hloc ``[b, k, Q, D, N]`` (each chunk from zero), cs ``[b, k, Q, D, N]``
    (log decay from the chunk's start through each token), entry states E ``[b, k, D, N]`` and the exit state
    ``[b, D, N]``."""
    b, m = a.shape[:2]
    Q = min(chunk, m)
    pad = (-m) % Q
    if pad:
        a, u = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (a, u))
    k = (m + pad) // Q
    a, u = (t.reshape(b, k, Q, *t.shape[2:]) for t in (a, u))
    decay = a.exp()
    h, states = torch.zeros_like(u[:, :, 0]), []
    for t in range(Q):  # every chunk at once: the recurrence within the chunks
        h = decay[:, :, t] * h + u[:, :, t]
        states.append(h)
    hloc, cs = torch.stack(states, 2), a.cumsum(2)
    S, entries = torch.zeros_like(h[:, 0]), []
    for j in range(k):  # the recurrence over chunks: each chunk's entry state
        entries.append(S)
        S = cs[:, j, -1].exp() * S + hloc[:, j, -1]
    return hloc, cs, torch.stack(entries, 1), S


def _outputs(hloc: torch.Tensor, cs: torch.Tensor, E: torch.Tensor, C: torch.Tensor, m: int,
             h_in: torch.Tensor | None = None) -> torch.Tensor:
    """y_t = C_t·h_t ``[b, m, D]`` of one piece from ``_local_scan``'s parts, ``C [b, m, N]``; ``h_in [b, D, N]``:
    the piece's entry state (None: zero), carried to chunk j's entry by exp(A Σ_{s before j} Δ_s)."""
    b, k, Q = hloc.shape[:3]
    if h_in is not None:
        before = F.pad(cs[:, :-1, -1].cumsum(1), (0, 0, 0, 0, 1, 0))  # log decay from the piece's start to chunk j
        E = E + before.exp() * h_in[:, None]
    h = hloc + cs.exp() * E[:, :, None]
    C = F.pad(C, (0, 0, 0, k * Q - m)).reshape(b, k, Q, -1)
    return torch.einsum("bkqdn,bkqn->bkqd", h, C).reshape(b, k * Q, -1)[:, :m]


def selective_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    *,
    group: Group = None,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_SCAN_CHUNK,
) -> torch.Tensor:
    """The Mamba selective scan over the whole (packed) sequence from this rank's contiguous shard (exact, one
    all-gather).

    Args:
        x: ``[B, n, D]`` this rank's shard of the scan input (after the conv and its activation).
        dt: ``[B, n, D]`` Δ (``dt_proj`` bias and softplus applied: what transformers' scan computes first).
        A: ``[D, N]``, negative (``-exp(A_log)``).
        B, C: ``[B, n, N]``, the input-dependent projections, shared by every channel.
        D: ``[D]`` skip weight, or None.
        group: the SP process group (None = one device).
        cu_seqlens: global document boundaries of a packed sequence (``seqpar.models.shard_batch``), or None.
        chunk_size: tokens per chunk of the local pass (Q; Q + n/Q Python steps).
    """
    batch, n, Dch = x.shape
    if dt.shape != x.shape or A.dim() != 2 or A.shape[0] != Dch or B.shape != C.shape \
            or B.shape != (batch, n, A.shape[1]) or (D is not None and D.shape != (Dch,)) or chunk_size < 1:
        raise ValueError(f"selective_scan: x {tuple(x.shape)} [B, n, D], dt {tuple(dt.shape)} [B, n, D], A "
                         f"{tuple(A.shape)} [D, N], B {tuple(B.shape)} and C {tuple(C.shape)} [B, n, N], D "
                         f"{None if D is None else tuple(D.shape)} [D], chunk_size={chunk_size} (>= 1) do not match")
    acc = acc_dtype(x.dtype)
    W, rank = group_size(group), group_rank(group)
    xa, dta, Ba, Ca, Aa = (t.to(acc) for t in (x, dt, B, C, A))
    a = dta[..., None] * Aa  # [b, n, D, N] log decays Δ A <= 0
    u = (dta * xa)[..., None] * Ba[:, :, None, :]  # Δ x Bᵀ
    docs = local_documents(cu_seqlens, n, W, rank)
    parts = [_local_scan(a[:, s:e], u[:, s:e], chunk_size) for s, e, _ in docs]
    h_in = None
    if W > 1:
        cont = docs[0][2] < rank * n  # the first piece continues an earlier rank's document
        s, e, _ = docs[0]
        M = (dta[:, s:e].sum(1)[..., None] * Aa).exp()  # [b, D, N]: the shard's decay, exponent <= 0
        if not cont or len(docs) > 1:  # a document starts on this shard: nothing before it reaches the exit
            M = torch.zeros_like(M)
        S_in = entry_state(M[..., None, None], parts[-1][3][..., None, None], group)[..., 0, 0]
        # always in the graph (times 0 where no token reads it), so every rank runs the backward all-gather
        h_in = S_in * float(cont)
    ys = [_outputs(*part[:3], Ca[:, s:e], e - s, h_in if i == 0 else None)
          for i, (part, (s, e, _)) in enumerate(zip(parts, docs))]
    y = torch.cat(ys, dim=1)
    if D is not None:
        y = y + D.to(acc) * xa
    return y


def selective_scan_bytes(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, *_, group: Group = None,
                         **__) -> tuple[int, int]:
    """(forward, backward) bytes this rank sends in one call: the module docstring's formula."""
    batch, _, Dch = x.shape
    return entry_state_bytes((batch, Dch * A.shape[-1], 1, 1), 1, acc_dtype(x.dtype).itemsize, group)


def example_inputs(L: int, dtype: torch.dtype, gen: torch.Generator) -> tuple[list[torch.Tensor], list, dict, int]:
    """A small call for the registry's conformance tests (``registry.MixerSpec``): 6 channels, 4 states, Δ and
    A as Mamba makes them (Δ > 0 from a softplus, A < 0) with decays slow enough that the state crosses
    shards; a skip weight D. Float64 draws rounded to ``dtype``; A and D are replicated parameters."""
    Bt, Dch, N = 2, 6, 4
    draw = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    x, dt = draw(Bt, L, Dch), 0.5 * F.softplus(draw(Bt, L, Dch))
    A = -(0.05 + 0.5 * torch.rand(Dch, N, generator=gen, dtype=torch.float64))
    B, C, D = draw(Bt, L, N), draw(Bt, L, N), draw(Dch)
    return [t.to(dtype) for t in (x, dt, A, B, C, D)], [1, 1, None, 1, 1, None], {}, 1
