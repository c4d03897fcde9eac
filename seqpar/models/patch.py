"""Run a Hugging Face causal LM (Llama, Mistral, Qwen2) with a seqpar attention primitive on every layer.

Nothing of the model's code is copied or replaced: ``patch_model`` registers one attention function with
``transformers.AttentionInterface.register(name, fn)`` and switches the model to it with
``model.set_attn_implementation(name)``. The model keeps doing its own projections, its own RoPE (on the
GLOBAL position ids the caller passes, see ``seqpar.models.batch.shard_batch``) and its own output
projection; only ``softmax(Q K^T) V`` is swapped. The registered function is a closure over a ``_Patch``
that carries the SP process group, so nothing lives in module globals and two models can be patched with
different primitives in one process.

Because the registered name is not in ``transformers.masking_utils.AttentionMaskInterface``, the model
builds no attention mask at all (``create_causal_mask`` returns None): nothing L x L is materialised for
the local shard. The primitives apply the causal (and, packed, the document) mask themselves. Padding masks
are therefore NOT applied: pad on the right, where causal attention already hides the padding from real
tokens, and mask the padded labels (``shard_batch`` does both).

Per layer, transformers calls ``fn(module, query, key, value, attention_mask, dropout=, scaling=, **kw)`` with
``query [B, H, L/N, D]``, ``key, value [B, Hkv, L/N, D]`` (its layout); the function transposes to seqpar's
``[B, L/N, H, D]``, calls the primitive and returns ``[B, L/N, H, D]`` as transformers expects. Bytes
communicated per layer are those of the chosen primitive (its module docstring gives the formula); the
patch adds one all-reduce of an int64 flag per forward (the first layer's check of the global position
ids): ``2 * 8 * (N-1)/N`` bytes sent per rank. Reading that flag is a host sync on a GPU, so position ids on
a GPU are checked at the patch's first forward only (a forgotten or restarted ``position_ids`` shows there);
CPU ones at every forward.

Which models: ``seqpar.models.families`` is the table. ``patch_model`` refuses, in one line naming the module
class, every model whose family the table refuses (hybrids and SSMs whose recurrences and convolutions would
run on each shard from a zero state, sparse indexers, positions from local lengths) or does not know, and
any model holding a token-mixing module seqpar does not shard, whatever its family. On one device (no SP
group) nothing is sharded and the table is not consulted.

Sliding windows and chunked attention: the window a layer passes (``sliding_window``: Mistral, Qwen2/3,
Gemma 3, gpt-oss, Cohere2... per layer, None on full layers) or the one its family keeps only in the mask
(``seqpar.models.families.MASK_WINDOWS``: Phi-MoE, Qwen2-MoE, Llama 4's chunked layers) is applied by the
primitive: ``window=w`` (key k visible from query q iff ``q - w < k <= q``, transformers' rule) for every
primitive listing the ``window`` option, when w is shorter than the global length (local length x SP size;
with a KV cache, the key length); the others (s2, sf at training time) refuse it in one line. A chunk of c
tokens (Llama 4: tokens attend only inside their chunk) is a document: the varlen primitives get the union
of the document boundaries and each document's chunk starts as ``cu_seqlens``; the others refuse it, as does
a KV cache reaching past the first chunk. Layer calls that ran a window (or chunks) are counted in
``attention_calls`` under ``"window"`` (``"chunk"``) besides the primitive's own count.

Refused per call, with an error naming the fix, on every rank before any communication: attention dropout
> 0, an explicit attention mask, bidirectional layers, softcapping, a window or chunk the chosen primitive
cannot apply, and every keyword of the attention call that seqpar does not implement (``position_bias``, a
``sinks`` tensor, HF's flash varlen ``cu_seq_lens_q``...): a keyword is either used, known to be inert
(``_INERT``) or refused, never dropped. ``s_aux`` (gpt-oss, Flint, Granite-SWA: one learned sink logit per
head) is used: the primitives that list the ``sinks`` option merge it into each row's log-sum-exp
(``seqpar.kernels.merge_sink``); the others refuse.

Training-time only attentions (LongLoRA S2-Attn ``"s2"`` and SinkLoRA SF-Attn ``"sf"``, Chen et al. 2023;
Zhang 2024) use full causal attention when the model is in ``eval()`` mode, as LongLoRA does: the fine-tuned
model is evaluated and served with ordinary attention. Their group size is ``group_size`` or
``group_size_ratio x L`` with L the global length (local length x SP size).
"""

