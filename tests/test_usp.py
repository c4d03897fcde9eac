"""usp_attention (Ulysses x ring) vs the float64 dense reference on the whole sequence.

One spawn of 4 ranks: W=4 with (u, r) = (2, 2), (4, 1), (1, 4), then W=2 with (2, 1), (1, 2) on the
sub-groups {0, 1}, {2, 3} (make_usp_groups then builds the sub-groups of two SP groups at once, as under
DP x SP); W=1 in-process. W=3 needs its own spawn (make_usp_groups is collective over the world) and is
left out: (3, 1) and (1, 3) reduce to Ulysses and ring, tested at W=3 in their own files.
"""

from __future__ import annotations

import functools

import pytest
import torch

from seqpar.comm import ByteCounter
from tests.sp_harness import BF16, F32, F64, TOL, assert_errors, collect_errors, compare_case, error_of
from tests.sp_harness import spawn_worlds as _spawn


def _degrees(world: int) -> list[tuple[int, int]]:
    return [(u, world // u) for u in ((2, 4, 1) if world == 4 else (world, 1)) if world % u == 0]


def _cases(world: int, u: int) -> dict:
    H = 6 if world == 3 else 8
    few_kv = 1 if u > 1 else 2  # kv heads < u: replicated for the all-to-all
    cases = {}
    for layout in ("zigzag", "contiguous"):
        for causal in (True, False):
            cases[f"{layout}-c{int(causal)}-{H}x2-f32"] = dict(layout=layout, causal=causal, H=H, Hkv=2, dtype=F32)
        cases[f"{layout}-f64-mha"] = dict(layout=layout, causal=True, H=H, Hkv=H, dtype=F64)
    cases["zigzag-bf16"] = dict(layout="zigzag", causal=True, H=H, Hkv=few_kv, dtype=BF16)
    cases["zigzag-fewkv-f64"] = dict(layout="zigzag", causal=True, H=H, Hkv=few_kv, dtype=F64)
    cases["zigzag-d80"] = dict(layout="zigzag", causal=True, H=H, Hkv=2, D=80, Lq=8, dtype=F32)
    cases["strided-scale"] = dict(layout="zigzag", causal=True, H=H, Hkv=2, dtype=F64, softmax_scale=0.3, strided=True)
    return cases


def _bytes_check(rank, world, group, u, r, groups) -> dict:
    """a2a and ring bytes vs the module docstring (float32: itemsize = acc = 4)."""
    from seqpar.attention import usp_attention

    B, Lq, D, H, Hkv = 2, 8, 16, 8 if world != 3 else 6, 1
    q, k, v = (torch.randn(B, Lq, h, D, requires_grad=True) for h in (H, Hkv, Hkv))
    b_q, b_kv = q.numel() * 4, k.numel() * 4
    rep = next(x for x in range(1, u + 1) if Hkv * x % u == 0)  # least even replication over u
    with ByteCounter() as fwd:
        out = usp_attention(q, k, v, group=group, ulysses_group=groups[0], ring_group=groups[1])
    with ByteCounter() as bwd:
        out.sum().backward()
    a2a = (u - 1) * (2 * b_q + 2 * rep * b_kv) // u
    ring_fwd = (r - 1) * 2 * rep * b_kv
    ring_bwd = ring_fwd + (r * 2 * rep * b_kv if r > 1 else 0)
    return {"measured": (fwd.by_op.get("all_to_all", 0), fwd.by_op.get("ring", 0), fwd.sent, fwd.received,
                         bwd.by_op.get("all_to_all", 0), bwd.by_op.get("ring", 0), bwd.sent),
            "formula": (a2a, ring_fwd, a2a + ring_fwd, a2a + ring_fwd, a2a, ring_bwd, a2a + ring_bwd)}


def _bad_input_checks(rank, world, group, u, r, groups) -> dict:
    from seqpar.attention import usp_attention

    def call(Lq=8, H=None, Hkv=2, sub=groups, **kw):
        H = H or 2 * u
        q, k, v = (torch.randn(2, Lq, h, 16) for h in (H, Hkv, Hkv))
        return lambda: usp_attention(q, k, v, group=group, ulysses_group=sub[0], ring_group=sub[1], **kw)

    msgs = {
        "kv_heads": error_of(call(H=4 * u, Hkv=4 * u - 1), f"kv heads={4 * u - 1}", "must divide"),
        "odd_zigzag": error_of(call(Lq=5), "sequence length", "multiple of", "zigzag"),
    }
    if u > 1:
        msgs["heads"] = error_of(call(H=u + 1, Hkv=1), f"heads={u + 1}", f"Ulysses degree u={u}", "valid")
    if world > 1:
        msgs["shape"] = error_of(call(Lq=8 + 2 * (rank == world - 1)), "q has different shapes")
        msgs["no_groups"] = error_of(call(sub=(None, None)), "make_usp_groups")
    if u == r == 2:  # swapped sub-groups: ranks 0 and 3 look right, 1 and 2 do not; all must raise
        msgs["swapped"] = error_of(call(sub=groups[::-1]), "do not split group", "make_usp_groups")
    return msgs


def _all_checks(rank, world, group) -> dict:
    from seqpar.attention import usp_attention
    from seqpar.attention.usp import make_usp_groups

    out = {"cases": {}, "bytes": {}, "bad": {}}
    for u, r in _degrees(world):
        groups = make_usp_groups(group, u)
        fn = functools.partial(usp_attention, ulysses_group=groups[0], ring_group=groups[1])
        for name, c in _cases(world, u).items():
            errs = compare_case(fn, rank, world, group, shard_layout=c["layout"], **c)
            out["cases"][f"u{u}r{r}-{name}"] = {**errs, "tol": TOL[c["dtype"]]}
        out["bytes"][(u, r)] = _bytes_check(rank, world, group, u, r, groups)
        bad = _bad_input_checks(rank, world, group, u, r, groups)
        out["bad"].update({f"u{u}r{r}-{k}": v for k, v in bad.items()})
    return out


@pytest.fixture(scope="module")
def worlds():
    # make_usp_groups is collective over the whole world, so W=3 cannot run beside an idle rank 3.
    return _spawn(_all_checks, with_three=False)


def test_matches_float64_reference(worlds):
    for world, results in worlds.items():
        errors = collect_errors(results)
        assert {name.split("-")[0] for name in errors} == {f"u{u}r{r}" for u, r in _degrees(world)}
        for name, errs in errors.items():
            tol = errs.pop("tol")
            assert max(errs.values()) <= tol, (world, name, errs)


def test_bytes_match_formula(worlds):
    for world, results in worlds.items():
        for r in results:
            for degrees, b in r["bytes"].items():
                assert b["measured"] == b["formula"], (world, degrees, b)


def test_bad_inputs_raise_on_every_rank(worlds):
    for world, results in worlds.items():
        assert_errors(results, world)
        if world == 4:
            assert "u2r2-swapped" in results[0]["bad"]
