"""LASP-2 and LASP-1 linear attention vs a float64 O(L^2) reference on the whole sequence, on W gloo ranks.

LASP-2 is in the attention registry, so tests/test_conformance.py checks its outputs and gradients (causal,
fixed decay, non-causal; float64/32, bf16), its bytes and its errors on every rank. Here: LASP-1 (not a
registry entry) in all those modes, a LEARNED decay λ for both (its gradient, summed over ranks), GQA with
head_dim 80, bytes independent of the length, and the linear-attention input errors.

One spawn of 4 ranks runs W = 4, 2, 3 and 1 (tests/sp_harness.py).
"""

from __future__ import annotations

import itertools
import os
from functools import partial

import pytest
import torch

from seqpar.attention import lasp1_linear_attention, lasp2_linear_attention
from seqpar.comm import ByteCounter
from seqpar.kernels.reference import linear_attention as reference
from seqpar.kernels.reference import rel_err
from seqpar.sharding import shard
from tests.sp_harness import spawn_worlds

PRIMITIVES = {"lasp2": lasp2_linear_attention, "lasp1": lasp1_linear_attention}
DTYPES = {"f64": torch.float64, "f32": torch.float32, "bf16": torch.bfloat16}
# float32: the state sums run over at most 96 tokens, so 1e-5 of the output scale is ample; bfloat16 rounds
# inputs and the output to 8 bits (2^-8 ≈ 4e-3 relative) and is checked loosely.
TOL = {"f64": 1e-10, "f32": 1e-5, "bf16": 2e-2}
# dλ = Σ_t t (q_t·dq_t - k_t·dk_t) sums terms ~100x its size that cancel (Σ_t of the bracket is 0), so its
# float32 error relative to its own scale is ~10x that of the other gradients (measured up to 9e-6).
DLAMBDA_TOL = {"f64": 1e-10, "f32": 1e-4, "bf16": 2e-2}
DECAY = torch.tensor([1.0, 0.97, 0.9, 0.8], dtype=torch.float64)  # λ^24 from 1 to 0.005: rank prefixes matter
N_LOCAL, BLOCK = 24, 16  # 1.5 blocks per rank: a full and a partial intra-chunk block


def _cases():
    cases = []
    for prim in PRIMITIVES:
        for mode in ("causal", "decay", "noncausal"):
            for dt in DTYPES:
                cases.append(dict(prim=prim, mode=mode, dtype=dt, H=4, Hkv=4, Dk=16, Dv=16))
        # GQA (2 query heads per kv head), head_dim 80 and a different value dim
        cases.append(dict(prim=prim, mode="decay", dtype="f32", H=4, Hkv=2, Dk=80, Dv=24))
    for seed, c in enumerate(cases):
        c["seed"] = seed  # the inputs of each case do not depend on which other cases run
    # LASP-2 without a learned decay: tests/test_conformance.py
    return [c for c in cases if c["prim"] == "lasp1" or c["mode"] == "decay"]


def _run_case(rank, world, group, c) -> dict:
    gen = torch.Generator().manual_seed(c["seed"])  # the same global tensors on every rank
    L, dt = N_LOCAL * world, DTYPES[c["dtype"]]
    full = [torch.randn(2, L, h, d, generator=gen, dtype=torch.float64).to(dt)
            for h, d in ((c["H"], c["Dk"]), (c["Hkv"], c["Dk"]), (c["Hkv"], c["Dv"]))]
    dout = torch.randn(2, L, c["H"], c["Dv"], generator=gen, dtype=torch.float64)
    causal = c["mode"] != "noncausal"
    # learned decay: a leaf in float32 (float64 for float64 inputs), like a model parameter
    lam_dt = torch.float64 if dt == torch.float64 else torch.float32
    decay = DECAY[: c["H"]].to(lam_dt).requires_grad_() if c["mode"] == "decay" else None

    ref_in = [t.double().clone().requires_grad_() for t in full]
    ref_lam = None if decay is None else decay.detach().double().requires_grad_()
    ref_out = reference(*ref_in, ref_lam, causal)
    ref_grads = torch.autograd.grad(ref_out, ref_in + ([ref_lam] if decay is not None else []), dout)

    local = [shard(t, group=group, layout="contiguous").clone().requires_grad_() for t in full]
    out = PRIMITIVES[c["prim"]](*local, group=group, decay=decay, causal=causal, block_size=BLOCK)
    out.backward(shard(dout, group=group, layout="contiguous").to(dt))
    assert out.dtype == dt and out.shape == (2, N_LOCAL, c["H"], c["Dv"])
    sl = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    errs = {"out": rel_err(out, ref_out.detach()[:, sl])}
    for name, t, g in zip("qkv", local, ref_grads):
        assert t.grad.dtype == dt
        errs["d" + name] = rel_err(t.grad, g[:, sl])
    if decay is not None:  # this rank's share; the test sums the shares over ranks
        errs["dlambda"] = (decay.grad, ref_grads[3])
    return errs


