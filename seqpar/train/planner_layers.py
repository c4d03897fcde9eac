"""What one decoder layer keeps per token, by kind of token mixer and MLP, for the memory planner
(``seqpar.train.planner``): read from the model built on the meta device (no memory), so hybrids (Mamba2,
Gated DeltaNet, Kimi Delta Attention, softmax layers between them) and MoE layers are counted as they are.

Per token, b the model dtype's bytes, every float32 temporary 4 (the terms each code path keeps for the
backward; checked on fake CUDA against ``seqpar.train.simulate``'s measured step, per layer, on the recipes'
models: Llama-3-8B, Gemma 3, gpt-oss, Bamba, Qwen3-Next, Kimi Linear):

    norm of n elements            8 n          its float32 copy and normalised float32 output (Gemma, Qwen3-Next
                                  (10 n)       norms: also the float32 product with (1 + w))
    softmax attention             (H + 2 Hkv) hd b + H hd b + 4 H    q, k, v after RoPE, the output, the
                                               log-sum-exp; + q/k norms over their heads; + a gated output
                                               (Qwen3-Next): the gate and the product, 2 H hd b
    multi-head latent attention   as softmax attention with qk heads of (nope + rope), v heads of v_head_dim,
                                               + the latent (kv_lora_rank + rope) b and its norm
    dense MLP                     4 I b        gate, act(gate), up, their product (I: the MLP's width)
    MoE MLP (grouped experts)     k (2 d + 4 I) b + 4 E      each of the k routed copies: its gathered
                                               input, gate-up output, activation, product, down output; the
                                               router's float32 scores; + a shared expert as a dense MLP
    Mamba2 mixer (SSD)            in_proj b + 3 conv b + 4 (3 H Q + 2 H N + 2 H P N / Q + 16 H P)    the
                                               projections, the short conv's halo, output and activation; the
                                               scan's chunk-quadratic terms C·B, the decays and the scores
                                               [H, Q] per token (Q the chunk), B and C repeated per head, the
                                               chunk states, and its [H, P] float32 work (Δ x, outputs,
                                               corrections, the gated norm)
    linear attention (Linear-Llama) (qkv + H hd) b + 10 H hd: q, k, v, the output; its feature maps and output
                                               norm in float32 (LASP-2 moves states, not K/V); backward 12 qkv b
    Gated DeltaNet / KDA          in_proj b + 3 conv b + Hv dv (b + 16)    projections, the short conv, the
                                               output and its gated norm in float32; the rule itself
                                               recomputes (``seqpar.kernels.delta``) and keeps its segment
                                               entry states, Hv dk dv 4 / (4 C) per token, also when the layer
                                               is checkpointed

Backward, above a layer's recomputed activations: softmax attention's gradients ``(2 qkv + 3 d) b`` (q, k, v's
before and after RoPE; + the
norms' float32 gradients 8 d below float32) plus the MLP's (dense ``3 I b``, MoE ``k (d + 2 I) b``), and the
whole gradient of the layer's largest trainable parameter (a 512-expert gate-up weight is 2 GiB: it exists at
once before DeepSpeed reduces it), whichever is larger.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

# norms whose float32 output is also multiplied by (1 + w) in float32 (Gemma's zero-centred weights)
OFFSET_NORMS = re.compile(r"Gemma|Qwen3Next|Qwen3_5|OlmoHybrid")
DELTA_CHUNK, SEGMENT_CHUNKS = 64, 4  # seqpar.kernels.delta's defaults: its saved segment states


@dataclass(frozen=True)
class LayerFacts:
    """One kind of decoder layer, in elements per token (no dtype yet) and what it is made of."""

    kind: str  # "attention + dense MLP", "Mamba2 + MoE", ...
    count: int  # layers of this kind
    norm_elems: int  # elements normalised per token by the layer's own norms
    offset_norm: bool
    mixer_b: int  # per-token elements kept in the model dtype by the mixer
    mixer_f: int  # per-token float32 elements kept by the mixer
    mixer_grads: int  # per-token elements (model dtype) of the mixer's backward
    mlp_b: int  # per-token elements kept by the MLP, untiled (model dtype)
    mlp_f: int  # per-token float32 elements kept by the MLP (router scores)
    mlp_grads: int
    dense_width: int  # I of a dense MLP (tiled MLPs keep one tile of 4 I b), 0 for MoE
    ckpt_f: int  # float32 elements per token kept even when the layer is checkpointed (delta segment states)
    largest_param: int  # elements of its largest trainable-if-trained parameter tensor
    qkv: int  # (H + 2 Hkv) hd of its softmax attention (communication), 0 without
    kv: int  # 2 Hkv hd: the K/V elements per token a ring or all-gather moves, 0 without


def dense_layer(count: int, d: int, inter: int, H: int, Hkv: int, hd: int, params: int) -> LayerFacts:
    """A Llama-style layer from config fields alone (for a config transformers cannot build)."""
    qkv = (H + 2 * Hkv) * hd
    return LayerFacts("softmax attention + dense MLP", count, 2 * d, False, qkv + H * hd, H, 2 * qkv + 3 * d,
                      4 * inter, 0, 3 * inter, inter, 0, max(inter * d, params // 7), qkv, 2 * Hkv * hd)


def _norm_elems(name: str, module: Any, config: Any) -> int:
    width = module.weight.shape[-1] if getattr(module, "weight", None) is not None else 0
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("q_norm", "q_layernorm"):
        return width * config.num_attention_heads
    if leaf in ("k_norm", "k_layernorm"):
        return width * (getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    return width


def _is_norm(module: Any) -> bool:
    name = type(module).__name__
    return "Norm" in name and "Gated" not in name


def _linear_out(module: Any, *names: str) -> int:
    return sum(getattr(module, n).out_features for n in names if hasattr(module, n))


def _describe(layer: Any, config: Any, linear_kinds: dict[str, str]) -> tuple:
    """The facts of one layer (without ``count``) as a tuple; see ``LayerFacts``."""
    import torch

    d = config.hidden_size
    modules = dict(layer.named_modules())
    mixer_name, mixer_kind = "", "attention"
    for name, m in modules.items():
        seam = linear_kinds.get(type(m).__name__)
        if seam:
            mixer_name, mixer_kind = name, seam
            break
    if not mixer_name:
        for name, m in modules.items():
            if type(m).__name__ == "LinearAttention" and name.count(".") == 0:  # Linear-Llama's LASP-2 layers
                mixer_name, mixer_kind = name, "linear"
                break
    if not mixer_name:
        for name, m in modules.items():
            if name.count(".") == 0 and name and ("attn" in name or "attention" in name):
                mixer_name = name
                mixer_kind = "mla" if hasattr(m, "kv_a_proj_with_mqa") or hasattr(m, "kv_a_proj") else "attention"
                break
    mixer = modules.get(mixer_name)

    def inner(n: str) -> bool:  # inside the mixer
        return bool(mixer_name) and (n == mixer_name or n.startswith(mixer_name + "."))

    norm_elems = sum(_norm_elems(n, m, config) for n, m in modules.items() if _is_norm(m) and not inner(n))
    offset = any(OFFSET_NORMS.search(type(m).__name__) for m in modules.values() if _is_norm(m))
    H = config.num_attention_heads
    Hkv = getattr(config, "num_key_value_heads", None) or H
    hd = getattr(config, "head_dim", None) or d // H
    qkv = kv = mixer_b = mixer_f = ckpt_f = 0
    mixer_grads = 0
    if mixer_kind == "attention":
        qn = sum(_norm_elems(n, m, config) for n, m in modules.items() if _is_norm(m) and inner(n))
        q_out = getattr(getattr(mixer, "q_proj", None), "out_features", H * hd)
        gated = q_out == 2 * H * hd
        qkv, kv = (H + 2 * Hkv) * hd, 2 * Hkv * hd
        mixer_b = qkv + H * hd + (2 * H * hd if gated else 0)
        mixer_f = H + qn * (2 if not offset else 2.5)  # q/k norms: 8 (10) bytes per element = 2 (2.5) floats
        mixer_grads = 2 * qkv + 3 * d
    elif mixer_kind == "mla":
        nope = getattr(config, "qk_nope_head_dim", hd)
        rope = getattr(config, "qk_rope_head_dim", 0)
        vd = getattr(config, "v_head_dim", hd)
        latent = getattr(config, "kv_lora_rank", 0) + rope
        qkv, kv = H * (2 * (nope + rope) + vd), H * (nope + rope + vd)
        mixer_b = qkv + H * vd + latent + (getattr(config, "q_lora_rank", None) or 0)
        mixer_f = H + 2 * latent
        mixer_grads = 2 * qkv + 3 * d
    elif mixer_kind == "ssd":
        Hm, P = mixer.num_heads, mixer.head_dim
        N, Q = mixer.ssm_state_size, mixer.chunk_size
        conv = mixer.conv1d.weight.shape[0]
        mixer_b = mixer.in_proj.out_features + 3 * conv
        mixer_f = 3 * Hm * Q + 2 * Hm * N + 2 * Hm * P * N // Q + 16 * Hm * P
        mixer_grads = 2 * Hm * P * 2  # float32 gradients of the scan's [H, P] input and output
    elif mixer_kind in ("gated_delta", "kimi_delta"):
        conv = mixer.conv1d.weight.shape[0]
        proj = sum(m.out_features for n, m in mixer.named_modules() if isinstance(m, torch.nn.Linear)
                   and n.split(".")[-1] not in ("o_proj", "out_proj", "f_b_proj", "g_b_proj"))
        if mixer_kind == "kimi_delta":  # the decay and output gates' low-rank second halves, [H dk] each
            proj += 2 * mixer.num_heads * mixer.head_dim
        Hv = getattr(mixer, "num_v_heads", None) or getattr(mixer, "num_heads", H)
        dk = getattr(mixer, "head_k_dim", None) or getattr(mixer, "head_dim", hd)
        dv = getattr(mixer, "head_v_dim", None) or getattr(mixer, "head_dim", hd)
        mixer_b = proj + 3 * conv + Hv * dv
        mixer_f = 4 * Hv * dv + 3 * Hv
        ckpt_f = Hv * dk * dv // (SEGMENT_CHUNKS * DELTA_CHUNK)
        mixer_f += ckpt_f
        mixer_grads = 2 * conv + 4 * Hv * dv
    elif mixer_kind == "linear":  # q, k, v, the output; feature-mapped q, k and the output norm in float32
        qkv_lin = (H + 2 * Hkv) * hd
        # backward: float32 copies of q, k, v and their float32 gradients in the chunked kernel, 6 + 6 model-dtype
        # elements each (measured: Linear-Llama 1B at 8k tokens per rank)
        mixer_b, mixer_f, mixer_grads = qkv_lin + H * hd, 5 * H * hd // 2, 12 * qkv_lin
    else:  # lightning, selective and unknown mixers: counted as softmax attention
        qkv, kv = (H + 2 * Hkv) * hd, 2 * Hkv * hd
        mixer_b, mixer_f, mixer_grads = qkv + H * hd, H, 2 * qkv + 3 * d
    # the MLP: grouped experts (3-D weights), a shared expert, or a dense gated MLP
    experts = [(n, p) for n, p in layer.named_parameters() if p.dim() == 3 and "expert" in n]  # not conv weights
    mlp_b = mlp_f = mlp_grads = dense = 0
    if experts:
        E = experts[0][1].shape[0]
        down = next((p for n, p in experts if n.endswith("down_proj")), None)
        inter = (down.shape[1] if down.shape[2] == d else down.shape[2]) if down is not None else \
            getattr(config, "moe_intermediate_size", None) or config.intermediate_size
        k = next((getattr(config, a) for a in ("num_experts_per_tok", "top_k", "moe_topk", "num_experts_per_token")
                  if getattr(config, a, None)), 1)
        bias = any(n.endswith("_bias") and p.dim() == 2 and p.shape[0] == E for n, p in layer.named_parameters())
        mlp_b = k * (2 * d + 4 * inter + (inter if bias else 0))
        mlp_f = E
        mlp_grads = k * (d + 2 * inter)
        for n, m in modules.items():
            if re.search(r"shared_experts?$", n) and hasattr(m, "gate_proj"):
                mlp_b += 4 * m.gate_proj.out_features
                mlp_grads += 3 * m.gate_proj.out_features
    else:
        for n, m in modules.items():
            if not inner(n) and hasattr(m, "gate_proj") and hasattr(m, "down_proj"):
                dense = m.gate_proj.out_features
                break
        dense = dense or getattr(config, "intermediate_size", 4 * d)
        mlp_b, mlp_grads = 4 * dense, 3 * dense
    largest = max((p.numel() for p in layer.parameters()), default=0)
    kind = {"attention": "softmax attention", "mla": "multi-head latent attention", "ssd": "Mamba2",
            "gated_delta": "Gated DeltaNet", "kimi_delta": "Kimi Delta Attention",
            "linear": "linear attention (LASP-2)"}.get(mixer_kind, mixer_kind)
    kind += " + " + ("MoE" if experts else "dense MLP")
    return (kind, norm_elems, offset, int(mixer_b), int(mixer_f), int(mixer_grads), int(mlp_b), int(mlp_f),
            int(mlp_grads), int(dense if not experts else 0), int(ckpt_f), int(largest), int(qkv), int(kv))


def layer_facts(config: Any) -> tuple[LayerFacts, ...] | None:
    """The kinds of decoder layer of ``config``'s model with their counts, or None where transformers cannot
    build it (the planner's dense Llama-style formula is used then)."""

    from seqpar.models.families import family_of
    from seqpar.train.model import decoder_layers, meta_model

    model = meta_model(config)
    if model is None:
        return None
    fam = family_of(getattr(config, "model_type", None))
    linear_kinds = dict(fam.linear) if fam else {}
    layers = decoder_layers(model)
    if len(layers) != config.num_hidden_layers:
        return None
    seen: dict[tuple, int] = {}
    for layer in layers:
        facts = _describe(layer, config, linear_kinds)
        seen[facts] = seen.get(facts, 0) + 1
    return tuple(LayerFacts(f[0], n, *f[1:]) for f, n in seen.items())
