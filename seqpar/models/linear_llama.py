"""Linear-Llama and its hybrid: the Llama architecture with linear attention layers trained with LASP-2, and
optional softmax layers trained with LASP-2H's all-gather attention (Sun et al. 2025, "LASP-2: Rethinking
Sequence Parallelism for Linear Attention and Its Hybrid").

Everything but the token mixer is transformers' Llama (``LlamaDecoderLayer``: pre-RMSNorm, residuals,
``LlamaMLP``; ``LlamaRMSNorm``; ``LlamaRotaryEmbedding``). Each layer's mixer follows ``config.layer_types``:

* ``"linear_attention"`` (alias ``"linear"``): q, k = φ(x W_q), φ(x W_k) with φ in {identity, silu
  (TransNormerLLM / Lightning Attention), elu1 (elu + 1, Katharopoulos et al. 2020)}; v = x W_v;
  o_t = q_t · Σ_{s<=t} λ_h^(t-s) k_s^T v_s by ``lasp2_linear_attention`` (no RoPE, no softmax); optional
  RMSNorm of the heads' output (TransNormerLLM's output norm); then W_o. Decay λ_h is None, TransNormerLLM's
  fixed ALiBi-style per-head decay ``"tnl"``: λ_h = exp(-2^(-8(h+1)/H) · (1 - l/(layers-1) + 1e-5)), or
  ``"learned"``: λ_h = sigmoid(decay_logit_h) initialised there (its gradient is per rank: sum it over SP).
* ``"full_attention"`` (alias ``"softmax"``): Llama attention with RoPE on GLOBAL position ids, computed by
  ``allgather_attention`` (one all-gather of K, V per layer).

Sequence parallelism: ``model.set_sequence_parallel(group, layout="contiguous")`` (None = one device). Each
rank then passes its shard ``input_ids [B, L/N]`` (``seqpar.sharding.shard(..., layout="contiguous")``) and
the global ``position_ids [B, L/N]`` (default: computed from the group and layout); logits come back for the
shard. The loss is the caller's: sum of token losses over the group / total tokens, and parameter gradients
summed over the SP group. Linear layers need the contiguous layout (LASP-2's prefix runs in rank order).

Bytes per layer and call (N ranks, B batch, H heads, d head_dim, states float32): linear layer (N-1)·B·H·d·d·4
forward and the same backward; softmax layer as ``allgather_attention`` (its K, V: grows with L).

Importing this module registers ``"linear_llama"`` with ``AutoConfig`` and ``AutoModelForCausalLM``, so
``save_pretrained`` / ``from_pretrained`` on a local folder work without ``trust_remote_code``.
Not supported: generation with a cache, padding masks, packed documents in linear layers.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from seqpar.attention.allgather import allgather_attention
from seqpar.attention.lasp2 import lasp2_linear_attention
from seqpar.comm import Group, group_size
from seqpar.sharding import LAYOUTS
from seqpar.sharding import position_ids as global_position_ids

LINEAR, SOFTMAX = "linear_attention", "full_attention"
_ALIASES = {"linear": LINEAR, "softmax": SOFTMAX, LINEAR: LINEAR, SOFTMAX: SOFTMAX}
FEATURE_MAPS = {"identity": lambda x: x, "silu": F.silu, "elu1": lambda x: F.elu(x) + 1.0}
DECAYS = (None, "tnl", "learned")


@strict
class LinearLlamaConfig(LlamaConfig):
    r"""Llama config plus the token mixer of every layer.

    layer_types (`list[str]`, defaults to all ``"linear_attention"``): per layer ``"linear_attention"`` /
        ``"linear"`` or ``"full_attention"`` / ``"softmax"`` (e.g. one softmax layer every 4: LASP-2H).
    linear_feature_map (`str`, defaults to ``"silu"``): φ of q and k: ``"identity"``, ``"silu"``, ``"elu1"``.
    linear_output_norm (`bool`, defaults to True): RMSNorm of the linear attention output (TransNormerLLM).
    linear_decay (`str | None`, defaults to ``"tnl"``): None, ``"tnl"`` (fixed per-head, per-layer decay) or
        ``"learned"`` (λ = sigmoid(decay_logit), a parameter per head initialised at the ``"tnl"`` values).
    linear_block_size (`int`, defaults to 64): intra-chunk block of the Lightning Attention-2 kernel.
    """

    model_type = "linear_llama"

    layer_types: list[str] | None = None
    linear_feature_map: str = "silu"
    linear_output_norm: bool = True
    linear_decay: str | None = "tnl"
    linear_block_size: int = 64

    def __post_init__(self, **kwargs):
        if self.layer_types is None:
            self.layer_types = [LINEAR] * self.num_hidden_layers
        self.layer_types = [_ALIASES.get(t, t) for t in self.layer_types]
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        super().validate_architecture()
        bad = [t for t in self.layer_types if t not in (LINEAR, SOFTMAX)]
        if bad or len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types={self.layer_types}: give num_hidden_layers={self.num_hidden_layers} entries, "
                f"each 'linear' ({LINEAR!r}) or 'softmax' ({SOFTMAX!r})"
            )
        if self.linear_feature_map not in FEATURE_MAPS:
            raise ValueError(
                f"linear_feature_map={self.linear_feature_map!r}: use one of {sorted(FEATURE_MAPS)}"
            )
        if self.linear_decay not in DECAYS:
            raise ValueError(f"linear_decay={self.linear_decay!r}: use one of {DECAYS}")


def tnl_decay(num_heads: int, layer_idx: int, num_layers: int) -> list[float]:
    """TransNormerLLM's fixed decay: ALiBi slopes 2^(-8(h+1)/H), weaker in deeper layers."""
    depth = 1 - layer_idx / max(num_layers - 1, 1) + 1e-5
    return [math.exp(-(2 ** (-8 * (h + 1) / num_heads)) * depth) for h in range(num_heads)]


