"""ring_attention on W gloo ranks vs an independent float64 dense reference on the whole sequence.

One spawn per world size runs every case: each rank builds the same seeded full tensors, runs the ring on its
shard, computes the dense reference itself and returns max errors of out, dq, dk, dv on its own shard; the
pytest side asserts per case, so a failure names the case and the world size.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from seqpar.attention import ring_attention
from seqpar.comm import ByteCounter
from seqpar.kernels.reference import causal_mask, dense_attention, rel_err, segment_mask
from seqpar.sharding import shard
from tests.dist import run_ranks

N_LOCAL, B = 32, 2  # tokens per rank (zigzag chunks of 16), batch
# float32: max abs error relative to the output's scale; bfloat16: inputs rounded to 8 bits of mantissa.
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _case(layout="zigzag", causal=True, H=8, Hkv=2, D=16, dtype=torch.float64, docs=False, scale=None):
    return {"layout": layout, "causal": causal, "H": H, "Hkv": Hkv, "D": D, "dtype": dtype, "docs": docs,
            "scale": scale}


CASES = {
    "zigzag-causal-mha-f64": _case(H=4, Hkv=4),
    "zigzag-causal-gqa-f64": _case(),
    "zigzag-noncausal-gqa-f64": _case(causal=False),
    "contig-causal-gqa-f64": _case(layout="contiguous"),
    "contig-noncausal-mha-f64": _case(layout="contiguous", causal=False, H=4, Hkv=4),
    "zigzag-causal-gqa-f32": _case(dtype=torch.float32),
    "contig-causal-gqa-d80-f32": _case(layout="contiguous", D=80, dtype=torch.float32),
    "zigzag-noncausal-mha-f32-scale": _case(causal=False, H=4, Hkv=4, dtype=torch.float32, scale=0.3),
    "zigzag-causal-gqa-bf16": _case(dtype=torch.bfloat16),
    "contig-noncausal-gqa-bf16": _case(layout="contiguous", causal=False, dtype=torch.bfloat16),
    "varlen-zigzag-causal-f64": _case(docs=True),
    "varlen-contig-causal-f32": _case(layout="contiguous", docs=True, dtype=torch.float32),
    "varlen-zigzag-noncausal-f64": _case(causal=False, docs=True),
    "varlen-contig-noncausal-gqa-f64": _case(layout="contiguous", causal=False, docs=True),
    # documents inside zigzag chunks: no K/V leaves its rank (the ring is skipped)
    "varlen-in-chunks-zigzag-f32": _case(docs="in-chunks", dtype=torch.float32),
}


def doc_lengths(L: int, seed: int) -> list[int]:
    """Documents of 1..23 tokens: several per shard, many crossing shard (and zigzag chunk) boundaries."""
    g = torch.Generator().manual_seed(1000 + seed)
    lengths, total = [], 0
    while total < L:
        n = min(int(torch.randint(1, 24, (1,), generator=g)), L - total)
        lengths.append(n)
        total += n
    return lengths


def make_inputs(L: int, c: dict, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, L, c["H"], c["D"], generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, L, c["Hkv"], c["D"], generator=g, dtype=torch.float64) for _ in range(2))
    dout = torch.randn(B, L, c["H"], c["D"], generator=g, dtype=torch.float64)
    return [t.to(c["dtype"]) for t in (q, k, v, dout)]


def reference(q, k, v, dout, c: dict, lengths: list[int] | None):
    """Dense float64 attention of the whole sequence with explicit masks; returns out, dq, dk, dv."""
    L = q.shape[1]
    mask = causal_mask(L, L) if c["causal"] else torch.ones(L, L, dtype=torch.bool)
    if lengths is not None:
        doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        mask = mask & segment_mask(doc, doc)
    qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
    out, _ = dense_attention(qr, kr, vr, mask, scale=c["scale"])
    out.backward(dout.double())
    return out.detach(), qr.grad, kr.grad, vr.grad


def _exact_checks(rank: int, world: int, group) -> dict:
    errs = {}
    L = N_LOCAL * world
    for seed, (name, c) in enumerate(CASES.items()):
        q, k, v, dout = make_inputs(L, c, seed)
        lengths = ([8] * (L // 8) if c["docs"] == "in-chunks" else doc_lengths(L, seed)) if c["docs"] else None
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()]) if lengths else None
        local = [shard(t, group=group, layout=c["layout"]).requires_grad_() for t in (q, k, v)]
        out = ring_attention(*local, group=group, causal=c["causal"], softmax_scale=c["scale"],
                             layout=c["layout"], cu_seqlens=cu)
        out.backward(shard(dout, group=group, layout=c["layout"]))
        assert out.dtype == c["dtype"] and all(t.grad.dtype == c["dtype"] for t in local), name
        assert all(torch.equal(t.detach(), shard(x, group=group, layout=c["layout"]))
                   for t, x in zip(local, (q, k, v))), f"{name}: inputs were modified"
        got = [out.detach()] + [t.grad for t in local]
        refs = reference(q, k, v, dout, c, lengths)
        errs[name] = {key: rel_err(x, shard(r, group=group, layout=c["layout"]))
                      for key, x, r in zip(("out", "dq", "dk", "dv"), got, refs)}
    return errs


def _byte_checks(rank: int, world: int, group) -> dict:
    """Bytes sent/received per rank, forward and backward, vs the formula of the module docstring."""
    counts = {}
    for dtype in (torch.float32, torch.bfloat16):
        for layout in ("zigzag", "contiguous"):
            c = _case(layout=layout, dtype=dtype)
            q, k, v, dout = make_inputs(N_LOCAL * world, c, 0)
            local = [shard(t, group=group, layout=layout).requires_grad_() for t in (q, k, v)]
            with ByteCounter() as fwd:
                out = ring_attention(*local, group=group, layout=layout)
            with ByteCounter() as bwd:
                out.backward(shard(dout, group=group, layout=layout))
            counts[f"{layout}-{dtype}"] = {
                "fwd": (fwd.sent, fwd.received, fwd.by_op.get("ring", 0)),
                "bwd": (bwd.sent, bwd.received, bwd.by_op.get("ring", 0)),
                "itemsize": dtype.itemsize,
                "kv_elems": 2 * B * N_LOCAL * c["Hkv"] * c["D"],
            }
    return counts


def _error_checks(rank: int, world: int, group) -> dict:
    """Every bad input must raise on every rank (no hang), with a message naming argument and fix."""
    L = N_LOCAL * world
    q, k, v, _ = make_inputs(L, _case(), 0)
    ql, kl, vl = (shard(t, group=group, layout="contiguous") for t in (q, k, v))
    k3 = kl[:, :, :1].expand(-1, -1, 3, -1)  # 3 kv heads for 8 query heads
    bad = {
        "layout": lambda: ring_attention(ql, kl, vl, group=group, layout="striped"),
        "causal": lambda: ring_attention(ql, kl, vl, group=group, causal="yes"),
        "scale": lambda: ring_attention(ql, kl, vl, group=group, softmax_scale=-1.0),
        "zigzag-odd": lambda: ring_attention(ql[:, :15], kl[:, :15], vl[:, :15], group=group),
        "kv-heads": lambda: ring_attention(ql, k3, k3, group=group, layout="contiguous"),
        "qk-length": lambda: ring_attention(ql, kl[:, :16], vl[:, :16], group=group, layout="contiguous"),
        "dtype": lambda: ring_attention(ql, kl.float(), vl.float(), group=group, layout="contiguous"),
        "cu-start": lambda: ring_attention(ql, kl, vl, group=group, cu_seqlens=torch.tensor([1, L])),
        "cu-end": lambda: ring_attention(ql, kl, vl, group=group, cu_seqlens=torch.tensor([0, L - 1])),
        "cu-order": lambda: ring_attention(ql, kl, vl, group=group, cu_seqlens=torch.tensor([0, 20, 10, L])),
        "cu-float": lambda: ring_attention(ql, kl, vl, group=group, cu_seqlens=torch.tensor([0.0, L])),
    }
    if world > 1:  # the last rank passes a shorter shard: check_same_shape must stop every rank
        cut = 16 if rank == world - 1 else N_LOCAL
        bad["rank-shapes"] = lambda: ring_attention(ql[:, :cut], kl[:, :cut], vl[:, :cut], group=group)
    msgs = {}
    for name, call in bad.items():
        try:
            call()
            msgs[name] = None
        except (ValueError, TypeError) as err:
            msgs[name] = str(err)
    # The group still works after the errors: a valid call goes through.
    ring_attention(ql, kl, vl, group=group, layout="contiguous")
    return msgs


def _packed_bytes(world: int, group) -> dict:
    """Bytes sent (forward + backward) with documents inside zigzag chunks (none needs another rank's K/V)
    and with documents crossing shards (the full ring)."""
    L = N_LOCAL * world
    sent = {}
    for name, lengths in (("in-chunks", [8] * (L // 8)), ("crossing", doc_lengths(L, 0))):
        q, k, v, dout = make_inputs(L, _case(dtype=torch.float32), 0)
        local = [shard(t, group=group, layout="zigzag").requires_grad_() for t in (q, k, v)]
        cu = torch.tensor([0, *itertools.accumulate(lengths)])
        with ByteCounter() as c:
            ring_attention(*local, group=group, cu_seqlens=cu).backward(shard(dout, group=group, layout="zigzag"))
        sent[name] = c.sent
    return sent


def _all_checks(rank: int, world: int, group) -> dict:
    from seqpar.kernels import fallback_counts, reset_fallbacks

    reset_fallbacks()
    return {"exact": _exact_checks(rank, world, group), "fallbacks": fallback_counts(),
            "bytes": _byte_checks(rank, world, group), "packed_bytes": _packed_bytes(world, group),
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


def test_no_tiled_kernel_fallback(world_results):
    """Every block of these calls (documents, zigzag, halos, sinks) ran a fused kernel."""
    world, results = world_results
    assert all(r["fallbacks"] == {} for r in results), (world, [r["fallbacks"] for r in results])


def test_bytes_match_formula(world_results):
    world, results = world_results
    for r in results:
        for name, got in r["bytes"].items():
            b = got["kv_elems"]
            fwd = (world - 1) * b * got["itemsize"]
            bwd = fwd + (world * b * 4 if world > 1 else 0)  # dK/dV travel in float32, N hops
            assert got["fwd"] == (fwd, fwd, fwd), (name, got["fwd"], fwd)
            assert got["bwd"] == (bwd, bwd, bwd), (name, got["bwd"], bwd)


def test_documents_inside_shards_send_nothing(world_results):
    world, results = world_results
    for r in results:
        assert r["packed_bytes"]["in-chunks"] == 0, r["packed_bytes"]
        assert (r["packed_bytes"]["crossing"] > 0) == (world > 1), r["packed_bytes"]


EXPECTED_ERRORS = {
    "layout": "layout='striped'",
    "causal": "causal='yes'",
    "scale": "softmax_scale=-1.0",
    "zigzag-odd": "cannot be split",
    "kv-heads": "k.shape[2]=3 must divide",
    "qk-length": "local length",
    "dtype": "dtype",
    "cu-start": "start at 0",
    "cu-end": "start at 0 and end at",
    "cu-order": "non-decreasing",
    "cu-float": "integer tensor",
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
    """group=None is one device: the ring degenerates to the local kernel, still exact."""
    c = _case(dtype=torch.float64)
    q, k, v, dout = make_inputs(N_LOCAL, c, 7)
    local = [t.clone().requires_grad_() for t in (q, k, v)]
    out = ring_attention(*local)
    out.backward(dout)
    refs = reference(q, k, v, dout, c, None)
    for got, ref in zip([out.detach()] + [t.grad for t in local], refs):
        assert rel_err(got, ref) < TOL[torch.float64]
