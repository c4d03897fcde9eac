"""SinkLoRA SF-Attn (``sink_shift_attention``): what the registry's conformance tests (tests/test_conformance.py:
float64 exactness, halo/broadcast/reduce bytes vs the docstring, errors on every rank) do not cover: sink-token
edge cases (sinks inside rank 1's halo counted once, sinks filling rank 0, no sinks, the default of 4), the
hand-computed position check and the sink-count errors.

One spawn of 4 ranks runs W = 4, 2, 3 and 1 (tests/sp_harness.py).
"""

from __future__ import annotations

import pytest
import torch

from seqpar.attention import sink_shift_attention
from seqpar.kernels.reference import dense_attention, s2_mask
from seqpar.sharding import shard
from tests.sp_harness import assert_accurate, assert_no_fallback, module_fixtures
from tests.test_shift_short import TOL, raises_message, run_case

f64, f32, bf16 = torch.float64, torch.float32, torch.bfloat16
CASES = [  # n = local length; L = n * W; S = None: the default (4)
    dict(name="mha", B=2, n=16, H=4, Hkv=4, D=16, G=8, S=None, dtype=f64),
    dict(name="gqa", B=2, n=16, H=8, Hkv=2, D=16, G=4, S=3, dtype=f64),
    # rank 1's halo [4, 8) holds sinks 4, 5: they must be counted once
    dict(name="sinks_in_halo", B=2, n=8, H=4, Hkv=2, D=16, G=8, S=6, dtype=f64),
    dict(name="sinks_fill_rank0", B=1, n=8, H=4, Hkv=2, D=16, G=4, S=8, dtype=f64, scale=0.3),
    dict(name="no_sinks", B=2, n=16, H=4, Hkv=2, D=16, G=8, S=0, dtype=f64),
    dict(name="sinks_in_halo_bf16", B=2, n=8, H=4, Hkv=2, D=16, G=8, S=6, dtype=bf16),
    # the sink block in runs of 3 query rows (sink_shift.SINK_ROWS, 2048 otherwise): runs cut groups and ranks
    dict(name="sink_row_runs", B=2, n=16, H=4, Hkv=2, D=16, G=8, S=6, dtype=f64, rows=3),
]


def _accuracy(world: int, group) -> dict:
    import seqpar.attention.sink_shift as sink_shift

    out, rows = {}, sink_shift.SINK_ROWS
    for i, case in enumerate(CASES):
        sink_shift.SINK_ROWS = case.get("rows", rows)
        kwargs = dict(group_size=case["G"], softmax_scale=case.get("scale"))
        if case["S"] is not None:
            kwargs["num_sink_tokens"] = case["S"]
        S = 4 if case["S"] is None else case["S"]
        mask = s2_mask(case["n"] * world, case["H"], case["G"], num_sink_tokens=S)
        out[case["name"]] = run_case(sink_shift_attention, case, kwargs, mask, world, group, seed=100 + i)
    sink_shift.SINK_ROWS = rows
    return out


def _positions(world: int, group) -> list | None:
    """Tiny case L=8, G=4, S=3: q = k = 0 (uniform attention), v = token index: out = mean of visible indices."""
    if 8 % (4 * world):
        return None
    v = torch.arange(8, dtype=f64).view(1, 8, 1, 1).expand(1, 8, 2, 1)
    v = shard(v, group=group, layout="contiguous")
    out = sink_shift_attention(torch.zeros_like(v), torch.zeros_like(v), v, group_size=4, num_sink_tokens=3,
                               group=group)
    return out[0, :, :, 0].T.tolist()


def _errors(world: int, group, rank: int) -> dict:
    q, kv = torch.zeros(1, 16, 4, 8, dtype=f64), torch.zeros(1, 16, 2, 8, dtype=f64)
    call = lambda **kw: lambda: sink_shift_attention(q, kv, kv, group=group, **kw)  # noqa: E731
    msgs = {
        "too_many_sinks": raises_message(call(group_size=8, num_sink_tokens=17)),
        "negative_sinks": raises_message(call(group_size=8, num_sink_tokens=-1)),
        "bad_group": raises_message(call(group_size=6)),
    }
    if world > 1:  # only the last rank differs: every rank must still raise
        msgs["sink_mismatch"] = raises_message(call(group_size=8, num_sink_tokens=2 if rank == world - 1 else 4))
    assert sink_shift_attention(q, kv, kv, group_size=8, group=group).shape == q.shape  # group still healthy
    return msgs


worlds, world_results = module_fixtures(__name__)


def test_matches_dense_reference(world_results):
    assert_accurate(*world_results, CASES, TOL)


# Hand-computed (L=8, G=4, S=3): mean of the visible token indices; heads [unshifted, shifted]. Sinks 0, 1, 2
# inside a query's own group are counted once.
EXPECT_POSITIONS = [
    [0, 0.5, 1, 1.5, 7 / 4, 12 / 5, 18 / 6, 25 / 7],  # groups [0,4) [4,8) + sinks {0,1,2}
    [0, 0.5, 1, 1.5, 2, 2.5, 9 / 4, 16 / 5],  # groups [0,2) [2,6) [6,8) + sinks {0,1,2}
]


def test_reference_mask_matches_hand_computed_case():
    v = torch.arange(8, dtype=f64).view(1, 8, 1, 1).expand(1, 8, 2, 1)
    out, _ = dense_attention(torch.zeros_like(v), torch.zeros_like(v), v, s2_mask(8, 2, 4, num_sink_tokens=3))
    assert torch.allclose(out[0, :, :, 0].T, torch.tensor(EXPECT_POSITIONS, dtype=f64))


def test_outputs_at_their_own_positions(world_results):
    world, results = world_results
    if world > 2:
        pytest.skip("the hand-computed case has L=8, G=4: at most 2 ranks")
    n = 8 // world
    for res in results:
        rank = res["rank"]  # in the SP group (W=2 runs on two pairs)
        mine = torch.tensor([row[rank * n : (rank + 1) * n] for row in EXPECT_POSITIONS], dtype=f64)
        got = torch.tensor(res["positions"], dtype=f64)
        assert torch.allclose(got, mine, rtol=0, atol=1e-12), (world, rank, got)


def test_bad_inputs_raise_on_every_rank(world_results):
    world, results = world_results
    for rank, res in enumerate(results):
        m = res["errors"]
        assert "num_sink_tokens=17" in m["too_many_sinks"] and "[0, 16]" in m["too_many_sinks"], rank
        assert "num_sink_tokens=-1" in m["negative_sinks"], rank
        assert "group_size=6" in m["bad_group"], rank
        if world > 1:
            assert "num_sink_tokens per rank" in m["sink_mismatch"], rank


def test_no_tiled_kernel_fallback(world_results):
    """Every block of these calls (documents, zigzag, halos, sinks) ran a fused kernel."""
    assert_no_fallback(*world_results)
