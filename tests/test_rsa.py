"""ring_self_attention (Li et al. 2021): what the registry's conformance tests (tests/test_conformance.py:
float64 exactness at W = 1..4, bytes vs the docstring, errors on every rank) do not cover: the paper's
contiguous-only layout is refused with a clear error, group=None is the single-device path, and a sliding
window skips exactly the blocks no row's window reaches (the rings still make every hop).
"""

from __future__ import annotations

import pytest
import torch

from seqpar.attention import ring_self_attention
from seqpar.attention.rsa import _RSAPlan
from seqpar.kernels.reference import rel_err, softmax_reference


def _inputs(seed: int, H=8, Hkv=2, L=32, D=16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, L, h, D, generator=g, dtype=torch.float64) for h in (H, Hkv, Hkv, H)]


def test_zigzag_layout_is_refused():
    q, k, v, _ = _inputs(0)
    with pytest.raises(ValueError, match=r"layout='zigzag'.*supports only layout='contiguous'"):
        ring_self_attention(q, k, v, layout="zigzag")


@pytest.mark.parametrize("causal,window", [(True, None), (False, None), (True, 5)])
def test_single_device_group_none(causal, window):
    """group=None is one device: both rings degenerate to local products, still exact."""
    q, k, v, dout = _inputs(7)
    local = [t.clone().requires_grad_() for t in (q, k, v)]
    out = ring_self_attention(*local, causal=causal, window=window)
    out.backward(dout)
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = softmax_reference(*ref_in, causal=causal, window=window)
    ref.backward(dout)
    for got, want in zip([out.detach()] + [t.grad for t in local], [ref.detach()] + [t.grad for t in ref_in]):
        assert rel_err(got, want) < 1e-12


def test_window_masks_and_skipped_blocks():
    """Rank r of 4 (16 tokens each) against every src: a block is computed iff some cell is inside the window,
    and its mask (None: all visible) is the dense mask's block, for windows ending on and off block edges."""
    n, world = 16, 4
    pos = torch.arange(n * world)
    for window in (1, 2, 5, 17, 18, 33, 40):
        dense = (pos[None] <= pos[:, None]) & (pos[None] > pos[:, None] - window)
        for rank in range(world):
            plan = _RSAPlan(None, rank, world, True, 1.0, n, window)
            for src in range(world):
                block = dense[rank * n : (rank + 1) * n, src * n : (src + 1) * n]
                assert plan.visible(src) == bool(block.any()), (window, rank, src)
                if plan.visible(src):
                    mask = plan.mask(src, "cpu")
                    assert torch.equal(torch.ones_like(block) if mask is None else mask, block), (window, rank, src)


def test_window_needs_causal_and_a_positive_int():
    q, k, v, _ = _inputs(0)
    with pytest.raises(ValueError, match="window=4 needs causal"):
        ring_self_attention(q, k, v, causal=False, window=4)
    with pytest.raises(ValueError, match="window=0"):
        ring_self_attention(q, k, v, window=0)
