"""The linear-attention layers of hybrid models, run by seqpar's sequence-parallel primitives in place.

The family table (``seqpar.models.families``) names, per family, the module classes seqpar shards and the seam
it patches in each (``Family.linear``); ``patch_model`` calls ``install`` with it, ``unpatch_model`` calls
``remove``. The softmax layers of the same models go through the attention registry as every other model's.

Seams, the narrowest each model offers:

* ``"gated_delta"`` (Qwen3-Next, Qwen3.5, OLMo-hybrid ``*GatedDeltaNet``): the layer's forward calls its
  modeling module's ``causal_conv1d_fn`` and ``torch_chunk_gated_delta_rule`` (transformers' pure-PyTorch
  fallbacks of the causal-conv1d and flash-linear-attention kernels). seqpar wraps each of those two
  module functions once with a dispatcher that runs ``seqpar.attention.short_conv.causal_conv1d`` (halo
  exchange) and ``seqpar.attention.gated_delta.gated_delta_rule`` (LASP-2 with affine maps) while a patched
  layer's forward is running (a context variable set by the layer's instance ``forward``), and the original
  functions otherwise: an unpatched model in the same process is untouched. No model code is copied: the
  projections, gates, norms and output projection are the model's own.
* ``"kimi_delta"`` (Kimi Linear ``KimiLinearDeltaAttention``): the same, through its modeling module's
  ``causal_conv1d_forward`` (the conv with its cache argument) and ``chunk_kimi_delta_attention`` (the rule with
  a decay per key channel, which ``gated_delta_rule`` takes as ``g [B, n, H, Dk]``). Its softmax layers are
  MLA (``KimiLinearAttention``, no rotary embedding), dispatched through the attention registry.
* ``"lightning"`` (MiniMax ``MiniMaxLightningAttention``): the recurrence is written inline in the layer's
  forward (no function to wrap), so the seam is the forward itself: seqpar's forward keeps the model's
  projections and modules (``qkv_proj``, ``act_fn``, ``norm``, ``output_gate``, ``out_proj``) and replaces
  only the block loop with ``seqpar.attention.lasp2.lasp2_linear_attention`` (decay λ_h = exp(-slope_h), the
  layer's own block size; packed documents reset the state at each document start, on every rank).
* ``"ssd"`` (Mamba2 and its hybrids) and ``"selective"`` (Mamba, Falcon-Mamba): installed by
  ``seqpar.models.mamba2`` and ``seqpar.models.mamba`` (their docstrings say which module functions they wrap).

Layouts: the whole model runs one layout, the patch's (``patch_model(..., layout=)``, ``families.layout_for``):
contiguous, or zigzag where every seam of the family runs it (``families.SEAM_LAYOUTS``: the delta-rule and
Lightning seams),
so the softmax layers get their balanced ring and no all-to-all runs between layers. ``install`` hands it to
the seams, whose primitives fold the maps of the two zigzag pieces per rank in global chunk order and take the
conv halo of each piece from its chunk's predecessor (``seqpar.attention.affine_maps``, ``short_conv``).

The patched layers run seqpar's kernels on one device too (float64 stays float64, packed documents reset the
state); a call with a cache or a padding mask there runs the model's own code (generation is
single-device). Under SP (group size > 1) both are refused, as is anything else a seam does not implement,
with one line and on every rank before a collective: a KV/recurrent cache, a padding mask, HF's own varlen
keywords.
"""

from __future__ import annotations

import contextvars
import functools
import sys
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from seqpar import comm
from seqpar.comm import Group
from seqpar.models.families import SEAM_LAYOUTS, seam_layouts

_ACTIVE: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("seqpar_linear_layer", default=None)
_WRAPPED = "_seqpar_dispatch"  # marks a module function already replaced by its dispatcher


@dataclass(frozen=True)
class _Call:
    """What the dispatchers need while a patched layer runs."""

    group: Group
    cu_seqlens: torch.Tensor | None
    layer: str
    layout: str = "contiguous"  # the patch's layout (``seqpar.sharding``), the same for every layer


def install(model: torch.nn.Module, seams: tuple[tuple[str, str], ...], group: Group, calls: Counter,
            layout: str = "contiguous") -> int:
    """Patch every module of ``model`` whose class is named in ``seams`` (class name -> seam) to run in ``layout``
    (the softmax layers' too); returns how many. Each layer call that runs seqpar's primitive counts once in
    ``calls`` under the seam's name (``attention_calls``)."""
    if layout not in seam_layouts(seams):  # patch_model refuses it first (families.layout_for)
        raise ValueError(f"layout={layout!r}: the linear layers of this model run in {seam_layouts(seams)} only")
    kinds = dict(seams)
    count, lightning = 0, 0
    for module in model.modules():
        seam = kinds.get(type(module).__name__)
        if seam is None:
            continue
        extra = {"layout": layout} if seam in SEAM_LAYOUTS else {}  # the seams that take a layout
        if seam == "lightning":  # LASP-2's cross-rank length check (a host read): at the first such layer only
            extra["validate"], lightning = lightning == 0, lightning + 1
        _SEAMS[seam](module, group, calls, **extra)
        count += 1
    return count


