"""Chunked causal linear attention with per-head decay on one device (Lightning Attention-2, Qin et al. 2024).

    o_t = q_t · Σ_{s<=t} λ^(t-s) k_s^T v_s          (per head; λ in (0, 1], λ = 1 is no decay)

Lightning Attention-2 splits the sequence into blocks of C tokens (``block_size``, default 64; a partial
last block is a block of its own size, nothing is padded). Block b (local index t = 0..c-1) gets

    intra:  O_b  = ((Q_b K_b^T) ⊙ D) V_b,   D_ts = λ^(t-s) for s <= t, else 0
    inter:  O_b += (Q_b ⊙ λ^(t+1)) S_b                    S_b = state of every earlier token
    state:  S_{b+1} = λ^c S_b + (K_b ⊙ λ^(c-1-t))^T V_b,  S_0 = P (the state of earlier chunks, or 0)

Two implementations of the same algorithm: on CPU in float32/float64 the compiled kernel of
``seqpar.kernels.linear_cpu`` (one BLAS call per block product on the [B, L, H, D] storage, 1.35x faster;
``SEQPAR_LINEAR_KERNEL=torch`` opts out), elsewhere (GPU, or where it cannot be built) the PyTorch code below.
Each public function here dispatches; both are exact to float rounding and tested against the same reference.

How the PyTorch kernel runs (chosen for a CPU core, same shapes on a GPU): one pass over runs of
``RUN_TOKENS`` tokens of every head. A run's blocks are copied out of the [B, L, H, D] layout once into a
cache-resident [B, H, g, C, D] buffer, and every product of the run is one batched matmul over its blocks; the states
before its blocks come from the carried state by one small matmul with the decay weights λ^(C(j-1-i))
(``_scan_weights``), so no per-block state is ever stored; results are copied straight into [B, L, H, D]
outputs (the caller's transpose back is a view). Decay tables are built once per call. Every exponent is
>= 0 (λ^(t+1), λ^(c-1-t), λ^(t-s), λ^(Cj)): no factor overflows however small λ is, and factors below the
smallest normal float are flushed to 0 (subnormal products take a ~10x slower path on CPUs).
Memory O(RUN_TOKENS·C) per head beyond inputs and outputs, never O(L^2).

The sequence-parallel pieces (LASP, LASP-2) fold into the same pass: ``prefix=P`` starts the state scan
at P, so the inter-block term of every block includes the earlier chunks at no extra matmul; ``chunk_state``
(the state after the chunk from 0, run by run) is what LASP-2 all-gathers. The backward is written by hand
(not autograd): ``run_state_grads`` is a first, reverse pass giving dLoss/d(initial state) (LASP-2's dP)
and the state gradient at the end of each run; the second pass recomputes each run's block terms, the
states S_b from the carry and the state gradients G_b = λ^c G_(b+1) + (Q_(b+1) ⊙ λ^(t+1))^T dO_(b+1) from
the run's end (plus λ^(L-end) dM for a gradient dM of the chunk state, ``final_grad``), then dQ, dK, dV.
FLOPs: ``linear_attention_flops``.

Shapes: every function here works heads-first in the accumulation dtype: ``q, k [B, H, L, Dk]``,
``v, out [B, H, L, Dv]``, states ``[B, H, Dk, Dv]``, ``log_decay [H]`` (log λ; zeros = no decay).
The public ``[B, L, H, D]`` inputs are checked by ``seqpar.attention.checks.check_linear_args``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from seqpar.kernels import linear_cpu

DEFAULT_LINEAR_BLOCK = 64
RUN_TOKENS = 256  # tokens (of every head) computed together on a CPU: a run's operands stay in a core's L2
GPU_RUN_TOKENS = 8192  # on a GPU fewer, larger batched matmuls (launches, not caches, are the cost)
STATE_RUN_TOKENS = 1024  # the same for ``chunk_state`` (one matmul per run, no intra-block terms)


def heads_first(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, L, H, D] -> [B, H, L, D] in ``dtype`` (the layout of every function below)."""
    return x.transpose(1, 2).to(dtype)


