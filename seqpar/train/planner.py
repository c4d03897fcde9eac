"""Memory planner for ``seqpar train RECIPE --dry-run``: estimated peak memory per rank, and the longest
``data.seq_len`` that fits a device (``--device-memory 80GiB``).

Static state (per rank, W ranks, P parameters of which T trainable, b bytes per element of the model dtype):
parameters ``P b`` (ZeRO-3: / W), gradients ``T b`` (ZeRO-2/3: / W), Adam ``T x (8 + 4 if b < 4)`` (m, v and a
float32 master copy; ZeRO-1/2/3: / W; ``deepspeed.offload=cpu``: on the host). P is counted on the meta device
from the config (MoE experts and linear-attention layers included; the dense formula where that fails).

Activations of one micro-batch, ``t = micro_batch x seq_len / sp_size`` tokens per rank (Llama-family
decoder, HF code, SDPA-style attention that keeps only q, k, v, out and a float32 log-sum-exp):

    per layer, kept for backward   t x [ d (2 b + 8)              two RMSNorms: input and its float32 copy
                                         + (H + 2 Hkv) hd b x 2     q, k, v before and after RoPE
                                         + H hd (b + 4)             attention output, its log-sum-exp
                                         + 4 I b ]                  MLP: gate, act(gate), up, their product
    gradient checkpointing           only the layer input ``t d b`` per layer (0 with checkpoint offload), plus
                                     one layer's activations while it is recomputed
    tiled MLP                        the ``4 I b`` term for ``mlp_chunk_size`` tokens instead of t
    head + loss                      full logits: ``t V (b + 4 + 4)`` (logits, float32 log-softmax, gradient);
                                     fused: ``2 c V x 4`` for a tile of c tokens + ``V d x 4`` (float32 d W if b < 4)
    communication buffers            ring: 2 K/V blocks in flight; Ulysses/USP: the all-to-all'd q, k, v, out;
                                     all-gather/LASP-2H: the whole K, V

The peak is the static state plus the larger of (all kept activations + the head's peak) and (all kept
activations + one layer's recomputation with its gradients). It is an estimate: allocator fragmentation,
CUDA context and kernel workspaces are not counted (leave ~10% headroom); tests/test_planner.py checks it
against measured peaks of toy runs (within 25%).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import Any

from seqpar.train.recipe import Recipe, RecipeError

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
         "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """``"80GiB"`` -> 85899345920; units B, KB/MB/GB/TB (powers of 10), KiB/MiB/GiB/TiB (powers of 2)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in UNITS:
        raise RecipeError(f"--device-memory {text!r}: give a size such as 80GiB, 141GB or 24000MiB")
    return int(float(m.group(1)) * UNITS[m.group(2).lower()])


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