class LinearAttention(nn.Module):
    """Linear attention token mixer (LASP-2 under SP); Llama's projection names and shapes."""

    def __init__(self, config: LinearLlamaConfig, layer_idx: int):
        super().__init__()
        H, Hkv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        bias = config.attention_bias
        self.head_dim, self.block_size = d, config.linear_block_size
        self.q_proj = nn.Linear(config.hidden_size, H * d, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, Hkv * d, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, Hkv * d, bias=bias)
        self.o_proj = nn.Linear(H * d, config.hidden_size, bias=bias)
        self.out_norm = LlamaRMSNorm(H * d, eps=config.rms_norm_eps) if config.linear_output_norm else None
        self.feature_map = FEATURE_MAPS[config.linear_feature_map]
        # Fixed decay: a python list, not a buffer (it follows from the config).
        self.decay = tnl_decay(H, layer_idx, config.num_hidden_layers) if config.linear_decay else None
        learned = config.linear_decay == "learned"
        self.decay_logit = nn.Parameter(self.initial_decay_logit()) if learned else None
        self.sp_group: Group = None
        self.first_linear = config.layer_types.index(LINEAR) == layer_idx
        self._decay_on: dict[torch.device, torch.Tensor] = {}

    def fixed_decay(self, device: torch.device) -> torch.Tensor:
        """The fixed per-head decay on ``device``, made once (not a host-to-device copy per forward)."""
        if device not in self._decay_on:
            self._decay_on[device] = torch.tensor(self.decay, device=device)
        return self._decay_on[device]

    def initial_decay_logit(self) -> torch.Tensor:
        lam = torch.tensor(self.decay, dtype=torch.float64)
        return (lam.log() - torch.log1p(-lam)).float()  # sigmoid^-1 of the "tnl" decay

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> tuple[torch.Tensor, None]:
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)  # [B, L, H, d]
        q = self.feature_map(self.q_proj(hidden_states).view(shape))
        k = self.feature_map(self.k_proj(hidden_states).view(shape))
        v = self.v_proj(hidden_states).view(shape)
        if self.decay_logit is not None:
            decay = torch.sigmoid(self.decay_logit)
        else:
            decay = None if self.decay is None else self.fixed_decay(q.device)
        # The lengths are compared across ranks (a host read) at the first linear layer of a forward only.
        o = lasp2_linear_attention(q, k, v, group=self.sp_group, decay=decay, block_size=self.block_size,
                                   validate=self.first_linear)
        o = o.reshape(*hidden_states.shape[:-1], -1)
        return self.o_proj(o if self.out_norm is None else self.out_norm(o)), None