def _byte_checks(rank, world, group) -> dict:
    """Bytes per call for L = 256 and 4096 (B=1, H=2, d=16, float32), forward and backward separately."""
    out = {}
    for L in (256, 4096):
        for prim in (*PRIMITIVES, "lasp2-zigzag"):
            for causal in (True, False):
                n = L // world if prim in PRIMITIVES else L // (2 * world) * 2  # zigzag: two equal pieces
                q, k, v = (torch.randn(1, n, 2, 16).requires_grad_() for _ in range(3))
                fn = PRIMITIVES[prim] if prim in PRIMITIVES else partial(lasp2_linear_attention, layout="zigzag")
                with ByteCounter() as fwd:
                    o = fn(q, k, v, group=group, causal=causal, decay=0.99 if causal else None)
                with ByteCounter() as bwd:
                    o.sum().backward()
                out[(L, prim, causal)] = {
                    name: (cnt.sent, cnt.received, dict(cnt.by_op))
                    for name, cnt in (("fwd", fwd), ("bwd", bwd))
                }
    return out


def _error_checks(rank, world, group) -> dict:
    """Each bad call must raise ValueError on this rank (no hang); return the messages."""
    q = torch.randn(1, 8, 4, 16)
    lam_bad = torch.tensor([0.9, 1.5, 1, 1])
    uneven = torch.randn(1, 8 + (rank == world - 1), 4, 16)
    k_bad = q[:, : 8 - (rank == world - 1)]  # k shorter than q on the last rank only
    bad = {
        "decay_noncausal": lambda: lasp2_linear_attention(q, q, q, group=group, decay=0.9, causal=False),
        "decay_range": lambda: lasp1_linear_attention(q, q, q, group=group, decay=lam_bad),
        "decay_shape": lambda: lasp2_linear_attention(q, q, q, group=group, decay=torch.ones(3)),
        "kv_heads": lambda: lasp2_linear_attention(q, q[:, :, :3], q[:, :, :3], group=group),
        "dtype": lambda: lasp1_linear_attention(q, q.double(), q, group=group),
        "block_size": lambda: lasp2_linear_attention(q, q, q, group=group, block_size=0),
        # rank-dependent length: detected collectively, so every rank raises
        "length": lambda: lasp2_linear_attention(uneven, uneven, uneven, group=group),
        "k_length_one_rank": lambda: lasp1_linear_attention(q, k_bad, k_bad, group=group),
    }
    msgs = {}
    for name, call in bad.items():
        try:
            call()
            msgs[name] = None
        except ValueError as err:
            msgs[name] = str(err)
    return msgs


