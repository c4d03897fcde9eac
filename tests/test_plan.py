"""Decompose, then fuse (kernels/plan.py): host-side spans, documents and sliding windows cut a block into full
rectangles, square causal diagonals and (windows) anti-diagonal squares that the fused kernel computes; plans
checked cell by cell against the dense mask, results vs the float64 dense reference, and the fallback counter
shows the tiled kernel never runs for these masks."""

from __future__ import annotations

import random

import pytest
import torch

from seqpar.kernels import (
    aligned_plan,
    block_attention,
    block_attention_backward,
    fallback_counts,
    prefix_plan,
    reset_fallbacks,
    spans_plan,
)
from seqpar.kernels.plan import ANTI, WINDOW_CHUNK
from seqpar.kernels.reference import dense_attention, rel_err

TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _positions(spans):
    return torch.cat([torch.arange(a, b) for a, b in spans])


def _doc_ids(pos, cu):
    return torch.searchsorted(torch.tensor(cu), pos, right=True) - 1


def _mask(q_spans, k_spans, causal, cu, window=None):
    qp, kp = _positions(q_spans), _positions(k_spans)
    m = torch.ones(len(qp), len(kp), dtype=torch.bool)
    if causal:
        m &= kp[None] <= qp[:, None]
    if window is not None:  # transformers' sliding window: q - window < k <= q
        m &= kp[None] > qp[:, None] - window
    if cu is not None:
        m &= _doc_ids(qp, cu)[:, None] == _doc_ids(kp, cu)[None]
    return m


def _check(q, k, v, mask, tol, **kw):
    reset_fallbacks()
    out, lse = block_attention(q, k, v, **kw)
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = dense_attention(qr, kr, vr, mask)
    dout = torch.randn_like(ref)
    ref.backward(dout)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert rel_err(out, ref) < tol and rel_err(lse[finite], ref_lse[finite]) < tol
    grads = block_attention_backward(dout.to(q.dtype), q, k, v, out, lse, **kw)
    for got, want in zip(grads, (qr.grad, kr.grad, vr.grad)):
        assert got.shape == want.shape and rel_err(got, want) < tol * 10
    assert fallback_counts() == {}, fallback_counts()  # every piece ran the fused kernel
    return out


def _qkv(Lq, Lk, dtype, H=4, Hkv=2, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, L, h, D, generator=g, dtype=torch.float64).to(dtype)
            for L, h in ((Lq, H), (Lk, Hkv), (Lk, Hkv))]


def _random_case(rng: random.Random):
    """Zigzag/all-gather-like runs over a sequence of L positions and random document boundaries."""
    L = rng.choice([48, 64, 96])
    cuts = sorted(rng.sample(range(1, L), rng.randint(0, 6)))
    cu = [0, *cuts, L] if rng.random() < 0.8 else None
    chunk = L // 8
    order = list(range(8))
    rng.shuffle(order)
    q_chunks, k_chunks = sorted(order[:2]), order[rng.randint(0, 4):][:4]
    q_spans = [(c * chunk, (c + 1) * chunk) for c in q_chunks]
    k_spans = [(c * chunk, (c + 1) * chunk) for c in k_chunks]
    return q_spans, k_spans, rng.random() < 0.8, cu


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_random_spans_and_documents(dtype):
    rng = random.Random(13)
    for case in range(12 if dtype == torch.float64 else 4):
        q_spans, k_spans, causal, cu = _random_case(rng)
        Lq, Lk = sum(b - a for a, b in q_spans), sum(b - a for a, b in k_spans)
        q, k, v = _qkv(Lq, Lk, dtype, seed=case)
        _check(q, k, v, _mask(q_spans, k_spans, causal, cu), TOL[dtype], causal=causal, q_spans=q_spans,
               k_spans=k_spans, cu_seqlens=cu)


@pytest.mark.parametrize("Lq,Lk", [(16, 40), (40, 16), (1, 33)])
@pytest.mark.parametrize("align", ["top_left", "bottom_right"])
def test_rectangular_causal_is_fused(Lq, Lk, align):
    """Decoding with a KV cache and S2 halo tiles (bottom-right), including rows that see no key."""
    q, k, v = _qkv(Lq, Lk, torch.float32, H=6, Hkv=3)
    shift = Lk - Lq if align == "bottom_right" else 0
    mask = torch.arange(Lk)[None] <= torch.arange(Lq)[:, None] + shift
    _check(q, k, v, mask, TOL[torch.float32], causal=align)


