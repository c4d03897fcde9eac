"""GPU check kit (``make test-gpu``): kernels, decompositions, primitives and a patched model on CUDA.

Skipped with a reason where CUDA is absent (written on a CPU-only machine: nothing here has run on a GPU yet).
Every check compares against a float64 reference computed on the same device.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from seqpar.kernels import (
    block_attention,
    block_attention_backward,
    fallback_counts,
    prefix_plan,
    reset_fallbacks,
)
from seqpar.kernels.reference import dense_attention, rel_err
from seqpar.kernels.softmax import flash_attn_available

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the GPU kit needs one")]

DEV = "cuda"
TOL = {torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float32: 2e-5}
HALF = [torch.bfloat16, torch.float16]


def _backends() -> list[str]:
    return ["sdpa", *(["flash_attn"] if torch.cuda.is_available() and flash_attn_available() else [])]


def _qkv(Lq, Lk, dtype, H=8, Hkv=2, D=64, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return [torch.randn(2, L, h, D, generator=g, device=DEV, dtype=torch.float64).to(dtype)
            for L, h in ((Lq, H), (Lk, Hkv), (Lk, Hkv))]


def _positions(spans):
    return torch.cat([torch.arange(a, b) for a, b in spans])


def _check(q, k, v, mask, tol, **kw):
    """out, lse, dq, dk, dv vs the float64 reference; no tiled-kernel fallback."""
    reset_fallbacks()
    out, lse = block_attention(q, k, v, **kw)
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = dense_attention(qr, kr, vr, mask.to(DEV))
    dout = torch.randn_like(ref)
    ref.backward(dout)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), "rows that see no key must have lse = -inf"
    assert rel_err(out, ref) < tol and rel_err(lse[finite], ref_lse[finite]) < tol
    grads = block_attention_backward(dout.to(q.dtype), q, k, v, out, lse, **kw)
    for got, want in zip(grads, (qr.grad, kr.grad, vr.grad)):
        assert rel_err(got, want) < 2 * tol
    if kw.get("backend", "auto") == "auto":
        assert fallback_counts() == {}, fallback_counts()


# float32: the efficient-attention kernel (its lse padded to 32 rows, GQA K/V repeated once per call; issue 26)
@pytest.mark.parametrize("dtype", [*HALF, torch.float32])
@pytest.mark.parametrize("backend", ["auto", "sdpa", "flash_attn"])
def test_decompositions_on_cuda(dtype, backend):
    if backend not in ["auto", *_backends()]:
        pytest.skip("flash-attn is not installed (or the GPU is older than Ampere)")
    if dtype == torch.float32 and backend == "flash_attn":
        pytest.skip("flash-attn has no float32 kernel")
    kw = {"backend": backend}
    # zigzag rank 0 of 2 against the all-gathered keys, with documents crossing chunk boundaries
    L, c = 256, 64
    q_spans, k_spans = [(0, c), (3 * c, 4 * c)], [(0, c), (3 * c, 4 * c), (c, 2 * c), (2 * c, 3 * c)]
    cu = [0, 40, 100, 101, 200, L]
    qp, kp = _positions(q_spans), _positions(k_spans)
    doc = lambda p: torch.searchsorted(torch.tensor(cu), p, right=True)  # noqa: E731
    mask = (kp[None] <= qp[:, None]) & (doc(qp)[:, None] == doc(kp)[None])
    q, k, v = _qkv(2 * c, 4 * c, dtype)
    _check(q, k, v, mask, TOL[dtype], causal=True, q_spans=q_spans, k_spans=k_spans, cu_seqlens=cu, **kw)
    # decoding / halo: bottom-right causal with Lq < Lk and Lq > Lk (rows that see no key)
    for Lq, Lk in ((16, 80), (80, 48)):
        q, k, v = _qkv(Lq, Lk, dtype, seed=1)
        mask = torch.arange(Lk)[None] <= torch.arange(Lq)[:, None] + Lk - Lq
        _check(q, k, v, mask, TOL[dtype], causal="bottom_right", **kw)
    # SF-Attn sinks: rows [0, 32) none, [32, 64) the first 2 of 4, the rest all 4
    q, k, v = _qkv(128, 4, dtype, seed=2)
    mask = torch.zeros(128, 4, dtype=torch.bool)
    mask[32:64, :2] = True
    mask[64:] = True
    _check(q, k, v, mask, TOL[dtype], plan=prefix_plan(128, 4, [(32, 64, 2), (64, 128, 4)]), **kw)


def _primitive_cases():
    import seqpar.attention as A

    return {
        "ring": lambda q, k, v: A.ring_attention(q, k, v),
        "ring_packed": lambda q, k, v: A.ring_attention(q, k, v, cu_seqlens=torch.tensor([0, 50, 128])),
        "allgather": lambda q, k, v: A.allgather_attention(q, k, v, cu_seqlens=torch.tensor([0, 50, 128])),
        "ulysses": lambda q, k, v: A.ulysses_attention(q, k, v),
        "s2": lambda q, k, v: A.shift_short_attention(q, k, v, group_size=32),
        "sf": lambda q, k, v: A.sink_shift_attention(q, k, v, group_size=32),
    }


@pytest.mark.parametrize("name", ["ring", "ring_packed", "allgather", "ulysses", "s2", "sf"])
def test_primitives_world_one_match_float64(name):
    """Each primitive on one GPU in bf16 vs the same primitive in float64 (exact on CPU by the main suite)."""
    fn = _primitive_cases()[name]
    q, k, v = _qkv(128, 128, torch.bfloat16, H=4, Hkv=2)
    reset_fallbacks()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    dout = torch.randn_like(out)
    out.backward(dout)
    assert fallback_counts() == {}, fallback_counts()  # every bf16 block ran a fused CUDA kernel
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = fn(*ref_leaves)
    ref.backward(dout.double())
    assert rel_err(out, ref) < TOL[torch.bfloat16]
    for got, want in zip(leaves, ref_leaves):
        assert rel_err(got.grad, want.grad) < 2 * TOL[torch.bfloat16]


def _tiny_llama():
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=512, attention_dropout=0.0)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").to(DEV, torch.bfloat16).train()


@pytest.mark.parametrize("attention", ["full", "ring", "allgather", "ulysses", "s2", "sf"])
def test_patched_llama_bf16_step(attention):
    """One training step of a patched tiny Llama on one GPU in bf16: loss close to the unpatched model's
    (s2/sf: shifted groups differ from full attention by design, so only finiteness is checked)."""
    from seqpar.models import patch_model, unpatch_model

    model = _tiny_llama()
    ids = torch.randint(0, 128, (1, 256), device=DEV)
    ref = model(input_ids=ids, labels=ids).loss
    patch_model(model, attention, None, group_size=64)
    model(input_ids=ids, labels=ids).loss.backward()  # the patch's first forward checks GPU position ids once
    model.zero_grad(set_to_none=True)
    reset_fallbacks()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    unpatch_model(model)
    assert torch.isfinite(loss)
    if attention not in ("s2", "sf"):
        assert abs(loss.item() - ref.item()) < 2e-2 * abs(ref.item())
    assert fallback_counts() == {}, fallback_counts()
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)
             and "seqpar" in "".join(getattr(w, "filename", ""))]
    assert not syncs, syncs  # no host sync raised from seqpar's attention path


# ------------------------------------------------------------------------------- 2-rank NCCL parity


def _nccl_cases():
    """name -> (call with group and layout, layout): every primitive, packed where it takes documents."""
    import seqpar.attention as A

    docs = torch.tensor([0, 50, 90, 256])  # boundaries that cross the shards
    return {
        "ring": (lambda q, k, v, g: A.ring_attention(q, k, v, group=g), "zigzag"),
        "ring_contiguous": (lambda q, k, v, g: A.ring_attention(q, k, v, group=g, layout="contiguous"),
                            "contiguous"),
        "ring_packed": (lambda q, k, v, g: A.ring_attention(q, k, v, group=g, cu_seqlens=docs.to(q.device)),
                        "zigzag"),
        "rsa": (lambda q, k, v, g: A.ring_self_attention(q, k, v, group=g), "contiguous"),
        "ulysses": (lambda q, k, v, g: A.ulysses_attention(q, k, v, group=g), "contiguous"),
        "allgather": (lambda q, k, v, g: A.allgather_attention(q, k, v, group=g), "zigzag"),
        "allgather_packed": (lambda q, k, v, g: A.allgather_attention(q, k, v, group=g,
                                                                      cu_seqlens=docs.to(q.device)), "zigzag"),
        "s2": (lambda q, k, v, g: A.shift_short_attention(q, k, v, group_size=32, group=g), "contiguous"),
        "sf": (lambda q, k, v, g: A.sink_shift_attention(q, k, v, group_size=32, group=g), "contiguous"),
        "lasp2": (lambda q, k, v, g: A.lasp2_linear_attention(q, k, v, group=g, decay=0.99), "contiguous"),
    }


def _nccl_rank(rank: int, world: int, group, names: list[str]) -> dict[str, list[float]]:
    """Each primitive on ``world`` GPUs in bf16 vs the same primitive on the whole sequence in float64 (world 1,
    exact by the CPU suite): errors of out, dq, dk, dv gathered back to the whole sequence."""
    import torch.distributed as dist

    from seqpar.sharding import shard, unshard

    dev = torch.device("cuda", rank) if dist.get_backend(group) == "nccl" else torch.device("cpu")
    gen = torch.Generator(device=dev).manual_seed(0)  # the same full tensors on every rank
    full = [torch.randn(1, 256, h, 64, generator=gen, device=dev, dtype=torch.float64) for h in (4, 2, 2)]
    dout_full = torch.randn(1, 256, 4, 64, generator=gen, device=dev, dtype=torch.float64)
    errors = {}
    for name in names:
        fn, layout = _nccl_cases()[name]
        reset_fallbacks()
        leaves = [shard(t, group=group, dim=1, layout=layout).to(torch.bfloat16).requires_grad_() for t in full]
        out = fn(*leaves, group)
        out.backward(shard(dout_full, group=group, dim=1, layout=layout).to(torch.bfloat16))
        got = [unshard(x.detach().contiguous(), group=group, dim=1, layout=layout)
               for x in (out, *(t.grad for t in leaves))]
        ref_leaves = [t.clone().requires_grad_() for t in full]
        ref = fn(*ref_leaves, None)
        ref.backward(dout_full)
        errors[name] = [rel_err(g, w) for g, w in zip(got, (ref, *(t.grad for t in ref_leaves)))]
        assert fallback_counts() == {}, (name, fallback_counts())
    return errors


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="2-rank NCCL parity needs two GPUs")
def test_every_primitive_two_rank_nccl_parity():
    from seqpar.launcher import spawn_ranks

    names = list(_nccl_cases())
    results = spawn_ranks(_nccl_rank, 2, args=(names,), backend="nccl", timeout=600)
    for name in names:
        worst = max(r[name][i] for r in results for i in range(4))
        assert worst < 2 * TOL[torch.bfloat16], (name, [r[name] for r in results])
