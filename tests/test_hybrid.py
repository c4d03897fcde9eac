"""Hybrid linear/softmax models under SP: Qwen3-Next, Qwen3.5, OLMo-hybrid (Gated DeltaNet), Kimi Linear (Kimi
Delta Attention, MLA) and MiniMax (Lightning Attention), patched in place, exact at SP = 1..4, packed and unpacked.

The chain of references: seqpar's chunked gated delta rule and short conv equal float64 token-by-token
recurrences (``seqpar.kernels.reference``) on one device (here) and on W ranks (outputs and every input gradient,
bytes: tests/test_conformance.py, from ``registry.MIXERS``);
each model patched on W ranks equals the same model patched on one process on the whole sequence (float64,
loss and every parameter gradient summed over SP, rel 1e-9), in the contiguous layout and in the zigzag
layout (ring attention balanced; the linear layers fold 2N maps), packed and unpacked;
that one-process run equals the unpatched model (to float32 rounding: transformers' own delta rule computes in
float32 whatever the model dtype, and every RMSNorm casts to float32); float32 SP runs equal the unpatched
model (1e-5); bfloat16 SP runs are within 2e-3 of the float32 loss and within 3x of what bfloat16 costs the
unpatched model. Zeroing the cross-rank entry state or the conv halo changes the loss (the exchange is engaged).
"""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from tests.dist import run_ranks

L = 48  # divisible by 1..4 and 6; >= 3 conv-history tokens per rank
GDN = ("qwen3_next", "qwen3_5_text", "qwen3_5_moe_text", "olmo_hybrid", "kimi_linear")  # kimi: KDA
# an empty document, boundaries inside shards and pieces and at shard edges (24: contiguous at W = 2, 4; a zigzag
# chunk edge at W = 2, 3, 4)
PACKED = torch.tensor([0, 5, 5, 19, 24, 31, L])
ZIGZAG = (*GDN, "minimax")  # also run in the zigzag layout (two pieces per rank)


def _model(model_type: str, dtype: torch.dtype):
    """The tiny model in ``dtype`` with weights large enough that every layer matters (std 0.08)."""
    from transformers import AutoModelForCausalLM

    from tests.causal_lm_zoo import tiny_config

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # buffers (MiniMax's decay tables) computed in dtype, as a dtype model's are
    try:
        torch.manual_seed(0)
        cfg = tiny_config(model_type)
        for c in [cfg] + [v for v in vars(cfg).values() if hasattr(v, "model_type")]:
            c._experts_implementation = "eager"  # the grouped MoE matmul takes no float64
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=dtype)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0.0, 0.08)
    return model.train()


def _run(model, group, packed: bool):
    """Loss and parameter gradients (summed over the group) of one step on a fixed batch."""
    from seqpar.models import patched_layout, shard_batch, sp_cross_entropy

    ids = torch.randint(0, 128, (2, L), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, **({"cu_seqlens": PACKED} if packed else {})}
    layout = patched_layout(model) if hasattr(model, "_seqpar_patch") else "contiguous"
    sp = shard_batch(batch, group, layout)
    labels = sp.pop("labels")
    if not hasattr(model, "_seqpar_patch"):
        sp.pop("cu_seqlens", None)
    model.zero_grad(set_to_none=True)
    loss = sp_cross_entropy(model(**sp, use_cache=False).logits, labels, group)
    loss.backward()
    return loss.item(), summed_grads(model, group)


def summed_grads(model, group) -> dict:
    """Every parameter's gradient summed over the SP group (each rank holds its tokens' share): one all-reduce."""
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    if group is not None and dist.get_world_size(group) > 1:
        flat = torch.cat([g.reshape(-1) for g in grads.values()])
        dist.all_reduce(flat, group=group)
        grads = dict(zip(grads, (f.view_as(g) for f, g in zip(flat.split([g.numel() for g in grads.values()]),
                                                              grads.values()))))
    return grads


# parameters the models cast with .float() whatever their dtype (Kimi Linear: its router's float32 logits,
# mlp.gate.weight, and its forget gate's dt_bias too)
_F32_IN_MODEL = ("A_log", "norm.weight", "dt_bias", "mlp.gate.weight")