from __future__ import annotations

import functools
import itertools
import warnings
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel

from seqpar import comm
from seqpar.attention.local import local_attention
from seqpar.attention.registry import ATTENTIONS, get_spec, resolve_layout
from seqpar.comm import Group
from seqpar.kernels.host import host_read
from seqpar.models import hybrid
from seqpar.models.batch import sp_group_of
from seqpar.models.families import check_model, family_of, layout_for, linear_primitive_refusal, mask_window
from seqpar.parallel import ParallelState
from seqpar.sharding import document_bounds, global_index, remember_bounds

__all__ = ["ATTENTIONS", "patch_model", "patched_layout", "resolve_layout", "unpatch_model"]


@dataclass
class _Patch:
    """Everything the registered attention function needs; kept in its closure and on the model."""

    attention: str
    group: Group
    layout: str
    group_size_ratio: float
    group_size: int | None
    num_sink_tokens: int
    ulysses_group: Group
    ring_group: Group
    name: str
    previous: str | None
    calls: Counter = field(default_factory=Counter)  # attention actually run, per layer call (attention_calls)
    s2_wrap: bool = False  # s2: LongLoRA's pseudocode roll instead of half groups at the ends
    positions_checked: bool = False  # device (CUDA) position ids were checked once: later forwards skip the sync
    chunk_cuts: tuple | None = None  # ((cuts, device), cu_seqlens tensor) of the last chunked forward
    first_layer: int | None = None  # layer_idx of the first layer that called the attention (forward order)

    def is_first_layer(self, module) -> bool:
        """Whether ``module`` is the model's first attention layer: where once-per-forward checks run. Not
        ``layer_idx == 0``: in hybrids (Qwen3-Next, MiniMax...) layer 0 may be a linear layer."""
        idx = getattr(module, "layer_idx", 0)
        if self.first_layer is None:
            self.first_layer = idx
        return idx == self.first_layer

    def shift_size(self, seq_len: int) -> int:
        """S2/SF shift-group size G: explicit, or ratio x global length; G tiles the sequence and shifts by G/2."""
        size = self.group_size if self.group_size is not None else int(self.group_size_ratio * seq_len)
        if size < 2 or size % 2 or seq_len % size:
            source = "group_size" if self.group_size is not None else f"group_size_ratio={self.group_size_ratio} x L"
            raise ValueError(
                f"{self.attention} group size {size} (from {source}) must be even and divide the global sequence "
                f"length {seq_len}: choose group_size among the even divisors of {seq_len}"
            )
        return size