def test_documents_on_aligned_positions_and_prefix_plan():
    q, k, v = _qkv(40, 40, torch.float64)
    cu = [0, 7, 7, 30, 40]
    _check(q, k, v, _mask([(0, 40)], [(0, 40)], True, cu), 1e-12, causal=True, cu_seqlens=cu)
    # sinks: rows [0, 8) see no sink, [8, 16) the first 3, [16, 40) all 5
    k5, v5 = k[:, :5], v[:, :5]
    mask = torch.zeros(40, 5, dtype=torch.bool)
    mask[8:16, :3] = True
    mask[16:] = True
    _check(q, k5, v5, mask, 1e-12, plan=prefix_plan(40, 5, [(0, 8, 0), (8, 16, 3), (16, 40, 5)]))


def test_plan_skips_documents_and_coalesces():
    """8 documents of L/8 on a zigzag shard: only the documents' diagonals, about 1/8 of the causal work."""
    L, N = 1024, 2
    c = L // (2 * N)
    q_spans = [(0, c), (3 * c, 4 * c)]
    cu = list(range(0, L + 1, L // 8))
    plan = spans_plan(q_spans, q_spans, causal=True, cu_seqlens=cu)
    assert all(p[4] for p in plan.pieces) and len(plan.pieces) == 4
    assert plan.flops_fraction == pytest.approx(4 * (L // 8) ** 2 / 2 / (2 * c) ** 2)
    # all-gathered zigzag keys of rank 0: keys before chunk 3 are two full rectangles (chunk 0, chunks 1-2)
    k_spans = [(0, c), (3 * c, 4 * c), (c, 2 * c), (2 * c, 3 * c)]
    plan = spans_plan(q_spans, k_spans, causal=True)
    assert sorted(plan.pieces) == [(0, c, 0, c, True), (c, 2 * c, 0, c, False), (c, 2 * c, c, 2 * c, True),
                                   (c, 2 * c, 2 * c, 4 * c, False)]
    assert aligned_plan(4, 6, "bottom_right").pieces == ((0, 4, 0, 2, False), (0, 4, 2, 6, True))


def test_tensor_masks_count_a_fallback_and_bad_spans_raise():
    q, k, v = _qkv(8, 8, torch.float32)
    reset_fallbacks()
    pos = torch.arange(8)
    with pytest.warns(UserWarning, match="tiled"):
        block_attention(q, k, v, causal=True, q_pos=pos, k_pos=pos)
    assert sum(fallback_counts().values()) == 1
    block_attention(q, k, v, causal=True, q_pos=pos, k_pos=pos, backend="torch")  # asked for: not a fallback
    assert sum(fallback_counts().values()) == 1
    with pytest.raises(ValueError, match="the plan/spans cover"):
        block_attention(q, k, v, causal=True, q_spans=[(0, 4)], k_spans=[(0, 8)])
    with pytest.raises(ValueError, match="not both"):
        block_attention(q, k, v, causal=True, q_spans=[(0, 8)], k_spans=[(0, 8)], q_pos=pos, k_pos=pos)


# ----------------------------------------------------------------------------------------- sliding windows


def _coverage(plan) -> torch.Tensor:
    """How many pieces of ``plan`` compute each ``[Lq, Lk]`` cell: a full piece its rectangle, a causal piece
    its lower triangle (diagonal included), an anti piece its upper triangle (diagonal included)."""
    count = torch.zeros(plan.lq, plan.lk, dtype=torch.long)
    for q0, q1, k0, k1, kind in plan.pieces:
        if kind:
            assert q1 - q0 == k1 - k0, f"{kind} piece {(q0, q1, k0, k1)} is not square"
        i, j = torch.arange(q1 - q0)[:, None], torch.arange(k1 - k0)[None]
        cells = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool)
        if kind == ANTI:
            cells = j >= i
        elif kind:
            assert kind is True, kind
            cells = j <= i
        count[q0:q1, k0:k1] += cells
    return count


def _window_cases(seed: int = 5):
    """(q_spans, k_spans, cu, window): zigzag/all-gather-like runs with windows of 1, 2, small, larger than a
    chunk, larger than the sequence, plus long aligned blocks whose windows need several WINDOW_CHUNK chunks."""
    rng = random.Random(seed)
    out = []
    for _ in range(24):
        q_spans, k_spans, _, cu = _random_case(rng)
        L = max(b for _, b in q_spans + k_spans)
        window = rng.choice([1, 2, rng.randint(3, 12), rng.randint(13, L), WINDOW_CHUNK + 44])
        out.append((q_spans, k_spans, cu, window))
    L = 640  # rows 0..639: a window of 300 cuts them into chunks of 256, 256 and 128 rows
    out += [([(0, L)], [(0, L)], None, 300), ([(0, L)], [(0, L)], [0, 100, 517, L], 300),
            ([(0, L)], [(0, L)], None, 97), ([(320, L), (0, 320)], [(0, L)], [0, 333, L], WINDOW_CHUNK + 2)]
    return out


def test_window_plans_cover_every_visible_cell_once():
    """Every cell of the dense mask (causal, same document, q - w < k <= q) is computed by exactly one piece,
    and no other cell by any."""
    chunked = 0
    for q_spans, k_spans, cu, window in _window_cases():
        plan = spans_plan(q_spans, k_spans, causal=True, cu_seqlens=cu, window=window)
        want = _mask(q_spans, k_spans, True, cu, window).long()
        got = _coverage(plan)
        assert torch.equal(got, want), (q_spans, k_spans, cu, window, (got != want).nonzero()[:5].tolist())
        chunked += any(q1 - q0 == WINDOW_CHUNK for q0, q1, *_ in plan.pieces)
    assert chunked >= 2  # the long windows ran the WINDOW_CHUNK cut
    # cells computed stay within (w - 1 + c) / w of the band's (c = the chunk's rows), not the causal triangle
    plan = spans_plan([(0, 640)], [(0, 640)], causal=True, window=97)
    band = _mask([(0, 640)], [(0, 640)], True, None, 97).sum().item() / 640**2
    assert plan.flops_fraction < band * (96 + 96) / 97
    assert any(kind == ANTI for *_, kind in plan.pieces)


def _window_kw(q_spans, k_spans, cu, window):
    aligned = q_spans == k_spans == [(0, q_spans[0][1])]
    spans = {} if aligned else {"q_spans": q_spans, "k_spans": k_spans}  # aligned blocks: window alone
    return {"causal": True, "cu_seqlens": cu, "window": window, **spans}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_window_block_attention_matches_dense(dtype):
    """Forward and backward of windowed blocks (spans, documents, aligned blocks) vs float64, all fused."""
    cases = [c for c in _window_cases() if _mask(*c[:2], True, *c[2:]).any()]  # some row sees some key
    cases = cases[:10] + cases[-2:] if dtype == torch.float64 else cases[::6] + cases[-1:]
    for i, (q_spans, k_spans, cu, window) in enumerate(cases):
        Lq, Lk = sum(b - a for a, b in q_spans), sum(b - a for a, b in k_spans)
        q, k, v = _qkv(Lq, Lk, dtype, seed=i, D=8 if Lq > 256 else 16)
        _check(q, k, v, _mask(q_spans, k_spans, True, cu, window), TOL[dtype],
               **_window_kw(q_spans, k_spans, cu, window))


@pytest.mark.parametrize("window", [1, 3, 10])
def test_window_on_aligned_blocks_and_kv_cache(window):
    """``aligned_plan(..., window=)``: square blocks, and bottom-right rectangles (decoding with a KV cache:
    query i of Lq is at position i + Lk - Lq), including rows whose window holds one key."""
    for Lq, Lk, align in ((24, 24, True), (5, 30, "bottom_right"), (12, 12, "bottom_right"), (20, 9, "top_left")):
        shift = Lk - Lq if align == "bottom_right" else 0
        plan = aligned_plan(Lq, Lk, align, window=window)
        want = _mask([(shift, shift + Lq)], [(0, Lk)], True, None, window)
        assert torch.equal(_coverage(plan), want.long()), (Lq, Lk, align)
        q, k, v = _qkv(Lq, Lk, torch.float64, seed=window)
        _check(q, k, v, want, 1e-12, causal=align, window=window)


def test_window_needs_causal_attention():
    q, k, v = _qkv(16, 16, torch.float32)
    with pytest.raises(ValueError, match="window=4 needs causal"):
        spans_plan([(0, 16)], [(0, 16)], causal=False, window=4)
    with pytest.raises(ValueError, match="window=4 needs causal"):
        aligned_plan(16, 16, False, window=4)
    with pytest.raises(ValueError, match="window=4 needs causal"):
        block_attention(q, k, v, causal=False, window=4)
    with pytest.raises(ValueError, match="window=0"):
        spans_plan([(0, 16)], [(0, 16)], causal=True, window=0)
