"""LongLoRA S2-Attn (``shift_short_attention``): what the registry's conformance tests (tests/test_conformance.py:
float64 exactness with and without wrap, halo bytes vs the docstring, errors on every rank) do not cover:
shift-group edge cases (one group per rank, G = 4 with GQA, head_dim 80), the hand-computed position check,
and the error messages that list the valid group sizes.

One spawn of 4 ranks runs W = 4, 2, 3 and 1 (tests/sp_harness.py).
"""

from __future__ import annotations

import pytest
import torch

from seqpar.attention import shift_short_attention
from seqpar.kernels.reference import dense_attention, rel_err, s2_mask
from seqpar.sharding import shard
from tests.sp_harness import assert_accurate, assert_no_fallback, module_fixtures

# float32: max abs error relative to the output scale <= 1e-5; bfloat16 rounds inputs and outputs (2^-8).
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}


def make_inputs(case: dict, world: int, seed: int):
    """Global q, k, v, dout (identical on every rank), rounded to the case's dtype."""
    g = torch.Generator().manual_seed(seed)
    B, L, H, Hkv, D = case["B"], case["n"] * world, case["H"], case["Hkv"], case["D"]
    shapes = [(B, L, H, D), (B, L, Hkv, D), (B, L, Hkv, D), (B, L, H, D)]
    return [torch.randn(s, generator=g, dtype=torch.float64).to(case["dtype"]) for s in shapes]


def run_case(fn, case: dict, kwargs: dict, mask: torch.Tensor, world: int, group, seed: int) -> dict:
    """Relative errors of this rank's output and local gradients vs the dense reference's slice."""
    q, k, v, dout = make_inputs(case, world, seed)
    local = [shard(t, group=group, layout="contiguous").requires_grad_() for t in (q, k, v)]
    out = fn(*local, group=group, **kwargs)
    out.backward(shard(dout, group=group, layout="contiguous"))
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out, _ = dense_attention(*ref, mask, scale=kwargs.get("softmax_scale"))
    ref_out.backward(dout.double())
    errs = {"out": rel_err(out, shard(ref_out.detach(), group=group, layout="contiguous"))}
    for name, mine, r in zip("qkv", local, ref):
        assert mine.grad.shape == mine.shape and mine.grad.dtype == mine.dtype
        errs["d" + name] = rel_err(mine.grad, shard(r.grad, group=group, layout="contiguous"))
    assert out.dtype == case["dtype"] and out.shape == local[0].shape
    return errs


def raises_message(fn) -> str | None:
    try:
        fn()
    except ValueError as err:
        return str(err)
    return None


# ---------------------------------------------------------------------------------------------- cases

f64, f32, bf16 = torch.float64, torch.float32, torch.bfloat16
CASES = [  # n = local length; L = n * W
    dict(name="gqa", B=2, n=16, H=8, Hkv=2, D=16, G=4, dtype=f64),
    dict(name="one_group_per_rank", B=2, n=8, H=4, Hkv=2, D=16, G=8, dtype=f64),
    dict(name="d80_scale", B=1, n=16, H=2, Hkv=2, D=80, G=8, dtype=f64, scale=0.3),
    dict(name="one_group_bf16", B=2, n=8, H=4, Hkv=2, D=16, G=8, dtype=bf16),
]


def _accuracy(world: int, group) -> dict:
    out = {}
    for i, case in enumerate(CASES):
        for wrap in (False, True):
            kwargs = dict(group_size=case["G"], wrap=wrap, softmax_scale=case.get("scale"))
            mask = s2_mask(case["n"] * world, case["H"], case["G"], wrap=wrap)
            out[(case["name"], wrap)] = run_case(shift_short_attention, case, kwargs, mask, world, group, seed=i)
    return out


def _positions(world: int, group) -> dict:
    """Tiny case L=8, G=4: q = k = 0 (uniform attention), v = token index, so out = mean of visible indices."""
    if 8 % (4 * world):
        return {}
    L, got = 8, {}
    v = torch.arange(L, dtype=f64).view(1, L, 1, 1).expand(1, L, 2, 1)
    v = shard(v, group=group, layout="contiguous")
    zeros = torch.zeros_like(v)
    for wrap in (False, True):
        out = shift_short_attention(zeros, zeros, v, group_size=4, group=group, wrap=wrap)
        got[wrap] = out[0, :, :, 0].T.tolist()  # [head][local token]
    return got


