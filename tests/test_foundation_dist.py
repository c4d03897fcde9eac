"""ParallelState groups, shard/unshard layouts, collectives and the byte counter on real gloo ranks.

One spawn per world size runs every check, so the whole file costs four spawns.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from seqpar.comm import (
    ByteCounter,
    RingComm,
    all_gather,
    all_to_all,
    broadcast_tensor,
    check_same_shape,
    check_same_shapes,
    reduce_scatter,
)
from seqpar.parallel import ParallelState
from seqpar.sharding import position_ids, shard, unshard
from tests.dist import run_ranks


def _sharding_checks(rank: int, world: int, group) -> dict:
    """shard/unshard round trips and gradients, for both layouts, against hand-built index lists."""
    out = {}
    x = torch.arange(2 * 4 * world * 3, dtype=torch.float64).view(2, 4 * world, 3)
    for layout in ("contiguous", "zigzag"):
        local = shard(x, group=group, layout=layout).requires_grad_()
        n = x.shape[1] // world
        if layout == "contiguous":
            expect = list(range(rank * n, (rank + 1) * n))
        else:
            c = n // 2
            expect = [*range(rank * c, (rank + 1) * c), *range((2 * world - 1 - rank) * c, (2 * world - rank) * c)]
        assert torch.equal(local, x[:, expect]), layout
        assert position_ids(x.shape[1], group=group, layout=layout).tolist() == expect
        full = unshard(local, group=group, layout=layout)
        assert torch.equal(full, x), layout
        # d/dx of sum(w * unshard(x)) on this rank's shard is w at its positions times the world (each rank's loss).
        w = torch.linspace(-1, 1, x.numel(), dtype=torch.float64).view_as(x)
        (full * w).sum().backward()
        assert torch.allclose(local.grad, world * w[:, expect]), layout
        out[layout] = expect
    return out


def _comm_checks(rank: int, world: int, group) -> dict:
    """Collectives' values and gradients vs hand-computed ones; byte counts vs hand-computed sizes."""
    f64 = torch.float64
    x = torch.full((2, 3), float(rank + 1), dtype=f64, requires_grad=True)
    with ByteCounter() as c:
        g = all_gather(x, group=group, dim=0)
    assert torch.equal(g, torch.cat([torch.full((2, 3), float(r + 1), dtype=f64) for r in range(world)]))
    assert c.sent == c.received == (world - 1) * 6 * 8
    (g * (rank + 1)).sum().backward()  # every rank weights the gathered tensor by its own rank + 1
    assert torch.allclose(x.grad, torch.full_like(x, sum(r + 1 for r in range(world))))

    y = torch.arange(world * 4, dtype=f64).view(world * 2, 2).requires_grad_()
    with ByteCounter() as c:
        rs = reduce_scatter(y * (rank + 1), group=group, dim=0)
    total = sum(r + 1 for r in range(world))
    assert torch.equal(rs, total * y.detach()[2 * rank : 2 * rank + 2])
    assert c.sent == (world - 1) * 4 * 8
    rs.sum().backward()
    assert torch.allclose(y.grad, torch.full_like(y, rank + 1))

    z = (torch.arange(world * 2 * 3, dtype=f64).view(1, world * 2, 3) + 100 * rank).requires_grad_()
    with ByteCounter() as c:
        a2a = all_to_all(z, group=group, scatter_dim=1, gather_dim=2)
    base = torch.arange(world * 2 * 3, dtype=f64).view(1, world * 2, 3)
    expect = torch.cat([(base + 100 * r)[:, 2 * rank : 2 * rank + 2] for r in range(world)], dim=2)
    assert torch.equal(a2a, expect)
    assert c.sent == c.received == z.numel() * 8 * (world - 1) // world
    (a2a * a2a.detach()).sum().backward()  # gradient = values routed back to their owners
    assert torch.equal(z.grad, z.detach())

    ring = RingComm(group)
    t = torch.tensor([float(rank)] * 5)
    with ByteCounter() as c:
        got = ring.send_recv(t)
        ring.wait()
    assert got.tolist() == [float((rank - 1) % world)] * 5
    assert c.sent == c.received == (20 if world > 1 else 0)

    b = torch.full((4,), float(rank))
    with ByteCounter() as c:
        broadcast_tensor(b, group, src=0)
    assert b.tolist() == [0.0] * 4
    assert c.sent == (16 * (world - 1) if rank == 0 else 0)

    msg = None
    try:
        check_same_shape(torch.zeros(3 + (rank == world - 1)), group=group, name="q")
    except ValueError as err:
        msg = str(err)
    assert (msg is None) == (world == 1), msg
    dtype_msg = None
    try:  # same shapes, one rank in another dtype: one collective catches it for every named tensor
        dt = torch.float64 if rank == 0 else torch.float32
        check_same_shapes(group=group, q=torch.zeros(2, 3), k=torch.zeros(2, 3, dtype=dt))
    except ValueError as err:
        dtype_msg = str(err)
    assert (dtype_msg is None) == (world == 1), dtype_msg
    assert world == 1 or dtype_msg.startswith("k has different shapes or dtypes")
    return {"mismatch_message": msg}


def _parallel_state_checks(rank: int, world: int, group) -> dict:
    out = {}
    for sp in [s for s in (1, 2, 4) if world % s == 0]:
        st = ParallelState.from_initialized(sp, device="cpu")
        sp_members = [None] * world
        dp_members = [None] * world
        dist.all_gather_object(sp_members, (rank, dist.get_process_group_ranks(st.sp_group)))
        dist.all_gather_object(dp_members, (rank, dist.get_process_group_ranks(st.dp_group)))
        assert st.sp_rank == dist.get_rank(st.sp_group) and st.dp_rank == dist.get_rank(st.dp_group)
        out[sp] = {"sp": dict(sp_members), "dp": dict(dp_members), "sizes": (st.sp_size, st.dp_size)}
    return out


def _all_checks(rank: int, world: int, group) -> dict:
    return {
        "sharding": _sharding_checks(rank, world, group),
        "comm": _comm_checks(rank, world, group),
        "state": _parallel_state_checks(rank, world, group),
    }


@pytest.fixture(scope="module", params=[1, 2, 3, 4], ids=lambda w: f"W{w}")
def world_results(request):
    return request.param, run_ranks(_all_checks, request.param)


def test_sharding_round_trip_and_gradients(world_results):
    world, results = world_results
    for layout in ("contiguous", "zigzag"):
        owned = sorted(i for r in results for i in r["sharding"][layout])
        assert owned == list(range(4 * world))  # every token on exactly one rank


def test_collectives_and_byte_counter(world_results):
    world, results = world_results
    if world > 1:
        assert "different shapes" in results[0]["comm"]["mismatch_message"]
        assert all(r["comm"]["mismatch_message"] for r in results)  # raised on every rank


def test_parallel_state_groups(world_results):
    world, results = world_results
    if world != 4:
        pytest.skip("group membership is checked on a world of 4")
    state = results[0]["state"]
    assert state[1]["sp"] == {r: [r] for r in range(4)} and state[1]["dp"] == {r: [0, 1, 2, 3] for r in range(4)}
    assert state[2]["sp"] == {0: [0, 1], 1: [0, 1], 2: [2, 3], 3: [2, 3]}
    assert state[2]["dp"] == {0: [0, 2], 1: [1, 3], 2: [0, 2], 3: [1, 3]}
    assert state[4]["sp"] == {r: [0, 1, 2, 3] for r in range(4)} and state[4]["dp"] == {r: [r] for r in range(4)}
    assert state[2]["sizes"] == (2, 2)
