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
