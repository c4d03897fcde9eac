"""Memory planner for ``seqpar train RECIPE --dry-run``: estimated peak memory per rank, and the longest
``data.seq_len`` that fits a device (``--device-memory 80GiB``); ``--simulate`` checks it by running the step
(seqpar.train.simulate).

State kept across steps (per rank, W ranks, P parameters of which T trainable, b bytes per element of the model
dtype), as DeepSpeed 0.19 holds it with seqpar.train.engine's config (``plan_memory`` says where each part
comes from in deepspeed/runtime/zero): parameters ``P b`` (ZeRO-3: / W); the optimizer: a float32 clone of this
rank's partition (also for float32 models) and Adam's m, v, ``12 T / W`` (ZeRO-0: ``T (8 + 4 if b < 4)``;
``deepspeed.offload=cpu``: on the host); gradients: ZeRO-0/1 whole in ``.grad``, ZeRO-2 only in the step (a
bucket of ``reduce_bucket_size`` = 5e8 elements from the first gradient on, on CPU the pages written; then its
flattened copy and the reduced partition), ZeRO-3 a flat partition and the bucket from the build on, plus one
module's gathered parameters and the prefetch window. float32 gradients when bf16 runs with sequence
parallelism (engine.gradient_precision). On CPU the process itself (CPU_RUNTIME). P is counted on the meta
device from the config (MoE experts and linear-attention layers included; the dense formula where that fails).

Activations of one micro-batch, ``t = micro_batch x seq_len / sp_size`` tokens per rank, layer by layer as
``seqpar.train.planner_layers`` reads the model's kinds of decoder layer from the model built on the meta
device (softmax or latent attention, Mamba2, Gated DeltaNet, Kimi Delta Attention; dense or MoE MLPs; their
norms), per token:

    per layer, kept for backward     its norms, token mixer and MLP (planner_layers' table; a Llama layer:
                                     two norms 16 d, q, k, v after RoPE, the output and its log-sum-exp,
                                     (H + 2 Hkv) hd b + H hd b + 4 H, the MLP 4 I b)
    gradient checkpointing           only the layer input ``t d b`` per layer (0 with checkpoint offload; plus
                                     the linear layers' segment states), plus one layer's activations while
                                     it is recomputed
    tiled MLP                        a dense MLP's ``4 I b`` for ``mlp_chunk_size`` tokens instead of t
    head + loss                      full logits: ``12 t V`` (at log-softmax's backward: its float32 output, the
                                     gradients of the log-probabilities and of the logits); fused: ``2 c V x 4``
                                     for a tile of c tokens and logsumexp's temporary + the float32 ``V d x 4``
                                     (d W, when the output layer is trained); both + the final RMSNorm's saved
                                     work ``t d (2 b + 8)`` (b < 4)
    the loss's backward (fused)      ``V d (4 + b)`` (d W scaled, cast) + ``2 t d b``, if above one layer's
    one layer's backward             its recomputed activations and their gradients (planner_layers), + 8 t d
                                     below float32 (the norms' float32 gradients), or its largest trained
                                     weight's whole gradient if larger
    communication buffers            ring: 2 K/V blocks in flight; Ulysses/USP: the all-to-all'd q, k, v, out;
                                     all-gather/LASP-2H: the whole K, V

The peak is the engine build's (the loaded model and its flattened copy) or the state plus the largest of three
phases of the step: the forward's (kept activations + the loss head, or a checkpointed layer running its
forward: bounded by what it keeps when recomputed), the backward (kept activations + one layer's recomputation
with its gradients, or the loss's backward, + ZeRO-2's bucket), the reduction (bucket, flattened copy,
partition). Not counted: allocator fragmentation, the CUDA context and kernel workspaces (leave ~10% headroom).
Checked (tests/test_planner.py) against the RSS peak of whole ``seqpar train`` processes on CPU (toy recipes:
ZeRO-2 fp32 with the memory options, ZeRO-3 bf16 Ulysses; within 15%) and the live tensors of one step at 2
ranks (within 25%); tests/test_simulate.py against a simulated step; docs/benchmarks.md against ``--simulate``
on every GPU recipe in recipes/.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from seqpar.train.planner_layers import LayerFacts, dense_layer, layer_facts
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
    kinds: tuple[LayerFacts, ...] = ()  # the kinds of decoder layer and their counts (seqpar.train.planner_layers)

    @classmethod
    def of(cls, config: Any) -> ModelShape:
        d, H = config.hidden_size, config.num_attention_heads
        hd = getattr(config, "head_dim", None) or d // H
        Hkv = getattr(config, "num_key_value_heads", None) or H
        n, I, V = config.num_hidden_layers, config.intermediate_size, config.vocab_size
        tied = bool(getattr(config, "tie_word_embeddings", False))
        layer = d * (H + 2 * Hkv) * hd + H * hd * d + 3 * d * I + 2 * d
        params = _count_params(config) or n * layer + V * d * (1 if tied else 2) + d
        kinds = layer_facts(config) or (dense_layer(n, d, I, H, Hkv, hd, layer),)
        return cls(n, d, I, H, Hkv, hd, V, params, tied, kinds)


def _count_params(config: Any) -> int:
    """The model's exact parameter count, built on the meta device (no memory, MoE experts and linear layers
    included), or 0 where transformers cannot build it from the config (the dense formula is used then)."""
    from seqpar.train.model import meta_model

    model = meta_model(config)
    return sum(p.numel() for p in model.parameters()) if model is not None else 0


def activation_bytes(s: ModelShape, tokens: int, b: int, *, attention: str = "full", sp: int = 1,
                     checkpointing: bool = False, offload: bool = False, fused_chunk: int | None = None,
                     mlp_chunk: int | None = None, cpu: bool = False, head_trainable: bool = True,
                     layers_trainable: bool = True) -> dict[str, int]:
    """Peak activation bytes of one forward + backward on one rank holding ``tokens`` tokens (see the module
    docstring and ``seqpar.train.planner_layers`` for each kind of layer); returns the parts: ``kept`` (saved
    for backward), ``head`` (loss), ``working`` (one layer's recomputation or backward, or the loss's backward
    if larger), ``comm`` (attention buffers). ``cpu``: the fused loss computes in float32 there;
    ``head_trainable``: the output layer's weight gets a gradient (the fused loss then keeps a float32 d W
    accumulator); ``layers_trainable``: the decoder layers' weights get gradients (not LoRA's frozen ones)."""
    t, d = tokens, s.hidden
    mlp_tokens = min(t, mlp_chunk) if mlp_chunk else t
    kept, working, comm, running = 0, 0, 0, 0
    for k in s.kinds or (dense_layer(s.layers, d, s.intermediate, s.heads, s.kv_heads, s.head_dim, 0),):
        norms = k.norm_elems * (10 if k.offset_norm and b < 4 else 8)
        tiled = bool(mlp_chunk and k.dense_width)
        mlp_tile = mlp_tokens * 4 * k.dense_width * b  # one tile's intermediates, alive while it is computed
        mlp = d * b if tiled else k.mlp_b * b + k.mlp_f * 4  # a tiled MLP keeps only its input
        # SF-Attn keeps its shifted, sink-extended copies of q, k, v and the output too
        shifted = SHIFTED_COPIES.get(attention, 0) * k.mixer_b if k.qkv else 0
        layer = t * (norms + k.mixer_b * b + k.mixer_f * 4 + mlp + shifted * b)
        layer_input = (0 if offload else t * d * b) + t * k.ckpt_f * 4
        kept += k.count * (layer_input if checkpointing else layer)
        # Backward through one layer: its activations (recomputed when checkpointed) and their gradients' worth;
        # below float32, the norms' float32 gradients and input copies too (~8 bytes per token and hidden unit,
        # measured on fake CUDA). A tiled MLP's backward (tile by tile) is over before the mixer's starts: the
        # larger of the two is alive with the layer's recomputed activations; untiled, the MLP's gradients are
        # still alive during the mixer's. The largest weight's whole gradient exists once, before DeepSpeed
        # takes it.
        mixer_grads = t * k.mixer_grads * b + (t * d * 8 if b < 4 else 0)
        if sp > 1 and attention in ("allgather", "lasp2"):  # the gathered K/V's gradients, reduce-scattered back
            mixer_grads += 2 * sp * t * k.kv * b  # (measured: LASP-2H's softmax layer at 8k tokens x 16 ranks)
        mlp_grads = (mlp_tokens * 3 * k.dense_width * b + mlp_tile) if tiled else t * k.mlp_grads * b
        grads = max(mixer_grads, mlp_grads) if tiled else mixer_grads + mlp_grads
        grads = max(grads, k.largest_param * b if layers_trainable else 0)
        working = max(working, (layer if checkpointing else 0) + grads)
        running = max(running, layer if checkpointing else 0)  # a checkpointed layer's forward, not saving
        if sp > 1 and k.kv:
            kv = t * k.kv * b
            comm = max(comm, {"ring": 2 * kv, "rsa": 2 * kv, "allgather": sp * kv, "lasp2": sp * kv,
                              "ulysses": 2 * t * k.qkv * b, "usp": 2 * t * k.qkv * b}.get(attention, 0))
    if fused_chunk:
        c = min(t, fused_chunk)
        # a tile's float32 logits and logsumexp's [c, V] temporary, the float32 d W accumulator (made in the
        # forward: the weight's gradient only after the loss's backward), d hidden; on CPU below float32 the
        # float32 copy of the weight the tiles are computed with
        dw = s.vocab * d * 4 if head_trainable else 0
        head = 2 * c * s.vocab * 4 + dw + t * d * b + (s.vocab * d * 4 if b < 4 and cpu else 0)
        # the loss's backward: d W scaled in place and cast to the weight's dtype, d hidden scaled
        head_backward = (dw + s.vocab * d * b if dw and b < 4 else dw) + 2 * t * d * b
    else:
        head = t * s.vocab * 12  # at log_softmax's backward: its float32 output, d log-probs, d logits
        head_backward = 0  # inside ``head``: the logits' backward is the loss's
    # The final RMSNorm (outside the checkpointed layers) keeps its float32 work for the backward while the loss
    # runs: measured on fake CUDA (Llama-3-8B, bf16, 64k-537k tokens per rank) ~12 bytes per token and hidden unit.
    head += t * d * (2 * b + 8 if b < 4 else 8)
    working = max(working, head_backward)
    # the forward's peak above the kept activations: the loss head, or a checkpointed layer while it runs (its
    # temporaries, bounded by what it keeps when it is recomputed: measured 0.6-1.0 of it)
    return {"kept": kept, "head": max(head, running), "working": working, "comm": comm}


def step_peak(parts: dict[str, int]) -> int:
    return parts["kept"] + parts["comm"] + max(parts["head"], parts["working"])


# DeepSpeed's defaults (deepspeed/runtime/zero/config.py, 0.19; seqpar.train.engine sets none of them): the
# gradient bucket (elements) and ZeRO-3's prefetch window.
REDUCE_BUCKET = 500_000_000
PREFETCH_BUCKET = 50_000_000
# What a CPU training process holds besides its tensors once it has run a step: code pages of torch's kernels
# touched by the first step, the allocator's heap of small blocks, gloo's and DeepSpeed's host buffers, thread
# stacks. Measured 84 MiB between the steps of issue 26's toy recipe (RSS 344 MiB above the imports, live tensors
# 260 MiB); on a GPU the same is host memory (the device's counterpart, the CUDA context, is not counted).
CPU_RUNTIME = 80 * 2**20
# Copies of a softmax layer's q, k, v and output that SF-Attn keeps besides the plain ones (its shifted heads with
# the sink tokens prepended): measured on fake CUDA, SinkLoRA 8B at 32k on 8 ranks (the recipe), about 2 (qkv +
# H hd) b per token more than S2-Attn's (LongLoRA 7B at 100k on 8 ranks), which the plain formula matches.
SHIFTED_COPIES = {"sf": 2}


@dataclass
class MemoryPlan:
    """One rank's bytes. ``state``: kept across steps (parameters, optimizer states: DeepSpeed's float32
    master partition and Adam's m and v, gradients where they persist). ``phases``: the step's three candidate
    peaks above that state, each the activations alive then plus DeepSpeed's buffers: ``head`` (the end of the
    forward: all kept activations and the loss), ``backward`` (one layer's backward with the gradients made so
    far in DeepSpeed's bucket), ``reduce`` (the end of the backward: the bucket, its flattened copy and the
    reduced partition). ``setup``: the peak while the engine is built (the model and its flattened copy)."""

    params: int
    grads: int
    optimizer: int
    activations: dict
    tokens_per_rank: int
    buffers: dict = field(default_factory=dict)
    runtime: int = 0
    setup: int = 0
    layers: str = ""  # the kinds of decoder layer counted, e.g. "36 Gated DeltaNet + MoE, 12 softmax attention + MoE"

    @property
    def state(self) -> int:
        return self.params + self.grads + self.optimizer + self.runtime + self.buffers.get("kept_bucket", 0)

    @property
    def phases(self) -> dict[str, int]:
        a = self.activations
        return self.phases_of(a["kept"] + a["comm"] + a["head"], a["kept"] + a["comm"] + a["working"])

    def phases_of(self, forward: int, backward: int) -> dict[str, int]:
        """The three phases with the forward's and the backward's activation peaks given (planned, or measured
        by ``--simulate``) and DeepSpeed's buffers added."""
        bu = self.buffers
        return {"head": forward + bu.get("gathered", 0),
                "backward": backward + bu.get("gathered", 0) + bu.get("bucket", 0),
                "reduce": bu.get("bucket", 0) + bu.get("flat_copy", 0) + bu.get("partition", 0)}

    def total_of(self, phases: dict[str, int]) -> int:
        return max(self.setup, self.state + max(phases.values()))

    @property
    def total(self) -> int:
        return self.total_of(self.phases)

    def lines(self) -> list[str]:
        a, bu, ph = self.activations, self.buffers, self.phases
        peak = max(ph, key=ph.get)
        out = [f"estimated peak memory per rank: {gib(self.total)} ({self.tokens_per_rank} tokens per rank"
               + (f"; layers: {self.layers}" if self.layers else "") + ")",
               f"  parameters {gib(self.params)}, gradients {gib(self.grads)}, optimizer states {gib(self.optimizer)}"
               " (float32 master partition + Adam m, v)" + (f", CPU process runtime {gib(self.runtime)}"
                                                            if self.runtime else ""),
               f"  activations kept for backward {gib(a['kept'])}, loss head {gib(a['head'])}, one layer's "
               f"backward {gib(a['working'])}, attention communication buffers {gib(a['comm'])}",
               f"  deepspeed buffers: gradient bucket {gib(bu.get('bucket', 0) or bu.get('kept_bucket', 0))}"
               f"{' (kept across steps)' if bu.get('kept_bucket') else ''}, its flattened copy "
               f"{gib(bu.get('flat_copy', 0))}, reduced partition {gib(bu.get('partition', 0))}, gathered "
               f"parameters {gib(bu.get('gathered', 0))}",
               f"  peak at the step's {peak} phase (head {gib(ph['head'])}, backward {gib(ph['backward'])}, "
               f"reduce {gib(ph['reduce'])} above the state); engine build {gib(self.setup)}"]
        return out


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


