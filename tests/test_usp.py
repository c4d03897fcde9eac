"""usp_attention (Ulysses x ring): what the registry's conformance tests (tests/test_conformance.py, which run
USP at patch_model's default degree u = gcd(N, kv heads)) do not cover: the other degrees of W = 4, u = 4
(all Ulysses, kv heads replicated) and u = 1 (all ring), with their bytes, with and without a sliding window
(the ring then exchanges the window's halo), and sub-groups that are missing or do not split the group as
make_usp_groups does (every rank must raise).

One spawn of 4 ranks runs everything.
"""

from __future__ import annotations

import functools

import pytest

from seqpar.comm import ByteCounter
from tests.dist import run_ranks
from tests.sp_harness import BF16, F32, F64, TOL, compare_case, error_of

DEGREES = [(4, 1), (1, 4)]


def _cases(u: int) -> dict:
    few_kv = 1 if u > 1 else 2  # kv heads < u: replicated for the all-to-all
    return {
        "zigzag-f64": dict(layout="zigzag", causal=True, H=8, Hkv=few_kv, dtype=F64),
        "contiguous-noncausal-f32": dict(layout="contiguous", causal=False, H=8, Hkv=2, dtype=F32),
        "zigzag-bf16": dict(layout="zigzag", causal=True, H=8, Hkv=few_kv, dtype=BF16),
        "zigzag-window-f64": dict(layout="zigzag", causal=True, H=8, Hkv=few_kv, dtype=F64, window=20),
        "contiguous-window-f32": dict(layout="contiguous", causal=True, H=8, Hkv=2, dtype=F32, window=5),
    }


def _all_checks(rank, world, group) -> dict:
    import torch

    from seqpar.attention.usp import usp_attention, usp_bytes, usp_groups

    out = {"cases": {}, "bytes": {}, "bad": {}}
    for u, r in DEGREES:
        groups = usp_groups(group, u)
        sub = {"ulysses_group": groups[0], "ring_group": groups[1]}
        fn = functools.partial(usp_attention, **sub)
        for name, c in _cases(u).items():
            errs = compare_case(fn, rank, world, group, shard_layout=c["layout"], **c)
            out["cases"][f"u{u}r{r}-{name}"] = {**errs, "tol": TOL[c["dtype"]]}
        for window in (None, 3):
            q, k, v = (torch.randn(2, 8, h, 16, requires_grad=True) for h in (8, 1, 1))
            with ByteCounter() as fwd:
                o = fn(q, k, v, group=group, window=window)
            with ByteCounter() as bwd:
                o.sum().backward()
            out["bytes"][(u, r, window)] = ((fwd.sent, bwd.sent), usp_bytes(q, k, v, group=group, window=window, **sub))
    pair = usp_groups(group, 2)
    q, k, v = (torch.randn(2, 8, h, 16) for h in (8, 2, 2))
    call = lambda ug, rg: lambda: usp_attention(q, k, v, group=group, ulysses_group=ug, ring_group=rg)  # noqa: E731
    out["bad"]["no_groups"] = error_of(call(None, None), "make_usp_groups")
    # swapped sub-groups: ranks 0 and 3 look right, 1 and 2 do not; all must raise
    out["bad"]["swapped"] = error_of(call(pair[1], pair[0]), "do not split group", "make_usp_groups")
    return out


@pytest.fixture(scope="module")
def results():
    return run_ranks(_all_checks, 4)


def test_matches_float64_reference(results):
    for name in results[0]["cases"]:
        errs = {k: max(r["cases"][name][k] for r in results) for k in ("out", "dq", "dk", "dv")}
        assert max(errs.values()) <= results[0]["cases"][name]["tol"], (name, errs)


def test_bytes_match_formula(results):
    for rank, r in enumerate(results):
        for degrees, (measured, formula) in r["bytes"].items():
            assert measured == formula and measured[0] > 0, (rank, degrees, measured, formula)
        # all ring (u = 1): a window of 3 tokens sends its halo, not the (N-1) whole K/V shards of the ring
        assert r["bytes"][1, 4, 3][0][0] < r["bytes"][1, 4, None][0][0] / 4, (rank, r["bytes"])


def test_bad_sub_groups_raise_on_every_rank(results):
    for rank, r in enumerate(results):
        for case, (msg, words) in r["bad"].items():
            assert all(w in msg for w in words), (rank, case, msg)


def test_subgroups_are_made_once_per_group_and_degree(monkeypatch):
    """usp_groups (what patch_model and seqpar bench call) creates the sub-groups of a
    (group, degree) once: creating groups is collective over the world, and every group lives until shutdown."""
    from seqpar.attention import usp

    made = []
    monkeypatch.setattr(usp, "make_usp_groups", lambda group, u: made.append((group, u)) or (object(), object()))
    monkeypatch.setattr(usp, "_SUBGROUPS", {})
    sp = object()  # stands for a process group: only its identity matters here
    first = usp.usp_groups(sp, 2)
    assert usp.usp_groups(sp, 2) is first  # one cache for every caller
    usp.usp_groups(sp, 4)
    usp.usp_groups(object(), 2)  # another SP group (DP x SP) or degree: its own sub-groups
    assert [u for _, u in made] == [2, 4, 2] and made[0][0] is sp and made[1][0] is sp and made[2][0] is not sp