@dataclass
class ModelShape:
    """What the estimate needs from a config."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    params: int
    tied: bool

    @classmethod
    def of(cls, config: Any) -> ModelShape:
        d, H = config.hidden_size, config.num_attention_heads
        hd = getattr(config, "head_dim", None) or d // H
        Hkv = getattr(config, "num_key_value_heads", None) or H
        n, I, V = config.num_hidden_layers, config.intermediate_size, config.vocab_size
        tied = bool(getattr(config, "tie_word_embeddings", False))
        layer = d * (H + 2 * Hkv) * hd + H * hd * d + 3 * d * I + 2 * d
        params = _count_params(config) or n * layer + V * d * (1 if tied else 2) + d
        return cls(n, d, I, H, Hkv, hd, V, params, tied)


def _count_params(config: Any) -> int:
    """The model's exact parameter count, built on the meta device (no memory, MoE experts and linear layers
    included), or 0 where transformers cannot build it from the config (the dense formula is used then)."""
    from transformers import PretrainedConfig

    if not isinstance(config, PretrainedConfig):
        return 0
    return _count_built(config.to_json_string(use_diff=False), type(config))


@functools.lru_cache(maxsize=8)  # longest_seq_len plans one config many times
def _count_built(config_json: str, config_class: type) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config_class.from_dict(json.loads(config_json)))
    except Exception:  # any config transformers cannot build falls back to the formula
        return 0
    return sum(p.numel() for p in model.parameters())


def activation_bytes(s: ModelShape, tokens: int, b: int, *, attention: str = "full", sp: int = 1,
                     checkpointing: bool = False, offload: bool = False, fused_chunk: int | None = None,
                     mlp_chunk: int | None = None) -> dict[str, int]:
    """Peak activation bytes of one forward + backward on one rank holding ``tokens`` tokens (see the module
    docstring); returns the parts: ``kept`` (saved for backward), ``head`` (loss), ``working`` (one layer's
    recomputation or backward), ``comm`` (attention buffers)."""
    t, d, I = tokens, s.hidden, s.intermediate
    qkv = (s.heads + 2 * s.kv_heads) * s.head_dim
    mlp_tokens = min(t, mlp_chunk) if mlp_chunk else t
    attn_part = t * (d * (2 * b + 8) + qkv * b * 2 + s.heads * s.head_dim * (b + 4))
    mlp_tile = mlp_tokens * 4 * I * b  # one tile's intermediates, alive while it is computed
    layer = attn_part + (t * d * b if mlp_chunk else mlp_tile)  # a tiled MLP keeps only its input
    layer_input = 0 if offload else t * d * b
    kept = s.layers * (layer_input if checkpointing else layer)
    if fused_chunk:
        c = min(t, fused_chunk)
        head = 2 * c * s.vocab * 4 + (s.vocab * d * 4 if b < 4 else 0) + t * d * b
    else:
        head = t * s.vocab * (b + 4 + 4)
    # Backward through one layer: its activations (recomputed when checkpointed) and their gradients' worth.
    working = (layer if checkpointing else 0) + t * (qkv + 3 * d) * b + mlp_tokens * 3 * I * b + \
        (mlp_tile if mlp_chunk else 0)
    kv = t * 2 * s.kv_heads * s.head_dim * b
    comm = {"ring": 2 * kv, "rsa": 2 * kv, "allgather": sp * kv, "lasp2": sp * kv,
            "ulysses": 2 * t * qkv * b, "usp": 2 * t * qkv * b}.get(attention, 0) if sp > 1 else 0
    return {"kept": kept, "head": head, "working": working, "comm": comm}


def step_peak(parts: dict[str, int]) -> int:
    return parts["kept"] + parts["comm"] + max(parts["head"], parts["working"])


@dataclass
class MemoryPlan:
    params: int
    grads: int
    optimizer: int
    activations: dict
    tokens_per_rank: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + step_peak(self.activations)

    def lines(self) -> list[str]:
        a = self.activations
        return [f"estimated peak memory per rank: {gib(self.total)} ({self.tokens_per_rank} tokens per rank)",
                f"  parameters {gib(self.params)}, gradients {gib(self.grads)}, optimizer states {gib(self.optimizer)}",
                f"  activations kept for backward {gib(a['kept'])}, loss head {gib(a['head'])}, one layer's "
                f"backward {gib(a['working'])}, attention communication buffers {gib(a['comm'])}"]


def _trainable(recipe: Recipe, s: ModelShape) -> int:
    lo = recipe.lora
    if not lo.enabled:
        return s.params
    d, qkv_out = s.hidden, s.heads * s.head_dim
    dims = {"q_proj": (d, qkv_out), "k_proj": (d, s.kv_heads * s.head_dim), "v_proj": (d, s.kv_heads * s.head_dim),
            "o_proj": (qkv_out, d), "gate_proj": (d, s.intermediate), "up_proj": (d, s.intermediate),
            "down_proj": (s.intermediate, d)}
    lora = s.layers * sum(lo.r * (i + o) for t, (i, o) in dims.items() if t in lo.targets)
    extras = {"embed": s.vocab * d, "norm": (2 * s.layers + 1) * d, "lm_head": s.vocab * d}
    return lora + sum(extras[x] for x in lo.trainable if x in extras)


def plan_memory(recipe: Recipe, config: Any, world: int, seq_len: int | None = None) -> MemoryPlan:
    """Estimated peak memory of one rank training ``recipe`` on ``world`` ranks (see the module docstring)."""
    s = ModelShape.of(config)
    b = 2 if recipe.trainer.dtype == "bf16" else 4
    z, W = recipe.deepspeed.zero_stage, max(1, world)
    trainable = _trainable(recipe, s)
    params = s.params * b // (W if z == 3 else 1)
    if recipe.lora.enabled and z == 3:
        params = s.params * b // W
    grads = trainable * b // (W if z >= 2 else 1)
    optimizer = 0 if recipe.deepspeed.offload == "cpu" else trainable * (8 + (4 if b < 4 else 0)) // (W if z else 1)
    sp = recipe.attention.sp_size
    tokens = recipe.trainer.micro_batch * (seq_len or recipe.data.seq_len) // sp
    m = recipe.memory
    parts = activation_bytes(
        s, tokens, b, attention=recipe.attention.name, sp=sp, checkpointing=recipe.trainer.gradient_checkpointing,
        offload=bool(m.offload_checkpoints), fused_chunk=m.loss_chunk_size if m.fused_loss else None,
        mlp_chunk=m.mlp_chunk_size if m.tiled_mlp else None)
    return MemoryPlan(params, grads, optimizer, parts, tokens)


def longest_seq_len(recipe: Recipe, config: Any, world: int, budget: int) -> int:
    """The longest ``data.seq_len`` (a multiple of 2 x sp_size x 64) whose estimated peak fits ``budget``."""
    step = 2 * recipe.attention.sp_size * 64
    if plan_memory(recipe, config, world, step).total > budget:
        return 0
    lo, hi = 1, 2
    while plan_memory(recipe, config, world, hi * step).total <= budget and hi < 2**40:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if plan_memory(recipe, config, world, mid * step).total <= budget else (lo, mid)
    return lo * step


def describe_memory(recipe: Recipe, config: Any, world: int, device_memory: str | None) -> str:
    """The ``--dry-run`` lines: the estimate, and with a device size the longest sequence that fits."""
    if not hasattr(config, "hidden_size"):
        return "memory estimate: unavailable (the model's facts are not known)"
    lines = plan_memory(recipe, config, world).lines()
    if device_memory:
        budget = parse_bytes(device_memory)
        best = longest_seq_len(recipe, config, world, int(budget * 0.9))
        lines.append(f"longest data.seq_len within {device_memory} per rank (10% headroom kept): {best} tokens "
                     f"({best // recipe.attention.sp_size} per rank)" if best else
                     f"nothing fits in {device_memory} per rank: the static state alone is "
                     f"{gib(plan_memory(recipe, config, world, 1).total)}")
    return "\n".join(lines)
