"""Mamba (v1) under SP: ``seqpar.attention.selective_scan`` and ``MambaForCausalLM`` / ``FalconMambaForCausalLM``
patched in place, exact at SP = 1..4, packed and unpacked.

The chain of references: seqpar's chunked scan equals the float64 token-by-token recurrence
(``seqpar.kernels.reference``) on W ranks (outputs and every input gradient, packed documents included), and
transformers' own float32 scan to float32 rounding; the model patched on W ranks equals the same model patched on
one process on the whole sequence (float64, loss and every parameter gradient summed over SP, rel 1e-9); that
one-process run equals the unpatched model to float32 rounding (transformers' scan rounds A, D, Δ's bias, B and x
to float32 whatever the model dtype, and its RMSNorms and ``residual_in_fp32`` round too) and, packed, each
document run alone (gradient checkpointing included); float32 SP runs equal the unpatched model (1e-5). Zeroing
the cross-rank entry state or the conv halo changes the loss (the exchange is engaged). W = 4, 2, 3, 1 run in one
spawn of 4 ranks (subgroups), as tests/test_conformance.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.sp_harness import spawn_model_worlds
from tests.test_mamba2 import _run as mamba2_run

L = 48  # divisible by 1..4; >= 3 conv-history tokens per rank
# an empty document; boundaries at shard edges (16: W = 3; 24: W = 2 and 4) and inside shards; the last document
# crosses a shard edge at every W > 1
PACKED = torch.tensor([0, 5, 5, 16, 24, 31, L])
MODELS = ("mamba", "falcon_mamba")


def _model(model_type: str, dtype: torch.dtype):
    """The tiny model (4 layers, 128 channels, d_state 8) with weights large enough to matter."""
    from transformers import AutoModelForCausalLM

    from tests.causal_lm_zoo import tiny_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type), dtype=dtype)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0.0, 0.08)
    return model.train()


def _run(model, group, packed: bool, batch_size: int = 2):
    """tests/test_mamba2.py's step (loss, gradients summed over the group) with this module's documents."""
    return mamba2_run(model, group, packed, batch_size, documents=PACKED)


def _err(a, b) -> float:
    """Max relative error of the loss and every parameter gradient."""
    (la, ga), (lb, gb) = a, b
    assert ga.keys() == gb.keys()
    worst = max(((ga[n] - gb[n]).norm() / gb[n].norm().clamp_min(1e-12)).item() for n in gb)
    return max(abs(la - lb) / abs(lb), worst)


def _primitive(group) -> dict:
    """selective_scan on this group vs the float64 reference: outputs and every input gradient; bytes sent."""
    from seqpar.attention.selective_scan import selective_scan, selective_scan_bytes
    from seqpar.comm import ByteCounter
    from seqpar.kernels.reference import selective_scan_reference
    from seqpar.sharding import shard

    def part(t):
        return shard(t.detach(), group=group, dim=1, layout="contiguous")

    res = {}
    for name, n, cu in (("plain", 60, None), ("packed", 60, torch.tensor([0, 5, 5, 29, 31, 60])), ("long", 120, None)):
        torch.manual_seed(0)
        x = torch.randn(2, n, 6, dtype=torch.float64)
        dt = 0.5 * torch.nn.functional.softplus(torch.randn(2, n, 6, dtype=torch.float64))
        A = -torch.rand(6, 4, dtype=torch.float64) - 0.05
        B, C = torch.randn(2, 2, n, 4, dtype=torch.float64).unbind(0)
        D = torch.randn(6, dtype=torch.float64)
        inputs = [t.requires_grad_() for t in (x, dt, A, B, C, D)]
        dout = torch.randn(2, n, 6, dtype=torch.float64)
        ref = selective_scan_reference(*inputs, cu_seqlens=cu)
        ref_grads = torch.autograd.grad((ref * dout).sum(), inputs)
        local = [(part(t) if t.dim() > 2 else t.detach().clone()).requires_grad_() for t in inputs]
        with ByteCounter() as counted:
            out = selective_scan(*local, group=group, cu_seqlens=cu, chunk_size=8)
            (out * part(dout)).sum().backward()
        for t in local[2], local[5]:  # A and D: each rank holds its share of their gradient
            if group is not None:
                dist.all_reduce(t.grad, group=group)
        errs = [(out - part(ref)).abs().max()]
        errs += [(t.grad - (part(r) if r.dim() > 2 else r)).abs().max() for t, r in zip(local, ref_grads)]
        res[name] = max(e.item() for e in errs)
        res[name, "bytes"] = (counted.sent, sum(selective_scan_bytes(*local, group=group)))
    return res


_REFS: dict = {}  # the one-process runs, the same at every W: made once per rank


def _reference(model_type: str, packed: bool, dtype: torch.dtype):
    from seqpar.models import patch_model

    key = model_type, packed, dtype
    if key not in _REFS:
        model = _model(model_type, dtype)
        if dtype == torch.float64:
            patch_model(model, "full", None)  # float64: seqpar's scan on the whole sequence
        _REFS[key] = _run(model, None, packed)  # float32: the unpatched model
    return _REFS[key]


def _cases(rank: int, world: int, group) -> dict:
    import warnings

    import seqpar.attention.selective_scan as selective_scan
    import seqpar.attention.short_conv as short_conv
    from seqpar.models import attention_calls, patch_model, unpatch_model

    warnings.simplefilter("ignore")
    out = {"primitive": _primitive(group)}
    for model_type in MODELS:
        model = _model(model_type, torch.float64)
        patch_model(model, "ring", group)
        for packed in (False, True):
            ref = _reference(model_type, packed, torch.float64)
            out[model_type, packed, "f64"] = _err(_run(model, group, packed), ref)
            if world > 1 and not packed and model_type == "mamba":  # the exchange is engaged
                saved = selective_scan.entry_state
                selective_scan.entry_state = lambda M, U, group: torch.zeros_like(U)
                out["no state"] = _err(_run(model, group, packed), ref)
                selective_scan.entry_state = saved
                short_conv._Halo.apply = lambda tail, group: torch.zeros_like(tail)
                out["no halo"] = _err(_run(model, group, packed), ref)
                del short_conv._Halo.apply  # back to Function's
        out[model_type, "calls"] = dict(attention_calls(model))
        unpatch_model(model)
        # float32 against the unpatched model on the whole sequence
        model = _model(model_type, torch.float32)
        patch_model(model, "ring", group)
        got, ref = _run(model, group, False), _reference(model_type, False, torch.float32)
        out[model_type, "f32 loss"] = abs(got[0] - ref[0]) / ref[0]
        out[model_type, "f32"] = _err(got, ref)
    return out


@pytest.fixture(scope="module")
def worlds() -> dict:
    """W = 4, 2, 3, 1 from one spawn of 4 ranks (tests/sp_harness.py), and the refusals at W = 2."""
    return spawn_model_worlds(_cases, _refusals)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("model_type", MODELS)
def test_mamba_models_are_exact_on_w_ranks(worlds, world, model_type):
    ranks = worlds[world]
    for r in ranks:
        assert r[model_type, "calls"].get("selective", 0) > 0, r[model_type, "calls"]
        for key in ((model_type, False, "f64"), (model_type, True, "f64"), (model_type, "f32 loss"),
                    (model_type, "f32"), "no state", "no halo"):
            if key in r:
                assert r[key] == ranks[0][key], key  # every rank measured the same loss and summed gradients
        assert r[model_type, False, "f64"] <= 1e-9 and r[model_type, True, "f64"] <= 1e-9, (world, r)
        # float32: loss 1e-5; gradients 1e-4 (the two scans round differently)
        assert r[model_type, "f32 loss"] <= 1e-5 and r[model_type, "f32"] <= 1e-4, (world, r)
        if world > 1 and model_type == "mamba":  # the entry state and the halo each matter far beyond rounding
            assert r["no state"] >= 1e-4 and r["no halo"] >= 1e-4, (world, r["no state"], r["no halo"])


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_selective_scan_primitive_matches_the_reference_on_w_ranks(worlds, world):
    for r in worlds[world]:
        res = r["primitive"]
        for key in ("plain", "packed", "long"):
            assert res[key] < 1e-12, (world, key, res[key])
            sent, formula = res[key, "bytes"]
            assert sent == formula, (world, key, sent, formula)  # the docstring's bytes
        assert res["plain", "bytes"] == res["long", "bytes"]  # independent of L (60 and 120 tokens)
        assert (res["plain", "bytes"][0] > 0) == (world > 1)


@pytest.mark.parametrize("model_type", MODELS)
def test_one_device_patch_equals_the_unpatched_model_and_each_document_alone(model_type):
    """The patched model on one process (the reference of the W-rank runs) equals the unpatched model to
    float32 rounding; packed, through the causal LM's own forward (which drops unknown keywords: the seam hands
    ``cu_seqlens`` to the mixers), each document's logits equal the unpatched model on that document alone and
    differ from the unpacked run (resets applied); gradient checkpointing recomputes with the same documents."""
    from seqpar.models import patch_model, shard_batch, unpatch_model

    model = _model(model_type, torch.float64)
    plain = _run(model, None, False)
    patch_model(model, "full", None)
    patched = _run(model, None, False)
    scale = max(g.norm() for g in plain[1].values())
    assert abs(patched[0] - plain[0]) / plain[0] <= 1e-6
    assert max((patched[1][n] - g).norm() / scale for n, g in plain[1].items()) <= 1e-5
    packed = _run(model, None, True)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert _err(_run(model, None, True), packed) <= 1e-12  # the recomputation saw the documents
    model.activation_checkpointing_disable()
    ids = torch.randint(0, 128, (2, L), generator=torch.Generator().manual_seed(1))
    sp = shard_batch({"input_ids": ids, "cu_seqlens": PACKED}, None, "contiguous")
    sp.pop("labels")
    docs = [(a, b) for a, b in zip(PACKED.tolist(), PACKED.tolist()[1:]) if b > a]
    with torch.no_grad():
        packed = model(**sp, use_cache=False).logits
        whole = model(input_ids=ids, use_cache=False).logits
        unpatch_model(model)
        alone = torch.cat([model(input_ids=ids[:, a:b], use_cache=False).logits for a, b in docs], dim=1)
    scale = alone.abs().max()
    assert (packed - alone).abs().max() / scale < 1e-5  # transformers' float32 scan and norms (see above)
    assert (whole - alone).abs().max() / scale > 1e-3


def test_selective_scan_equals_transformers_scan_and_never_overflows():
    """transformers' own float32 ``mamba_selective_scan`` agrees with the float64 reference to float32 rounding,
    as does seqpar's scan at several chunk sizes to 1e-12 in float64; with Δ A down to -1e6 (decays that
    underflow to 0) outputs and gradients stay finite and equal the reference."""
    from transformers.models.mamba.modeling_mamba import mamba_selective_scan

    from seqpar.attention.selective_scan import selective_scan
    from seqpar.kernels.reference import selective_scan_reference

    torch.manual_seed(0)
    x, dt = torch.randn(2, 50, 6, dtype=torch.float64), torch.rand(2, 50, 6, dtype=torch.float64)
    A, D = -torch.rand(6, 4, dtype=torch.float64) - 0.1, torch.randn(6, dtype=torch.float64)
    B, C = torch.randn(2, 2, 50, 4, dtype=torch.float64).unbind(0)
    ref = selective_scan_reference(x, dt, A, B, C, D)
    for chunk in (1, 4, 16, 64):
        assert (selective_scan(x, dt, A, B, C, D, chunk_size=chunk) - ref).abs().max() < 1e-12
    hf = mamba_selective_scan(x.float().transpose(1, 2), dt.float().transpose(1, 2), A.float(),
                              B.float().transpose(1, 2), C.float().transpose(1, 2), D=D.float())
    assert (hf.double().transpose(1, 2) - ref).abs().max() / ref.abs().max() < 1e-6
    for dtype in (torch.float32, torch.float64):
        inputs = [t.to(dtype).requires_grad_() for t in (x, dt * 1e4, A * 100, B, C, D)]
        y = selective_scan(*inputs, chunk_size=16)
        y.sum().backward()
        assert all(torch.isfinite(t).all() for t in (y, *(t.grad for t in inputs)))
        ref = selective_scan_reference(*inputs)
        assert (y.double() - ref).abs().max() / ref.abs().max() < 1e-6


def _refusals(rank: int, world: int, group) -> dict:
    from seqpar.models import patch_model, shard_batch

    model = _model("mamba", torch.float32)
    patch_model(model, "ring", group)
    sp = shard_batch({"input_ids": torch.zeros(1, L, dtype=torch.long)}, group, "contiguous")
    sp.pop("labels")
    caught = {}
    for name, extra in {"cache": {"use_cache": True},
                        "mask": {"attention_mask": torch.tensor([[1] * (L // 2 - 1) + [0]])}}.items():
        try:
            model(**{**sp, "use_cache": False, **extra})
        except ValueError as err:
            caught[name] = str(err)
    try:  # nothing passes keywords to a Mamba mixer in transformers; a direct call may
        model.backbone.layers[0].mixer(torch.zeros(1, L // world, 64), seq_idx=torch.zeros(1, L // world))
    except ValueError as err:
        caught["keyword"] = str(err)
    return caught


def test_what_the_seam_does_not_implement_is_refused_in_one_line(worlds):
    caught = worlds["refusals"][0]
    assert set(caught) == {"cache", "mask", "keyword"}, caught
    assert all("\n" not in why for why in caught.values())
    assert "use_cache=False" in caught["cache"] and "padding attention_mask" in caught["mask"]
    assert "MambaMixer passed ['seq_idx']" in caught["keyword"], caught["keyword"]