def _packed_case(rank, world, group, layout: str = "contiguous", packed: bool = True) -> dict:
    """LASP-2 over packed documents (float64, learned decay, GQA) vs the reference run on each document alone:
    an empty document, a document starting at a shard edge (and at a zigzag chunk edge: 24 = 2 x 12),
    documents continuing over one and two ranks. ``packed=False``: one document, the whole sequence."""
    L = N_LOCAL * world
    cu = torch.tensor([b for b in ((0, 5, 5, 24, 29, 80) if packed else (0,)) if b < L] + [L])
    gen = torch.Generator().manual_seed(11)
    full = [torch.randn(2, L, h, 16, generator=gen, dtype=torch.float64) for h in (4, 2, 2)]
    dout = torch.randn(2, L, 4, 16, generator=gen, dtype=torch.float64)
    decay = DECAY.clone().requires_grad_()
    ref_in = [t.clone().requires_grad_() for t in full]
    ref_lam = DECAY.clone().requires_grad_()
    bounds = sorted(set(cu.tolist()))
    ref_out = torch.cat([reference(*(t[:, a:b] for t in ref_in), ref_lam, True)
                         for a, b in itertools.pairwise(bounds)], dim=1)
    ref_grads = torch.autograd.grad(ref_out, [*ref_in, ref_lam], dout)
    local = [shard(t, group=group, layout=layout).clone().requires_grad_() for t in full]
    out = lasp2_linear_attention(*local, group=group, decay=decay, block_size=BLOCK,
                                 cu_seqlens=cu if packed else None, layout=layout)
    out.backward(shard(dout, group=group, layout=layout))
    mine = lambda t: shard(t, group=group, layout=layout)  # noqa: E731
    errs = {"out": rel_err(out, mine(ref_out.detach()))}
    errs.update({"d" + name: rel_err(t.grad, mine(g)) for name, t, g in zip("qkv", local, ref_grads)})
    errs["dlambda"] = (decay.grad, ref_grads[3])
    return errs


CASES = _cases()


def _all_checks(rank: int, world: int, group) -> dict:
    return {
        "rank": rank,
        "cases": [_run_case(rank, world, group, c) for c in CASES],
        "packed": _packed_case(rank, world, group),
        "zigzag": _packed_case(rank, world, group, "zigzag", packed=False),
        "zigzag-packed": _packed_case(rank, world, group, "zigzag"),
        "bytes": _byte_checks(rank, world, group),
        "errors": _error_checks(rank, world, group),
    }


@pytest.fixture(scope="module")
def worlds():
    return spawn_worlds(_all_checks)


@pytest.fixture(params=[1, 2, 3, 4], ids=lambda w: f"W{w}")
def world_results(worlds, request):
    return request.param, CASES, worlds[request.param][: request.param]  # W=2: the pair {0, 1}


def test_outputs_and_gradients_match_reference(world_results):
    world, cases, results = world_results
    worst = {}
    for i, c in enumerate(cases):
        for res in results:
            for name, err in res["cases"][i].items():
                if name != "dlambda":
                    key = (c["prim"], c["mode"], c["dtype"], c["Dk"], name)
                    worst[key] = max(worst.get(key, 0.0), err)
        if c["mode"] == "decay":  # the decay's gradient: sum of the ranks' shares vs the reference
            total = sum(res["cases"][i]["dlambda"][0] for res in results)
            worst[(c["prim"], c["mode"], c["dtype"], c["Dk"], "dlambda")] = rel_err(
                total, results[0]["cases"][i]["dlambda"][1]
            )
    failed = {k: e for k, e in worst.items() if not e <= (DLAMBDA_TOL if k[4] == "dlambda" else TOL)[k[2]]}
    assert not failed, f"W={world}: errors above tolerance {failed}"


@pytest.mark.parametrize("case", ["packed", "zigzag", "zigzag-packed"])
def test_lasp2_packed_documents_equal_each_document_alone(world_results, case):
    """Contiguous and zigzag shards (two pieces per rank, 2N states folded in global chunk order), with and
    without packed documents, float64 with a learned decay: outputs, dq, dk, dv and dλ within 1e-12."""
    world, _, results = world_results
    errs = {name: max(res[case][name] for res in results) for name in ("out", "dq", "dk", "dv")}
    errs["dlambda"] = rel_err(sum(res[case]["dlambda"][0] for res in results), results[0][case]["dlambda"][1])
    assert max(errs.values()) < 1e-12, (world, case, errs)