def patch_model(
    model: torch.nn.Module,
    attention: str = "ring",
    parallel: ParallelState | dist.ProcessGroup | None = None,
    *,
    layout: str | None = None,
    group_size_ratio: float = 0.25,
    group_size: int | None = None,
    num_sink_tokens: int = 4,
    ulysses_degree: int | None = None,
    s2_wrap: bool = False,
) -> torch.nn.Module:
    """Make every attention layer of ``model`` run ``attention`` over the SP group of ``parallel``.

    Args:
        model: a transformers ``PreTrainedModel`` (or a wrapper holding one, e.g. a PEFT model).
        attention: a name of ``seqpar.attention.registry.ATTENTIONS``; ``"full"`` is exact causal attention
            (the local kernel on one device, ``ring_attention`` on an SP group); ``"lasp2"`` runs a
            linear-attention model (Linear-Llama and its hybrid) through its ``set_sequence_parallel``.
        parallel: ``ParallelState``, an SP process group, or None (one device). With usp, every rank of the
            world must call ``patch_model`` (it creates the Ulysses and ring sub-groups).
        layout: sequence layout of the shards (default per primitive: ``resolve_layout``).
        group_size_ratio, group_size: s2/sf group size, ``group_size`` if given else ratio x global length.
        num_sink_tokens: sf only. ulysses_degree: usp only (default: gcd(SP size, kv heads)).
        s2_wrap: s2 only: the shifted half rolls around the sequence (``shift_short_attention(wrap=True)``).

    Returns the same model, patched in place. ``unpatch_model`` restores it.
    """
    spec = get_spec(attention)
    if not 0 < group_size_ratio <= 1:
        raise ValueError(f"group_size_ratio={group_size_ratio} must be in (0, 1] (LongLoRA uses 0.25)")
    pretrained = _find_pretrained(model)
    model_type = getattr(pretrained.config, "model_type", None)
    linear = spec.models == "linear"
    softmax_primitives = tuple(n for n, s in ATTENTIONS.items() if s.models != "linear")
    if linear and (why := linear_primitive_refusal(model_type, softmax_primitives)):
        raise ValueError(f"attention={attention!r} with {type(pretrained).__name__}, {why}")
    fam = family_of(model_type)
    seams = fam.linear if fam is not None else ()
    layout = resolve_layout(attention, layout_for(model_type, layout))  # hybrids: contiguous unless asked (zigzag)
    group = sp_group_of(parallel)
    if comm.group_size(group) > 1:  # only sharding breaks a mixer: the family table refuses here, or not at all
        check_model(pretrained, pretrained.config)
    if hasattr(pretrained, "_seqpar_patch"):
        unpatch_model(pretrained)  # re-patching starts from the original implementation
    ulysses_group = ring_group = None
    if spec.subgroups:  # usp: the Ulysses x ring sub-groups of the SP group
        from seqpar.attention.usp import default_ulysses_degree, usp_groups

        if ulysses_degree is None:
            ulysses_degree = default_ulysses_degree(comm.group_size(group), pretrained.config.num_key_value_heads)
        # made once per SP group and degree (ParallelState or bare group alike): re-patching reuses them
        ulysses_group, ring_group = usp_groups(group, ulysses_degree)
    patch = _Patch(attention, group, layout, group_size_ratio, group_size, num_sink_tokens, ulysses_group,
                   ring_group, name="", previous=None if linear else pretrained.config._attn_implementation,
                   s2_wrap=s2_wrap)
    if linear != hasattr(pretrained, "set_sequence_parallel"):
        kind = "linear-attention (Linear-Llama)" if linear else "softmax-attention (Llama, Mistral, Qwen2)"
        fits = tuple(n for n, s in ATTENTIONS.items() if (s.models == "linear") != linear)
        raise ValueError(f"attention={attention!r} runs {kind} models, not {type(pretrained).__name__}: pick one "
                         f"of {fits} for this model")
    if linear:  # the model runs LASP-2 (and LASP-2H all-gather softmax layers) itself
        pretrained.set_sequence_parallel(group, layout=layout)
        pretrained._seqpar_patch = patch
        return model
    patch.name = f"seqpar_{attention}_{id(patch):x}"
    AttentionInterface.register(patch.name, functools.partial(seqpar_attention_forward, patch))
    pretrained.set_attn_implementation(patch.name)
    if pretrained.config._attn_implementation != patch.name:
        del AttentionInterface._global_mapping[patch.name]
        raise ValueError(
            f"{type(pretrained).__name__} did not accept attn_implementation={patch.name!r}: its attention "
            "does not dispatch through transformers' AttentionInterface, so seqpar cannot patch it"
        )
    if seams:
        hybrid.install(pretrained, seams, group, patch.calls, layout)  # the softmax layers' layout, too
    pretrained._seqpar_patch = patch
    return model


def unpatch_model(model: torch.nn.Module) -> torch.nn.Module:
    """Restore the attention implementation ``model`` had before ``patch_model`` and drop the registration."""
    pretrained = _find_pretrained(model)
    patch = getattr(pretrained, "_seqpar_patch", None)
    if patch is None:
        raise ValueError(f"{type(pretrained).__name__} is not patched by seqpar: nothing to unpatch")
    if patch.previous is None:  # a linear-attention model: back to one device
        pretrained.set_sequence_parallel(None)
    else:
        pretrained.set_attn_implementation(patch.previous)
        AttentionInterface._global_mapping.pop(patch.name, None)
        hybrid.remove(pretrained)
    del pretrained._seqpar_patch
    return model


def patch_of(model: torch.nn.Module) -> _Patch | None:
    """What ``patch_model`` installed on ``model`` (or the transformers model inside its wrappers): its ``group``,
    ``attention``, ``layout``; None if it is not patched."""
    return getattr(_find_pretrained(model), "_seqpar_patch", None)


def attention_calls(model: torch.nn.Module, *, reset: bool = False) -> dict[str, int]:
    """How many layer calls ran each attention since the last reset, e.g. ``{"s2": 4}`` for a 2-layer model
    trained one step with gradient checkpointing (forward + recomputation), ``{"full": 2}`` in eval mode.

    The attention actually run, not the one patched: s2/sf run ``"full"`` in ``eval()`` mode. Empty for a
    model that is not patched. A Python counter per layer call: no device work, no sync.
    """
    patch = patch_of(model)
    if patch is None:
        return {}
    counts = dict(patch.calls)
    if reset:
        patch.calls.clear()
    return counts


