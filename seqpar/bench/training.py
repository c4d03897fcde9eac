"""Model-level methods: one training step (forward + loss + backward) of a small Llama built from a config.

Every rank of an SP group gets the same full batch ``input_ids [B, L]`` and keeps its shard ``[B, L/N]``
(``seqpar.models.shard_batch``: globally shifted labels, global position ids); the loss is
``sp_cross_entropy`` (the mean over the WHOLE sequence), so every method computes the same loss. ``step()``
returns it and ``results.json`` records it per row: equal losses across methods are a free exactness check.

    llama_single             one process, the unpatched model (transformers' SDPA attention), whole sequence
    llama_ring, llama_ulysses, llama_s2
                             ``patch_model(model, attention=..., parallel=group)``: seqpar's primitives
    llama_ring_ckpt          llama_ring with gradient checkpointing (the trainer's gradient_checkpointing)
    qwen3next_single, qwen3next_lasp2
                             a tiny Qwen3-Next (Gated DeltaNet hybrid, MoE): one process (seqpar's kernels on
                             one device) against LASP-2 + ring attention (the hybrid suite's whole-model row)
    llama_deepspeed_ulysses  DeepSpeed's own HF sequence parallelism (ALST, Arctic Long Sequence Training):
                             ``UlyssesSPAttentionHF.register_with_transformers`` swaps transformers' "sdpa"
                             function for its all-to-all wrapper; same contiguous shards and loss

By default the step is forward + loss + backward with no optimizer and no engine for anyone (parameter
gradients are not all-reduced: the trainer's job, identical for all methods). With ``cfg["engine"] ==
"zero3"`` every method runs inside a DeepSpeed ZeRO-3 engine (torch AdamW, ``mpu`` = DeepSpeed's SP groups
for its own Ulysses) and the step adds ``engine.backward`` and ``engine.step()``: the setting ALST is
documented with, applied to all methods alike. Bytes counted per step are those of the attention primitive
per layer (its module docstring) plus 2 float64 for the loss; ZeRO-3's collectives bypass the counter.
"""

from __future__ import annotations

import torch

from seqpar.bench.methods import method

# Model shapes by name. "tiny": the e2e / scaling model; "quickstart": recipes/quickstart-cpu.yaml's model.
MODELS = {
    "tiny": {"vocab_size": 1024, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
             "num_attention_heads": 8, "num_key_value_heads": 8},
    "quickstart": {"vocab_size": 260, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "num_key_value_heads": 2},
}


def build_llama(name: str, seq_len: int) -> torch.nn.Module:
    """A randomly initialised ``LlamaForCausalLM`` (seed 0) with transformers' SDPA attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**MODELS[name], max_position_embeddings=max(seq_len, 2048))
    model = LlamaForCausalLM(config)
    model.set_attn_implementation("sdpa")
    return model


def _zero3(model: torch.nn.Module, batch: int, mpu=None):
    """A DeepSpeed ZeRO-3 engine around ``model`` (torch AdamW: nothing to JIT-build). It averages gradients
    over all ranks where SP training sums them (seqpar.train scales the loss): the same cost, so the bench
    leaves it; the optimizer step's values are not what is measured."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    config = {"train_micro_batch_size_per_gpu": batch, "zero_optimization": {"stage": 3},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-5, "torch_adam": True}},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config, mpu=mpu)
    return engine


def _train_step(model: torch.nn.Module, cfg: dict, group, layout: str, mpu=None):
    """``step()``: forward on this rank's shard, ``sp_cross_entropy``, backward (ZeRO-3: and the optimizer
    step); returns the loss."""
    from seqpar.models.batch import shard_batch, sp_cross_entropy

    ids = torch.randint(0, model.config.vocab_size, (cfg["batch"], cfg["seq_len"]),
                        generator=torch.Generator().manual_seed(1))
    shard = shard_batch({"input_ids": ids}, group, layout)
    labels = shard.pop("labels")
    engine = _zero3(model, cfg["batch"], mpu) if cfg.get("engine") == "zero3" else None

    def step() -> torch.Tensor:
        if engine is None:
            model.zero_grad(set_to_none=True)
        loss = sp_cross_entropy((engine or model)(**shard, use_cache=False).logits, labels, group)
        if engine is None:
            loss.backward()
        else:
            engine.backward(loss)
            engine.step()
        return loss.detach()

    step.layout = layout
    return step