def _exp(x: torch.Tensor) -> torch.Tensor:
    """exp, with results below the dtype's smallest normal number flushed to 0: subnormal decay factors
    (λ^e < 1.2e-38 in float32) would make every product with them take the CPU's slow path (measured 10x
    for a state matmul), and what they weigh is below the precision of any sum they enter."""
    y = x.exp()
    return y.masked_fill_(y < torch.finfo(y.dtype).tiny, 0.0)


def powers(log_decay: torch.Tensor, exponents: torch.Tensor | float) -> torch.Tensor:
    """λ_h^e as [H, len(e), 1] (or [H, 1, 1] for a scalar e), ready to scale [B, H, L, D] tensors."""
    if isinstance(exponents, torch.Tensor):
        e = exponents.to(dtype=log_decay.dtype, device=log_decay.device).reshape(1, -1)
    else:  # a fill on the device, not a blocking host-to-device copy of one number
        e = torch.full((1, 1), float(exponents), dtype=log_decay.dtype, device=log_decay.device)
    return _exp(log_decay[:, None] * e).unsqueeze(-1)


def decay_mask(log_decay: torch.Tensor, c: int) -> torch.Tensor:
    """D [H, c, c] with D_ts = λ^(t-s) for s <= t and 0 above the diagonal."""
    idx = torch.arange(c, device=log_decay.device)
    diff = (idx[:, None] - idx[None, :]).to(log_decay.dtype)
    return _exp((log_decay[:, None, None] * diff).masked_fill(diff < 0, float("-inf")))


def _scan_weights(log_decay: torch.Tensor, g: int, c: int, *, reverse: bool) -> torch.Tensor:
    """The exclusive decayed scan over g blocks of c tokens as one matmul: weights [H, g, g+1] for the
    blocks' terms with the carry as term g. Forward, S_j = Σ_(i<j) λ^(c(j-1-i)) M_i + λ^(cj) S_in (the state
    before block j); reverse, G_j = Σ_(i>j) λ^(c(i-1-j)) N_i + λ^(c(g-1-j)) G_out (the gradient of the state
    after block j). Exponents >= 0: nothing overflows however small λ is."""
    j = torch.arange(g, device=log_decay.device)[:, None]
    i = torch.arange(g + 1, device=log_decay.device)[None, :]
    if reverse:
        e, keep = torch.where(i < g, i - 1 - j, g - 1 - j), (i > j) | (i == g)
    else:
        e, keep = torch.where(i < g, j - 1 - i, j), (i < j) | (i == g)
    return _exp(log_decay[:, None, None] * (c * e.clamp_min(0)).to(log_decay.dtype)) * keep


class _Run(NamedTuple):
    """``g`` blocks of ``c`` tokens from token ``start``."""

    g: int
    c: int
    start: int

    @property
    def tokens(self) -> slice:
        return slice(self.start, self.start + self.g * self.c)


