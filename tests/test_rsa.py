"""ring_self_attention (Li et al. 2021) on W gloo ranks vs an independent float64 dense reference.

Same harness as tests/test_ring.py: one spawn per world size runs every case; each rank computes the dense
reference on the whole sequence itself and returns its shard's max errors; pytest asserts per case.
"""

from __future__ import annotations

import pytest
import torch

from seqpar.attention import ring_self_attention
from seqpar.comm import ByteCounter
from seqpar.kernels.reference import rel_err
from seqpar.sharding import shard
from tests.dist import run_ranks
from tests.test_ring import N_LOCAL, TOL, B, _case, make_inputs, reference

CASES = {
    "causal-mha-f64": _case(layout="contiguous", H=4, Hkv=4),
    "causal-gqa-f64": _case(layout="contiguous"),
    "noncausal-gqa-f64": _case(layout="contiguous", causal=False),
    "causal-gqa-f32": _case(layout="contiguous", dtype=torch.float32),
    "noncausal-mha-d80-f32-scale": _case(layout="contiguous", causal=False, H=4, Hkv=4, D=80,
                                         dtype=torch.float32, scale=0.2),
    "causal-gqa-bf16": _case(layout="contiguous", dtype=torch.bfloat16),
    "noncausal-mha-bf16": _case(layout="contiguous", causal=False, H=4, Hkv=4, dtype=torch.bfloat16),
}


def _exact_checks(rank: int, world: int, group) -> dict:
    errs = {}
    for seed, (name, c) in enumerate(CASES.items()):
        q, k, v, dout = make_inputs(N_LOCAL * world, c, seed)
        local = [shard(t, group=group, layout="contiguous").requires_grad_() for t in (q, k, v)]
        out = ring_self_attention(*local, group=group, causal=c["causal"], softmax_scale=c["scale"])
        out.backward(shard(dout, group=group, layout="contiguous"))
        assert out.dtype == c["dtype"] and all(t.grad.dtype == c["dtype"] for t in local), name
        assert all(torch.equal(t.detach(), shard(x, group=group, layout=c["layout"]))
                   for t, x in zip(local, (q, k, v))), f"{name}: inputs were modified"
        got = [out.detach()] + [t.grad for t in local]
        refs = reference(q, k, v, dout, c, None)
        errs[name] = {key: rel_err(x, shard(r, group=group, layout="contiguous"))
                      for key, x, r in zip(("out", "dq", "dk", "dv"), got, refs)}
    return errs


def _byte_checks(rank: int, world: int, group) -> dict:
    counts = {}
    for dtype in (torch.float32, torch.bfloat16):
        c = _case(layout="contiguous", dtype=dtype)
        q, k, v, dout = make_inputs(N_LOCAL * world, c, 0)
        local = [shard(t, group=group, layout="contiguous").requires_grad_() for t in (q, k, v)]
        with ByteCounter() as fwd:
            out = ring_self_attention(*local, group=group)
        with ByteCounter() as bwd:
            out.backward(shard(dout, group=group, layout="contiguous"))
        counts[str(dtype)] = {"fwd": (fwd.sent, fwd.received), "bwd": (bwd.sent, bwd.received),
                              "itemsize": dtype.itemsize, "b": B * N_LOCAL * c["Hkv"] * c["D"]}
    return counts


def _error_checks(rank: int, world: int, group) -> dict:
    q, k, v, _ = make_inputs(N_LOCAL * world, _case(), 0)
    ql, kl, vl = (shard(t, group=group, layout="contiguous") for t in (q, k, v))
    bad = {
        "zigzag": lambda: ring_self_attention(ql, kl, vl, group=group, layout="zigzag"),
        "layout": lambda: ring_self_attention(ql, kl, vl, group=group, layout="striped"),
        "kv-heads": lambda: ring_self_attention(ql, kl[:, :, :1].expand(-1, -1, 3, -1), vl[:, :, :1].expand(
            -1, -1, 3, -1), group=group),
        "qk-length": lambda: ring_self_attention(ql, kl[:, :16], vl[:, :16], group=group),
    }
    if world > 1:
        cut = 16 if rank == world - 1 else N_LOCAL
        bad["rank-shapes"] = lambda: ring_self_attention(ql[:, :cut], kl[:, :cut], vl[:, :cut], group=group)
    msgs = {}
    for name, call in bad.items():
        try:
            call()
            msgs[name] = None
        except (ValueError, TypeError) as err:
            msgs[name] = str(err)
    ring_self_attention(ql, kl, vl, group=group)  # the group still works after the errors
    return msgs


def _all_checks(rank: int, world: int, group) -> dict:
    return {"exact": _exact_checks(rank, world, group), "bytes": _byte_checks(rank, world, group),
            "errors": _error_checks(rank, world, group)}


@pytest.fixture(scope="module", params=[1, 2, 3, 4], ids=lambda w: f"W{w}")
def world_results(request):
    return request.param, run_ranks(_all_checks, request.param)


@pytest.mark.parametrize("case", list(CASES))
def test_matches_dense_float64(world_results, case):
    world, results = world_results
    tol = TOL[CASES[case]["dtype"]]
    for key in ("out", "dq", "dk", "dv"):
        err = max(r["exact"][case][key] for r in results)
        assert err <= tol, f"{case} on {world} ranks: {key} relative error {err:.2e} > {tol:.0e}"


def test_bytes_match_formula(world_results):
    world, results = world_results
    for r in results:
        for name, got in r["bytes"].items():
            fwd = 2 * (world - 1) * got["b"] * got["itemsize"]  # K ring + V ring
            bwd = fwd + (2 * world * got["b"] * 4 if world > 1 else 0)  # + float32 dK, dV: N hops
            assert got["fwd"] == (fwd, fwd), (name, got["fwd"], fwd)
            assert got["bwd"] == (bwd, bwd), (name, got["bwd"], bwd)


EXPECTED_ERRORS = {
    "zigzag": "layout='zigzag'",
    "layout": "layout='striped'",
    "kv-heads": "k.shape[2]=3 must divide",
    "qk-length": "local length",
    "rank-shapes": "different shapes",
}


@pytest.mark.parametrize("bad", list(EXPECTED_ERRORS))
def test_bad_inputs_raise_on_every_rank(world_results, bad):
    world, results = world_results
    if bad == "rank-shapes" and world == 1:
        pytest.skip("a single rank cannot disagree with itself")
    for rank, r in enumerate(results):
        msg = r["errors"][bad]
        assert msg is not None, f"{bad}: rank {rank} of {world} did not raise"
        assert EXPECTED_ERRORS[bad] in msg, f"{bad}: rank {rank}: {msg}"


def test_single_device_group_none():
    """group=None is one device: both rings degenerate to local products, still exact."""
    c = _case(layout="contiguous")
    q, k, v, dout = make_inputs(N_LOCAL, c, 7)
    local = [t.clone().requires_grad_() for t in (q, k, v)]
    out = ring_self_attention(*local)
    out.backward(dout)
    refs = reference(q, k, v, dout, c, None)
    for got, ref in zip([out.detach()] + [t.grad for t in local], refs):
        assert rel_err(got, ref) < TOL[torch.float64]
