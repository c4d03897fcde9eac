"""The engine built from a recipe: DeepSpeed (ZeRO stage, offload) or FSDP2 (``engine: fsdp2``,
seqpar/train/fsdp2.py), with AdamW, the LR schedule and clipping.

Both engines follow one contract, which the trainer's loss scaling relies on: ``backward(x)`` backpropagates
x / G and the gradient reduction averages over all W ranks. DeepSpeed does so as described below; the FSDP2
engine divides by G itself and pins FSDP2's reduce-scatter divide factor to W (fsdp2.py).

Sequence parallelism, accumulation and DeepSpeed's gradient averaging. DeepSpeed (given no ``mpu``) treats
all W = S D ranks (SP size S, DP size D) as data parallel: ``engine.backward(x)`` backpropagates x / G
(G = gradient_accumulation_steps) and the accumulation boundary averages over the ranks, so the update uses
``g = (1/W) sum_r sum_m (1/G) d x_{r,m}`` for the values ``x_{r,m}`` rank r backpropagated at micro-step m.

The loss of an optimizer step is the mean over ALL its target tokens, ``L = (1/T) sum_{r,m} S_{r,m}``, with
``S_{r,m}`` the summed token cross-entropy of rank r's shard of micro-batch m (the S ranks of an SP group
each hold a part of ONE sequence, so its gradient is the SUM of theirs) and T the target tokens of the
whole step, counted before the first backward. The trainer backpropagates ``x_{r,m} = (W G / T) S_{r,m}``:
then ``g = (1/W)(1/G) (W G / T) sum_{r,m} dS_{r,m} = dL`` exactly, however the T tokens fall over SP ranks,
DP ranks and micro-steps (a micro-batch of 3 targets weighs 3/T, not 1/G; seqpar.train.trainer.train_step).
ZeRO keeps partitioning optimizer states over all W ranks, which is what saves memory.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from seqpar.train.recipe import Recipe


def lr_lambda(recipe: Recipe):
    """Multiplier of the peak lr at optimizer step s: linear warm-up, then constant / cosine / linear decay."""
    t = recipe.trainer

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / (t.warmup_steps + 1)  # never 0: the first step already learns
        if t.schedule == "constant_with_warmup":
            return 1.0
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * progress)) if t.schedule == "cosine" else 1.0 - progress

    return factor


def deepspeed_config(recipe: Recipe, device: torch.device) -> dict:
    t, ds = recipe.trainer, recipe.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
        if ds.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    if ds.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False  # we gather ourselves (adapter only)
    adam = {"lr": t.lr, "betas": list(t.betas), "eps": 1e-8, "weight_decay": t.weight_decay}
    if ds.offload == "none":
        # torch's AdamW runs on CPU and GPU without compiling anything (DeepSpeed's FusedAdam JIT-builds a CUDA
        # op, which needs nvcc on every node); with offload, DeepSpeed's CPU Adam is needed and is built once.
        adam["torch_adam"] = True
    config = {
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "optimizer": {"type": "AdamW", "params": adam},
        "gradient_clipping": t.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": t.dtype == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    config.update(gradient_precision(recipe))
    return config


def gradient_precision(recipe: Recipe) -> dict:
    """float32 gradient communication and accumulation in bf16 runs with sequence parallelism.

    The SP ranks' gradients are SUMMED partial gradients of one sequence (see above): DeepSpeed's bf16 default
    reduces and accumulates them in bf16 (8 mantissa bits), so the sum is not the one-device gradient. fp32
    communication makes the all-reduce / reduce-scatter exact to float32; fp32 accumulation (ZeRO 1-3; ZeRO-0
    with bf16 parameters has no fp32 accumulation in DeepSpeed) sums the micro-batches in float32.
    """
    if recipe.trainer.dtype != "bf16" or recipe.attention.sp_size == 1:
        return {}
    out: dict[str, Any] = {"communication_data_type": "fp32"}
    if recipe.deepspeed.zero_stage > 0:
        out["data_types"] = {"grad_accum_dtype": "fp32"}
    return out


def build_engine(model: torch.nn.Module, recipe: Recipe, device: torch.device, parallel: Any = None) -> Any:
    """``deepspeed.initialize`` over the trainable parameters (the frozen base stays out of the optimizer), or
    with ``engine: fsdp2`` the FSDP2 engine over ``parallel``'s (dp, sp) mesh."""
    if recipe.engine == "fsdp2":
        from seqpar.train.fsdp2 import build_fsdp2_engine

        return build_fsdp2_engine(model, recipe, parallel)
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    schedule = lr_lambda(recipe)
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=params,
        config=deepspeed_config(recipe, device),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
    )
    return engine