def remove(model: torch.nn.Module) -> None:
    """Undo ``install`` (the module-function dispatchers stay: without a patched layer they call the originals)."""
    for module in model.modules():
        if "_seqpar_linear" in vars(module):
            del module.forward, module._seqpar_linear


def _refuse_unsharded(layer: str, group: Group, cache, attention_mask, kwargs: dict) -> bool:
    """True when the model's own code must run (one device, with a cache or padding mask); raises under SP."""
    n = comm.group_size(group)
    own = cache is not None or attention_mask is not None
    if own and n > 1:
        what = "a KV/recurrent cache" if cache is not None else "a padding attention_mask"
        raise ValueError(f"{layer} got {what} under sequence parallelism (SP size {n}): seqpar trains without a cache "
                         "and without padding masks; pass use_cache=False and right-pad or pack documents with "
                         "cu_seqlens (seqpar.models.shard_batch)")
    varlen = sorted(k for k in ("cu_seq_lens_q", "cu_seq_lens_k") if kwargs.get(k) is not None)
    if varlen:
        raise ValueError(f"{varlen} reached {layer}: HF's flash-attention packing is not seqpar's; pass cu_seqlens "
                         "(seqpar.models.shard_batch builds it) instead")
    return own


# ---------------------------------------------------------------------------------------------- gated delta


def _install_gated_delta(layer: torch.nn.Module, group: Group, calls: Counter, layout: str = "contiguous",
                         seam: str = "gated_delta") -> None:
    mod = sys.modules[type(layer).__module__]
    for name, make in _DELTA_FUNCTIONS[seam]:
        fn = getattr(mod, name, None)
        if fn is None:
            raise ValueError(f"{type(layer).__name__}: transformers' {mod.__name__} has no {name}, the seam seqpar "
                             "patches: this transformers version is not supported for this family")
        if not getattr(fn, _WRAPPED, False):
            setattr(mod, name, make(fn))
    original = layer.forward
    name = type(layer).__name__

    @functools.wraps(original)
    def forward(hidden_states, cache=None, attention_mask=None, **kwargs):  # every *GatedDeltaNet.forward's
        cu = kwargs.pop("cu_seqlens", None)
        if _refuse_unsharded(name, group, cache, attention_mask, kwargs):
            if cu is not None:
                raise ValueError(f"{name}: packed documents (cu_seqlens) with a cache or padding mask: pass one")
            return original(hidden_states, cache, attention_mask, **kwargs)
        calls[seam] += 1
        token = _ACTIVE.set(_Call(group, cu, name, layout))
        try:
            return original(hidden_states, cache, attention_mask, **kwargs)
        finally:
            _ACTIVE.reset(token)

    layer.forward, layer._seqpar_linear = forward, seam



# Keywords transformers' layers pass down to the two functions that change nothing in them (the torch fallbacks
# ignore them too; the router loss is refused by the family table). Any other keyword with a value is refused:
# seqpar would drop it.
_IGNORED = frozenset({"use_cache", "output_router_logits", "output_attentions", "output_hidden_states", "return_dict"})


def _refuse_keywords(call: _Call, fn: str, kwargs: dict) -> None:
    extra = sorted(k for k, v in kwargs.items() if k not in _IGNORED and v is not None)
    if extra:
        raise ValueError(f"{call.layer} passed {extra} to {fn}, which seqpar's sequence-parallel version does not "
                         "implement: drop them (seqpar's packing is cu_seqlens from seqpar.models.shard_batch)")


def _conv_dispatcher(original):
    from seqpar.attention.short_conv import causal_conv1d

    @functools.wraps(original)
    def dispatch(hidden_states, weight, bias=None, activation=None, **kwargs):
        call = _ACTIVE.get()
        if call is None:
            return original(hidden_states, weight, bias, activation, **kwargs)
        _refuse_keywords(call, "causal_conv1d_fn", kwargs)
        return causal_conv1d(hidden_states, weight, bias, activation, group=call.group, cu_seqlens=call.cu_seqlens,
                             layout=call.layout)

    setattr(dispatch, _WRAPPED, True)
    return dispatch


def _conv_forward_dispatcher(original):
    """Kimi Linear's ``causal_conv1d_forward(conv1d, x, cache, layer_idx, activation)`` (the cache is refused or
    left to the model's own code before a patched layer gets here)."""
    from seqpar.attention.short_conv import causal_conv1d

    @functools.wraps(original)
    def dispatch(conv1d, hidden_states, cache, layer_idx, activation=None, state_idx=0, **kwargs):
        call = _ACTIVE.get()
        if call is None:
            return original(conv1d, hidden_states, cache, layer_idx, activation, state_idx, **kwargs)
        _refuse_keywords(call, "causal_conv1d_forward", kwargs)
        return causal_conv1d(hidden_states, conv1d.weight.squeeze(1), conv1d.bias, activation, group=call.group,
                             cu_seqlens=call.cu_seqlens, layout=call.layout)

    setattr(dispatch, _WRAPPED, True)
    return dispatch