class SoftmaxAttention(LlamaAttention):
    """Llama attention (its projections, RoPE at global positions) computed by ``allgather_attention``."""

    def __init__(self, config: LinearLlamaConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.sp_group: Group = None
        self.sp_layout = "contiguous"

    def forward(self, hidden_states, position_embeddings=None, **kwargs) -> tuple[torch.Tensor, None]:
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)  # RoPE wants [B, H, L, d]
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape)
        q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
        o = allgather_attention(
            q.transpose(1, 2), k.transpose(1, 2), v, group=self.sp_group, layout=self.sp_layout,
            softmax_scale=self.scaling,
        )
        return self.o_proj(o.reshape(*hidden_states.shape[:-1], -1)), None


class LinearLlamaDecoderLayer(LlamaDecoderLayer):
    """Llama's decoder layer (norms, residuals, MLP) with the mixer ``config.layer_types[layer_idx]``."""

    def __init__(self, config: LinearLlamaConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        mixer = LinearAttention if config.layer_types[layer_idx] == LINEAR else SoftmaxAttention
        self.self_attn = mixer(config, layer_idx)


class LinearLlamaPreTrainedModel(PreTrainedModel):
    config_class = LinearLlamaConfig
    config: LinearLlamaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules: ClassVar[list[str]] = ["LinearLlamaDecoderLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, LinearAttention) and module.decay_logit is not None:
            init.copy_(module.decay_logit, module.initial_decay_logit())

    def set_sequence_parallel(self, group: Group, layout: str = "contiguous") -> LinearLlamaPreTrainedModel:
        """Run every layer over the SP ``group`` (None = one device) with inputs sharded in ``layout``."""
        if layout not in LAYOUTS:
            raise ValueError(f"layout={layout!r}: use one of {LAYOUTS}")
        if layout != "contiguous" and LINEAR in self.config.layer_types and group_size(group) > 1:
            raise ValueError(
                f"layout={layout!r} with linear attention layers: LASP-2 needs layout='contiguous' "
                "(each rank's prefix state must cover all earlier tokens)"
            )
        for module in self.modules():
            if isinstance(module, (LinearAttention, SoftmaxAttention)):
                module.sp_group = group
            if isinstance(module, SoftmaxAttention):
                module.sp_layout = layout
            if isinstance(module, LinearLlamaModel):
                module.sp_group, module.sp_layout = group, layout
        return self


class LinearLlamaModel(LinearLlamaPreTrainedModel):
    def __init__(self, config: LinearLlamaConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        layers = [LinearLlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        self.layers = nn.ModuleList(layers)
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.sp_group: Group = None
        self.sp_layout = "contiguous"
        self.gradient_checkpointing = False
        self.post_init()

    def forward(self, input_ids=None, position_ids=None, inputs_embeds=None, attention_mask=None, **kwargs):
        """``input_ids [B, L/N]``: this rank's shard; ``position_ids``: global (default: the layout's)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("attention_mask with padding is not supported: pass attention_mask=None")
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if position_ids is None:
            n = h.shape[1] * group_size(self.sp_group)
            position_ids = global_position_ids(n, group=self.sp_group, layout=self.sp_layout, device=h.device)
            position_ids = position_ids.unsqueeze(0).expand(h.shape[0], -1)
        position_embeddings = self.rotary_emb(h, position_ids=position_ids)
        for layer in self.layers:
            h = layer(h, position_embeddings=position_embeddings, position_ids=position_ids)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(h))


class LinearLlamaForCausalLM(LinearLlamaPreTrainedModel):
    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LinearLlamaConfig):
        super().__init__(config)
        self.model = LinearLlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, position_ids=None, inputs_embeds=None, labels=None, **kwargs):
        """Logits ``[B, L/N, vocab]`` of this rank's shard. ``labels`` (HF convention, unshifted) only on
        one device; under SP shift labels globally and reduce the loss over the group
        (``seqpar.models.batch``)."""
        h = self.model(input_ids=input_ids, position_ids=position_ids, inputs_embeds=inputs_embeds, **kwargs)
        logits = self.lm_head(h.last_hidden_state)
        loss = None
        if labels is not None:
            if group_size(self.model.sp_group) > 1:
                raise ValueError(
                    "labels under sequence parallelism: a shard cannot shift its own labels; pass "
                    "labels=None and compute the loss from the logits (seqpar.models.batch.sp_cross_entropy)"
                )
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size)
        return CausalLMOutputWithPast(loss=loss, logits=logits)


AutoConfig.register("linear_llama", LinearLlamaConfig, exist_ok=True)
AutoModelForCausalLM.register(LinearLlamaConfig, LinearLlamaForCausalLM, exist_ok=True)