@method("llama_single")
def _llama_single(cfg: dict, group):
    """One process, the whole sequence, transformers' own SDPA attention: the baseline."""
    return _train_step(build_llama(cfg["model"], cfg["seq_len"]), cfg, None, "contiguous")


def _patched(attention: str):
    def build(cfg: dict, group):
        from seqpar.models.patch import patch_model, patched_layout

        model = patch_model(build_llama(cfg["model"], cfg["seq_len"]), attention=attention, parallel=group)
        return _train_step(model, cfg, group, patched_layout(model))

    return build


for _name in ("ring", "ulysses", "s2"):
    method(f"llama_{_name}")(_patched(_name))


# The hybrid suite's whole-model row (issue 22): a tiny Qwen3-Next, 3 Gated DeltaNet layers then one gated
# attention layer, MoE MLPs (4 experts, 2 per token), float32.
QWEN3_NEXT = {"vocab_size": 1024, "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8,
              "num_key_value_heads": 2, "head_dim": 32, "linear_num_key_heads": 4, "linear_num_value_heads": 8,
              "linear_key_head_dim": 32, "linear_value_head_dim": 32, "num_experts": 4, "num_experts_per_tok": 2,
              "moe_intermediate_size": 128, "shared_expert_intermediate_size": 128, "intermediate_size": 512}


def build_qwen3_next(seq_len: int) -> torch.nn.Module:
    """A randomly initialised ``Qwen3NextForCausalLM`` (seed 0), eager experts (no grouped-matmul kernel)."""
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    torch.manual_seed(0)
    config = Qwen3NextConfig(**QWEN3_NEXT, max_position_embeddings=max(seq_len, 2048))
    config._experts_implementation = "eager"
    model = Qwen3NextForCausalLM(config)
    model.set_attn_implementation("sdpa")
    return model.train()


@method("qwen3next_single")
def _qwen3next_single(cfg: dict, group):
    """One process, the whole sequence: the model patched on one device (seqpar's chunked delta rule and conv,
    the same kernels the SP rows run; transformers' own fallback is the slower per-row loop)."""
    from seqpar.models.patch import patch_model

    return _train_step(patch_model(build_qwen3_next(cfg["seq_len"]), attention="full", parallel=None), cfg,
                       None, "contiguous")


@method("qwen3next_lasp2")
def _qwen3next_lasp2(cfg: dict, group):
    """The Gated DeltaNet layers by LASP-2 (affine maps, conv halo), the attention layer by ring attention."""
    from seqpar.models.patch import patch_model, patched_layout

    model = patch_model(build_qwen3_next(cfg["seq_len"]), attention="ring", parallel=group)
    return _train_step(model, cfg, group, patched_layout(model))


@method("llama_ring_ckpt")
def _llama_ring_ckpt(cfg: dict, group):
    """``llama_ring`` with transformers' gradient checkpointing (each layer's forward recomputed in backward),
    as ``trainer.gradient_checkpointing: true`` runs it."""
    from seqpar.models.patch import patch_model, patched_layout

    model = patch_model(build_llama(cfg["model"], cfg["seq_len"]), attention="ring", parallel=group)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return _train_step(model.train(), cfg, group, patched_layout(model))


@method("llama_deepspeed_ulysses")
def _llama_deepspeed_ulysses(cfg: dict, group):
    """DeepSpeed ALST: ``UlyssesSPAttentionHF`` registered over transformers' SDPA, its own SP group."""
    import deepspeed
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    model = build_llama(cfg["model"], cfg["seq_len"])
    if group is None:  # SP = 1: DeepSpeed registers nothing and the model runs as is
        return _train_step(model, cfg, None, "contiguous")
    deepspeed.init_distributed(dist_backend="gloo")
    sp = torch.distributed.get_world_size(group)
    mpu = UlyssesSPAttentionHF.register_with_transformers(
        model, core_attn_implementation="sdpa", sequence_parallel_size=sp, micro_batch_size=cfg["batch"],
        seq_length=cfg["seq_len"], seq_length_is_variable=False,
    )
    step = _train_step(model, cfg, mpu.get_sequence_parallel_group(), "contiguous", mpu)
    step.peer = True  # its all-to-alls bypass seqpar.comm: the byte counter sees only the loss all-reduce
    return step
import seqpar.bench.memory  # noqa: E402, F401  (registers the llama3_* methods of the memory comparison)
