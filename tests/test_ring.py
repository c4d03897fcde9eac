"""ring_attention: what the registry's conformance tests (tests/test_conformance.py: float64 exactness, bytes
vs the docstring formula, errors on every rank) do not cover: packed sequences of many short documents that
cross shard and zigzag-chunk boundaries, documents inside chunks (the ring is skipped: nothing is sent),
malformed ``cu_seqlens`` and local shape errors, and group=None as the single-device path.

One spawn of 4 ranks runs W = 4, 2, 3 and 1 (tests/sp_harness.py).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from seqpar.attention import ring_attention
from seqpar.comm import ByteCounter
from seqpar.kernels.reference import rel_err, softmax_reference
from seqpar.sharding import shard
from tests.sp_harness import BF16, F32, F64, TOL, collect_errors, compare_case, spawn_worlds

N_LOCAL = 32  # tokens per rank (zigzag chunks of 16)


def doc_lengths(L: int, seed: int) -> list[int]:
    """Documents of 1..23 tokens: several per shard, many crossing shard (and zigzag chunk) boundaries."""
    g = torch.Generator().manual_seed(1000 + seed)
    lengths, total = [], 0
    while total < L:
        n = min(int(torch.randint(1, 24, (1,), generator=g)), L - total)
        lengths.append(n)
        total += n
    return lengths


def _cu(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lengths)])


def _cases(world: int) -> dict:
    L = N_LOCAL * world
    cases = {}
    for i, (layout, causal, dtype, Hkv) in enumerate([("zigzag", True, F64, 2), ("contiguous", True, F32, 2),
                                                      ("zigzag", False, F64, 4), ("contiguous", False, F64, 2),
                                                      ("zigzag", True, BF16, 2)]):
        cases[f"docs-{layout}-c{int(causal)}-{dtype}"] = dict(
            layout=layout, causal=causal, dtype=dtype, H=4, Hkv=Hkv, cu_seqlens=_cu(doc_lengths(L, i)), seed=i)
    # documents inside zigzag chunks: no K/V leaves its rank (the ring is skipped)
    cases["docs-in-chunks-f32"] = dict(layout="zigzag", causal=True, dtype=F32, H=4, Hkv=2,
                                       cu_seqlens=_cu([8] * (L // 8)))
    return cases


def _packed_bytes(rank: int, world: int, group) -> dict:
    """Bytes sent (forward + backward) with documents inside zigzag chunks and with documents crossing shards."""
    L, sent = N_LOCAL * world, {}
    for name, lengths in (("in-chunks", [8] * (L // 8)), ("crossing", doc_lengths(L, 0))):
        q, k, v = (shard(torch.randn(2, L, 4, 16), layout="zigzag", rank=rank, world_size=world).requires_grad_()
                   for _ in range(3))
        with ByteCounter() as c:
            ring_attention(q, k, v, group=group, cu_seqlens=_cu(lengths)).sum().backward()
        sent[name] = c.sent
    return sent


def _error_checks(rank: int, world: int, group) -> dict:
    """Local errors (the same on every rank); messages name the argument and the fix."""
    L = N_LOCAL * world
    q, k = torch.randn(2, N_LOCAL, 8, 16, dtype=F64), torch.randn(2, N_LOCAL, 2, 16, dtype=F64)
    bad = {
        "zigzag-odd": lambda: ring_attention(q[:, :15], k[:, :15], k[:, :15], group=group),
        "qk-length": lambda: ring_attention(q, k[:, :16], k[:, :16], group=group, layout="contiguous"),
        "dtype": lambda: ring_attention(q, k.float(), k.float(), group=group, layout="contiguous"),
        "cu-start": lambda: ring_attention(q, k, k, group=group, cu_seqlens=torch.tensor([1, L])),
        "cu-end": lambda: ring_attention(q, k, k, group=group, cu_seqlens=torch.tensor([0, L - 1])),
        "cu-order": lambda: ring_attention(q, k, k, group=group, cu_seqlens=torch.tensor([0, 20, 10, L])),
        "cu-float": lambda: ring_attention(q, k, k, group=group, cu_seqlens=torch.tensor([0.0, L])),
    }
    msgs = {}
    for name, call in bad.items():
        try:
            call()
            msgs[name] = None
        except (ValueError, TypeError) as err:
            msgs[name] = str(err)
    ring_attention(q, k, k, group=group, layout="contiguous")  # the group still works after the errors
    return msgs


def _all_checks(rank: int, world: int, group) -> dict:
    from seqpar.kernels import fallback_counts, reset_fallbacks

    reset_fallbacks()
    cases = {}
    for name, c in _cases(world).items():
        c = dict(c)
        errs = compare_case(ring_attention, rank, world, group, Lq=N_LOCAL, shard_layout=c["layout"], **c)
        cases[name] = {**errs, "tol": TOL[c["dtype"]]}
    return {"cases": cases, "fallbacks": fallback_counts(), "packed_bytes": _packed_bytes(rank, world, group),
            "errors": _error_checks(rank, world, group)}


@pytest.fixture(scope="module")
def worlds():
    return spawn_worlds(_all_checks)


def test_packed_documents_match_dense_float64(worlds):
    for world, results in worlds.items():
        for name, errs in collect_errors(results).items():
            tol = errs.pop("tol")
            assert max(errs.values()) <= tol, (world, name, errs)


def test_no_tiled_kernel_fallback(worlds):
    """Every block of the packed calls (documents cut per block, zigzag) ran a fused kernel."""
    for world, results in worlds.items():
        assert all(r["fallbacks"] == {} for r in results), (world, [r["fallbacks"] for r in results])


def test_documents_inside_shards_send_nothing(worlds):
    for world, results in worlds.items():
        for r in results:
            assert r["packed_bytes"]["in-chunks"] == 0, r["packed_bytes"]
            assert (r["packed_bytes"]["crossing"] > 0) == (world > 1), r["packed_bytes"]


EXPECTED_ERRORS = {
    "zigzag-odd": "cannot be split",
    "qk-length": "local length",
    "dtype": "dtype",
    "cu-start": "start at 0",
    "cu-end": "start at 0 and end at",
    "cu-order": "non-decreasing",
    "cu-float": "integer tensor",
}


@pytest.mark.parametrize("bad", list(EXPECTED_ERRORS))
def test_bad_inputs_raise_on_every_rank(worlds, bad):
    for world, results in worlds.items():
        for rank, r in enumerate(results):
            msg = r["errors"][bad]
            assert msg is not None, f"{bad}: rank {rank} of {world} did not raise"
            assert EXPECTED_ERRORS[bad] in msg, f"{bad}: rank {rank}: {msg}"


def test_single_device_group_none():
    """group=None is one device: the ring degenerates to the local kernel, still exact."""
    g = torch.Generator().manual_seed(7)
    q, k, v, dout = (torch.randn(2, N_LOCAL, h, 16, generator=g, dtype=F64) for h in (8, 2, 2, 8))
    local = [t.clone().requires_grad_() for t in (q, k, v)]
    out = ring_attention(*local)
    out.backward(dout)
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = softmax_reference(*ref_in)
    ref.backward(dout)
    for got, want in zip([out.detach()] + [t.grad for t in local], [ref.detach()] + [t.grad for t in ref_in]):
        assert rel_err(got, want) < TOL[F64]
