"""Shared harness of the multi-rank tests (conformance checks live in tests/test_conformance.py; ring, USP,
S2, SF and LASP keep their own cases here): inputs, the float64 dense reference, one spawn that runs every
world size, error collection.

One spawn of 4 ranks runs every case for W = 4, 2 (sub-groups {0, 1} and {2, 3}: group ranks then differ
from global ranks, as under DP x SP), 3 (sub-group {0, 1, 2}) and 1 (group=None, on rank 3).
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.distributed as dist

from seqpar.kernels.reference import rel_err, softmax_reference
from seqpar.sharding import shard
from tests.dist import run_ranks

# float32: 1e-5 of the output scale (the brief's bound); bf16: inputs, output and gradients are rounded
# to 8 bits of mantissa, so ~2e-2; float64: only summation order differs.
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}
F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16


def full_inputs(B, L, H, Hkv, D, dtype, seed):
    """Whole-sequence q, k, v and upstream gradient, generated in float64 and rounded to ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, L, H, D), (B, L, Hkv, D), (B, L, Hkv, D), (B, L, H, D)]
    return [torch.randn(s, generator=g, dtype=F64).to(dtype) for s in shapes]


def reference(q, k, v, dout, causal, cu_seqlens=None, scale=None, window=None):
    """float64 dense attention of the (rounded) inputs (optional sliding ``window``), with its gradients."""
    qr, kr, vr = (t.to(F64, copy=True).requires_grad_() for t in (q, k, v))
    out = softmax_reference(qr, kr, vr, causal=causal, softmax_scale=scale, cu_seqlens=cu_seqlens, window=window)
    out.backward(dout.double())
    return out.detach(), qr.grad, kr.grad, vr.grad


def compare_case(fn, rank, world, group, *, B=2, Lq=16, H=4, Hkv=4, D=16, dtype=F64, causal=True,
                 seed=0, shard_layout="zigzag", cu_seqlens=None, strided=False, **kw) -> dict:
    """Run ``fn`` on this rank's shard; relative errors of out, dq, dk, dv against the reference.
    ``strided``: pass q, k, v as non-contiguous [B, L, H, D] views of [B, H, L, D] storage (as after a
    projection and transpose); the leaves must come back unmodified."""
    L = Lq * world
    q, k, v, dout = full_inputs(B, L, H, Hkv, D, dtype, seed)
    ref = reference(q, k, v, dout, causal, cu_seqlens, kw.get("softmax_scale"), kw.get("window"))
    local = [shard(t, layout=shard_layout, rank=rank, world_size=world).requires_grad_() for t in (q, k, v)]
    extra = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}
    before = [t.detach().clone() for t in local]
    inputs = [t.transpose(1, 2).contiguous().transpose(1, 2) if strided else t for t in local]
    out = fn(*inputs, group=group, causal=causal, **extra, **kw)
    assert all(torch.equal(t, b) for t, b in zip(local, before)), "inputs were modified"
    out.backward(shard(dout, layout=shard_layout, rank=rank, world_size=world))
    got = [out, *(t.grad for t in local)]
    assert all(t.dtype == dtype for t in got), [t.dtype for t in got]
    assert all(t.shape == x.shape for t, x in zip(got, [local[0], *local])), "output/gradient shapes"
    return {name: rel_err(g, shard(r, layout=shard_layout, rank=rank, world_size=world))
            for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref)}


