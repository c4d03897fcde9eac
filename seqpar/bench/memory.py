"""Longest context per device: one training step (forward + loss + backward, gradient checkpointing on for
everyone) of a Llama-3-shaped toy, with and without the memory options, against DeepSpeed's ALST path.

The toy keeps Llama-3-8B's ratios (vocab / hidden 31.3, MLP 3.5 x hidden, GQA 4:1) at hidden 256:

    llama3_hf              one process, plain transformers (SDPA), full logits + cross-entropy
    llama3_seqpar          seqpar ring attention (zigzag), full logits + sp_cross_entropy (the path before issue 14)
    llama3_seqpar_memory   the same + sp_fused_linear_cross_entropy + tile_mlp (tiles of hidden_size tokens)
    llama3_alst            DeepSpeed ALST: UlyssesSPAttentionHF (N > 1) + TiledMLP + TiledFusedLogitsLoss, tiles
                           by ALST's own rule (ceil(tokens / hidden_size) tiles)

Both tiled paths use the same tile length, so what differs is the attention primitive and the loss.
Checkpoint offload is a no-op on CPU (it moves GPU memory to the host) and is not part of this comparison.

ALST is set up as its docs and tests do: ``register_with_transformers(model, core_attn_implementation="sdpa",
...)`` (the model's own attention implementation; it swaps transformers' "sdpa" function for its all-to-all
wrapper), contiguous shards with global ``position_ids`` and globally shifted labels (what
``UlyssesSPDataLoaderAdapter`` hands each rank: ``shard_batch(..., "contiguous")`` gives the same tensors), the
loss as the sum over this rank's tokens over the global token count. The toy's 8 query : 2 KV heads (Llama-3-8B's
4:1) fit ALST at N = 4 too: with fewer KV heads than ranks it repeats each KV head N / Hkv times before the
all-to-all (``kv_replication_factor``), as it does for Llama-3-8B's 8 KV heads at SP = 16. Its losses equal the
one-process loss at N = 1, 2, 4 (tests/test_bench.py checks N = 2).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from seqpar.bench.methods import method
from seqpar.bench.training import MODELS, build_llama

MODELS["llama3"] = {"vocab_size": 8016, "hidden_size": 256, "intermediate_size": 896, "num_hidden_layers": 4,
                    "num_attention_heads": 8, "num_key_value_heads": 2}


def _model(cfg: dict) -> torch.nn.Module:
    model = build_llama(cfg["model"], cfg["seq_len"])
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def _step(model, cfg: dict, group, layout: str, loss_fn):
    """``step()``: zero grads, forward on this rank's shard, the method's loss, backward; returns the loss."""
    from seqpar.models.batch import shard_batch

    ids = torch.randint(0, model.config.vocab_size, (cfg["batch"], cfg["seq_len"]),
                        generator=torch.Generator().manual_seed(1))
    shard = shard_batch({"input_ids": ids}, group, layout)
    labels = shard.pop("labels")

    def step() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model, shard, labels, group)
        loss.backward()
        return loss.detach()

    step.layout = layout
    return step


def _seqpar(fused: bool):
    def build(cfg: dict, group):
        from seqpar.models import causal_lm_loss
        from seqpar.models.patch import patch_model, patched_layout
        from seqpar.models.tiled_mlp import tile_mlp

        model = patch_model(_model(cfg), attention="ring", parallel=group)
        tile = model.config.hidden_size
        if fused:
            tile_mlp(model, tile)
        chunk = tile if fused else None
        return _step(model, cfg, group, patched_layout(model),
                     lambda m, s, y, g: causal_lm_loss(m, s, y, g, chunk_size=chunk))

    return build


method("llama3_seqpar")(_seqpar(False))
method("llama3_seqpar_memory")(_seqpar(True))


@method("llama3_hf")
def _hf(cfg: dict, group):
    from seqpar.models import causal_lm_loss

    return _step(_model(cfg), cfg, None, "contiguous", lambda m, s, y, g: causal_lm_loss(m, s, y, None))


def _alst_tiled_mlp(model: torch.nn.Module) -> None:
    """DeepSpeed's documented TiledMLP patch (its docstring): ceil(seqlen / hidden) tiles per MLP."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    def mlp_forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    for layer in model.model.layers:
        mlp = layer.mlp

        def forward(x, mlp=mlp):
            shards = math.ceil(x.shape[-2] / x.shape[-1])
            params = [mlp.down_proj.weight, mlp.gate_proj.weight, mlp.up_proj.weight]
            return TiledMLP.apply(mlp_forward, mlp, x, shards, params)

        mlp.forward = forward


def _alst_loss(model, shard, labels, group):
    """TiledFusedLogitsLoss over ceil(tokens / hidden) tiles; each tile returns its summed cross-entropy over
    the global target count, so "sum" gives this rank's share of the global mean (ALST's own loss then
    all-reduces the value only)."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledFusedLogitsLoss

    from seqpar.comm import all_reduce_tensor

    hidden = model.model(**shard, use_cache=False).last_hidden_state
    count = all_reduce_tensor((labels != -100).sum().double().reshape(1), group).clamp(min=1).float().reshape(())
    V = model.config.vocab_size

    def loss_fn(head, x, y):
        return F.cross_entropy(head(x).float().view(-1, V), y.view(-1), ignore_index=-100, reduction="sum") / count

    shards = max(1, math.ceil(hidden.shape[0] * hidden.shape[1] / hidden.shape[-1]))
    local = TiledFusedLogitsLoss.apply(loss_fn, model.lm_head, hidden, labels, None, shards,
                                       [model.lm_head.weight], "sum")
    total = all_reduce_tensor(local.detach().double().reshape(1), group).float().reshape(())
    return local + (total - local.detach())


@method("llama3_alst")
def _alst(cfg: dict, group):
    model = _model(cfg)
    _alst_tiled_mlp(model)
    if group is None:
        return _step(model, cfg, None, "contiguous", _alst_loss)
    import deepspeed
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    deepspeed.init_distributed(dist_backend="gloo")
    import deepspeed.runtime.sequence_parallel.parallel_state_sp as sp_state

    # A search builds the model again in the same processes: register_with_transformers wraps whatever
    # ALL_ATTENTION_FUNCTIONS["sdpa"] holds, which after the first call is the previous length's Ulysses
    # wrapper (nested all-to-alls, then a shape assertion). Start each registration from transformers' own.
    sp_state._release_sequence_parallel_groups()
    ALL_ATTENTION_FUNCTIONS["sdpa"] = sdpa_attention_forward
    mpu = UlyssesSPAttentionHF.register_with_transformers(
        model, core_attn_implementation="sdpa", sequence_parallel_size=torch.distributed.get_world_size(group),
        micro_batch_size=cfg["batch"], seq_length=cfg["seq_len"], seq_length_is_variable=False)
    step = _step(model, cfg, mpu.get_sequence_parallel_group(), "contiguous", _alst_loss)
    step.peer = True
    return step
