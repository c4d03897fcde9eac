"""LongLoRA S2-Attn (``shift_short_attention``) vs a dense float64 reference whose per-head mask is built
from the definition, on one device (group=None, in process) and on W = 2, 3, 4 gloo ranks.

One spawn per world size runs every case: outputs and gradients of q, k, v, with and without wrap, MHA and
GQA, float64/float32/bfloat16; the hand-computed position check; exact halo bytes; bad inputs.
"""

from __future__ import annotations

import pytest
import torch

from seqpar.attention import shift_short_attention
from seqpar.comm import ByteCounter
from seqpar.kernels.reference import dense_attention, rel_err, s2_mask
from seqpar.sharding import shard
from tests.dist import run_ranks

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
    dict(name="mha", B=2, n=16, H=4, Hkv=4, D=16, G=8, dtype=f64),
    dict(name="gqa", B=2, n=16, H=8, Hkv=2, D=16, G=4, dtype=f64),
    dict(name="one_group_per_rank", B=2, n=8, H=4, Hkv=2, D=16, G=8, dtype=f64),
    dict(name="d80_scale", B=1, n=16, H=2, Hkv=2, D=80, G=8, dtype=f64, scale=0.3),
    dict(name="fp32", B=2, n=16, H=4, Hkv=2, D=16, G=8, dtype=f32),
    dict(name="bf16", B=2, n=16, H=4, Hkv=2, D=16, G=8, dtype=bf16),
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


def _bytes(world: int, group, rank: int) -> dict:
    """ByteCounter around forward and backward of one float64 call."""
    B, n, H, Hkv, D, G = 2, 16, 4, 4, 16, 8
    res = {}
    for wrap, dtype in ((False, f64), (True, f64), ("bf16", bf16)):
        q = torch.randn(B, n, H, D, dtype=dtype, requires_grad=True)
        k, v = (torch.randn(B, n, Hkv, D, dtype=dtype, requires_grad=True) for _ in range(2))
        with ByteCounter() as fwd:
            out = shift_short_attention(q, k, v, group_size=G, group=group, wrap=wrap is True)
        with ByteCounter() as bwd:
            out.float().sum().backward()
        res[wrap] = {"fwd": (fwd.sent, fwd.received, dict(fwd.by_op)), "bwd": (bwd.sent, bwd.received, dict(bwd.by_op))}
    return res


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
    if world > 1:  # only the last rank is wrong: every rank must still raise
        last = rank == world - 1
        msgs["shape_mismatch"] = raises_message(call(x(1, 24 if last else 16, 4, 8), x(1, 24 if last else 16, 2, 8),
                                                     group_size=8))
        msgs["group_size_mismatch"] = raises_message(call(q, kv, group_size=4 if last else 8))
    # The group is still healthy afterwards: a valid call goes through.
    assert shift_short_attention(q, kv, kv, group_size=8, group=group).shape == q.shape
    return msgs


def _checks(rank: int, world: int, group) -> dict:
    from seqpar.kernels import fallback_counts, reset_fallbacks

    reset_fallbacks()
    return {"accuracy": _accuracy(world, group), "fallbacks": fallback_counts(), "positions": _positions(world, group),
            "bytes": _bytes(world, group, rank), "errors": _errors(world, group, rank)}


@pytest.fixture(scope="module", params=[1, 2, 3, 4], ids=lambda w: f"W{w}")
def world_results(request):
    world = request.param
    if world == 1:  # group=None: the single-device path, in process
        return world, [_checks(0, 1, None)]
    return world, run_ranks(_checks, world)


# ---------------------------------------------------------------------------------------------- tests


def test_matches_dense_reference(world_results):
    world, results = world_results
    dtypes = {c["name"]: c["dtype"] for c in CASES}
    for rank, res in enumerate(results):
        for (name, wrap), errs in res["accuracy"].items():
            tol = TOL[dtypes[name]]
            for what, err in errs.items():
                assert err <= tol, f"W={world} rank={rank} case={name} wrap={wrap} {what}: {err:.3g} > {tol}"


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
    for rank, res in enumerate(results):
        for wrap, expect in EXPECT_POSITIONS.items():
            mine = [row[rank * n : (rank + 1) * n] for row in expect]
            got = torch.tensor(res["positions"][wrap], dtype=f64)
            assert torch.allclose(got, torch.tensor(mine, dtype=f64), rtol=0, atol=1e-12), (world, rank, wrap, got)


def test_halo_bytes_exact(world_results):
    """h = B (G/2) (Hkv/2) D * 2 (K and V) elements; forward in k's itemsize e, backward in the accumulation
    dtype's a: float64 e = a = 8; bfloat16 e = 2, a = 4 (float32 gradients)."""
    world, results = world_results
    h = 2 * (8 // 2) * (4 // 2) * 16 * 2
    for rank, res in enumerate(results):
        for wrap, (e, a) in ((False, (8, 8)), (True, (8, 8)), ("bf16", (2, 4))):
            sends = world > 1 and (wrap is True or rank < world - 1)
            receives = world > 1 and (wrap is True or rank > 0)
            fwd, bwd = res["bytes"][wrap]["fwd"], res["bytes"][wrap]["bwd"]
            assert fwd[:2] == (h * e * sends, h * e * receives), (world, rank, wrap)
            assert bwd[:2] == (h * a * receives, h * a * sends), (world, rank, wrap)  # mirror image
            assert set(fwd[2]) | set(bwd[2]) <= {"halo"}  # nothing but the halo is communicated


def test_bad_inputs_raise_on_every_rank(world_results):
    world, results = world_results
    for rank, res in enumerate(results):
        m = res["errors"]
        assert "group_size=5" in m["odd_group"] and "valid group_size values: [2, 4, 8, 16]" in m["odd_group"]
        assert "group_size=32" in m["group_too_big"] and "local sequence length 16" in m["group_too_big"]
        assert "Hkv=3" in m["odd_kv_heads"] and "even" in m["odd_kv_heads"]
        assert "dtype" in m["bad_dtype"]
        if world > 1:
            assert "disagree" in m["shape_mismatch"] and "q.L per rank" in m["shape_mismatch"], rank
            assert "group_size per rank" in m["group_size_mismatch"], rank


def test_no_tiled_kernel_fallback(world_results):
    """Every block of these calls (documents, zigzag, halos, sinks) ran a fused kernel."""
    world, results = world_results
    assert all(r["fallbacks"] == {} for r in results), (world, [r["fallbacks"] for r in results])
