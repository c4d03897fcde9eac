"""The table of seqpar attentions: one entry per name a user can pick (``patch_model``, recipes, ``seqpar bench``).

Each ``AttentionSpec`` says where the primitive lives, which sequence layouts it accepts and which one it uses
by default, whether it takes packed documents (``cu_seqlens``), which attention runs in ``eval()`` mode
(LongLoRA's S2/SF are training-time only), which SP sub-groups ``patch_model`` must create for it, and which
models it runs in (softmax models through transformers' attention registry; linear-attention models through
their own ``set_sequence_parallel``). ``call`` maps one transformers attention call onto the primitive.

For the conformance tests (tests/test_conformance.py) a spec also names the keyword arguments the primitive
takes (``options``), the float64 definition it computes (``reference``, in ``seqpar/kernels/reference.py``),
the formula of the bytes it sends (``comm_bytes``, next to the primitive, as its docstring states it), the
sub-groups it needs made (``make_subgroups``) and, for Ulysses-style head splits, which group's size must
divide the heads (``heads_split``). ``options`` also says which layer features ``patch_model`` may hand the
primitive through ``call``: ``"sinks"`` (learned per-head sink logits, gpt-oss) and ``"window"`` (a sliding
window, Mistral/Gemma/gpt-oss layers: query p sees keys ``p - window < k <= p``); a model layer that needs one
the spec lacks is refused.

Adding a primitive: write ``seqpar/attention/<name>.py`` (one function ``q, k, v [B, L/N, H, D] -> out``, exact
backward, errors raised on every rank, and a ``<name>_bytes`` function giving the forward and backward bytes
its docstring states), export it from ``seqpar.attention`` and add one ``AttentionSpec`` below. ``patch_model``,
the recipe validator, the trainer, ``seqpar bench``, the model-level tests (tests/test_patch_models.py) and the
conformance tests (exactness vs float64 at W = 1..4, bytes vs the formula, errors raised on every rank) pick it
up from here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

LAYOUTS = ("zigzag", "contiguous")


@dataclass(frozen=True)
class AttentionSpec:
    """One seqpar attention: where it lives and what it supports."""

    name: str
    primitive: str  # "seqpar.attention.<module>:<function>", imported lazily
    layouts: tuple[str, ...]  # layouts it runs exactly in; the first is the default
    varlen: bool = False  # takes global document boundaries ``cu_seqlens`` (packed sequences)
    eval_fallback: str | None = None  # the attention used when the model is in eval() mode
    subgroups: tuple[str, ...] = ()  # SP sub-groups patch_model creates (usp: Ulysses x ring)
    models: str = "softmax"  # "softmax": transformers models; "linear": seqpar's Linear-Llama (and hybrid)
    # (patch, q, k, v, scale, cu_seqlens, validate=, sinks=, window=) -> out [B, L/N, H, D]; validate: the
    # primitive's cross-rank shape check (patch_model runs it at the first layer of a forward only); sinks, window:
    # the layer's learned sink logits and sliding window (None: none), given only where ``options`` lists them
    call: Callable[..., torch.Tensor] | None = None
    why_layout: str = ""  # why the layouts are restricted (said in the error)
    # keyword arguments the primitive takes besides q, k, v and group ("sinks": learned per-head sink logits;
    # "window": transformers' sliding window, query p sees keys p - window < k <= p)
    options: tuple[str, ...] = ("causal", "softmax_scale", "layout", "validate")
    reference: str = "seqpar.kernels.reference:softmax_reference"  # the float64 definition it computes
    # (q, k, v, *, group, **options) -> (forward, backward) bytes this rank sends: the docstring's formula
    comm_bytes: str = ""
    # (group, kv_heads) -> the sub-group keyword arguments (made once per group; usp: Ulysses x ring)
    make_subgroups: str = ""
    # the argument whose group size must divide the query heads (Ulysses' all-to-all splits the heads)
    heads_split: str | None = None

    @property
    def default_layout(self) -> str:
        return self.layouts[0]

    def load(self, what: str = "primitive") -> Callable:
        """The primitive function, or another ``"module:function"`` field (imported on first use)."""
        module, name = getattr(self, what).split(":")
        return getattr(importlib.import_module(module), name)


def _softmax_call(spec_name: str) -> Callable:
    """Causal call of a softmax primitive with the patch's group and layout (varlen ones get cu_seqlens; sinks
    and a sliding window are passed when given)."""

    def call(patch: Any, q, k, v, scale, cu_seqlens, validate: bool = True, sinks=None,
             window: int | None = None) -> torch.Tensor:
        spec = ATTENTIONS[spec_name]
        extra = {"cu_seqlens": cu_seqlens} if spec.varlen else {}
        if sinks is not None:  # patch_model refuses sinks for a primitive without the option
            extra["sinks"] = sinks
        if window is not None:  # likewise a window
            extra["window"] = window
        if "ulysses" in spec.subgroups:
            extra.update(ulysses_group=patch.ulysses_group, ring_group=patch.ring_group)
        return spec.load()(q, k, v, group=patch.group, causal=True, softmax_scale=scale, layout=patch.layout,
                           validate=validate, **extra)

    return call


def _shifted_call(patch: Any, q, k, v, scale, cu_seqlens, validate: bool = True, sinks=None,
                  window: int | None = None) -> torch.Tensor:
    """S2/SF: shift groups of size ``patch.shift_size(L)`` (L global); they take neither sinks nor a window."""
    spec = ATTENTIONS[patch.attention]
    for option, value in (("sinks", sinks), ("window", window)):
        if value is not None:
            raise ValueError(f"{option}= is given but attention={patch.attention!r} (shifted groups) takes no "
                             f"{option}: use one of {[n for n, s in ATTENTIONS.items() if option in s.options]}")
    size = patch.shift_size(q.shape[1] * _world(patch.group))
    extra = {"num_sink_tokens": patch.num_sink_tokens} if patch.attention == "sf" else {"wrap": patch.s2_wrap}
    return spec.load()(q, k, v, group_size=size, group=patch.group, softmax_scale=scale, validate=validate,
                       **extra)


def _full_call(patch: Any, q, k, v, scale, cu_seqlens, validate: bool = True, sinks=None,
               window: int | None = None) -> torch.Tensor:
    """Exact causal attention: the local kernel on one device, ring attention over an SP group."""
    if _world(patch.group) == 1:
        from seqpar.attention.local import local_attention

        return local_attention(q, k, v, scale, cu_seqlens=cu_seqlens, sinks=sinks, window=window)
    return _softmax_call("ring")(patch, q, k, v, scale, cu_seqlens, validate, sinks, window)


def _world(group) -> int:
    from seqpar.comm import group_size

    return group_size(group)


_SHIFT_WHY = "shifted-group attention needs the contiguous layout (its groups are runs of consecutive tokens)"
_VARLEN = ("causal", "softmax_scale", "layout", "cu_seqlens", "validate", "sinks", "window")
_HEADS = ("causal", "softmax_scale", "layout", "validate", "sinks", "window")  # Ulysses, USP: no packed documents
_SHIFTED = "seqpar.kernels.reference:shifted_reference"
ATTENTIONS: dict[str, AttentionSpec] = {s.name: s for s in (
    AttentionSpec("ring", "seqpar.attention.ring:ring_attention", LAYOUTS, varlen=True, call=_softmax_call("ring"),
                  options=_VARLEN, comm_bytes="seqpar.attention.ring:ring_bytes"),
    AttentionSpec("rsa", "seqpar.attention.rsa:ring_self_attention", ("contiguous",), call=_softmax_call("rsa"),
                  why_layout="ring self-attention (Li et al. 2021) runs the contiguous layout only",
                  options=("causal", "softmax_scale", "layout", "validate", "window"),
                  comm_bytes="seqpar.attention.rsa:rsa_bytes"),
    AttentionSpec("ulysses", "seqpar.attention.ulysses:ulysses_attention", ("contiguous", "zigzag"),
                  call=_softmax_call("ulysses"), comm_bytes="seqpar.attention.ulysses:ulysses_bytes", options=_HEADS,
                  heads_split="group"),
    AttentionSpec("usp", "seqpar.attention.usp:usp_attention", LAYOUTS, subgroups=("ulysses", "ring"),
                  call=_softmax_call("usp"), comm_bytes="seqpar.attention.usp:usp_bytes", options=_HEADS,
                  make_subgroups="seqpar.attention.usp:usp_subgroups", heads_split="ulysses_group"),
    AttentionSpec("allgather", "seqpar.attention.allgather:allgather_attention", LAYOUTS, varlen=True,
                  call=_softmax_call("allgather"), options=_VARLEN,
                  comm_bytes="seqpar.attention.allgather:allgather_bytes"),
    AttentionSpec("s2", "seqpar.attention.shift_short:shift_short_attention", ("contiguous",),
                  eval_fallback="full", call=_shifted_call, why_layout=_SHIFT_WHY,
                  options=("group_size", "wrap", "softmax_scale", "validate"), reference=_SHIFTED,
                  comm_bytes="seqpar.attention.shift_short:shift_short_bytes"),
    AttentionSpec("sf", "seqpar.attention.sink_shift:sink_shift_attention", ("contiguous",),
                  eval_fallback="full", call=_shifted_call, why_layout=_SHIFT_WHY,
                  options=("group_size", "num_sink_tokens", "softmax_scale", "validate"), reference=_SHIFTED,
                  comm_bytes="seqpar.attention.sink_shift:sink_shift_bytes"),
    AttentionSpec("full", "seqpar.attention.ring:ring_attention", LAYOUTS, varlen=True, call=_full_call,
                  options=_VARLEN, comm_bytes="seqpar.attention.ring:ring_bytes"),
    AttentionSpec("lasp2", "seqpar.attention.lasp2:lasp2_linear_attention", ("contiguous",), models="linear",
                  why_layout="LASP-2 needs the contiguous layout (each rank's prefix state covers all earlier "
                             "tokens)",
                  options=("causal", "decay", "block_size", "validate"),
                  reference="seqpar.kernels.reference:linear_reference",
                  comm_bytes="seqpar.attention.lasp2:lasp2_bytes"),
)}
NAMES = tuple(ATTENTIONS)
VARLEN = tuple(n for n, s in ATTENTIONS.items() if s.varlen)


@dataclass(frozen=True)
class MixerSpec:
    """A token mixer of the hybrid models that a model seam runs (``seqpar.models.hybrid``, chosen by the family
    table ``seqpar.models.families``), not an attention a user picks by name. For the conformance tests it names
    its float64 definition, its bytes formula and an example call: ``example(L, dtype, generator) -> (tensors,
    dims, kwargs, out_dim)``, where ``dims[i]`` is the sequence dimension of ``tensors[i]`` (None: a parameter,
    replicated on every rank) and ``out_dim`` the output's. Every primitive takes ``group=`` and
    ``cu_seqlens=`` (packed documents reset its state); those whose ``layouts`` name more than the contiguous
    layout take ``layout=`` too (as does their bytes formula)."""

    name: str
    primitive: str  # "module:function", as AttentionSpec
    reference: str
    comm_bytes: str
    example: str
    layouts: tuple[str, ...] = ("contiguous",)  # layouts it runs exactly in (``layout=``); the first is the default

    load = AttentionSpec.load


MIXERS: dict[str, MixerSpec] = {s.name: s for s in (
    MixerSpec("gated_delta", "seqpar.attention.gated_delta:gated_delta_rule",
              "seqpar.kernels.reference:gated_delta_reference", "seqpar.attention.gated_delta:gated_delta_bytes",
              "seqpar.attention.gated_delta:example_inputs", ("contiguous", "zigzag")),
    MixerSpec("kimi_delta", "seqpar.attention.gated_delta:gated_delta_rule",
              "seqpar.kernels.reference:gated_delta_reference", "seqpar.attention.gated_delta:gated_delta_bytes",
              "seqpar.attention.gated_delta:kimi_example_inputs", ("contiguous", "zigzag")),
    MixerSpec("short_conv", "seqpar.attention.short_conv:causal_conv1d",
              "seqpar.kernels.reference:causal_conv_reference", "seqpar.attention.short_conv:causal_conv1d_bytes",
              "seqpar.attention.short_conv:example_inputs", ("contiguous", "zigzag")),
    MixerSpec("selective_scan", "seqpar.attention.selective_scan:selective_scan",
              "seqpar.kernels.reference:selective_scan_reference",
              "seqpar.attention.selective_scan:selective_scan_bytes", "seqpar.attention.selective_scan:example_inputs"),
)}


def get_spec(name: str) -> AttentionSpec:
    if name not in ATTENTIONS:
        raise ValueError(f"attention={name!r} is not a seqpar attention: use one of {NAMES}")
    return ATTENTIONS[name]


def head_split_degree(name: str, **group_sizes: int | None) -> int | None:
    """How many ranks the heads of attention ``name`` are split over (Ulysses: ``group=`` the SP size; USP:
    ``ulysses_group=`` its Ulysses degree), from the sizes given; None if it does not split heads."""
    split = get_spec(name).heads_split
    return None if split is None else group_sizes.get(split)


def resolve_layout(attention: str, layout: str | None = None) -> str:
    """The sequence layout ``attention`` runs with (and that ``shard_batch`` must use)."""
    spec = get_spec(attention)
    layout = spec.default_layout if layout is None else layout
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not a layout: use 'zigzag' or 'contiguous'")
    if layout not in spec.layouts:
        raise ValueError(f"layout={layout!r} with attention={attention!r}: {spec.why_layout}; pass "
                         f"layout={spec.default_layout!r} or leave it None")
    return layout