def test_bytes_are_the_formula_and_independent_of_length(world_results):
    world, _, results = world_results
    state = 1 * 2 * 16 * 16 * 4  # B·H·Dk·Dv·itemsize of one float32 state
    for rank, res in enumerate(results):
        b = res["bytes"]
        for L in (256, 4096):
            for causal in (True, False):
                for phase in ("fwd", "bwd"):
                    want = (world - 1) * state
                    op = {"all_gather": want} if world > 1 else {}
                    assert b[(L, "lasp2", causal)][phase] == (want, want, op), (L, causal, phase)
                    # zigzag, causal: two states per rank (its two pieces); non-causal: one sum, one state
                    want *= 2 if causal and world > 1 else 1
                    op = {"all_gather": want} if world > 1 else {}
                    assert b[(L, "lasp2-zigzag", causal)][phase] == (want, want, op), (L, causal, phase)
            # LASP-1 causal: a serial chain, one state per link (forward rank r -> r+1, backward r+1 -> r)
            first, last = rank == 0, rank == world - 1
            sent, recv = b[(L, "lasp1", True)]["fwd"][:2]
            assert (sent, recv) == ((0 if last else state), (0 if first else state))
            sent, recv = b[(L, "lasp1", True)]["bwd"][:2]
            assert (sent, recv) == ((0 if first else state), (0 if last else state))
            for phase in ("fwd", "bwd"):  # non-causal LASP-1: N-1 ring steps of one state
                assert b[(L, "lasp1", False)][phase][:2] == ((world - 1) * state,) * 2
        for key in b:  # nothing that grows with L is communicated
            assert b[(256, *key[1:])] == b[(4096, *key[1:])]


def test_bad_inputs_raise_on_every_rank(world_results):
    world, _, results = world_results
    expect = {
        "decay_noncausal": "causal=False",
        "decay_range": "(0, 1]",
        "decay_shape": "tensor [4]",
        "kv_heads": "Hkv dividing",
        "dtype": "k.dtype",
        "block_size": "block_size=0",
        "length": "different shapes",
        "k_length_one_rank": "different shapes",
    }
    for rank, res in enumerate(results):
        for name, fragment in expect.items():
            msg = res["errors"][name]
            if name == "k_length_one_rank" and world == 1:
                assert "k and v must be" in msg, msg
                continue
            if name == "length" and world == 1:
                assert msg is None  # one rank cannot disagree with itself
                continue
            assert msg is not None and fragment in msg, (rank, name, msg)


@pytest.mark.parametrize(("kernel", "run_tokens", "L"), [("torch", 1 << 20, 70), ("torch", 1, 70),
                                                         ("compiled", None, 70), ("compiled", None, 600)],
                         ids=["torch-one-run", "torch-run-per-block", "compiled", "compiled-runs"])
