"""Which transformers model families seqpar runs exactly under sequence parallelism, and which it refuses.

One table, read by ``patch_model`` (``check_model``), the recipe validator (``refusal_for_config``) and the
docs (``docs/models.md`` is ``families_markdown()``, checked by a test), as the attention registry is read
for primitives. Each ``Family`` says which token mixers its classes have, the seam seqpar patches for each,
what is refused and why, and the loss terms that see the whole sequence.

The rule it enforces: a model is exact under SP or refused with one line, on every rank, before any
communication. Everything that mixes tokens must be sharded by seqpar: softmax attention dispatched through
``transformers.AttentionInterface`` is (``seqpar.models.patch``); recurrences, state-space scans, short
convolutions, key indexers and positions computed from local lengths are not (yet), so a family that has
one is refused naming the module class. Only sharding breaks them: on one device (SP size 1) ``patch_model``
skips the table, and every model runs as it would unpatched. A model type absent from the table is refused
too (transformers adds families faster than anyone can check them); ``register_family`` declares one after
checking it.

Supported model types are those ``tests/test_model_families.py`` finds exact at SP = 2 (loss and every
parameter gradient against the unpatched model on the whole sequence) when built tiny from their own
config; that test fails if the table and the sweep disagree. A supported family can still refuse a call at
run time (``seqpar.models.patch``: dropout, masks, softcap, a sliding window or chunk the chosen primitive
cannot apply, any attention keyword it does not implement). Sliding windows are exact: the window a layer
passes to its attention call, or the one its family keeps only in transformers' mask (``MASK_WINDOWS``),
is handed to the primitive.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

__all__ = ["FAMILIES", "MASK_WINDOWS", "SEAM_LAYOUTS", "Family", "check_model", "families_markdown",
           "family_of", "hybrid_model_types", "layout_for", "linear_primitive_refusal", "mask_window",
           "refusal_for_config", "register_family", "seam_layouts", "shortest_window"]


@dataclass(frozen=True)
class Family:
    """One row of the table. ``refused`` is empty for a supported family, else the reason (one clause)."""

    name: str
    model_types: tuple[str, ...]
    mixers: str  # the token mixers of its classes
    seam: str  # what seqpar runs for them (or "-" when refused)
    refused: str = ""
    fix: str = ""  # what the user can do instead of a refused family
    loss_terms: str = ""  # loss terms over the whole sequence and how they are handled
    # module classes the mixer scan would flag that seqpar shards itself (Linear-Llama's LASP-2 layers) or
    # that do not mix text tokens (audio towers with a Conv1d); matched as class-name prefixes
    exempt: tuple[str, ...] = ()
    # (module class, seam) pairs seqpar shards itself outside the attention registry (``seqpar.models.hybrid``);
    # their subtrees are exempt from the mixer scan, and ``patch_model`` installs the seam in each
    linear: tuple[tuple[str, str], ...] = ()
    sinks: bool = False  # its attention passes learned per-head sink logits (``s_aux``): primitives need "sinks"

    @property
    def supported(self) -> bool:
        return not self.refused


_REGISTRY_SEAM = "`seqpar_attention_forward` registered in `AttentionInterface`"
_ROUTER = ("MoE router load-balancing loss (`output_router_logits=True`) over local tokens differs from the "
           "whole-sequence value: refused; with it off (the default) the loss is the LM loss only")
_NEXT = ("not supported under sequence parallelism yet; run it on one device per sequence "
         "(patch_model(..., parallel=None))")

FAMILIES: list[Family] = [
    Family("dense decoders", (
        "apertus", "apertus1p5_text", "arcee", "beam", "biogpt", "bitnet", "codegen", "cohere", "cohere2",
        "ctrl", "cwm", "dory", "emu3", "ernie4_5", "exaone", "exaone4", "fuyu", "gemma", "gemma3",
        "gemma3_text", "gemma4_unified", "gemma4_unified_text", "glm", "glm4", "gpt-sw3", "gpt2",
        "gpt_bigcode", "gpt_neox", "gptj", "granite", "helium", "hrm_text", "hunyuan_v1_dense", "hyperclovax",
        "internlm3", "iquestcoder", "jais2", "kolibri1", "llama", "mellum", "ministral", "ministral3",
        "mistral", "mllama", "mllama_text_model", "emu3_text_model", "modernbert-decoder", "moshi",
        "moss_transcribe_diarize", "nanochat", "nemotron",
        "olmo", "olmo2", "olmo3", "opt", "persimmon", "phi", "phi3", "phi4_multimodal", "qwen2", "qwen3",
        "seed_oss", "smollm3", "stablelm", "starcoder2", "whisper"),
        "softmax attention (causal, RoPE or learned absolute positions from global position_ids); sliding "
        "windows per layer (Mistral, Qwen2/3, Gemma 3, Cohere2...)", _REGISTRY_SEAM + "; a layer's "
        "`sliding_window` goes to the primitive as `window=` (s2 and sf refuse windows shorter than the sequence)",
        loss_terms="none", exempt=("Phi4MultimodalAudio", "MossTranscribeDiarizeAudio", "WhisperEncoder")),
    Family("MoE decoders", (
        "afmoe", "aria_text", "cohere2_moe", "dots1", "ergo", "ernie4_5_moe", "exaone_moe", "flex_olmo", "glm4_moe",
        "granitemoe", "granitemoeshared", "hunyuan_v1_moe", "hy_v3", "jetmoe", "laguna", "llama4",
        "llama4_text", "minicpm5_moe", "minimax_m2", "minimax_m3_vl_text", "mixtral", "olmoe", "param2moe",
        "phimoe", "qwen2_moe", "qwen3_moe", "sarvam_moe", "solar_open"),
        "softmax attention, sliding windows, Llama 4's chunked attention; token-choice MoE MLPs (per token, no "
        "mixing)", _REGISTRY_SEAM + "; windows kept only in the mask (Phi-MoE, Qwen2-MoE) and Llama 4's chunks "
        "are read from `MASK_WINDOWS`; chunks run as documents (ring, allgather, full; the others refuse them)",
        loss_terms=_ROUTER),
    Family("multi-head latent attention", (
        "deepseek_v2", "deepseek_v3", "minicpm3", "sarvam_mla", "youtu", "axk1"),
        "MLA (latent K/V, q/k head dim != v head dim) through the attention registry; MoE MLPs",
        _REGISTRY_SEAM, loss_terms=_ROUTER),
    Family("Linear-Llama", ("linear_llama",), "linear attention (LASP-2), softmax layers of its hybrid",
           "`LinearLlamaForCausalLM.set_sequence_parallel` (LASP-2 / LASP-2H)", loss_terms="none",
           exempt=("LinearAttention",)),
    Family("Gated DeltaNet hybrids", ("qwen3_next", "qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text",
                                      "olmo_hybrid", "lara_mini"),
           "`*GatedDeltaNet` (causal conv1d + gated delta rule) and gated softmax attention",
           "conv1d: `seqpar.attention.short_conv` (halo of K-1 inputs); gated delta rule: "
           "`seqpar.attention.gated_delta` (LASP-2, one all-gather of affine state maps), both through the "
           "modeling module's `causal_conv1d_fn` / `torch_chunk_gated_delta_rule`; softmax layers: "
           + _REGISTRY_SEAM + "; contiguous or zigzag layout (one for every layer)", loss_terms=_ROUTER,
           linear=(("Qwen3NextGatedDeltaNet", "gated_delta"), ("Qwen3_5GatedDeltaNet", "gated_delta"),
                   ("Qwen3_5MoeGatedDeltaNet", "gated_delta"), ("OlmoHybridGatedDeltaNet", "gated_delta"),
                   ("LaraMiniGatedDeltaNet", "gated_delta"))),
    Family("other delta-rule hybrids", ("bailing_hybrid",),
           "`BailingHybridDeltaAttention` (causal conv1d + its own delta rule, no `torch_chunk_gated_delta_rule`)",
           "-", "its delta-rule layers would run on each shard from a zero state and zero conv history (seqpar's "
           "Gated DeltaNet seam is transformers' `torch_chunk_gated_delta_rule`, which this model does not call)",
           _NEXT, _ROUTER),
    Family("Lightning Attention hybrids", ("minimax",), "`MiniMaxLightningAttention` and softmax attention",
           "Lightning Attention: the layer's forward, its block loop replaced by "
           "`seqpar.attention.lasp2.lasp2_linear_attention` (one all-gather of states); softmax layers: "
           + _REGISTRY_SEAM + "; contiguous or zigzag layout (one for every layer); packed documents reset the "
           "state at each start", loss_terms=_ROUTER, linear=(("MiniMaxLightningAttention", "lightning"),)),
    Family("Kimi Delta Attention hybrids", ("kimi_linear",), "`KimiLinearDeltaAttention` (KDA, short conv) and MLA",
           "conv1d: `seqpar.attention.short_conv` (halo of K-1 inputs); KDA: `seqpar.attention.gated_delta` with a "
           "decay per key channel (LASP-2, one all-gather of affine state maps), both through the modeling "
           "module's `causal_conv1d_forward` / `chunk_kimi_delta_attention`; MLA softmax layers: "
           + _REGISTRY_SEAM + "; contiguous or zigzag layout (one for every layer)", loss_terms=_ROUTER,
           exempt=("KimiLinearAttention",),  # MLA (its name matches "LinearAttention"): through the registry
           linear=(("KimiLinearDeltaAttention", "kimi_delta"),)),
    Family("Mamba2 models and hybrids", ("mamba2", "bamba", "nemotron_h", "falcon_h1", "granitemoehybrid"),
           "Mamba2 mixers (conv1d + SSD scan, gated RMSNorm) and, in hybrids, softmax attention",
           "Mamba2 mixers: their modeling module's `causal_conv1d_fn` (`seqpar.attention.short_conv`: K-1 halo) and "
           "`mamba2_chunk_scan` (`seqpar.attention.ssd.ssd_scan`: one all-gather of per-rank affine maps); softmax "
           "layers: " + _REGISTRY_SEAM + "; contiguous layout; packed documents reset the state and conv history "
           "at each start", loss_terms=_ROUTER, exempt=("Mamba2Block",),  # Mamba2's block: a norm and the mixer
           linear=(("Mamba2Mixer", "ssd"), ("BambaMixer", "ssd"), ("NemotronHMamba2Mixer", "ssd"),
                   ("FalconH1Mixer", "ssd"), ("GraniteMoeHybridMambaLayer", "ssd"))),
    Family("Mamba (selective scan) models", ("mamba", "falcon_mamba"),
           "Mamba v1 mixers (conv1d + selective scan, gated; Falcon-Mamba: RMS norms on B, C and Δ)",
           "their modeling module's `causal_conv1d_forward` (`seqpar.attention.short_conv`: K-1 halo) and "
           "`mamba_scan_forward` (`seqpar.attention.selective_scan`: one all-gather of per-rank elementwise affine "
           "maps); contiguous layout; packed documents reset the state and conv history at each start",
           loss_terms="none", exempt=("MambaBlock", "FalconMambaBlock"),  # a norm and the mixer
           linear=(("MambaMixer", "selective"), ("FalconMambaMixer", "selective"))),
    Family("state-space models and Mamba hybrids", ("jamba", "zamba", "zamba2"),
        "Mamba / Mamba2 mixers (conv1d + selective scan) and, in hybrids, softmax attention", "-",
        "its Mamba layers would scan each shard from a zero state and zero conv history", _NEXT, _ROUTER),
    Family("other recurrent and convolutional mixers", (
        "recurrent_gemma", "xlstm", "rwkv", "lfm2", "lfm2_moe", "lfm3", "zaya", "inkling_text",
        "inkling2_text", "inkling2_loop_text"),
        "RG-LRU, xLSTM, RWKV time mixing, short convolutions (LFM2/3, Inkling), Zaya's CCA conv", "-",
        "its recurrent or convolutional token mixers would run on each shard without the previous shard's "
        "state", _NEXT),
    Family("learned attention sinks", ("gpt_oss", "flint", "granite_swa", "granitemoe_swa", "mimo_v2_flash"),
           "softmax attention with a learned per-head sink logit (`s_aux`) and sliding windows",
           _REGISTRY_SEAM + "; `s_aux` merged into each row's log-sum-exp by ring, allgather, ulysses, usp and "
           "full (s2, sf and rsa refuse it); windows as for dense decoders", loss_terms=_ROUTER, sinks=True),
    Family("sparse and compressed attention", ("deepseek_v32", "deepseek_v4", "glm_moe_dsa", "axk2", "hy_v4",
                                               "dots3_note", "dots3_note_text", "kolibri1_1"),
           "a key indexer (DSA top-k) or compressed K/V chosen from the local shard", "-",
           "its indexer / KV compressor would select keys from the local shard only", _NEXT, _ROUTER),
    Family("softcapped attention", ("gemma2", "vaultgemma"), "softmax attention with logit softcapping", "-",
           "attention logit softcapping is not implemented by seqpar's primitives", _NEXT),
    Family("decoders of encoder-decoder models", (
        "bart", "mbart", "marian", "pegasus", "blenderbot", "blenderbot-small", "plbart", "bigbird_pegasus",
        "mvp", "prophetnet", "trocr", "xglm"),
        "softmax attention with positions computed from the local input length", "-",
        "its positions are computed from the local input length, not the global position_ids", _NEXT),
    Family("encoders used as decoders", (
        "bert", "bert-generation", "camembert", "data2vec-text", "electra", "ernie", "roberta",
        "roberta-prelayernorm", "roc_bert", "xlm-roberta", "xlm-roberta-xl", "xmod", "megatron-bert",
        "rembert", "roformer", "big_bird", "xlm", "reformer", "xlnet", "git", "cpmant"),
        "BERT-style self-attention (bidirectional unless is_decoder), own masks", "-",
        "it is an encoder-style model whose masks and positions seqpar does not shard", _NEXT),
    Family("own attention code", ("bloom", "falcon", "gpt_neo", "gpt_neox_japanese", "mpt", "openai-gpt",
                                  "got_ocr2", "doge", "diffllama", "longcat_flash", "blt", "gemma3n",
                                  "gemma3n_text", "gemma4", "gemma4_text", "gemma4_assistant",
                                  "gemma4_unified_assistant", "musicgen", "musicgen_melody", "dbrx",
                                  "cohere_compass_text", "qwen4_exp", "qwen4_exp_text", "glm4_moe_lite"),
           "attention that bypasses or extends the attention registry (ALiBi, dynamic masks, differential "
           "attention, KV sharing across layers), or a family seqpar's sweep could not build tiny", "-",
           "its attention is not verified exact under seqpar (it bypasses the registry, adds terms seqpar "
           "drops, or was not buildable in seqpar's sweep)", _NEXT),
]

_BY_TYPE: dict[str, Family] = {}


def _index() -> None:
    _BY_TYPE.clear()
    for fam in FAMILIES:
        for t in fam.model_types:
            if t in _BY_TYPE:
                raise ValueError(f"model_type {t!r} is in two families: {_BY_TYPE[t].name!r} and {fam.name!r}")
            _BY_TYPE[t] = fam


_index()

# Module classes that mix tokens and that seqpar does not shard: a match anywhere in a model refuses it,
# whatever its family says (a config can switch a mixer on), unless its family lists it as not a text mixer.
_MIXER = re.compile(r"Mamba|Mixer|DeltaNet|DeltaAttention|Lightning|Recurrent|Rglru|Rwkv|xLSTM|ShortConv|"
                    r"ShortConvolution|Indexer|Compressor|LinearAttention")
_NOT_MIXER = re.compile(r"Norm|Embedding|MLP|Rotary|FeedForward|Expert|Router|Moe|MoE|DecoderLayer")  # per token,
# or (DecoderLayer) a container whose mixers are matched themselves


def family_of(model_type: str | None) -> Family | None:
    """The family of ``model_type``, or None when the table does not know it."""
    return _BY_TYPE.get(model_type or "")


def hybrid_model_types() -> tuple[str, ...]:
    """Model types whose linear-attention layers seqpar shards itself (``Family.linear``): hybrids."""
    return tuple(t for fam in FAMILIES if fam.linear for t in fam.model_types)



# The layouts each seam of ``seqpar.models.hybrid`` runs exactly in (its primitives take ``layout=``); a seam
# not listed runs the contiguous layout only. A hybrid runs one layout for all its layers: one its seams share.
SEAM_LAYOUTS: dict[str, tuple[str, ...]] = {"gated_delta": ("contiguous", "zigzag"),
                                            "kimi_delta": ("contiguous", "zigzag"),
                                            "lightning": ("contiguous", "zigzag")}


def seam_layouts(seams) -> tuple[str, ...]:
    """The layouts every seam of ``seams`` (``Family.linear`` pairs) runs in, contiguous first."""
    return tuple(x for x in ("contiguous", "zigzag")
                 if all(x in SEAM_LAYOUTS.get(s, ("contiguous",)) for _, s in seams))


def _typed_layers(layer_type: str, attr: str, kind: str):
    """Rule: ``config.<attr>`` as a ``kind`` ("window" or "chunk") on the layers ``config.layer_types`` marks
    ``layer_type`` (Qwen2-MoE's sliding layers, Llama 4's chunked ones)."""

    def rule(config, layer_idx) -> tuple[str, int] | None:
        types = getattr(config, "layer_types", None) or ()
        size = getattr(config, attr, None)
        if size and layer_idx is not None and layer_idx < len(types) and types[layer_idx] == layer_type:
            return kind, int(size)
        return None

    return rule


def _every_layer(config, layer_idx) -> tuple[str, int] | None:
    """``config.sliding_window`` on every layer (Phi-MoE: None is no window)."""
    window = getattr(config, "sliding_window", None)
    return ("window", int(window)) if window else None


# Families whose window lives only in transformers' MASK (``create_sliding_window_causal_mask`` /
# ``create_chunked_causal_mask``), not in the attention call: seqpar's attention name makes transformers build
# no mask, so ``patch_model`` reads the window from here at call time (module.config, module.layer_idx) and
# applies it as a passed one. Found by reading every modeling file that builds such a mask and checking that
# its attention call passes ``sliding_window=`` (transformers 5.x); the sweep engages them (window 24, chunk 16).
MASK_WINDOWS = {"phimoe": _every_layer,
                "qwen2_moe": _typed_layers("sliding_attention", "sliding_window", "window"),
                "llama4_text": _typed_layers("chunked_attention", "attention_chunk_size", "chunk")}


def mask_window(config, layer_idx: int | None) -> tuple[str, int] | None:
    """``("window", w)`` or ``("chunk", c)`` a layer of ``config`` gets from its mask only (``MASK_WINDOWS``)."""
    rule = MASK_WINDOWS.get(getattr(config, "model_type", None) or "")
    return None if rule is None else rule(config, layer_idx)


def shortest_window(config) -> tuple[str, int] | None:
    """The shortest window or chunk any layer of ``config`` (or its text config) applies, or None: what the
    recipe validator checks before launch (``patch_model`` checks each layer's own at run time)."""
    configs = [config] + [c for c in vars(config).values() if hasattr(c, "to_dict") and hasattr(c, "model_type")]
    found = []
    for cfg in configs:
        layers = range(getattr(cfg, "num_hidden_layers", 0) or 0)
        if (getattr(cfg, "model_type", None) or "") in MASK_WINDOWS:
            found += [w for i in layers if (w := mask_window(cfg, i)) is not None]
            continue
        window, types = getattr(cfg, "sliding_window", None), getattr(cfg, "layer_types", None)
        if isinstance(window, int) and window > 0 and (types is None or "sliding_attention" in types):
            found.append(("window", window))
    return min(found, key=lambda w: w[1]) if found else None


def linear_primitive_refusal(model_type: str | None, fits: tuple[str, ...]) -> str | None:
    """Why a linear-attention primitive (``attention="lasp2"``) is refused for ``model_type``: a hybrid's linear
    layers always run LASP-2 and ``attention`` names its softmax layers' primitive (``fits``); None otherwise."""
    fam = family_of(model_type)
    if fam is None or not fam.linear:
        return None
    return (f"model_type={model_type!r}: its linear-attention layers always run LASP-2; attention names the primitive "
            f"of its softmax layers: pick one of {fits} ('allgather' is LASP-2H)")


def layout_for(model_type: str | None, layout: str | None) -> str | None:
    """The layout a model type runs with: a hybrid's ``layout`` if all its seams run it (``SEAM_LAYOUTS``; its
    linear layers fold their pieces' states in global chunk order), contiguous for None (the softmax primitive's
    own default does not apply: one layout serves every layer); any other model keeps ``layout`` (None = the
    primitive's default)."""
    fam = family_of(model_type)
    if fam is None or not fam.linear:
        return layout
    fits = seam_layouts(fam.linear)
    if layout is not None and layout not in fits:
        raise ValueError(f"layout={layout!r} with model_type={model_type!r}: its linear layers run in the "
                         f"{' or '.join(fits)} layout only; pass layout={fits[0]!r} or leave it None")
    return "contiguous" if layout is None else layout


def register_family(family: Family) -> None:
    """Declare a family (e.g. a remote-code model) after checking it is exact under SP, as the sweep does."""
    taken = {t: _BY_TYPE[t].name for t in family.model_types if t in _BY_TYPE}
    if taken:
        raise ValueError(f"model types {taken} are already in the table: register a family for new types only")
    FAMILIES.append(family)
    _BY_TYPE.update(dict.fromkeys(family.model_types, family))


def refusal_for_config(config) -> str | None:
    """Why a model with this config is refused (one line), or None; what can be known without building it."""
    model_type = getattr(config, "model_type", None)
    fam = family_of(model_type)
    if fam is None:
        return (f"model_type={model_type!r} is not in seqpar's model-family table (seqpar.models.families), so "
                "seqpar cannot tell whether all its token mixers are sharded: check it as "
                "tests/test_model_families.py does, then declare it with seqpar.models.families.register_family")
    if fam.refused:
        return f"model_type={model_type!r} ({fam.name}): {fam.refused}; {fam.fix}"
    configs = [config] + [c for c in vars(config).values() if hasattr(c, "to_dict") and hasattr(c, "model_type")]
    if any(getattr(c, "output_router_logits", False) for c in configs):
        return (f"model_type={model_type!r} with output_router_logits=True: the MoE load-balancing loss would be "
                "computed over each rank's tokens, not the whole sequence; set model.config.output_router_logits "
                "= False")
    return None


def check_model(model: torch.nn.Module, config) -> Family:
    """Refuse ``model`` (one-line ValueError naming the module class) unless seqpar runs it exactly under SP.

    Deterministic and local (the table, the config and the module classes), so every rank refuses the same
    model before any communication.
    """
    cls = type(model).__name__
    why = refusal_for_config(config)
    fam = family_of(getattr(config, "model_type", None))
    mixer = _unsharded_mixer(model, fam)
    if why is not None:
        named = f", e.g. {mixer}" if mixer else ""
        raise ValueError(f"{cls} is refused by seqpar{named}: {why}")
    if mixer is not None:
        raise ValueError(f"{cls} has a token mixer seqpar does not shard ({mixer}): it would run on each shard "
                         f"alone; {_NEXT}")
    return fam


def _unsharded_mixer(model: torch.nn.Module, fam: Family | None) -> str | None:
    """The class of the first module that mixes tokens outside the attention function, or None.

    The deepest match of the first matching subtree is named (``Qwen3NextGatedDeltaNet``, not its decoder
    layer); a bare ``Conv1d`` counts only outside a named mixer, and is named with its owner's class.
    """
    from transformers import PreTrainedModel

    skip = (*fam.exempt, *(cls for cls, _ in fam.linear)) if fam else ()
    skipped: list[str] = []  # module names under an exempt class (audio towers, Linear-Llama's LASP-2 layers)
    found, found_kind = None, ""  # name and class of the deepest match so far, in the first matching subtree
    for name, module in model.named_modules():
        kind = type(module).__name__
        if found is not None and not name.startswith(found + "."):
            break  # left the first mixer's subtree
        if any(name.startswith(p + ".") for p in skipped):
            continue
        if any(kind.startswith(s) for s in skip):
            skipped.append(name)
        elif isinstance(module, PreTrainedModel):
            continue
        elif _MIXER.search(kind) and not _NOT_MIXER.search(kind):
            found, found_kind = name, kind
        elif isinstance(module, torch.nn.Conv1d) and found is None:
            owner, _, attr = name.rpartition(".")
            return f"{type(model.get_submodule(owner)).__name__}.{attr} (Conv1d)"
    return None if found is None else found_kind


def families_markdown() -> str:
    """The table as Markdown (``docs/models.md`` holds exactly this between its markers)."""
    rows = ["| family | model types | token mixers | seqpar runs them with | refused because | whole-sequence "
            "loss terms |", "|---|---|---|---|---|---|"]
    for fam in FAMILIES:
        types = ", ".join(f"`{t}`" for t in fam.model_types)
        rows.append(f"| {fam.name} | {types} | {fam.mixers} | {fam.seam} | {fam.refused or 'supported'} | "
                    f"{fam.loss_terms or '-'} |")
    return "\n".join(rows) + "\n"
