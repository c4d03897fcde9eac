"""Sliding windows and chunked attention under sequence parallelism (issue 24): exact, engaged, or refused.

Mistral (every layer windowed), Qwen2, Qwen3 and gpt-oss (sliding and full layers; gpt-oss with learned
sinks) are built tiny with a 12-token window on 48 tokens and patched at SP = 1, 2, 3, 4 (one spawn of 4
ranks, ``tests.sp_harness.spawn_worlds``) with ring, ulysses (where the 4 heads split) and allgather on
packed documents. The reference is the UNPATCHED model: transformers' own attention and masks on the whole
sequence (float64 through ``sdpa``, since eager attention takes its softmax in float32; gpt-oss in float32,
its MoE does not run in float64) or, packed, each document run alone. Engaged: the same SP run with the
window removed (4096), or with gpt-oss's sinks zeroed, changes the loss, and ``attention_calls`` counts the
windowed layer calls. One device: KV-cache decoding past the window; the families whose window lives only
in the mask (``seqpar.models.families.MASK_WINDOWS``: Phi-MoE, Qwen2-MoE, Llama 4's chunks); the refusals.
"""

from __future__ import annotations

import functools
from functools import partial

import pytest
import torch

from tests.sp_harness import spawn_worlds

VOCAB, L, WINDOW = 128, 48, 12
DOC_LENS = [10, 22, 16]  # the 22- and 16-token documents are longer than the window
SP_MODELS = ("mistral", "qwen2", "qwen3", "gpt_oss")
# float64: only summation order differs from transformers' attention; float32 (gpt-oss): 1e-5 of the scale
TOL = {torch.float64: 1e-9, torch.float32: 1e-5}
ENGAGED = 1e-6  # a loss change larger than this shows a window (or sinks) at work


def _config(name: str, window: int = WINDOW):
    from transformers import AutoConfig

    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=256,
                  attention_dropout=0.0, tie_word_embeddings=False, sliding_window=window)
    if name == "mistral":  # Mistral passes config.sliding_window on every layer
        return AutoConfig.for_model("mistral", **common)
    layers = {"layer_types": ["sliding_attention", "full_attention"]}
    if name == "gpt_oss":
        return AutoConfig.for_model("gpt_oss", num_local_experts=4, num_experts_per_tok=2, **layers, **common)
    return AutoConfig.for_model(name, use_sliding_window=True, **layers, **common)


def _dtype(name: str) -> torch.dtype:
    return torch.float32 if name == "gpt_oss" else torch.float64


def _build(name: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(11)
    impl = "eager" if name == "gpt_oss" else "sdpa"  # gpt-oss's sinks run in its eager attention
    model = AutoModelForCausalLM.from_config(_config(name), attn_implementation=impl, dtype=_dtype(name))
    with torch.no_grad():  # trained-size sink logits (initialised near 0, they would barely move the loss)
        for module in model.modules():
            if isinstance(getattr(module, "sinks", None), torch.nn.Parameter):
                module.sinks.normal_(0.0, 2.0)
    return model.train()


def _set_window(model, window: int) -> None:
    """Change the window everywhere transformers reads it: the config (masks, Mistral) and each layer."""
    model.config.sliding_window = window
    for module in model.modules():
        if getattr(module, "sliding_window", None) is not None:
            module.sliding_window = window


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, L), generator=torch.Generator().manual_seed(7))


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _unpatched(model, ids: torch.Tensor) -> tuple[float, dict]:
    """transformers' own attention and masks on the whole sequence; the loss in the model's dtype (HF's own
    loss upcasts float64 logits to float32)."""
    from seqpar.models import shard_batch, sp_cross_entropy

    labels = shard_batch({"input_ids": ids}, None, "contiguous")["labels"]
    model.zero_grad(set_to_none=True)
    loss = sp_cross_entropy(model(input_ids=ids, use_cache=False).logits, labels, None)
    loss.backward()
    return loss.item(), _grads(model)


def _unpatched_docs(model, ids: torch.Tensor) -> tuple[float, dict]:
    """Every document of the packed row run alone: sum of token losses / number of targets."""
    from seqpar.models import shard_batch, sp_cross_entropy

    model.zero_grad(set_to_none=True)
    targets, start, total = sum(n - 1 for n in DOC_LENS), 0, 0.0
    for n in DOC_LENS:
        doc = ids[:, start : start + n]
        labels = shard_batch({"input_ids": doc}, None, "contiguous")["labels"]
        loss = sp_cross_entropy(model(input_ids=doc, use_cache=False).logits, labels, None) * (n - 1) / targets
        loss.backward()
        total, start = total + loss.item(), start + n
    return total, _grads(model)