def _err(a, b) -> float:
    """Max relative error of the loss and every parameter gradient. Gradients of the parameters the models
    compute in float32 whatever their dtype (``A_log.float().exp()``, Qwen3's ``1 + weight.float()`` norms,
    Kimi Linear's router and gate bias)
    sum float32 terms, 1e-7 apart between any two summation orders, patched or not: they count at 1e-3 of
    their error (so 1e-6 passes the 1e-9 bound), every other gradient in full."""
    (la, ga), (lb, gb) = a, b
    assert ga.keys() == gb.keys()
    worst = max(((ga[n] - gb[n]).norm() / gb[n].norm().clamp_min(1e-12)).item()
                * (1e-3 if n.endswith(_F32_IN_MODEL) and ga[n].dtype == torch.float64 else 1.0) for n in gb)
    return max(abs(la - lb) / abs(lb), worst)


def _cases(rank: int, world: int, group) -> dict:
    import warnings

    import seqpar.attention.gated_delta as gated_delta
    import seqpar.attention.lasp2 as lasp2
    import seqpar.attention.short_conv as short_conv
    from seqpar.models import patch_model, unpatch_model

    warnings.simplefilter("ignore")
    out = {}
    for model_type in (*GDN, "minimax"):
        for packed in (False, True):
            model = _model(model_type, torch.float64)
            patch_model(model, "full", None)
            ref = _run(model, None, packed)
            unpatch_model(model)
            attention = "allgather" if model_type == "qwen3_5_text" else "ring"  # LASP-2H for one of them
            patch_model(model, attention, group)
            got = _run(model, group, packed)
            out[model_type, packed, "f64"] = _err(got, ref)
            if world > 1 and not packed:  # the exchange is engaged: without it the loss changes
                saved = (gated_delta.entry_states, None, lasp2.prefix_from_states)
                if model_type == "minimax":
                    lasp2.prefix_from_states = lambda states, *a: torch.zeros_like(states[0])
                    out[model_type, "no state"] = _err(_run(model, group, packed), ref)
                else:
                    gated_delta.entry_states = lambda M, U, *a: torch.zeros_like(U)
                    out[model_type, "no state"] = _err(_run(model, group, packed), ref)
                    gated_delta.entry_states = saved[0]
                    short_conv._Halo.apply = lambda tail, group: torch.zeros_like(tail)
                    out[model_type, "no halo"] = _err(_run(model, group, packed), ref)
                gated_delta.entry_states, lasp2.prefix_from_states = saved[0], saved[2]
                vars(short_conv._Halo).get("apply") and delattr(short_conv._Halo, "apply")  # back to Function's
            if model_type in ZIGZAG:  # the zigzag layout: ring attention balanced, the linear layers fold 2N maps
                patch_model(model, "ring", group, layout="zigzag")
                out[model_type, packed, "zigzag", "f64"] = _err(_run(model, group, packed), ref)
            unpatch_model(model)
        if world == 2:  # float32 against the unpatched model on the whole sequence
            model = _model(model_type, torch.float32)
            ref = _run(model, None, False)
            patch_model(model, "ring", group)
            got = _run(model, group, False)
            out[model_type, "f32 loss"] = abs(got[0] - ref[0]) / ref[0]
            out[model_type, "f32"] = _err(got, ref)
            # bfloat16 weights (states and sums stay float32): the loss at SP = 2 against the float32 model,
            # and what bfloat16 costs the unpatched model on one process (measured <= 6.1e-4 and 7.7e-4)
            half = _run(_model(model_type, torch.float32).to(torch.bfloat16), None, False)
            out[model_type, "bf16 unpatched"] = abs(half[0] - ref[0]) / ref[0]
            model = _model(model_type, torch.float32).to(torch.bfloat16)
            patch_model(model, "ring", group)
            out[model_type, "bf16"] = abs(_run(model, group, False)[0] - ref[0]) / ref[0]
    return out


def _worlds(rank: int, world: int, group) -> dict:
    """One spawn of 4 ranks for every world size (each rank costs seconds of imports): W = 4 on the world; then
    W = 2 on the sub-group {0, 1} while {2, 3} runs the refusals at W = 2 (a pair whose group ranks are not its
    global ranks, as under DP x SP); then W = 3 on {0, 1, 2}."""
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group, in order
    # rank 2 reaches W = 3 before ranks 0 and 1 are done with W = 2: its first collective waits for them
    trio = dist.new_group([0, 1, 2], timeout=timedelta(seconds=600))
    out = {world: _cases(rank, world, group)}
    if rank < 2:
        out[2] = _cases(rank, 2, pairs[0])
    else:
        out["refusals"] = _refusals(rank - 2, 2, pairs[1])
    if rank < 3:
        out[3] = _cases(rank, 3, trio)
    return out