class _Plan:
    """One call's runs of blocks and their decay tables (built once per call on the inputs' device, each
    table when first needed).

    Runs hold ``RUN_TOKENS // C`` blocks of C tokens (``GPU_RUN_TOKENS`` off the CPU); the partial last
    block (L mod C tokens) is a run of its own with its own tables, so nothing is padded. Tables are shaped
    to broadcast over a run's [B, H, g, c, ·] tensors (``block``), stacked block terms (``scan``) or
    [B·H, R, ·] rows (``whole``).
    """

    def __init__(self, L: int, log_decay: torch.Tensor, block_size: int):
        C = min(block_size, L)
        full, tail = divmod(L, C)
        g = max(1, (RUN_TOKENS if log_decay.device.type == "cpu" else GPU_RUN_TOKENS) // C)
        self.runs = [_Run(min(g, full - b), C, b * C) for b in range(0, full, g)]
        if tail:
            self.runs.append(_Run(1, tail, full * C))
        self.ld, self.L, self._cache = log_decay, L, {}

    def _get(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def block(self, c: int):
        """D [H, 1, c, c], λ^(t+1) and λ^(c-1-t) as [H, 1, c, 1], λ^c as [H, 1, 1]."""
        def make():
            t = torch.arange(c, device=self.ld.device)
            return (decay_mask(self.ld, c)[:, None], powers(self.ld, t + 1)[:, None],
                    powers(self.ld, c - 1 - t)[:, None], powers(self.ld, float(c)))
        return self._get(("block", c), make)

    def scan(self, g: int, c: int, B: int):
        """Forward and reverse scan weights of a run of g blocks of c tokens (``_scan_weights``), [B·H, g, g+1]."""
        def make():
            return tuple(w.expand(B, *w.shape).reshape(-1, *w.shape[1:]) for w in (
                _scan_weights(self.ld, g, c, reverse=False), _scan_weights(self.ld, g, c, reverse=True)))
        return self._get(("scan", g, c, B), make)

    def whole(self, R: int):
        """λ^(R-1-t), λ^(t+1) as [H, R, 1] and λ^R as [H, 1, 1]: one run of R tokens taken as one block."""
        def make():
            t = torch.arange(R, device=self.ld.device)
            return powers(self.ld, R - 1 - t), powers(self.ld, t + 1), powers(self.ld, float(R))
        return self._get(("whole", R), make)

    def end_pow(self) -> torch.Tensor:
        """λ^(L - end of run i) as [runs, 1, H, 1, 1]: how a gradient of the final state reaches each run's end."""
        # one fill per run (a handful), not a tensor made from host data (a blocking copy to the GPU)
        pows = torch.cat([powers(self.ld, float(self.L - r.start - r.g * r.c)) for r in self.runs], dim=1)
        return pows.transpose(0, 1)[:, None, :, :, None]


def _rows(x: torch.Tensor, r: _Run) -> torch.Tensor:
    """The tokens of run ``r`` of a heads-first ``x [B, H, L, D]`` (a view) as [B·H, R, D] (a view when the
    strides allow, as for B = 1 or heads-first storage)."""
    x = x[:, :, r.tokens]
    return x.view(-1, *x.shape[2:]) if x.shape[0] == 1 or x.stride(0) == x.shape[1] * x.stride(1) else \
        x.reshape(-1, *x.shape[2:])


def _blocks(x: torch.Tensor, r: _Run) -> torch.Tensor:
    """Run ``r`` of ``x [B, H, L, D]`` (any strides) as a [B, H, g, c, D] view."""
    return x[:, :, r.tokens].unflatten(2, (r.g, r.c))


def _load(x: torch.Tensor, r: _Run, buf: torch.Tensor) -> torch.Tensor:
    """Run ``r`` of ``x`` copied into ``buf``, a contiguous [B, H, g, c, D] (cache-resident; safe to modify)."""
    return buf.copy_(_blocks(x, r))


class _Scratch:
    """Run-sized buffers reused from run to run (allocating them afresh per run cost more than the copies)."""

    def __init__(self, like: torch.Tensor):
        self.like, self.bufs = like, {}

    def __call__(self, name: str, *shape: int) -> torch.Tensor:
        t = self.bufs.get(name)
        if t is None or t.shape != shape:
            t = self.bufs[name] = self.like.new_empty(shape)
        return t


def _scaled(x: torch.Tensor, r: _Run, scale: torch.Tensor) -> torch.Tensor:
    """The tokens of run ``r`` of ``x [B, H, L, D]`` times ``scale [H, R, 1]``, as a fresh [B·H, R, D]."""
    B, H, _, D = x.shape
    out = torch.empty(B, H, r.g * r.c, D, dtype=x.dtype, device=x.device)
    return torch.mul(x[:, :, r.tokens], scale, out=out).view(B * H, -1, D)


def _b(x: torch.Tensor) -> torch.Tensor:
    """Contiguous [..., m, n] -> [batch, m, n] view for bmm."""
    return x.view(-1, *x.shape[-2:])


def _token_major(B: int, H: int, L: int, D: int, like: torch.Tensor) -> torch.Tensor:
    """An empty heads-first [B, H, L, D] view of a [B, L, H, D] tensor: results are written in the public
    layout, so the caller's transpose back is a view, not a copy."""
    return torch.empty(B, L, H, D, dtype=like.dtype, device=like.device).transpose(1, 2)


def _scan_run(terms: torch.Tensor, carry: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``weights [B·H, g, g+1]`` (``_Plan.scan``) applied to a run's block terms ``[B, H, g, Dk, Dv]`` and
    ``carry [B, H, Dk, Dv]``: the run's states (or state gradients) [B, H, g, Dk, Dv], by two small matmuls."""
    B, H, g, Dk, Dv = terms.shape
    out = torch.bmm(weights[:, :, :g], terms.view(B * H, g, Dk * Dv))
    return out.baddbmm_(weights[:, :, g:], carry.reshape(B * H, 1, Dk * Dv)).view(B, H, g, Dk, Dv)


def chunk_state(k, v, log_decay) -> torch.Tensor:
    """Memory state of a chunk of n tokens, M = Σ_s λ^(n-1-s) k_s^T v_s: ``[B, H, Dk, Dv]``, run by run,
    M <- λ^R M + (K_r ⊙ λ^(R-1-t))^T V_r: a run's scaled keys stay in cache, and the factors are relative to
    the run's end (global ones, λ^(n-1-s), make subnormal products over a long chunk: a 10x slower matmul)."""
    if linear_cpu.usable(k):
        return linear_cpu.state(k, v, log_decay)
    B, H, L, Dk = k.shape
    plan = _Plan(L, log_decay, STATE_RUN_TOKENS)  # runs of one block of STATE_RUN_TOKENS
    M = k.new_zeros(B * H, Dk, v.shape[-1])
    for r in plan.runs:
        k_pow, _, lam_R = plan.whole(r.g * r.c)
        M = torch.baddbmm(M.view(B, H, Dk, -1).mul_(lam_R).view(B * H, Dk, -1), _scaled(k, r, k_pow).mT,
                          _rows(v, r))
    return M.view(B, H, Dk, -1)


def run_state_grads(q, dout, log_decay, block_size: int = DEFAULT_LINEAR_BLOCK):
    """The backward's first pass: ``G [runs, B, H, Dk, Dv]``, dLoss/d(state after each run) from this call's
    later runs, and ``dP [B, H, Dk, Dv]``, dLoss/d(initial state) (= ``apply_prefix_bwd``'s dP), in reverse
    run order: G_before = λ^R G_after + (Q_r ⊙ λ^(t+1))^T dO_r. ``G``'s runs are those of the kernel that
    made it (compiled or PyTorch, ``linear_cpu.usable``): pass it to ``linear_attention_bwd`` on the same tensors."""
    if linear_cpu.usable(q):
        return linear_cpu.state_grads(q, dout, log_decay, block_size)
    B, H, L, Dk = q.shape
    plan = _Plan(L, log_decay, block_size)
    G = q.new_empty(len(plan.runs), B, H, Dk, dout.shape[-1])
    carry = q.new_zeros(B * H, Dk, dout.shape[-1])
    for i in range(len(plan.runs) - 1, -1, -1):
        r = plan.runs[i]
        _, q_pow, lam_R = plan.whole(r.g * r.c)
        G[i] = carry.view(B, H, Dk, -1)
        qr = _scaled(q, r, q_pow)
        carry = torch.baddbmm(carry.view(B, H, Dk, -1).mul_(lam_R).view(B * H, Dk, -1), qr.mT, _rows(dout, r))
    return G, carry.view(B, H, Dk, -1)


def linear_attention_fwd(q, k, v, log_decay, block_size: int = DEFAULT_LINEAR_BLOCK, *,
                         prefix: torch.Tensor | None = None) -> torch.Tensor:
    """Causal decayed linear attention of one chunk: ``out [B, H, L, Dv]`` (a heads-first view of a
    [B, L, H, Dv] tensor), from the initial state ``prefix [B, H, Dk, Dv]`` of all earlier tokens (None: 0).

    One pass over the runs, each in cache: the blocks' state terms M_b = (K_b ⊙ λ^(c-1-t))^T V_b, the states
    before each block by one small matmul from the carry (the prefix folded in), then
    O_b = ((Q_b K_b^T) ⊙ D) V_b + (Q_b ⊙ λ^(t+1)) S_b.
    """
    if linear_cpu.usable(q):
        return linear_cpu.forward(q, k, v, log_decay, block_size, prefix)
    B, H, L, Dk = q.shape
    Dv = v.shape[-1]
    plan = _Plan(L, log_decay, block_size)
    out = _token_major(B, H, L, Dv, q)
    carry = q.new_zeros(B, H, Dk, Dv) if prefix is None else prefix
    ws = _Scratch(q)
    for r in plan.runs:
        D, q_pow, k_pow, lam_c = plan.block(r.c)
        blk = (B, H, r.g, r.c)
        qr, kr, vr = _load(q, r, ws("q", *blk, Dk)), _load(k, r, ws("k", *blk, Dk)), _load(v, r, ws("v", *blk, Dv))
        scores = ws("s", *blk, r.c)
        torch.bmm(_b(qr), _b(kr).mT, out=_b(scores))
        scores.mul_(D)
        o = torch.bmm(_b(scores), _b(vr), out=_b(ws("o", *blk, Dv)))  # intra
        M = torch.bmm(_b(kr.mul_(k_pow)).mT, _b(vr)).view(B, H, r.g, Dk, Dv)
        S = _scan_run(M, carry, plan.scan(r.g, r.c, B)[0])
        carry = torch.addcmul(M[:, :, -1], S[:, :, -1], lam_c)
        o.baddbmm_(_b(qr.mul_(q_pow)), _b(S))  # inter
        _blocks(out, r).copy_(o.view(*blk, Dv))
    return out


def linear_attention_bwd(dout, q, k, v, log_decay, block_size: int = DEFAULT_LINEAR_BLOCK, *,
                         prefix: torch.Tensor | None = None, final_grad: torch.Tensor | None = None,
                         run_grads: torch.Tensor | None = None):
    """Gradients ``(dq, dk, dv)`` (heads-first views of [B, L, H, D] tensors) of ``linear_attention_fwd``
    for ``dout [B, H, L, Dv]`` with the same ``prefix``, including what a gradient ``final_grad [B, H, Dk, Dv]``
    of the state after the last token (= ``chunk_state``) adds to dk, dv.

    ``run_grads``: ``run_state_grads(q, dout, ...)[0]`` if the caller has it. One pass over the runs in
    order, each in cache: the states S_b from the carry (prefix folded in), the state gradients G_b from the
    run's end (+ λ^(L-end) dM) by one small matmul each, then the intra-block terms and
    dQ += (dO ⊙ λ^(t+1)) S^T, dK += (V ⊙ λ^(c-1-t)) G^T, dV += (K ⊙ λ^(c-1-t)) G.
    """
    if run_grads is None:
        run_grads = run_state_grads(q, dout, log_decay, block_size)[0]
    if linear_cpu.usable(q):
        return linear_cpu.backward(dout, q, k, v, log_decay, block_size, prefix, final_grad, run_grads)
    B, H, L, Dk = q.shape
    Dv = v.shape[-1]
    plan = _Plan(L, log_decay, block_size)
    dq, dk, dv = _token_major(B, H, L, Dk, q), _token_major(B, H, L, Dk, q), _token_major(B, H, L, Dv, q)
    carry = q.new_zeros(B, H, Dk, Dv) if prefix is None else prefix
    G_ends = run_grads if final_grad is None else torch.addcmul(run_grads, plan.end_pow(), final_grad)
    ws = _Scratch(q)
    for r, G_end in zip(plan.runs, G_ends):
        D, q_pow, k_pow, lam_c = plan.block(r.c)
        w_fwd, w_rev = plan.scan(r.g, r.c, B)
        blk = (B, H, r.g, r.c)
        qr, kr = _load(q, r, ws("q", *blk, Dk)), _load(k, r, ws("k", *blk, Dk))
        vr, dor = _load(v, r, ws("v", *blk, Dv)), _load(dout, r, ws("do", *blk, Dv))
        A, dA = ws("a", *blk, r.c), ws("da", *blk, r.c)
        torch.bmm(_b(qr), _b(kr).mT, out=_b(A))
        torch.bmm(_b(dor), _b(vr).mT, out=_b(dA))
        A.mul_(D), dA.mul_(D)  # (Q K^T) ⊙ D, (dO V^T) ⊙ D
        dq_r = torch.bmm(_b(dA), _b(kr), out=_b(ws("dq", *blk, Dk)))
        dk_r = torch.bmm(_b(dA).mT, _b(qr), out=_b(ws("dk", *blk, Dk)))
        dv_r = torch.bmm(_b(A).mT, _b(dor), out=_b(ws("dv", *blk, Dv)))
        # one scaled copy serves two products: (K ⊙ λ^(c-1-t))^T V = K^T (V ⊙ λ^(c-1-t)), same for Q, dO
        dos, vs = dor.mul_(q_pow), vr.mul_(k_pow)
        M = torch.bmm(_b(kr).mT, _b(vs)).view(B, H, r.g, Dk, Dv)
        S = _scan_run(M, carry, w_fwd)  # states before each block, the prefix included
        carry = torch.addcmul(M[:, :, -1], S[:, :, -1], lam_c)
        G = _scan_run(torch.bmm(_b(qr).mT, _b(dos)).view(B, H, r.g, Dk, Dv), G_end, w_rev)
        dq_r.baddbmm_(_b(dos), _b(S).mT)  # inter: dQ += (dO ⊙ λ^(t+1)) S^T
        dk_r.baddbmm_(_b(vs), _b(G).mT)  # dK += (V ⊙ λ^(c-1-t)) G^T
        dv_r.baddbmm_(_b(kr.mul_(k_pow)), _b(G))  # dV += (K ⊙ λ^(c-1-t)) G
        for full, part in ((dq, dq_r), (dk, dk_r), (dv, dv_r)):
            _blocks(full, r).copy_(part.view(*blk, -1))
    return dq, dk, dv


def linear_attention_flops(batch: int, heads: int, L: int, Dk: int, Dv: int,
                           block_size: int = DEFAULT_LINEAR_BLOCK) -> float:
    """The chunked algorithm's own FLOPs for forward + backward of L tokens: per block of C tokens and head,
    forward Q K^T (2C²Dk), its product with V (2C²Dv), the state term K^T V and the inter-block Q S
    (2C·Dk·Dv each); the backward twice the forward. Full C x C blocks, no recomputation, nothing for
    LASP's chunk state: the work any chunked kernel must do, whatever this one recomputes."""
    C = min(block_size, L)
    return 3.0 * batch * heads * L * (2 * C * (Dk + Dv) + 4 * Dk * Dv)


def decay_grad(q, dq, k, dk, offset: int) -> torch.Tensor:
    """dLoss/d(log λ) [H] from the finished gradients of q and k, for tokens at global positions offset + t.

    With G_t = t log λ, o_t = Σ_{s<=t} e^(G_t - G_s) (q_t · k_s) v_s depends on G only through
    q̃_t = e^(G_t) q_t and k̃_s = e^(-G_s) k_s, so dLoss/dG_t = q_t · dq_t - k_t · dk_t and
    dLoss/d(log λ) = Σ_t t (q_t · dq_t - k_t · dk_t). Each rank returns its tokens' share (sum it over the
    group like any replicated parameter's gradient); a common offset of t cancels since Σ_t dLoss/dG_t = 0.
    """
    t = torch.arange(offset, offset + q.shape[2], device=q.device, dtype=q.dtype)[:, None]
    return ((q * dq - k * dk) * t).sum(dim=(0, 2, 3))


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