def _head_trainable(recipe: Recipe, s: ModelShape) -> bool:
    """Whether the output layer's weight is trained: all of it without LoRA, else ``lm_head`` (or, tied, ``embed``)
    among ``lora.trainable``."""
    lo = recipe.lora
    return not lo.enabled or "lm_head" in lo.trainable or (s.tied and "embed" in lo.trainable)


def plan_memory(recipe: Recipe, config: Any, world: int, seq_len: int | None = None) -> MemoryPlan:
    """Estimated peak memory of one rank training ``recipe`` on ``world`` ranks (see the module docstring).

    DeepSpeed's part follows deepspeed/runtime/zero (0.19) as ``seqpar.train.engine`` configures it: ZeRO-1/2
    flatten the parameters into one buffer (the build briefly holds both), keep a float32 clone of this rank's
    partition as the master copy whatever the model dtype, and Adam's m and v for it; ZeRO-2's gradients go into a
    bucket of ``reduce_bucket_size`` elements (allocated whole from the first gradient of each step on a GPU; on
    CPU only the pages written count, at most the trainable parameters), flattened once more for the reduction
    (float32 when bf16 gradients are communicated in float32: sequence parallelism) and kept reduced as this
    rank's partition; ZeRO-3 keeps its bucket and a flat gradient partition from the engine's build on, and
    gathers one module's parameters at a time (the head's or embedding's V x d, or a layer) plus a prefetch
    window. ``deepspeed.offload=cpu`` moves the master partition, Adam and (ZeRO-3) the parameters to the host.
    ``engine: fsdp2`` is planned as ZeRO-3 without DeepSpeed's buckets.
    """
    s = ModelShape.of(config)
    b = 2 if recipe.trainer.dtype == "bf16" else 4
    fsdp = getattr(recipe, "engine", "deepspeed") == "fsdp2"
    z = 3 if fsdp else recipe.deepspeed.zero_stage
    offload = (recipe.fsdp2.offload if fsdp else recipe.deepspeed.offload) == "cpu"
    W, sp = max(1, world), recipe.attention.sp_size
    cpu = recipe.launch.device == "cpu"
    T = _trainable(recipe, s)
    gb = 4 if b < 4 and sp > 1 and z > 0 else b  # fp32 gradient accumulation with SP (engine.gradient_precision)
    params = 0 if (z == 3 and offload) else s.params * b // (W if z == 3 else 1)
    # Adam's m, v (+ a float32 master copy of bf16 weights); ZeRO: this rank's float32 partition clone + m, v
    optimizer = T * (8 + (4 if b < 4 else 0)) if z == 0 else 0 if offload else T * 12 // W
    buffers: dict[str, int] = {}
    bucket_cap = T if fsdp else min(REDUCE_BUCKET, T) if cpu else REDUCE_BUCKET
    flat = min(REDUCE_BUCKET, T)
    comm_copy = flat * 4 if (b < 4 and sp > 1) else 0
    if z <= 1:
        grads = T * b  # whole gradients in .grad until the boundary's reduction
        buffers.update(flat_copy=flat * b + comm_copy, partition=T * gb // W if z else 0)
    elif z == 2:
        grads = 0  # in the bucket during the backward, freed after the step
        buffers.update(bucket=bucket_cap * gb, flat_copy=flat * gb + comm_copy, partition=T * gb // W)
    else:
        grads = 0 if offload else T * gb // W  # the flat gradient partition, from the engine's build on
        buffers["kept_bucket"] = 0 if fsdp else bucket_cap * gb  # ZeRO-3's bucket, also from the build on
        layer = (s.params - s.vocab * s.hidden * (1 if s.tied else 2)) // max(1, s.layers)
        gathered = max(s.vocab * s.hidden, layer) + (0 if fsdp else min(PREFETCH_BUCKET, s.params))
        buffers["gathered"] = gathered * b
    runtime = CPU_RUNTIME if cpu else 0
    tokens = recipe.trainer.micro_batch * (seq_len or recipe.data.seq_len) // sp
    m = recipe.memory
    parts = activation_bytes(
        s, tokens, b, attention=recipe.attention.name, sp=sp, checkpointing=recipe.trainer.gradient_checkpointing,
        offload=bool(m.offload_checkpoints) and not cpu, fused_chunk=m.loss_chunk_size if m.fused_loss else None,
        mlp_chunk=m.mlp_chunk_size if m.tiled_mlp else None, cpu=cpu, head_trainable=_head_trainable(recipe, s),
        layers_trainable=not recipe.lora.enabled)
    # The build: from_config models are made in float32 (rank 0, then saved); ZeRO-1/2 then hold the loaded
    # parameters and their flattened copy at once, and the float32 partition.
    setup = max(s.params * 4 if recipe.model.from_config is not None else 0,
                (2 * s.params * b + (0 if offload else T * 4 // W)) if z in (1, 2) else 0) + runtime
    layers = ", ".join(f"{k.count} {k.kind}" for k in s.kinds)
    return MemoryPlan(params, grads, optimizer, parts, tokens, buffers, runtime, setup, layers)


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
