"""Every causal LM class of the installed transformers is exact under SP = 2 or refused in one line.

The sweep builds each class of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` tiny from its own config
(``tests/causal_lm_zoo.py``; 24-token sliding windows and 16-token attention chunks wherever the config has
them, so a dropped window shows as wrong), runs it unpatched on the whole 64-token sequence (eager attention)
and patched with ring attention on two gloo ranks (``shard_batch`` shards, ``sp_cross_entropy``, parameter gradients
summed over the ranks), and sorts it into: exact (loss and every gradient within float32 tolerance),
refused (a one-line ``ValueError`` from ``patch_model`` or the patched forward, on both ranks), or
unbuildable (its tiny config does not build or its unpatched forward fails; listed by name). Accepted and
wrong is the failure this test exists for. The family table (``seqpar.models.families``) must agree with the
sweep: every model type it calls supported is exact here, every one it refuses is refused.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.dist import run_ranks

L, TOL = 64, 2e-4


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _one_line(err: Exception) -> str:
    return f"{type(err).__name__}: {err}"


def _sweep_one(model_type: str, group, world: int) -> dict:
    from seqpar.models import attention_calls, patch_model, patched_layout, shard_batch, sp_cross_entropy, unpatch_model
    from tests.causal_lm_zoo import VOCAB, Unbuildable, build

    try:
        model = build(model_type)
    except Unbuildable as err:
        return {"kind": "unbuildable", "why": str(err)}
    try:  # refused at patch time: nothing to run (and no collective was issued)
        patch_model(model, "ring", group)
    except ValueError as err:
        return {"kind": "refused", "why": str(err), "at": "patch"}
    unpatch_model(model)
    ids = torch.randint(0, VOCAB, (1, L), generator=torch.Generator().manual_seed(3))
    whole = shard_batch({"input_ids": ids}, None, "contiguous")
    try:
        loss = sp_cross_entropy(model(input_ids=ids, use_cache=False).logits, whole["labels"], None)
        loss.backward()
        ref = (loss.item(), _grads(model))
    except Exception as err:  # the class's own forward fails on its tiny config
        return {"kind": "unbuildable", "why": f"unpatched forward: {_one_line(err)}"}
    model.zero_grad(set_to_none=True)
    patch_model(model, "ring", group)
    try:
        sp = shard_batch({"input_ids": ids}, group, patched_layout(model))
        labels = sp.pop("labels")
        loss = sp_cross_entropy(model(**sp, use_cache=False).logits, labels, group)
        loss.backward()
        calls = attention_calls(model)  # "window" / "chunk": layer calls that applied one
    except ValueError as err:
        return {"kind": "refused", "why": str(err), "at": "forward"}
    except Exception as err:  # a patched forward that breaks (not a refusal) is a failure
        return {"kind": "error", "why": _one_line(err)}
    finally:
        if hasattr(model, "_seqpar_patch"):
            unpatch_model(model)
    grads = _grads(model)
    flat = torch.cat([g.reshape(-1) for g in grads.values()])
    dist.all_reduce(flat, group=group)
    sums = dict(zip(grads, (p.view_as(g) for p, g in zip(flat.split([g.numel() for g in grads.values()]),
                                                          grads.values()))))
    ref_loss, ref_grads = ref
    if sums.keys() != ref_grads.keys():
        return {"kind": "wrong", "why": "different parameters received gradients"}
    # each gradient's error relative to its norm, floored at 1e-3 of the largest: a parameter whose gradient is
    # tiny (Gated DeltaNet's A_log, through float32 casts in the model) measures float32 noise, not its error
    floor = 1e-3 * max(g.norm() for g in ref_grads.values())
    worst = max((((sums[n] - ref_grads[n]).norm() / ref_grads[n].norm().clamp_min(floor)).item(), n)
                for n in ref_grads)
    err = abs(loss.item() - ref_loss) / abs(ref_loss)
    kind = "exact" if err <= TOL and worst[0] <= 1e-3 else "wrong"
    return {"kind": kind, "loss": err, "grad": worst[0], "param": worst[1], "calls": calls}


def _sweep_ranks(rank: int, world: int, group, model_types: list[str]) -> dict:
    import warnings

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    return {t: _sweep_one(t, group, world) for t in model_types}


@pytest.fixture(scope="module")
def sweep() -> dict:
    from tests.causal_lm_zoo import causal_lm_types

    types = causal_lm_types()
    ranks = run_ranks(_sweep_ranks, 2, args=(types,), timeout=600)
    for t in types:  # both ranks agree on every verdict (an error on one rank only would hang the next call)
        assert ranks[0][t]["kind"] == ranks[1][t]["kind"], (t, ranks[0][t], ranks[1][t])
    return ranks[0]


def test_no_causal_lm_is_accepted_and_wrong(sweep):
    wrong = {t: r for t, r in sweep.items() if r["kind"] in ("wrong", "error")}
    assert not wrong, wrong
    exact = [r for r in sweep.values() if r["kind"] == "exact"]
    assert len(exact) >= 90, len(exact)  # the sweep ran real comparisons, not only refusals
    assert max(r["loss"] for r in exact) <= TOL and max(r["grad"] for r in exact) <= 1e-3


def test_family_table_agrees_with_the_sweep(sweep):
    """Supported in the table <=> exact here; refused in the table <=> refused by patch_model, in one line."""
    from seqpar.models.families import family_of

    unknown = sorted(t for t in sweep if family_of(t) is None)
    assert not unknown, f"installed causal LMs missing from seqpar.models.families: {unknown}"
    for t, r in sweep.items():
        fam = family_of(t)
        if fam.supported:
            assert r["kind"] == "exact", (t, fam.name, r)
        else:
            assert r["kind"] in ("refused", "unbuildable"), (t, fam.name, r)
            if r["kind"] == "refused":
                assert r["at"] == "patch" and "\n" not in r["why"] and fam.refused in r["why"], (t, r)


def test_windows_and_chunks_are_engaged(sweep):
    """The tiny configs carry 24-token windows and 16-token chunks (``tests/causal_lm_zoo.py``) on 64 tokens:
    the windowed families are exact with the window applied, the mask-only ones included (MASK_WINDOWS)."""
    from seqpar.models.families import MASK_WINDOWS

    windowed = {t: "window" for t in ("mistral", "qwen2", "qwen3", "gemma3_text", "gpt_oss", "cohere2", "olmo3",
                                      "phimoe", "qwen2_moe")}
    for t, kind in {**windowed, "llama4_text": "chunk"}.items():
        assert sweep[t]["kind"] == "exact" and sweep[t]["calls"].get(kind, 0) > 0, (t, sweep[t])
    assert {"phimoe", "qwen2_moe", "llama4_text"} <= set(MASK_WINDOWS)


def test_refusals_name_the_module_class(sweep):
    """The hybrids the issue names: the error names the mixer class seqpar does not shard."""
    for t, name in {"zamba": "ZambaMambaMixer", "zamba2": "Zamba2MambaMixer", "jamba": "JambaMambaMixer",
                    "recurrent_gemma": "RecurrentGemma"}.items():
        assert sweep[t]["kind"] == "refused" and name in sweep[t]["why"], (t, sweep[t])
    for t in ("qwen3_next", "qwen3_5_text", "qwen3_5_moe_text", "olmo_hybrid", "minimax", "kimi_linear",  # LASP-2
              "mamba2", "bamba", "nemotron_h", "falcon_h1", "granitemoehybrid",  # the Mamba2 (SSD) ones
              "mamba", "falcon_mamba"):  # and the Mamba (selective scan) ones
        assert sweep[t]["kind"] == "exact", (t, sweep[t])
    for t in ("gpt_oss", "flint", "granite_swa", "granitemoe_swa"):  # learned sinks: exact, and their
        assert sweep[t]["kind"] == "exact", (t, sweep[t])  # gradients reached the sinks (same parameter set)
    for t in ("bart", "mbart", "marian", "pegasus", "blenderbot-small"):
        assert "local input length" in sweep[t]["why"], (t, sweep[t])


# ---------------------------------------------------------------------------------------------- one process


def _tiny(model_type: str, **overrides):
    from tests.causal_lm_zoo import build

    model = build(model_type)
    for key, value in overrides.items():
        setattr(model.config, key, value)
    return model


def test_unknown_types_injected_mixers_and_router_loss_are_refused():
    """What patch_model checks on an SP group of N > 1 (``check_model``; the sweep shows it runs there)."""
    from seqpar.models import families
    from seqpar.models.families import FAMILIES, Family, check_model, family_of, register_family

    model = _tiny("llama")
    model.model.layers[0].mlp.extra_conv = torch.nn.Conv1d(4, 4, 3)  # a config-enabled conv, say
    with pytest.raises(ValueError, match=r"LlamaMLP\.extra_conv \(Conv1d\)"):
        check_model(model, model.config)
    del model.model.layers[0].mlp.extra_conv
    assert check_model(model, model.config).name == "dense decoders"  # the same model without it: accepted
    model.config.model_type = "my_remote_llama"
    with pytest.raises(ValueError, match=r"not in seqpar's model-family table.*register_family"):
        check_model(model, model.config)
    register_family(Family("checked remote code", ("my_remote_llama",), "softmax attention", "registry"))
    try:
        assert check_model(model, model.config).name == "checked remote code"
        with pytest.raises(ValueError, match="already in the table"):
            register_family(Family("again", ("llama", "my_other_llama"), "-", "-"))
        assert family_of("llama").name == "dense decoders" and family_of("my_other_llama") is None
    finally:
        FAMILIES[:] = [f for f in FAMILIES if f.name != "checked remote code"]
        families._index()
    assert family_of("my_remote_llama") is None
    moe = _tiny("mixtral", output_router_logits=True)
    with pytest.raises(ValueError, match="output_router_logits=True"):
        check_model(moe, moe.config)
    moe.config.output_router_logits = False
    check_model(moe, moe.config)


def test_refused_family_runs_unsharded_on_one_device():
    """The refusals' advice holds: with parallel=None a refused hybrid (LFM2: short convolutions seqpar does not
    shard, and softmax attention) patches (its softmax layers run seqpar's local kernel) and equals the unpatched
    model, loss and every gradient."""
    from seqpar.models import attention_calls, patch_model, shard_batch, sp_cross_entropy, unpatch_model
    from tests.causal_lm_zoo import VOCAB

    model = _tiny("lfm2")
    ids = torch.randint(0, VOCAB, (1, L), generator=torch.Generator().manual_seed(5))
    labels = shard_batch({"input_ids": ids}, None, "contiguous")["labels"]
    runs = []
    for patched in (False, True):
        if patched:
            patch_model(model, "full", None)
        model.zero_grad(set_to_none=True)
        loss = sp_cross_entropy(model(input_ids=ids, use_cache=False).logits, labels, None)
        loss.backward()
        runs.append((loss.item(), _grads(model)))
        if patched:
            assert attention_calls(model).get("full", 0) > 0  # the patch is engaged
            unpatch_model(model)
    (ref, ref_g), (got, got_g) = runs
    assert abs(got - ref) / ref <= 1e-6
    worst = max(((got_g[n] - ref_g[n]).norm() / ref_g[n].norm().clamp_min(1e-6)).item() for n in ref_g)
    assert worst <= 1e-3, worst  # the sweep's float32 bound


@pytest.mark.parametrize("keyword", ["sinks", "position_bias", "cu_seq_lens_q", "some_new_keyword"])
def test_attention_keywords_are_used_or_refused(keyword):
    """A keyword of the attention call that seqpar does not implement is refused, never dropped."""
    from transformers import AttentionInterface

    from seqpar.models import patch_model, unpatch_model

    model = _tiny("llama")
    patch_model(model, "full", None)
    try:
        fn = AttentionInterface._global_mapping[model.config._attn_implementation]
        q = torch.randn(1, 4, 8, 16)
        layer = model.model.layers[0].self_attn
        out, _ = fn(layer, q, q[:, :2], q[:, :2], None, scaling=0.25, position_ids=torch.arange(8)[None])
        assert out.shape == (1, 8, 4, 16)  # the inert keywords pass
        with pytest.raises(ValueError, match=keyword) as err:
            fn(layer, q, q[:, :2], q[:, :2], None, scaling=0.25, **{keyword: torch.zeros(4)})
        assert "\n" not in str(err.value)
    finally:
        unpatch_model(model)


def test_docs_list_the_family_table():
    from pathlib import Path

    from seqpar.models.families import families_markdown

    doc = (Path(__file__).parents[1] / "docs" / "models.md").read_text()
    assert families_markdown() in doc, "docs/models.md is stale: paste seqpar.models.families.families_markdown()"


def test_sinks_are_used_not_dropped():
    """gpt-oss's ``s_aux`` reaches the primitive: the output equals dense attention with one extra logit per
    head, differs from the output without it, and a primitive without sinks refuses it."""
    from transformers import AttentionInterface

    from seqpar.kernels.reference import causal_mask, dense_attention
    from seqpar.models import patch_model, unpatch_model

    model = _tiny("llama")
    q, k = torch.randn(1, 4, 8, 16, dtype=torch.float64), torch.randn(1, 2, 8, 16, dtype=torch.float64)
    sinks = 2 * torch.randn(4, dtype=torch.float64)
    layer = model.model.layers[0].self_attn
    patch_model(model, "full", None)
    try:
        fn = AttentionInterface._global_mapping[model.config._attn_implementation]
        plain, _ = fn(layer, q, k, k, None, scaling=0.25)
        got, _ = fn(layer, q, k, k, None, scaling=0.25, s_aux=sinks)
    finally:
        unpatch_model(model)
    want = dense_attention(q.transpose(1, 2), k.transpose(1, 2), k.transpose(1, 2), causal_mask(8, 8), scale=0.25,
                           sinks=sinks)[0]
    assert (got - want).abs().max() < 1e-12 and (plain - want).abs().max() > 1e-3
    model.train()
    patch_model(model, "s2", None, group_size=4)
    try:
        fn = AttentionInterface._global_mapping[model.config._attn_implementation]
        with pytest.raises(ValueError, match=r"attention='s2' does not implement learned attention sinks"):
            fn(layer, q, k, k, None, scaling=0.25, s_aux=sinks)
    finally:
        unpatch_model(model)