@pytest.fixture(scope="module")
def multi() -> dict:
    per_rank = run_ranks(_worlds, 4, timeout=600)
    found = {w: [r[w] for r in per_rank if w in r] for w in (2, 3, 4)}
    assert {w: len(r) for w, r in found.items()} == {2: 2, 3: 3, 4: 4}, "a world size did not run on every rank"
    return {**found, "refusals": [r["refusals"] for r in per_rank if "refusals" in r]}


@pytest.mark.parametrize("world", [2, 3, 4])
def test_hybrids_are_exact_on_w_ranks(multi, world):
    ranks = multi[world]
    for key, err in ranks[0].items():
        assert all(r[key] == err for r in ranks), key  # every rank measured the same loss and summed gradients
        if key[-1] == "f64":
            assert err <= 1e-9, (world, key, err)
        elif key[-1] == "f32 loss":
            assert err <= 1e-5, (world, key, err)
        elif key[-1] == "f32":  # gradients: the sweep's float32 bound (the delta rule's solve amplifies 1e-7)
            assert err <= 2e-3, (world, key, err)
        elif key[-1] == "bf16":  # bfloat16 at SP = 2: 2e-3 of the float32 loss, and no worse than 3x (plus
            # 1e-4) what bfloat16 costs the unpatched model on one process
            assert err <= min(2e-3, 3 * ranks[0][key[0], "bf16 unpatched"] + 1e-4), (world, key, err)
        elif key[-1] == "bf16 unpatched":
            continue
        else:  # state or halo forced to zero: the result moves far beyond rounding
            assert err >= 1e-4, (world, key, err)
    assert {k[0] for k in ranks[0] if k[-1] == "no state"} == {*GDN, "minimax"}
    assert {k[:2] for k in ranks[0] if k[-2:] == ("zigzag", "f64")} == {(m, p) for m in ZIGZAG for p in (False, True)}


@pytest.mark.parametrize("model_type", [*GDN, "minimax"])
def test_one_device_patch_equals_the_unpatched_model(model_type):
    """The patched model on one process (seqpar's kernels, packed documents honoured) is the reference above:
    it equals the unpatched model to float32 rounding, and packed documents do change it (resets applied)."""
    model = _model(model_type, torch.float64)
    patched = patch_equals_unpatched(model, _run)
    assert abs(_run(model, None, True)[0] - patched[0]) > 1e-4


def patch_equals_unpatched(model, run) -> tuple:
    """Patch ``model`` on one process ("full") and check that ``run(model, None, False)`` (loss, gradients) equals
    the unpatched model's to float32 noise (transformers' delta rule and scans are float32; every model's RMSNorm
    casts to float32, where 1e-16 input differences flip roundings): the loss, and each gradient against the
    largest gradient's norm. Returns the patched run."""
    from seqpar.models import patch_model

    plain = run(model, None, False)
    patch_model(model, "full", None)
    patched = run(model, None, False)
    scale = max(g.norm() for g in plain[1].values())
    assert abs(patched[0] - plain[0]) / plain[0] <= 1e-6
    assert max((patched[1][n] - g).norm() / scale for n, g in plain[1].items()) <= 1e-5
    return patched


def test_packed_documents_equal_each_document_alone(model_type="minimax"):
    """One packed row through the patched MiniMax on one device: each document's logits equal the same model
    (patched, and unpatched to float32 rounding) run on that document alone: no state, conv history or
    attention crosses a document start. Together with the W-rank runs above (packed, 1e-9 against this one)
    that is the sharded model exact against each document alone."""
    from seqpar.models import patch_model, shard_batch, unpatch_model

    model = _model(model_type, torch.float64)
    ids = torch.randint(0, 128, (2, L), generator=torch.Generator().manual_seed(1))
    patch_model(model, "full", None)
    sp = shard_batch({"input_ids": ids, "cu_seqlens": PACKED}, None, "contiguous")
    sp.pop("labels")
    with torch.no_grad():
        packed = model(**sp, use_cache=False).logits
        docs = [(a, b) for a, b in zip(PACKED.tolist(), PACKED.tolist()[1:]) if b > a]
        alone = torch.cat([model(input_ids=ids[:, a:b], use_cache=False).logits for a, b in docs], dim=1)
        unpatch_model(model)
        plain = torch.cat([model(input_ids=ids[:, a:b], use_cache=False).logits for a, b in docs], dim=1)
    scale = alone.abs().max()
    assert (packed - alone).abs().max() / scale < 1e-12
    assert (packed - plain).abs().max() / scale < 1e-5  # transformers' float32 parts (see above)