def test_linear_kernel_batched_blocks_match_reference(monkeypatch, kernel, run_tokens, L):
    """The run-by-run chunk kernel, PyTorch (all blocks in one run, or a run per block; a partial last block)
    and compiled (one run; three runs of 256 tokens, the last partial), vs float64 autograd through the
    O(L^2) reference, including the sequence-parallel pieces it folds in: an initial state P (the call is the
    second part of a longer sequence) and a gradient dM of the chunk's own final state, with decays from 1 to
    0.05 (0.05^70 ~ 1e-91: strong decay stays exact)."""
    from seqpar.kernels import linear, linear_cpu

    if kernel == "torch":
        monkeypatch.setenv(linear_cpu.ENV, "torch")
        monkeypatch.setattr(linear, "RUN_TOKENS", run_tokens)
        monkeypatch.setattr(linear, "STATE_RUN_TOKENS", 32)  # chunk_state in runs, 70 = 32 + 32 + 6
    decay = torch.tensor([1.0, 0.9, 0.5, 0.05], dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    L0 = 30  # the prefix's tokens; L: this call's tokens
    q, k, v = (torch.randn(2, L0 + L, 4, 8, generator=g, dtype=torch.float64) for _ in range(3))
    dout, dM = torch.randn(2, L, 4, 8, generator=g, dtype=torch.float64), torch.randn(2, 4, 8, 8, generator=g)
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref = reference(qr, kr, vr, decay, True)[:, L0:]
    w = decay[:, None] ** torch.arange(L - 1, -1, -1, dtype=torch.float64)  # λ^(L-1-s): the chunk's own state
    M_ref = torch.einsum("hs,bshd,bshe->bhde", w, kr[:, L0:], vr[:, L0:])
    ((ref * dout).sum() + (M_ref * dM.double()).sum()).backward()

    ld = decay.log()
    heads = [t.transpose(1, 2) for t in (q, k, v)]
    assert linear_cpu.usable(heads[0]) == (kernel == "compiled")  # the kernel under test is the one that runs
    P = linear.chunk_state(*(t[:, :, :L0] for t in heads[1:]), ld)
    own = [t[:, :, L0:] for t in heads]
    out = linear.linear_attention_fwd(*own, ld, 16, prefix=P).transpose(1, 2)
    grads = linear.linear_attention_bwd(dout.transpose(1, 2), *own, ld, 16, prefix=P, final_grad=dM.double())
    assert rel_err(out, ref) < 1e-12
    assert rel_err(linear.chunk_state(*own[1:], ld), M_ref) < 1e-12
    for got, want in zip(grads, (qr.grad, kr.grad, vr.grad)):
        assert rel_err(got.transpose(1, 2), want[:, L0:]) < 1e-12
    if kernel == "compiled":  # (batch, head) pairs split over threads: the same numbers
        threads = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            assert torch.equal(linear.linear_attention_fwd(*own, ld, 16, prefix=P).transpose(1, 2), out)
        finally:
            torch.set_num_threads(threads)
    # the folded pieces are engaged: without them the result differs
    assert rel_err(linear.linear_attention_fwd(*own, ld, 16).transpose(1, 2), ref) > 1e-3
    no_dm = linear.linear_attention_bwd(dout.transpose(1, 2), *own, ld, 16, prefix=P)[1]
    assert rel_err(no_dm.transpose(1, 2), kr.grad[:, L0:]) > 1e-3


def test_compiled_kernel_falls_back_with_one_warning(monkeypatch):
    """A machine where the compiled kernel cannot be built (no compiler, a BLAS without sgemm_) warns once and
    runs the PyTorch kernel, and processes it starts do not try again; a bad SEQPAR_LINEAR_KERNEL is a
    one-line error naming the choices."""
    import torch.utils.cpp_extension as cpp

    from seqpar.kernels import linear, linear_cpu

    built = linear_cpu.extension()
    q = torch.randn(1, 2, 40, 8, dtype=torch.float64)
    ld = torch.full((2,), 0.9, dtype=torch.float64).log()
    want = linear.linear_attention_fwd(q, q, q, ld, 16)
    assert built is not None and linear_cpu.usable(q)

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions\nmore detail")

    monkeypatch.setenv(linear_cpu.ENV, "auto")  # undo restores the environment the failure below changes
    monkeypatch.setattr(cpp, "load", no_compiler)
    linear_cpu.extension.cache_clear()
    try:
        with pytest.warns(UserWarning, match="Ninja is required.*using the PyTorch kernel") as record:
            got = linear.linear_attention_fwd(q, q, q, ld, 16)
            linear.linear_attention_fwd(q, q, q, ld, 16)
        assert len(record) == 1 and not linear_cpu.usable(q)
        assert os.environ[linear_cpu.ENV] == "torch"  # ranks started from here will not retry the build
        assert rel_err(got, want) < 1e-12
    finally:
        monkeypatch.undo()
        linear_cpu.extension.cache_clear()
    assert linear_cpu.usable(q)
    monkeypatch.setenv(linear_cpu.ENV, "fast")
    with pytest.raises(ValueError, match=r"SEQPAR_LINEAR_KERNEL='fast': use one of \('auto', 'torch'\)"):
        linear_cpu.usable(q)
