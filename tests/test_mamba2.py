"""Mamba2 (SSD) under SP: ``seqpar.attention.ssd`` and ``Mamba2ForCausalLM`` patched in place, exact at SP = 1..4,
packed and unpacked.

The chain of references: seqpar's chunked scan equals the float64 token-by-token recurrence
(``seqpar.kernels.reference``) on W ranks (outputs and every input gradient, packed documents included), and
transformers' own float32 scan to float32 rounding; the model patched on W ranks equals the same model patched on
one process on the whole sequence (float64, loss and every parameter gradient summed over SP, rel 1e-9); that
one-process run equals the unpatched model to float32 rounding (transformers' scan is float32 whatever the model
dtype, ``A = -exp(A_log.float())``, and the gated RMSNorm rounds to float32) and, packed, each document run alone;
float32 SP runs equal the unpatched model (1e-5). Zeroing the cross-rank entry state or the conv halo changes the
loss (the exchange is engaged). W = 4, 2, 3, 1 run in one spawn of 4 ranks (subgroups), as tests/test_conformance.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.sp_harness import spawn_model_worlds
from tests.test_hybrid import patch_equals_unpatched, summed_grads

L = 48  # divisible by 1..4; >= 3 conv-history tokens per rank; 16-token chunks cut inside shards at W = 3
PACKED = torch.tensor([0, 5, 5, 19, 31, L])  # an empty document, boundaries inside and at shard edges (12, 24)


# The Mamba2 classes and what makes their tiny configs hybrids with 16-token scan chunks (the zoo keeps the
# defaults: Bamba and GraniteMoeHybrid all-Mamba, Falcon-H1's 1024-wide SSM against 4 heads of 32).
MODELS = {
    "mamba2": {},
    "bamba": {"attn_layer_indices": [1, 3], "mamba_chunk_size": 16},
    "nemotron_h": {"mamba_num_heads": 8, "chunk_size": 16},
    "falcon_h1": {"mamba_d_ssm": 128, "mamba_chunk_size": 16},
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"] * 2, "mamba_chunk_size": 16},
}


def _model(model_type: str, dtype: torch.dtype):
    """The tiny model (4 layers; Mamba2: 4 heads of 32, d_state 8) with weights large enough to matter."""
    from transformers import AutoModelForCausalLM

    from tests.causal_lm_zoo import tiny_config

    torch.manual_seed(0)
    cfg = tiny_config(model_type)
    for key, value in MODELS[model_type].items():
        setattr(cfg, key, value)
    cfg._experts_implementation = "eager"  # the grouped MoE matmul takes no float64
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=dtype)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0.0, 0.08)
    return model.train()


def _run(model, group, packed: bool, batch_size: int = 2, documents: torch.Tensor = PACKED):
    """Loss and parameter gradients (summed over the group) of one step (``packed``: the ``documents``
    boundaries). The logits come from the backbone and the head directly: ``Mamba2ForCausalLM.forward`` (and
    ``MambaForCausalLM.forward``, tests/test_mamba.py) casts them to float32, which would make a float64 loss
    float32 (a per-token cast, nothing to do with SP)."""
    from seqpar.models import shard_batch, sp_cross_entropy

    ids = torch.randint(0, 128, (batch_size, L), generator=torch.Generator().manual_seed(1))
    sp = shard_batch({"input_ids": ids, **({"cu_seqlens": documents} if packed else {})}, group, "contiguous")
    labels = sp.pop("labels")
    model.zero_grad(set_to_none=True)
    hidden = model.base_model(**sp, use_cache=False).last_hidden_state
    loss = sp_cross_entropy(model.lm_head(hidden), labels, group)
    loss.backward()
    return loss.item(), summed_grads(model, group)


_F32_IN_MODEL = ("A_log", "norm.weight", "norm_f.weight", "mixer.gate.weight")


def _err(a, b, f64: bool = True) -> float:
    """Max relative error of the loss and every parameter gradient. In a float64 model, the gradients of the
    parameters the models use in float32 whatever their dtype (``A_log.float()``, the RMSNorms' float32
    products, Nemotron-H's router ``F.linear(h.float(), gate.weight.float())``) sum float32 terms, 1e-7 apart
    in any two summation orders, patched or not: they count at 1e-3 of their error (so 1e-6 passes the 1e-9
    bound), every other gradient in full."""
    (la, ga), (lb, gb) = a, b
    assert ga.keys() == gb.keys()
    worst = max(((ga[n] - gb[n]).norm() / gb[n].norm().clamp_min(1e-12)).item()
                * (1e-3 if f64 and n.endswith(_F32_IN_MODEL) else 1.0) for n in gb)
    return max(abs(la - lb) / abs(lb), worst)


def _primitive(group) -> dict:
    """ssd_scan on this group vs the float64 reference: outputs and every input gradient; bytes sent."""
    from seqpar.attention.ssd import ssd_bytes, ssd_scan
    from seqpar.comm import ByteCounter
    from seqpar.kernels.reference import ssd_reference
    from seqpar.sharding import shard

    def part(t):
        return shard(t.detach(), group=group, dim=1, layout="contiguous")

    res = {}
    for name, n, cu in (("plain", 60, None), ("packed", 60, torch.tensor([0, 5, 5, 29, 31, 60])), ("long", 120, None)):
        torch.manual_seed(0)
        x = torch.randn(2, n, 4, 3, dtype=torch.float64)
        dt = torch.nn.functional.softplus(torch.randn(2, n, 4, dtype=torch.float64))
        A = -torch.rand(4, dtype=torch.float64) - 0.1
        B, C = torch.randn(2, 2, n, 2, 5, dtype=torch.float64).unbind(0)
        D = torch.randn(4, dtype=torch.float64)
        inputs = [t.requires_grad_() for t in (x, dt, A, B, C, D)]
        dout = torch.randn(2, n, 4, 3, dtype=torch.float64)
        ref = ssd_reference(*inputs, cu_seqlens=cu)
        ref_grads = torch.autograd.grad((ref * dout).sum(), inputs)
        local = [part(t) if t.dim() > 1 else t.detach().clone() for t in inputs]
        local = [t.requires_grad_() for t in local]
        with ByteCounter() as counted:
            out = ssd_scan(*local, group=group, cu_seqlens=cu, chunk_size=8)
            (out * part(dout)).sum().backward()
        for t in local[2], local[5]:  # A and D: each rank holds its share of their gradient
            if group is not None:
                dist.all_reduce(t.grad, group=group)
        errs = [(out - part(ref)).abs().max()]
        errs += [(t.grad - (part(r) if r.dim() > 1 else r)).abs().max() for t, r in zip(local, ref_grads)]
        res[name] = max(e.item() for e in errs)
        res[name, "bytes"] = (counted.sent, sum(ssd_bytes(*local, group=group)))
    return res


def _cases(rank: int, world: int, group) -> dict:
    import warnings

    import seqpar.attention.short_conv as short_conv
    import seqpar.attention.ssd as ssd
    from seqpar.models import attention_calls, patch_model, unpatch_model

    warnings.simplefilter("ignore")
    out = {"primitive": _primitive(group)}
    for model_type in MODELS:
        model = _model(model_type, torch.float64)
        for packed in (False, True):
            patch_model(model, "full", None)
            ref = _run(model, None, packed)
            unpatch_model(model)
            patch_model(model, "ring", group)
            got = _run(model, group, packed)
            out[model_type, "calls"] = dict(attention_calls(model))
            out[model_type, packed, "f64"] = _err(got, ref)
            if world > 1 and not packed and model_type == "mamba2":  # the exchange is engaged
                saved = ssd.entry_state
                ssd.entry_state = lambda M, U, group: torch.zeros_like(U)
                out["no state"] = _err(_run(model, group, packed), ref)
                ssd.entry_state = saved
                short_conv._Halo.apply = lambda tail, group: torch.zeros_like(tail)
                out["no halo"] = _err(_run(model, group, packed), ref)
                del short_conv._Halo.apply  # back to Function's
            unpatch_model(model)
        if world == 2 or model_type == "mamba2":  # float32 against the unpatched model on the whole sequence
            model = _model(model_type, torch.float32)
            ref = _run(model, None, False)
            patch_model(model, "ring", group)
            got = _run(model, group, False)
            unpatch_model(model)
            out[model_type, "f32 loss"] = abs(got[0] - ref[0]) / ref[0]
            out[model_type, "f32"] = _err(got, ref, f64=False)
        # bfloat16 weights (the scan's state and sums stay float32): the loss at SP = 2 against the float32
        # model, and what bfloat16 costs the unpatched model on one process. Not Mamba2ForCausalLM: unpatched
        # too, its bfloat16 model stops in transformers on CPU (a float32 tensor reaches a bfloat16 Linear).
        if world == 2 and model_type != "mamba2":
            half = _run(_model(model_type, torch.float32).to(torch.bfloat16), None, False)
            out[model_type, "bf16 unpatched"] = abs(half[0] - ref[0]) / ref[0]
            model = _model(model_type, torch.float32).to(torch.bfloat16)
            patch_model(model, "ring", group)
            out[model_type, "bf16"] = abs(_run(model, group, False)[0] - ref[0]) / ref[0]
    return out


@pytest.fixture(scope="module")
def worlds() -> dict:
    """W = 4, 2, 3, 1 from one spawn of 4 ranks (tests/sp_harness.py), and the refusals at W = 2."""
    return spawn_model_worlds(_cases, _refusals)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("model_type", list(MODELS))
def test_mamba2_models_are_exact_on_w_ranks(worlds, world, model_type):
    ranks = worlds[world]
    for r in ranks:
        calls = r[model_type, "calls"]
        assert calls.get("ssd", 0) > 0 and (model_type == "mamba2" or calls.get("ring", 0) > 0), calls  # both kinds
        for key in ((model_type, False, "f64"), (model_type, True, "f64"), (model_type, "f32 loss"),
                    (model_type, "f32"), "no state", "no halo"):
            if key in r:
                assert r[key] == ranks[0][key], key  # every rank measured the same loss and summed gradients
        assert r[model_type, False, "f64"] <= 1e-9 and r[model_type, True, "f64"] <= 1e-9, (world, r)
        if (model_type, "f32") in r:  # loss 1e-5; gradients 1e-4 (the two scans round differently)
            assert r[model_type, "f32 loss"] <= 1e-5 and r[model_type, "f32"] <= 1e-4, (world, r)
        if (model_type, "bf16") in r:  # within 2e-3 of the float32 loss and 3x (+1e-4) what bf16 costs unpatched
            bound = min(2e-3, 3 * r[model_type, "bf16 unpatched"] + 1e-4)
            assert r[model_type, "bf16"] <= bound, (model_type, r[model_type, "bf16"], bound)
        if world > 1 and model_type == "mamba2":  # the entry state and the halo each matter far beyond rounding
            assert r["no state"] >= 1e-4 and r["no halo"] >= 1e-4, (world, r["no state"], r["no halo"])


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ssd_primitive_matches_the_reference_on_w_ranks(worlds, world):
    for r in worlds[world]:
        res = r["primitive"]
        for key in ("plain", "packed", "long"):
            assert res[key] < 1e-12, (world, key, res[key])
            sent, formula = res[key, "bytes"]
            assert sent == formula, (world, key, sent, formula)  # the docstring's bytes
        assert res["plain", "bytes"] == res["long", "bytes"]  # independent of L (60 and 120 tokens)
        assert (res["plain", "bytes"][0] > 0) == (world > 1)


def test_one_device_patch_equals_the_unpatched_model_and_each_document_alone():
    """The patched model on one process (the reference of the W-rank runs) equals the unpatched model to
    float32 rounding; packed, each document's logits equal the unpatched model on that document alone (no state
    or conv history crosses a document start), and differ from the unpacked run (resets applied)."""
    from seqpar.models import shard_batch, unpatch_model

    model = _model("mamba2", torch.float64)
    patch_equals_unpatched(model, _run)
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
    assert (packed - alone).abs().max() / scale < 1e-5  # transformers' float32 scan and norm (see above)
    assert (whole - alone).abs().max() / scale > 1e-3


def test_ssd_kernel_equals_transformers_scan():
    """transformers' own float32 ``mamba2_chunk_scan`` agrees with the float64 reference to float32 rounding, as
    does seqpar's scan at several chunk sizes to 1e-12 in float64."""
    from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan

    from seqpar.attention.ssd import ssd_scan
    from seqpar.kernels.reference import ssd_reference

    torch.manual_seed(0)
    x = torch.randn(2, 50, 4, 3, dtype=torch.float64)
    dt = torch.nn.functional.softplus(torch.randn(2, 50, 4, dtype=torch.float64))
    A, D = -torch.rand(4, dtype=torch.float64) - 0.1, torch.randn(4, dtype=torch.float64)
    B, C = torch.randn(2, 2, 50, 2, 5, dtype=torch.float64).unbind(0)
    ref = ssd_reference(x, dt, A, B, C, D)
    for chunk in (4, 16, 64):
        assert (ssd_scan(x, dt, A, B, C, D, chunk_size=chunk) - ref).abs().max() < 1e-12
    hf = mamba2_chunk_scan(x.float(), dt.float(), A.float(), B.float(), C.float(), 16, D=D.float())
    assert (hf.double() - ref).abs().max() / ref.abs().max() < 1e-6


def _refusals(rank: int, world: int, group) -> dict:
    from seqpar.models import patch_model, shard_batch

    model = _model("mamba2", torch.float32)
    patch_model(model, "ring", group)
    sp = shard_batch({"input_ids": torch.zeros(1, L, dtype=torch.long)}, group, "contiguous")
    sp.pop("labels")
    caught = {}
    for name, extra in {"cache": {"use_cache": True},
                        "mask": {"attention_mask": torch.tensor([[1] * (L // 2 - 1) + [0]])},
                        "keyword": {"seq_idx": torch.zeros(1, L // world, dtype=torch.int32)}}.items():
        try:
            model(**{**sp, "use_cache": False, **extra})
        except ValueError as err:
            caught[name] = str(err)
    return caught


def test_what_the_seam_does_not_implement_is_refused_in_one_line(worlds):
    caught = worlds["refusals"][0]
    assert set(caught) == {"cache", "mask", "keyword"}, caught
    assert all("\n" not in why for why in caught.values())
    assert "use_cache=False" in caught["cache"] and "padding attention_mask" in caught["mask"]
    assert "Mamba2Mixer passed ['seq_idx']" in caught["keyword"], caught["keyword"]
