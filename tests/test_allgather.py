"""allgather_attention (LASP-2H softmax part) vs the float64 dense reference on the whole sequence.

One spawn of 4 ranks runs every case for W = 4, 2, 3 and 1 (tests/sp_harness.py, shared with the Ulysses
and USP tests).
"""

from __future__ import annotations

import pytest
import torch

from seqpar.comm import ByteCounter
from tests.sp_harness import BF16, F32, F64, TOL, assert_errors, collect_errors, compare_case, error_of, spawn_worlds

# ----------------------------------------------------------------------------------------- rank side


def _cases(world: int) -> dict:
    cases = {}
    for layout in ("zigzag", "contiguous"):
        for causal in (True, False):
            for H, Hkv in ((4, 4), (8, 2)):
                for dtype in (F64, F32):
                    cases[f"{layout}-c{int(causal)}-{H}x{Hkv}-{dtype}"] = dict(
                        layout=layout, causal=causal, H=H, Hkv=Hkv, dtype=dtype)
        cases[f"{layout}-bf16"] = dict(layout=layout, causal=True, H=8, Hkv=2, dtype=BF16)
    cases["zigzag-d80"] = dict(layout="zigzag", causal=True, H=4, Hkv=1, D=80, dtype=F32, Lq=8)
    cases["strided"] = dict(layout="zigzag", causal=True, H=4, Hkv=2, dtype=F64, strided=True, softmax_scale=0.3)
    # Packed documents crossing rank boundaries (and one empty document).
    L = 16 * world
    cu = torch.tensor([0, 5, 5, L // 2 + 3, L - 2, L])
    for layout in ("zigzag", "contiguous"):
        for causal in (True, False):
            for dtype in (F64, F32):
                cases[f"varlen-{layout}-c{int(causal)}-{dtype}"] = dict(
                    layout=layout, causal=causal, H=4, Hkv=2, dtype=dtype, cu_seqlens=cu)
    return cases


def _bytes_checks(rank, world, group) -> dict:
    """ByteCounter totals vs the docstring's formulas (forward all-gather, backward reduce-scatter)."""
    from seqpar.attention import allgather_attention

    found = {}
    for dtype in (F32, BF16):
        B, Lq, H, Hkv, D = 2, 8, 4, 2, 16
        q, k, v = (torch.randn(B, Lq, h, D, dtype=dtype, requires_grad=True) for h in (H, Hkv, Hkv))
        b_kv = B * Lq * Hkv * D * k.element_size()
        a = 2 if dtype == BF16 else 1
        with ByteCounter() as fwd:
            out = allgather_attention(q, k, v, group=group)
        with ByteCounter() as bwd:
            out.sum().backward()
        fwd_bytes, bwd_bytes = (world - 1) * 2 * b_kv, (world - 1) * 2 * a * b_kv
        found[str(dtype)] = {
            "measured": (fwd.sent, fwd.received, dict(fwd.by_op), bwd.sent, bwd.received, dict(bwd.by_op)),
            "formula": (fwd_bytes, fwd_bytes, {"all_gather": fwd_bytes} if world > 1 else {},
                        bwd_bytes, bwd_bytes, {"reduce_scatter": bwd_bytes} if world > 1 else {}),
        }
    return found


def _bad_input_checks(rank, world, group) -> dict:
    from seqpar.attention import allgather_attention

    def call(Lq=8, H=4, Hkv=2, **kw):
        q, k, v = (torch.randn(2, Lq, h, 16) for h in (H, Hkv, Hkv))
        return lambda: allgather_attention(q, k, v, group=group, **kw)

    msgs = {
        "kv_heads": error_of(call(H=8, Hkv=3), "kv heads=3", "heads=8"),
        "odd_zigzag": error_of(call(Lq=5), "sequence length", "multiple of", "zigzag"),
        "layout": error_of(call(layout="zig"), "layout='zig'", "contiguous"),
        "causal": error_of(call(causal="bottom_right"), "causal='bottom_right'", "True or False"),
        "cu_seqlens": error_of(call(cu_seqlens=torch.tensor([0, 3, 8 * world - 1])), "cu_seqlens", "0 to"),
        "cu_list": error_of(call(cu_seqlens=[0, 8 * world]), "cu_seqlens=[0,", "integer tensor"),
    }
    if world > 1:  # the last rank passes a longer shard: every rank must raise, none may hang
        msgs["shape"] = error_of(call(Lq=8 + 2 * (rank == world - 1)), "q has different shapes")
        cu = torch.tensor([0, 3 + (rank == world - 1), 8 * world])  # valid on each rank, not the same
        msgs["cu_ranks"] = error_of(call(cu_seqlens=cu), "cu_seqlens differs across", "every rank")
    return msgs


def _all_checks(rank, world, group) -> dict:
    from seqpar.attention import allgather_attention
    from seqpar.kernels import fallback_counts, reset_fallbacks

    reset_fallbacks()
    cases = {name: {**compare_case(allgather_attention, rank, world, group, shard_layout=c["layout"], **c),
                     "tol": TOL[c["dtype"]]} for name, c in _cases(world).items()}
    return {"cases": cases, "fallbacks": fallback_counts(), "bytes": _bytes_checks(rank, world, group),
            "bad": _bad_input_checks(rank, world, group)}


# ----------------------------------------------------------------------------------------- pytest side


@pytest.fixture(scope="module")
def worlds():
    return spawn_worlds(_all_checks)


def test_matches_float64_reference(worlds):
    for world, results in worlds.items():
        for name, errs in collect_errors(results).items():
            tol = errs.pop("tol")
            assert max(errs.values()) <= tol, (world, name, errs)


def test_bytes_match_formula(worlds):
    for world, results in worlds.items():
        for r in results:
            for dtype, b in r["bytes"].items():
                assert b["measured"] == b["formula"], (world, dtype, b)


def test_bad_inputs_raise_on_every_rank(worlds):
    for world, results in worlds.items():
        assert_errors(results, world)


def test_no_tiled_kernel_fallback(worlds):
    """Every block (zigzag/contiguous all-gathered keys, documents) ran a fused kernel."""
    for world, results in worlds.items():
        assert all(r is None or r["fallbacks"] == {} for r in results), world
