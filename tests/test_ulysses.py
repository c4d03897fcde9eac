"""ulysses_attention (DeepSpeed-Ulysses) vs the float64 dense reference on the whole sequence.

One spawn of 4 ranks runs W = 4, 2, 3 and 1 on sub-groups, as in tests/test_allgather.py.
Heads must split over W, so W=3 uses 6 heads; GQA includes kv heads < W (replicated kv heads).
"""

from __future__ import annotations

import pytest
import torch

from seqpar.comm import ByteCounter
from tests.sp_harness import BF16, F32, F64, TOL, assert_errors, collect_errors, compare_case, error_of
from tests.sp_harness import spawn_worlds as _spawn


def _head_configs(world: int) -> list[tuple[int, int]]:
    """(heads, kv heads): MHA, GQA, and kv heads below W where W > 2 (replication)."""
    return [(6, 6), (6, 3), (6, 2)] if world == 3 else [(8, 8), (8, 2), (8, 1)]


def _cases(world: int) -> dict:
    cases = {}
    mha, gqa, few_kv = _head_configs(world)
    for layout in ("contiguous", "zigzag"):
        for causal in (True, False):
            for H, Hkv in (mha, gqa, few_kv):
                cases[f"{layout}-c{int(causal)}-{H}x{Hkv}-f32"] = dict(layout=layout, causal=causal, H=H, Hkv=Hkv,
                                                                       dtype=F32)
            cases[f"{layout}-c{int(causal)}-f64"] = dict(layout=layout, causal=causal, H=gqa[0], Hkv=gqa[1],
                                                         dtype=F64)
        cases[f"{layout}-bf16"] = dict(layout=layout, causal=True, H=few_kv[0], Hkv=few_kv[1], dtype=BF16)
    cases["zigzag-d80"] = dict(layout="zigzag", causal=True, H=mha[0], Hkv=gqa[1], D=80, Lq=8, dtype=F32)
    cases["strided-scale"] = dict(layout="zigzag", causal=True, H=mha[0], Hkv=mha[1], dtype=F64, softmax_scale=0.3,
                                  strided=True)
    return cases


def _bytes_checks(rank, world, group) -> dict:
    """ByteCounter totals vs the docstring: fwd (N-1)/N (b_q + 2 rep b_kv) + (N-1)/N b_q, bwd the same."""
    from seqpar.attention import ulysses_attention

    found = {}
    for H, Hkv in _head_configs(world):
        B, Lq, D = 2, 8, 16
        q, k, v = (torch.randn(B, Lq, h, D, requires_grad=True) for h in (H, Hkv, Hkv))
        b_q, b_kv = q.numel() * 4, k.numel() * 4
        rep = next(r for r in range(1, world + 1) if Hkv * r % world == 0)  # least even replication
        with ByteCounter() as fwd:
            out = ulysses_attention(q, k, v, group=group, layout="zigzag")
        with ByteCounter() as bwd:
            out.sum().backward()
        total = (world - 1) * (2 * b_q + 2 * rep * b_kv) // world
        found[f"{H}x{Hkv}"] = {
            "measured": (fwd.sent, fwd.received, fwd.calls, bwd.sent, bwd.received, bwd.calls),
            "formula": (total, total, 2 if world > 1 else 0, total, total, 2 if world > 1 else 0),
        }
    return found


def _bad_input_checks(rank, world, group) -> dict:
    from seqpar.attention import ulysses_attention

    def call(Lq=8, H=None, Hkv=None, **kw):
        H = H or 2 * world
        q, k, v = (torch.randn(2, Lq, h, 16) for h in (H, Hkv or H, Hkv or H))
        return lambda: ulysses_attention(q, k, v, group=group, **kw)

    msgs = {
        "kv_heads": error_of(call(H=4 * world, Hkv=4 * world - 1), f"kv heads={4 * world - 1}", "must divide"),
        "odd_zigzag": error_of(call(Lq=5, layout="zigzag"), "sequence length", "multiple of", "zigzag"),
        "layout": error_of(call(layout="rows"), "layout='rows'"),
        "scale": error_of(call(softmax_scale=-1.0), "softmax_scale=-1.0", "positive"),
    }
    if world > 1:
        msgs["heads"] = error_of(call(H=world + 1, Hkv=1), f"heads={world + 1}", f"N={world}", "valid")
        msgs["shape"] = error_of(call(Lq=8 + 2 * (rank == world - 1)), "q has different shapes")
    return msgs


def _all_checks(rank, world, group) -> dict:
    from seqpar.attention import ulysses_attention

    cases = {name: {**compare_case(ulysses_attention, rank, world, group, shard_layout=c["layout"], **c),
                    "tol": TOL[c["dtype"]]} for name, c in _cases(world).items()}
    return {"cases": cases, "bytes": _bytes_checks(rank, world, group),
            "bad": _bad_input_checks(rank, world, group)}


@pytest.fixture(scope="module")
def worlds():
    return _spawn(_all_checks)


def test_matches_float64_reference(worlds):
    for world, results in worlds.items():
        for name, errs in collect_errors(results).items():
            tol = errs.pop("tol")
            assert max(errs.values()) <= tol, (world, name, errs)


def test_bytes_match_formula(worlds):
    for world, results in worlds.items():
        for r in results:
            for heads, b in r["bytes"].items():
                assert b["measured"] == b["formula"], (world, heads, b)


def test_bad_inputs_raise_on_every_rank(worlds):
    for world, results in worlds.items():
        assert_errors(results, world)
        assert ("heads" in results[0]["bad"]) == (world > 1)
