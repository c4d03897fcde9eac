"""Block attention kernel and lse merge vs explicit float64 softmax attention and vs PyTorch SDPA."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from seqpar.kernels import block_attention, block_attention_backward, merge_all, merge_partials
from seqpar.kernels.reference import causal_mask, dense_attention, rel_err, segment_mask

TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-2}


def make_qkv(B=2, Lq=48, Lk=48, H=4, Hkv=2, D=16, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Lq, H, D, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(B, Lk, Hkv, D, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, Lk, Hkv, D, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v


def check_block(q, k, v, mask, tol, **kw):
    """Forward and backward of the kernel against the float64 dense reference (same mask)."""
    out, lse = block_attention(q, k, v, **kw)
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = dense_attention(qr, kr, vr, mask, scale=kw.get("softmax_scale"))
    dout = torch.randn_like(ref_out)
    ref_out.backward(dout)
    assert out.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
    assert rel_err(out, ref_out) < tol
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert rel_err(lse[finite], ref_lse[finite]) < tol
    grads = block_attention_backward(dout.to(q.dtype), q, k, v, out, lse, **kw)
    for got, ref in zip(grads, (qr.grad, kr.grad, vr.grad)):
        assert got.shape == ref.shape
        assert rel_err(got, ref) < tol * 10
    return out, lse


@pytest.mark.parametrize("backend", ["torch", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)])
def test_block_vs_float64(backend, dtype, causal, heads):
    H, Hkv = heads
    q, k, v = make_qkv(H=H, Hkv=Hkv, D=80 if H == 8 else 64, dtype=dtype)
    mask = causal_mask(48, 48) if causal else None
    check_block(q, k, v, mask, TOL[dtype], causal=causal, backend=backend, block_size=16)


@pytest.mark.parametrize("Lq,Lk", [(32, 48), (48, 32)])
@pytest.mark.parametrize("align", ["top_left", "bottom_right"])
def test_rectangular_causal_alignments(Lq, Lk, align):
    q, k, v = make_qkv(Lq=Lq, Lk=Lk)
    mask = causal_mask(Lq, Lk, bottom_right=align == "bottom_right")
    out, lse = check_block(q, k, v, mask, 1e-12, causal=align, block_size=16)
    if align == "bottom_right" and Lq > Lk:  # the first Lq - Lk rows see nothing
        assert torch.isinf(lse[:, :, : Lq - Lk]).all() and (out[:, : Lq - Lk] == 0).all()


def test_positions_and_segments():
    """Zigzag-style global positions and packed documents, tiled with blocks smaller than the documents."""
    q, k, v = make_qkv(Lq=40, Lk=56, H=6, Hkv=3, D=24)
    q_pos = torch.cat([torch.arange(0, 20), torch.arange(100, 120)])
    k_pos = torch.cat([torch.arange(10, 38), torch.arange(90, 118)])
    q_seg, k_seg = (q_pos >= 30).long() + (q_pos >= 105).long(), (k_pos >= 30).long() + (k_pos >= 105).long()
    mask = (k_pos[None] <= q_pos[:, None]) & segment_mask(q_seg, k_seg)
    check_block(q, k, v, mask, 1e-12, causal=True, q_pos=q_pos, k_pos=k_pos, q_seg=q_seg, k_seg=k_seg, block_size=8)
    check_block(q, k, v, segment_mask(q_seg, k_seg), 1e-12, q_seg=q_seg, k_seg=k_seg, block_size=8)


@pytest.mark.parametrize("causal", [False, True])
def test_matches_sdpa(causal):
    q, k, v = make_qkv(dtype=torch.float32, H=8, Hkv=2)
    out, _ = block_attention(q, k, v, causal=causal, backend="torch", block_size=16)
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=causal, enable_gqa=True).transpose(1, 2)
    assert rel_err(out, ref) < 2e-6


@pytest.mark.parametrize("parts", [1, 2, 3, 5])
def test_merge_of_blocks_equals_attention_over_concatenation(parts):
    """Key blocks of unequal size, one of them fully masked for some rows, merged in scrambled order."""
    q, k, v = make_qkv(Lq=24, Lk=60)
    q_pos, k_pos = torch.arange(36, 60), torch.arange(60)
    ref_out, ref_lse = dense_attention(q, k, v, k_pos[None] <= q_pos[:, None])
    edges = torch.linspace(0, 60, parts + 1).long().tolist()
    blocks = [
        block_attention(q, k[:, a:b], v[:, a:b], causal=True, q_pos=q_pos, k_pos=k_pos[a:b])
        for a, b in itertools.pairwise(edges)
    ]
    out, lse = merge_all(blocks[::-1])
    assert rel_err(out, ref_out) < 1e-12 and rel_err(lse, ref_lse) < 1e-12


def test_merge_keeps_empty_rows_empty():
    out = torch.zeros(1, 3, 2, 4)
    lse = torch.full((1, 2, 3), float("-inf"))
    o2, l2 = merge_partials(out, lse, out.clone(), lse.clone())
    assert not torch.isnan(o2).any() and torch.isinf(l2).all()


def test_bad_inputs_name_the_problem():
    q, k, v = make_qkv(H=4, Hkv=3)
    with pytest.raises(ValueError, match="kv heads"):
        block_attention(q, k, v)
    q, k, v = make_qkv()
    with pytest.raises(ValueError, match="causal="):
        block_attention(q, k, v, causal="diagonal")
    with pytest.raises(ValueError, match="backend="):
        block_attention(q, k, v, backend="cudnn")


@pytest.mark.parametrize("backend", ["torch", "sdpa"])
def test_blockwise_backward_from_merged_lse(backend):
    """Per-block backward with the merged (out, lse) sums to the gradient of attention over all keys."""
    q, k, v = make_qkv(Lq=32, Lk=64, H=8, Hkv=2, dtype=torch.float32)
    halves = [(0, 32), (32, 64)]
    parts = [block_attention(q, k[:, a:b], v[:, a:b], causal=(a == 32), backend=backend) for a, b in halves]
    out, lse = merge_all(parts)
    qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
    mask = torch.cat([torch.ones(32, 32, dtype=torch.bool), causal_mask(32, 32)], dim=1)
    ref, _ = dense_attention(qr, kr, vr, mask)
    dout = torch.randn_like(ref)
    ref.backward(dout)
    dq = torch.zeros_like(qr)
    dk, dv = torch.zeros_like(kr), torch.zeros_like(vr)
    for a, b in halves:
        gq, gk, gv = block_attention_backward(dout.float(), q, k[:, a:b], v[:, a:b], out, lse,
                                              causal=(a == 32), backend=backend)
        dq += gq
        dk[:, a:b] += gk
        dv[:, a:b] += gv
    assert rel_err(out, ref) < 2e-6
    for got, want in ((dq, qr.grad), (dk, kr.grad), (dv, vr.grad)):
        assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_square_block_with_explicit_positions_is_not_plain_causal(backend):
    """Zigzag-like positions on a square block: the auto backend must not fall back to a plain causal kernel."""
    q, k, v = make_qkv(Lq=32, Lk=32, dtype=torch.float32)
    pos = torch.cat([torch.arange(0, 16), torch.arange(48, 64)])
    k_pos = torch.cat([torch.arange(16, 32), torch.arange(32, 48)])
    mask = k_pos[None] <= pos[:, None]
    check_block(q, k, v, mask, 2e-6, causal=True, q_pos=pos, k_pos=k_pos, backend=backend)


# ------------------------------------------------------------------------------------------ flash-attn varlen


def reference_flash_attn():
    """A stand-in ``flash_attn`` module in pure PyTorch, written from flash-attn's documented semantics
    (flash_attn_interface.py docstrings): ``flash_attn_varlen_func`` takes ``[total, H, D]`` tensors and int32
    ``cu_seqlens``; causal masks are aligned to the bottom-right corner of each sequence (query i of Lq sees
    keys j <= i + Lk - Lq); GQA head h reads kv head h // (H / Hkv); ``return_attn_probs`` returns the lse
    ``[H, total_q]`` float32 (``flash_attn_func``: ``[B, H, Lq]``); a row that sees no key gives 0 and lse +inf."""
    import types
    from collections import Counter

    mod = types.ModuleType("flash_attn")
    mod.calls = Counter()

    def one(q, k, v, scale, causal):  # q [Lq, H, D], k/v [Lk, Hkv, D] -> out [Lq, H, D], lse [H, Lq]
        Lq, H, _ = q.shape
        Lk, Hkv = k.shape[:2]
        kk, vv = (t.double().repeat_interleave(H // Hkv, dim=1) for t in (k, v))
        s = torch.einsum("qhd,khd->hqk", q.double(), kk) * scale
        if causal:
            keep = torch.arange(Lk)[None, :] <= torch.arange(Lq)[:, None] + (Lk - Lq)
            s = s.masked_fill(~keep, float("-inf"))
        lse = torch.logsumexp(s, dim=-1)
        empty = torch.isneginf(lse)
        p = torch.exp(s - torch.where(empty, 0.0, lse)[..., None])
        out = torch.einsum("hqk,khd->qhd", p, vv)
        return out.to(q.dtype), torch.where(empty, float("inf"), lse).float()

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False, return_attn_probs=False):
        mod.calls["flash_attn_varlen_func"] += 1
        assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32 and q.dim() == k.dim() == 3
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        assert len(cq) == len(ck) and cq[0] == ck[0] == 0 and cq[-1] == q.shape[0] and ck[-1] == k.shape[0]
        assert max(b - a for a, b in itertools.pairwise(cq)) == max_seqlen_q
        assert max(b - a for a, b in itertools.pairwise(ck)) == max_seqlen_k
        scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
        parts = [one(q[a:b], k[c:d], v[c:d], scale, causal) for a, b, c, d in zip(cq, cq[1:], ck, ck[1:])]
        out, lse = torch.cat([o for o, _ in parts]), torch.cat([lse for _, lse in parts], dim=1)
        return (out, lse, None) if return_attn_probs else out

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, return_attn_probs=False):
        mod.calls["flash_attn_func"] += 1
        scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
        parts = [one(q[b], k[b], v[b], scale, causal) for b in range(q.shape[0])]
        out, lse = torch.stack([o for o, _ in parts]), torch.stack([lse for _, lse in parts])
        return (out, lse, None) if return_attn_probs else out

    mod.flash_attn_varlen_func, mod.flash_attn_func = flash_attn_varlen_func, flash_attn_func
    return mod


def test_reference_flash_attn_follows_its_documented_masks():
    """flash-attn's docstring: seqlen_q = 2, seqlen_k = 5 keeps [[1 1 1 1 0], [1 1 1 1 1]]; seqlen_q = 5,
    seqlen_k = 2 keeps rows [0 0] x 3, [1 0], [1 1], and an all-zero row gives output zero (lse +inf)."""
    fa = reference_flash_attn()
    g = torch.Generator().manual_seed(0)
    for lq, lk, keep in ((2, 5, [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]), (5, 2, [[0, 0]] * 3 + [[1, 0], [1, 1]])):
        q, k, v = (torch.randn(n, 2, 8, generator=g, dtype=torch.float64) for n in (lq, lk, lk))
        out, lse, _ = fa.flash_attn_varlen_func(q, k, v, torch.tensor([0, lq], dtype=torch.int32),
                                                torch.tensor([0, lk], dtype=torch.int32), lq, lk, causal=True,
                                                return_attn_probs=True)
        mask = torch.tensor(keep, dtype=torch.bool)
        ref_out, ref_lse = dense_attention(q[None], k[None], v[None], mask)
        assert lse.shape == (2, lq) and lse.dtype == torch.float32
        empty = ~mask.any(1)
        assert torch.equal(torch.isposinf(lse), empty[None].expand(2, -1))
        assert torch.allclose(out, ref_out[0]) and torch.allclose(lse[:, ~empty].double(), ref_lse[0][:, ~empty])


def _varlen_plans():
    from seqpar.kernels import aligned_plan, spans_plan
    from seqpar.sharding import local_chunks

    L, N = 96, 3
    runs = [local_chunks(L, N, r, "zigzag") for r in range(N)]
    cu = [0, 10, 10, 40, 41, 90, 96]  # an empty document, a one-token one, documents crossing chunks
    return {
        "zigzag diagonal, documents": spans_plan(runs[1], runs[1], causal=True, cu_seqlens=cu),
        "zigzag src < rank, documents": spans_plan(runs[2], [runs[0][0]], causal=True, cu_seqlens=cu),
        "zigzag src > rank, documents": spans_plan([runs[0][1]], runs[2], causal=True, cu_seqlens=cu),
        "contiguous diagonal, documents": spans_plan([(32, 64)], [(32, 64)], causal=True, cu_seqlens=cu),
        "bottom-right, Lq < Lk": aligned_plan(24, 40, "bottom_right"),
        "bottom-right, Lq > Lk": aligned_plan(40, 24, "bottom_right"),
        "window": aligned_plan(40, 40, True, window=7),
    }


@pytest.mark.parametrize("name", list(_varlen_plans()))
def test_flash_attn_varlen_adapter_matches_the_tiled_kernel(monkeypatch, name):
    """A packed block through ``flash_attn_varlen_func`` (one call) equals the tiled kernel on the same plan,
    output and lse (with -inf for rows that see no key); a plan that is not one varlen call (a window's
    anti-diagonals) runs piece by piece through ``flash_attn_func``."""
    from seqpar.kernels import softmax

    plan = _varlen_plans()[name]
    fa = reference_flash_attn()
    monkeypatch.setattr(softmax, "_flash_attn_module", lambda: fa)
    q, k, v = make_qkv(B=2, Lq=plan.lq, Lk=plan.lk, H=4, Hkv=2, D=16, dtype=torch.float32)
    got_out, got_lse = softmax._plan_forward(q, k, v, 0.3, plan, "flash_attn", 16)
    ref_out, ref_lse = softmax._plan_forward(q, k, v, 0.3, plan, "torch", 16)
    varlen = softmax.varlen_segments(plan)
    assert (varlen is None) == (name == "window")
    assert fa.calls == ({"flash_attn_varlen_func": 1} if varlen else {"flash_attn_func": len(plan.pieces)})
    assert got_out.dtype == got_lse.dtype == torch.float32 and got_lse.shape == ref_lse.shape
    assert torch.equal(torch.isneginf(got_lse), torch.isneginf(ref_lse))
    seen = torch.isfinite(ref_lse)
    assert torch.allclose(got_lse[seen], ref_lse[seen], atol=1e-5)
    assert torch.allclose(got_out, ref_out, atol=1e-5)