def _worlds(rank, world, group, check, with_three: bool) -> dict:
    """On 4 spawned ranks: W=4 on the world; W=2 on the sub-groups {0, 1} and {2, 3}; then, when
    ``with_three``, W=3 on {0, 1, 2} while rank 3 runs W=1 with group=None. ``None`` marks no result."""
    out = {world: check(rank, world, group)}
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group, in order
    out[2] = check(rank % 2, 2, pairs[rank // 2])
    if with_three:
        trio = dist.new_group([0, 1, 2])
        out[3] = check(rank, 3, trio) if rank < 3 else None
        out[1] = check(0, 1, None) if rank == 3 else None
    return out


def module_checks(rank: int, world: int, group, module: str) -> dict:
    """One rank's results of a primitive test module's ``_accuracy``, ``_positions`` and ``_errors`` (and the
    tiled-kernel fallbacks they caused): ``spawn_worlds(partial(module_checks, module=__name__))``."""
    import importlib

    from seqpar.kernels import fallback_counts, reset_fallbacks

    m = importlib.import_module(module)
    reset_fallbacks()
    return {"rank": rank, "accuracy": m._accuracy(world, group), "fallbacks": fallback_counts(),
            "positions": m._positions(world, group), "errors": m._errors(world, group, rank)}


def module_fixtures(module: str):
    """A primitive test module's fixtures: ``worlds`` (one spawn running ``module_checks`` for W = 1..4) and
    ``world_results`` ((W, per-rank results) for each W). Use: ``worlds, world_results = module_fixtures(__name__)``."""

    @pytest.fixture(scope="module")
    def worlds():
        return spawn_worlds(partial(module_checks, module=module))

    @pytest.fixture(params=[1, 2, 3, 4], ids=lambda w: f"W{w}")
    def world_results(worlds, request):
        return request.param, worlds[request.param]

    return worlds, world_results


def assert_accurate(world: int, results: list[dict], cases: list[dict], tol: dict) -> None:
    """Every ``module_checks`` accuracy entry (keyed by case name, or (name, variant)) within its dtype's tol."""
    dtypes = {c["name"]: c["dtype"] for c in cases}
    for rank, res in enumerate(results):
        for key, errs in res["accuracy"].items():
            t = tol[dtypes[key[0] if isinstance(key, tuple) else key]]
            for what, err in errs.items():
                assert err <= t, f"W={world} rank={rank} case={key} {what}: {err:.3g} > {t}"


def assert_no_fallback(world: int, results: list[dict]) -> None:
    """Every block of a module's calls ran a fused kernel (``module_checks`` records the fallbacks)."""
    assert all(r["fallbacks"] == {} for r in results), (world, [r["fallbacks"] for r in results])


def spawn_worlds(check, *, with_three: bool = True) -> dict[int, list]:
    """``{W: per-rank results}`` for W in 1, 2, 3, 4 from ONE spawn of 4 ranks (each rank costs ~2 s of
    imports); without ``with_three``, W=1 runs in this process instead and W=3 is skipped."""
    per_rank = run_ranks(_worlds, 4, args=(check, with_three), timeout=170)
    found = {w: [r[w] for r in per_rank if r[w] is not None] for w in per_rank[0]}
    if not with_three:
        found[1] = [check(0, 1, None)]
    sizes = {4: 4, 2: 4, 3: 3, 1: 1} if with_three else {4: 4, 2: 4, 1: 1}
    assert {w: len(r) for w, r in found.items()} == sizes, "a world size did not run on every rank"
    return found


def _cases_and_refusals(rank: int, world: int, group, cases, refusals) -> dict:
    out = cases(rank, world, group)
    if world == 2:
        out["refusals"] = refusals(rank, world, group)
    return out


def spawn_model_worlds(cases, refusals) -> dict:
    """A model test module's ``cases(rank, world, group)`` for W = 4, 2, 3, 1 from one spawn (``spawn_worlds``),
    and its ``refusals(rank, world, group)`` at W = 2 under ``"refusals"`` (module-level functions)."""
    found = spawn_worlds(partial(_cases_and_refusals, cases=cases, refusals=refusals))
    found["refusals"] = [r["refusals"] for r in found[2]]
    return found


def collect_errors(results: list[dict]) -> dict:
    """Worst error over ranks per case (and the case's tolerance under ``"tol"``)."""
    cases = results[0]["cases"]
    return {c: {k: max(r["cases"][c][k] for r in results) for k in cases[c]} for c in cases}


def error_of(call, *words) -> tuple[str, tuple]:
    """Run ``call``; return (its ValueError message or what happened instead, the words it must name)."""
    try:
        call()
    except ValueError as err:
        return str(err), words
    return "no error raised", words