def _errors(world: int, group, rank: int) -> dict:
    """Each bad call must raise ValueError on every rank (a hang fails the spawn)."""
    x = lambda *s: torch.zeros(*s, dtype=f64)  # noqa: E731
    q, kv = x(1, 16, 4, 8), x(1, 16, 2, 8)
    call = lambda q, k, **kw: lambda: shift_short_attention(q, k, k, group=group, **kw)  # noqa: E731
    msgs = {
        "odd_group": raises_message(call(q, kv, group_size=5)),
        "group_too_big": raises_message(call(q, kv, group_size=32)),
        "odd_kv_heads": raises_message(call(x(1, 16, 6, 8), x(1, 16, 3, 8), group_size=8)),
        "bad_dtype": raises_message(call(q.int(), kv.int(), group_size=8)),
    }
    # The group is still healthy afterwards: a valid call goes through.
    assert shift_short_attention(q, kv, kv, group_size=8, group=group).shape == q.shape
    return msgs


worlds, world_results = module_fixtures(__name__)


# ---------------------------------------------------------------------------------------------- tests


def test_matches_dense_reference(world_results):
    assert_accurate(*world_results, CASES, TOL)


# Hand-computed: mean of the visible token indices. Heads: [unshifted, shifted].
EXPECT_POSITIONS = {
    False: [[0, 0.5, 1, 1.5, 4, 4.5, 5, 5.5],  # groups [0,4) [4,8)
            [0, 0.5, 2, 2.5, 3, 3.5, 6, 6.5]],  # groups [0,2) [2,6) [6,8)
    True: [[0, 0.5, 1, 1.5, 4, 4.5, 5, 5.5],
           [13 / 3, 3.5, 2, 2.5, 3, 3.5, 6, 6.5]],  # rolled groups [2,3,4,5] [6,7,0,1]
}


def test_reference_mask_matches_hand_computed_case():
    """The reference itself, checked against the hand-computed values (so a shared mistake cannot hide)."""
    v = torch.arange(8, dtype=f64).view(1, 8, 1, 1).expand(1, 8, 2, 1)
    for wrap, expect in EXPECT_POSITIONS.items():
        out, _ = dense_attention(torch.zeros_like(v), torch.zeros_like(v), v, s2_mask(8, 2, 4, wrap=wrap))
        assert torch.allclose(out[0, :, :, 0].T, torch.tensor(expect, dtype=f64))


def test_shifted_heads_return_to_their_own_positions(world_results):
    world, results = world_results
    if world > 2:
        pytest.skip("the hand-computed case has L=8, G=4: at most 2 ranks")
    n = 8 // world
    for res in results:
        rank = res["rank"]  # in the SP group (W=2 runs on two pairs)
        for wrap, expect in EXPECT_POSITIONS.items():
            mine = [row[rank * n : (rank + 1) * n] for row in expect]
            got = torch.tensor(res["positions"][wrap], dtype=f64)
            assert torch.allclose(got, torch.tensor(mine, dtype=f64), rtol=0, atol=1e-12), (world, rank, wrap, got)


def test_bad_inputs_raise_on_every_rank(world_results):
    _, results = world_results
    for res in results:
        m = res["errors"]
        assert "group_size=5" in m["odd_group"] and "valid group_size values: [2, 4, 8, 16]" in m["odd_group"]
        assert "group_size=32" in m["group_too_big"] and "local sequence length 16" in m["group_too_big"]
        assert "Hkv=3" in m["odd_kv_heads"] and "even" in m["odd_kv_heads"]
        assert "dtype" in m["bad_dtype"]


def test_no_tiled_kernel_fallback(world_results):
    """Every block of these calls (documents, zigzag, halos, sinks) ran a fused kernel."""
    assert_no_fallback(*world_results)
