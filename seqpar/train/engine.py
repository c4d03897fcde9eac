"""The DeepSpeed engine built from a recipe: ZeRO stage, offload, AdamW, LR schedule, clipping.

Sequence parallelism and DeepSpeed's gradient averaging. DeepSpeed (given no ``mpu``) treats all W ranks
as data parallel and averages gradients over them: g = (1/W) sum_r g_r. With SP size S and DP size D
(W = S D), the S ranks of an SP group each hold a part of ONE sequence's gradient (sp_cross_entropy is
the global mean, so the exact gradient of that group's batch is the SUM over its S ranks), and the D
groups are ordinary data parallelism. The exact gradient is (1/D) sum_dp sum_sp g = (1/W) sum_r (S g_r),
so the trainer backpropagates ``S x loss``: one exact multiplication (S is an integer), and ZeRO keeps
partitioning optimizer states over all W ranks, which is what saves memory.
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


def build_engine(model: torch.nn.Module, recipe: Recipe, device: torch.device) -> Any:
    """``deepspeed.initialize`` over the trainable parameters (the frozen base stays out of the optimizer)."""
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