def _patched(model, attention: str, group, batch: dict) -> tuple[float, dict, dict]:
    """The patched model on this rank's shard (test_patch_models' step: gradients summed over the SP group)
    and the attention calls it ran."""
    from tests.test_patch_models import _sp_step

    calls: dict = {}
    loss, grads = _sp_step(model, attention, group, None, batch, calls=calls)
    return loss, grads, calls


def _errors(got: tuple, ref: tuple[float, dict]) -> dict:
    """Loss relative error, the worst parameter's max |grad error| / max |reference grad|, the calls."""
    (loss, grads, calls), (ref_loss, ref_grads) = got, ref
    assert grads.keys() == ref_grads.keys(), "different parameters received gradients"
    worst = max(((grads[n] - ref_grads[n]).abs().max() / ref_grads[n].abs().max().clamp_min(1e-30)).item()
                for n in ref_grads)
    return {"loss": abs(loss - ref_loss) / abs(ref_loss), "grad": worst, "value": loss, "calls": calls}


@functools.cache
def _references(name: str) -> tuple:
    """Per process: the unpatched model's (loss, grads) on the batch and on the packed documents."""
    model = _build(name)
    ids = _ids()
    return _unpatched(model, ids), _unpatched_docs(model, ids[:1])


def _world_checks(rank: int, world: int, group) -> dict:
    """Every SP model x attention at this world size (``group`` None: one device)."""
    import warnings

    warnings.simplefilter("ignore")
    out = {}
    ids = _ids()
    attentions = ["ring"] + (["ulysses"] if 4 % world == 0 else [])  # Ulysses splits the 4 query heads
    for name in SP_MODELS:
        model = _build(name)
        whole, docs = _references(name)
        for attention in attentions:
            out[name, attention] = _errors(_patched(model, attention, group, {"input_ids": ids}), whole)
        packed = {"input_ids": ids[:1], "seq_lens": DOC_LENS}
        out[name, "allgather", "packed"] = _errors(_patched(model, "allgather", group, packed), docs)
        _set_window(model, 4096)  # engaged: the window removed changes the loss
        out[name, "no window"] = _patched(model, "ring", group, {"input_ids": ids})[0]
        _set_window(model, WINDOW)
        if name == "gpt_oss":  # engaged: the learned sinks zeroed change the loss
            with torch.no_grad():
                for layer in model.model.layers:
                    layer.self_attn.sinks.zero_()
            out[name, "no sinks"] = _patched(model, "ring", group, {"input_ids": ids})[0]
    return out


@pytest.fixture(scope="module")
def worlds() -> dict:
    return spawn_worlds(partial(_world_checks))


@pytest.mark.parametrize("world", [1, 2, 3, 4], ids=lambda w: f"SP{w}")
def test_windowed_models_match_unpatched_at_every_sp_size(worlds, world):
    results = worlds[world]
    cases = {k for k in results[0] if isinstance(results[0][k], dict)}
    want = {(m, a) for m in SP_MODELS for a in ("ring", "ulysses") if a == "ring" or 4 % world == 0}
    assert cases == want | {(m, "allgather", "packed") for m in SP_MODELS}, cases  # every case ran
    for key in cases:
        tol = TOL[_dtype(key[0])]
        for rank, r in enumerate(results):
            err = r[key]
            assert err["loss"] <= tol and err["grad"] <= tol, (world, rank, key, err)
            assert err["value"] == results[0][key]["value"], "loss differs across ranks"
            windowed_layers = 2 if key[0] == "mistral" else 1
            assert err["calls"].get("window") == windowed_layers, (key, err["calls"])  # the window ran


@pytest.mark.parametrize("world", [1, 2, 3, 4], ids=lambda w: f"SP{w}")
def test_window_and_sinks_are_engaged(worlds, world):
    for r in worlds[world]:
        for name in SP_MODELS:
            assert abs(r[name, "no window"] - r[name, "ring"]["value"]) > ENGAGED, (world, name)
        assert abs(r["gpt_oss", "no sinks"] - r["gpt_oss", "ring"]["value"]) > ENGAGED, world


# ---------------------------------------------------------------------------------------------- one device


