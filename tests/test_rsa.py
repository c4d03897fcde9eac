"""ring_self_attention (Li et al. 2021): what the registry's conformance tests (tests/test_conformance.py:
float64 exactness at W = 1..4, bytes vs the docstring, errors on every rank) do not cover: the paper's
contiguous-only layout is refused with a clear error, and group=None is the single-device path.
"""

from __future__ import annotations

import pytest
import torch

from seqpar.attention import ring_self_attention
from seqpar.kernels.reference import rel_err, softmax_reference


def _inputs(seed: int, H=8, Hkv=2, L=32, D=16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, L, h, D, generator=g, dtype=torch.float64) for h in (H, Hkv, Hkv, H)]


def test_zigzag_layout_is_refused():
    q, k, v, _ = _inputs(0)
    with pytest.raises(ValueError, match=r"layout='zigzag'.*supports only layout='contiguous'"):
        ring_self_attention(q, k, v, layout="zigzag")


@pytest.mark.parametrize("causal", [True, False])
def test_single_device_group_none(causal):
    """group=None is one device: both rings degenerate to local products, still exact."""
    q, k, v, dout = _inputs(7)
    local = [t.clone().requires_grad_() for t in (q, k, v)]
    out = ring_self_attention(*local, causal=causal)
    out.backward(dout)
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = softmax_reference(*ref_in, causal=causal)
    ref.backward(dout)
    for got, want in zip([out.detach()] + [t.grad for t in local], [ref.detach()] + [t.grad for t in ref_in]):
        assert rel_err(got, want) < 1e-12