def patched_layout(model: torch.nn.Module) -> str:
    """The layout the patched ``model`` expects its shards in (pass it to ``shard_batch``)."""
    patch = patch_of(model)
    if patch is None:
        raise ValueError("the model is not patched by seqpar: call seqpar.models.patch_model first")
    return patch.layout


def _find_pretrained(model: torch.nn.Module) -> PreTrainedModel:
    if isinstance(model, PreTrainedModel):
        return model
    for module in model.modules():  # PEFT and other wrappers hold the transformers model inside
        if isinstance(module, PreTrainedModel):
            return module
    raise TypeError(f"{type(model).__name__} is not (and does not contain) a transformers PreTrainedModel")


# ---------------------------------------------------------------------------------------------- per layer


def seqpar_attention_forward(
    patch: _Patch,
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: ``query [B, H, L/N, D]`` -> ``([B, L/N, H, D], None)``."""
    n = comm.group_size(patch.group)
    q_len, k_len = query.shape[2], key.shape[2]
    sinks = kwargs.pop("s_aux", None)  # gpt-oss, Flint, Granite-SWA: learned per-head sink logits
    _check_call(patch, module, attention_mask, dropout, kwargs)
    _check_local_positions(module, n, q_len * n, cu_seqlens)
    limit = _layer_limit(module, sliding_window)  # ("window", w) | ("chunk", c) | None
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # -> [B, L, H, D]
    dv = v.shape[-1]
    if dv != q.shape[-1]:  # MLA (DeepSeek, Kimi Linear): value heads narrower or wider than query/key heads.
        # The primitives take one head size: zero columns of V give zero output columns (sliced off below), zero
        # columns of q and k leave the scores unchanged (the scale is the model's); as transformers' flash path
        scaling = q.shape[-1] ** -0.5 if scaling is None else scaling
        width = max(dv, q.shape[-1])
        q, k, v = (t if t.shape[-1] == width else F.pad(t, (0, width - t.shape[-1])) for t in (q, k, v))
    if k_len != q_len:  # decoding with a KV cache: new queries attend to the cached keys (one device only)
        return _decode(patch, module, q, k, v, scaling, sinks, limit, cu_seqlens, kwargs)[..., :dv], None
    total = q_len * n
    if limit is not None and limit[1] >= total:
        limit = None  # a window or chunk covering the whole sequence has no effect
    spec = get_spec(patch.attention)
    if cu_seqlens is None:
        _check_positions(patch, module, kwargs.get("position_ids"), q_len, query.device)
    if spec.eval_fallback and not module.training:
        spec = get_spec(spec.eval_fallback)  # LongLoRA: shifted groups at training time, full attention at inference
    _check_spec(spec, module, cu_seqlens, sinks, limit, total)
    extra = {}
    if limit is not None:
        patch.calls[limit[0]] += 1  # attention_calls shows the windows (chunks) engaged
        if limit[0] == "window":
            extra["window"] = limit[1]
        else:  # chunks are documents: each document's chunk starts join its boundaries
            cu_seqlens = _chunk_bounds(patch, cu_seqlens, limit[1], total, query.device)
    patch.calls[spec.name] += 1
    # cross-rank shape checks once per forward
    # validated at the first layer of a forward, not again when gradient checkpointing recomputes it inside the
    # backward (the same shapes: a collective and a host read saved per step)
    validate = patch.is_first_layer(module) and torch._C._current_graph_task_id() == -1
    out = spec.call(patch, q, k, v, scaling, cu_seqlens, validate=validate, sinks=sinks, **extra)
    return out[..., :dv].contiguous(), None


def _layer_limit(module: torch.nn.Module, sliding_window: int | None) -> tuple[str, int] | None:
    """The layer's window: the one transformers passes, else the one its family keeps in the mask only."""
    if sliding_window is not None:
        return "window", int(sliding_window)
    return mask_window(getattr(module, "config", None), getattr(module, "layer_idx", None))


def _decode(patch, module, q, k, v, scale, sinks, limit, cu_seqlens, kwargs) -> torch.Tensor:
    """KV-cache attention on one device: the new queries are the last rows (bottom-right causal); a window
    counts back from each query over the keys held (a sliding cache keeps the window's last keys)."""
    q_len, k_len = q.shape[1], k.shape[1]
    if comm.group_size(patch.group) > 1 or cu_seqlens is not None:
        raise ValueError(
            f"query length {q_len} != key length {k_len} (a KV cache) under seqpar attention with SP size "
            f"{comm.group_size(patch.group)}: generation is single-device; unpatch_model(model) or patch with "
            "parallel=None"
        )
    extra = {}
    if limit is not None and limit[0] == "chunk":
        end = _absolute_end(kwargs, k_len)
        if limit[1] < end:  # a chunked cache forgets the chunk's start: seqpar cannot place the chunk edges
            raise ValueError(f"{type(module).__name__} attends inside chunks of {limit[1]} tokens and the KV cache "
                             f"reaches position {end}: seqpar decodes chunked attention within the first chunk "
                             "only; unpatch_model(model) to generate longer")
    elif limit is not None and limit[1] < k_len:
        extra["window"] = limit[1]
        patch.calls["window"] += 1
    patch.calls["full"] += 1
    return local_attention(q, k, v, scale, causal="bottom_right", sinks=sinks, **extra)


def _absolute_end(kwargs: dict, k_len: int) -> int:
    """One past the last position the cache holds (a sliding cache holds fewer keys than positions)."""
    ends = [k_len]
    for name in ("position_ids", "cache_position"):
        pos = kwargs.get(name)
        if isinstance(pos, torch.Tensor) and pos.numel():
            ends.append(int(host_read(pos.max(), "decode_positions")) + 1)
    return max(ends)


def _chunk_bounds(patch: _Patch, cu_seqlens, chunk: int, total: int, device) -> torch.Tensor:
    """Document boundaries joined with every ``chunk``-th position of each document (a document run alone
    starts its chunks at its first token), as a ``cu_seqlens`` tensor with its host ints remembered."""
    docs = (0, total) if cu_seqlens is None else document_bounds(cu_seqlens, total)
    cuts = tuple(sorted({*docs, *(c for a, b in itertools.pairwise(docs) for c in range(a, b, chunk))}))
    cached = patch.chunk_cuts
    if cached is None or cached[0] != (cuts, device):  # every chunked layer of a forward shares the tensor
        tensor = remember_bounds(torch.tensor(cuts, dtype=torch.int32, device=device), cuts)
        cached = patch.chunk_cuts = ((cuts, device), tensor)
    return cached[1]


def _check_spec(spec, module, cu_seqlens, sinks, limit, total: int) -> None:
    """Refuse what the chosen primitive does not implement: documents, sinks, windows, chunks (one line)."""
    layer = type(module).__name__
    if cu_seqlens is not None and not spec.varlen:
        varlen = tuple(name for name, s in ATTENTIONS.items() if s.varlen)
        raise ValueError(
            f"attention={spec.name!r} does not support packed documents (cu_seqlens was given): "
            f"use one of {varlen} or pass unpacked sequences"
        )
    if sinks is not None and "sinks" not in spec.options:
        takes = tuple(name for name, s in ATTENTIONS.items() if "sinks" in s.options)
        raise ValueError(f"attention={spec.name!r} does not implement learned attention sinks ({layer} "
                         f"passes s_aux): use one of {takes}")
    if limit is not None and limit[0] == "window" and "window" not in spec.options:
        takes = tuple(name for name, s in ATTENTIONS.items() if "window" in s.options)
        raise ValueError(f"attention={spec.name!r} does not implement sliding windows ({layer} has a window of "
                         f"{limit[1]} tokens, shorter than the global sequence of {total}): use one of {takes}")
    if limit is not None and limit[0] == "chunk" and not spec.varlen:
        varlen = tuple(name for name, s in ATTENTIONS.items() if s.varlen)
        raise ValueError(f"attention={spec.name!r} cannot run chunked attention ({layer} attends inside chunks of "
                         f"{limit[1]} tokens, shorter than the global sequence of {total}; seqpar runs chunks as "
                         f"packed documents): use one of {varlen}")


def _check_local_positions(module, n: int, total: int, cu_seqlens) -> None:
    """Llama 4's attention temperature on its NoPE layers reads positions from the local length
    (``arange(L/N)``), not the global position ids: exact only while every global position gives the same
    scale (``floor((p + 1) / floor_scale) == 0``, i.e. fewer than ``floor_scale`` tokens)."""
    sharded = n > 1 or cu_seqlens is not None  # packed documents restart positions the layer does not see
    if not (sharded and getattr(module, "attn_temperature_tuning", False) and not getattr(module, "use_rope", 1)):
        return
    if total >= module.floor_scale:
        raise ValueError(f"{type(module).__name__} scales its NoPE queries by a temperature of positions it counts "
                         f"from the local length ({total} tokens >= floor_scale={module.floor_scale}): seqpar "
                         "would give each shard or document the wrong scales; set config.attn_temperature_tuning "
                         "= False or train shorter sequences")


# Keywords of transformers' attention call that do not change softmax(Q K^T) V (or are checked elsewhere:
# softcap below, is_causal below, output_router_logits by the family table at patch time):
# anything else that arrives non-None is refused by _check_call, so a new keyword is never silently dropped.
_INERT = frozenset({"position_ids", "is_causal", "output_attentions", "output_hidden_states", "use_cache",
                    "cache_position", "return_dict", "labels", "logits_to_keep", "softcap", "past_key_values",
                    "past_key_value", "layer_idx", "token_type_ids", "output_router_logits"})
_VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def _check_call(patch, module, attention_mask, dropout, kwargs) -> None:
    """Refuse what the primitives cannot do exactly; identical on every rank, so no rank hangs."""
    unknown = sorted(k for k, v in kwargs.items() if v is not None and k not in _INERT)
    if unknown:
        layer = type(module).__name__
        if any(k in _VARLEN_KEYS for k in unknown):
            raise ValueError(f"{unknown} reached seqpar attention from {layer}: HF's flash-attention packing is not "
                             "seqpar's; pass cu_seqlens (seqpar.models.shard_batch builds it) instead")
        if "sinks" in unknown:
            raise ValueError(f"{layer} passes a `sinks` tensor to the attention function (not gpt-oss's per-head "
                             "s_aux logits, which seqpar implements): seqpar would drop it; run this model "
                             "without seqpar attention")
        raise ValueError(f"{layer} passes {unknown} to the attention function and seqpar attention does not "
                         "implement them (it would drop them): run this model without seqpar attention")
    if dropout:
        raise ValueError(
            f"attention dropout={dropout} with seqpar attention: the primitives are exact and have no dropout; "
            "set model.config.attention_dropout = 0.0"
        )
    if attention_mask is not None:
        raise ValueError(
            f"attention_mask of shape {tuple(attention_mask.shape)} reached seqpar attention: the primitives "
            "apply the causal mask themselves; pad on the right (no mask needed) or pack documents and pass "
            "cu_seqlens (seqpar.models.shard_batch does both)"
        )
    if kwargs.get("is_causal") is False or not getattr(module, "is_causal", True):
        raise ValueError("seqpar attention is causal-only: this layer asked for bidirectional attention")
    if kwargs.get("softcap") is not None:
        raise ValueError(f"softcap={kwargs['softcap']} is not supported by seqpar attention")
    if kwargs.get("output_attentions"):
        warnings.warn("output_attentions=True: seqpar attention never forms the attention matrix; returning None",
                      stacklevel=3)


def _check_positions(patch: _Patch, module, position_ids, q_len: int, device) -> None:
    """RoPE must have seen the tokens' GLOBAL positions in the patch's layout (a forgotten ``position_ids``
    gives every rank 0..L/N-1; HF-style packing restarts them without ``cu_seqlens``; left padding shifts
    them). Checked at the first layer, collectively (one 8-byte all-reduce), since only some ranks may see it.
    """
    if position_ids is None or not patch.is_first_layer(module):
        return
    if position_ids.device.type != "cpu" and patch.positions_checked:
        return  # reading the flag would sync the host with the GPU in every step
    n = comm.group_size(patch.group)
    if n == 1:
        want = torch.arange(q_len, device=position_ids.device)
    else:
        want = global_index(q_len * n, n, comm.group_rank(patch.group), patch.layout, device=position_ids.device)
    if position_ids.shape[-1] == q_len:  # the flag stays on the device until the one read below
        flag = (position_ids != want).any().to(torch.int64).reshape(1)
    else:
        flag = torch.ones(1, dtype=torch.int64, device=device)
    bad = comm.all_reduce_tensor(flag.to(device), patch.group, op=dist.ReduceOp.MAX)
    if host_read(bad, "position_check", lambda: [0], group=patch.group)[0]:
        raise ValueError(
            f"position_ids are not the global positions of the {patch.layout} shards on every rank of the SP "
            "group (missing position_ids, packed documents without cu_seqlens, or left padding): build the "
            "inputs with seqpar.models.shard_batch(batch, parallel, patched_layout(model)) and pass all of them"
        )
    patch.positions_checked = True