def _logits_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("name", ["mistral", "gpt_oss"])
def test_kv_cache_decoding_past_the_window_equals_unpatched(name):
    """A 10-token prompt, a 5-token chunk, then single tokens to position 30 (window 12): every step's logits
    equal the unpatched model's, with a cache that keeps every key (the window applied to the keys held) and
    with transformers' sliding cache (it keeps the window's last keys)."""
    from transformers import DynamicCache

    from seqpar.models import attention_calls, patch_model, unpatch_model

    model = _build(name).eval()
    ids = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(3))
    steps = [(0, 10), (10, 15), *((t, t + 1) for t in range(15, 30))]
    for cache in (lambda: DynamicCache(), lambda: DynamicCache(config=model.config)):
        runs = []
        for patched in (False, True):
            if patched:
                patch_model(model, "full", None)
            past, logits = cache(), []
            with torch.no_grad():
                for a, b in steps:
                    out = model(ids[:, a:b], cache=past, use_cache=True,
                                position_ids=torch.arange(a, b)[None])
                    past, logits = out.past_key_values, [*logits, out.logits]
            runs.append(torch.cat(logits, 1))
            if patched:
                calls = attention_calls(model)
                unpatch_model(model)
        assert _logits_err(runs[1], runs[0]) <= TOL[_dtype(name)], (name, _logits_err(runs[1], runs[0]))
        assert calls.get("window", 0) > 0, calls  # the window was applied on the decoding path


def _tiny(model_type: str):
    from tests.causal_lm_zoo import build

    return build(model_type)  # float32, eager, window 24 and chunk 16 where the config has them


def _one_device(model, ids, docs: bool = False) -> tuple[tuple, tuple]:
    """(patched "full" on one device, unpatched) loss and gradients."""
    batch = {"input_ids": ids, "seq_lens": DOC_LENS} if docs else {"input_ids": ids}
    ref = (_unpatched_docs if docs else _unpatched)(model, ids)
    return _patched(model, "full", None, batch), ref


@pytest.mark.parametrize(("model_type", "kind", "docs"), [
    ("phimoe", "window", False), ("qwen2_moe", "window", False), ("llama4_text", "chunk", False),
    ("llama4_text", "chunk", True)])
def test_mask_only_windows_are_applied(model_type, kind, docs):
    """Families whose window lives only in transformers' mask: the patched model (which builds no mask) reads
    it from ``MASK_WINDOWS`` and equals the unpatched model; removing the window or chunk changes the loss."""
    from seqpar.models.families import MASK_WINDOWS

    assert model_type in MASK_WINDOWS
    model = _tiny(model_type)
    ids = _ids()[:1]
    got, ref = _one_device(model, ids, docs)
    err = _errors(got, ref)
    assert err["loss"] <= TOL[torch.float32] and err["grad"] <= 1e-4, (model_type, err)
    assert err["calls"].get(kind, 0) > 0, err["calls"]
    setattr(model.config, "attention_chunk_size" if kind == "chunk" else "sliding_window", 4096)
    assert abs(_unpatched(model, ids)[0] - ref[0]) > ENGAGED  # the 24-token window / 16-token chunk mattered


def test_windows_and_chunks_the_primitive_cannot_run_are_refused_in_one_line():
    from seqpar.models import patch_model, unpatch_model

    ids = _ids()[:1]
    model = _build("mistral")
    patch_model(model, "s2", None, group_size=16)  # training: shifted groups, no window
    with pytest.raises(ValueError, match=r"attention='s2' does not implement sliding windows \(MistralAttention"
                                         r" has a window of 12 tokens") as err:
        model(input_ids=ids, use_cache=False)
    assert "\n" not in str(err.value) and "'ring'" in str(err.value)
    unpatch_model(model)
    llama4 = _tiny("llama4_text")
    patch_model(llama4, "ulysses", None)
    with pytest.raises(ValueError, match=r"attention='ulysses' cannot run chunked attention \(Llama4TextAttention "
                                         r"attends inside chunks of 16 tokens") as err:
        llama4(input_ids=ids, use_cache=False)
    assert "\n" not in str(err.value) and "'ring'" in str(err.value)
    unpatch_model(llama4)
    from transformers import DynamicCache

    patch_model(llama4.eval(), "full", None)
    with torch.no_grad(), pytest.raises(ValueError, match="chunks of 16 tokens and the KV cache reaches") as err:
        past = llama4(input_ids=ids[:, :12], cache=DynamicCache(), use_cache=True).past_key_values
        llama4(input_ids=ids[:, 12:20], cache=past, use_cache=True, position_ids=torch.arange(12, 20)[None])
    assert "\n" not in str(err.value)
    unpatch_model(llama4)