def _rule_dispatcher(original):
    from seqpar.attention.gated_delta import gated_delta_rule

    @functools.wraps(original)
    def dispatch(query, key, value, g, beta, chunk_size=64, initial_state=None, output_final_state=False,
                 use_qk_l2norm_in_kernel=False, cu_seqlens=None, **kwargs):
        call = _ACTIVE.get()
        if call is None:
            return original(query, key, value, g, beta, chunk_size=chunk_size, initial_state=initial_state,
                            output_final_state=output_final_state, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
                            cu_seqlens=cu_seqlens, **kwargs)
        if initial_state is not None or output_final_state or cu_seqlens is not None:
            raise ValueError(f"{call.layer}: a recurrent state or HF's varlen cu_seqlens reached the gated delta rule "
                             "under seqpar: train with use_cache=False and seqpar's cu_seqlens (shard_batch)")
        _refuse_keywords(call, "torch_chunk_gated_delta_rule", kwargs)
        out = gated_delta_rule(query, key, value, g, beta, group=call.group, cu_seqlens=call.cu_seqlens,
                               use_qk_l2norm=use_qk_l2norm_in_kernel, chunk_size=chunk_size, layout=call.layout)
        return out, None

    setattr(dispatch, _WRAPPED, True)
    return dispatch


# ---------------------------------------------------------------------------------------------- lightning


def _install_lightning(layer: torch.nn.Module, group: Group, calls: Counter, layout: str = "contiguous",
                       validate: bool = True) -> None:
    original = layer.forward
    name = type(layer).__name__

    @functools.wraps(original)
    def forward(hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        cu = kwargs.pop("cu_seqlens", None)
        if _refuse_unsharded(name, group, cache, attention_mask, kwargs):
            return original(hidden_states, position_embeddings, attention_mask, cache=cache, **kwargs)
        calls["lightning"] += 1
        return _lightning(layer, hidden_states, group, cu, layout, validate), None

    layer.forward, layer._seqpar_linear = forward, "lightning"


def _lightning(layer: torch.nn.Module, hidden_states: torch.Tensor, group: Group,
               cu_seqlens: torch.Tensor | None, layout: str = "contiguous", validate: bool = True) -> torch.Tensor:
    """MiniMaxLightningAttention.forward without a cache: o_t = Σ_{s<=t} λ^(t-s) (q_t·k_s) v_s per head (s in
    t's document when ``cu_seqlens`` packs several), then the layer's RMSNorm, sigmoid output gate and output
    projection (all per token)."""
    from seqpar.attention.lasp2 import lasp2_linear_attention

    B, n, _ = hidden_states.shape
    H, D = layer.num_attention_heads, layer.head_dim
    qkv = layer.act_fn(layer.qkv_proj(hidden_states)).reshape(B, n, H, 3 * D)
    q, k, v = torch.split(qkv, D, dim=3)
    decay = torch.exp(-layer.slope_rate.reshape(H).to(torch.float64))
    out = lasp2_linear_attention(q, k, v, group=group, decay=decay, block_size=layer.block_size,
                                 cu_seqlens=cu_seqlens, layout=layout, validate=validate)
    out = layer.norm(out.reshape(B, n, H * D))
    out = F.sigmoid(layer.output_gate(hidden_states)) * out
    return layer.out_proj(out)


def _install_ssd(layer: torch.nn.Module, group: Group, calls: Counter) -> None:
    from seqpar.models.mamba2 import install_ssd  # Mamba2 mixers (its module imports this one)

    install_ssd(layer, group, calls)


def _install_selective(layer: torch.nn.Module, group: Group, calls: Counter) -> None:
    from seqpar.models.mamba import install_selective  # Mamba (v1) mixers (its module imports this one)

    install_selective(layer, group, calls)


# The module functions each delta-rule seam wraps: (name in the layer's modeling module, dispatcher maker).
# Kimi Delta Attention's rule takes the same arguments with a per-key-channel g, which gated_delta_rule reads.
_DELTA_FUNCTIONS = {
    "gated_delta": (("causal_conv1d_fn", _conv_dispatcher), ("torch_chunk_gated_delta_rule", _rule_dispatcher)),
    "kimi_delta": (("causal_conv1d_forward", _conv_forward_dispatcher),
                   ("chunk_kimi_delta_attention", _rule_dispatcher)),
}
_SEAMS = {"gated_delta": _install_gated_delta, "kimi_delta": functools.partial(_install_gated_delta, seam="kimi_delta"),
          "lightning": _install_lightning,
          "ssd": _install_ssd, "selective": _install_selective}