def test_gated_delta_and_conv_kernels_equal_the_token_recurrence():
    """Kernels on one process vs the float64 references, with packed documents and GQA-style value heads;
    transformers' own float32 function agrees to float32 rounding."""
    from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule

    from seqpar.attention.gated_delta import gated_delta_rule
    from seqpar.attention.short_conv import causal_conv1d
    from seqpar.kernels.reference import causal_conv_reference, gated_delta_reference

    torch.manual_seed(0)
    q, k = torch.randn(2, 2, 50, 2, 8, dtype=torch.float64).unbind(0)
    v = torch.randn(2, 50, 4, 8, dtype=torch.float64)
    g, beta = -torch.rand(2, 50, 4, dtype=torch.float64), torch.rand(2, 50, 4, dtype=torch.float64)
    for cu in (None, torch.tensor([0, 7, 30, 30, 50])):
        ref = gated_delta_reference(q, k, v, g, beta, cu_seqlens=cu)
        assert (gated_delta_rule(q, k, v, g, beta, cu_seqlens=cu, chunk_size=16) - ref).abs().max() < 1e-12
        x, w = torch.randn(2, 12, 50, dtype=torch.float64), torch.randn(12, 4, dtype=torch.float64)
        y = causal_conv1d(x, w, None, "silu", cu_seqlens=cu)
        assert (y - causal_conv_reference(x, w, cu_seqlens=cu)).abs().max() < 1e-12
    hf, _ = torch_chunk_gated_delta_rule(q.float(), k.float(), v.float(), g.float(), beta.float(),
                                         use_qk_l2norm_in_kernel=True)
    assert (hf.double() - gated_delta_reference(q, k, v, g, beta)).abs().max() < 1e-5
    # Kimi Delta Attention: a decay per key channel (heads not grouped, as Kimi Linear's), strong enough that
    # e^{-γ} would overflow float64 over a chunk if the kernel factored it (it takes γ_t - γ_s pairwise)
    from transformers.models.kimi_linear.modeling_kimi_linear import chunk_kimi_delta_attention

    v = torch.randn(2, 50, 2, 8, dtype=torch.float64)
    g, beta = -20 * torch.rand(2, 50, 2, 8, dtype=torch.float64), beta[:, :, :2]
    for cu in (None, torch.tensor([0, 7, 30, 30, 50])):
        ref = gated_delta_reference(q, k, v, g, beta, cu_seqlens=cu)
        for chunk in (16, 64):  # one diagonal block per chunk, and blocks below the diagonal (16 tokens each)
            assert (gated_delta_rule(q, k, v, g, beta, cu_seqlens=cu, chunk_size=chunk) - ref).abs().max() < 1e-12
    hf, _ = chunk_kimi_delta_attention(q.float(), k.float(), v.float(), g.float(), beta.float(),
                                       use_qk_l2norm_in_kernel=True)
    ref = gated_delta_reference(q, k, v, g, beta)
    assert (hf.double() - ref).abs().max() < 1e-5
    assert (gated_delta_reference(q, k, v, g.mean(-1), beta) - ref).abs().max() > 1e-2  # per channel: engaged


def _refusals(rank: int, world: int, group) -> dict:
    from seqpar.models import patch_model, shard_batch

    model = _model("qwen3_next", torch.float32)
    caught = {}
    for name, call in {
        "lasp2": lambda: patch_model(model, "lasp2", group),
    }.items():
        try:
            call()
        except ValueError as err:
            caught[name] = str(err)
    patch_model(model, "ring", group)
    sp = shard_batch({"input_ids": torch.zeros(1, L, dtype=torch.long)}, group, "contiguous")
    sp.pop("labels")
    try:
        model(**sp, use_cache=True)
    except ValueError as err:
        caught["cache"] = str(err)
    try:  # a keyword the seams do not implement reaches the first (Gated DeltaNet) layer
        model(**sp, use_cache=False, seq_idx=torch.zeros(1, L // world, dtype=torch.int32))
    except ValueError as err:
        caught["keyword"] = str(err)
    return caught


def test_what_the_seams_do_not_implement_is_refused_in_one_line(multi):
    assert len(multi["refusals"]) == 2  # both ranks of the pair refused (a rank that did not would have hung)
    caught = multi["refusals"][0]
    assert set(caught) == {"lasp2", "cache", "keyword"}, caught  # zigzag is a layout they run (above)
    assert all("\n" not in why for why in caught.values())
    assert "'allgather' is LASP-2H" in caught["lasp2"]
    assert "use_cache=False" in caught["cache"]
    assert "Qwen3NextGatedDeltaNet passed ['seq_idx']" in caught["keyword"], caught["keyword"]
